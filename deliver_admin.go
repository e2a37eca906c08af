// The delivery queue on Caddy's admin API (module admin.api.mux_webhook,
// next to the live log):
//
//	GET    /mux-webhook/queue                          per destination: name, url, configured, pending, in_flight,
//	                                                   delivered, dead, oldest_pending_seconds, last_error,
//	                                                   last_error_at, instance, stalled, state (active, paused),
//	                                                   state_since
//	GET    /mux-webhook/queue/dead?destination=<name>  dead letters: seq, id, type, attempts, last_error, dead_at
//	POST   /mux-webhook/queue/redeliver                {"destination":…,"ids":[…]} or {"destination":…,"all":true}
//	POST   /mux-webhook/queue/pause                    {"destination":…}: hold its events, on every gateway
//	POST   /mux-webhook/queue/resume                   {"destination":…}: deliver them again
//	DELETE /mux-webhook/queue/dead?destination=<name>[&up_to=<seq>]
//	                                                   drop the dead letters (up to a listing's seq)
//
// Dead letters of a destination no longer configured are listed (as
// "configured": false), and can be listed and purged; redelivered only to
// a configured destination.
//
// Changes need Content-Type: application/json, which an HTML form cannot
// send; Caddy's admin API refuses cross-origin requests itself. The
// console's site route (mux_webhook_ui, console.go) serves the same
// endpoints and refuses cross-site changes on its own.

package muxwebhook

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/queue"
)

// QueueStatus is one destination in GET /mux-webhook/queue. Pending,
// InFlight, Dead and OldestPendingSeconds are read from the stream, the
// same on every instance sharing it; Delivered and LastError are this
// instance's (named by Instance) since it started.
type QueueStatus struct {
	Name string `json:"name"`
	URL  string `json:"url"`
	// Configured is false for a destination the config no longer has
	// whose dead letters (or copies) are still kept.
	Configured bool   `json:"configured"`
	Pending    uint64 `json:"pending"`
	InFlight   uint64 `json:"in_flight"`
	// Held, of Pending and InFlight, wait for an earlier event of their
	// object (order object); it may lag by up to 5s.
	Held                 uint64  `json:"held"`
	Delivered            uint64  `json:"delivered"`
	Dead                 uint64  `json:"dead"`
	OldestPendingSeconds float64 `json:"oldest_pending_seconds"`
	LastError            string  `json:"last_error"`
	// LastErrorAt is when LastError happened (RFC 3339); empty when
	// there is none (a later delivery clears both).
	LastErrorAt string `json:"last_error_at,omitempty"`
	Instance    string `json:"instance"`
	// Stalled is set while events wait and nothing was attempted for
	// longer than their retry schedule allows (stall_after past the next
	// due attempt); StalledSince (RFC 3339) is when progress stopped.
	Stalled      bool   `json:"stalled"`
	StalledSince string `json:"stalled_since,omitempty"`
	// State is active, paused (by an operator, on every gateway sharing
	// the stream) or tripped (by its breaker, in this instance);
	// StateSince (RFC 3339) is when it was paused, tripped or last reset;
	// NextProbe, while tripped, when the next probe is due.
	State      string `json:"state"`
	StateSince string `json:"state_since,omitempty"`
	NextProbe  string `json:"next_probe,omitempty"`
}

// queueAdminTimeout bounds each of the queue's admin requests.
const queueAdminTimeout = 30 * time.Second

