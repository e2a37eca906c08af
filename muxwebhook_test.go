package muxwebhook

// Unit tests of the mux_webhook handler, called directly (the integration
// tests run it inside a real Caddy).

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

func provisionedHandler(t testing.TB, h *Handler) *Handler {
	t.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	t.Cleanup(cancel)
	if err := h.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	if err := h.Validate(); err != nil {
		t.Fatal(err)
	}
	h.logger = zap.NewNop()
	return h
}

func TestProvisionDefaults(t *testing.T) {
	h := provisionedHandler(t, &Handler{Secrets: []string{"s"}})
	if time.Duration(h.Tolerance) != 5*time.Minute || h.MaxBody != 1<<20 {
		t.Errorf("defaults: tolerance %s, max_body %d", time.Duration(h.Tolerance), h.MaxBody)
	}
	if err := (&Handler{}).Validate(); err == nil || !strings.Contains(err.Error(), "mux_webhook") {
		t.Errorf("no secrets: Validate = %v", err)
	}
	if err := (&Handler{Secrets: []string{"s"}, Tolerance: -1}).Validate(); err == nil {
		t.Error("negative tolerance accepted")
	}
}

// TestSmallRequestDoesNotAllocateLimit: memory per request follows the
// body, not max_body, for known and unknown (chunked) lengths.
func TestSmallRequestDoesNotAllocateLimit(t *testing.T) {
	h := provisionedHandler(t, &Handler{Secrets: []string{"s"}, MaxBody: MaxMaxBody})
	body := event("video.asset.ready", "m1", "")
	header := Sign([]byte("s"), body, time.Now())
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		_, err := io.Copy(io.Discard, r.Body)
		return err
	})
	for _, chunked := range []bool{false, true} {
		var before, after runtime.MemStats
		const n = 20
		reqs := make([]*http.Request, n)
		for i := range reqs {
			reqs[i] = benchRequest(body, header)
			if chunked {
				reqs[i].ContentLength = -1
			}
		}
		runtime.GC()
		runtime.ReadMemStats(&before)
		for _, r := range reqs {
			if err := h.ServeHTTP(newRecorder(), r, next); err != nil {
				t.Fatal(err)
			}
		}
		runtime.ReadMemStats(&after)
		perRequest := (after.TotalAlloc - before.TotalAlloc) / n
		if limit := uint64(len(body)) + 8<<10; perRequest > limit {
			t.Errorf("chunked=%v: %d bytes allocated per request, want <= body + 8 KiB = %d", chunked, perRequest, limit)
		}
	}
}

func TestReadBodyLimits(t *testing.T) {
	h := provisionedHandler(t, &Handler{Secrets: []string{"s"}, MaxBody: 10})
	tests := []struct {
		body    string
		length  int64
		wantErr error
	}{
		{"0123456789", 10, nil},
		{"0123456789", -1, nil},
		{"0123456789A", 11, ErrTooLarge},
		{"0123456789A", -1, ErrTooLarge},
		{"", 0, nil},
	}
	for _, tt := range tests {
		r := httptest.NewRequest(http.MethodPost, "/", strings.NewReader(tt.body))
		r.ContentLength = tt.length
		got, err := h.readBody(newRecorder(), r)
		if !errors.Is(err, tt.wantErr) {
			t.Errorf("%q (length %d): err = %v, want %v", tt.body, tt.length, err, tt.wantErr)
		}
		if err == nil && string(got) != tt.body {
			t.Errorf("%q: read %q", tt.body, got)
		}
	}
	// A body cut short by the client is a read error (400), not a size error.
	r := httptest.NewRequest(http.MethodPost, "/", io.LimitReader(strings.NewReader("0123456789"), 4))
	r.ContentLength = 10
	if _, err := h.readBody(newRecorder(), r); !errors.Is(err, ErrReadBody) {
		t.Errorf("short body: err = %v, want ErrReadBody", err)
	}
	// request_body's limit earlier in the route counts as too large.
	r = httptest.NewRequest(http.MethodPost, "/", nil)
	r.Body = http.MaxBytesReader(httptest.NewRecorder(), io.NopCloser(strings.NewReader("0123456789")), 5)
	r.ContentLength = -1
	if _, err := h.readBody(newRecorder(), r); !errors.Is(err, ErrTooLarge) {
		t.Errorf("MaxBytesReader: err = %v, want ErrTooLarge", err)
	}
}

