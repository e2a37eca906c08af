// Live Logs on Caddy's admin API (module admin.api.mux_webhook):
//
//	GET /mux-webhook/                the page (embedded, self-contained)
//	GET /mux-webhook/events          the latest requests, newest first, as JSON
//	                                 (?type=<glob>&outcome=<outcome>&limit=<n>)
//	GET /mux-webhook/events/stream   Server-Sent Events, one per request
//
// The admin API listens on localhost:2019 by default; like the rest of it,
// these endpoints are as private as its listener. Caddy's admin API refuses
// requests from browser navigations that carry no Origin (its CSRF and DNS
// rebinding defence), so to open the page in a browser, mount the same
// endpoints on a site with the mux_webhook_ui handler (livelog_ui.go).

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

//go:embed web/livelog.html
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
		return serveQueue(w, r, sub, running.Load())
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
		w.Header().Set("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; connect-src 'self'")
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

// filters reads ?type, ?outcome and ?limit.
func filters(r *http.Request) (typePattern, outcome string, limit int, err error) {
	q := r.URL.Query()
	typePattern, outcome = q.Get("type"), q.Get("outcome")
	if typePattern != "" {
		if err := checkPattern(typePattern); err != nil {
			return "", "", 0, err
		}
	}
	if outcome != "" && !outcomes[outcome] && !deliveryOutcomes[outcome] {
		return "", "", 0, fmt.Errorf("unknown outcome %q", outcome)
	}
	limit = 100
	if s := q.Get("limit"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			return "", "", 0, fmt.Errorf("limit %q: want a whole number >= 1", s)
		}
		limit = min(n, 100000)
	}
	return typePattern, outcome, limit, nil
}

func serveEvents(w http.ResponseWriter, r *http.Request) error {
	typePattern, outcome, limit, err := filters(r)
	if err != nil {
		return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: err}
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	return json.NewEncoder(w).Encode(liveLog.query(typePattern, outcome, limit))
}

// stream sends each new request as an SSE event ("request", JSON data),
// until the client goes, or the config that serves it is replaced or
// stopped (then a final "reload" event says so), or a write does not
// complete within sseWriteTimeout.
func serveStream(w http.ResponseWriter, r *http.Request, done <-chan struct{}) error {
	typePattern, outcome, _, err := filters(r)
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
	ch, ok := liveLog.subscribe()
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
			if !entryMatches(e, typePattern, outcome) {
				continue
			}
			data, err := json.Marshal(e)
			if err != nil {
				return nil
			}
			msg = fmt.Sprintf("id: %d\nevent: request\ndata: %s\n\n", e.Seq, data)
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
