// A small, allocation-free JSON scanner.
//
// The gateway needs a handful of top-level fields of each event to route it,
// and must reject bodies that are not JSON. Decoding the whole event with
// encoding/json would cost several times the HMAC (the `data` object is most
// of the body), so we validate in one pass and remember byte spans instead;
// `data` is only walked again when a {http.mux.data.*} placeholder asks.

package muxwebhook

import (
	"encoding/json"
	"errors"
	"strconv"
)

// errSyntax is returned for any input that is not valid JSON (RFC 8259).
var errSyntax = errors.New("invalid JSON")

// maxJSONDepth bounds nesting, and with it the scanner's recursion.
const maxJSONDepth = 512

// jsonScanner walks a byte slice. Positions are byte offsets into b.
type jsonScanner struct {
	b     []byte
	i     int
	depth int
}

func (s *jsonScanner) skipSpace() {
	for s.i < len(s.b) {
		switch s.b[s.i] {
		case ' ', '\t', '\n', '\r':
			s.i++
		default:
			return
		}
	}
}

// peek returns the next non-space byte without consuming it, or 0 at the end.
func (s *jsonScanner) peek() byte {
	s.skipSpace()
	if s.i >= len(s.b) {
		return 0
	}
	return s.b[s.i]
}

// expect consumes c (after spaces) or fails.
func (s *jsonScanner) expect(c byte) error {
	if s.peek() != c {
		return errSyntax
	}
	s.i++
	return nil
}

// str scans a string starting at the current position (which must be a
// quote) and returns its span including the quotes, and whether it holds
// escapes.
func (s *jsonScanner) str() (start, end int, escaped bool, err error) {
	if s.peek() != '"' {
		return 0, 0, false, errSyntax
	}
	start = s.i
	s.i++
	for s.i < len(s.b) {
		c := s.b[s.i]
		switch {
		case c == '"':
			s.i++
			return start, s.i, escaped, nil
		case c == '\\':
			escaped = true
			if s.i+1 >= len(s.b) {
				return 0, 0, false, errSyntax
			}
			switch s.b[s.i+1] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
				s.i += 2
			case 'u':
				if s.i+6 > len(s.b) {
					return 0, 0, false, errSyntax
				}
				for _, h := range s.b[s.i+2 : s.i+6] {
					if !isHex(h) {
						return 0, 0, false, errSyntax
					}
				}
				s.i += 6
			default:
				return 0, 0, false, errSyntax
			}
		case c < 0x20:
			return 0, 0, false, errSyntax
		default:
			s.i++
		}
	}
	return 0, 0, false, errSyntax
}

// value scans any JSON value and returns its span.
func (s *jsonScanner) value() (start, end int, err error) {
	switch c := s.peek(); c {
	case '"':
		start, end, _, err = s.str()
		return start, end, err
	case '{':
		start = s.i
		err = s.object(nil)
		return start, s.i, err
	case '[':
		start = s.i
		_, err = s.array(nil)
		return start, s.i, err
	case 't':
		return s.literal("true")
	case 'f':
		return s.literal("false")
	case 'n':
		return s.literal("null")
	default:
		if c == '-' || (c >= '0' && c <= '9') {
			return s.number()
		}
		return 0, 0, errSyntax
	}
}

func (s *jsonScanner) literal(word string) (start, end int, err error) {
	start = s.i
	if len(s.b)-s.i < len(word) || string(s.b[s.i:s.i+len(word)]) != word {
		return 0, 0, errSyntax
	}
	s.i += len(word)
	return start, s.i, nil
}

func (s *jsonScanner) digits() int {
	n := 0
	for s.i < len(s.b) && s.b[s.i] >= '0' && s.b[s.i] <= '9' {
		s.i++
		n++
	}
	return n
}

func (s *jsonScanner) number() (start, end int, err error) {
	start = s.i
	if s.b[s.i] == '-' {
		s.i++
	}
	if s.i < len(s.b) && s.b[s.i] == '0' {
		s.i++
	} else if s.digits() == 0 {
		return 0, 0, errSyntax
	}
	if s.i < len(s.b) && s.b[s.i] == '.' {
		s.i++
		if s.digits() == 0 {
			return 0, 0, errSyntax
		}
	}
	if s.i < len(s.b) && (s.b[s.i] == 'e' || s.b[s.i] == 'E') {
		s.i++
		if s.i < len(s.b) && (s.b[s.i] == '+' || s.b[s.i] == '-') {
			s.i++
		}
		if s.digits() == 0 {
			return 0, 0, errSyntax
		}
	}
	return start, s.i, nil
}

