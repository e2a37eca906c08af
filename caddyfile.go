// Caddyfile support: every directive, matcher and global option of the
// plugin is registered and parsed here (the modules' own files hold their
// JSON config and behaviour).

package muxwebhook

import (
	"strconv"
	"strings"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/queue"
	"github.com/dustin/go-humanize"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
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

	// Terminal handlers that answer from the verified event: before
	// respond, like file_server's neighbours.
	httpcaddyfile.RegisterDirective("mux_store", parseStoreCaddyfile)
	httpcaddyfile.RegisterDirectiveOrder("mux_store", httpcaddyfile.Before, "respond")
	httpcaddyfile.RegisterHandlerDirective("mux_deliver", parseDeliverCaddyfile)
	httpcaddyfile.RegisterDirectiveOrder("mux_deliver", httpcaddyfile.Before, "respond")
	httpcaddyfile.RegisterHandlerDirective("mux_webhook_ui", func(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
		u := new(Console)
		return u, u.UnmarshalCaddyfile(h.Dispenser)
	})
	httpcaddyfile.RegisterDirectiveOrder("mux_webhook_ui", httpcaddyfile.Before, "respond")

	httpcaddyfile.RegisterGlobalOption("mux_webhook", parseGlobalOption)
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

// parseGlobalOption parses the global option block:
//
//	mux_webhook {
//		log_size <n>
//		log_body <size>
//		history <duration>|off
//		history_max_bytes <size>
//		queue { ... }
//		destination <name> <url> { ... }
//	}
func parseGlobalOption(d *caddyfile.Dispenser, _ any) (any, error) {
	app := new(App)
	d.Next() // option name
	if d.NextArg() {
		return nil, d.Errf("mux_webhook global option takes a block, not arguments")
	}
	for d.NextBlock(0) {
		var s string
		switch d.Val() {
		case "log_size":
			if !d.AllArgs(&s) {
				return nil, d.ArgErr()
			}
			n, err := strconv.Atoi(s)
			if err != nil {
				return nil, d.Errf("mux_webhook: log_size %q: want a whole number (0 turns the live log off)", s)
			}
			app.LogSize = &n
		case "log_body":
			if !d.AllArgs(&s) {
				return nil, d.ArgErr()
			}
			n, err := humanize.ParseBytes(s)
			if err != nil || n > 1<<20 {
				return nil, d.Errf("mux_webhook: log_body %q: want a size up to 1MiB, e.g. 16KiB", s)
			}
			size := int(n)
			app.LogBody = &size
		case "queue":
			q, err := parseQueue(d)
			if err != nil {
				return nil, err
			}
			app.Queue = q
		case "history":
			if !d.AllArgs(&s) {
				return nil, d.ArgErr()
			}
			app.History = s
			if _, _, err := app.historyAge(); err != nil {
				return nil, d.Err(err.Error())
			}
		case "history_max_bytes":
			if !d.AllArgs(&s) {
				return nil, d.ArgErr()
			}
			n, err := humanize.ParseBytes(s)
			if err != nil || n == 0 || n > 1<<50 {
				return nil, d.Errf("mux_webhook: history_max_bytes %q: want a size, e.g. 1GiB", s)
			}
			app.HistoryMaxBytes = int64(n)
		case "destination":
			name, dc, err := parseDestination(d)
			if err != nil {
				return nil, err
			}
			if app.Destinations == nil {
				app.Destinations = map[string]*DestinationConfig{}
			}
			if app.Destinations[name] != nil {
				return nil, d.Errf("mux_webhook: destination %q is declared twice", name)
			}
			app.Destinations[name] = dc
		default:
			return nil, d.Errf("mux_webhook: unknown global option %q; expected log_size, log_body, history, history_max_bytes, queue or destination", d.Val())
		}
	}
	if err := app.Validate(); err != nil {
		return nil, d.Err(err.Error())
	}
	return httpcaddyfile.App{Name: "mux_webhook", Value: caddyconfig.JSON(app, nil)}, nil
}

// parseQueue parses
//
//	queue {
//		dir <path>
//		nats <url>... {
//			creds <file> | user <u> / password <p> | token <t>
//			replicas <n>
//			tls_ca <file>
//			tls_client_auth <cert_file> <key_file>
//			instance <name>
//		}
//		stream <name>
//		max_bytes <size>
//		dead_max_bytes <size>
//		dedupe_window <duration>
//		enqueue_timeout <duration>
//		partitions <n>
//	}
func parseQueue(d *caddyfile.Dispenser) (*QueueConfig, error) {
	q := new(QueueConfig)
	if d.NextArg() {
		return nil, d.Errf("mux_webhook: queue takes a block, not arguments")
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		switch opt {
		case "dir", "stream":
			var v string
			if !d.AllArgs(&v) {
				return nil, d.ArgErr()
			}
			if opt == "dir" {
				q.Dir = v
			} else {
				q.Stream = v
			}
		case "max_bytes", "dead_max_bytes":
			var v string
			if !d.AllArgs(&v) {
				return nil, d.ArgErr()
			}
			n, err := humanize.ParseBytes(v)
			if err != nil || n == 0 || n > 1<<50 {
				return nil, d.Errf("mux_webhook: queue %s %q: want a size, e.g. 1GiB", opt, v)
			}
			if opt == "max_bytes" {
				q.MaxBytes = int64(n)
			} else {
				q.DeadMaxBytes = int64(n)
			}
		case "dedupe_window", "enqueue_timeout":
			dur, err := parsePositiveDuration(d, "queue "+opt)
			if err != nil {
				return nil, err
			}
			if opt == "dedupe_window" {
				q.DedupeWindow = dur
			} else {
				q.EnqueueTimeout = dur
			}
		case "partitions":
			var v string
			if !d.AllArgs(&v) {
				return nil, d.Errf("mux_webhook: queue partitions: want one number, e.g. partitions 4")
			}
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > queue.MaxPartitions {
				return nil, d.Errf("mux_webhook: queue partitions %q: want a number from 1 to %d", v, queue.MaxPartitions)
			}
			q.Partitions = n
		case "nats":
			n := &NATSConfig{URLs: d.RemainingArgs()}
			if len(n.URLs) == 0 {
				return nil, d.Errf("mux_webhook: queue nats needs the server URLs, e.g. nats nats://10.0.0.1:4222")
			}
			for nn := d.Nesting(); d.NextBlock(nn); {
				sub := d.Val()
				if sub == "tls_client_auth" {
					if !d.AllArgs(&n.TLSClientCert, &n.TLSClientKey) {
						return nil, d.Errf("mux_webhook: queue nats tls_client_auth takes a certificate file and a key file")
					}
					continue
				}
				var v string
				if !d.AllArgs(&v) {
					return nil, d.ArgErr()
				}
				switch sub {
				case "creds":
					n.Creds = v
				case "user":
					n.User = v
				case "password":
					n.Password = v
				case "token":
					n.Token = v
				case "replicas":
					r, err := strconv.Atoi(v)
					if err != nil || r < 1 || r > 5 {
						return nil, d.Errf("mux_webhook: queue nats replicas %q: want 1 to 5", v)
					}
					n.Replicas = r
				case "tls_ca":
					n.TLSCA = v
				case "instance":
					if !instanceName.MatchString(v) {
						return nil, d.Errf("mux_webhook: queue nats instance %q: use letters, digits, '.', '_' and '-' only (at most 64)", v)
					}
					n.Instance = v
				default:
					return nil, d.Errf("mux_webhook: unknown queue nats option %q; expected creds, user, password, token, replicas, tls_ca, tls_client_auth or instance", sub)
				}
			}
			q.NATS = n
		default:
			return nil, d.Errf("mux_webhook: unknown queue option %q; expected dir, nats, stream, max_bytes, dead_max_bytes, dedupe_window, enqueue_timeout or partitions", opt)
		}
	}
	return q, nil
}

// parseDestination parses
//
//	destination <name> <url> {
//		timeout <duration>
//		retry <duration>...
//		max_attempts <n>
//		max_age <duration>
//		concurrency <n>
//		stall_after <duration>
//		rate <n>/<s|m|h>
//		breaker <failures> <probe> | off
//		order object
//		sign <secret>
//		header <name> <value>
//	}
func parseDestination(d *caddyfile.Dispenser) (string, *DestinationConfig, error) {
	args := d.RemainingArgs()
	if len(args) != 2 {
		return "", nil, d.Errf("mux_webhook: want destination <name> <url>, e.g. destination app http://localhost:9000/mux")
	}
	name, dc := args[0], &DestinationConfig{URL: args[1]}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		switch opt {
		case "timeout", "max_age", "stall_after":
			dur, err := parsePositiveDuration(d, "destination "+name+" "+opt)
			if err != nil {
				return "", nil, err
			}
			switch opt {
			case "timeout":
				dc.Timeout = dur
			case "max_age":
				dc.MaxAge = dur
			default:
				dc.StallAfter = dur
			}
		case "retry":
			delays := d.RemainingArgs()
			if len(delays) == 0 {
				return "", nil, d.Errf("mux_webhook: destination %s retry needs delays, e.g. retry 10s 1m 5m", name)
			}
			for _, v := range delays {
				dur, err := caddy.ParseDuration(v)
				if err != nil || dur <= 0 {
					return "", nil, d.Errf("mux_webhook: destination %s retry %q: want durations greater than 0", name, v)
				}
				dc.Retry = append(dc.Retry, caddy.Duration(dur))
			}
		case "max_attempts", "concurrency":
			var v string
			if !d.AllArgs(&v) {
				return "", nil, d.ArgErr()
			}
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 || n > 10000 || (opt == "concurrency" && n == 0) {
				return "", nil, d.Errf("mux_webhook: destination %s %s %q: want a whole number", name, opt, v)
			}
			if opt == "max_attempts" {
				dc.MaxAttempts = n
			} else {
				dc.Concurrency = n
			}
		case "breaker":
			args := d.RemainingArgs()
			b := &BreakerConfig{}
			switch {
			case len(args) == 1 && args[0] == "off":
				b.Off = true
			case len(args) == 2:
				n, err := strconv.Atoi(args[0])
				if err != nil || n < 1 {
					n = -1 // both are given here: none may be 0
				}
				b.Failures = n
				b.Probe = -1
				if dur, err := caddy.ParseDuration(args[1]); err == nil && dur > 0 {
					b.Probe = caddy.Duration(dur)
				}
			default:
				return "", nil, d.Errf("mux_webhook: destination %s breaker: want breaker <failures> <probe>, e.g. breaker 10 30s, or breaker off", name)
			}
			if err := b.check(); err != nil {
				return "", nil, d.Errf("mux_webhook: destination %s breaker %s: %v", name, strings.Join(args, " "), err)
			}
			dc.Breaker = b
		case "rate":
			if !d.AllArgs(&dc.Rate) {
				return "", nil, d.Errf("mux_webhook: destination %s rate: want one value, e.g. rate 5/s", name)
			}
			if _, _, err := parseRate(dc.Rate); err != nil {
				return "", nil, d.Errf("mux_webhook: destination %s rate %q: %v", name, dc.Rate, err)
			}
		case "order":
			if !d.AllArgs(&dc.Order) || dc.Order != "object" {
				return "", nil, d.Errf("mux_webhook: destination %s order: want order object (one object's events one at a time, in order)", name)
			}
		case "sign":
			if !d.AllArgs(&dc.Sign) {
				return "", nil, d.ArgErr()
			}
		case "header":
			var k, v string
			if !d.AllArgs(&k, &v) {
				return "", nil, d.ArgErr()
			}
			if dc.Header == nil {
				dc.Header = map[string]string{}
			}
			dc.Header[k] = v
		default:
			return "", nil, d.Errf("mux_webhook: unknown destination option %q; expected timeout, retry, max_attempts, max_age, concurrency, stall_after, breaker, rate, order, sign or header", opt)
		}
	}
	return name, dc, nil
}

