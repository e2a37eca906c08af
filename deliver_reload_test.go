package muxwebhook

// Reloads that mux_deliver's pooled workers and store must get right: a
// secret rotated in a file, a reload that fails after the app started,
// a stop with several slow destinations.

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/internal/testwait"
	"github.com/caddy-mux-webhook/caddy-mux-webhook/queue"
)

// TestMuxDeliverReloadRotatesSignSecret: `sign {file.*}` is read when the
// config loads; a forced reload after the file changed (how a rotated
// secret is applied) signs the next deliveries with the new secret, even
// though the destination's configuration text did not change.
func TestMuxDeliverReloadRotatesSignSecret(t *testing.T) {
	app := newUpstream(t, "app")
	secretFile := filepath.Join(t.TempDir(), "sign-secret")
	if err := os.WriteFile(secretFile, []byte("first-secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "js")
	cfg, g := gatewayConfigWith(t, "off", deliverGlobal(dir,
		fmt.Sprintf("\t\tdestination app %s {\n\t\t\tsign {file.%s}\n\t\t}", app.URL, secretFile),
	), fmt.Sprintf("mux_webhook %s\n\tmux_deliver app", testSecret))
	g.load(cfg)

	verifies := func(r received, secret string) bool {
		_, err := Verify(r.Header.Get(SignatureHeader), r.Body, [][]byte{[]byte(secret)}, time.Now(), time.Minute)
		return err == nil
	}

	sendQueued(t, g, app, "rotate-1", 1)
	if r := app.requests()[0]; !verifies(r, "first-secret") {
		t.Fatalf("the first delivery does not verify with the first secret: %q", r.Header.Get(SignatureHeader))
	}
	if err := os.WriteFile(secretFile, []byte("second-secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := loadCaddyfile(cfg); err != nil { // forced: the config text is the same
		t.Fatal(err)
	}
	sendQueued(t, g, app, "rotate-2", 2)
	if r := app.requests()[1]; !verifies(r, "second-secret") {
		t.Errorf("after the secret file changed and Caddy reloaded, the delivery is still signed with the old secret (verifies with first: %v)",
			verifies(r, "first-secret"))
	}
}

// TestMuxDeliverFailedReloadKeepsTheStream: a reload whose mux_webhook
// app started (and applied its max_bytes to the running stream) but whose
// http app then failed to start is rolled back by Caddy: the running
// config carries on, and so must its stream's limits.
func TestMuxDeliverFailedReloadKeepsTheStream(t *testing.T) {
	app := newUpstream(t, "app")
	dir := filepath.Join(t.TempDir(), "js")
	queueOpts := func(maxBytes string) string {
		return fmt.Sprintf("\tmux_webhook {\n\t\tqueue {\n\t\t\tdir %s\n\t\t\tmax_bytes %s\n\t\t}\n\t\tdestination app %s\n\t}", dir, maxBytes, app.URL)
	}
	site := fmt.Sprintf("mux_webhook %s\n\tmux_deliver app", testSecret)
	cfg, g := gatewayConfigWith(t, "off", queueOpts("64MiB"), site)
	g.load(cfg)
	rolledBackReloads(t, strings.Replace(cfg, queueOpts("64MiB"), queueOpts("16KiB"), 1), 16)
	pad := fmt.Sprintf(`{"pad":%q}`, strings.Repeat("p", 32<<10)) // more than 16 KiB
	status, _, _ := doAfterReload(t, func() *http.Request {
		return signedRequest(t, g.url, testSecret, event("video.asset.ready", "after-failed-reload", pad), time.Now())
	})
	if status != http.StatusAccepted {
		t.Errorf("after failed reloads, the running config (max_bytes 64MiB) answers %d to a 32 KiB event, want 202: the failed config's max_bytes stayed on the stream", status)
	}
}

// TestMuxDeliverStopWaitsOneGrace: stopping several destinations whose
// backends hang gives each its grace at the same time, not one after the
// other (a shutdown with 20 slow destinations must not take 20 × 5 s,
// past systemd's stop timeout): Caddy's stop returns with every hung
// attempt cancelled, and the destinations' stops ran together (the
// count of stops waiting at once, TestDeliveryStopsDestinationsAtOnce).
func TestMuxDeliverStopWaitsOneGrace(t *testing.T) {
	const grace = 2 * time.Second
	old := workerStopGrace
	workerStopGrace = grace
	t.Cleanup(func() { workerStopGrace = old })

	release := make(chan struct{})
	var mu sync.Mutex
	started, cancelled := map[string]bool{}, map[string]bool{}
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		dest := r.Header.Get(queue.HeaderDestination)
		_, _ = io.ReadAll(r.Body) // then the server notices the client going away
		mu.Lock()
		started[dest] = true
		mu.Unlock()
		select { // hangs until the attempt is cancelled or the test ends
		case <-r.Context().Done():
			mu.Lock()
			cancelled[dest] = true
			mu.Unlock()
		case <-release:
		}
	}))
	t.Cleanup(backend.Close)
	t.Cleanup(func() { close(release) })
	names := []string{"d1", "d2", "d3", "d4"}
	var dests []string
	for _, n := range names {
		dests = append(dests, fmt.Sprintf("\t\tdestination %s %s {\n\t\t\ttimeout 1m\n\t\t}", n, backend.URL))
	}
	dir := filepath.Join(t.TempDir(), "js")
	cfg, g := gatewayConfigWith(t, "off", deliverGlobal(dir, dests...),
		fmt.Sprintf("mux_webhook %s\n\tmux_deliver %s", testSecret, strings.Join(names, " ")))
	g.load(cfg)
	if status, _, _ := do(t, signedRequest(t, g.url, testSecret, event("video.asset.ready", "hang-1", ""), time.Now())); status != http.StatusAccepted {
		t.Fatalf("%d, want 202", status)
	}
	testwait.For(t, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(started) == len(names)
	}, func() string { return fmt.Sprintf("attempts started: %v", started) })
	begin := time.Now()
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	t.Logf("stopping %d hanging destinations took %v (grace %v)", len(names), time.Since(begin).Round(time.Millisecond), grace)
	testwait.For(t, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(cancelled) == len(names)
	}, func() string { return fmt.Sprintf("attempts cancelled by the stop: %v of %v", cancelled, names) })
}

