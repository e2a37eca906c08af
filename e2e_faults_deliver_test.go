//go:build e2e

package muxwebhook

// The delivery queue's rows of the README's "When things fail", against the
// real Caddy process.

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/internal/testwait"
	"github.com/caddy-mux-webhook/caddy-mux-webhook/queue"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// TestFaultKilledWhileDelivering: Caddy is killed (SIGKILL) with events
// queued and being attempted against a backend that is down; after a
// restart on the same queue, every event that was answered 202 is
// delivered at least once (repeats are counted, not forbidden); one that
// was being attempted when Caddy died comes back after the destination's
// timeout.
func TestFaultKilledWhileDelivering(t *testing.T) {
	t.Parallel() // its own processes and ports
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
		cfg := fmt.Sprintf(`%s
http://127.0.0.1:%d {
	mux_webhook %s
	mux_deliver app
}
`, testGlobals{extra: fmt.Sprintf("\tmux_webhook {\n\t\tqueue {\n\t\t\tdir %s\n\t\t}\n\t\tdestination app %s {\n\t\t\tretry 200ms\n\t\t\ttimeout 2s\n\t\t}\n\t}", queueDir, backend.URL)}, port, testSecret)
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
	// Attempts are made (and fail) before the kill: 10 of them, when the
	// destination's breaker (the default, 10 failures in a row) trips.
	testwait.For(t, func() bool { return attempts.Load() >= queue.DefaultBreakerFailures }, func() string {
		return fmt.Sprintf("the backend saw %d attempts", attempts.Load())
	})
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

// TestFaultQueueUnreachable: with an external NATS server, events are
// queued and delivered; when the server dies, mux_deliver answers 503
// within enqueue_timeout (Mux retries), and says so in an ERROR line.
func TestFaultQueueUnreachable(t *testing.T) {
	natsURL, nats := natsServer(t)
	var got atomic.Int32
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { got.Add(1) }))
	t.Cleanup(app.Close)
	cfg, g2 := gatewayOnExternalNATS(t, natsURL, app.URL)
	g2.load(cfg)
	if status, _, _ := do(t, signedRequest(t, g2.url, testSecret, event("video.asset.ready", "ext-1", ""), time.Now())); status != http.StatusAccepted {
		t.Fatalf("with NATS up: %d, want 202", status)
	}
	testwait.For(t, func() bool { return got.Load() == 1 }, func() string { return "the event never reached the destination" })

	if err := nats.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = nats.Wait()
	unavailable := muxMetrics.enqueueFails.WithLabelValues("app", "unavailable")
	before := testutil.ToFloat64(unavailable)
	start := time.Now()
	status, _, _ := do(t, signedRequest(t, g2.url, testSecret, event("video.asset.ready", "ext-2", ""), time.Now()))
	took := time.Since(start)
	if status != http.StatusServiceUnavailable {
		t.Fatalf("with NATS down: %d, want 503", status)
	}
	if took > 5*time.Second {
		t.Errorf("503 after %s; enqueue_timeout is 1s", took)
	}
	if d := testutil.ToFloat64(unavailable) - before; d != 1 {
		t.Errorf(`enqueue_failures_total{destination="app",reason="unavailable"} grew by %v, want 1`, d)
	}
	found := false
	for _, l := range g2.logLines() {
		found = found || l["msg"] == "mux_deliver: could not queue the event; answering 503 so that Mux retries" && l["level"] == "error"
	}
	if !found {
		t.Error("no ERROR line for the event that could not be queued")
	}
}

