// Package muxwebhook is a Caddy plugin that verifies Mux webhook
// deliveries at the edge and routes them by event type.
//
// The mux_webhook handler (this file) buffers the body within a bound,
// checks the Mux-Signature header against the configured secrets and the
// timestamp window, decodes the event and publishes it to the rest of the
// route; the mux_event matcher (matcher.go) routes by its type.
package muxwebhook

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"regexp"
	"strconv"
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
	DefaultTolerance = 5 * time.Minute
	DefaultMaxBody   = 1 << 20 // 1 MiB
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
	// answered 413 without being read further. Default: 1 MiB.
	MaxBody int64 `json:"max_body,omitempty"`

	// Dedupe, when set, answers repeated deliveries of an event id that the
	// route already answered 2xx with 200, without calling the next
	// handler, and answers 409 to an id whose delivery is in flight. Off by
	// default.
	Dedupe *Dedupe `json:"dedupe,omitempty"`

	verifier *Verifier
	dedupe   *deduper
	now      func() time.Time
	logger   *zap.Logger
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
	if _, err := ctx.AppIfConfigured("mux_webhook"); errors.Is(err, caddy.ErrNotConfigured) {
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
	if h.now == nil {
		h.now = time.Now
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
		return fmt.Errorf("mux_webhook: tolerance must be greater than 0, got %s", time.Duration(h.Tolerance))
	}
	if h.MaxBody < 0 {
		return fmt.Errorf("mux_webhook: max_body must be greater than 0, got %d", h.MaxBody)
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
	repl := caddy.NewReplacer()
	out := make([][]byte, 0, len(configured))
	for i, s := range configured {
		v, err := repl.ReplaceOrErr(s, true, true)
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

// ServeHTTP verifies the delivery and, if it is authentic, calls next.
// Every request, whatever its outcome, is logged once, counted in the
// metrics and added to the live log.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	rec := requestRecord{start: time.Now()}
	err := h.serve(w, r, next, &rec)
	h.observe(r, &rec)
	return err
}

func (h *Handler) serve(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, rec *requestRecord) error {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		return rec.reject(http.StatusMethodNotAllowed, ErrMethod)
	}
	sig, sigErr := ParseSignature(strings.Join(r.Header.Values(SignatureHeader), ","))
	if sigErr != nil && r.ContentLength >= 0 && r.ContentLength <= h.MaxBody {
		// The size check already passes, so a header that cannot verify
		// decides the answer: refuse it before buffering the body.
		return rec.reject(http.StatusUnauthorized, sigErr)
	}
	body, err := h.readBody(r)
	if errors.Is(err, ErrTooLarge) {
		return rec.reject(http.StatusRequestEntityTooLarge, err)
	}
	if err != nil {
		return rec.reject(http.StatusBadRequest, err)
	}
	verifyStart := time.Now()
	if sigErr == nil {
		sigErr = h.verifier.Check(sig, body, h.now(), time.Duration(h.Tolerance))
	}
	if sigErr != nil {
		rec.verifySeconds = time.Since(verifyStart).Seconds()
		return rec.reject(http.StatusUnauthorized, sigErr)
	}
	// Authentic from here on: the body may be shown in the live log.
	rec.body = body
	ev, err := DecodeEvent(body)
	rec.verifySeconds = time.Since(verifyStart).Seconds()
	if err != nil {
		return rec.reject(http.StatusBadRequest, err)
	}
	ev.Timestamp = sig.Timestamp
	ev.Signature = sig.header
	rec.event, rec.outcome = ev, "verified"
	restoreBody(r, body)
	publishEvent(r, ev)
	forward := func() (int, error) { return forward(w, r, next, rec) }
	if h.dedupe != nil {
		return h.dedupe.serve(r.Context(), w, ev, rec, forward)
	}
	_, err = forward()
	return err
}

// forward calls the next handler and records the status it answered with
// (for an error, the status Caddy will answer).
func forward(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, rec *requestRecord) (int, error) {
	sr := &statusRecorder{ResponseWriterWrapper: &caddyhttp.ResponseWriterWrapper{ResponseWriter: w}}
	err := next.ServeHTTP(sr, r)
	status := sr.status
	if err != nil {
		status = http.StatusInternalServerError
		if he, ok := errors.AsType[caddyhttp.HandlerError](err); ok && he.StatusCode != 0 {
			status = he.StatusCode
		}
	}
	if status == 0 {
		status = http.StatusOK // nothing written: net/http answers 200
	}
	rec.reachedNext, rec.status = true, status
	return status, err
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

// readBody reads the whole body, refusing more than MaxBody bytes. A body
// of known length gets a buffer of exactly that size; a chunked one grows
// as it arrives, so the limit is never allocated up front.
func (h *Handler) readBody(r *http.Request) ([]byte, error) {
	if r.ContentLength > h.MaxBody {
		return nil, ErrTooLarge
	}
	if r.Body == nil || r.Body == http.NoBody {
		return []byte{}, nil
	}
	var body []byte
	var err error
	if r.ContentLength >= 0 {
		body = make([]byte, r.ContentLength)
		_, err = io.ReadFull(r.Body, body)
	} else {
		body, err = io.ReadAll(io.LimitReader(r.Body, h.MaxBody+1))
		if err == nil && int64(len(body)) > h.MaxBody {
			return nil, ErrTooLarge
		}
	}
	if err != nil {
		// A request_body limit earlier in the route is a size problem too.
		if _, ok := errors.AsType[*http.MaxBytesError](err); ok {
			return nil, ErrTooLarge
		}
		return nil, fmt.Errorf("%w: %v", ErrReadBody, err)
	}
	return body, nil
}

// restoreBody gives the request its body back for the next handlers, as a
// plain body of known length: a chunked delivery reaches an upstream with a
// Content-Length, and the proxy may re-read it on retries via GetBody.
// The slice is not pooled: the proxy transport may read it after ServeHTTP
// has returned.
func restoreBody(r *http.Request, body []byte) {
	r.Body = io.NopCloser(bytes.NewReader(body))
	r.GetBody = func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(body)), nil
	}
	r.ContentLength = int64(len(body))
	r.TransferEncoding = nil
	r.Header.Del("Transfer-Encoding")
	if r.Header.Get("Content-Length") != "" {
		r.Header.Set("Content-Length", strconv.Itoa(len(body)))
	}
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
