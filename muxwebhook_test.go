package muxwebhook

// Unit tests of the mux_webhook handler, called directly (the integration
// tests run it inside a real Caddy).

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
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