// TestFaultReloadWhileQueueUnreachable: with the external NATS server
// down, a reload that leaves the queue and its destinations as they were
// needs nothing from NATS: it must not wait for it (the admin API's
// /load would hang, and Caddy with it).
func TestFaultReloadWhileQueueUnreachable(t *testing.T) {
	natsURL, nats := natsServer(t)
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	t.Cleanup(app.Close)
	cfg, g := gatewayOnExternalNATS(t, natsURL, app.URL)
	g.load(cfg)
	if err := nats.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = nats.Wait()
	start := time.Now()
	err := loadCaddyfile(cfg)
	took := time.Since(start)
	t.Logf("reload with NATS down: %v in %v", err, took.Round(time.Millisecond))
	if err != nil {
		t.Fatalf("reload with NATS down, nothing changed: %v", err)
	}
	if took > 10*time.Second {
		t.Errorf("a reload that changed nothing of the queue took %v with NATS down", took.Round(time.Millisecond))
	}
}

// TestFaultRolledBackReloadWhileQueueUnreachable: with the external NATS
// server down, a reload that Caddy rolls back (another app fails to
// start) and that changed nothing of the queue puts nothing back, so it
// does not wait for NATS either.
func TestFaultRolledBackReloadWhileQueueUnreachable(t *testing.T) {
	natsURL, nats := natsServer(t)
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	t.Cleanup(app.Close)
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	cfg, g := gatewayOnExternalNATS(t, natsURL, app.URL)
	g.load(cfg)
	if err := nats.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = nats.Wait()
	failing := cfg + fmt.Sprintf("\nhttp://%s {\n\trespond 204\n}\n", busy.Addr())
	for i := range 4 { // Caddy starts apps in map order: the mux_webhook app first in some
		start := time.Now()
		err := loadCaddyfile(failing)
		took := time.Since(start)
		if err == nil {
			t.Fatalf("reload %d on a busy port succeeded", i+1)
		}
		if took > 10*time.Second {
			t.Fatalf("reload %d, rolled back with NATS down, took %v", i+1, took.Round(time.Millisecond))
		}
	}
}

// TestMuxDeliverReloadRotatesNATSPassword: the NATS server's password is
// changed (its process restarted with the new one) and so is the file the
// gateway reads it from ({file.*}); a Caddy reload of the same config
// text connects with the new password, and events are queued and
// delivered again.
func TestMuxDeliverReloadRotatesNATSPassword(t *testing.T) {
	dir := t.TempDir()
	port := freePort(t)
	startNATS := func(password string) *exec.Cmd {
		t.Helper()
		return natsServerWithConfig(t, dir, fmt.Sprintf("127.0.0.1:%d", port),
			fmt.Sprintf("listen: 127.0.0.1:%d\njetstream { store_dir: %q }\nauthorization { user: mux, password: %q }\n",
				port, filepath.Join(dir, "store"), password))
	}
	nats := startNATS("first-password")
	passwordFile := filepath.Join(dir, "nats-password")
	if err := os.WriteFile(passwordFile, []byte("first-password"), 0o600); err != nil {
		t.Fatal(err)
	}
	app := newUpstream(t, "app")
	cfg, g := gatewayConfigWith(t, "off",
		fmt.Sprintf("\tmux_webhook {\n\t\tqueue {\n\t\t\tnats nats://127.0.0.1:%d {\n\t\t\t\tuser mux\n\t\t\t\tpassword {file.%s}\n\t\t\t}\n"+
			"\t\t\tenqueue_timeout 1s\n\t\t}\n\t\tdestination app %s\n\t}", port, passwordFile, app.URL),
		fmt.Sprintf("mux_webhook %s\n\tmux_deliver app", testSecret))
	g.load(cfg)
	sendQueued(t, g, app, "nats-password-1", 1)

	if err := nats.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = nats.Wait()
	startNATS("second-password")
	if err := os.WriteFile(passwordFile, []byte("second-password"), 0o600); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := loadCaddyfile(cfg); err != nil { // forced: the config text is the same
		t.Fatal(err)
	}
	t.Logf("reload: %v", time.Since(start).Round(time.Millisecond))
	sendQueued(t, g, app, "nats-password-2", 2)
	t.Logf("reload and delivery: %v", time.Since(start).Round(time.Millisecond))
	for _, l := range g.logLines() {
		if strings.Contains(fmt.Sprint(l), "second-password") || strings.Contains(fmt.Sprint(l), "first-password") {
			t.Errorf("a password in a log line: %v", l)
		}
	}
}

