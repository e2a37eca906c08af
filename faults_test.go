package muxwebhook

// Rows of the README's "When things fail" table, each against a real Caddy
// process (the xcaddy-built binary, $MUX_CADDY_BIN), with real upstreams
// on 127.0.0.1: what was lost (nothing), what was repeated, and what the
// operator saw (status, log line, metric).

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// binaryGateway is a Caddy process running one site.
type binaryGateway struct {
	base, admin string
	out         *syncBuffer
}

// startBinaryGateway runs the built binary with the admin API on a free
// port, JSON logs on its output and the given global options and site.
func startBinaryGateway(t *testing.T, storage, global, site string) *binaryGateway {
	t.Helper()
	bin := caddyBinary(t)
	port, adminPort := freePort(t), freePort(t)
	if storage == "" {
		storage = t.TempDir()
	}
	cfg := fmt.Sprintf(`{
	admin 127.0.0.1:%d
	auto_https off
	persist_config off
	default_bind 127.0.0.1
	storage file_system %s
	log {
		format json
	}
%s
}

http://127.0.0.1:%d {
%s
}
`, adminPort, storage, global, port, site)
	g := &binaryGateway{
		base:  fmt.Sprintf("http://127.0.0.1:%d", port),
		admin: fmt.Sprintf("http://127.0.0.1:%d", adminPort),
	}
	g.out = runCaddyBinary(t, bin, cfg)
	waitForHTTP(t, g.admin+"/config", g.out)
	return g
}

// logLines returns the process's JSON log lines with the given message.
func (g *binaryGateway) logLines(msg string) []map[string]any {
	var out []map[string]any
	sc := bufio.NewScanner(strings.NewReader(g.out.String()))
	sc.Buffer(make([]byte, 0, 64<<10), 4<<20)
	for sc.Scan() {
		var m map[string]any
		if json.Unmarshal(sc.Bytes(), &m) == nil && m["msg"] == msg {
			out = append(out, m)
		}
	}
	return out
}

// heapAlloc reads the process's live heap from the admin API's expvars.
func (g *binaryGateway) heapAlloc(t *testing.T) uint64 {
	t.Helper()
	var vars struct {
		Memstats struct{ HeapAlloc uint64 } `json:"memstats"`
	}
	if status := getJSON(t, g.admin+"/debug/vars", &vars); status != 200 {
		t.Fatalf("/debug/vars: %d", status)
	}
	return vars.Memstats.HeapAlloc
}

// TestFaultUpstreamDiesMidResponse: with dedupe, the upstream dies after
// sending its headers, reverse_proxy aborts the response (a panic with
// http.ErrAbortHandler). The request is logged and counted, the id is not
// left in flight: Mux's retry is delivered, the next one is a duplicate.
func TestFaultUpstreamDiesMidResponse(t *testing.T) {
	var calls atomic.Int32
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if calls.Add(1) == 1 {
			conn, buf, err := http.NewResponseController(w).Hijack()
			if err != nil {
				t.Error(err)
				return
			}
			buf.WriteString("HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial")
			buf.Flush()
			conn.Close()
			return
		}
		fmt.Fprint(w, "delivered")
	}))
	t.Cleanup(up.Close)
	g := startBinaryGateway(t, "", "", fmt.Sprintf(`
	mux_webhook %s {
		dedupe
	}
	reverse_proxy %s`, testSecret, strings.TrimPrefix(up.URL, "http://")))

	body := event("video.asset.ready", "dies-1", "")
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := client.Do(signedRequest(t, g.base, testSecret, body, time.Now()))
	if err == nil {
		_, err = io.ReadAll(resp.Body)
		resp.Body.Close()
	}
	if err == nil {
		t.Fatal("the response of the dying upstream arrived whole; the test did not make reverse_proxy abort")
	}
	for i, want := range []string{"delivered", ""} {
		status, _, got := do(t, signedRequest(t, g.base, testSecret, body, time.Now()))
		if status != 200 || got != want {
			t.Fatalf("Mux's retry %d: %d %q, want 200 %q (409 means the id stayed in flight)", i+1, status, got, want)
		}
	}
	if n := calls.Load(); n != 2 {
		t.Fatalf("upstream called %d times, want 2 (the aborted attempt and the retry)", n)
	}
	// The log lines reach the test through a pipe: wait for them. At the
	// default level (INFO) the aborted attempt is a WARN line; the
	// delivered retry and the duplicate are DEBUG lines (counted below,
	// in the metrics).
	var aborted, others int
	count := func() bool {
		aborted, others = 0, 0
		for _, l := range g.logLines("mux webhook") {
			if l["id"] != "dies-1" {
				continue
			}
			if l["aborted"] == true && l["outcome"] == "verified" && l["level"] == "warn" {
				aborted++
			} else {
				others++
			}
		}
		return aborted == 1
	}
	waitFor(t, count, func() string {
		return fmt.Sprintf("log lines: %d aborted, want 1\n%s", aborted, g.out.String())
	})
	if others != 0 {
		t.Errorf("%d lines other than the aborted attempt's at INFO", others)
	}
	m := scrape(t, g.admin)
	if m[`caddy_mux_webhook_requests_total{outcome="verified"}`] != 2 || m[`caddy_mux_webhook_requests_total{outcome="duplicate"}`] != 1 ||
		m[`caddy_mux_webhook_requests_total{outcome="in_flight"}`] != 0 {
		t.Errorf("metrics: %v", m)
	}
}

