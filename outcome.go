// The outcome of a request, decided in one place: each failure of the
// gateway's checks maps to one row of the outcomes table, which gives its
// name (the metrics' outcome label, the live log's ?outcome= filter, the
// log line's reason), the HTTP status answered and the log level.

package muxwebhook

import (
	"errors"
	"net/http"

	"go.uber.org/zap/zapcore"
)

// Failures that are not signature or decoding checks.
var (
	ErrMethod      = errors.New("method not allowed; Mux delivers webhooks with POST")
	ErrTooLarge    = errors.New("body larger than max_body")
	ErrBodyTimeout = errors.New("body not received within body_timeout")
	ErrReadBody    = errors.New("could not read the request body")
	// ErrInFlight is the failure of a delivery whose event id is being
	// delivered right now (dedupe); Mux retries it later.
	ErrInFlight = errors.New("the same event id is being delivered right now")
)

// Outcome describes how the gateway answered one request.
type Outcome struct {
	// Name is the outcome's stable name: "verified", "duplicate", or the
	// reason of a refusal ("mismatch", "in_flight", ...). Metrics label and
	// live log entries use it.
	Name string
	// Status is the HTTP status the gateway answers; 0 for "verified",
	// whose status the route decides.
	Status int
	// Level is the level of the request's log line.
	Level zapcore.Level
	// err is the failure this row stands for; nil for success rows.
	err error
}

// Refused reports whether the gateway answered the request itself
// because a check failed (as opposed to verified and duplicate).
func (o *Outcome) Refused() bool { return o.err != nil }

// The success outcomes.
var (
	// OutcomeVerified: an authentic event was handed to the route.
	OutcomeVerified = &Outcome{Name: "verified", Level: zapcore.InfoLevel}
	// OutcomeDuplicate: dedupe answered 200 for an id already delivered.
	OutcomeDuplicate = &Outcome{Name: "duplicate", Status: http.StatusOK, Level: zapcore.InfoLevel}
)

// refusals is the table of failures, in the order the handler checks them
// (method, size, body, signature header, MAC, timestamp, JSON, dedupe).
// Forgeries and broken deliveries log at WARN; what an honest client or
// Mux itself causes (a GET, a retry while in flight) logs at INFO.
var refusals = []*Outcome{
	{Name: "method", Status: http.StatusMethodNotAllowed, Level: zapcore.InfoLevel, err: ErrMethod},
	{Name: "too_large", Status: http.StatusRequestEntityTooLarge, Level: zapcore.WarnLevel, err: ErrTooLarge},
	{Name: "body_timeout", Status: http.StatusRequestTimeout, Level: zapcore.WarnLevel, err: ErrBodyTimeout},
	{Name: "read_body", Status: http.StatusBadRequest, Level: zapcore.InfoLevel, err: ErrReadBody},
	{Name: "missing", Status: http.StatusUnauthorized, Level: zapcore.WarnLevel, err: ErrMissingSignature},
	{Name: "malformed", Status: http.StatusUnauthorized, Level: zapcore.WarnLevel, err: ErrMalformed},
	{Name: "no_v1", Status: http.StatusUnauthorized, Level: zapcore.WarnLevel, err: ErrNoV1},
	{Name: "mismatch", Status: http.StatusUnauthorized, Level: zapcore.WarnLevel, err: ErrMismatch},
	{Name: "expired", Status: http.StatusUnauthorized, Level: zapcore.WarnLevel, err: ErrExpired},
	{Name: "future", Status: http.StatusUnauthorized, Level: zapcore.WarnLevel, err: ErrFuture},
	{Name: "bad_json", Status: http.StatusBadRequest, Level: zapcore.WarnLevel, err: ErrBadJSON},
	{Name: "no_type", Status: http.StatusBadRequest, Level: zapcore.WarnLevel, err: ErrNoType},
	{Name: "in_flight", Status: http.StatusConflict, Level: zapcore.InfoLevel, err: ErrInFlight},
}

// outcomeFor returns the row of err, or nil if err is none of the
// gateway's failures.
func outcomeFor(err error) *Outcome {
	for _, o := range refusals {
		if errors.Is(err, o.err) {
			return o
		}
	}
	return nil
}

// OutcomeNames returns every outcome name, successes first: the values of
// the metrics' outcome label and of the live log's outcome filter.
func OutcomeNames() []string {
	names := []string{OutcomeVerified.Name, OutcomeDuplicate.Name}
	for _, o := range refusals {
		names = append(names, o.Name)
	}
	return names
}

// deliveryOutcomes are the outcomes of mux_deliver's delivery attempts,
// which the live log shows next to the requests.
var deliveryOutcomes = map[string]bool{"delivered": true, "retry": true, "dead": true}

// outcomes is the set of outcome names, built from the table.
var outcomes = func() map[string]bool {
	m := map[string]bool{}
	for _, name := range OutcomeNames() {
		m[name] = true
	}
	return m
}()

// Reason returns the short, stable name of a failure of the gateway's
// checks ("method", "too_large", "body_timeout", "read_body", "missing",
// "malformed", "no_v1", "mismatch", "expired", "future", "bad_json",
// "no_type", "in_flight"), or "" if err is none of them. These names
// appear in logs, metrics and CLI output.
func Reason(err error) string {
	if o := outcomeFor(err); o != nil {
		return o.Name
	}
	return ""
}
