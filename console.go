// The mux_webhook_ui handler serves the console (the page, the live log's
// JSON and event stream, and the delivery queue's endpoints) on a site
// route, for browsers: Caddy's admin API refuses browser navigations.
// Protect the route (basic_auth, a private bind address): the page shows
// verified event bodies and can redeliver and purge dead letters.
//
//	handle_path /mux-webhook* {
//		basic_auth { ... }
//		mux_webhook_ui
//	}
//
// (/mux-webhook*, not /mux-webhook/*, so that /mux-webhook itself reaches
// the handler, which redirects it to /mux-webhook/: the page's requests
// are relative to its own URL.)
//
// A site route has none of the admin API's cross-site defences, and
// basic_auth credentials are sent by the browser whoever asks for the
// request: every change (any method but GET, HEAD and OPTIONS) must come
// from the console's own page (consoleChange below).

package muxwebhook

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"

	"go.uber.org/zap"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func init() {
	caddy.RegisterModule(Console{})
}

// ConsoleHeader must be on every change the console's page requests. An
// HTML form cannot send a custom header, and a script on another site
// cannot either without a CORS preflight, which this handler never
// grants.
const ConsoleHeader = "X-Mux-Webhook-Console"

// Console serves the console's page at "/" (and "/index.html"), the live log's
// entries at "/events", its event stream at "/events/stream" and the
// delivery queue at "/queue", "/queue/dead", "/queue/redeliver",
// "/queue/pause" and "/queue/resume",
// relative to the route; use it inside handle_path. It answers every
// request it gets.
type Console struct {
	ctx    caddy.Context
	app    *App
	logger *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (Console) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.mux_webhook_ui",
		New: func() caddy.Module { return new(Console) },
	}
}

// Provision keeps the context, whose end closes event streams, and the
// mux_webhook app, whose delivery queue the console shows.
func (u *Console) Provision(ctx caddy.Context) error {
	u.ctx, u.logger = ctx, ctx.Logger()
	v, err := ctx.AppIfConfigured("mux_webhook")
	if err != nil && !errors.Is(err, caddy.ErrNotConfigured) {
		return fmt.Errorf("mux_webhook_ui: loading the mux_webhook app: %v", err)
	}
	u.app, _ = v.(*App)
	return nil
}

// ServeHTTP serves the console. Errors are answered as the admin API
// answers them, {"error": "…"} with the status, so that the page can say
// what went wrong.
func (u *Console) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	path := r.URL.Path
	if path == "" {
		path = "/"
	}
	if !strings.HasPrefix(path, "/") {
		path = "/" + path
	}
	if (path == "/") && (r.Method == http.MethodGet || r.Method == http.MethodHead) {
		if to, ok := slashRedirect(r); ok {
			w.Header().Set("Location", to)
			w.WriteHeader(http.StatusTemporaryRedirect)
			return nil
		}
	}
	var err error
	if refused := consoleChange(r); refused != nil {
		u.logger.Warn("mux_webhook_ui: refused a change that did not come from the console's page",
			zap.String("method", r.Method), zap.String("uri", r.RequestURI),
			zap.String("origin", boundedString(r.Header.Get("Origin"), 256)),
			zap.String("sec_fetch_site", boundedString(r.Header.Get("Sec-Fetch-Site"), 64)),
			zap.String("reason", refused.Error()))
		err = caddy.APIError{HTTPStatus: http.StatusForbidden, Err: refused}
	} else if sub, ok := strings.CutPrefix(path, "/queue"); ok && (sub == "" || strings.HasPrefix(sub, "/")) {
		err = serveQueue(w, r, sub, u.app)
	} else if sub, ok := strings.CutPrefix(path, "/history"); ok && (sub == "" || strings.HasPrefix(sub, "/")) {
		err = serveHistory(w, r, sub, u.app)
	} else {
		err = serveLiveLog(w, r, path, u.ctx.Done())
	}
	if apiErr, ok := errors.AsType[caddy.APIError](err); ok {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Content-Type-Options", "nosniff")
		w.Header().Set("Cache-Control", "no-store")
		w.WriteHeader(apiErr.HTTPStatus)
		return json.NewEncoder(w).Encode(map[string]string{"error": apiErr.Err.Error()})
	}
	return err
}

// slashRedirect says where to send a request for the page whose URL, as
// the client sent it, does not end in a slash (/mux-webhook, mounted with
// handle_path /mux-webhook*): the page's requests ("events", "queue") are
// relative to its URL, so it must be served at /mux-webhook/. The
// Location is relative ("./mux-webhook/"), so that it stays on this site
// whatever the path holds.
func slashRedirect(r *http.Request) (string, bool) {
	orig, ok := r.Context().Value(caddyhttp.OriginalRequestCtxKey).(http.Request)
	if !ok || orig.URL == nil {
		return "", false
	}
	p := orig.URL.EscapedPath()
	if p == "" || strings.HasSuffix(p, "/") {
		return "", false
	}
	to := "./" + p[strings.LastIndex(p, "/")+1:] + "/"
	if orig.URL.RawQuery != "" {
		to += "?" + orig.URL.RawQuery
	}
	return to, true
}

// consoleChange refuses a change that may come from another site: any
// method but GET, HEAD and OPTIONS needs the ConsoleHeader, and, when the
// browser says where it comes from, an Origin of this very host and a
// Sec-Fetch-Site of same-origin. (curl and scripts send neither Origin nor
// Sec-Fetch-Site; they need only the header.) It returns nil for reads
// and for accepted changes.
func consoleChange(r *http.Request) error {
	switch r.Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions:
		return nil
	}
	if site := r.Header.Get("Sec-Fetch-Site"); site != "" && site != "same-origin" {
		return fmt.Errorf("refused: a %s request (Sec-Fetch-Site: %s); changes must come from the console's own page", r.Method, boundedString(site, 64))
	}
	if _, sent := r.Header["Origin"]; sent {
		origin := r.Header.Get("Origin")
		if !sameHost(origin, r.Host) {
			return fmt.Errorf("refused: Origin %q is not this site (%s); changes must come from the console's own page", boundedString(origin, 256), boundedString(r.Host, 256))
		}
	}
	if r.Header.Get(ConsoleHeader) != "1" {
		return fmt.Errorf("refused: a change needs the header %s: 1, which the console's page sends and an HTML form or another site cannot", ConsoleHeader)
	}
	return nil
}

// sameHost reports whether origin (scheme://host[:port]) names host (the
// request's Host), ports compared with the scheme's default filled in:
// behind a proxy that terminates TLS, https://example.com arrives as
// Host example.com.
func sameHost(origin, host string) bool {
	u, err := url.Parse(origin)
	if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") || u.Path != "" || u.User != nil {
		return false // also "null", an opaque origin
	}
	defaultPort := map[string]string{"http": "80", "https": "443"}[u.Scheme]
	withPort := func(h string) string {
		h = strings.ToLower(h)
		if u, err := url.Parse("//" + h); err == nil && u.Port() == "" {
			return strings.TrimSuffix(h, ":") + ":" + defaultPort
		}
		return h
	}
	return withPort(u.Host) == withPort(host)
}

// Interface guards
var (
	_ caddyhttp.MiddlewareHandler = (*Console)(nil)
	_ caddy.Provisioner           = (*Console)(nil)
)
