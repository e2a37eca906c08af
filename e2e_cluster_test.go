//go:build e2e

package muxwebhook

// Several machines: Caddy gateways (the built binary, as processes) sharing
// one stream on a three-node NATS cluster (nats-server processes started
// from examples/cluster/nats.conf), and examples/cluster/run itself. The
// faults of that setup are in e2e_faults_cluster_test.go.

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/internal/testwait"
)

// TestClusterSharedWork: two gateways on one stream with replicas 3 on a
// three-node cluster. Both accept; each event id, sent to both (as Mux's
// retries through a load balancer may be), is queued once and delivered
// once; both deliver, and their metrics add up to the events; either
// gateway's `caddy mux-webhook queue` shows the same queue (the dead
// letters of both) and names its instance, as do its log lines, its live
// log, its NATS connection and the instance metric.
func TestClusterSharedWork(t *testing.T) {
	t.Parallel() // its own processes and ports
	c := startNATSCluster(t)
	const n, dead = 200, 5
	backend := newRecordingBackend(t, 20*time.Millisecond, func(id string) bool { return strings.HasPrefix(id, "dead-") })
	gs := startClusterGateways(t, 2, clusterGlobal(c, "5s", backend.URL, "\t\t\ttimeout 2s\n\t\t\tretry 100ms\n\t\t\tmax_attempts 2"))
	c.leaders("app") // replicated
	c.waitPulling("app", len(gs))

	client := &http.Client{Timeout: 10 * time.Second}
	send := func(id string) {
		body := event("video.asset.ready", id, "")
		for i, g := range []*clusterGateway{gs[0], gs[1], gs[0]} {
			if status, err := postEvent(client, g.url(), body); status != http.StatusAccepted {
				t.Fatalf("%s, sent to %s (%d of 3): %d %v, want 202", id, g.name, i+1, status, err)
			}
		}
	}
	var wg sync.WaitGroup
	ids := make(chan string)
	for range 4 {
		wg.Go(func() {
			for id := range ids {
				send(id)
			}
		})
	}
	for i := range n {
		ids <- fmt.Sprintf("shared-%d", i)
	}
	for i := range dead {
		ids <- fmt.Sprintf("dead-%d", i)
	}
	close(ids)
	wg.Wait()

	testwait.Until(t, 60*time.Second, func() bool { return len(backend.received()) == n }, func() string {
		return fmt.Sprintf("%d of %d events delivered", len(backend.received()), n)
	})
	// Then until the queue is settled: nothing pending or in flight, the
	// failing events dead letters (counted below).
	testwait.Until(t, 30*time.Second, func() bool {
		st := gs[0].queueStatus(t)
		return st.Pending == 0 && st.InFlight == 0 && st.Dead >= dead
	}, func() string { return fmt.Sprintf("queue: %+v", gs[0].queueStatus(t)) })

	for id, times := range backend.received() {
		if times != 1 {
			t.Errorf("%s delivered %d times; sent three times through two gateways, want once", id, times)
		}
	}
	d1, d2 := gs[0].delivered(t), gs[1].delivered(t)
	t.Logf("deliveries: g1 %v, g2 %v", d1, d2)
	if d1+d2 != n {
		t.Errorf("deliveries_total: g1 %v + g2 %v, want %d in all", d1, d2, n)
	}
	if d1 == 0 || d2 == 0 {
		t.Errorf("deliveries_total: g1 %v, g2 %v; both should share the work", d1, d2)
	}

	// The same queue on both; delivered and instance are each one's own.
	for _, g := range gs {
		st := g.queueStatus(t)
		if st.Pending != 0 || st.InFlight != 0 || st.Dead != dead || st.Instance != g.name {
			t.Errorf("%s's queue status: %+v, want nothing pending, %d dead, instance %s", g.name, st, dead, g.name)
		}
		if float64(st.Delivered) != g.delivered(t) {
			t.Errorf("%s's queue status says %d delivered, its metric %v", g.name, st.Delivered, g.delivered(t))
		}
		out, err := runCommand(t, "", "queue", "--address", fmt.Sprintf("127.0.0.1:%d", g.admin))
		if err != nil || !strings.Contains(out, "instance "+g.name+":") {
			t.Errorf("%s: queue: %v\n%s", g.name, err, out)
		}
		if row := queueRow(out, "app"); len(row) < 6 || row[1] != "0" || row[5] != strconv.Itoa(dead) || row[4] != strconv.Itoa(int(st.Delivered)) {
			t.Errorf("%s: queue printed %q, want 0 pending, %d delivered, %d dead", g.name, row, st.Delivered, dead)
		}
		out, err = runCommand(t, "", "queue", "dead", "app", "--address", fmt.Sprintf("127.0.0.1:%d", g.admin))
		if err != nil || strings.Count(out, "dead-") != dead {
			t.Errorf("%s: queue dead app: %v\n%s", g.name, err, out)
		}
		if m := scrape(t, g.adminURL()); m[`caddy_mux_webhook_instance{name="`+g.name+`"}`] != 1 {
			t.Errorf("%s: no caddy_mux_webhook_instance{name=%q} 1 in its metrics", g.name, g.name)
		}
		var entries []LogEntry
		getJSON(t, g.adminURL()+"/mux-webhook/events?outcome=delivered&limit=5", &entries)
		for _, e := range entries {
			if e.Instance != g.name || e.Destination != "app" {
				t.Errorf("%s: live log entry of a delivery: instance %q, destination %q", g.name, e.Instance, e.Destination)
			}
		}
		lines := 0
		for _, l := range strings.Split(g.out.String(), "\n") {
			var m map[string]any
			if json.Unmarshal([]byte(l), &m) == nil && m["msg"] == "mux webhook delivered" {
				lines++
				if m["instance"] != g.name {
					t.Errorf("%s: delivery log line with instance %v: %s", g.name, m["instance"], l)
					break
				}
			}
		}
		if float64(lines) != g.delivered(t) {
			t.Errorf("%s: %d delivery log lines, %v deliveries", g.name, lines, g.delivered(t))
		}
	}
	names := strings.Join(c.connectionNames(), ",")
	for _, g := range gs {
		if !strings.Contains(names, "mux_webhook "+g.name) {
			t.Errorf("the NATS connections are named %q; none is %q", names, "mux_webhook "+g.name)
		}
	}
}

