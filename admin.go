// Live Logs on Caddy's admin API (module admin.api.mux_webhook):
//
//	GET /mux-webhook/                the console's page (embedded, self-contained)
//	GET /mux-webhook/events          the latest requests, newest first, as JSON
//	                                 (?type=<glob>&outcome=<outcome>&id=<event id>&object=<object id>&limit=<n>)
//	GET /mux-webhook/events/stream   Server-Sent Events, one per request, with its sequence
//	                                 number as id; resumes after Last-Event-ID
//
// The admin API listens on localhost:2019 by default; like the rest of it,
// these endpoints are as private as its listener. Caddy's admin API refuses
// requests from browser navigations that carry no Origin (its CSRF and DNS
// rebinding defence), so to open the page in a browser, mount the same
// endpoints on a site with the mux_webhook_ui handler (console.go).

package muxwebhook

import (
	_ "embed"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
)

func init() {
	caddy.RegisterModule(adminAPI{})
}

//go:embed web/console.html
var liveLogPage []byte

// sseKeepAlive is how often an idle event stream gets a comment line, so
// that proxies and browsers keep it open.
const sseKeepAlive = 15 * time.Second

// sseWriteTimeout bounds each write to an event stream (an event, a
// keep-alive, the final reload event): a client that stops reading loses
// its stream, and its subscriber slot, this long after the socket buffers
// fill up, instead of blocking its handler for ever.
const sseWriteTimeout = 5 * time.Second

// sseMaxLifetime ends every event stream after this long; browsers'
// EventSource reconnects by itself (after the stream's "retry" delay). A
// client that stops reading while nothing is logged never fills its
// socket buffers, so no write deadline fires: this bounds how long it can
// hold a subscriber slot on a quiet gateway. (A variable for tests.)
var sseMaxLifetime = time.Minute

// adminAPI serves the live log on the admin endpoint.
type adminAPI struct {
	ctx caddy.Context
}

// CaddyModule returns the Caddy module information.
func (adminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.mux_webhook",
		New: func() caddy.Module { return new(adminAPI) },
	}
}

// Provision keeps the config's context: its end (a config reload or a
// stop) ends the event streams.
func (a *adminAPI) Provision(ctx caddy.Context) error {
	a.ctx = ctx
	return nil
}

// Routes returns the admin routes.
func (a *adminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{
		{Pattern: "/mux-webhook/", Handler: caddy.AdminHandlerFunc(a.route)},
	}
}

func (a *adminAPI) route(w http.ResponseWriter, r *http.Request) error {
	path := strings.TrimPrefix(r.URL.Path, "/mux-webhook")
	if sub, ok := strings.CutPrefix(path, "/queue"); ok && (sub == "" || strings.HasPrefix(sub, "/")) {
		return serveQueue(w, r, sub, runningApp())
	}
	if sub, ok := strings.CutPrefix(path, "/history"); ok && (sub == "" || strings.HasPrefix(sub, "/")) {
		return serveHistory(w, r, sub, runningApp())
	}
	return serveLiveLog(w, r, path, a.ctx.Done())
}

// serveLiveLog serves the live log's page ("/"), JSON ("/events") and
// event stream ("/events/stream"), for the admin API and for the
// mux_webhook_ui handler. done ends event streams: the end of the config
// that serves them.
func serveLiveLog(w http.ResponseWriter, r *http.Request, path string, done <-chan struct{}) error {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: fmt.Errorf("method %s not allowed", r.Method)}
	}
	switch path {
	case "/", "/index.html":
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		// Self-contained: nothing but itself and its endpoints. Never in a
		// frame: its buttons redeliver and purge (clickjacking).
		w.Header().Set("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
		w.Header().Set("X-Frame-Options", "DENY")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		w.Header().Set("Cache-Control", "no-store")
		_, err := w.Write(liveLogPage)
		return err
	case "/events":
		return serveEvents(w, r)
	case "/events/stream":
		return serveStream(w, r, done)
	}
	return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("no such live log endpoint: %s", path)}
}

// filters reads ?type, ?outcome, ?id, ?object and ?limit.
func filters(r *http.Request) (f logFilter, limit int, err error) {
	q := r.URL.Query()
	f = logFilter{Type: q.Get("type"), Outcome: q.Get("outcome"), ID: q.Get("id"), ObjectID: q.Get("object")}
	if f.Type != "" {
		if err := checkPattern(f.Type); err != nil {
			return logFilter{}, 0, err
		}
	}
	if f.Outcome != "" && !outcomes[f.Outcome] && !deliveryOutcomes[f.Outcome] {
		return logFilter{}, 0, fmt.Errorf("unknown outcome %q", f.Outcome)
	}
	limit = 100
	if s := q.Get("limit"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			return logFilter{}, 0, fmt.Errorf("limit %q: want a whole number >= 1", s)
		}
		limit = min(n, 100000)
	}
	return f, limit, nil
}

