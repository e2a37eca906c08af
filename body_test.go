package muxwebhook

// Reading the body (body.go): limits, timeouts, memory bounded by the
// bytes that arrive, the body restored for the next handler.

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
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

// TestRequestsDoNotPinBodies: 1 000 remembered ids of 64 KiB events (and
// their live log entries) keep a small fraction of the 64 MiB of bodies.
func TestRequestsDoNotPinBodies(t *testing.T) {
	h, _ := observedHandler(t, &Handler{Secrets: []string{"pin-secret"}, Dedupe: &Dedupe{}})
	h.logger = zap.NewNop()
	// After provisioning, which applies the live log's defaults: the live
	// log keeps 1 KiB of each body, 0.5 MiB in all.
	liveLog.configure(DefaultLogSize, 1024)
	t.Cleanup(func() { liveLog.configure(DefaultLogSize, DefaultLogBody) })
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error { return nil })
	const n, size = 1000, 64 << 10
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	pad := strings.Repeat("p", size)
	for i := range n {
		id := fmt.Sprintf("pin-%d-%s", i, pad[:200])
		body := fmt.Appendf(nil, `{"type":"video.asset.ready","id":%q,"object":{"type":"asset","id":"a%d"},"data":{"passthrough":%q}}`, id, i, pad)
		if status, err := serveSigned(h, "pin-secret", body, next); status != 200 || err != nil {
			t.Fatalf("event %d: %d %v", i, status, err)
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	if h.dedupe.memory.len() != n {
		t.Fatalf("dedupe remembers %d ids, want %d", h.dedupe.memory.len(), n)
	}
	grown := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	t.Logf("heap grew by %.1f MiB after %d events of %d KiB", float64(grown)/(1<<20), n, size>>10)
	if grown > 8<<20 {
		t.Errorf("heap grew by %.1f MiB after %d remembered events of %d KiB: bodies are pinned", float64(grown)/(1<<20), n, size>>10)
	}
}

// TestClaimedLengthIsNotAllocated: a body that claims 16 MiB and sends 100
// bytes costs a small buffer, not the claim.
func TestClaimedLengthIsNotAllocated(t *testing.T) {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	_, err := readBounded(strings.NewReader(strings.Repeat("x", 100)), MaxMaxBody, MaxMaxBody)
	runtime.ReadMemStats(&after)
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("short body: %v", err)
	}
	if got := after.TotalAlloc - before.TotalAlloc; got > 64<<10 {
		t.Errorf("allocated %d bytes for 100 that arrived", got)
	}
	// A body that arrives in full, in small reads, of known and unknown
	// length, is read exactly; too much is refused.
	body := strings.Repeat("0123456789", 100_000)
	for _, length := range []int64{int64(len(body)), -1} {
		got, err := readBounded(io.MultiReader(strings.NewReader(body[:7]), strings.NewReader(body[7:])), length, 1<<20)
		if err != nil || string(got) != body || int64(cap(got)) > 4*int64(len(body)) {
			t.Errorf("length %d: err %v, read %d bytes, cap %d", length, err, len(got), cap(got))
		}
		if _, err := readBounded(strings.NewReader(body), length, int64(len(body))-1); !errors.Is(err, ErrTooLarge) && length < 0 {
			t.Errorf("length %d over the limit: %v", length, err)
		}
	}
}

// TestSlowBodyGets408: a body that does not arrive within body_timeout is
// answered 408 and nothing is forwarded, with a genuine or a forged but
// well-formed signature.
func TestSlowBodyGets408(t *testing.T) {
	up := newUpstream(t, "app")
	g := startGateway(t, fmt.Sprintf(`
	mux_webhook %s {
		body_timeout 500ms
	}
	reverse_proxy %s`, testSecret, up.hostPort()))
	body := event("video.asset.ready", "slow-1", "")
	for _, secret := range []string{testSecret, "forged"} {
		req := signedRequest(t, g.url, secret, body, time.Now())
		conn, err := net.Dial("tcp", strings.TrimPrefix(g.url, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(conn, "POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\nMux-Signature: %s\r\n\r\n%s",
			len(body), req.Header.Get("Mux-Signature"), body[:10])
		_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		start := time.Now()
		resp, err := http.ReadResponse(bufioReader(conn), nil)
		conn.Close()
		if err != nil {
			t.Fatalf("secret %s: no response: %v\n%s", secret, err, g.rawLog())
		}
		if resp.StatusCode != http.StatusRequestTimeout {
			t.Errorf("secret %s: %d after %s, want 408", secret, resp.StatusCode, time.Since(start))
		}
	}
	if n := len(up.requests()); n != 0 {
		t.Fatalf("upstream got %d requests", n)
	}
	found := false
	for _, l := range g.logLines() {
		found = found || l["msg"] == "mux webhook" && l["reason"] == "body_timeout" && l["status"] == float64(408)
	}
	if !found {
		t.Error("no log line with reason body_timeout")
	}
}

func bufioReader(r io.Reader) *bufio.Reader { return bufio.NewReader(r) }

// TestBodyTimeoutWithoutDeadlines: where the response writer cannot set a
// read deadline, a body that does not arrive still ends at body_timeout.
func TestBodyTimeoutWithoutDeadlines(t *testing.T) {
	h := provisionedHandler(t, &Handler{Secrets: []string{"s"}, BodyTimeout: caddy.Duration(100 * time.Millisecond)})
	pr, pw := io.Pipe()
	t.Cleanup(func() { pw.Close() })
	r := httptest.NewRequest(http.MethodPost, "/", pr)
	r.ContentLength = 100
	done := make(chan error, 1)
	go func() {
		_, err := h.readBody(httptest.NewRecorder(), r) // no SetReadDeadline
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, ErrBodyTimeout) {
			t.Fatalf("err = %v, want ErrBodyTimeout", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("readBody still waiting for a body that never comes")
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
