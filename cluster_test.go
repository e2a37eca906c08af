package muxwebhook

// Several machines: Caddy gateways (the built binary, as processes) sharing
// one stream on a three-node NATS cluster (nats-server processes started
// from examples/cluster/nats.conf), and examples/cluster/run itself. The
// faults of that setup are in faults_cluster_test.go.

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"go/build"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// natsBinary finds nats-server on the PATH or in GOPATH/bin (where `go
// install` puts it; .ci/run does). Without it the test is skipped, except
// on CI.
func natsBinary(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("-short: this test starts nats-server (a real process); ./scripts/test runs it")
	}
	if bin, err := exec.LookPath("nats-server"); err == nil {
		return bin
	}
	bin := filepath.Join(build.Default.GOPATH, "bin", "nats-server")
	if _, err := os.Stat(bin); err == nil {
		return bin
	}
	if os.Getenv("CI") != "" {
		t.Fatal("nats-server is needed on CI (.ci/run installs it)")
	}
	t.Skip("nats-server not installed: go install github.com/nats-io/nats-server/v2@v2.15.2")
	return ""
}

// natsNode is one nats-server process of a natsCluster.
type natsNode struct {
	name                string
	client, route, mon  int
	store               string
	cmd                 *exec.Cmd
	out                 *syncBuffer
	startedAt, killedAt time.Time
}

// natsCluster is three nats-server processes clustered over loopback
// routes, JetStream on each, started from examples/cluster/nats.conf (the
// file the example runs) with their ports and stores in the environment.
type natsCluster struct {
	t     *testing.T
	bin   string
	conf  string
	nodes []*natsNode
}

// startNATSCluster starts the three nodes and waits until JetStream is
// ready on each (a meta leader is elected).
func startNATSCluster(t *testing.T) *natsCluster {
	t.Helper()
	conf, err := filepath.Abs("examples/cluster/nats.conf")
	if err != nil {
		t.Fatal(err)
	}
	c := &natsCluster{t: t, bin: natsBinary(t), conf: conf}
	for i := 1; i <= 3; i++ {
		c.nodes = append(c.nodes, &natsNode{
			name: fmt.Sprintf("n%d", i), client: freePort(t), route: freePort(t), mon: freePort(t), store: t.TempDir(),
		})
	}
	for i := range c.nodes {
		c.start(i)
	}
	c.waitHealthy()
	return c
}

// urls are the nodes' client URLs, as a gateway's nats line lists them.
func (c *natsCluster) urls() string {
	var u []string
	for _, n := range c.nodes {
		u = append(u, fmt.Sprintf("nats://127.0.0.1:%d", n.client))
	}
	return strings.Join(u, " ")
}

// start (re)starts node i on its ports and store until the test ends.
func (c *natsCluster) start(i int) {
	t := c.t
	t.Helper()
	n := c.nodes[i]
	var routes []string
	for _, o := range c.nodes {
		routes = append(routes, fmt.Sprintf("nats-route://127.0.0.1:%d", o.route))
	}
	cmd := exec.Command(c.bin, "-c", c.conf)
	cmd.Env = append(os.Environ(), "NODE="+n.name, "CLIENT_PORT="+strconv.Itoa(n.client), "ROUTE_PORT="+strconv.Itoa(n.route),
		"MONITOR_PORT="+strconv.Itoa(n.mon), "STORE_DIR="+n.store, "ROUTES=["+strings.Join(routes, ", ")+"]")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	n.cmd, n.out, n.startedAt = cmd, out, time.Now()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("%s's output (last 4 KiB):\n%s", n.name, tail(out.String(), 4096))
		}
	})
	waitFor(t, func() bool { return dials(fmt.Sprintf("127.0.0.1:%d", n.client)) }, out.String)
}

// kill sends node i SIGKILL and waits for it to end.
func (c *natsCluster) kill(i int) {
	c.t.Helper()
	n := c.nodes[i]
	if err := n.cmd.Process.Kill(); err != nil {
		c.t.Fatal(err)
	}
	_ = n.cmd.Wait()
	n.killedAt = time.Now()
}

