// History's endpoints, on the admin API (/mux-webhook/history…) and on a
// site route with mux_webhook_ui:
//
//	GET  history?type=&object=&id=&outcome=&since=&until=&limit=&before=   search, newest first
//	GET  history/<seq>                                                       one event: its body and attempts
//	POST history/replay   {"destination": …, filters…, "dry_run": bool}    count, or start a replay job
//	GET  history/replay/<job>                                                a job's progress
//	DELETE history/replay/<job>                                              cancel it
//	GET  history/stats?since=24h                                             the charts' per-minute data

package muxwebhook

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/queue"
)

// historyAdminTimeout bounds an answer of the history's endpoints.
const historyAdminTimeout = 30 * time.Second

// Search bounds, as SPEC gives them.
const (
	historyDefaultLimit = 100
	historyMaxLimit     = 1000
	historyDefaultSince = 24 * time.Hour
)

// serveHistory serves sub (after /history) for app's history.
func serveHistory(w http.ResponseWriter, r *http.Request, sub string, app *App) error {
	var d *appQueue
	if app != nil {
		d = app.queue
	}
	if d == nil || !d.historyOn.Load() {
		return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: errHistoryOff(app)}
	}
	hist := d.history()
	if hist == nil {
		return caddy.APIError{HTTPStatus: http.StatusServiceUnavailable, Err: errors.New("history is not open: the queue's store is not open yet, or the history's stream could not be made (see Caddy's log)")}
	}
	ctx, cancel := context.WithTimeout(r.Context(), historyAdminTimeout)
	defer cancel()
	w.Header().Set("Cache-Control", "no-store")
	unavailable := func(err error) error {
		return caddy.APIError{HTTPStatus: http.StatusServiceUnavailable, Err: err}
	}
	switch {
	case sub == "" || sub == "/":
		if err := onlyGet(w, r); err != nil {
			return err
		}
		f, err := historyFilter(r.URL.Query(), true)
		if err != nil {
			return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: err}
		}
		events, next, err := hist.Search(ctx, f)
		if err != nil {
			return unavailable(err)
		}
		out := struct {
			Events     []queue.HistoryEvent `json:"events"`
			NextBefore *uint64              `json:"next_before"`
		}{Events: events}
		if next > 0 {
			out.NextBefore = &next
		}
		return writeJSON(w, out)
	case sub == "/stats":
		if err := onlyGet(w, r); err != nil {
			return err
		}
		since, err := timeParam(r.URL.Query().Get("since"), time.Now().Add(-historyDefaultSince))
		if err != nil {
			return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: fmt.Errorf("since: %v", err)}
		}
		st, err := hist.Stats(ctx, since)
		if err != nil {
			return unavailable(err)
		}
		return writeJSON(w, st)
	case sub == "/replay":
		if r.Method != http.MethodPost {
			w.Header().Set("Allow", "POST")
			return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: errors.New("start a replay with POST")}
		}
		var req struct {
			Destination string `json:"destination"`
			Type        string `json:"type"`
			Object      string `json:"object"`
			ID          string `json:"id"`
			Outcome     string `json:"outcome"`
			Since       string `json:"since"`
			Until       string `json:"until"`
			DryRun      bool   `json:"dry_run"`
		}
		dec := json.NewDecoder(io.LimitReader(r.Body, 64<<10))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: fmt.Errorf("replay: a JSON object with destination and filters: %v", err)}
		}
		if err := d.replayable(req.Destination); err != nil {
			return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: err}
		}
		q := url.Values{}
		for k, v := range map[string]string{"type": req.Type, "object": req.Object, "id": req.ID, "outcome": req.Outcome, "since": req.Since, "until": req.Until} {
			if v != "" {
				q.Set(k, v)
			}
		}
		f, err := historyFilter(q, false)
		if err != nil {
			return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: fmt.Errorf("replay: %v", err)}
		}
		job, err := hist.Replay(ctx, req.Destination, f, req.DryRun)
		if errors.Is(err, queue.ErrReplayTooLarge) {
			return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: err}
		}
		if err != nil {
			return unavailable(err)
		}
		if req.DryRun {
			return writeJSON(w, map[string]any{"matched": job.Matched, "dry_run": true, "destination": req.Destination})
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusAccepted)
		return json.NewEncoder(w).Encode(job)
	case strings.HasPrefix(sub, "/replay/"):
		id := strings.TrimPrefix(sub, "/replay/")
		var job queue.ReplayJob
		var err error
		switch r.Method {
		case http.MethodGet, http.MethodHead:
			job, err = hist.ReplayStatus(ctx, id)
		case http.MethodDelete:
			job, err = hist.CancelReplay(ctx, id)
		default:
			w.Header().Set("Allow", "GET, HEAD, DELETE")
			return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: fmt.Errorf("method %s not allowed: GET a job's progress, DELETE to cancel it", r.Method)}
		}
		if errors.Is(err, queue.ErrReplayNotFound) {
			return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: err}
		}
		if err != nil {
			return unavailable(err)
		}
		return writeJSON(w, job)
	default:
		if err := onlyGet(w, r); err != nil {
			return err
		}
		seq, err := strconv.ParseUint(strings.TrimPrefix(sub, "/"), 10, 64)
		if err != nil || seq == 0 {
			return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("no such history endpoint: %s (an event is /history/<seq>)", sub)}
		}
		ev, err := hist.Get(ctx, seq)
		if errors.Is(err, queue.ErrHistoryNotFound) {
			return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: err}
		}
		if err != nil {
			return unavailable(err)
		}
		return writeJSON(w, ev)
	}
}

