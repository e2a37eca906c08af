// The mux_webhook_ui handler serves the live log (the page, its JSON and
// its event stream) on a site route, for browsers: Caddy's admin API
// refuses browser navigations. Protect the route (basic_auth, a private
// bind address): the page shows verified event bodies.
//
//	handle_path /mux-webhook/* {
//		basic_auth { ... }
//		mux_webhook_ui
//	}

package muxwebhook

import (
	"errors"
	"net/http"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func init() {
	caddy.RegisterModule(UI{})
}

// UI serves the live log's page at "/" (and "/index.html"), its entries at
// "/events" and its event stream at "/events/stream", relative to the
// route; use it inside handle_path. It answers every request it gets.
type UI struct {
	ctx caddy.Context
}

// CaddyModule returns the Caddy module information.
func (UI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.mux_webhook_ui",
		New: func() caddy.Module { return new(UI) },
	}
}

// Provision keeps the context, whose end closes event streams.
func (u *UI) Provision(ctx caddy.Context) error {
	u.ctx = ctx
	return nil
}

// ServeHTTP serves the live log.
func (u *UI) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	path := r.URL.Path
	if path == "" {
		path = "/"
	}
	if !strings.HasPrefix(path, "/") {
		path = "/" + path
	}
	err := serveLiveLog(w, r, path, u.ctx.Done())
	if apiErr, ok := errors.AsType[caddy.APIError](err); ok {
		return caddyhttp.Error(apiErr.HTTPStatus, apiErr.Err)
	}
	return err
}

// Interface guards
var (
	_ caddyhttp.MiddlewareHandler = (*UI)(nil)
	_ caddy.Provisioner           = (*UI)(nil)
)
