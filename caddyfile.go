// Caddyfile support for the mux_webhook directive.

package muxwebhook

import (
	"strconv"

	"github.com/dustin/go-humanize"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("mux_webhook", parseCaddyfile)
	// Right after basic_auth: after request_body, rewrite and rate
	// limiters, before handle, route, respond, reverse_proxy and
	// file_server, which can then use the event.
	httpcaddyfile.RegisterDirectiveOrder("mux_webhook", httpcaddyfile.After, "basic_auth")
}

func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	m := new(Handler)
	err := m.UnmarshalCaddyfile(h.Dispenser)
	return m, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	mux_webhook [<matcher>] [<secret>...] {
//	    secret    <secret> [<secret>...]
//	    tolerance <duration>
//	    max_body  <size>
//	    body_timeout <duration>
//	    dedupe    [<window>]
//	    dedupe {
//	        window      <duration>
//	        max_entries <n>
//	        storage
//	    }
//	}
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // directive name
	h.Secrets = append(h.Secrets, d.RemainingArgs()...)
	for d.NextBlock(0) {
		switch d.Val() {
		case "secret":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.Errf("mux_webhook: secret needs a value, e.g. secret {env.MUX_WEBHOOK_SECRET}")
			}
			h.Secrets = append(h.Secrets, args...)
		case "tolerance":
			var s string
			if !d.AllArgs(&s) {
				return d.ArgErr()
			}
			dur, err := caddy.ParseDuration(s)
			if err != nil {
				return d.Errf("mux_webhook: tolerance %q: %v", s, err)
			}
			if dur <= 0 {
				return d.Errf("mux_webhook: tolerance must be greater than 0, got %q", s)
			}
			h.Tolerance = caddy.Duration(dur)
		case "max_body":
			var s string
			if !d.AllArgs(&s) {
				return d.ArgErr()
			}
			size, err := humanize.ParseBytes(s)
			if err != nil || size == 0 || size > MaxMaxBody {
				return d.Errf("mux_webhook: max_body %q: want a size from 1B to 16MiB, e.g. 1MiB (Mux events are a few KiB)", s)
			}
			h.MaxBody = int64(size)
		case "body_timeout":
			var s string
			if !d.AllArgs(&s) {
				return d.ArgErr()
			}
			dur, err := caddy.ParseDuration(s)
			if err != nil || dur <= 0 {
				return d.Errf("mux_webhook: body_timeout %q: want a duration greater than 0, e.g. 10s", s)
			}
			h.BodyTimeout = caddy.Duration(dur)
		case "dedupe":
			dd, err := parseDedupe(d)
			if err != nil {
				return err
			}
			h.Dedupe = dd
		default:
			return d.Errf("mux_webhook: unknown option %q; expected secret, tolerance, max_body, body_timeout or dedupe", d.Val())
		}
	}
	if len(h.Secrets) == 0 {
		return d.Errf("mux_webhook: no signing secret; write mux_webhook {env.MUX_WEBHOOK_SECRET} or add a secret line")
	}
	return nil
}

// parseDedupe parses `dedupe [<window>]` or its block form.
func parseDedupe(d *caddyfile.Dispenser) (*Dedupe, error) {
	dd := new(Dedupe)
	parseWindow := func(s string) error {
		dur, err := caddy.ParseDuration(s)
		if err != nil || dur <= 0 {
			return d.Errf("mux_webhook: dedupe window %q: want a duration greater than 0, e.g. 24h", s)
		}
		dd.Window = caddy.Duration(dur)
		return nil
	}
	args := d.RemainingArgs()
	switch len(args) {
	case 0:
	case 1:
		if err := parseWindow(args[0]); err != nil {
			return nil, err
		}
	default:
		return nil, d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch d.Val() {
		case "window":
			var s string
			if !d.AllArgs(&s) {
				return nil, d.ArgErr()
			}
			if err := parseWindow(s); err != nil {
				return nil, err
			}
		case "max_entries":
			var s string
			if !d.AllArgs(&s) {
				return nil, d.ArgErr()
			}
			n, err := strconv.Atoi(s)
			if err != nil || n < 1 || n > 100_000_000 {
				return nil, d.Errf("mux_webhook: dedupe max_entries %q: want a whole number from 1 to 100000000", s)
			}
			dd.MaxEntries = n
		case "storage":
			if d.NextArg() {
				return nil, d.Errf("mux_webhook: dedupe storage takes no argument; it uses the storage global option")
			}
			dd.Storage = true
		default:
			return nil, d.Errf("mux_webhook: unknown dedupe option %q; expected window, max_entries or storage", d.Val())
		}
	}
	return dd, nil
}

// Interface guard
var _ caddyfile.Unmarshaler = (*Handler)(nil)
