// The gateway's failure reasons: one error value per check, and the short
// names logs and the CLI use for them.

package muxwebhook

import "errors"

// Failures that are not signature checks; the handler answers 405, 413 and
// 400 for them.
var (
	ErrMethod   = errors.New("method not allowed; Mux delivers webhooks with POST")
	ErrTooLarge = errors.New("body larger than max_body")
	ErrReadBody = errors.New("could not read the request body")
)

// Reason returns the short, stable name of a failure of the gateway's
// checks ("method", "too_large", "read_body", "missing", "malformed",
// "no_v1", "mismatch", "expired", "future", "bad_json", "no_type"), or "" if
// err is none of them. These names appear in logs and CLI output.
func Reason(err error) string {
	switch {
	case errors.Is(err, ErrMethod):
		return "method"
	case errors.Is(err, ErrTooLarge):
		return "too_large"
	case errors.Is(err, ErrReadBody):
		return "read_body"
	case errors.Is(err, ErrBadJSON):
		return "bad_json"
	case errors.Is(err, ErrNoType):
		return "no_type"
	case errors.Is(err, ErrMissingSignature):
		return "missing"
	case errors.Is(err, ErrMalformed):
		return "malformed"
	case errors.Is(err, ErrNoV1):
		return "no_v1"
	case errors.Is(err, ErrMismatch):
		return "mismatch"
	case errors.Is(err, ErrExpired):
		return "expired"
	case errors.Is(err, ErrFuture):
		return "future"
	}
	return ""
}
