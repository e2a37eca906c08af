// The {http.mux.*} placeholders and where the verified event is kept.

package muxwebhook

import (
	"net/http"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// EventVar is the key of the verified *Event in the request's vars map
// (caddyhttp.SetVar). Keeping it there rather than in a derived context
// means handle_errors routes see it too.
const EventVar = "mux_webhook.event"

// placeholderPrefix starts every placeholder this plugin provides.
const placeholderPrefix = "http.mux."

// dataPrefix starts the lazily evaluated {http.mux.data.<path>} placeholders.
const dataPrefix = placeholderPrefix + "data."

// EventFromRequest returns the event that mux_webhook verified earlier in
// this request, or nil.
func EventFromRequest(r *http.Request) *Event {
	ev, _ := caddyhttp.GetVar(r.Context(), EventVar).(*Event)
	return ev
}

// publishEvent stores ev in the request's vars and makes the {http.mux.*}
// placeholders resolve from it.
func publishEvent(r *http.Request, ev *Event) {
	caddyhttp.SetVar(r.Context(), EventVar, ev)
	if repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); ok {
		vars, _ := r.Context().Value(caddyhttp.VarsCtxKey).(map[string]any)
		repl.Map(func(key string) (any, bool) {
			// Read the vars map at replace time, so a later
			// mux_webhook in the same request wins.
			ev, _ := vars[EventVar].(*Event)
			return ev.placeholder(key)
		})
	}
}

// placeholder resolves one {http.mux.*} key for ev. Values never hold
// control characters (see noControls), so that any of them is safe in a
// request or response header.
func (e *Event) placeholder(key string) (any, bool) {
	v, ok := e.placeholderText(key)
	if !ok {
		return nil, false
	}
	return noControls(v), true
}

func (e *Event) placeholderText(key string) (string, bool) {
	if e == nil || !strings.HasPrefix(key, placeholderPrefix) {
		return "", false
	}
	switch key[len(placeholderPrefix):] {
	case "event.type":
		return e.Type, true
	case "event.id":
		return e.ID, true
	case "event.created_at":
		return e.CreatedAt, true
	case "object.type":
		return e.ObjectType, true
	case "object.id":
		return e.ObjectID, true
	case "environment.id":
		return e.EnvironmentID, true
	case "environment.name":
		return e.EnvironmentName, true
	case "attempts":
		return strconv.Itoa(e.Attempts), true
	case "signature.timestamp":
		return e.Timestamp, true
	}
	if path, ok := strings.CutPrefix(key, dataPrefix); ok {
		v, _ := e.DataValue(path)
		return v, true
	}
	return "", false
}

// noControls returns s with every ASCII control character but tab (NUL,
// CR, LF, ESC, DEL, ...) replaced by a space. Go's HTTP client and server
// refuse such bytes in header values: `header_up X-Passthrough
// {http.mux.data.passthrough}` would otherwise answer 502 for every event
// whose free-text passthrough holds a newline, for as long as Mux retries.
// The body is forwarded unchanged; exact values are read from it. Strings
// without control characters, nearly all, are returned as they are.
func noControls(s string) string {
	i := strings.IndexFunc(s, isControl)
	if i < 0 {
		return s
	}
	b := []byte(s)
	for j := i; j < len(b); j++ {
		if b[j] < 0x20 && b[j] != '\t' || b[j] == 0x7f {
			b[j] = ' '
		}
	}
	return string(b)
}

func isControl(r rune) bool { return r < 0x20 && r != '\t' || r == 0x7f }
