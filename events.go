// The verified Mux event: decoding a signed body into the few fields the
// gateway routes and logs by, and the lazy lookup of `data` values.

package muxwebhook

import (
	"errors"
	"strings"
)

// Decoding failures of an authentic body; both answer 400.
var (
	ErrBadJSON = errors.New("body is not a JSON object")
	ErrNoType  = errors.New("event has no non-empty string \"type\"")
)

// Event is a verified Mux webhook event. Only the routing fields are
// decoded; Data keeps the raw bytes of the `data` member.
type Event struct {
	Type string
	// ID is the event id as placeholder text (a JSON string unquoted, any
	// other value as compact JSON).
	ID string
	// IDRaw is the id's JSON exactly as sent (a sub-slice of Body), nil
	// when the event has none: it tells apart ids whose text reads alike,
	// such as 7 and "7".
	IDRaw           []byte
	CreatedAt       string
	ObjectType      string
	ObjectID        string
	EnvironmentID   string
	EnvironmentName string
	// Attempts is the number of entries in `attempts`.
	Attempts int
	// Timestamp is the verified t of the Mux-Signature header.
	Timestamp string
	// Signature is the Mux-Signature header value that verified Body.
	Signature string
	// Body is the raw request body, exactly as signed.
	Body []byte
	// Data is the raw JSON of the `data` member, a sub-slice of Body, or
	// nil when the event has none.
	Data []byte
}

// String returns the event type, so that the event reads sensibly where
// Caddy prints a request variable (e.g. {http.vars.mux_webhook.event}).
func (e *Event) String() string { return e.Type }

// DataValue returns the value at a dotted path under `data`
// ("passthrough", "playback_ids.0.id"): strings unquoted, other values as
// compact JSON, and ok=false when nothing is there.
func (e *Event) DataValue(path string) (string, bool) {
	if e.Data == nil || path == "" {
		return "", false
	}
	raw, ok := lookupPath(e.Data, strings.Split(path, "."))
	if !ok {
		return "", false
	}
	return scalarText(raw), true
}

// DecodeEvent validates body as JSON and extracts the routing fields. It
// returns ErrBadJSON unless body is a single JSON object and ErrNoType
// unless that object has a non-empty string "type". Call it only on a
// body whose signature has been verified.
func DecodeEvent(body []byte) (*Event, error) {
	ev := &Event{Body: body}
	s := jsonScanner{b: body}
	var typeRaw []byte
	typeIsString := false
	if s.peek() != '{' {
		return nil, ErrBadJSON
	}
	err := s.object(func(key []byte, esc bool) error {
		var err error
		switch {
		case keyIs(key, esc, "type"):
			var st, en int
			st, en, err = s.value()
			typeRaw, typeIsString = body[st:en], err == nil && body[st] == '"'
		case keyIs(key, esc, "id"):
			var st, en int
			st, en, err = s.value()
			if err == nil {
				ev.IDRaw = body[st:en]
				ev.ID = scalarText(ev.IDRaw)
			}
		case keyIs(key, esc, "created_at"):
			ev.CreatedAt, err = s.text()
		case keyIs(key, esc, "object"):
			err = s.pair(&ev.ObjectType, &ev.ObjectID, "type", "id")
		case keyIs(key, esc, "environment"):
			err = s.pair(&ev.EnvironmentID, &ev.EnvironmentName, "id", "name")
		case keyIs(key, esc, "attempts"):
			if s.peek() == '[' {
				ev.Attempts, err = s.array(nil)
			} else {
				ev.Attempts = 0
				_, _, err = s.value()
			}
		case keyIs(key, esc, "data"):
			var st, en int
			st, en, err = s.value()
			ev.Data = body[st:en]
		default:
			_, _, err = s.value()
		}
		return err
	})
	if err != nil || s.end() != nil {
		return nil, ErrBadJSON
	}
	if !typeIsString {
		return nil, ErrNoType
	}
	ev.Type = scalarText(typeRaw)
	if ev.Type == "" {
		return nil, ErrNoType
	}
	return ev, nil
}

// text scans a value and returns it as placeholder text.
func (s *jsonScanner) text() (string, error) {
	st, en, err := s.value()
	if err != nil {
		return "", err
	}
	return scalarText(s.b[st:en]), nil
}

// pair scans a value; if it is an object, the members named k1 and k2 are
// stored as text in v1 and v2.
func (s *jsonScanner) pair(v1, v2 *string, k1, k2 string) error {
	*v1, *v2 = "", ""
	if s.peek() != '{' {
		_, _, err := s.value()
		return err
	}
	return s.object(func(key []byte, esc bool) error {
		var err error
		switch {
		case keyIs(key, esc, k1):
			*v1, err = s.text()
		case keyIs(key, esc, k2):
			*v2, err = s.text()
		default:
			_, _, err = s.value()
		}
		return err
	})
}
