package muxwebhook

// The live log's event stream (admin.go) with a client that stops reading:
// its stream ends within seconds (write deadline per event). Linux only: the
// stalled clients shrink their TCP buffers with Linux socket options.

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// stalledStream opens the event stream at path on addr (host:port) over a
// raw TCP connection that reads the response head (so that the test knows
// the stream is subscribed) and then never reads again. Its receive buffer
// is small (SO_RCVBUF) and so are its segments (TCP_MAXSEG, which on
// loopback also keeps the server's send buffer small): a few large events
// fill both and block the server's writes. It returns the response's
// status; the connection is closed when the test ends.
func stalledStream(t *testing.T, addr, path string) int {
	t.Helper()
	status, _ := stalledStreamOnce(t, addr, path, false)
	return status
}

// stalledStreamAfterReload is stalledStream for a client that comes while
// Caddy reloads: a connection that ends before any byte of an answer is
// dialled again (at most twice), since the admin server a reload replaces
// closes the connections it accepted while shutting down, and a browser's
// EventSource reconnects too. That is Caddy's swap of its admin server,
// not a stalled stream.
func stalledStreamAfterReload(t *testing.T, addr, path string) int {
	t.Helper()
	for try := 1; ; try++ {
		status, dropped := stalledStreamOnce(t, addr, path, try < 3)
		if !dropped {
			return status
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// stalledStreamOnce is one try of stalledStream; dropped says the
// connection ended before any byte arrived, and mayDrop allowed that.
func stalledStreamOnce(t *testing.T, addr, path string, mayDrop bool) (status int, dropped bool) {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second, Control: func(_, _ string, c syscall.RawConn) error {
		var err error
		if cerr := c.Control(func(fd uintptr) {
			err = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096)
			if err == nil {
				err = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_MAXSEG, 536)
			}
		}); cerr != nil {
			return cerr
		}
		return err
	}}
	conn, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if _, err := fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n\r\n", path, addr); err != nil {
		t.Fatal(err)
	}
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	var head []byte
	buf := make([]byte, 512)
	for len(head) < 16<<10 {
		n, err := conn.Read(buf)
		head = append(head, buf[:n]...)
		if status == 0 && bytes.Contains(head, []byte("\r\n\r\n")) {
			f := strings.Fields(string(head[:bytes.IndexByte(head, '\n')]))
			if len(f) < 2 {
				t.Fatalf("stream %s: response %q", path, head)
			}
			status, _ = strconv.Atoi(f[1])
		}
		if status != 0 && (status != http.StatusOK || bytes.Contains(head, []byte("live log\n\n"))) {
			return status, false // and never read again
		}
		if err == io.EOF && len(head) == 0 && mayDrop {
			t.Logf("stream %s: the connection ended before an answer; dialling again", path)
			return 0, true
		}
		if err != nil {
			t.Fatalf("stream %s: %v after %q", path, err, head)
		}
	}
	t.Fatalf("stream %s: no response head in %d bytes", path, len(head))
	return 0, false
}

// streamClient opens event streams; its Get returns once the head arrived.
var streamClient = &http.Client{Transport: &http.Transport{ResponseHeaderTimeout: 10 * time.Second, DisableKeepAlives: true}}

