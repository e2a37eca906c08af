// The event's fields in Caddy's access log: when the site has `log`,
// what the handler knows about a request (outcome, reason, event type,
// id, object) goes into Caddy's own "handled request" line, through
// caddyhttp.ExtraLogFields, instead of a line of its own. An event is
// never logged twice.

package muxwebhook

import (
	"net"
	"net/http"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// accessLogFields returns the request's extra access-log fields if Caddy
// will write an access log line for it, else nil. It asks the same
// questions as Caddy's server does (a `log` for this host, not skipped).
func accessLogFields(r *http.Request) *caddyhttp.ExtraLogFields {
	ctx := r.Context()
	srv, _ := ctx.Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server)
	if srv == nil || srv.Logs == nil {
		return nil
	}
	if skip, ok := caddyhttp.GetVar(ctx, caddyhttp.LogSkipVar).(bool); ok && skip {
		return nil
	}
	host, _, err := net.SplitHostPort(r.Host)
	if err != nil {
		host = r.Host
	}
	mapped := false
	for name := range srv.Logs.LoggerNames {
		if certmagic.MatchWildcard(host, name) {
			mapped = true
			break
		}
	}
	if !mapped {
		for _, skipped := range srv.Logs.SkipHosts {
			if certmagic.MatchWildcard(host, skipped) {
				return nil
			}
		}
		if srv.Logs.SkipUnmappedHosts {
			return nil
		}
	}
	extra, _ := ctx.Value(caddyhttp.ExtraLogFieldsCtxKey).(*caddyhttp.ExtraLogFields)
	return extra
}

// muxLogFields is the `mux` object of an access log line.
type muxLogFields struct {
	outcome, reason string
	event           *Event
	aborted         bool
	err             error
}

// MarshalLogObject writes the fields the handler's own line has, apart
// from what the access log already says (status, duration, request).
func (f muxLogFields) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	enc.AddString("outcome", f.outcome)
	if f.reason != "" {
		enc.AddString("reason", f.reason)
	}
	if ev := f.event; ev != nil {
		enc.AddString("type", ev.Type)
		enc.AddString("id", ev.ID)
		enc.AddString("object_type", ev.ObjectType)
		enc.AddString("object_id", ev.ObjectID)
		enc.AddString("environment_id", ev.EnvironmentID)
		enc.AddInt("attempts", ev.Attempts)
	}
	if f.aborted {
		enc.AddBool("aborted", true)
		enc.AddString("error", f.err.Error())
	}
	return nil
}

// addToAccessLog puts the request's outcome into the access log line,
// raising the line's level to the outcome's when it is above the one
// Caddy gives the status (a rejection is a WARN, as the handler's own
// line would be); never lowering it (a 5xx stays an ERROR).
func addToAccessLog(r *http.Request, extra *caddyhttp.ExtraLogFields, f muxLogFields, level zapcore.Level, status int) {
	extra.Set(zap.Object("mux", f))
	caddyLevel := zapcore.InfoLevel
	if status >= 500 {
		caddyLevel = zapcore.ErrorLevel
	}
	if level > caddyLevel {
		caddyhttp.SetVar(r.Context(), caddyhttp.LogLevelVar, level.String())
	}
}