// TestDeliveryStopsDestinationsAtOnce: a config's stop runs every
// destination's stop at once: each waits here until all have begun, which
// stops run one after the other never do (each then gives up, bounded).
func TestDeliveryStopsDestinationsAtOnce(t *testing.T) {
	const n = 4
	var arrived sync.WaitGroup
	arrived.Add(n)
	all := make(chan struct{})
	go func() { arrived.Wait(); close(all) }()
	var together atomic.Int32
	d := &appQueue{}
	for range n {
		d.stops = append(d.stops, func() {
			arrived.Done()
			select {
			case <-all:
				together.Add(1)
			case <-time.After(3 * time.Second):
			}
		})
	}
	d.stop()
	if got := together.Load(); got != n {
		t.Errorf("%d of %d destinations' stops ran at the same time", got, n)
	}
	if d.stops != nil {
		t.Error("the stops were kept: a second stop would run them again")
	}
}

// TestMuxDeliverFailedReloadKeepsTheLogger: after a reload that started
// the mux_webhook app but failed in another app, the running config's
// workers log their attempts where the running config says, not through
// the failed config's logger (here: a log file of its own, closed when
// Caddy dropped that config).
func TestMuxDeliverFailedReloadKeepsTheLogger(t *testing.T) {
	app := newUpstream(t, "app")
	dir := filepath.Join(t.TempDir(), "js")
	cfg, g := gatewayConfigWith(t, "off", deliverGlobal(dir, "\t\tdestination app "+app.URL),
		fmt.Sprintf("mux_webhook %s\n\tmux_deliver app", testSecret))
	g.load(cfg)
	otherLog := filepath.Join(t.TempDir(), "failed-config.log")
	rolledBackReloads(t, strings.Replace(cfg, g.logFile, otherLog, 1), 16)
	status, _, _ := doAfterReload(t, func() *http.Request {
		return signedRequest(t, g.url, testSecret, event("video.asset.ready", "logged-1", ""), time.Now())
	})
	if status != http.StatusAccepted {
		t.Fatalf("%d, want 202", status)
	}
	testwait.For(t, func() bool { return len(app.requests()) == 1 }, func() string { return "no delivery" })
	found := func() bool {
		for _, l := range g.logLines() {
			if l["msg"] == "mux webhook delivered" && l["id"] == "logged-1" {
				return true
			}
		}
		return false
	}
	deadline := time.Now().Add(3 * time.Second)
	for !found() && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if !found() {
		raw, _ := os.ReadFile(otherLog)
		t.Errorf("the delivery is not in the running config's log; the failed config's log has:\n%s", raw)
	}
}

