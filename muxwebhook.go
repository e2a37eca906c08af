// Package muxwebhook is a Caddy plugin that makes Caddy a gateway for Mux
// webhooks: it verifies every delivery at the edge and routes, stores or
// queues each authentic event. Its Caddy modules:
//
//   - http.handlers.mux_webhook (Handler, this file): buffers the body
//     within a bound, checks Mux-Signature against the secrets and the
//     timestamp window, decodes the event and publishes it to the rest of
//     the route ({http.mux.*} placeholders, placeholders.go); dedupe.go
//     suppresses repeated ids.
//   - http.matchers.mux_event (MatchMuxEvent, matcher.go): routes by type.
//   - http.handlers.mux_store (FileStore, store.go): the event as a file,
//     with its signature proof, for `caddy mux-webhook replay`.
//   - http.handlers.mux_deliver (DeliverHandler, deliver.go): a copy per
//     destination in the delivery queue (package queue, NATS JetStream),
//     delivered by its workers; deliver_*.go are its glue.
//   - mux_webhook (App, app.go): the live log's settings and the queue's
//     settings and lifecycle.
//   - admin.api.mux_webhook (admin.go) and http.handlers.mux_webhook_ui
//     (Console, console.go): Live Logs, the console and the queue's
//     endpoints.
//
// and the `caddy mux-webhook` command (command*.go). The core (verify.go,
// jsonscan.go, events.go) imports no Caddy. docs/architecture.md maps the
// files.
package muxwebhook

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"regexp"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func init() {
	caddy.RegisterModule(Handler{})
}

// Defaults, as documented in the README.
const (
	DefaultTolerance   = 5 * time.Minute
	DefaultMaxBody     = 1 << 20 // 1 MiB
	DefaultBodyTimeout = 10 * time.Second
	// MaxMaxBody is the largest max_body accepted: Mux events are a few
	// KiB, and a gateway that accepts more only helps a flood.
	MaxMaxBody = 16 << 20
)

// Handler verifies Mux webhook deliveries. A request reaches the next
// handler only if it is a POST whose body fits max_body, carries a
// Mux-Signature made with one of the secrets within the tolerance window,
// and holds a JSON object with a string "type". The next handler then sees
// the original request with the body restored byte for byte, the event in
// the {http.mux.*} placeholders, and can route with the mux_event matcher.
type Handler struct {
	// Secrets are the signing secrets of the Mux webhook endpoints this
	// route accepts; a delivery is authentic if it is signed with any of
	// them (list two while rotating). Each may be a placeholder resolved
	// once when the config loads, such as {env.MUX_WEBHOOK_SECRET} or
	// {file./run/secrets/mux}; an unknown placeholder or an empty value
	// makes the config fail to load. At least one is required.
	Secrets []string `json:"secrets,omitempty"`

	// Tolerance is how far the signature's timestamp may be from the
	// server's clock, in the past or in the future. Default: 5m.
	Tolerance caddy.Duration `json:"tolerance,omitempty"`

	// MaxBody is the largest accepted body, in bytes; larger requests are
	// answered 413 without being read further. Default: 1 MiB; at most
	// 16 MiB. Memory follows the bytes that arrive, not Content-Length.
	MaxBody int64 `json:"max_body,omitempty"`

	// BodyTimeout is how long the body may take to arrive, from when the
	// handler starts reading it; a slower body is answered 408 and nothing
	// is forwarded. Default: 10s.
	BodyTimeout caddy.Duration `json:"body_timeout,omitempty"`

	// Dedupe, when set, answers repeated deliveries of an event id that the
	// route already answered 2xx with 200, without calling the next
	// handler, and answers 409 to an id whose delivery is in flight. Off by
	// default.
	Dedupe *Dedupe `json:"dedupe,omitempty"`

	verifier *Verifier
	dedupe   *deduper
	now      func() time.Time
	logger   *zap.Logger
	app      *App // the config's mux_webhook app, if configured: its history
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.mux_webhook",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision sets defaults and resolves the secrets.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	if err := registerMetrics(ctx.GetMetricsRegistry()); err != nil {
		return fmt.Errorf("mux_webhook: registering metrics: %v", err)
	}
	// The mux_webhook app's live log settings apply to this config, or,
	// without the global option, their defaults.
	app, err := ctx.AppIfConfigured("mux_webhook")
	if errors.Is(err, caddy.ErrNotConfigured) {
		_ = (&App{}).Provision(ctx) // cannot fail: it only applies defaults
	} else if err != nil {
		return fmt.Errorf("mux_webhook: loading the mux_webhook app: %v", err)
	}
	if h.Tolerance == 0 {
		h.Tolerance = caddy.Duration(DefaultTolerance)
	}
	if h.MaxBody == 0 {
		h.MaxBody = DefaultMaxBody
	}
	if h.BodyTimeout == 0 {
		h.BodyTimeout = caddy.Duration(DefaultBodyTimeout)
	}
	if h.now == nil {
		h.now = time.Now
	}
	// Validate before anything uses the values: Caddy calls Validate
	// only after Provision.
	if err := h.Validate(); err != nil {
		return err
	}
	if app, ok := app.(*App); ok {
		app.takesBody(h.MaxBody) // the queue must hold such an event
		h.app = app              // its history keeps the verified events
	}
	secrets, err := resolveSecrets(h.Secrets)
	if err != nil {
		return err
	}
	h.verifier = NewVerifier(secrets)
	if h.Dedupe != nil {
		if h.dedupe, err = h.Dedupe.provision(ctx, secrets, h.logger, func() time.Time { return h.now() }); err != nil {
			return err
		}
	}
	return nil
}

