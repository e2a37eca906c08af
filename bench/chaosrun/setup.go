package main

// The two setups under test: embedded (one Caddy, its JetStream store on a
// small filesystem when one can be mounted) and cluster (three nats-server
// nodes, two Caddy gateways with replicas 3), each with the same two
// destinations; how each starts, reloads, suffers each fault and stops.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// destSettings are the destination options the reloads change.
type destSettings struct {
	Timeout     string
	Retry       string
	MaxAttempts int
	Concurrency int
}

// The base settings and what reloads choose from: short retry delays and
// enough attempts for the drain to converge after the faults.
var (
	baseSettings = destSettings{Timeout: "2s", Retry: "1s 2s 5s", MaxAttempts: 20, Concurrency: 4}
	timeouts     = []string{"2s", "3s", "5s"}
	retries      = []string{"1s 2s 5s", "500ms 1s 2s 5s", "1s 3s"}
	concurrency  = []int{2, 4, 8}
	maxAttempts  = []int{20, 30}
	// maxTimeout is the longest timeout a reload may set.
	maxTimeout = 5 * time.Second
)

// gateway is one Caddy process: its ports and directories are kept across
// restarts.
type gateway struct {
	name        string
	port, admin int
	dataDir     string
	cfgPath     string
	proc        *proc
}

func (g *gateway) adminURL() string { return fmt.Sprintf("http://127.0.0.1:%d", g.admin) }

// natsNode is one nats-server process of the cluster.
type natsNode struct {
	name               string
	client, route, mon int
	store              string
	proc               *proc
}

// setup is one system under test.
type setup struct {
	kind     string // "embedded" or "cluster"
	dir      string
	lg       *eventLog
	caddyBin string
	natsBin  string
	natsConf string
	secret   string   // the gateways' Mux secret
	env      []string // the secrets, given to Caddy by environment
	backends []*backend
	gateways []*gateway
	nodes    []*natsNode
	queueDir string // embedded store
	mounted  bool
	skipped  map[string]string // fault kinds left out, and why

	mu       sync.Mutex
	rng      *rand.Rand
	settings map[string]destSettings
}

var destinationNames = []string{"app", "analytics"}

func newSetup(kind, dir string, lg *eventLog, caddyBin, natsBin, natsConf string, seed int64) (*setup, error) {
	s := &setup{kind: kind, dir: dir, lg: lg, caddyBin: caddyBin, natsBin: natsBin, natsConf: natsConf,
		secret: randomSecret(), rng: rand.New(rand.NewSource(seed ^ 0x5eed)), settings: map[string]destSettings{}, skipped: map[string]string{}}
	s.env = append(s.env, "CHAOS_MUX_SECRET="+s.secret)
	for i, name := range destinationNames {
		sign := randomSecret()
		b, err := newBackend(name, sign, seed+int64(i))
		if err != nil {
			return nil, err
		}
		s.backends = append(s.backends, b)
		s.settings[name] = baseSettings
		s.env = append(s.env, "CHAOS_SIGN_"+strings.ToUpper(name)+"="+sign)
	}
	return s, nil
}

func randomSecret() string { return strings.ReplaceAll(uuid(), "-", "") }

// start brings the setup up: the store's filesystem, the NATS nodes, the
// gateways; it returns once every gateway's queue is open.
func (s *setup) start() error {
	n := 1
	if s.kind == "cluster" {
		n = 2
		if err := s.startNATS(); err != nil {
			return err
		}
	} else {
		s.queueDir = filepath.Join(s.dir, "queue")
		if err := os.MkdirAll(s.queueDir, 0o700); err != nil {
			return err
		}
		if err := syscall.Mount("tmpfs", s.queueDir, "tmpfs", 0, "size=16m,mode=0700"); err != nil {
			s.skipped[faultDiskFull] = fmt.Sprintf("no small filesystem for the queue (mount -t tmpfs -o size=16m: %v); the store is a plain directory", err)
		} else {
			s.mounted = true
			s.lg.logf("embedded: the queue's dir %s is a 16 MiB tmpfs", s.queueDir)
		}
		s.skipped[faultConsumerDelete] = "the embedded server opens no port: no client can delete its consumers (covered on the cluster)"
		s.skipped[faultNATSKill] = "no NATS process apart from Caddy (covered on the cluster)"
		s.skipped[faultNATSStop] = s.skipped[faultNATSKill]
	}
	for i := 1; i <= n; i++ {
		name := fmt.Sprintf("g%d", i)
		if s.kind == "embedded" {
			name = "caddy"
		}
		g := &gateway{name: name, port: freePort(), admin: freePort(), dataDir: filepath.Join(s.dir, "caddy-"+name)}
		if err := os.MkdirAll(g.dataDir, 0o700); err != nil {
			return err
		}
		g.cfgPath = filepath.Join(g.dataDir, "Caddyfile")
		g.proc = &proc{name: s.kind + "/" + g.name, bin: s.caddyBin, args: []string{"run", "--config", g.cfgPath, "--adapter", "caddyfile"},
			env:     append([]string{"HOME=" + g.dataDir, "XDG_DATA_HOME=" + g.dataDir, "XDG_CONFIG_HOME=" + g.dataDir}, s.env...),
			logPath: filepath.Join(s.dir, "caddy-"+g.name+".log"), lg: s.lg}
		s.gateways = append(s.gateways, g)
	}
	for _, g := range s.gateways {
		if err := s.startGateway(g); err != nil {
			return err
		}
		if err := s.waitReady(g, 60*time.Second); err != nil {
			return err
		}
	}
	return nil
}