// TestMuxDeliverFailedReloadKeepsTheAckDeadline: a reload that changed a
// destination's timeout (its copies' ack deadline) and that Caddy rolled
// back must not leave the running config's slow attempts with the
// failed config's shorter deadline: they would be handed out again while
// still in progress, and the backend would get the event twice.
func TestMuxDeliverFailedReloadKeepsTheAckDeadline(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: waits for real time by design (an attempt of 8 s, past the ack wait a rolled-back reload would have set); ./scripts/test runs it")
	}
	const slow = 8 * time.Second // the backend's answer time: above 1s+5s, below 30s
	var mu sync.Mutex
	got := map[string]int{}
	done := make(chan struct{})
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		got[r.Header.Get("Idempotency-Key")]++
		mu.Unlock()
		select {
		case <-time.After(slow):
		case <-r.Context().Done():
		case <-done:
		}
	}))
	t.Cleanup(backend.Close)
	t.Cleanup(func() { close(done) })
	dir := filepath.Join(t.TempDir(), "js")
	dest := func(timeout string) string {
		return fmt.Sprintf("\t\tdestination app %s {\n\t\t\ttimeout %s\n\t\t}", backend.URL, timeout)
	}
	cfg, g := gatewayConfigWith(t, "off", deliverGlobal(dir, dest("30s")), fmt.Sprintf("mux_webhook %s\n\tmux_deliver app", testSecret))
	g.load(cfg)
	rolledBackReloads(t, strings.Replace(cfg, dest("30s"), dest("1s"), 1), 16)
	status, _, _ := doAfterReload(t, func() *http.Request {
		return signedRequest(t, g.url, testSecret, event("video.asset.ready", "slow-1", ""), time.Now())
	})
	if status != http.StatusAccepted {
		t.Fatalf("%d, want 202", status)
	}
	testwait.For(t, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return got["slow-1"] > 0
	}, func() string { return "no attempt" })
	time.Sleep(slow + time.Second) // the attempt ends; a second one would have started by then
	mu.Lock()
	defer mu.Unlock()
	if n := got["slow-1"]; n != 1 {
		t.Errorf("the backend got the event %d times while the first attempt (timeout 30s) was in progress, want 1", n)
	}
}

// TestMuxDeliverPoolsCountRight: reloads that fail after the mux_webhook
// app started (another app failed), that fail in it (a renamed stream),
// and that succeed leave the running config as the store's and workers'
// only user; once Caddy stops, neither pool holds anything.
func TestMuxDeliverPoolsCountRight(t *testing.T) {
	steady, changing := newUpstream(t, "steady"), newUpstream(t, "changing")
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	dir := filepath.Join(t.TempDir(), "js")
	global := func(stream string, concurrency int) string {
		return fmt.Sprintf("\tmux_webhook {\n\t\tqueue {\n\t\t\tdir %s\n%s\t\t}\n\t\tdestination steady %s\n\t\tdestination changing %s {\n\t\t\tconcurrency %d\n\t\t}\n\t}",
			dir, stream, steady.URL, changing.URL, concurrency)
	}
	site := fmt.Sprintf("mux_webhook %s\n\tmux_deliver steady changing", testSecret)
	cfg, g := gatewayConfigWith(t, "off", global("", 4), site)
	g.load(cfg)
	changed := strings.Replace(cfg, global("", 4), global("", 2), 1)
	failsLater := changed + fmt.Sprintf("\nhttp://%s {\n\trespond 204\n}\n", busy.Addr())
	failsInApp := strings.Replace(cfg, global("", 4), global("\t\t\tstream OTHER\n", 2), 1)
	for i := range 8 {
		if err := loadCaddyfile(failsLater); err == nil {
			t.Fatalf("reload %d on a busy port succeeded", i+1)
		}
		if err := loadCaddyfile(failsInApp); err == nil {
			t.Fatalf("reload %d renaming the stream succeeded", i+1)
		}
	}
	for _, c := range []string{changed, cfg, cfg} {
		if err := loadCaddyfile(c); err != nil {
			t.Fatal(err)
		}
	}
	appVal, err := caddy.ActiveContext().App("mux_webhook")
	if err != nil {
		t.Fatal(err)
	}
	d := appVal.(*App).queue
	keys := []string{d.workerKeys["steady"], d.workerKeys["changing"]}
	if n, _ := storePool.References(d.poolKey); n != 1 {
		t.Errorf("the store has %d users, want 1 (the running config)", n)
	}
	for _, k := range keys {
		if n, _ := workerPool.References(k); n != 1 {
			t.Errorf("workers %s… have %d users, want 1", k[len(k)-8:], n)
		}
	}
	status, _, _ := doAfterReload(t, func() *http.Request {
		return signedRequest(t, g.url, testSecret, event("video.asset.ready", "pools-1", ""), time.Now())
	})
	if status != http.StatusAccepted {
		t.Fatalf("%d, want 202", status)
	}
	testwait.For(t, func() bool { return len(steady.requests()) == 1 && len(changing.requests()) == 1 },
		func() string {
			return fmt.Sprintf("steady %d, changing %d", len(steady.requests()), len(changing.requests()))
		})
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	if n, ok := storePool.References(d.poolKey); ok {
		t.Errorf("after Caddy stopped, the store still has %d users", n)
	}
	for _, k := range keys {
		if n, ok := workerPool.References(k); ok {
			t.Errorf("after Caddy stopped, workers still have %d users", n)
		}
	}
}