// Cleanup releases the dedupe record's share of the usage pool; the record
// itself outlives config reloads while any config uses it.
func (h *Handler) Cleanup() error {
	if h.dedupe != nil {
		h.dedupe.cleanup()
	}
	return nil
}

// Validate checks the configuration.
func (h *Handler) Validate() error {
	if len(h.Secrets) == 0 {
		return fmt.Errorf("mux_webhook: no signing secret configured; add one, e.g. mux_webhook {env.MUX_WEBHOOK_SECRET}")
	}
	if h.Tolerance < 0 {
		return fmt.Errorf("mux_webhook: tolerance must be greater than 0 (or unset for the default 5m), got %s", time.Duration(h.Tolerance))
	}
	if h.MaxBody < 0 || h.MaxBody > MaxMaxBody {
		return fmt.Errorf("mux_webhook: max_body must be between 1 and %d bytes (16MiB), or unset for the default 1MiB; got %d", MaxMaxBody, h.MaxBody)
	}
	if h.BodyTimeout < 0 {
		return fmt.Errorf("mux_webhook: body_timeout must be greater than 0 (or unset for the default 10s), got %s", time.Duration(h.BodyTimeout))
	}
	if h.Dedupe != nil {
		return h.Dedupe.validate()
	}
	return nil
}

// placeholderOnly matches a secret that is exactly one placeholder; only
// then is its name safe to repeat in an error (a literal secret could
// contain braces).
var placeholderOnly = regexp.MustCompile(`^\{(env|file)\.[^{}]+\}$`)

// resolveSecrets expands placeholders in the configured secrets. Errors
// name the secret by position and, for a lone {env.*} or {file.*}
// placeholder, by that placeholder; never by its value.
func resolveSecrets(configured []string) ([][]byte, error) {
	out := make([][]byte, 0, len(configured))
	for i, s := range configured {
		v, err := configValue(s)
		if err != nil || v == "" {
			what := "(redacted)"
			if placeholderOnly.MatchString(s) {
				what = s
			}
			return nil, fmt.Errorf("mux_webhook: signing secret %d of %d %s is unset or empty: set the environment variable or file it names, or remove it; refusing to run an open gateway",
				i+1, len(configured), what)
		}
		out = append(out, []byte(v))
	}
	return out, nil
}