func onlyGet(w http.ResponseWriter, r *http.Request) error {
	if r.Method == http.MethodGet || r.Method == http.MethodHead {
		return nil
	}
	w.Header().Set("Allow", "GET, HEAD")
	return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: fmt.Errorf("method %s not allowed", r.Method)}
}

// historyFilter reads a search's (or a replay's) filters: since defaults
// to 24h for both (a replay queues what the same search lists); a search
// gets a limit.
func historyFilter(q url.Values, search bool) (queue.HistoryFilter, error) {
	f := queue.HistoryFilter{Type: q.Get("type"), Object: q.Get("object"), ID: q.Get("id"), Outcome: q.Get("outcome")}
	if f.Type != "" {
		if err := checkPattern(f.Type); err != nil {
			return f, err
		}
		pattern := f.Type
		f.Match = func(typ string) bool { return globMatch(pattern, typ) }
	}
	switch f.Outcome {
	case "", "verified", "duplicate":
	default:
		return f, fmt.Errorf("outcome %q: history keeps verified and duplicate (rejected requests are never kept)", f.Outcome)
	}
	var err error
	if f.Since, err = timeParam(q.Get("since"), time.Now().Add(-historyDefaultSince)); err != nil {
		return f, fmt.Errorf("since: %v", err)
	}
	if f.Until, err = timeParam(q.Get("until"), time.Time{}); err != nil {
		return f, fmt.Errorf("until: %v", err)
	}
	if !search {
		return f, nil
	}
	f.Limit = historyDefaultLimit
	if s := q.Get("limit"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > historyMaxLimit {
			return f, fmt.Errorf("limit %q: want 1 to %d", s, historyMaxLimit)
		}
		f.Limit = n
	}
	if s := q.Get("before"); s != "" {
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil || n == 0 {
			return f, fmt.Errorf("before %q: want a sequence (next_before of the previous page)", s)
		}
		f.Before = n
	}
	return f, nil
}

// timeParam reads an RFC 3339 time, or a duration back from now (24h,
// 7d); empty: def.
func timeParam(s string, def time.Time) (time.Time, error) {
	if s == "" {
		return def, nil
	}
	if t, err := time.Parse(time.RFC3339Nano, s); err == nil {
		return t, nil
	}
	d, err := caddy.ParseDuration(s)
	if err != nil || d < 0 {
		return time.Time{}, fmt.Errorf("%q: want an RFC 3339 time (2026-12-01T14:00:00Z) or a duration back from now (24h, 7d)", s)
	}
	return time.Now().Add(-d), nil
}