func parsePositiveDuration(d *caddyfile.Dispenser, what string) (caddy.Duration, error) {
	var v string
	if !d.AllArgs(&v) {
		return 0, d.ArgErr()
	}
	dur, err := caddy.ParseDuration(v)
	if err != nil || dur <= 0 {
		return 0, d.Errf("mux_webhook: %s %q: want a duration greater than 0", what, v)
	}
	return caddy.Duration(dur), nil
}

// parseDeliverCaddyfile parses mux_deliver [<matcher>] <destination>...
func parseDeliverCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	dh := new(DeliverHandler)
	h.Next()
	dh.Destinations = h.RemainingArgs()
	if len(dh.Destinations) == 0 {
		return nil, h.Errf("mux_deliver: name at least one destination, e.g. mux_deliver app")
	}
	if h.NextBlock(0) {
		return nil, h.Err("mux_deliver takes no block; configure destinations in the mux_webhook global option")
	}
	return dh, nil
}

// parseStoreCaddyfile parses the directive the way Caddy's root directive
// is parsed, so that a path template starting with "/" is not taken for a
// path matcher:
//
//	mux_store [<matcher>] <path-template> {
//		status <code>
//	}
func parseStoreCaddyfile(h httpcaddyfile.Helper) ([]httpcaddyfile.ConfigValue, error) {
	h.Next() // directive name
	var matcherSet caddy.ModuleMap
	switch h.CountRemainingArgs() {
	case 1:
	case 2:
		var err error
		if matcherSet, err = h.ExtractMatcherSet(); err != nil {
			return nil, err
		}
		h.Next() // the directive name again: matcher parsing resets
	default:
		return nil, h.Errf("mux_store: want [<matcher>] <path-template>, e.g. mux_store /var/spool/mux/{http.mux.event.type}/{http.mux.event.id}.json")
	}
	s := new(FileStore)
	if !h.NextArg() {
		return nil, h.ArgErr()
	}
	s.Path = h.Val()
	for h.NextBlock(0) {
		switch h.Val() {
		case "status":
			var v string
			if !h.AllArgs(&v) {
				return nil, h.ArgErr()
			}
			code, err := strconv.Atoi(v)
			if err != nil || code < 200 || code > 299 {
				return nil, h.Errf("mux_store: status %q: want a 2xx code, e.g. 202", v)
			}
			s.Status = code
		default:
			return nil, h.Errf("mux_store: unknown option %q; expected status", h.Val())
		}
	}
	return h.NewRoute(matcherSet, s), nil
}

// UnmarshalCaddyfile sets up the matcher from Caddyfile tokens. Syntax:
//
//	mux_event <pattern>...
func (m *MatchMuxEvent) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	for d.Next() {
		patterns := d.RemainingArgs()
		if len(patterns) == 0 {
			return d.Errf("mux_event needs at least one event type pattern, e.g. mux_event video.asset.*")
		}
		*m = append(*m, patterns...)
		if d.NextBlock(0) {
			return d.Err("mux_event does not take a block; list the patterns on the line")
		}
	}
	return nil
}

// UnmarshalCaddyfile: mux_webhook_ui takes no arguments.
func (u *Console) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next()
	if d.NextArg() || d.NextBlock(0) {
		return d.Err("mux_webhook_ui takes no arguments; mount it with handle_path /mux-webhook* { mux_webhook_ui }")
	}
	return nil
}

// Interface guards
var (
	_ caddyfile.Unmarshaler = (*Handler)(nil)
	_ caddyfile.Unmarshaler = (*MatchMuxEvent)(nil)
	_ caddyfile.Unmarshaler = (*Console)(nil)
)