// ServeHTTP is the gateway's pipeline, top to bottom: method, size,
// signature header, body, MAC and timestamp, event, dedupe, route. Each
// refusal is answered by refuse from the outcomes table (outcome.go).
// Whatever happens - even a panic in a later handler, such as
// reverse_proxy aborting when its upstream dies mid-response - the
// deferred settle releases the dedupe claim (a panic is never a delivery)
// and logs, counts and live-logs the request once; then the panic goes on.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	res := &result{start: time.Now()}
	var claim *dedupeClaim
	defer func() {
		p := recover()
		if p != nil {
			res.abort(p)
		}
		claim.finish(res.delivered())
		h.observe(r, res)
		if p != nil {
			panic(p)
		}
	}()

	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		return res.refuse(ErrMethod)
	}
	if r.ContentLength > h.MaxBody {
		dropUnreadBody(w, r)
		return res.refuse(ErrTooLarge)
	}
	sig, sigErr := ParseSignature(strings.Join(r.Header.Values(SignatureHeader), ","))
	if sigErr != nil && r.ContentLength >= 0 {
		// The size check already passed, so a header that cannot verify
		// decides the answer: refuse it before reading the body.
		dropUnreadBody(w, r)
		return res.refuse(sigErr)
	}
	body, err := h.readBody(w, r)
	if err != nil {
		return res.refuse(err)
	}

	verifyStart := time.Now()
	if sigErr == nil {
		sigErr = h.verifier.Check(sig, body, h.now(), time.Duration(h.Tolerance))
	}
	if sigErr != nil {
		res.verifySeconds = time.Since(verifyStart).Seconds()
		return res.refuse(sigErr)
	}
	// Authentic from here on: the body may be decoded and shown.
	res.body = body
	ev, err := DecodeEvent(body)
	res.verifySeconds = time.Since(verifyStart).Seconds()
	if err != nil {
		return res.refuse(err)
	}
	ev.Timestamp = sig.Timestamp
	ev.Signature = sig.header
	res.event, res.outcome = ev, OutcomeVerified
	restoreBody(r, body)
	publishEvent(r, ev)

	if h.dedupe != nil {
		var verdict dedupeVerdict
		claim, verdict = h.dedupe.claim(r.Context(), ev)
		switch verdict {
		case dedupeDuplicate:
			res.outcome, res.status = OutcomeDuplicate, OutcomeDuplicate.Status
			w.WriteHeader(OutcomeDuplicate.Status)
			return nil
		case dedupeInFlight:
			return res.refuse(ErrInFlight)
		}
	}

	sr := &statusRecorder{ResponseWriterWrapper: &caddyhttp.ResponseWriterWrapper{ResponseWriter: w}}
	res.route = sr
	err = next.ServeHTTP(sr, r)
	res.status = routeStatus(sr.status, err)
	return err
}

// routeStatus is the status the route answered, or, for an error, the
// status Caddy will answer.
func routeStatus(written int, err error) int {
	if err != nil {
		if he, ok := errors.AsType[caddyhttp.HandlerError](err); ok && he.StatusCode != 0 {
			return he.StatusCode
		}
		return http.StatusInternalServerError
	}
	if written == 0 {
		return http.StatusOK // nothing written: net/http answers 200
	}
	return written
}

// statusRecorder remembers the status the next handlers answered.
type statusRecorder struct {
	*caddyhttp.ResponseWriterWrapper
	status int
}

func (s *statusRecorder) WriteHeader(code int) {
	if s.status == 0 && code >= 200 {
		s.status = code
	}
	s.ResponseWriterWrapper.WriteHeader(code)
}

func (s *statusRecorder) Write(b []byte) (int, error) {
	if s.status == 0 {
		s.status = http.StatusOK
	}
	return s.ResponseWriterWrapper.Write(b)
}

func remoteHost(addr string) string {
	if host, _, err := net.SplitHostPort(addr); err == nil {
		return host
	}
	return addr
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