// serveQueue serves the queue's admin endpoints; sub is the path after
// /mux-webhook/queue.
func serveQueue(w http.ResponseWriter, r *http.Request, sub string, app *App) error {
	if app == nil || app.queue == nil {
		return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: errors.New("no delivery queue is configured (mux_webhook { destination … })")}
	}
	d := app.queue
	h := d.handle.Load()
	if h == nil {
		return caddy.APIError{HTTPStatus: http.StatusServiceUnavailable, Err: errors.New("the delivery queue is not open yet")}
	}
	store := h.Store
	// Every answer within a bound: a listing that cannot finish (NATS
	// away, a cluster electing) answers 503 rather than hold the client
	// (the CLI waits as long as the server does).
	ctx, cancel := context.WithTimeout(r.Context(), queueAdminTimeout)
	defer cancel()
	w.Header().Set("Cache-Control", "no-store")
	switch {
	case sub == "" && r.Method == http.MethodGet:
		names := make([]string, 0, len(d.destinations))
		for name := range d.destinations {
			names = append(names, name)
		}
		// Destinations no longer configured whose dead letters are kept:
		// listed, so that an operator sees (and can purge) them.
		deadCounts, err := store.DeadCounts(ctx)
		if err != nil {
			return caddy.APIError{HTTPStatus: http.StatusServiceUnavailable, Err: fmt.Errorf("queue status: %v", err)}
		}
		for name, n := range deadCounts {
			if _, ok := d.destinations[name]; !ok && n > 0 && queue.ValidDestination(name) {
				names = append(names, name)
			}
		}
		sort.Strings(names)
		out := make([]QueueStatus, 0, len(names))
		for _, name := range names {
			dest, configured := d.destinations[name]
			st, err := store.Status(ctx, name, dest.OrderObject)
			if err != nil {
				return caddy.APIError{HTTPStatus: http.StatusServiceUnavailable, Err: fmt.Errorf("queue status of %s: %v", name, err)}
			}
			br := h.stat(name).breaker
			qs := QueueStatus{Name: name, Configured: configured, Pending: st.Pending, InFlight: st.InFlight, Held: st.Held, Dead: st.Dead, Instance: d.instance,
				State: destinationState(st, br)}
			switch qs.State {
			case "paused":
				qs.StateSince = st.Pause.Since.UTC().Format(time.RFC3339)
			case "tripped":
				qs.StateSince = br.Since.UTC().Format(time.RFC3339)
				qs.NextProbe = br.NextProbe.UTC().Format(time.RFC3339)
			default:
				if !br.Since.IsZero() {
					qs.StateSince = br.Since.UTC().Format(time.RFC3339) // reset then
				}
			}
			if configured {
				qs.URL = redactURL(dest.URL)
			}
			if !st.Oldest.IsZero() {
				qs.OldestPendingSeconds = time.Since(st.Oldest).Seconds()
			}
			stat := h.stat(name)
			qs.Delivered, qs.LastError = stat.delivered, stat.lastError
			if !stat.lastErrorAt.IsZero() {
				qs.LastErrorAt = stat.lastErrorAt.UTC().Format(time.RFC3339)
			}
			if stalled, since := h.stall(name); stalled {
				qs.Stalled, qs.StalledSince = true, since.UTC().Format(time.RFC3339)
			}
			out = append(out, qs)
		}
		return writeJSON(w, out)
	case sub == "/dead" && (r.Method == http.MethodGet || r.Method == http.MethodDelete):
		name := r.URL.Query().Get("destination")
		if err := knownDeadDestination(r, d, store, name); err != nil {
			return err
		}
		if r.Method == http.MethodDelete {
			if err := checkJSONChange(r); err != nil {
				return err
			}
			var upTo uint64
			if v := r.URL.Query().Get("up_to"); v != "" {
				n, err := strconv.ParseUint(v, 10, 64)
				if err != nil || n == 0 {
					return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: errors.New("up_to: want the seq of the last dead letter to purge, from the listing (a number from 1)")}
				}
				upTo = n
			}
			if err := store.PurgeUpTo(ctx, name, upTo); err != nil {
				return caddy.APIError{HTTPStatus: http.StatusServiceUnavailable, Err: err}
			}
			return writeJSON(w, map[string]bool{"purged": true})
		}
		dead, err := store.Dead(ctx, name)
		if err != nil {
			return caddy.APIError{HTTPStatus: http.StatusServiceUnavailable, Err: err}
		}
		return writeJSON(w, dead)
	case (sub == "/pause" || sub == "/resume") && r.Method == http.MethodPost:
		if err := checkJSONChange(r); err != nil {
			return err
		}
		var req struct {
			Destination string `json:"destination"`
		}
		dec := json.NewDecoder(io.LimitReader(r.Body, 64<<10))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&req); err != nil {
			return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: fmt.Errorf("want {\"destination\":…}: %v", err)}
		}
		if _, ok := d.destinations[req.Destination]; !ok {
			return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: fmt.Errorf("unknown destination %q: name one of the configured destinations", req.Destination)}
		}
		pause := sub == "/pause"
		if err := store.SetPaused(ctx, req.Destination, pause, d.instance); err != nil {
			return caddy.APIError{HTTPStatus: http.StatusServiceUnavailable, Err: err}
		}
		state, did := "active", "resumed"
		if pause {
			state, did = "paused", "paused"
		}
		d.logger.Info("mux webhook destination "+did+" through the admin API: in effect on every gateway sharing the stream within seconds",
			zap.String("destination", req.Destination), zap.String("instance", d.instance))
		return writeJSON(w, map[string]string{"destination": req.Destination, "state": state})
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
			return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: fmt.Errorf("unknown destination %q: dead letters go back only to a configured destination (configure it again, or purge them)", req.Destination)}
		}
		if !req.All && len(req.IDs) == 0 {
			return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: errors.New("name the ids to redeliver, or all: true")}
		}
		n, err := store.Redeliver(ctx, req.Destination, req.IDs, req.All)
		if nd, ok := errors.AsType[*queue.NotDeadError](err); ok {
			return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("redelivered %d; %d of the ids are not dead letters of %s: %s",
				n, len(nd.IDs), req.Destination, strings.Join(quoteAll(nd.IDs), ", "))}
		}
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

