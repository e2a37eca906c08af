// Mux-Signature parsing and verification.
//
// This file is deliberately free of Caddy imports: it is the part of the
// gateway that decides whether bytes came from Mux, and it must be testable
// (and reusable, e.g. by the CLI) on its own.

package muxwebhook

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"strconv"
	"strings"
	"time"
)

// SignatureHeader is the HTTP header Mux signs its webhook deliveries with.
const SignatureHeader = "Mux-Signature"

// Reasons a signature check fails. Each is a distinct value so that callers
// (the handler's log line, metrics, the CLI's verify command) can say
// exactly which check failed; use errors.Is to test for them.
var (
	ErrMissingSignature = errors.New("missing Mux-Signature header")
	ErrMalformed        = errors.New("malformed Mux-Signature header")
	ErrNoV1             = errors.New("Mux-Signature header has no v1 signature")
	ErrMismatch         = errors.New("no v1 signature matches any configured secret")
	ErrExpired          = errors.New("signature timestamp is older than the tolerance")
	ErrFuture           = errors.New("signature timestamp is further in the future than the tolerance")
)

// maxTimestampDigits bounds the t value: 19 digits is the most a
// non-negative int64 can need.
const maxTimestampDigits = 19

// Signature is a parsed Mux-Signature header.
type Signature struct {
	// Timestamp is the t value exactly as sent; the MAC covers these bytes.
	Timestamp string
	// Unix is Timestamp as seconds since the epoch. A value too large for
	// int64 saturates, which puts it far outside any tolerance window.
	Unix int64
	// V1 holds the v1 values that are well-formed (64 hex digits), decoded.
	// Malformed v1 values are kept out: they could never match.
	V1 [][sha256.Size]byte
	// sawV1 records that at least one v1 item was present, well-formed or
	// not, so that "no v1" and "mismatch" can be told apart.
	sawV1 bool
}

// ParseSignature parses a Mux-Signature header value. It returns
// ErrMissingSignature for an empty value, ErrMalformed for syntax errors
// (an item without '=', a missing, repeated or non-numeric t) and ErrNoV1
// when no v1 item is present. Unknown keys, including other schemes, are
// ignored.
func ParseSignature(header string) (Signature, error) {
	var sig Signature
	if strings.TrimSpace(header) == "" {
		return sig, ErrMissingSignature
	}
	sawT := false
	for item := range strings.SplitSeq(header, ",") {
		item = trimSpaceTab(item)
		if item == "" {
			continue
		}
		key, value, ok := strings.Cut(item, "=")
		if !ok {
			return Signature{}, ErrMalformed
		}
		key, value = trimSpaceTab(key), trimSpaceTab(value)
		switch key {
		case "t":
			if sawT || !isTimestamp(value) {
				return Signature{}, ErrMalformed
			}
			sawT = true
			sig.Timestamp = value
			sig.Unix = parseUnix(value)
		case "v1":
			sig.sawV1 = true
			var mac [sha256.Size]byte
			if len(value) == 2*sha256.Size {
				if _, err := hex.Decode(mac[:], []byte(value)); err == nil {
					sig.V1 = append(sig.V1, mac)
				}
			}
		}
	}
	if !sawT {
		return Signature{}, ErrMalformed
	}
	if !sig.sawV1 {
		return Signature{}, ErrNoV1
	}
	return sig, nil
}

// Verify checks a delivery: header is the Mux-Signature value, body the raw
// request body, secrets the accepted signing secrets, now the current time
// and tolerance the largest accepted distance between now and t, in either
// direction. It checks the MAC before the timestamp, so that a forged
// request never learns anything about the clock. On success it returns the
// parsed signature.
func Verify(header string, body []byte, secrets [][]byte, now time.Time, tolerance time.Duration) (Signature, error) {
	sig, err := ParseSignature(header)
	if err != nil {
		return sig, err
	}
	if !sig.Matches(body, secrets) {
		return sig, ErrMismatch
	}
	return sig, sig.CheckTime(now, tolerance)
}

// Matches reports whether any v1 value of sig is the MAC of body under any
// of secrets. Every comparison runs in constant time.
func (sig Signature) Matches(body []byte, secrets [][]byte) bool {
	if len(sig.V1) == 0 {
		return false
	}
	var sum [sha256.Size]byte
	matched := false
	for _, secret := range secrets {
		mac := computeMAC(secret, sig.Timestamp, body, sum[:0])
		for i := range sig.V1 {
			// No early return: the work done does not depend on which
			// secret or which v1 value matched.
			if hmac.Equal(mac, sig.V1[i][:]) {
				matched = true
			}
		}
	}
	return matched
}

// CheckTime returns ErrExpired or ErrFuture when t lies more than tolerance
// before or after now.
func (sig Signature) CheckTime(now time.Time, tolerance time.Duration) error {
	// Both values are non-negative int64s, so the difference cannot
	// overflow; float seconds keep sub-second tolerances meaningful.
	diff := now.Unix() - sig.Unix
	limit := tolerance.Seconds()
	switch {
	case diff > 0 && float64(diff) > limit:
		return ErrExpired
	case diff < 0 && float64(-diff) > limit:
		return ErrFuture
	}
	return nil
}

// Sign returns the Mux-Signature header value for body, signed with secret
// at the given time. It is what Mux computes; tests and the CLI use it.
func Sign(secret, body []byte, at time.Time) string {
	t := strconv.FormatInt(at.Unix(), 10)
	mac := computeMAC(secret, t, body, nil)
	return "t=" + t + ",v1=" + hex.EncodeToString(mac)
}

// computeMAC appends HMAC-SHA256(secret, t + "." + body) to dst.
func computeMAC(secret []byte, t string, body []byte, dst []byte) []byte {
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(t))
	m.Write([]byte{'.'})
	m.Write(body)
	return m.Sum(dst)
}

func trimSpaceTab(s string) string {
	return strings.Trim(s, " \t")
}

func isTimestamp(s string) bool {
	if len(s) == 0 || len(s) > maxTimestampDigits {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// parseUnix converts a string of 1–19 ASCII digits, saturating at the
// largest int64.
func parseUnix(s string) int64 {
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 1<<63 - 1
	}
	return n
}
