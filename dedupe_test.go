package muxwebhook

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestMemoryRecord(t *testing.T) {
	t0 := time.Unix(1_700_000_000, 0)
	m := newMemoryRecord(3, time.Hour)
	k := func(id string) idKey { return keyOf(&Event{IDRaw: []byte(`"` + id + `"`)}) }
	steps := []struct {
		do   string // begin, deliver, forget
		id   string
		at   time.Duration
		want dedupeVerdict
	}{
		{"begin", "a", 0, dedupeProceed},
		{"begin", "a", 0, dedupeInFlight},
		{"deliver", "a", time.Second, 0},
		{"begin", "a", 2 * time.Second, dedupeDuplicate},
		{"begin", "b", 3 * time.Second, dedupeProceed},
		{"forget", "b", 3 * time.Second, 0},
		{"begin", "b", 4 * time.Second, dedupeProceed}, // a failed delivery is not remembered
		{"begin", "a", time.Hour + time.Second, dedupeDuplicate},
		{"begin", "a", time.Hour + 2*time.Second, dedupeProceed}, // the window has passed
	}
	for i, s := range steps {
		now := t0.Add(s.at)
		switch s.do {
		case "begin":
			if got := m.begin(k(s.id), now); got != s.want {
				t.Fatalf("step %d: begin(%s) = %v, want %v", i, s.id, got, s.want)
			}
		case "deliver":
			m.markDelivered(k(s.id), now)
		case "forget":
			m.forget(k(s.id))
		}
	}
	// Bounded: the oldest entries go first.
	m = newMemoryRecord(3, time.Hour)
	for i := range 10 {
		id := fmt.Sprint(i)
		m.begin(k(id), t0)
		m.markDelivered(k(id), t0)
	}
	if m.len() != 3 {
		t.Fatalf("record holds %d entries, want at most 3", m.len())
	}
	if m.begin(k("9"), t0) != dedupeDuplicate || m.begin(k("0"), t0) != dedupeProceed {
		t.Fatal("eviction did not drop the oldest ids")
	}
}

func dedupeSite(up string, opts string) string {
	return fmt.Sprintf(`
	mux_webhook %s {
		dedupe %s
	}
	reverse_proxy %s`, testSecret, opts, up)
}

func TestDedupeSuppressesRedelivery(t *testing.T) {
	var calls atomic.Int32
	failFirst := atomic.Bool{}
	failFirst.Store(true)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		if r.Header.Get("X-Fail") != "" && failFirst.CompareAndSwap(true, false) {
			w.WriteHeader(http.StatusInternalServerError)
			return
		}
		fmt.Fprint(w, "delivered")
	}))
	t.Cleanup(up.Close)
	g := startGateway(t, dedupeSite(strings.TrimPrefix(up.URL, "http://"), ""))

	body := event("video.asset.ready", "dup-1", "")
	for i, want := range []string{"delivered", ""} {
		status, _, got := do(t, signedRequest(t, g.url, testSecret, body, time.Now()))
		if status != 200 || got != want {
			t.Fatalf("delivery %d: %d %q, want 200 %q", i+1, status, got, want)
		}
	}
	if calls.Load() != 1 {
		t.Fatalf("upstream called %d times, want 1", calls.Load())
	}
	found := false
	for _, l := range g.logLines() {
		if l["msg"] == "mux webhook" && l["outcome"] == "duplicate" && l["id"] == "dup-1" && l["status"] == float64(200) {
			found = true
		}
	}
	if !found {
		t.Error("no log line for the suppressed duplicate")
	}

	// A non-2xx answer is not remembered: Mux's retry is forwarded.
	body = event("video.asset.ready", "dup-2", "")
	req := signedRequest(t, g.url, testSecret, body, time.Now())
	req.Header.Set("X-Fail", "1")
	if status, _, _ := do(t, req); status != 500 {
		t.Fatalf("failing upstream: %d", status)
	}
	for i, want := range []string{"delivered", ""} {
		status, _, got := do(t, signedRequest(t, g.url, testSecret, body, time.Now()))
		if status != 200 || got != want {
			t.Fatalf("retry %d: %d %q, want 200 %q", i+1, status, got, want)
		}
	}
	if calls.Load() != 3 {
		t.Fatalf("upstream called %d times, want 3", calls.Load())
	}
}

func TestDedupeInFlightGets409(t *testing.T) {
	arrived := make(chan struct{}, 1)
	release := make(chan struct{})
	var calls atomic.Int32
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		arrived <- struct{}{}
		<-release
		fmt.Fprint(w, "slow")
	}))
	t.Cleanup(up.Close)
	t.Cleanup(func() {
		select {
		case <-release:
		default:
			close(release)
		}
	})
	g := startGateway(t, dedupeSite(strings.TrimPrefix(up.URL, "http://"), "{\n\t\t\twindow 1h\n\t\t\tmax_entries 10\n\t\t}"))

	body := event("video.live_stream.active", "flight-1", "")
	first := make(chan int, 1)
	go func() {
		resp, err := http.DefaultClient.Do(signedRequest(t, g.url, testSecret, body, time.Now()))
		if err != nil {
			first <- 0
			return
		}
		resp.Body.Close()
		first <- resp.StatusCode
	}()
	select {
	case <-arrived:
	case <-time.After(10 * time.Second):
		t.Fatal("first delivery never reached the upstream")
	}
	if status, _, _ := do(t, signedRequest(t, g.url, testSecret, body, time.Now())); status != http.StatusConflict {
		t.Fatalf("delivery while in flight: %d, want 409", status)
	}
	close(release)
	if status := <-first; status != 200 {
		t.Fatalf("first delivery: %d", status)
	}
	if status, _, _ := do(t, signedRequest(t, g.url, testSecret, body, time.Now())); status != 200 || calls.Load() != 1 {
		t.Fatalf("after the first succeeded: %d, upstream calls %d", status, calls.Load())
	}
}

// TestDedupeAcrossInstances runs two Caddy processes (the xcaddy-built
// binary) that share one file-system storage: an event delivered through A
// and redelivered through B is forwarded once; expired records are purged.
func TestDedupeAcrossInstances(t *testing.T) {
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
		cfg := fmt.Sprintf(`{
	admin off
	auto_https off
	persist_config off
	default_bind 127.0.0.1
	storage file_system %s
}
http://127.0.0.1:%d {
	mux_webhook %s {
		dedupe {
			window 3s
			storage
		}
	}
	reverse_proxy %s
}
`, shared, port, testSecret, strings.TrimPrefix(up.URL, "http://"))
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
	waitFor(t, func() bool {
		r, _ := filepath.Glob(filepath.Join(shared, "mux_webhook", "dedupe", "*", "*"))
		return len(r) == 0
	}, func() string { return "expired record was not purged" })
	if status, _, got := do(t, signedRequest(t, b, testSecret, body, time.Now())); status != 200 || got != "delivered" || calls.Load() != 2 {
		t.Fatalf("after the window: %d %q, upstream calls %d", status, got, calls.Load())
	}
}