// startNATS starts the three nodes from examples/cluster/nats.conf and
// waits until each is healthy.
func (s *setup) startNATS() error {
	var routes []string
	for i := 1; i <= 3; i++ {
		n := &natsNode{name: fmt.Sprintf("n%d", i), client: freePort(), route: freePort(), mon: freePort(), store: filepath.Join(s.dir, fmt.Sprintf("nats-n%d", i))}
		if err := os.MkdirAll(n.store, 0o700); err != nil {
			return err
		}
		routes = append(routes, fmt.Sprintf("nats-route://127.0.0.1:%d", n.route))
		s.nodes = append(s.nodes, n)
	}
	for _, n := range s.nodes {
		n.proc = &proc{name: "cluster/nats-" + n.name, bin: s.natsBin, args: []string{"-c", s.natsConf},
			env: []string{"NODE=" + n.name, fmt.Sprintf("CLIENT_PORT=%d", n.client), fmt.Sprintf("ROUTE_PORT=%d", n.route),
				fmt.Sprintf("MONITOR_PORT=%d", n.mon), "STORE_DIR=" + n.store, "ROUTES=[" + strings.Join(routes, ", ") + "]"},
			logPath: filepath.Join(s.dir, "nats-"+n.name+".log"), lg: s.lg}
		if err := n.proc.start(); err != nil {
			return err
		}
	}
	for _, n := range s.nodes {
		if err := waitHealthz(n, 30*time.Second); err != nil {
			return err
		}
	}
	return nil
}

func waitHealthz(n *natsNode, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	c := &http.Client{Timeout: 2 * time.Second}
	for time.Now().Before(deadline) {
		resp, err := c.Get(fmt.Sprintf("http://127.0.0.1:%d/healthz", n.mon))
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("nats %s not healthy within %s", n.name, limit)
}

func (s *setup) natsURLs() []string {
	var u []string
	for _, n := range s.nodes {
		u = append(u, fmt.Sprintf("nats://127.0.0.1:%d", n.client))
	}
	return u
}

// caddyfile is g's config with the current destination settings.
func (s *setup) caddyfile(g *gateway) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var b strings.Builder
	fmt.Fprintf(&b, "{\n\tadmin 127.0.0.1:%d\n\tauto_https off\n\tpersist_config off\n\tdefault_bind 127.0.0.1\n\tstorage file_system %s\n",
		g.admin, filepath.Join(g.dataDir, "storage"))
	b.WriteString("\tlog {\n\t\tformat json\n\t}\n\tmux_webhook {\n\t\tqueue {\n")
	if s.kind == "embedded" {
		fmt.Fprintf(&b, "\t\t\tdir %s\n\t\t\tmax_bytes 8MiB\n\t\t\tdead_max_bytes 2MiB\n", s.queueDir)
	} else {
		fmt.Fprintf(&b, "\t\t\tnats %s {\n\t\t\t\treplicas 3\n\t\t\t\tinstance %s\n\t\t\t}\n\t\t\tmax_bytes 256MiB\n", strings.Join(s.natsURLs(), " "), g.name)
	}
	b.WriteString("\t\t\tenqueue_timeout 2s\n\t\t}\n")
	for _, name := range destinationNames {
		st := s.settings[name]
		// The breaker on, its probe compressed like the retry delays:
		// a backend's outage trips it, and its end is found within 2s.
		// app orders by object: every fault meets held copies too.
		order := ""
		if name == "app" {
			order = "\t\t\torder object\n"
		}
		fmt.Fprintf(&b, "\t\tdestination %s %s {\n\t\t\ttimeout %s\n\t\t\tretry %s\n\t\t\tmax_attempts %d\n\t\t\tconcurrency %d\n\t\t\tbreaker 10 2s\n%s\t\t\tsign {env.CHAOS_SIGN_%s}\n\t\t}\n",
			name, s.backend(name).url(), st.Timeout, st.Retry, st.MaxAttempts, st.Concurrency, order, strings.ToUpper(name))
	}
	b.WriteString("\t}\n}\n\n")
	fmt.Fprintf(&b, "http://127.0.0.1:%d {\n\tmux_webhook /mux {env.CHAOS_MUX_SECRET}\n\tmux_deliver %s\n}\n", g.port, strings.Join(destinationNames, " "))
	return b.String()
}

