//go:build e2e && linux

package muxwebhook

// "A live-log stream client stops reading: its stream ends within seconds
// (write deadline per event); reloads and new clients are unaffected"
// (README, "When things fail"). Linux only: the stalled clients shrink their
// TCP buffers with Linux socket options (CI runs on Debian).

import (
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestFaultStalledStreamClients runs the real binary: 50 stream clients
// that stop reading, on the admin API and on mux_webhook_ui, across 10
// config reloads, while large verified events flow. Afterwards Caddy's
// goroutines are back near where they were, every subscriber slot is free
// and a new client gets new events.
func TestFaultStalledStreamClients(t *testing.T) {
	t.Parallel() // its own processes and ports
	bin := caddyBinary(t)
	const (
		rounds          = 10
		clientsPerRound = 5
		eventsPerRound  = 10
		eventSize       = 60 << 10 // < log_body: kept and streamed whole
		goroutineSlack  = 40
	)
	adminPort, sitePort := freePort(t), freePort(t)
	admin, site := fmt.Sprintf("http://127.0.0.1:%d", adminPort), fmt.Sprintf("http://127.0.0.1:%d", sitePort)
	config := func(round int) string {
		return fmt.Sprintf(`%s

http://127.0.0.1:%d {
%s
}
`, testGlobals{admin: fmt.Sprintf("127.0.0.1:%d", adminPort), extra: "\tmux_webhook {\n\t\tlog_size 100\n\t\tlog_body 64KiB\n\t}"}, sitePort, fmt.Sprintf(stallSite, testSecret, round))
	}
	reload := func(round int) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodPost, admin+"/load", strings.NewReader(config(round)))
		req.Header.Set("Content-Type", "text/caddyfile")
		if status, _, body := do(t, req); status != http.StatusOK {
			t.Fatalf("reload %d: %d %s", round, status, body)
		}
		// A connection to the replaced server may be closed under the
		// request: sent again, as after any reload.
		if _, _, body := doAfterReload(t, func() *http.Request {
			req, _ := http.NewRequest(http.MethodGet, site+"/", nil)
			return req
		}); body != fmt.Sprint("round ", round) {
			t.Fatalf("after reload %d the site answers %q", round, body)
		}
	}
	closeIdle := func() { http.DefaultTransport.(*http.Transport).CloseIdleConnections() }

	out := runCaddyBinary(t, bin, config(0))
	waitForHTTP(t, site, out)
	// Warm up (a stream, an event, a reload), then take the baseline.
	ch, closeStream := openStream(t, admin+"/mux-webhook/events/stream", 0)
	waitForEvent(t, ch, site+"/mux", "warm-up")
	closeStream()
	reload(0)
	closeIdle()
	time.Sleep(time.Second) // the replaced admin server winds down
	baseline := goroutines(t, admin)

	refused := 0
	for round := 1; round <= rounds; round++ {
		for i := range clientsPerRound {
			addr := fmt.Sprintf("127.0.0.1:%d", adminPort)
			if i%2 == 1 {
				addr = fmt.Sprintf("127.0.0.1:%d", sitePort)
			}
			switch status := stalledStreamAfterReload(t, addr, "/mux-webhook/events/stream"); {
			case status == http.StatusServiceUnavailable && round > 1:
				refused++ // earlier rounds' stalled streams may hold slots until their deadline
			case status != http.StatusOK:
				t.Fatalf("round %d, stalled client %d: status %d", round, i, status)
			}
		}
		for i := range eventsPerRound {
			id := fmt.Sprintf("r%d-%d", round, i)
			if status, _, _ := do(t, signedRequest(t, site+"/mux", testSecret, largeEvent(id, eventSize), time.Now())); status != http.StatusNoContent {
				t.Fatalf("event %s: status %d", id, status)
			}
		}
		reload(round)
	}
	t.Logf("%d of %d stalled clients were refused (503) while earlier ones held slots", refused, rounds*clientsPerRound)

	// The stalled streams end within their write deadline.
	closeIdle()
	deadline := time.Now().Add(sseWriteTimeout + 30*time.Second)
	n := goroutines(t, admin)
	for n > baseline+goroutineSlack {
		if time.Now().After(deadline) {
			t.Fatalf("Caddy runs %d goroutines, %d before the stalled clients (slack %d): stalled streams are stuck", n, baseline, goroutineSlack)
		}
		time.Sleep(500 * time.Millisecond)
		n = goroutines(t, admin)
	}
	t.Logf("goroutines: %d before, %d after", baseline, n)

	// A new client gets new events, within seconds.
	ch, closeStream = openStream(t, admin+"/mux-webhook/events/stream", 0)
	waitForEvent(t, ch, site+"/mux", "after-stall")
	closeStream()

	// Every subscriber slot is free again: maxSubscribers streams open at
	// once (on both endpoints), and one more is refused.
	var wg sync.WaitGroup
	closers := make([]func(), maxSubscribers)
	var mu sync.Mutex
	var failures []string
	for i := range maxSubscribers {
		url := admin + "/mux-webhook/events/stream"
		if i%2 == 1 {
			url = site + "/mux-webhook/events/stream"
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := streamClient.Get(url)
			if err != nil {
				mu.Lock()
				failures = append(failures, err.Error())
				mu.Unlock()
				return
			}
			closers[i] = func() { resp.Body.Close() }
			if resp.StatusCode != http.StatusOK {
				mu.Lock()
				failures = append(failures, fmt.Sprintf("stream %d: %d", i, resp.StatusCode))
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	defer func() {
		for _, c := range closers {
			if c != nil {
				c()
			}
		}
	}()
	if len(failures) > 0 {
		t.Fatalf("with the stalled clients gone, %d of %d streams could not open: %v", len(failures), maxSubscribers, failures)
	}
	resp, err := streamClient.Get(admin + "/mux-webhook/events/stream")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("stream %d: %d, want 503", maxSubscribers+1, resp.StatusCode)
	}
}