// openStream opens the event stream at url, waiting up to wait while it is
// refused with 503 (all subscriber slots taken); it fails the test if the
// stream cannot be opened by then.
func openStream(t *testing.T, url string, wait time.Duration) (<-chan sseEvent, func()) {
	t.Helper()
	deadline := time.Now().Add(wait)
	for {
		resp, err := streamClient.Get(url)
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode == http.StatusOK {
			return sseEvents(resp.Body), func() { resp.Body.Close() }
		}
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<10))
		resp.Body.Close()
		if resp.StatusCode != http.StatusServiceUnavailable || time.Now().After(deadline) {
			t.Fatalf("a new stream client still gets %d %q after %s", resp.StatusCode, bytes.TrimSpace(body), wait)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// largeEvent is a signed-able event of about size bytes.
func largeEvent(id string, size int) []byte {
	return event("video.asset.ready", id, `{"passthrough":"`+strings.Repeat("p", size)+`"}`)
}

// waitForEvent sends an event with id to gateway and waits (10 s) until
// ch streams it.
func waitForEvent(t *testing.T, ch <-chan sseEvent, gateway, id string) {
	t.Helper()
	if status, _, _ := do(t, signedRequest(t, gateway, testSecret, event("video.asset.ready", id, ""), time.Now())); status != http.StatusNoContent {
		t.Fatalf("event %s: status %d", id, status)
	}
	for {
		ev, ok := nextSSE(t, ch)
		if !ok {
			t.Fatalf("the stream ended before event %s", id)
		}
		if ev.name == "request" && strings.Contains(ev.data, `"id":"`+id+`"`) {
			return
		}
	}
}

const stallSite = `
	mux_webhook /mux %s
	handle /mux {
		respond 204
	}
	handle_path /mux-webhook/* {
		mux_webhook_ui
	}
	handle {
		respond "round %d"
	}`

// TestLiveLogStalledStreamsEnd: maxSubscribers stream clients (on the
// admin API and on mux_webhook_ui) stop reading while large events flow.
// Each write has a deadline, so their streams end and free their slots: a
// new client gets a stream and its events. (Without the deadline they
// blocked in Write for ever, and every new client got 503.)
func TestLiveLogStalledStreamsEnd(t *testing.T) {
	g := startGatewayWithAdmin(t, "\tmux_webhook {\n\t\tlog_size 50\n\t\tlog_body 64KiB\n\t}", fmt.Sprintf(stallSite, testSecret, 0))
	adminAddr, siteAddr := strings.TrimPrefix(g.admin, "http://"), strings.TrimPrefix(g.url, "http://")
	for i := range maxSubscribers {
		addr := adminAddr
		if i%2 == 1 {
			addr = siteAddr
		}
		if status := stalledStream(t, addr, "/mux-webhook/events/stream"); status != http.StatusOK {
			t.Fatalf("stalled client %d: status %d, want 200", i, status)
		}
	}
	if status := stalledStream(t, adminAddr, "/mux-webhook/events/stream"); status != http.StatusServiceUnavailable {
		t.Fatalf("client %d: status %d, want 503 (all slots taken)", maxSubscribers+1, status)
	}
	for i := range 10 {
		if status, _, _ := do(t, signedRequest(t, g.url+"/mux", testSecret, largeEvent(fmt.Sprint("big-", i), 60<<10), time.Now())); status != http.StatusNoContent {
			t.Fatalf("event %d: status %d", i, status)
		}
	}
	// The stalled streams end sseWriteTimeout after their buffers filled.
	ch, closeStream := openStream(t, g.admin+"/mux-webhook/events/stream", sseWriteTimeout+20*time.Second)
	defer closeStream()
	waitForEvent(t, ch, g.url+"/mux", "after-stall")
	uiCh, closeUI := openStream(t, g.url+"/mux-webhook/events/stream", 10*time.Second)
	defer closeUI()
	waitForEvent(t, uiCh, g.url+"/mux", "after-stall-ui")
}

// goroutines reads the total from the admin API's goroutine profile.
func goroutines(t *testing.T, admin string) int {
	t.Helper()
	resp, err := (&http.Client{Timeout: 10 * time.Second}).Get(admin + "/debug/pprof/goroutine?debug=1")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	line, _ := bufio.NewReader(resp.Body).ReadString('\n')
	n, err := strconv.Atoi(strings.TrimSpace(strings.TrimPrefix(line, "goroutine profile: total ")))
	if resp.StatusCode != http.StatusOK || err != nil {
		t.Fatalf("goroutine profile: %d %q", resp.StatusCode, line)
	}
	return n
}

// TestLiveLogStalledStreamsEndWhenQuiet: with nothing logged, a stalled
// client's socket buffers never fill and no write deadline fires; every
// stream still ends after sseMaxLifetime, so the slots come free.
func TestLiveLogStalledStreamsEndWhenQuiet(t *testing.T) {
	defer func(d time.Duration) { sseMaxLifetime = d }(sseMaxLifetime)
	sseMaxLifetime = 2 * time.Second
	g := startGatewayWithAdmin(t, "", fmt.Sprintf(stallSite, testSecret, 0))
	adminAddr := strings.TrimPrefix(g.admin, "http://")
	for i := range maxSubscribers {
		if status := stalledStream(t, adminAddr, "/mux-webhook/events/stream"); status != http.StatusOK {
			t.Fatalf("stalled client %d: status %d, want 200", i, status)
		}
	}
	if status := stalledStream(t, adminAddr, "/mux-webhook/events/stream"); status != http.StatusServiceUnavailable {
		t.Fatalf("client %d: status %d, want 503 (all slots taken)", maxSubscribers+1, status)
	}
	// No event is sent: the slots come free by the streams' lifetime alone.
	ch, closeStream := openStream(t, g.admin+"/mux-webhook/events/stream", 10*time.Second)
	defer closeStream()
	waitForEvent(t, ch, g.url+"/mux", "after-quiet-stall")
}