func TestRestoreBody(t *testing.T) {
	r := httptest.NewRequest(http.MethodPost, "/", nil)
	r.TransferEncoding = []string{"chunked"}
	r.Header.Set("Transfer-Encoding", "chunked")
	r.ContentLength = -1
	body := []byte(`{"type":"x"}`)
	restoreBody(r, body)
	for range 2 { // the body, then GetBody's copy
		got, _ := io.ReadAll(r.Body)
		if !bytes.Equal(got, body) {
			t.Fatalf("body %q", got)
		}
		var err error
		if r.Body, err = r.GetBody(); err != nil {
			t.Fatal(err)
		}
	}
	if r.ContentLength != int64(len(body)) || r.TransferEncoding != nil || r.Header.Get("Transfer-Encoding") != "" {
		t.Errorf("ContentLength %d, TransferEncoding %v", r.ContentLength, r.TransferEncoding)
	}
}

func TestRejectionsAreHandlerErrors(t *testing.T) {
	h := provisionedHandler(t, &Handler{Secrets: []string{"s"}})
	called := false
	next := caddyhttp.HandlerFunc(func(http.ResponseWriter, *http.Request) error { called = true; return nil })
	r := benchRequest([]byte(`{"type":"a"}`), "t=1,v1="+strings.Repeat("0", 64))
	err := h.ServeHTTP(httptest.NewRecorder(), r, next)
	var he caddyhttp.HandlerError
	if !errors.As(err, &he) || he.StatusCode != http.StatusUnauthorized || !errors.Is(err, ErrMismatch) {
		t.Fatalf("err = %#v, want a 401 HandlerError wrapping ErrMismatch", err)
	}
	if called {
		t.Fatal("next called for a forged request")
	}
	if strings.Contains(err.Error(), "s\"") {
		t.Fatal("error mentions the secret")
	}
}

// unreadable fails the test if the handler reads it.
type unreadable struct{ t *testing.T }

func (u unreadable) Read([]byte) (int, error) {
	u.t.Error("the body of a request with an unverifiable header was read")
	return 0, io.EOF
}

// TestBadHeaderRefusedBeforeReading: with a Content-Length within the
// limit, a missing or malformed header gets 401 without the body being
// buffered (the cheap answer to floods of header-less junk).
func TestBadHeaderRefusedBeforeReading(t *testing.T) {
	h := provisionedHandler(t, &Handler{Secrets: []string{"s"}})
	for _, header := range []string{"", "t=abc,v1=00", "t=1"} {
		r := benchRequest(nil, header)
		r.Body = io.NopCloser(unreadable{t})
		r.ContentLength = 1000
		err := h.ServeHTTP(httptest.NewRecorder(), r, nil)
		if he, ok := errors.AsType[caddyhttp.HandlerError](err); !ok || he.StatusCode != http.StatusUnauthorized {
			t.Errorf("header %q: err = %v, want 401", header, err)
		}
	}
	// Over the limit, 413 still comes first.
	r := benchRequest(nil, "")
	r.Body = io.NopCloser(unreadable{t})
	r.ContentLength = 2 << 20
	if he, ok := errors.AsType[caddyhttp.HandlerError](h.ServeHTTP(httptest.NewRecorder(), r, nil)); !ok || he.StatusCode != http.StatusRequestEntityTooLarge {
		t.Errorf("oversized header-less request: want 413")
	}
}