func (s *setup) backend(name string) *backend {
	for _, b := range s.backends {
		if b.name == name {
			return b
		}
	}
	return nil
}

func (s *setup) gateway(name string) *gateway {
	for _, g := range s.gateways {
		if g.name == name {
			return g
		}
	}
	return nil
}

func (s *setup) node(name string) *natsNode {
	for _, n := range s.nodes {
		if n.name == name {
			return n
		}
	}
	return nil
}

// startGateway writes g's config (the current settings: a restart uses
// the last reloaded config, as an operator's file would be) and starts it.
func (s *setup) startGateway(g *gateway) error {
	if err := os.WriteFile(g.cfgPath, []byte(s.caddyfile(g)), 0o600); err != nil {
		return err
	}
	return g.proc.start()
}

// waitReady waits until g's queue is open (its admin API answers the
// queue's status).
func (s *setup) waitReady(g *gateway, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	c := &http.Client{Timeout: 2 * time.Second}
	for time.Now().Before(deadline) {
		resp, err := c.Get(g.adminURL() + "/mux-webhook/queue")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("%s/%s: the queue is not open within %s (log: %s)", s.kind, g.name, limit, g.proc.logPath)
}

// faultSpecs are the faults this setup can suffer; short ones for -short.
func (s *setup) faultSpecs(short bool) []kindSpec {
	scale := func(lo, hi time.Duration) (time.Duration, time.Duration) {
		if short {
			return lo / 2, hi / 2
		}
		return lo, hi
	}
	var gws []string
	for _, g := range s.gateways {
		gws = append(gws, g.name)
	}
	spec := func(kind string, weight int, targets []string, lo, hi time.Duration) kindSpec {
		lo, hi = scale(lo, hi)
		return kindSpec{kind: kind, weight: weight, targets: targets, min: lo, max: hi}
	}
	specs := []kindSpec{
		spec(faultCaddyKill, 3, gws, 1*time.Second, 5*time.Second),
		spec(faultReload, 2, []string{"all"}, 0, 0),
		spec(faultBackend500, 1, destinationNames, 5*time.Second, 15*time.Second),
		spec(faultBackendHang, 1, destinationNames, 5*time.Second, 15*time.Second),
		spec(faultBackendSlow, 1, destinationNames, 5*time.Second, 15*time.Second),
	}
	if s.kind == "cluster" {
		nodes := []string{"n1", "n2", "n3"}
		specs = append(specs,
			spec(faultNATSKill, 2, nodes, 3*time.Second, 10*time.Second),
			spec(faultNATSStop, 2, nodes, 3*time.Second, 10*time.Second),
			spec(faultConsumerDelete, 1, destinationNames, 0, 0))
	} else if s.mounted {
		specs = append(specs, spec(faultDiskFull, 1, []string{"queue"}, 5*time.Second, 12*time.Second))
	}
	return specs
}

// inject is the setup's injector.
func (s *setup) inject(ctx context.Context, f plannedFault, rec *faultRec) {
	switch f.Kind {
	case faultCaddyKill:
		g := s.gateway(f.Target)
		pid := g.proc.pid()
		g.proc.kill(syscall.SIGKILL)
		hold(ctx, f.For)
		if err := s.startGateway(g); err != nil {
			rec.Note = fmt.Sprintf("pid %d killed; restart failed: %v", pid, err)
			return
		}
		t0 := time.Now()
		if err := s.waitReady(g, 30*time.Second); err != nil {
			rec.Note = fmt.Sprintf("pid %d killed; restarted, %v", pid, err)
			return
		}
		rec.Note = fmt.Sprintf("pid %d killed; restarted, queue open after %.1fs", pid, time.Since(t0).Seconds())
	case faultNATSKill:
		n := s.node(f.Target)
		pid := n.proc.pid()
		n.proc.kill(syscall.SIGKILL)
		hold(ctx, f.For)
		if err := n.proc.start(); err != nil {
			rec.Note = fmt.Sprintf("pid %d killed; restart failed: %v", pid, err)
			return
		}
		t0 := time.Now()
		if err := waitHealthz(n, 30*time.Second); err != nil {
			rec.Note = fmt.Sprintf("pid %d killed; restarted, %v", pid, err)
			return
		}
		rec.Note = fmt.Sprintf("pid %d killed; restarted, healthy after %.1fs", pid, time.Since(t0).Seconds())
	case faultNATSStop:
		n := s.node(f.Target)
		if err := n.proc.signal(syscall.SIGSTOP); err != nil {
			rec.Note = err.Error()
			return
		}
		hold(ctx, f.For)
		if err := n.proc.signal(syscall.SIGCONT); err != nil {
			rec.Note = err.Error()
		}
	case faultConsumerDelete:
		rec.Note = s.deleteConsumer(f.Target)
	case faultReload:
		rec.Note = s.reload()
	case faultBackend500, faultBackendHang, faultBackendSlow:
		m := map[string]int{faultBackend500: modeFail, faultBackendHang: modeHang, faultBackendSlow: modeSlow}[f.Kind]
		b := s.backend(f.Target)
		b.setMode(m)
		hold(ctx, f.For)
		b.setMode(modeOK)
	case faultDiskFull:
		n, err := fillDisk(filepath.Join(s.queueDir, "chaos-filler"))
		hold(ctx, f.For)
		rmErr := os.Remove(filepath.Join(s.queueDir, "chaos-filler"))
		rec.Note = fmt.Sprintf("filled with %d KiB (%v), then deleted (%v)", n>>10, err, rmErr)
	}
}

// fillDisk writes zeros to path until the filesystem is full (at most
// 64 MiB), and returns how many bytes it wrote.
func fillDisk(path string) (int64, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	buf := make([]byte, 64<<10)
	var n int64
	for n < 64<<20 {
		w, err := f.Write(buf)
		n += int64(w)
		if err != nil {
			if errors.Is(err, syscall.ENOSPC) {
				return n, errors.New("full")
			}
			return n, err
		}
	}
	return n, errors.New("64 MiB written and not full")
}

// deleteConsumer deletes the destination's durable consumer on the
// cluster, as `nats consumer rm` would.
func (s *setup) deleteConsumer(dest string) string {
	nc, err := nats.Connect(strings.Join(s.natsURLs(), ","), nats.Name("chaos run"), nats.Timeout(2*time.Second), nats.MaxReconnects(2))
	if err != nil {
		return "connect: " + err.Error()
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return err.Error()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := js.DeleteConsumer(ctx, "MUX_WEBHOOK_0", "deliver_"+dest); err != nil {
		return "deleting deliver_" + dest + ": " + err.Error()
	}
	return "deleted deliver_" + dest
}

// reload draws new destination settings and loads them into every
// gateway through its admin API (/load, text/caddyfile); the file is
// rewritten too, so a restart keeps them.
func (s *setup) reload() string {
	var notes []string
	s.mu.Lock()
	for _, name := range destinationNames {
		st := destSettings{Timeout: timeouts[s.rng.Intn(len(timeouts))], Retry: retries[s.rng.Intn(len(retries))],
			MaxAttempts: maxAttempts[s.rng.Intn(len(maxAttempts))], Concurrency: concurrency[s.rng.Intn(len(concurrency))]}
		s.settings[name] = st
		notes = append(notes, fmt.Sprintf("%s: timeout %s, retry %s, max_attempts %d, concurrency %d", name, st.Timeout, st.Retry, st.MaxAttempts, st.Concurrency))
	}
	s.mu.Unlock()
	c := &http.Client{Timeout: 20 * time.Second}
	for _, g := range s.gateways {
		cfg := s.caddyfile(g)
		if err := os.WriteFile(g.cfgPath, []byte(cfg), 0o600); err != nil {
			notes = append(notes, g.name+": "+err.Error())
			continue
		}
		t0 := time.Now()
		req, _ := http.NewRequest(http.MethodPost, g.adminURL()+"/load", strings.NewReader(cfg))
		req.Header.Set("Content-Type", "text/caddyfile")
		resp, err := c.Do(req)
		if err != nil {
			notes = append(notes, fmt.Sprintf("%s: not reloaded (%v)", g.name, shortErr(err)))
			continue
		}
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 300))
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			notes = append(notes, fmt.Sprintf("%s: reload answered %d in %.1fs: %s", g.name, resp.StatusCode, time.Since(t0).Seconds(), strings.TrimSpace(string(body))))
		} else {
			notes = append(notes, fmt.Sprintf("%s: reloaded in %.1fs", g.name, time.Since(t0).Seconds()))
		}
	}
	return strings.Join(notes, "; ")
}