func serveEvents(w http.ResponseWriter, r *http.Request) error {
	f, limit, err := filters(r)
	if err != nil {
		return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: err}
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	return json.NewEncoder(w).Encode(liveLog.query(f, limit))
}

// lastEventID reads where a resuming client stopped: the Last-Event-ID
// header that EventSource sends when it reconnects, else ?lastEventId=
// (for the page's first connection, and for curl). nil when neither is
// set; an error when one is not a sequence number.
func lastEventID(r *http.Request) (*uint64, error) {
	s := r.Header.Get("Last-Event-ID")
	if s == "" {
		s = r.URL.Query().Get("lastEventId")
	}
	if s == "" {
		return nil, nil
	}
	n, err := strconv.ParseUint(strings.TrimSpace(s), 10, 64)
	if err != nil {
		return nil, fmt.Errorf("Last-Event-ID %q: want the id of an event of this stream (a whole number)", s)
	}
	return &n, nil
}

// requestEvent is an entry as an SSE event; its id is the entry's
// sequence number, which a reconnecting EventSource sends back as
// Last-Event-ID.
func requestEvent(e LogEntry) (string, error) {
	data, err := json.Marshal(e)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("id: %d\nevent: request\ndata: %s\n\n", e.Seq, data), nil
}

// stream sends each new request as an SSE event ("request", JSON data),
// until the client goes, or the config that serves it is replaced or
// stopped (then a final "reload" event says so), or a write does not
// complete within sseWriteTimeout. A client that resumes (Last-Event-ID)
// first gets the entries after that id that the ring still holds, and a
// "missed" event when it no longer holds some of them.
func serveStream(w http.ResponseWriter, r *http.Request, done <-chan struct{}) error {
	f, _, err := filters(r)
	if err != nil {
		return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: err}
	}
	after, err := lastEventID(r)
	if err != nil {
		return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: err}
	}
	rc := http.NewResponseController(w)
	// Without write deadlines a client that stops reading would hold its
	// handler and its slot for ever: refuse rather than risk it. (Go's
	// HTTP/1 and HTTP/2 servers and Caddy's HTTP/3 support them.)
	if err := rc.SetWriteDeadline(time.Time{}); err != nil {
		return caddy.APIError{HTTPStatus: http.StatusInternalServerError, Err: fmt.Errorf("live log stream: this connection cannot bound its writes: %v", err)}
	}
	ch, backlog, missed, ok := liveLog.subscribeAfter(after)
	if !ok {
		return caddy.APIError{HTTPStatus: http.StatusServiceUnavailable, Err: fmt.Errorf("too many live log streams (at most %d)", maxSubscribers)}
	}
	defer liveLog.unsubscribe(ch)

	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	if sendSSE(w, rc, "retry: 2000\n: mux_webhook live log\n\n") != nil {
		return nil
	}
	if missed > 0 {
		// No id: the client's Last-Event-ID stays that of the last entry.
		msg := fmt.Sprintf(": %d entries after %d are no longer in the live log\nevent: missed\ndata: {\"missed\":%d}\n\n", missed, *after, missed)
		if sendSSE(w, rc, msg) != nil {
			return nil
		}
	}
	for _, e := range backlog {
		if !f.matches(e) {
			continue
		}
		msg, err := requestEvent(e)
		if err != nil || sendSSE(w, rc, msg) != nil {
			return nil
		}
	}
	keepAlive := time.NewTicker(sseKeepAlive)
	defer keepAlive.Stop()
	lifetime := time.NewTimer(sseMaxLifetime)
	defer lifetime.Stop()
	for {
		var msg string
		select {
		case <-r.Context().Done():
			return nil
		case <-lifetime.C:
			return nil // the client reconnects; a stalled one loses its slot
		case <-done:
			_ = sendSSE(w, rc, "event: reload\ndata: {}\n\n")
			return nil
		case <-keepAlive.C:
			msg = ": keep-alive\n\n"
		case e := <-ch:
			if !f.matches(e) {
				continue
			}
			if msg, err = requestEvent(e); err != nil {
				return nil
			}
		}
		if sendSSE(w, rc, msg) != nil {
			return nil // the handler's return ends the response
		}
	}
}

// sendSSE writes and flushes msg within sseWriteTimeout, then lifts the
// deadline again: between events the stream may idle (an HTTP/2 stream
// whose deadline passes is reset even when nothing is being written), and
// the server's own write timeout, if any, must not cut it either.
func sendSSE(w http.ResponseWriter, rc *http.ResponseController, msg string) error {
	if err := rc.SetWriteDeadline(time.Now().Add(sseWriteTimeout)); err != nil {
		return err
	}
	if _, err := io.WriteString(w, msg); err != nil {
		return err
	}
	if err := rc.Flush(); err != nil {
		return err
	}
	return rc.SetWriteDeadline(time.Time{})
}

// Interface guards
var (
	_ caddy.AdminRouter = (*adminAPI)(nil)
	_ caddy.Provisioner = (*adminAPI)(nil)
)
