package muxwebhook

// The delivery queue's rows of SPEC's "When things fail", against the
// real Caddy process.

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestFaultKilledWhileDelivering: Caddy is killed (SIGKILL) with events
// queued and being attempted against a backend that is down; after a
// restart on the same queue, every event that was answered 202 is
// delivered at least once (repeats are counted, not forbidden); one that
// was being attempted when Caddy died comes back after the destination's
// timeout.
func TestFaultKilledWhileDelivering(t *testing.T) {
	bin := caddyBinary(t)
	var up atomic.Bool
	var attempts atomic.Int32
	var mu sync.Mutex
	delivered := map[string]int{}
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		attempts.Add(1)
		if !up.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		mu.Lock()
		delivered[r.Header.Get("Idempotency-Key")]++
		mu.Unlock()
	}))
	t.Cleanup(backend.Close)
	queueDir := t.TempDir()
	start := func() (string, *exec.Cmd) {
		port := freePort(t)
		cfg := fmt.Sprintf(`{
	admin off
	auto_https off
	persist_config off
	default_bind 127.0.0.1
	log {
		format json
	}
	mux_webhook {
		queue {
			dir %s
		}
		destination app %s {
			retry 200ms
			timeout 2s
		}
	}
}
http://127.0.0.1:%d {
	mux_webhook %s
	mux_deliver app
}
`, queueDir, backend.URL, port, testSecret)
		dir := t.TempDir()
		out, cmd := runCaddyIn(t, bin, cfg, dir, dir, nil)
		base := fmt.Sprintf("http://127.0.0.1:%d", port)
		waitForHTTP(t, base, out)
		return base, cmd
	}

	base, first := start()
	const n = 20
	for i := range n {
		body := event("video.asset.ready", fmt.Sprint("kill-", i), "")
		if status, _, _ := do(t, signedRequest(t, base, testSecret, body, time.Now())); status != http.StatusAccepted {
			t.Fatalf("event %d: %d, want 202", i, status)
		}
	}
	waitFor(t, func() bool { return attempts.Load() >= n }, func() string { return "the backend saw no attempts" })
	if err := first.Process.Kill(); err != nil { // SIGKILL: no graceful stop
		t.Fatal(err)
	}
	_ = first.Wait()
	up.Store(true)

	start()
	count := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(delivered)
	}
	// A copy that was being attempted when Caddy died is handed out again
	// once its ack deadline (timeout + 5s) has passed.
	deadline := time.Now().Add(30 * time.Second)
	for count() < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d events delivered 30s after the restart", count(), n)
		}
		time.Sleep(100 * time.Millisecond)
	}
	mu.Lock()
	defer mu.Unlock()
	repeats := 0
	for i := range n {
		id := fmt.Sprint("kill-", i)
		if delivered[id] == 0 {
			t.Errorf("%s was answered 202 and never delivered", id)
		}
		repeats += delivered[id] - 1
	}
	t.Logf("%d events: all delivered after SIGKILL and restart, %d delivered more than once, %d attempts in all", n, repeats, attempts.Load())
}
