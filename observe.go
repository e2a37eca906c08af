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

// result is what happened to one request, decided by ServeHTTP and read
// once, when the request is over, by observe.
type result struct {
	start time.Time
	// outcome is the table row of the answer (outcome.go); nil only if
	// the handler itself panicked before deciding.
	outcome *Outcome
	// status is the status answered (or to be answered by Caddy).
	status int
	// err is the refusal, or the panic that aborted the route.
	err error
	// event is set once verified and decoded; body once the signature
	// verified.
	event *Event
	body  []byte
	// route records what the route after mux_webhook answered; nil if
	// the route did not run.
	route *statusRecorder
	// aborted is set when a handler after mux_webhook panicked.
	aborted       bool
	verifySeconds float64
}

// refuse records a failed check and returns the handler error that makes
// Caddy answer with its status (or run handle_errors).
func (res *result) refuse(err error) error {
	o := outcomeFor(err)
	if o == nil {
		o = &Outcome{Name: "internal", Status: http.StatusInternalServerError, Level: zapcore.ErrorLevel, err: err}
	}
	res.outcome, res.status, res.err = o, o.Status, err
	return caddyhttp.Error(o.Status, fmt.Errorf("mux_webhook: %s: %w", o.Name, err))
}

// abort records a panic that went through the handler. The status is what
// the route had already written, else 500; either way the client's
// response is cut short, so the event was not delivered.
func (res *result) abort(p any) {
	res.aborted = true
	res.err = fmt.Errorf("panic: %v", p)
	if res.outcome == nil {
		res.outcome = &Outcome{Name: "internal", Status: http.StatusInternalServerError, Level: zapcore.ErrorLevel, err: res.err}
	}
	res.status = http.StatusInternalServerError
	if res.route != nil && res.route.status != 0 {
		res.status = res.route.status
	}
}

// delivered reports whether the route ran and answered 2xx in full.
func (res *result) delivered() bool {
	return res.route != nil && !res.aborted && res.status >= 200 && res.status <= 299
}

// ownLineLevel is the level of the handler's own line, written when the
// site has no access log: rejections stay visible (WARN) without any
// configuration, while verified events and duplicates, the bulk of the
// traffic, are logged at DEBUG (add `log` to the site to see them in the
// access log, or raise the log level).
func ownLineLevel(res *result, level zapcore.Level) zapcore.Level {
	if level == zapcore.InfoLevel && !res.outcome.Refused() && !res.aborted {
		return zapcore.DebugLevel
	}
	return level
}

// maxLoggedBody bounds the body in the debug-level log line.
const maxLoggedBody = 256

// observe logs, counts and live-logs a finished request.
func (h *Handler) observe(r *http.Request, res *result) {
	duration := time.Since(res.start)
	observeMetrics(res)

	logOutcome, reason, level := res.outcome.Name, "", res.outcome.Level
	if res.outcome.Refused() {
		logOutcome, reason = "rejected", res.outcome.Name
	}
	if res.aborted {
		level = zapcore.WarnLevel
	}
	if extra := accessLogFields(r); extra != nil {
		// The site logs its requests: the event goes into that line.
		addToAccessLog(r, extra, muxLogFields{outcome: logOutcome, reason: reason, event: res.event, aborted: res.aborted, err: res.err}, level, res.status)
	} else if c := h.logger.Check(ownLineLevel(res, level), "mux webhook"); c != nil {
		fields := make([]zap.Field, 0, 16)
		fields = append(fields,
			zap.String("outcome", logOutcome),
			zap.String("reason", reason),
			zap.Int("status", res.status),
			zap.Duration("duration", duration),
			zap.String("remote_ip", remoteHost(r.RemoteAddr)),
			zap.String("method", r.Method),
			zap.String("uri", r.RequestURI),
		)
		if ev := res.event; ev != nil {
			fields = append(fields,
				zap.String("type", ev.Type),
				zap.String("id", ev.ID),
				zap.String("object_type", ev.ObjectType),
				zap.String("object_id", ev.ObjectID),
				zap.String("environment_id", ev.EnvironmentID),
				zap.Int("attempts", ev.Attempts),
			)
		}
		if res.aborted {
			fields = append(fields, zap.Bool("aborted", true), zap.Error(res.err))
		}
		if res.body != nil && h.logger.Core().Enabled(zapcore.DebugLevel) {
			fields = append(fields, zap.ByteString("body", truncate(res.body, maxLoggedBody)))
		}
		c.Write(fields...)
	}

	if limit := liveLog.bodyCap(); limit >= 0 {
		liveLog.add(newLogEntry(r, res, duration, limit))
	}
	h.app.recordEvent(res)
}

// newLogEntry builds the live log's view of a request. The body is kept
// only once the signature verified, cut to the configured cap.
func newLogEntry(r *http.Request, res *result, duration time.Duration, limit int) LogEntry {
	e := LogEntry{
		Time:       res.start,
		Outcome:    res.outcome.Name,
		Status:     res.status,
		DurationMS: float64(duration.Microseconds()) / 1000,
		Method:     r.Method,
		URI:        r.RequestURI,
		RemoteIP:   remoteHost(r.RemoteAddr),
		Headers:    loggedHeaders(r.Header),
	}
	if ev := res.event; ev != nil {
		e.Type, e.ID, e.ObjectType, e.ObjectID = ev.Type, ev.ID, ev.ObjectType, ev.ObjectID
		e.EnvironmentID, e.Attempts = ev.EnvironmentID, ev.Attempts
	}
	if res.body == nil {
		e.BodyUnavailable = "not shown: the signature did not verify"
		return e
	}
	if len(res.body) > limit {
		// A copy, so that the entry does not pin the whole body.
		e.Body, e.BodyTruncated = string(res.body[:limit]), true
	} else if cap(res.body) == len(res.body) {
		// The verified body is never modified: share it.
		e.Body = bytesToString(res.body)
	} else {
		// A chunked body's buffer may be up to four times its length.
		e.Body = string(res.body)
	}
	return e
}

func truncate(b []byte, n int) []byte {
	if len(b) > n {
		return b[:n]
	}
	return b
}