// waitHealthy waits until every node's /healthz says ok: JetStream is up
// and current (a restarted node has caught up).
func (c *natsCluster) waitHealthy() {
	c.t.Helper()
	for _, n := range c.nodes {
		waitForLong(c.t, 30*time.Second, func() bool {
			resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/healthz", n.mon))
			if err != nil {
				return false
			}
			resp.Body.Close()
			return resp.StatusCode == http.StatusOK
		}, func() string { return n.name + " not healthy:\n" + tail(n.out.String(), 4096) })
	}
}

// connectionNames lists the client connections' names on every live node.
func (c *natsCluster) connectionNames() []string {
	var names []string
	for _, n := range c.nodes {
		var connz struct {
			Connections []struct {
				Name string `json:"name"`
			} `json:"connections"`
		}
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/connz", n.mon))
		if err != nil {
			continue
		}
		_ = json.NewDecoder(resp.Body).Decode(&connz)
		resp.Body.Close()
		for _, cn := range connz.Connections {
			names = append(names, cn.Name)
		}
	}
	sort.Strings(names)
	return names
}

// consumerInfo reads the destination's consumer (and its stream) from the
// cluster, trying again for up to 30s while it has no leader.
func (c *natsCluster) consumerInfo(destination string) (*jetstream.StreamInfo, *jetstream.ConsumerInfo) {
	t := c.t
	t.Helper()
	nc, err := nats.Connect(strings.ReplaceAll(c.urls(), " ", ","))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	var si *jetstream.StreamInfo
	var ci *jetstream.ConsumerInfo
	var lastErr error
	waitForLong(t, 30*time.Second, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s, err := js.Stream(ctx, "MUX_WEBHOOK")
		if err != nil {
			lastErr = err
			return false
		}
		cons, err := s.Consumer(ctx, "deliver_"+destination)
		if err != nil {
			lastErr = err
			return false
		}
		if ci, lastErr = cons.Info(ctx); lastErr != nil {
			return false
		}
		si = s.CachedInfo()
		return si.Cluster != nil && si.Cluster.Leader != "" && ci.Cluster != nil && ci.Cluster.Leader != ""
	}, func() string { return fmt.Sprintf("the consumer of %s: %v, %+v", destination, lastErr, ci) })
	return si, ci
}

// leaders returns the names of the nodes leading the stream and the
// destination's consumer.
func (c *natsCluster) leaders(destination string) (stream, consumer string) {
	c.t.Helper()
	si, ci := c.consumerInfo(destination)
	if r := si.Config.Replicas; r != 3 {
		c.t.Fatalf("the stream has %d replicas, want 3", r)
	}
	return si.Cluster.Leader, ci.Cluster.Leader
}

// waitPulling waits until n processes pull from the destination's
// consumer (each keeps a pull waiting at its leader): the gateways are
// ready to share the work.
func (c *natsCluster) waitPulling(destination string, n int) {
	c.t.Helper()
	waitForLong(c.t, 30*time.Second, func() bool {
		_, ci := c.consumerInfo(destination)
		return ci.NumWaiting >= n
	}, func() string { return fmt.Sprintf("fewer than %d pulls waiting at the consumer of %s", n, destination) })
}

// node returns the index of the node named name.
func (c *natsCluster) node(name string) int {
	for i, n := range c.nodes {
		if n.name == name {
			return i
		}
	}
	c.t.Fatalf("no node %q", name)
	return -1
}

func dials(addr string) bool {
	conn, err := net.DialTimeout("tcp", addr, time.Second)
	if err == nil {
		conn.Close()
	}
	return err == nil
}

