package queue

import "strings"

// The Idempotency-Key of a delivery request is the event's id, as a valid
// HTTP header value: an id is JSON text and may hold control characters
// (Go's client refuses to send those, and NATS headers turn line breaks
// into spaces), which would fail every attempt or merge two ids.
//
// The rule, for a backend that computes the key from the event's id:
//   - the id as is, when it is a plain value: no byte below 0x20 (tab
//     included) or 0x7f, no space at either end, and it does not begin
//     with "pct:";
//   - else "pct:" followed by the id's UTF-8 bytes, each byte outside
//     0x21–0x7e and each '%' written as '%' and two upper-case hex digits
//     (e.g. "a\u0001b" → "pct:a%01b", "a\nb" → "pct:a%0Ab",
//     " x" → "pct:%20x", "pct:x" → "pct:pct:x").
//
// Two ids never share a key: a plain id is itself and never begins with
// "pct:", and the encoded form can be decoded.

// idempotencyPrefix begins an encoded key.
const idempotencyPrefix = "pct:"

// headerIdempotencyKey is stored with a copy whose id needs encoding: the
// key delivery sends.
const headerIdempotencyKey = "Mux-Webhook-Idempotency-Key"

// IdempotencyKey is the Idempotency-Key delivery sends for an event id.
func IdempotencyKey(id string) string {
	if plainKey(id) {
		return id
	}
	const hex = "0123456789ABCDEF"
	var b strings.Builder
	b.Grow(len(idempotencyPrefix) + 3*len(id))
	b.WriteString(idempotencyPrefix)
	for i := 0; i < len(id); i++ {
		c := id[i]
		if c <= 0x20 || c >= 0x7f || c == '%' {
			b.WriteByte('%')
			b.WriteByte(hex[c>>4])
			b.WriteByte(hex[c&0xf])
			continue
		}
		b.WriteByte(c)
	}
	return b.String()
}

// plainKey reports whether id is sent as is.
func plainKey(id string) bool {
	if strings.HasPrefix(id, idempotencyPrefix) || strings.HasPrefix(id, " ") || strings.HasSuffix(id, " ") {
		return false
	}
	for i := 0; i < len(id); i++ {
		if c := id[i]; c < 0x20 || c == 0x7f {
			return false
		}
	}
	return true
}