// TestMuxDeliverWarnsOfOrphans: a reload that removes a destination with
// copies still queued says so at WARN, with the destination and how many.
func TestMuxDeliverWarnsOfOrphans(t *testing.T) {
	app := newUpstream(t, "app")
	down := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusServiceUnavailable)
	}))
	t.Cleanup(down.Close)
	dir := filepath.Join(t.TempDir(), "js")
	appLine := "\t\tdestination app " + app.URL
	goneLine := fmt.Sprintf("\t\tdestination gone %s {\n\t\t\tretry 1h\n\t\t}", down.URL)
	cfg, g := gatewayConfigWith(t, "off", deliverGlobal(dir, appLine, goneLine), fmt.Sprintf("mux_webhook %s\n\tmux_deliver app gone", testSecret))
	g.load(cfg)
	if status, _, _ := do(t, signedRequest(t, g.url, testSecret, event("video.asset.ready", "orphan-1", ""), time.Now())); status != http.StatusAccepted {
		t.Fatalf("%d, want 202", status)
	}
	testwait.For(t, func() bool { return len(app.requests()) == 1 }, func() string { return "no delivery to app" })
	without := strings.Replace(strings.Replace(cfg, "\n"+goneLine, "", 1), "mux_deliver app gone", "mux_deliver app", 1)
	if err := loadCaddyfile(without); err != nil {
		t.Fatal(err)
	}
	var warned map[string]any
	testwait.For(t, func() bool {
		for _, l := range g.logLines() {
			if strings.HasPrefix(fmt.Sprint(l["msg"]), "mux_webhook: events are queued for a destination that is no longer configured") {
				warned = l
				return true
			}
		}
		return false
	}, func() string { return "no warning about gone's queued copy" })
	if warned["level"] != "warn" || warned["destination"] != "gone" || warned["queued"] != float64(1) {
		t.Errorf("the warning: %v", warned)
	}
}

// rolledBackReloads loads cfg, plus a site on a port already in use, n
// times: each reload fails in the http app, and Caddy rolls it back. Caddy
// starts a config's apps in map order: within a few tries, the mux_webhook
// app starts before the http app fails.
func rolledBackReloads(t *testing.T, cfg string, n int) {
	t.Helper()
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	failing := cfg + fmt.Sprintf("\nhttp://%s {\n\trespond 204\n}\n", busy.Addr())
	for i := range n {
		if err := loadCaddyfile(failing); err == nil {
			t.Fatalf("reload %d on a busy port succeeded", i+1)
		}
	}
}