func tail(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

// clusterGateway is one Caddy process of a cluster: the built binary, its
// own port and admin port (kept across restarts, as a load balancer's
// target is), the same config apart from those and its instance name.
type clusterGateway struct {
	name        string
	port, admin int
	global      string // the mux_webhook global option
	bin         string
	cmd         *exec.Cmd
	out         *syncBuffer
}

func (g *clusterGateway) url() string      { return fmt.Sprintf("http://127.0.0.1:%d", g.port) }
func (g *clusterGateway) adminURL() string { return fmt.Sprintf("http://127.0.0.1:%d", g.admin) }

// clusterGateways returns n gateways g1, g2, … whose mux_webhook global
// option is global with %s standing for the instance's name; start them.
func clusterGateways(t *testing.T, n int, global string) []*clusterGateway {
	t.Helper()
	bin := caddyBinary(t)
	var gs []*clusterGateway
	for i := 1; i <= n; i++ {
		name := fmt.Sprintf("g%d", i)
		gs = append(gs, &clusterGateway{name: name, port: freePort(t), admin: freePort(t), global: fmt.Sprintf(global, name), bin: bin})
	}
	return gs
}

// queueGatewayConfig is the Caddyfile of a gateway process: its admin
// API on adminPort, JSON logs, global (the mux_webhook global option),
// and one site on port that queues every verified event for destination
// app.
func queueGatewayConfig(adminPort int, global string, port int) string {
	return fmt.Sprintf(`{
	admin 127.0.0.1:%d
	auto_https off
	persist_config off
	default_bind 127.0.0.1
	log {
		format json
	}
%s
}

http://127.0.0.1:%d {
	mux_webhook %s
	mux_deliver app
}
`, adminPort, global, port, testSecret)
}

// start (re)starts the gateway until the test ends and waits until its
// queue is open.
func (g *clusterGateway) start(t *testing.T) {
	t.Helper()
	cfg := queueGatewayConfig(g.admin, g.global, g.port)
	dir := t.TempDir()
	g.out, g.cmd = runCaddyIn(t, g.bin, cfg, dir, dir, nil)
	// Ready once the queue is open (the admin API shows it); the site may
	// answer before, 503 to events.
	waitQueueOpen(t, g.adminURL(), g.out)
}

// kill sends the gateway SIGKILL and waits for it to end.
func (g *clusterGateway) kill(t *testing.T) {
	t.Helper()
	if err := g.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = g.cmd.Wait()
}

// delivered is the gateway's caddy_mux_webhook_deliveries_total of app,
// result delivered.
func (g *clusterGateway) delivered(t *testing.T) float64 {
	t.Helper()
	return scrape(t, g.adminURL())[`caddy_mux_webhook_deliveries_total{destination="app",result="delivered"}`]
}

// queueStatus is the gateway's GET /mux-webhook/queue row of app.
func (g *clusterGateway) queueStatus(t *testing.T) QueueStatus {
	t.Helper()
	var list []QueueStatus
	if status := getJSON(t, g.adminURL()+"/mux-webhook/queue", &list); status != 200 || len(list) != 1 {
		t.Fatalf("%s: queue status %d: %+v", g.name, status, list)
	}
	return list[0]
}

// recordingBackend is a destination that records when each event id
// (Idempotency-Key) arrived, then waits delay and answers 200, or 500 to
// ids that fail says fail.
type recordingBackend struct {
	*httptest.Server
	delay time.Duration
	fail  func(id string) bool

	mu  sync.Mutex
	got map[string][]time.Time
}

func newRecordingBackend(t *testing.T, delay time.Duration, fail func(string) bool) *recordingBackend {
	b := &recordingBackend{delay: delay, fail: fail, got: map[string][]time.Time{}}
	b.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id := r.Header.Get("Idempotency-Key")
		if b.fail != nil && b.fail(id) {
			w.WriteHeader(http.StatusInternalServerError)
			return
		}
		// The backend acts on arrival: an attempt whose gateway dies
		// while it waits has been received.
		b.mu.Lock()
		b.got[id] = append(b.got[id], time.Now())
		b.mu.Unlock()
		select {
		case <-time.After(b.delay):
		case <-r.Context().Done():
		}
	}))
	t.Cleanup(b.Close)
	return b
}

// received returns how many times each id arrived.
func (b *recordingBackend) received() map[string]int {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := map[string]int{}
	for id, ts := range b.got {
		out[id] = len(ts)
	}
	return out
}

// arrivals returns when id arrived, each time.
func (b *recordingBackend) arrivals(id string) []time.Time {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]time.Time(nil), b.got[id]...)
}

