//go:build e2e

package muxwebhook

// Real processes for the store of #18: two Caddy processes on one queue
// dir (the second refused, the lock dying with its holder), and the same
// event id at two gateways of a cluster at the same instant.

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/internal/testwait"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// lockGateway runs the built binary with an embedded queue in dir and one
// destination, and returns its URLs, output and process.
func lockGateway(t *testing.T, dir, backend string) (base, admin string, out *syncBuffer, cmd *exec.Cmd) {
	t.Helper()
	port, adminPort := freePort(t), freePort(t)
	// timeout 5s: a copy the killed process was attempting (or had handed
	// back, not yet on disk) is handed out again after timeout + 5s.
	cfg := queueGatewayConfig(adminPort, fmt.Sprintf("\tmux_webhook {\n\t\tqueue {\n\t\t\tdir %s\n\t\t}\n\t\tdestination app %s {\n\t\t\tretry 50ms\n\t\t\ttimeout 5s\n\t\t}\n\t}", dir, backend), port)
	home := t.TempDir()
	out, cmd = runCaddyIn(t, caddyBinary(t), cfg, home, home, nil)
	return fmt.Sprintf("http://127.0.0.1:%d", port), fmt.Sprintf("http://127.0.0.1:%d", adminPort), out, cmd
}

// TestFaultStoreDirTwoProcesses: a second Caddy process on the queue dir
// of a running one exits non-zero with an error naming the dir and the
// first's PID, and leaves the lock file naming the first; the first keeps
// accepting and delivers each event once. Events it cannot deliver yet
// stay queued when it is SIGKILLed; a new process on the dir then starts
// (the lock died with its holder) and delivers each of them once (events
// delivered just before the kill may come again: counted).
func TestFaultStoreDirTwoProcesses(t *testing.T) {
	t.Parallel() // its own processes and ports
	var failing atomic.Bool
	backend := newRecordingBackend(t, 0, func(string) bool { return failing.Load() })
	dir := filepath.Join(t.TempDir(), "shared-volume", "jetstream")
	base, admin, out, first := lockGateway(t, dir, backend.URL)
	waitQueueOpen(t, admin, out)
	lockFile := filepath.Join(dir, "mux_webhook.lock")
	holder, err := os.ReadFile(lockFile)
	if err != nil {
		t.Fatal(err)
	}

	_, _, out2, second := lockGateway(t, dir, backend.URL)
	exited := make(chan error, 1)
	go func() { exited <- second.Wait() }()
	select {
	case err := <-exited:
		if err == nil || second.ProcessState.ExitCode() == 0 {
			t.Errorf("the second process exited with %v; want a non-zero status", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("the second process on the same dir still runs after 30s:\n%s", tail(out2.String(), 4096))
	}
	pid := fmt.Sprintf("pid %d on host", first.Process.Pid)
	if s := out2.String(); !strings.Contains(s, "the store directory "+dir+" is in use by another process") || !strings.Contains(s, pid) {
		t.Errorf("the second process's output does not name the dir %s and %q:\n%s", dir, pid, tail(s, 4096))
	}
	if now, _ := os.ReadFile(lockFile); string(now) != string(holder) {
		t.Errorf("the lock file changed: %q, was %q", now, holder)
	}

	// The first carries on.
	client := &http.Client{Timeout: 10 * time.Second}
	const n = 20
	for i := range n {
		if status, err := postEvent(client, base, event("video.asset.ready", fmt.Sprint("first-", i), "")); status != http.StatusAccepted {
			t.Fatalf("first-%d: %d %v", i, status, err)
		}
	}
	testwait.For(t, func() bool { return len(backend.received()) == n }, func() string {
		return fmt.Sprintf("%d of %d delivered by the first process", len(backend.received()), n)
	})
	time.Sleep(300 * time.Millisecond) // nothing more arrives
	for id, times := range backend.received() {
		if times != 1 {
			t.Errorf("%s delivered %d times by the first process, want once", id, times)
		}
	}

	// Queued, not deliverable yet; then the first process is killed.
	failing.Store(true)
	for i := range n {
		if status, err := postEvent(client, base, event("video.asset.ready", fmt.Sprint("held-", i), "")); status != http.StatusAccepted {
			t.Fatalf("held-%d: %d %v", i, status, err)
		}
	}
	if err := first.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = first.Wait()
	failing.Store(false)

	_, admin3, out3, _ := lockGateway(t, dir, backend.URL)
	waitQueueOpen(t, admin3, out3)
	testwait.Until(t, 30*time.Second, func() bool { return len(backend.received()) == 2*n }, func() string {
		return fmt.Sprintf("%d of %d delivered after the restart:\n%s", len(backend.received()), 2*n, tail(out3.String(), 4096))
	})
	time.Sleep(300 * time.Millisecond) // nothing more arrives
	// Nothing lost; the held events, never delivered before, once each.
	// A copy the first process had delivered just before its SIGKILL may
	// come again (at least once: its settlement was not on disk yet):
	// counted, not a failure of the lock.
	repeated := 0
	for id, times := range backend.received() {
		switch {
		case strings.HasPrefix(id, "held-") && times != 1:
			t.Errorf("%s delivered %d times, want once", id, times)
		case times > 1:
			repeated++
		}
	}
	t.Logf("after SIGKILL and a restart on the dir: %d held events delivered once each; %d of the %d events delivered before the kill came again", n, repeated, n)
	if now, _ := os.ReadFile(lockFile); !strings.Contains(string(now), `"pid":`) || string(now) == string(holder) {
		t.Errorf("the lock file after the restart: %q; want the new holder", now)
	}
}

// TestClusterSameIDAtOnce: the same event id sent to both gateways of a
// cluster (replicas 3) at the same instant, 30 ids: JetStream may answer
// one of them "duplicate message id is in process" (10158), which the
// gateway waits out: every answer is 202, and each id is delivered once.
func TestClusterSameIDAtOnce(t *testing.T) {
	t.Parallel() // its own processes and ports
	c := startNATSCluster(t)
	backend := newRecordingBackend(t, 0, nil)
	gs := startClusterGateways(t, 2, clusterGlobal(c, "5s", backend.URL, "\t\t\tretry 100ms"))
	c.leaders("app")
	c.waitPulling("app", len(gs))

	client := &http.Client{Timeout: 10 * time.Second}
	const n = 30
	statuses := map[string]int{}
	for i := range n {
		body := event("video.asset.ready", "at-once-"+strconv.Itoa(i), "")
		start := make(chan struct{})
		var wg sync.WaitGroup
		got := make([]int, len(gs))
		for j, g := range gs {
			wg.Go(func() {
				<-start
				status, err := postEvent(client, g.url(), body)
				if err != nil {
					status = -1
				}
				got[j] = status
			})
		}
		close(start)
		wg.Wait()
		for j, status := range got {
			statuses[fmt.Sprintf("%s %d", gs[j].name, status)]++
			if status != http.StatusAccepted {
				t.Errorf("at-once-%d at %s: %d, want 202", i, gs[j].name, status)
			}
		}
	}
	t.Logf("answers: %v", statuses)
	testwait.Until(t, 30*time.Second, func() bool { return len(backend.received()) == n }, func() string {
		return fmt.Sprintf("%d of %d ids delivered", len(backend.received()), n)
	})
	time.Sleep(500 * time.Millisecond) // nothing more arrives
	for id, times := range backend.received() {
		if times != 1 {
			t.Errorf("%s delivered %d times, want once", id, times)
		}
	}
}

// TestQueueNATSMaxPayloadTooSmall: an external NATS server whose
// max_payload (2MB here) cannot hold an event of a handler's max_body
// (4MiB) and its headers is a load error naming max_payload, its value
// and the max_body; under max_body's default it loads.
func TestQueueNATSMaxPayloadTooSmall(t *testing.T) {
	dir := t.TempDir()
	port := freePort(t)
	url := fmt.Sprintf("nats://127.0.0.1:%d", port)
	natsServerWithConfig(t, dir, fmt.Sprintf("127.0.0.1:%d", port),
		fmt.Sprintf("listen: 127.0.0.1:%d\njetstream { store_dir: %q }\n", port, filepath.Join(dir, "store")))
	global := fmt.Sprintf("\tmux_webhook {\n\t\tqueue {\n\t\t\tnats %s\n\t\t}\n\t\tdestination app http://127.0.0.1:1\n\t}", url)
	cfg, _ := gatewayConfigWith(t, "off", global, fmt.Sprintf("mux_webhook %s\n\tmux_deliver app", testSecret))
	if err := loadCaddyfile(cfg); err != nil {
		t.Fatalf("max_body 1MiB on max_payload 2MB: %v", err)
	}
	if err := stopCaddy(); err != nil {
		t.Fatal(err)
	}
	big, _ := gatewayConfigWith(t, "off", global, fmt.Sprintf("mux_webhook %s {\n\t\tmax_body 4MiB\n\t}\n\tmux_deliver app", testSecret))
	err := loadCaddyfile(big)
	if err == nil {
		_ = stopCaddy()
		t.Fatal("max_body 4MiB on a NATS server with max_payload 2MB loaded")
	}
	for _, want := range []string{"max_payload is 2097152", "max_body 4194304", "max_payload: "} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("load error %q does not say %q", err, want)
		}
	}
}