// TestRolledBackCredentialReloadRestoresTheQueue: a reload that changes
// the NATS user (so it opens a store of its own on the same stream), the
// stream's max_bytes and a destination's timeout, and that Caddy rolls
// back (its http app fails), leaves the stream's limit and the consumer's
// ack deadline as the running config has them.
func TestRolledBackCredentialReloadRestoresTheQueue(t *testing.T) {
	dir := t.TempDir()
	port, monitor := freePort(t), freePort(t)
	natsServerWithConfig(t, dir, fmt.Sprintf("127.0.0.1:%d", port),
		fmt.Sprintf("listen: 127.0.0.1:%d\nhttp: 127.0.0.1:%d\njetstream { store_dir: %q }\n"+
			"authorization { users = [ { user: first, password: first-pw }, { user: second, password: second-pw } ] }\n",
			port, monitor, filepath.Join(dir, "store")))
	url := fmt.Sprintf("nats://127.0.0.1:%d", port)
	app := newUpstream(t, "app")
	global := func(user, maxBytes, timeout string) string {
		return fmt.Sprintf("\tmux_webhook {\n\t\tqueue {\n\t\t\tnats %s {\n\t\t\t\tuser %s\n\t\t\t\tpassword %s-pw\n\t\t\t}\n"+
			"\t\t\tmax_bytes %s\n\t\t}\n\t\tdestination app %s {\n\t\t\ttimeout %s\n\t\t}\n\t}", url, user, user, maxBytes, app.URL, timeout)
	}
	site := fmt.Sprintf("mux_webhook %s\n\tmux_deliver app", testSecret)
	cfg, g := gatewayConfigWith(t, "off", global("first", "64MiB", "30s"), site)
	g.load(cfg)
	rolledBackReloads(t, strings.Replace(cfg, global("first", "64MiB", "30s"), global("second", "16KiB", "1s"), 1), 16)
	// The premise: some failed config's queue started (connected as
	// second) and changed the stream before Caddy rolled it back.
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/connz?state=closed&auth=true", monitor))
	if err != nil {
		t.Fatal(err)
	}
	type conn struct {
		User string `json:"authorized_user"`
	}
	var connz struct {
		Conns []conn `json:"connections"`
	}
	err = json.NewDecoder(resp.Body).Decode(&connz)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(connz.Conns, func(c conn) bool { return c.User == "second" }) {
		t.Fatalf("in 16 rolled-back reloads the mux_webhook app never started (no connection as second): nothing was tested; closed connections: %+v", connz.Conns)
	}

	nc, err := nats.Connect(url, nats.UserInfo("first", "first-pw"))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := js.Stream(ctx, queue.DefaultStream+"_0")
	if err != nil {
		t.Fatal(err)
	}
	if got := stream.CachedInfo().Config.MaxBytes; got != 64<<20 {
		t.Errorf("after rolled-back reloads the stream's max_bytes is %d, want the running config's %d", got, 64<<20)
	}
	cons, err := js.Consumer(ctx, queue.DefaultStream+"_0", "deliver_app")
	if err != nil {
		t.Fatal(err)
	}
	if got := cons.CachedInfo().Config.AckWait; got != 35*time.Second {
		t.Errorf("after rolled-back reloads the consumer's ack wait is %v, want the running config's 35s (timeout 30s + 5s)", got)
	}
	status, _, _ := doAfterReload(t, func() *http.Request {
		return signedRequest(t, g.url, testSecret, event("video.asset.ready", "after-rollback", ""), time.Now())
	})
	if status != http.StatusAccepted {
		t.Errorf("after rolled-back reloads: %d, want 202", status)
	}
}