// postEvent sends one signed event, signed now; err is a failed
// connection (a gateway that is down).
func postEvent(client *http.Client, url string, body []byte) (int, error) {
	req, err := http.NewRequest(http.MethodPost, url, strings.NewReader(string(body)))
	if err != nil {
		return 0, err
	}
	ts := strconv.FormatInt(time.Now().Unix(), 10)
	req.Header.Set("Mux-Signature", "t="+ts+",v1="+macHex(testSecret, ts, string(body)))
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

// clusterGlobal is the mux_webhook global option of the cluster tests: the
// three nodes, replicas 3, the instance's name left as %s, and dest the
// app destination's settings.
func clusterGlobal(c *natsCluster, enqueueTimeout, backend, dest string) string {
	return fmt.Sprintf(`	mux_webhook {
		queue {
			nats %s {
				replicas 3
				instance %%s
			}
			enqueue_timeout %s
		}
		destination app %s {
%s
		}
	}`, c.urls(), enqueueTimeout, backend, dest)
}

// TestClusterSharedWork: two gateways on one stream with replicas 3 on a
// three-node cluster. Both accept; each event id, sent to both (as Mux's
// retries through a load balancer may be), is queued once and delivered
// once; both deliver, and their metrics add up to the events; either
// gateway's `caddy mux-webhook queue` shows the same queue (the dead
// letters of both) and names its instance, as do its log lines, its live
// log, its NATS connection and the instance metric.
func TestClusterSharedWork(t *testing.T) {
	c := startNATSCluster(t)
	const n, dead = 200, 5
	backend := newRecordingBackend(t, 20*time.Millisecond, func(id string) bool { return strings.HasPrefix(id, "dead-") })
	gs := clusterGateways(t, 2, clusterGlobal(c, "5s", backend.URL, "\t\t\ttimeout 2s\n\t\t\tretry 100ms\n\t\t\tmax_attempts 2"))
	for _, g := range gs {
		g.start(t)
	}
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

	waitForLong(t, 60*time.Second, func() bool { return len(backend.received()) == n }, func() string {
		return fmt.Sprintf("%d of %d events delivered", len(backend.received()), n)
	})
	// Then until the queue is settled: nothing pending or in flight, the
	// failing events dead letters (counted below).
	waitForLong(t, 30*time.Second, func() bool {
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
		if row := queueRow(out, "app"); len(row) < 5 || row[1] != "0" || row[4] != strconv.Itoa(dead) || row[3] != strconv.Itoa(int(st.Delivered)) {
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

// writeTestPKI writes, in dir, a CA (ca.pem), a certificate for
// 127.0.0.1 (server.pem, server.key) and a client certificate (client.pem,
// client.key) that the CA signed.
func writeTestPKI(t *testing.T, dir string) {
	t.Helper()
	newKey := func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	write := func(name, typ string, der []byte) {
		if err := os.WriteFile(filepath.Join(dir, name), pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	caKey := newKey()
	ca := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "mux test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	write("ca.pem", "CERTIFICATE", caDER)
	for i, name := range []string{"server", "client"} {
		key := newKey()
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(int64(i + 2)), Subject: pkix.Name{CommonName: "mux test " + name},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature,
		}
		if name == "server" {
			tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
			tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
		} else {
			tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		keyDER, err := x509.MarshalECPrivateKey(key)
		if err != nil {
			t.Fatal(err)
		}
		write(name+".pem", "CERTIFICATE", der)
		write(name+".key", "EC PRIVATE KEY", keyDER)
	}
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
	waitFor(t, func() bool { return dials(fmt.Sprintf("127.0.0.1:%d", port)) }, out.String)

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
	waitFor(t, func() bool { return backend.received()["tls-1"] == 1 }, func() string { return "tls-1 never delivered" })
}

// clusterExamplePorts are the ports examples/cluster/run uses, before its
// MUX_CLUSTER_PORT_OFFSET.
var clusterExamplePorts = []int{4222, 4223, 4224, 6222, 6223, 6224, 8222, 8223, 8224, 8081, 8082, 2020, 2021, 9101}

// clusterPortOffset finds an offset that puts every port of the example
// on a free port of 127.0.0.1.
func clusterPortOffset(t *testing.T) int {
	t.Helper()
	for try := range 50 {
		off := 20000 + (os.Getpid()*7+try*997)%20000
		free := true
		for _, p := range clusterExamplePorts {
			l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p+off))
			if err != nil {
				free = false
				break
			}
			l.Close()
		}
		if free {
			return off
		}
	}
	t.Fatal("no port offset with every port of examples/cluster free")
	return 0
}

// TestClusterExample runs examples/cluster/run as the README shows it, on
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
		waitForLong(t, 30*time.Second, func() bool { return strings.Contains(status(), want) }, status)
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

// processAlive reports whether pid runs (a zombie does not).
func processAlive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i >= 0 && i+2 < len(s) && s[i+2] != 'Z'
}