// queueRow returns the fields of destination's row in `caddy mux-webhook
// queue`'s table.
func queueRow(out, destination string) []string {
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) > 0 && f[0] == destination {
			return f
		}
	}
	return nil
}

// TestQueueNATSTLS: the nats block's tls_ca and tls_client_auth reach a
// NATS server that requires TLS and verifies clients; without the CA, or
// without the client certificate, the config does not load.
func TestQueueNATSTLS(t *testing.T) {
	bin := natsBinary(t)
	pki := t.TempDir()
	writeTestPKI(t, pki)
	port := freePort(t)
	conf := filepath.Join(pki, "nats.conf")
	if err := os.WriteFile(conf, []byte(fmt.Sprintf(`host: 127.0.0.1
port: %d
max_payload: 2MB
jetstream {
  store_dir: %q
}
tls {
  cert_file: %q
  key_file: %q
  ca_file: %q
  verify: true
}
`, port, t.TempDir(), filepath.Join(pki, "server.pem"), filepath.Join(pki, "server.key"), filepath.Join(pki, "ca.pem"))), 0o600); err != nil {
		t.Fatal(err)
	}
	_, out := startProcess(t, bin, "-c", conf)
	testwait.For(t, func() bool { return dials(fmt.Sprintf("127.0.0.1:%d", port)) }, out.String)

	backend := newRecordingBackend(t, 0, nil)
	config := func(tlsLines string) (string, *gateway) {
		return gatewayConfigWith(t, "off",
			fmt.Sprintf("\tmux_webhook {\n\t\tqueue {\n\t\t\tnats tls://127.0.0.1:%d {\n%s\n\t\t\t}\n\t\t}\n\t\tdestination app %s\n\t}", port, tlsLines, backend.URL),
			fmt.Sprintf("mux_webhook %s\n\tmux_deliver app", testSecret))
	}
	ca := "\t\t\t\ttls_ca " + filepath.Join(pki, "ca.pem")
	client := fmt.Sprintf("\t\t\t\ttls_client_auth %s %s", filepath.Join(pki, "client.pem"), filepath.Join(pki, "client.key"))
	for name, lines := range map[string]string{"no CA (system roots)": client, "no client certificate": ca} {
		cfg, _ := config(lines)
		if err := loadCaddyfile(cfg); err == nil {
			_ = stopCaddy()
			t.Errorf("%s: the config loaded", name)
		} else if !strings.Contains(err.Error(), "connecting to NATS") {
			t.Errorf("%s: %v", name, err)
		}
	}
	cfg, g := config(ca + "\n" + client)
	g.load(cfg)
	if status, _, _ := do(t, signedRequest(t, g.url, testSecret, event("video.asset.ready", "tls-1", ""), time.Now())); status != http.StatusAccepted {
		t.Fatalf("over TLS: %d, want 202", status)
	}
	testwait.For(t, func() bool { return backend.received()["tls-1"] == 1 }, func() string { return "tls-1 never delivered" })
}

