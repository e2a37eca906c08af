// What the handler reports about every request: one structured log line,
// the metrics, and an entry in the live log.

package muxwebhook

import (
	"fmt"
	"net/http"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// requestRecord collects what happened to one request.
type requestRecord struct {
	start time.Time
	// outcome is "verified", "duplicate", or the reason of the rejection
	// ("mismatch", "in_flight", ...): the metrics' and live log's outcome.
	outcome       string
	status        int    // the status answered (or to be answered by Caddy)
	event         *Event // set once verified and decoded
	body          []byte // set once the signature verified
	reachedNext   bool
	verifySeconds float64
}

// reject records a failed check and returns the handler error that makes
// Caddy answer with status (or run handle_errors).
func (rec *requestRecord) reject(status int, err error) error {
	rec.outcome, rec.status = Reason(err), status
	return caddyhttp.Error(status, fmt.Errorf("mux_webhook: %s: %w", rec.outcome, err))
}

// maxLoggedBody bounds the body in the debug-level log line.
const maxLoggedBody = 256

// observe logs, counts and live-logs a finished request.
func (h *Handler) observe(r *http.Request, rec *requestRecord) {
	duration := time.Since(rec.start)
	observeMetrics(rec)

	logOutcome, reason := rec.outcome, ""
	switch rec.outcome {
	case "verified", "duplicate":
	default:
		logOutcome, reason = "rejected", rec.outcome
	}
	if c := h.logger.Check(zapcore.InfoLevel, "mux webhook"); c != nil {
		fields := []zap.Field{
			zap.String("outcome", logOutcome),
			zap.String("reason", reason),
			zap.Int("status", rec.status),
			zap.Duration("duration", duration),
			zap.String("remote_ip", remoteHost(r.RemoteAddr)),
			zap.String("method", r.Method),
			zap.String("uri", r.RequestURI),
		}
		if ev := rec.event; ev != nil {
			fields = append(fields,
				zap.String("type", ev.Type),
				zap.String("id", ev.ID),
				zap.String("object_type", ev.ObjectType),
				zap.String("object_id", ev.ObjectID),
				zap.String("environment_id", ev.EnvironmentID),
				zap.Int("attempts", ev.Attempts),
			)
		}
		if rec.body != nil && h.logger.Core().Enabled(zapcore.DebugLevel) {
			fields = append(fields, zap.ByteString("body", truncate(rec.body, maxLoggedBody)))
		}
		c.Write(fields...)
	}

	if limit := liveLog.bodyCap(); limit >= 0 {
		liveLog.add(newLogEntry(r, rec, duration, limit))
	}
}

// newLogEntry builds the live log's view of a request. The body is kept
// only once the signature verified, cut to the configured cap.
func newLogEntry(r *http.Request, rec *requestRecord, duration time.Duration, limit int) LogEntry {
	e := LogEntry{
		Time:       rec.start,
		Outcome:    rec.outcome,
		Status:     rec.status,
		DurationMS: float64(duration.Microseconds()) / 1000,
		Method:     r.Method,
		URI:        r.RequestURI,
		RemoteIP:   remoteHost(r.RemoteAddr),
		Headers:    loggedHeaders(r.Header),
	}
	if ev := rec.event; ev != nil {
		e.Type, e.ID, e.ObjectType, e.ObjectID = ev.Type, ev.ID, ev.ObjectType, ev.ObjectID
		e.EnvironmentID, e.Attempts = ev.EnvironmentID, ev.Attempts
	}
	if rec.body == nil {
		e.BodyUnavailable = "not shown: the signature did not verify"
		return e
	}
	if len(rec.body) > limit {
		// A copy, so that the entry does not pin the whole body.
		e.Body, e.BodyTruncated = string(rec.body[:limit]), true
	} else {
		// The verified body is never modified: share it.
		e.Body = bytesToString(rec.body)
	}
	return e
}

func truncate(b []byte, n int) []byte {
	if len(b) > n {
		return b[:n]
	}
	return b
}
