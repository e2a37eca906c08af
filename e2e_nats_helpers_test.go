//go:build e2e

package muxwebhook

// The harness of the tests against nats-server processes: finding the
// binary, a three-node cluster started from examples/cluster/nats.conf (start,
// SIGKILL a node, leaders, consumers), single servers with a config of the
// test's own, and Caddy gateways (the built binary) on it.

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
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/internal/testwait"
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
	out := processOutput(t, n.name)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	n.cmd, n.out, n.startedAt = cmd, out, time.Now()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	testwait.For(t, func() bool { return dials(fmt.Sprintf("127.0.0.1:%d", n.client)) }, out.String)
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
		testwait.Until(c.t, 30*time.Second, func() bool {
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
	testwait.Until(t, 30*time.Second, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s, err := js.Stream(ctx, "MUX_WEBHOOK_0")
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
	testwait.Until(c.t, 30*time.Second, func() bool {
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

func (g *clusterGateway) url() string { return fmt.Sprintf("http://127.0.0.1:%d", g.port) }

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

// startClusterGateways starts n gateways with global (clusterGateways) and
// waits for each to have its queue open.
func startClusterGateways(t *testing.T, n int, global string) []*clusterGateway {
	t.Helper()
	gs := clusterGateways(t, n, global)
	for _, g := range gs {
		g.start(t)
	}
	return gs
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

// clusterExamplePorts are the ports examples/cluster/run uses, before its
// MUX_CLUSTER_PORT_OFFSET.
var clusterExamplePorts = []int{4222, 4223, 4224, 6222, 6223, 6224, 8222, 8223, 8224, 8081, 8082, 2020, 2021, 9101}

// clusterPortOffset finds an offset that puts every port of the example
// on a free port of 127.0.0.1, below Linux's ephemeral range (32768 and
// up): a port in it may be taken between this check and the example's
// bind by the source port of any connection on the machine.
func clusterPortOffset(t *testing.T) int {
	t.Helper()
	for try := range 50 {
		off := 10000 + (os.Getpid()*7+try*997)%13000 // the ports: 12020 to 32100
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

// natsServer runs the nats-server binary (.ci/run installs it) with
// JetStream on 127.0.0.1 until the test ends, and returns its URL and
// process.
func natsServer(t *testing.T) (string, *exec.Cmd) {
	t.Helper()
	port := freePort(t)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	dir := t.TempDir()
	cmd := natsServerWithConfig(t, dir, addr, fmt.Sprintf("listen: %s\njetstream { store_dir: %q }\n", addr, filepath.Join(dir, "store")))
	return "nats://" + addr, cmd
}

// natsServerWithConfig runs nats-server with the config text (written to
// a file in dir) until the test ends; addr is where the config listens.
// The config's max_payload is 2MB, as docs/cluster.md asks of a NATS server
// for max_body's default (1 MiB and the headers).
func natsServerWithConfig(t *testing.T, dir, addr, text string) *exec.Cmd {
	t.Helper()
	conf := filepath.Join(dir, "nats.conf")
	if err := os.WriteFile(conf, []byte("max_payload: 2MB\n"+text), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd, out := startProcess(t, natsBinary(t), "-c", conf)
	waitListening(t, addr, out)
	return cmd
}

// gatewayOnExternalNATS is a gateway whose queue is on the NATS server at
// natsURL (enqueue_timeout 1s), delivering to appURL.
func gatewayOnExternalNATS(t *testing.T, natsURL, appURL string) (string, *gateway) {
	t.Helper()
	return gatewayConfigWith(t, "off",
		fmt.Sprintf("\tmux_webhook {\n\t\tqueue {\n\t\t\tnats %s\n\t\t\tenqueue_timeout 1s\n\t\t}\n\t\tdestination app %s\n\t}", natsURL, appURL),
		fmt.Sprintf("mux_webhook %s\n\tmux_deliver app", testSecret))
}

// jetStreamOf connects to the NATS server at url for the test's own
// hand-made faults.
func jetStreamOf(t *testing.T, url string, opts ...nats.Option) jetstream.JetStream {
	t.Helper()
	nc, err := nats.Connect(url, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return js
}