func shortErr(err error) string {
	var op *net.OpError
	if errors.As(err, &op) {
		return op.Err.Error()
	}
	return err.Error()
}

// deadLetters lists each destination's dead letters (ids) from the first
// gateway that answers.
func (s *setup) deadLetters() (map[string]map[string]bool, error) {
	c := &http.Client{Timeout: 15 * time.Second}
	var lastErr error
	for _, g := range s.gateways {
		out := map[string]map[string]bool{}
		ok := true
		for _, name := range destinationNames {
			resp, err := c.Get(g.adminURL() + "/mux-webhook/queue/dead?destination=" + name)
			if err != nil {
				lastErr, ok = err, false
				break
			}
			var list []struct {
				ID string `json:"id"`
			}
			err = json.NewDecoder(io.LimitReader(resp.Body, 64<<20)).Decode(&list)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK || err != nil {
				lastErr, ok = fmt.Errorf("%s: dead letters of %s: %d %v", g.name, name, resp.StatusCode, err), false
				break
			}
			out[name] = map[string]bool{}
			for _, d := range list {
				out[name][d.ID] = true
			}
		}
		if ok {
			return out, nil
		}
	}
	return nil, lastErr
}

// queueStatus is a gateway's GET /mux-webhook/queue, per gateway.
func (s *setup) queueStatus() map[string]json.RawMessage {
	c := &http.Client{Timeout: 10 * time.Second}
	out := map[string]json.RawMessage{}
	for _, g := range s.gateways {
		resp, err := c.Get(g.adminURL() + "/mux-webhook/queue")
		if err != nil {
			out[g.name], _ = json.Marshal(shortErr(err))
			continue
		}
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		resp.Body.Close()
		if json.Valid(body) {
			out[g.name] = body
		} else {
			out[g.name], _ = json.Marshal(fmt.Sprintf("%d %s", resp.StatusCode, strings.TrimSpace(string(body))))
		}
	}
	return out
}

