//go:build e2e

package muxwebhook

// dedupe across Caddy processes: two instances sharing one storage.

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/internal/testwait"
)

// TestDedupeAcrossInstances runs two Caddy processes (the xcaddy-built
// binary) that share one file-system storage: an event delivered through A
// and redelivered through B is forwarded once; expired records are purged.
func TestDedupeAcrossInstances(t *testing.T) {
	t.Parallel() // its own processes and ports
	bin := caddyBinary(t)
	var calls atomic.Int32
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		fmt.Fprint(w, "delivered")
	}))
	t.Cleanup(up.Close)
	shared := t.TempDir()
	start := func() string {
		port := freePort(t)
		cfg := fmt.Sprintf(`%s
http://127.0.0.1:%d {
	mux_webhook %s {
		dedupe {
			window 3s
			storage
		}
	}
	reverse_proxy %s
}
`, testGlobals{storage: shared}, port, testSecret, strings.TrimPrefix(up.URL, "http://"))
		out := runCaddyBinary(t, bin, cfg)
		base := fmt.Sprintf("http://127.0.0.1:%d", port)
		waitForHTTP(t, base, out)
		return base
	}
	a, b := start(), start()

	body := event("video.asset.ready", "cluster-1", "")
	for i, url := range []string{a, b, a} {
		status, _, got := do(t, signedRequest(t, url, testSecret, body, time.Now()))
		want := "delivered"
		if i > 0 {
			want = ""
		}
		if status != 200 || got != want {
			t.Fatalf("delivery %d: %d %q, want 200 %q", i+1, status, got, want)
		}
	}
	if calls.Load() != 1 {
		t.Fatalf("upstream called %d times across two instances, want 1", calls.Load())
	}
	records, _ := filepath.Glob(filepath.Join(shared, "mux_webhook", "dedupe", "*", "*"))
	if len(records) != 1 {
		t.Fatalf("storage holds %d records, want 1: %v", len(records), records)
	}
	// After the window, the record is purged and a redelivery is forwarded.
	testwait.For(t, func() bool {
		r, _ := filepath.Glob(filepath.Join(shared, "mux_webhook", "dedupe", "*", "*"))
		return len(r) == 0
	}, func() string { return "expired record was not purged" })
	if status, _, got := do(t, signedRequest(t, b, testSecret, body, time.Now())); status != 200 || got != "delivered" || calls.Load() != 2 {
		t.Fatalf("after the window: %d %q, upstream calls %d", status, got, calls.Load())
	}
}

// TestFaultDedupeRaceAcrossInstances: two Caddy processes share storage
// with `dedupe { storage }`; each of many ids arrives at both at once,
// twice each. The route runs once per id; the others get 409 (Mux
// retries them, then gets 200).
func TestFaultDedupeRaceAcrossInstances(t *testing.T) {
	t.Parallel() // its own processes and ports
	var mu sync.Mutex
	seen := map[string]int{}
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		ev, err := DecodeEvent(b)
		if err != nil {
			t.Error(err)
			return
		}
		mu.Lock()
		seen[ev.ID]++
		mu.Unlock()
		time.Sleep(50 * time.Millisecond) // a real backend takes a while
		fmt.Fprint(w, "delivered")
	}))
	t.Cleanup(up.Close)
	shared := t.TempDir()
	site := fmt.Sprintf(`
	mux_webhook %s {
		dedupe {
			storage
		}
	}
	reverse_proxy %s`, testSecret, strings.TrimPrefix(up.URL, "http://"))
	a := startBinaryGateway(t, shared, "", site)
	b := startBinaryGateway(t, shared, "", site)

	const ids, copies = 20, 2 // per instance
	client := &http.Client{Timeout: 15 * time.Second}
	var wg sync.WaitGroup
	var answered sync.Map // id -> got a 2xx
	var conflicts atomic.Int32
	for i := range ids {
		id := fmt.Sprintf("race-%d", i)
		body := event("video.asset.ready", id, "")
		for _, base := range []string{a.base, b.base, a.base, b.base}[:copies*2] {
			wg.Go(func() {
				// Mux's retries: until a 2xx, at most 20 attempts.
				for range 20 {
					resp, err := client.Do(signedRequest(t, base, testSecret, body, time.Now()))
					if err != nil {
						t.Error(err)
						return
					}
					resp.Body.Close()
					if resp.StatusCode == 200 {
						answered.Store(id, true)
						return
					}
					if resp.StatusCode != http.StatusConflict {
						t.Errorf("%s: %d", id, resp.StatusCode)
						return
					}
					conflicts.Add(1)
					time.Sleep(100 * time.Millisecond)
				}
				t.Errorf("%s: no 2xx after 20 attempts", id)
			})
		}
	}
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	for i := range ids {
		id := fmt.Sprintf("race-%d", i)
		if seen[id] != 1 {
			t.Errorf("%s reached the upstream %d times, want once", id, seen[id])
		}
		if _, ok := answered.Load(id); !ok {
			t.Errorf("%s was never answered 2xx", id)
		}
	}
	t.Logf("%d ids × %d concurrent deliveries: %d answered 409 and retried", ids, copies*2, conflicts.Load())
}