// TestClusterExample runs examples/cluster/run as docs/cluster.md shows it, on
// ports moved by an offset and with a state directory of its own: up
// starts three NATS nodes, the backend and two gateways; an event sent to
// both gateways is delivered once; status shows both gateways' view of
// the queue; kill and up restart what was killed; down stops every
// process it started and deletes the state.
func TestClusterExample(t *testing.T) {
	bin := caddyBinary(t)
	natsBin := natsBinary(t)
	for _, tool := range []string{"bash", "curl"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is needed for examples/cluster/run: %v", tool, err)
		}
	}
	off := clusterPortOffset(t)
	dir := filepath.Join(t.TempDir(), "run")
	env := append(os.Environ(), "MUX_CADDY_BIN="+bin, "MUX_CLUSTER_DIR="+dir, fmt.Sprintf("MUX_CLUSTER_PORT_OFFSET=%d", off),
		"PATH="+filepath.Dir(natsBin)+string(os.PathListSeparator)+os.Getenv("PATH"))
	run := func(args ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, "examples/cluster/run", args...)
		cmd.Env = env
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	names := []string{"n1", "n2", "n3", "backend", "g1", "g2"}
	pids := map[string]int{}
	readPIDs := func() {
		for _, name := range names {
			b, err := os.ReadFile(filepath.Join(dir, name+".pid"))
			if err != nil {
				t.Fatalf("%s.pid: %v", name, err)
			}
			pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
			if err != nil {
				t.Fatalf("%s.pid: %v", name, err)
			}
			pids[name+strconv.Itoa(pid)] = pid
		}
	}
	t.Cleanup(func() {
		if out, err := run("down"); err != nil {
			t.Errorf("down: %v\n%s", err, out)
		}
		// Whatever down left running (it must not) is stopped here.
		for name, pid := range pids {
			if processAlive(pid) {
				t.Errorf("%s (pid %d) still runs after down", name, pid)
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		if _, err := os.Stat(dir); !os.IsNotExist(err) {
			t.Errorf("down left %s: %v", dir, err)
		}
	})
	status := func() string {
		out, err := run("status")
		if err != nil {
			t.Fatalf("status: %v\n%s", err, out)
		}
		return out
	}
	waitDistinct := func(n int) {
		want := fmt.Sprintf(" %d distinct events", n)
		testwait.Until(t, 30*time.Second, func() bool { return strings.Contains(status(), want) }, status)
	}

	if out, err := run("up"); err != nil || !strings.Contains(out, "up.") {
		t.Fatalf("up: %v\n%s", err, out)
	}
	readPIDs()
	out, err := run("send", "5")
	if err != nil || strings.Count(out, "-> 202 Accepted") != 10 {
		t.Fatalf("send 5 (each to g1 and g2): %v\n%s", err, out)
	}
	waitDistinct(5)
	st := status()
	for _, want := range []string{"n1: running", "g2: running", "backend: running", "instance g1:", "instance g2:", "backend: 5 deliveries, 5 distinct events"} {
		if !strings.Contains(st, want) {
			t.Errorf("status: no %q in\n%s", want, st)
		}
	}

	for _, name := range []string{"g1", "n2"} {
		if out, err := run("kill", name); err != nil || !strings.Contains(out, "killed "+name) {
			t.Fatalf("kill %s: %v\n%s", name, err, out)
		}
	}
	st = status()
	if !strings.Contains(st, "g1: not running") || !strings.Contains(st, "n2: not running") || !strings.Contains(st, "g2: running") {
		t.Errorf("status after kill g1, n2:\n%s", st)
	}
	if out, err := run("up"); err != nil || !strings.Contains(out, "started n2") || !strings.Contains(out, "started g1") || strings.Contains(out, "started g2") {
		t.Fatalf("up after the kills: %v\n%s", err, out)
	}
	readPIDs()
	if out, err := run("send", "3"); err != nil || strings.Count(out, "-> 202 Accepted") != 6 {
		t.Fatalf("send 3 after the restarts: %v\n%s", err, out)
	}
	waitDistinct(8)
}
