// Mux-Signature parsing and verification.
//
// This file is deliberately free of Caddy imports: it is the part of the
// gateway that decides whether bytes came from Mux, and it must be testable
// (and reusable, e.g. by the CLI) on its own.

package muxwebhook

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"hash"
	"strconv"
	"strings"
	"sync"
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
	// header is the whole header value: the v1 values are decoded from it
	// only while matching, so that parsing allocates nothing.
	header string
}

// ParseSignature parses a Mux-Signature header value. It returns
// ErrMissingSignature for an empty value, ErrMalformed for syntax errors
// (an item without '=', a missing, repeated or non-numeric t) and ErrNoV1
// when no v1 item is present. Unknown keys, including other schemes, are
// ignored.
func ParseSignature(header string) (Signature, error) {
	if strings.TrimSpace(header) == "" {
		return Signature{}, ErrMissingSignature
	}
	sig := Signature{header: header}
	sawT, sawV1 := false, false
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
			sawV1 = true
		}
	}
	if !sawT {
		return Signature{}, ErrMalformed
	}
	if !sawV1 {
		return Signature{}, ErrNoV1
	}
	return sig, nil
}

// V1 returns the well-formed v1 values (64 hex digits, either case),
// decoded. Malformed v1 values are left out: they could never match.
func (sig Signature) V1() [][sha256.Size]byte {
	var out [][sha256.Size]byte
	for mac := range sig.v1Values {
		out = append(out, mac)
	}
	return out
}

// v1Values yields the decoded well-formed v1 values without allocating.
func (sig Signature) v1Values(yield func([sha256.Size]byte) bool) {
	for item := range strings.SplitSeq(sig.header, ",") {
		key, value, ok := strings.Cut(trimSpaceTab(item), "=")
		if !ok || trimSpaceTab(key) != "v1" {
			continue
		}
		var mac [sha256.Size]byte
		if decodeHex(mac[:], trimSpaceTab(value)) && !yield(mac) {
			return
		}
	}
}

// decodeHex decodes exactly len(dst) bytes from s, or reports false.
func decodeHex(dst []byte, s string) bool {
	if len(s) != 2*len(dst) {
		return false
	}
	for i := range dst {
		hi, ok1 := fromHex(s[2*i])
		lo, ok2 := fromHex(s[2*i+1])
		if !ok1 || !ok2 {
			return false
		}
		dst[i] = hi<<4 | lo
	}
	return true
}

func fromHex(c byte) (byte, bool) {
	switch {
	case c >= '0' && c <= '9':
		return c - '0', true
	case c >= 'a' && c <= 'f':
		return c - 'a' + 10, true
	case c >= 'A' && c <= 'F':
		return c - 'A' + 10, true
	}
	return 0, false
}

// Verify checks a delivery: header is the Mux-Signature value, body the raw
// request body, secrets the accepted signing secrets, now the current time
// and tolerance the largest accepted distance between now and t, in either
// direction. It checks the MAC before the timestamp, so that a forged
// request never learns anything about the clock. On success it returns the
// parsed signature. For many requests with the same secrets, a Verifier is
// cheaper.
func Verify(header string, body []byte, secrets [][]byte, now time.Time, tolerance time.Duration) (Signature, error) {
	return NewVerifier(secrets).Verify(header, body, now, tolerance)
}

// Verifier verifies deliveries against a fixed set of secrets. It keeps
// the keyed HMAC states for reuse, so a verification allocates nothing. It
// is safe for concurrent use.
type Verifier struct {
	macs []sync.Pool // one per secret, of *macState
}

// macState is a keyed HMAC with scratch space for "t." and the sum.
type macState struct {
	h       hash.Hash
	scratch [maxTimestampDigits + 1]byte
	sum     [sha256.Size]byte
}

// NewVerifier returns a Verifier for secrets.
func NewVerifier(secrets [][]byte) *Verifier {
	v := &Verifier{macs: make([]sync.Pool, len(secrets))}
	for i, secret := range secrets {
		key := bytes.Clone(secret)
		v.macs[i].New = func() any { return &macState{h: hmac.New(sha256.New, key)} }
	}
	return v
}

// Verify is like the package-level Verify, with v's secrets.
func (v *Verifier) Verify(header string, body []byte, now time.Time, tolerance time.Duration) (Signature, error) {
	sig, err := ParseSignature(header)
	if err != nil {
		return sig, err
	}
	return sig, v.Check(sig, body, now, tolerance)
}

// Check verifies an already parsed signature: the MAC first, then the
// timestamp window.
func (v *Verifier) Check(sig Signature, body []byte, now time.Time, tolerance time.Duration) error {
	if !v.matches(sig, body) {
		return ErrMismatch
	}
	return sig.CheckTime(now, tolerance)
}

// matches reports whether any v1 value of sig is the MAC of body under any
// of the secrets. Every comparison runs in constant time, and every secret
// and every v1 value is tried, whichever matches.
func (v *Verifier) matches(sig Signature, body []byte) bool {
	matched := false
	for i := range v.macs {
		st := v.macs[i].Get().(*macState)
		st.h.Reset()
		n := copy(st.scratch[:], sig.Timestamp)
		st.scratch[n] = '.'
		st.h.Write(st.scratch[:n+1])
		st.h.Write(body)
		mac := st.h.Sum(st.sum[:0])
		for want := range sig.v1Values {
			if hmac.Equal(mac, want[:]) {
				matched = true
			}
		}
		v.macs[i].Put(st)
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