// selfExits counts, per process, the exits no fault caused.
func (s *setup) selfExits() map[string]int {
	out := map[string]int{}
	var ps []*proc
	for _, g := range s.gateways {
		ps = append(ps, g.proc)
	}
	for _, n := range s.nodes {
		ps = append(ps, n.proc)
	}
	for _, p := range ps {
		p.mu.Lock()
		if p.selfExits > 0 {
			out[p.name] = p.selfExits
		}
		p.mu.Unlock()
	}
	return out
}

// teardown stops every process by its PID (gateways first), the backends,
// and unmounts the store's filesystem.
func (s *setup) teardown() {
	var wg sync.WaitGroup
	for _, g := range s.gateways {
		wg.Add(1)
		go func(g *gateway) { defer wg.Done(); g.proc.stop() }(g)
	}
	wg.Wait()
	for _, n := range s.nodes {
		wg.Add(1)
		go func(n *natsNode) { defer wg.Done(); n.proc.stop() }(n)
	}
	wg.Wait()
	for _, b := range s.backends {
		b.close()
	}
	if s.mounted {
		if err := syscall.Unmount(s.queueDir, 0); err != nil {
			_ = syscall.Unmount(s.queueDir, syscall.MNT_DETACH)
		}
		s.mounted = false
	}
}

// freePort is a port free on 127.0.0.1 now.
func freePort() int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// sortedKeys returns m's keys in order.
func sortedKeys[V any](m map[string]V) []string {
	var keys []string
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