// TestFaultClaimedContentLength: 200 connections claim max_body with a
// well-formed but forged signature and send nothing. Memory follows what
// arrived, not the claims (before the fix: 200 MiB); then each is cut at
// body_timeout with 408, and genuine events still flow.
func TestFaultClaimedContentLength(t *testing.T) {
	up := newUpstream(t, "app")
	g := startBinaryGateway(t, "", "", fmt.Sprintf(`
	mux_webhook %s {
		body_timeout 4s
	}
	reverse_proxy %s`, testSecret, up.hostPort()))
	const conns, claim = 200, DefaultMaxBody
	// Warm up, then the baseline.
	do(t, signedRequest(t, g.base, testSecret, event("video.asset.ready", "warm", ""), time.Now()))
	before := g.heapAlloc(t)

	forged := fmt.Sprintf("t=%d,v1=%s", time.Now().Unix(), strings.Repeat("ab", 32))
	addr := strings.TrimPrefix(g.base, "http://")
	open := make([]net.Conn, 0, conns)
	t.Cleanup(func() {
		for _, c := range open {
			c.Close()
		}
	})
	for range conns {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		open = append(open, c)
		fmt.Fprintf(c, "POST / HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\nMux-Signature: %s\r\n\r\n", addr, claim, forged)
	}
	time.Sleep(time.Second) // every handler is now waiting for its body
	during := g.heapAlloc(t)
	grown := int64(during) - int64(before)
	t.Logf("heap %0.1f MiB before, %0.1f MiB with %d connections claiming %d KiB each (%.0f MiB claimed)",
		float64(before)/(1<<20), float64(during)/(1<<20), conns, claim>>10, float64(conns*claim)/(1<<20))
	if grown > conns*claim/8 {
		t.Errorf("heap grew by %.1f MiB for %d idle claims of %d KiB: memory follows the claim", float64(grown)/(1<<20), conns, claim>>10)
	}

	// Genuine events still flow.
	if status, _, _ := do(t, signedRequest(t, g.base, testSecret, event("video.asset.ready", "during", ""), time.Now())); status != 200 {
		t.Errorf("a genuine event during the flood: %d", status)
	}
	// Each claim is cut at body_timeout with 408.
	var timedOut atomic.Int32
	var wg sync.WaitGroup
	for _, c := range open {
		wg.Go(func() {
			_ = c.SetReadDeadline(time.Now().Add(15 * time.Second))
			if resp, err := http.ReadResponse(bufio.NewReader(c), nil); err == nil && resp.StatusCode == http.StatusRequestTimeout {
				timedOut.Add(1)
			}
		})
	}
	wg.Wait()
	if n := timedOut.Load(); n != conns {
		t.Errorf("%d of %d idle claims answered 408", n, conns)
	}
	if n := len(up.requests()); n != 2 {
		t.Errorf("upstream got %d requests, want the 2 genuine ones", n)
	}
	if n := scrape(t, g.admin)[`caddy_mux_webhook_requests_total{outcome="body_timeout"}`]; n != conns {
		t.Errorf("body_timeout counted %v times, want %d", n, conns)
	}
}

// TestFaultSlowBody: a genuine event whose body trickles in slower than
// body_timeout is answered 408; nothing is forwarded; the operator sees a
// WARN line with reason body_timeout.
func TestFaultSlowBody(t *testing.T) {
	up := newUpstream(t, "app")
	g := startBinaryGateway(t, "", "", fmt.Sprintf(`
	mux_webhook %s {
		body_timeout 1s
	}
	reverse_proxy %s`, testSecret, up.hostPort()))
	body := event("video.asset.ready", "slow-2", "")
	sig := signedRequest(t, g.base, testSecret, body, time.Now()).Header.Get(SignatureHeader)
	addr := strings.TrimPrefix(g.base, "http://")
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "POST / HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\nMux-Signature: %s\r\n\r\n", addr, len(body), sig)
	answered := make(chan *http.Response, 1)
	go func() {
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		resp, _ := http.ReadResponse(bufio.NewReader(c), nil)
		answered <- resp
	}()
	start := time.Now()
	var resp *http.Response
trickle:
	for i := range body[:20] { // a byte every 200ms: 4s for 20 bytes
		if _, err := c.Write(body[i : i+1]); err != nil {
			break
		}
		select {
		case resp = <-answered:
			break trickle
		case <-time.After(200 * time.Millisecond):
		}
	}
	if resp == nil {
		resp = <-answered
	}
	if resp == nil || resp.StatusCode != http.StatusRequestTimeout {
		t.Fatalf("slow body: %v, want 408", resp)
	}
	t.Logf("408 after %s", time.Since(start).Round(time.Millisecond))
	if n := len(up.requests()); n != 0 {
		t.Fatalf("upstream got %d requests", n)
	}
	waitFor(t, func() bool {
		for _, l := range g.logLines("mux webhook") {
			if l["reason"] == "body_timeout" && l["status"] == float64(408) && l["level"] == "warn" {
				return true
			}
		}
		return false
	}, func() string { return "no WARN log line with reason body_timeout:\n" + g.out.String() })
}

// TestFaultDedupeRaceAcrossInstances: two Caddy processes share storage
// with `dedupe { storage }`; each of many ids arrives at both at once,
// twice each. The route runs once per id; the others get 409 (Mux
// retries them, then gets 200).
func TestFaultDedupeRaceAcrossInstances(t *testing.T) {
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