// object scans an object. For every member it calls field (if not nil)
// with the key's span; field must consume the member's value. Without a
// callback values are skipped.
func (s *jsonScanner) object(field func(key []byte, escaped bool) error) error {
	if err := s.expect('{'); err != nil {
		return err
	}
	if s.depth++; s.depth > maxJSONDepth {
		return errSyntax
	}
	defer func() { s.depth-- }()
	if s.peek() == '}' {
		s.i++
		return nil
	}
	for {
		ks, ke, esc, err := s.str()
		if err != nil {
			return err
		}
		if err := s.expect(':'); err != nil {
			return err
		}
		if field != nil {
			err = field(s.b[ks+1:ke-1], esc)
		} else {
			_, _, err = s.value()
		}
		if err != nil {
			return err
		}
		switch s.peek() {
		case ',':
			s.i++
		case '}':
			s.i++
			return nil
		default:
			return errSyntax
		}
	}
}

// array scans an array and returns its number of elements. For every
// element it calls elem (if not nil) with the element's index; elem must
// consume the element.
func (s *jsonScanner) array(elem func(index int) error) (int, error) {
	if err := s.expect('['); err != nil {
		return 0, err
	}
	if s.depth++; s.depth > maxJSONDepth {
		return 0, errSyntax
	}
	defer func() { s.depth-- }()
	if s.peek() == ']' {
		s.i++
		return 0, nil
	}
	for n := 0; ; n++ {
		var err error
		if elem != nil {
			err = elem(n)
		} else {
			_, _, err = s.value()
		}
		if err != nil {
			return 0, err
		}
		switch s.peek() {
		case ',':
			s.i++
		case ']':
			s.i++
			return n + 1, nil
		default:
			return 0, errSyntax
		}
	}
}

// end checks that only white space follows.
func (s *jsonScanner) end() error {
	if s.peek() != 0 || s.i != len(s.b) {
		return errSyntax
	}
	return nil
}

// keyIs compares a raw (still quoted-content) key with name. Keys with
// escapes are decoded first, so "\u0074ype" is "type" as JSON.parse sees it.
func keyIs(raw []byte, escaped bool, name string) bool {
	if !escaped {
		return string(raw) == name
	}
	return unquote(raw) == name
}

// unquote decodes the content of a JSON string (without its quotes). The
// span has been validated by the scanner.
func unquote(raw []byte) string {
	var out string
	q := make([]byte, 0, len(raw)+2)
	q = append(q, '"')
	q = append(q, raw...)
	q = append(q, '"')
	if json.Unmarshal(q, &out) != nil {
		return ""
	}
	return out
}

// scalarText renders a scanned value the way placeholders show it:
// strings without quotes, everything else as compact JSON.
func scalarText(raw []byte) string {
	if len(raw) > 0 && raw[0] == '"' {
		content := raw[1 : len(raw)-1]
		for _, c := range content {
			if c == '\\' {
				return unquote(content)
			}
		}
		return string(content)
	}
	return compactJSON(raw)
}

func compactJSON(raw []byte) string {
	simple := true
	for _, c := range raw {
		if c == ' ' || c == '\t' || c == '\n' || c == '\r' {
			simple = false
			break
		}
	}
	if simple {
		return string(raw)
	}
	return string(appendCompact(make([]byte, 0, len(raw)), raw))
}

// appendCompact appends raw, a validated JSON value, to dst without the
// insignificant white space outside strings.
func appendCompact(dst, raw []byte) []byte {
	inString := false
	for i := 0; i < len(raw); i++ {
		c := raw[i]
		if inString {
			dst = append(dst, c)
			switch c {
			case '\\':
				i++
				if i < len(raw) {
					dst = append(dst, raw[i])
				}
			case '"':
				inString = false
			}
			continue
		}
		switch c {
		case ' ', '\t', '\n', '\r':
		case '"':
			inString = true
			dst = append(dst, c)
		default:
			dst = append(dst, c)
		}
	}
	return dst
}

// lookupPath walks raw (a JSON value) along path: object keys, or decimal
// indexes into arrays. It returns the span of the value found.
func lookupPath(raw []byte, path []string) ([]byte, bool) {
	for _, step := range path {
		s := jsonScanner{b: raw}
		var found []byte
		switch s.peek() {
		case '{':
			err := s.object(func(key []byte, escaped bool) error {
				st, en, err := s.value()
				// Like JSON.parse, the last duplicate key wins.
				if err == nil && keyIs(key, escaped, step) {
					found = s.b[st:en]
				}
				return err
			})
			if err != nil {
				return nil, false
			}
		case '[':
			want, err := strconv.Atoi(step)
			if err != nil || want < 0 || (len(step) > 1 && step[0] == '0') {
				return nil, false
			}
			_, err = s.array(func(index int) error {
				st, en, err := s.value()
				if err == nil && index == want {
					found = s.b[st:en]
				}
				return err
			})
			if err != nil {
				return nil, false
			}
		default:
			return nil, false
		}
		if found == nil {
			return nil, false
		}
		raw = found
	}
	return raw, true
}

func isHex(c byte) bool {
	return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')
}
