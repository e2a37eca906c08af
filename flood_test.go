package muxwebhook

import (
	"bytes"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestFloodOfForgeries sends forged requests with bodies at and over the
// size limit from many connections while genuine events flow: every
// genuine event is delivered, and nothing forged reaches the upstream.
// Bounded in time (3 s) and count (16 connections).
func TestFloodOfForgeries(t *testing.T) {
	up := newUpstream(t, "app")
	g := startGateway(t, fmt.Sprintf(`
	mux_webhook %s {
		max_body 64KiB
	}
	reverse_proxy %s`, testSecret, up.hostPort()))

	atLimit := bytes.Repeat([]byte("x"), 64<<10)
	overLimit := bytes.Repeat([]byte("y"), 64<<10+1)
	forgedSig := "t=" + fmt.Sprint(time.Now().Unix()) + ",v1=" + strings.Repeat("0", 64)
	deadline := time.Now().Add(3 * time.Second)
	var forged, wrongStatus atomic.Int64
	var wg sync.WaitGroup
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 16}}
	t.Cleanup(client.CloseIdleConnections)
	for i := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; n < 10000 && time.Now().Before(deadline); n++ {
				body, want := atLimit, http.StatusUnauthorized
				if (i+n)%4 == 0 {
					body, want = overLimit, http.StatusRequestEntityTooLarge
				}
				req, _ := http.NewRequest(http.MethodPost, g.url, bytes.NewReader(body))
				req.Header.Set("Mux-Signature", forgedSig)
				resp, err := client.Do(req)
				if err != nil {
					continue // the server may close a connection it refused a body on
				}
				resp.Body.Close()
				forged.Add(1)
				if resp.StatusCode != want {
					wrongStatus.Add(1)
				}
			}
		}()
	}
	genuine := 0
	for i := 0; time.Now().Before(deadline) && i < 200; i++ {
		status, _, _ := do(t, signedRequest(t, g.url, testSecret, event("video.asset.ready", fmt.Sprintf("flood-%d", i), ""), time.Now()))
		if status != http.StatusOK {
			t.Errorf("genuine event %d during the flood: %d", i, status)
		}
		genuine++
	}
	wg.Wait()
	if genuine < 5 || forged.Load() < 50 {
		t.Fatalf("too little traffic to mean anything: %d genuine, %d forged", genuine, forged.Load())
	}
	if n := wrongStatus.Load(); n > 0 {
		t.Errorf("%d forged requests got an unexpected status", n)
	}
	if got := len(up.requests()); got != genuine {
		t.Errorf("upstream received %d requests, want exactly the %d genuine ones", got, genuine)
	}
	t.Logf("%d genuine events delivered during %d forged requests", genuine, forged.Load())
}