// TestQueueSharedStreamNeverLowered: gateway A runs the shared stream with
// replicas 3 and max_bytes 64MiB on a three-node cluster; gateway B,
// started with replicas 1 and max_bytes 16MiB, logs a WARN naming each
// and leaves the stream at R3 and 64 MiB; its events are queued and
// delivered. A reload of B that raises max_bytes to 128MiB raises it.
func TestQueueSharedStreamNeverLowered(t *testing.T) {
	c := startNATSCluster(t)
	app := newUpstream(t, "app")
	global := func(replicas int, maxBytes string) string {
		return fmt.Sprintf("\tmux_webhook {\n\t\tqueue {\n\t\t\tnats %s {\n\t\t\t\treplicas %d\n\t\t\t}\n\t\t\tmax_bytes %s\n\t\t}\n"+
			"\t\tdestination app %s {\n\t\t\tretry 50ms\n\t\t}\n\t}", c.urls(), replicas, maxBytes, app.URL)
	}
	site := fmt.Sprintf("mux_webhook %s\n\tmux_deliver app", testSecret)
	cfgA, _ := gatewayConfigWith(t, "off", global(3, "64MiB"), site)
	if err := loadCaddyfile(cfgA); err != nil {
		t.Fatal(err)
	}
	if err := stopCaddy(); err != nil {
		t.Fatal(err)
	}
	streamInfo := func() jetstream.StreamConfig {
		t.Helper()
		nc, err := nats.Connect(strings.ReplaceAll(c.urls(), " ", ","))
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		js, _ := jetstream.New(nc)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		st, err := js.Stream(ctx, "MUX_WEBHOOK_0")
		if err != nil {
			t.Fatal(err)
		}
		return st.CachedInfo().Config
	}
	if sc := streamInfo(); sc.Replicas != 3 || sc.MaxBytes != 64<<20 {
		t.Fatalf("after A: %d replicas, max_bytes %d", sc.Replicas, sc.MaxBytes)
	}
	cfgB, g := gatewayConfigWith(t, "off", global(1, "16MiB"), site)
	g.load(cfgB)
	warned := map[string]map[string]any{}
	for _, l := range g.logLines() {
		if l["level"] == "warn" && strings.Contains(fmt.Sprint(l["msg"]), "lower than the shared stream's") {
			warned[fmt.Sprint(l["setting"])] = l
		}
	}
	if w := warned["replicas"]; w == nil || w["configured"] != "1" || w["running"] != "3" {
		t.Errorf("B's WARN for replicas: %v (all: %v)", w, warned)
	}
	if w := warned["max_bytes"]; w == nil || w["configured"] != fmt.Sprint(16<<20) || w["running"] != fmt.Sprint(64<<20) {
		t.Errorf("B's WARN for max_bytes: %v (all: %v)", w, warned)
	}
	if sc := streamInfo(); sc.Replicas != 3 || sc.MaxBytes != 64<<20 {
		t.Errorf("after B: %d replicas, max_bytes %d; want 3 and %d", sc.Replicas, sc.MaxBytes, 64<<20)
	}
	if status, _, got := do(t, signedRequest(t, g.url, testSecret, event("video.asset.ready", "shared-1", ""), time.Now())); status != http.StatusAccepted {
		t.Fatalf("B: %d %s", status, got)
	}
	testwait.For(t, func() bool { return len(app.requests()) >= 1 }, func() string { return "app got nothing from B" })
	if err := loadCaddyfile(strings.Replace(cfgB, global(1, "16MiB"), global(1, "128MiB"), 1)); err != nil {
		t.Fatal(err)
	}
	if sc := streamInfo(); sc.Replicas != 3 || sc.MaxBytes != 128<<20 {
		t.Errorf("after B's reload to 128MiB: %d replicas, max_bytes %d; want 3 and %d", sc.Replicas, sc.MaxBytes, 128<<20)
	}
}