// redactURL is a URL as it may be shown (the status, the console, load
// errors): without its userinfo (the user name is often a token) and its
// query, which may hold credentials.
func redactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "(unparsable)"
	}
	u.User = nil
	u.RawQuery, u.ForceQuery = "", false
	u.Fragment, u.RawFragment = "", ""
	return u.String()
}

// checkDestinationURL checks a destination's url when the config loads,
// so that it never fails at delivery time. Its errors never quote the
// URL: it may hold a password or a token.
func checkDestinationURL(raw string) error {
	u, err := url.Parse(raw)
	if err != nil {
		if _, ok := errors.AsType[url.EscapeError](err); ok {
			return errors.New("a % in it is not followed by two hex digits: write a literal % as %25 (e.g. in the password)")
		}
		if _, ok := errors.AsType[url.InvalidHostError](err); ok {
			return errors.New("the host holds a character a host name cannot have")
		}
		return errors.New("not a valid URL: check the port (a number from 1 to 65535) and escape the user's and password's reserved characters as %XX")
	}
	if u.Scheme != "http" && u.Scheme != "https" || u.Opaque != "" {
		return errors.New("the url must start with http:// or https://")
	}
	if u.Hostname() == "" {
		return errors.New("the url has no host")
	}
	if u.User == nil && strings.Contains(u.Path, "@") {
		// https://tok/en@host/ is host "tok": a credential with a '/' not
		// escaped would be sent to the wrong host and shown as one.
		return errors.New("an '@' in the path: if the url carries user:password@host, escape '/', '?' and '#' in them as %2F, %3F, %23; if the path has an '@', write it as %40")
	}
	if p := u.Port(); p != "" {
		if n, err := strconv.Atoi(p); err != nil || n < 1 || n > 65535 {
			return errors.New("the port must be a number from 1 to 65535")
		}
	} else if strings.HasSuffix(u.Host, ":") {
		return errors.New("the port after ':' is empty")
	}
	return nil
}

// knownDeadDestination accepts a configured destination's name, or that
// of one no longer configured whose dead letters are kept.
func knownDeadDestination(r *http.Request, d *appQueue, store *queue.Store, name string) error {
	if _, ok := d.destinations[name]; ok {
		return nil
	}
	if queue.ValidDestination(name) {
		counts, err := store.DeadCounts(r.Context())
		if err != nil {
			return caddy.APIError{HTTPStatus: http.StatusServiceUnavailable, Err: err}
		}
		if counts[name] > 0 {
			return nil
		}
	}
	return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: fmt.Errorf("unknown destination %q (not configured, and no dead letters kept for it)", name)}
}

// quoteAll quotes each id, bounded, for an error message.
func quoteAll(ids []string) []string {
	out := make([]string, 0, len(ids))
	for i, id := range ids {
		if i == 50 {
			out = append(out, fmt.Sprintf("and %d more", len(ids)-i))
			break
		}
		out = append(out, strconv.Quote(boundedString(id, 200)))
	}
	return out
}

func writeJSON(w http.ResponseWriter, v any) error {
	w.Header().Set("Content-Type", "application/json")
	return json.NewEncoder(w).Encode(v)
}
