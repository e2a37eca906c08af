package muxwebhook

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"strings"
	"testing"
	"time"
)

// macHex computes the v1 value independently of the code under test.
func macHex(secret, t, body string) string {
	m := hmac.New(sha256.New, []byte(secret))
	m.Write([]byte(t + "." + body))
	return hex.EncodeToString(m.Sum(nil))
}

func TestParseSignature(t *testing.T) {
	good := macHex("s", "1700000000", "{}")
	tests := []struct {
		name    string
		header  string
		wantErr error
		wantT   string
		wantV1  int
	}{
		{"plain", "t=1700000000,v1=" + good, nil, "1700000000", 1},
		{"spaces and tabs", " t = 1700000000 ,\tv1=\t" + good + " ", nil, "1700000000", 1},
		{"order reversed", "v1=" + good + ",t=1700000000", nil, "1700000000", 1},
		{"several v1", "t=1,v1=" + good + ",v1=" + strings.Repeat("0", 64), nil, "1", 2},
		{"unknown scheme ignored", "t=1,v0=abc,v2=def,v1=" + good, nil, "1", 1},
		{"unknown key ignored", "t=1,foo=bar,v1=" + good, nil, "1", 1},
		{"empty items skipped", ",,t=1,,v1=" + good + ",", nil, "1", 1},
		{"uppercase hex accepted", "t=1,v1=" + strings.ToUpper(good), nil, "1", 1},
		{"short v1 never matches", "t=1,v1=abcd", nil, "1", 0},
		{"non-hex v1 never matches", "t=1,v1=" + strings.Repeat("z", 64), nil, "1", 0},
		{"19-digit t", "t=9999999999999999999,v1=" + good, nil, "9999999999999999999", 1},
		{"leading zeros kept as sent", "t=0001,v1=" + good, nil, "0001", 1},
		{"empty", "", ErrMissingSignature, "", 0},
		{"blank", "  ", ErrMissingSignature, "", 0},
		{"item without =", "t=1,v1", ErrMalformed, "", 0},
		{"no t", "v1=" + good, ErrMalformed, "", 0},
		{"two t", "t=1,t=2,v1=" + good, ErrMalformed, "", 0},
		{"t with letters", "t=123abc,v1=" + good, ErrMalformed, "", 0},
		{"t not a number", "t=abc,v1=" + good, ErrMalformed, "", 0},
		{"t negative", "t=-1,v1=" + good, ErrMalformed, "", 0},
		{"t empty", "t=,v1=" + good, ErrMalformed, "", 0},
		{"t 20 digits", "t=12345678901234567890,v1=" + good, ErrMalformed, "", 0},
		{"no v1", "t=1,v0=" + good, ErrNoV1, "", 0},
		{"V1 uppercase key is not v1", "t=1,V1=" + good, ErrNoV1, "", 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sig, err := ParseSignature(tt.header)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("err = %v, want %v", err, tt.wantErr)
			}
			if err != nil {
				return
			}
			if sig.Timestamp != tt.wantT {
				t.Errorf("Timestamp = %q, want %q", sig.Timestamp, tt.wantT)
			}
			if len(sig.V1()) != tt.wantV1 {
				t.Errorf("len(V1) = %d, want %d", len(sig.V1()), tt.wantV1)
			}
		})
	}
}

func TestVerify(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	body := `{"type":"video.asset.ready","id":"e1"}`
	ts := "1700000000"
	secrets := [][]byte{[]byte("old-secret"), []byte("new-secret")}
	mac := func(secret, t string) string { return macHex(secret, t, body) }
	tol := 5 * time.Minute
	tests := []struct {
		name    string
		header  string
		body    string
		wantErr error
	}{
		{"first secret", "t=" + ts + ",v1=" + mac("old-secret", ts), body, nil},
		{"second secret", "t=" + ts + ",v1=" + mac("new-secret", ts), body, nil},
		{"any of several v1", "t=" + ts + ",v1=" + mac("other", ts) + ",v1=" + mac("new-secret", ts), body, nil},
		{"uppercase hex", "t=" + ts + ",v1=" + strings.ToUpper(mac("new-secret", ts)), body, nil},
		{"MAC covers t as sent", "t=0" + ts + ",v1=" + mac("new-secret", "0"+ts), body, nil},
		{"at the past edge", "t=1699999700,v1=" + mac("old-secret", "1699999700"), body, nil},
		{"at the future edge", "t=1700000300,v1=" + mac("old-secret", "1700000300"), body, nil},
		{"wrong secret", "t=" + ts + ",v1=" + mac("nope", ts), body, ErrMismatch},
		{"body changed", "t=" + ts + ",v1=" + mac("old-secret", ts), body + " ", ErrMismatch},
		{"t changed", "t=1700000001,v1=" + mac("old-secret", ts), body, ErrMismatch},
		{"MAC over leading-zero t differs", "t=0" + ts + ",v1=" + mac("old-secret", ts), body, ErrMismatch},
		{"only malformed v1", "t=" + ts + ",v1=xyz", body, ErrMismatch},
		{"too old", "t=1699999699,v1=" + mac("old-secret", "1699999699"), body, ErrExpired},
		{"too new", "t=1700000301,v1=" + mac("old-secret", "1700000301"), body, ErrFuture},
		{"far future saturates", "t=9999999999999999999,v1=" + mac("old-secret", "9999999999999999999"), body, ErrFuture},
		{"zero", "t=0,v1=" + mac("old-secret", "0"), body, ErrExpired},
		{"mismatch wins over expired", "t=1,v1=" + mac("nope", "1"), body, ErrMismatch},
		{"missing", "", body, ErrMissingSignature},
		{"no v1", "t=" + ts, body, ErrNoV1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Verify(tt.header, []byte(tt.body), secrets, now, tol)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("err = %v, want %v", err, tt.wantErr)
			}
		})
	}
}

func TestSignRoundTrip(t *testing.T) {
	at := time.Unix(1_700_000_123, 0)
	h := Sign([]byte("k"), []byte("body"), at)
	want := "t=1700000123,v1=" + macHex("k", "1700000123", "body")
	if h != want {
		t.Fatalf("Sign = %q, want %q", h, want)
	}
	if _, err := Verify(h, []byte("body"), [][]byte{[]byte("k")}, at, time.Second); err != nil {
		t.Fatalf("Verify(Sign) = %v", err)
	}
}

func TestReason(t *testing.T) {
	tests := map[error]string{
		ErrMissingSignature: "missing",
		ErrMalformed:        "malformed",
		ErrNoV1:             "no_v1",
		ErrMismatch:         "mismatch",
		ErrExpired:          "expired",
		ErrFuture:           "future",
		ErrMethod:           "method",
		ErrTooLarge:         "too_large",
		ErrBadJSON:          "bad_json",
		ErrNoType:           "no_type",
		errors.New("other"): "",
	}
	for err, want := range tests {
		if got := Reason(err); got != want {
			t.Errorf("Reason(%v) = %q, want %q", err, got, want)
		}
	}
}