// TestMuxDeliverSignVerifiedByBackend: a backend that verifies with the
// destination's secret using our own `caddy mux-webhook verify` accepts
// what sign produced; a destination signing with another secret is
// refused by it, retried and ends a dead letter.
func TestMuxDeliverSignVerifiedByBackend(t *testing.T) {
	bin := caddyBinary(t)
	const destSecret = "backend-only-secret"
	tmp := t.TempDir()
	var verified, refused atomic.Int32
	var n atomic.Int32
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		file := filepath.Join(tmp, fmt.Sprint("body-", n.Add(1)))
		if err := os.WriteFile(file, body, 0o600); err != nil {
			w.WriteHeader(http.StatusInternalServerError)
			return
		}
		cmd := exec.Command(bin, "mux-webhook", "verify", "--secret", destSecret, "--header", r.Header.Get(SignatureHeader), file)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Logf("verify refused %s: %v: %s", r.Header.Get("Mux-Webhook-Destination"), err, out)
			refused.Add(1)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		verified.Add(1)
	}))
	t.Cleanup(backend.Close)
	dir := filepath.Join(t.TempDir(), "js")
	g := startGatewayWithAdmin(t, deliverGlobal(dir,
		fmt.Sprintf("\t\tdestination good %s {\n\t\t\tsign %s\n\t\t}", backend.URL, destSecret),
		fmt.Sprintf("\t\tdestination wrong %s {\n\t\t\tsign some-other-secret\n\t\t\tretry 20ms\n\t\t\tmax_attempts 2\n\t\t}", backend.URL),
	), fmt.Sprintf("mux_webhook %s\n\tmux_deliver good wrong", testSecret))
	if status, _, _ := do(t, signedRequest(t, g.url, testSecret, event("video.asset.ready", "signed-1", ""), time.Now())); status != http.StatusAccepted {
		t.Fatalf("%d, want 202", status)
	}
	var status []QueueStatus
	testwait.For(t, func() bool {
		status = nil
		getJSON(t, g.admin+"/mux-webhook/queue", &status)
		return len(status) == 2 && status[0].Delivered == 1 && status[1].Dead == 1
	}, func() string { return fmt.Sprintf("queue status: %+v", status) })
	if verified.Load() != 1 || refused.Load() != 2 {
		t.Errorf("the backend verified %d and refused %d attempts; want 1 and 2", verified.Load(), refused.Load())
	}
	if status[1].LastError != "wrong answered 401" {
		t.Errorf("wrong's last error: %q", status[1].LastError)
	}
}
