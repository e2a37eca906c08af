//go:build e2e

package muxwebhook

// Rows of the README's "When things fail" table, each against a real Caddy
// process (the xcaddy-built binary, $MUX_CADDY_BIN), with real upstreams
// on 127.0.0.1: what was lost (nothing), what was repeated, and what the
// operator saw (status, log line, metric).

import (
	"bufio"
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

	"github.com/caddy-mux-webhook/caddy-mux-webhook/internal/testwait"
)

// TestFaultUpstreamDiesMidResponse: with dedupe, the upstream dies after
// sending its headers, reverse_proxy aborts the response (a panic with
// http.ErrAbortHandler). The request is logged and counted, the id is not
// left in flight: Mux's retry is delivered, the next one is a duplicate.
func TestFaultUpstreamDiesMidResponse(t *testing.T) {
	t.Parallel() // its own processes and ports
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
	testwait.For(t, count, func() string {
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
	t.Parallel() // its own processes and ports
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
	testwait.For(t, func() bool {
		for _, l := range g.logLines("mux webhook") {
			if l["reason"] == "body_timeout" && l["status"] == float64(408) && l["level"] == "warn" {
				return true
			}
		}
		return false
	}, func() string { return "no WARN log line with reason body_timeout:\n" + g.out.String() })
}
