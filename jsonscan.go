// A small, allocation-free JSON scanner.
//
// The gateway needs a handful of top-level fields of each event to route it,
// and must reject bodies that are not JSON. Decoding the whole event with
// encoding/json would cost several times the HMAC (the `data` object is most
// of the body), so we validate in one pass and remember byte spans instead;
// `data` is only walked again when a {http.mux.data.*} placeholder asks.

package muxwebhook

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"math/bits"
	"strings"
	"unicode/utf8"
	"unsafe"
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
	// Fast path: Mux sends compact JSON, so there is usually nothing to skip.
	if s.i < len(s.b) && s.b[s.i] > ' ' {
		return
	}
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
	for {
		// Find the next quote, backslash or control character eight
		// bytes at a time; near the end of the input, one at a time.
		if s.i+8 <= len(s.b) {
			m := specialBytes(binary.LittleEndian.Uint64(s.b[s.i:]))
			if m == 0 {
				s.i += 8
				continue
			}
			s.i += bits.TrailingZeros64(m) >> 3
		} else {
			for s.i < len(s.b) && plainStringByte[s.b[s.i]] {
				s.i++
			}
			if s.i >= len(s.b) {
				return 0, 0, false, errSyntax
			}
		}
		switch c := s.b[s.i]; {
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
		default: // a control character
			return 0, 0, false, errSyntax
		}
	}
}

// plainStringByte marks the bytes a JSON string may hold as they are: all
// but the quote, the backslash and control characters.
var plainStringByte = func() (t [256]bool) {
	for c := range t {
		t[c] = c >= 0x20 && c != '"' && c != '\\'
	}
	return t
}()

// specialBytes flags, in the high bit of each byte, the bytes of w (eight
// bytes of a string, little-endian) that are a quote, a backslash or a
// control character: the classic SWAR zero-byte test. Bytes above the first
// flagged one may be flagged wrongly (borrows), but the lowest flag is
// always exact, and that is the only one used.
func specialBytes(w uint64) uint64 {
	const ones, highs = 0x0101010101010101, 0x8080808080808080
	q := w ^ ('"' * ones)
	b := w ^ ('\\' * ones)
	return ((q-ones)&^q | (b-ones)&^b | (w-0x20*ones)&^w) & highs
}

// value scans any JSON value and returns its span. Nested containers are
// walked in one loop, with a bit stack of the open ones, rather than by
// recursion: this is the scanner's hot path, run over every byte of an
// event's data.
func (s *jsonScanner) value() (start, end int, err error) {
	s.skipSpace()
	start = s.i
	var objects [maxJSONDepth/64 + 1]uint64 // bit d: container at depth d is an object
	depth := 0
next:
	for {
		if s.peek() == 0 {
			return 0, 0, errSyntax
		}
		switch c := s.b[s.i]; c {
		case '"':
			if _, _, _, err := s.str(); err != nil {
				return 0, 0, err
			}
		case '{', '[':
			if s.depth+depth >= maxJSONDepth {
				return 0, 0, errSyntax
			}
			closer := byte(']')
			if c == '{' {
				objects[depth/64] |= 1 << (depth % 64)
				closer = '}'
			} else {
				objects[depth/64] &^= 1 << (depth % 64)
			}
			depth++
			s.i++
			if s.peek() == closer {
				s.i++
				depth--
				break
			}
			if c == '{' {
				if err := s.key(); err != nil {
					return 0, 0, err
				}
			}
			continue next
		case 't':
			_, _, err = s.literal("true")
		case 'f':
			_, _, err = s.literal("false")
		case 'n':
			_, _, err = s.literal("null")
		default:
			if c == '-' || (c >= '0' && c <= '9') {
				_, _, err = s.number()
			} else {
				err = errSyntax
			}
		}
		if err != nil {
			return 0, 0, err
		}
		// After a value: close containers, or go on to the next element.
		for depth > 0 {
			inObject := objects[(depth-1)/64]&(1<<((depth-1)%64)) != 0
			switch s.peek() {
			case ',':
				s.i++
				if inObject {
					if err := s.key(); err != nil {
						return 0, 0, err
					}
				}
				continue next
			case '}':
				if !inObject {
					return 0, 0, errSyntax
				}
			case ']':
				if inObject {
					return 0, 0, errSyntax
				}
			default:
				return 0, 0, errSyntax
			}
			s.i++
			depth--
		}
		return start, s.i, nil
	}
}

// key scans an object key and the colon after it.
func (s *jsonScanner) key() error {
	if _, _, _, err := s.str(); err != nil {
		return err
	}
	return s.expect(':')
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
		// A key with invalid UTF-8 reads as U+FFFD in JSON, so it can only
		// equal a name that is valid UTF-8 after that replacement.
		return string(raw) == name && (utf8.ValidString(name) || validUTF8(raw) == name)
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
// strings without quotes, everything else as compact JSON. The result may
// share memory with raw: callers pass spans of a verified body, which is
// never modified once read (see bytesToString).
func scalarText(raw []byte) string {
	if len(raw) > 0 && raw[0] == '"' {
		content := raw[1 : len(raw)-1]
		if bytes.IndexByte(content, '\\') >= 0 {
			return unquote(content)
		}
		if !utf8.Valid(content) {
			return validUTF8(content)
		}
		return bytesToString(content)
	}
	return compactJSON(raw)
}

// validUTF8 replaces each byte of b that is not part of valid UTF-8 with
// U+FFFD, as encoding/json and JSON.parse (after decoding the body as
// UTF-8) do.
func validUTF8(b []byte) string {
	var sb strings.Builder
	sb.Grow(len(b) + 8)
	for len(b) > 0 {
		r, size := utf8.DecodeRune(b)
		if r == utf8.RuneError && size == 1 {
			sb.WriteString("\uFFFD")
		} else {
			sb.Write(b[:size])
		}
		b = b[size:]
	}
	return sb.String()
}

// bytesToString returns a string that shares b's memory, saving a copy per
// decoded field. It is only used on the verified body, which no one writes
// to after the handler has read it: the handler restores it to the request
// as a read-only bytes.Reader.
func bytesToString(b []byte) string {
	if len(b) == 0 {
		return ""
	}
	return unsafe.String(unsafe.SliceData(b), len(b))
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
		return bytesToString(raw)
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
			want, ok := arrayIndex(step)
			if !ok {
				return nil, false
			}
			_, err := s.array(func(index int) error {
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

// arrayIndex parses a path step as an array index: decimal digits only,
// without leading zeros or a sign.
func arrayIndex(step string) (int, bool) {
	if step == "" || len(step) > 9 || (len(step) > 1 && step[0] == '0') {
		return 0, false
	}
	n := 0
	for i := 0; i < len(step); i++ {
		if step[i] < '0' || step[i] > '9' {
			return 0, false
		}
		n = n*10 + int(step[i]-'0')
	}
	return n, true
}

func isHex(c byte) bool {
	return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')
}
