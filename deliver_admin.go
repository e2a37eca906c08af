// The delivery queue on Caddy's admin API (module admin.api.mux_webhook,
// next to the live log):
//
//	GET    /mux-webhook/queue                          per destination: name, url, pending, in_flight,
//	                                                   delivered, dead, oldest_pending_seconds, last_error,
//	                                                   instance
//	GET    /mux-webhook/queue/dead?destination=<name>  dead letters: id, type, attempts, last_error, dead_at
//	POST   /mux-webhook/queue/redeliver                {"destination":…,"ids":[…]} or {"destination":…,"all":true}
//	DELETE /mux-webhook/queue/dead?destination=<name>  drop the dead letters
//
// Changes need Content-Type: application/json, which an HTML form cannot
// send; Caddy's admin API refuses cross-origin requests itself. The
// console's site route (mux_webhook_ui, livelog_ui.go) serves the same
// endpoints and refuses cross-site changes on its own.

package muxwebhook

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/url"
	"sort"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// QueueStatus is one destination in GET /mux-webhook/queue. Pending,
// InFlight, Dead and OldestPendingSeconds are read from the stream, the
// same on every instance sharing it; Delivered and LastError are this
// instance's (named by Instance) since it started.
type QueueStatus struct {
	Name                 string  `json:"name"`
	URL                  string  `json:"url"`
	Pending              uint64  `json:"pending"`
	InFlight             uint64  `json:"in_flight"`
	Delivered            uint64  `json:"delivered"`
	Dead                 uint64  `json:"dead"`
	OldestPendingSeconds float64 `json:"oldest_pending_seconds"`
	LastError            string  `json:"last_error"`
	Instance             string  `json:"instance"`
	// Stalled is set while events wait and nothing was attempted for
	// longer than their retry schedule allows (stall_after past the next
	// due attempt); StalledSince (RFC 3339) is when progress stopped.
	Stalled      bool   `json:"stalled"`
	StalledSince string `json:"stalled_since,omitempty"`
}

// serveQueue serves the queue's admin endpoints; sub is the path after
// /mux-webhook/queue.
func serveQueue(w http.ResponseWriter, r *http.Request, sub string, app *App) error {
	if app == nil || app.delivery == nil {
		return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: errors.New("no delivery queue is configured (mux_webhook { destination … })")}
	}
	d := app.delivery
	h := d.handle.Load()
	if h == nil {
		return caddy.APIError{HTTPStatus: http.StatusServiceUnavailable, Err: errors.New("the delivery queue is not open yet")}
	}
	store := h.Store
	ctx := r.Context()
	w.Header().Set("Cache-Control", "no-store")
	switch {
	case sub == "" && r.Method == http.MethodGet:
		names := make([]string, 0, len(d.destinations))
		for name := range d.destinations {
			names = append(names, name)
		}
		sort.Strings(names)
		out := make([]QueueStatus, 0, len(names))
		for _, name := range names {
			st, err := store.Status(ctx, name)
			if err != nil {
				return caddy.APIError{HTTPStatus: http.StatusServiceUnavailable, Err: fmt.Errorf("queue status of %s: %v", name, err)}
			}
			qs := QueueStatus{Name: name, URL: redactURL(d.destinations[name].URL), Pending: st.Pending, InFlight: st.InFlight, Dead: st.Dead, Instance: d.instance}
			if !st.Oldest.IsZero() {
				qs.OldestPendingSeconds = time.Since(st.Oldest).Seconds()
			}
			stat := h.stat(name)
			qs.Delivered, qs.LastError = stat.delivered, stat.lastError
			if stalled, since := h.stall(name); stalled {
				qs.Stalled, qs.StalledSince = true, since.UTC().Format(time.RFC3339)
			}
			out = append(out, qs)
		}
		return writeJSON(w, out)
	case sub == "/dead" && (r.Method == http.MethodGet || r.Method == http.MethodDelete):
		name := r.URL.Query().Get("destination")
		if _, ok := d.destinations[name]; !ok {
			return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: fmt.Errorf("unknown destination %q", name)}
		}
		if r.Method == http.MethodDelete {
			if err := checkJSONChange(r); err != nil {
				return err
			}
			if err := store.Purge(ctx, name); err != nil {
				return caddy.APIError{HTTPStatus: http.StatusServiceUnavailable, Err: err}
			}
			return writeJSON(w, map[string]bool{"purged": true})
		}
		dead, err := store.Dead(ctx, name)
		if err != nil {
			return caddy.APIError{HTTPStatus: http.StatusServiceUnavailable, Err: err}
		}
		return writeJSON(w, dead)
	case sub == "/redeliver" && r.Method == http.MethodPost:
		if err := checkJSONChange(r); err != nil {
			return err
		}
		var req struct {
			Destination string   `json:"destination"`
			IDs         []string `json:"ids"`
			All         bool     `json:"all"`
		}
		dec := json.NewDecoder(io.LimitReader(r.Body, 1<<20))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: fmt.Errorf("want {\"destination\":…,\"ids\":[…]} or {\"destination\":…,\"all\":true}: %v", err)}
		}
		if _, ok := d.destinations[req.Destination]; !ok {
			return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: fmt.Errorf("unknown destination %q", req.Destination)}
		}
		if !req.All && len(req.IDs) == 0 {
			return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: errors.New("name the ids to redeliver, or all: true")}
		}
		n, err := store.Redeliver(ctx, req.Destination, req.IDs, req.All)
		if err != nil {
			return caddy.APIError{HTTPStatus: http.StatusServiceUnavailable, Err: fmt.Errorf("redelivered %d, then: %v", n, err)}
		}
		return writeJSON(w, map[string]int{"redelivered": n})
	}
	return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("no such queue endpoint: %s %s", r.Method, r.URL.Path)}
}

// checkJSONChange refuses a change that does not declare a JSON body: an
// HTML form cannot send one, so a page elsewhere cannot make the browser
// send it.
func checkJSONChange(r *http.Request) error {
	mt, _, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if mt != "application/json" {
		return caddy.APIError{HTTPStatus: http.StatusUnsupportedMediaType, Err: errors.New("send Content-Type: application/json")}
	}
	return nil
}

// redactURL hides a URL's password and query, which may hold credentials.
func redactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "(unparsable)"
	}
	if u.RawQuery != "" {
		u.RawQuery = "redacted"
	}
	return u.Redacted()
}

func writeJSON(w http.ResponseWriter, v any) error {
	w.Header().Set("Content-Type", "application/json")
	return json.NewEncoder(w).Encode(v)
}