// TestQueueDirSpellingsShareTheStore: reloads switching the queue's dir
// between D, D/ and a symlink to D while events flow all load (one store:
// a second one on D would be refused, the directory is locked), and every
// event answered 202 is delivered once.
func TestQueueDirSpellingsShareTheStore(t *testing.T) {
	app := newUpstream(t, "app")
	base := t.TempDir()
	dir := filepath.Join(base, "js")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(base, "link")
	if err := os.Symlink(dir, link); err != nil {
		t.Fatal(err)
	}
	site := fmt.Sprintf("mux_webhook %s\n\tmux_deliver app", testSecret)
	dest := fmt.Sprintf("\t\tdestination app %s {\n\t\t\tretry 50ms\n\t\t}", app.URL)
	cfg, g := gatewayConfigWith(t, "off", deliverGlobal(dir, dest), site)
	g.load(cfg)
	spellings := []string{dir + "/", link, dir, link + "/", filepath.Join(base, ".", "js")}

	accepted := sendDuringReloads(t, g.url, "spelling-", 150, 30*time.Second)
	for i := range 10 {
		spelled := strings.Replace(cfg, deliverGlobal(dir, dest), deliverGlobal(spellings[i%len(spellings)], dest), 1)
		if err := loadCaddyfile(spelled); err != nil {
			t.Fatalf("reload %d to dir %s: %v", i+1, spellings[i%len(spellings)], err)
		}
		time.Sleep(60 * time.Millisecond)
	}
	ids := accepted()
	if len(ids) < 50 {
		t.Fatalf("only %d events were accepted during the reloads", len(ids))
	}
	count := func() map[string]int {
		got := map[string]int{}
		for _, r := range app.requests() {
			got[r.Header.Get("Idempotency-Key")]++
		}
		return got
	}
	testwait.For(t, func() bool {
		got := count()
		for _, id := range ids {
			if got[id] == 0 {
				return false
			}
		}
		return true
	}, func() string { return fmt.Sprintf("of %d accepted, %d delivered", len(ids), len(count())) })
	time.Sleep(300 * time.Millisecond)
	repeated := 0
	for _, n := range count() {
		if n > 1 {
			repeated++
		}
	}
	t.Logf("%d events accepted across 10 reloads of the dir's spelling; %d delivered more than once", len(ids), repeated)
	if repeated > 0 {
		t.Errorf("%d events delivered more than once", repeated)
	}
}

// TestLedgerPerStream: the glue keeps one hand-back ledger per stream (its
// name, and where it is: the store directory or the NATS servers), so that
// a Store a reload opens again, with other credentials or the servers
// listed in another order, finds the copies its predecessor handed back;
// and another stream never shares it.
func TestLedgerPerStream(t *testing.T) {
	dir := t.TempDir()
	base := ledgerFor(queue.Config{Dir: dir, Stream: "LEDGER_GLUE"})
	for name, same := range map[string]queue.Config{
		"the same stream and dir": {Dir: dir, Stream: "LEDGER_GLUE"},
		"other credentials":       {Dir: dir, Stream: "LEDGER_GLUE", User: "someone", Password: "else"},
		"another max_bytes":       {Dir: dir, Stream: "LEDGER_GLUE", MaxBytes: 1 << 20},
	} {
		if ledgerFor(same) != base {
			t.Errorf("%s: another ledger; hand-backs would count as attempts after a reload", name)
		}
	}
	if ledgerFor(queue.Config{Dir: dir}) != ledgerFor(queue.Config{Dir: dir, Stream: queue.DefaultStream}) {
		t.Error(`stream "" and the default stream have two ledgers`)
	}
	urls := ledgerFor(queue.Config{URLs: []string{"nats://a:4222", "nats://b:4222"}, Stream: "LEDGER_GLUE"})
	if ledgerFor(queue.Config{URLs: []string{"nats://b:4222", "nats://a:4222"}, Stream: "LEDGER_GLUE"}) != urls {
		t.Error("the NATS servers listed in another order have another ledger")
	}
	for name, other := range map[string]queue.Config{
		"another stream":     {Dir: dir, Stream: "LEDGER_GLUE_2"},
		"another dir":        {Dir: t.TempDir(), Stream: "LEDGER_GLUE"},
		"the stream on NATS": {URLs: []string{"nats://a:4222"}, Stream: "LEDGER_GLUE"},
	} {
		if l := ledgerFor(other); l == base || l == nil {
			t.Errorf("%s: shares the ledger (or has none)", name)
		}
	}
}
