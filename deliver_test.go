package muxwebhook

// The mux_deliver handler and its workers through an in-process Caddy:
// fan-out, a full queue, slow and failing backends, dead letters through
// the CLI, reloads while events flow, Idempotency-Key.

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/internal/testwait"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// deliverGlobal is the mux_webhook global option with an embedded queue
// in dir and the given destination lines.
func deliverGlobal(dir string, destinations ...string) string {
	return fmt.Sprintf("\tmux_webhook {\n\t\tqueue {\n\t\t\tdir %s\n\t\t}\n%s\n\t}", dir, strings.Join(destinations, "\n"))
}

// TestMuxDeliverFanOut: mux_deliver answers 202 once the event is stored
// for every destination; each destination's backend receives it byte for
// byte, re-signed; the same event id sent 5 times is queued once per
// destination; an
// event matched by no fan-out route goes to analytics only.
func TestMuxDeliverFanOut(t *testing.T) {
	assets, analytics := newUpstream(t, "assets"), newUpstream(t, "analytics")
	dir := filepath.Join(t.TempDir(), "js")
	g := startGatewayWithAdmin(t, deliverGlobal(dir,
		fmt.Sprintf("\t\tdestination assets %s {\n\t\t\tretry 50ms\n\t\t\tsign dest-secret\n\t\t}", assets.URL),
		fmt.Sprintf("\t\tdestination analytics %s {\n\t\t\tretry 50ms\n\t\t}", analytics.URL),
	), fmt.Sprintf(`
	mux_webhook %s
	@assets mux_event video.asset.*
	mux_deliver @assets assets analytics
	mux_deliver analytics`, testSecret))

	body := event("video.asset.ready", "deliver-1", "")
	for i := range 5 { // the same event id 5 times: Mux's redeliveries are absorbed
		status, _, got := do(t, signedRequest(t, g.url, testSecret, body, time.Now()))
		if status != http.StatusAccepted || got != "" {
			t.Fatalf("delivery %d: %d %q, want 202 and no body", i+1, status, got)
		}
	}
	live := event("video.live_stream.active", "deliver-2", "")
	if status, _, _ := do(t, signedRequest(t, g.url, testSecret, live, time.Now())); status != http.StatusAccepted {
		t.Fatalf("live event: %d", status)
	}
	testwait.For(t, func() bool { return len(assets.requests()) >= 1 && len(analytics.requests()) >= 2 }, func() string {
		return fmt.Sprintf("assets got %d, analytics %d", len(assets.requests()), len(analytics.requests()))
	})
	time.Sleep(300 * time.Millisecond) // nothing more arrives
	if n, m := len(assets.requests()), len(analytics.requests()); n != 1 || m != 2 {
		t.Fatalf("assets got %d, analytics %d; want 1 and 2", n, m)
	}
	got := assets.requests()[0]
	if string(got.Body) != string(body) || got.Header.Get("Idempotency-Key") != "deliver-1" ||
		got.Header.Get("Mux-Webhook-Attempt") != "1" || got.Header.Get("Mux-Webhook-Destination") != "assets" {
		t.Errorf("assets got %+v", got.Header)
	}
	sig, err := ParseSignature(got.Header.Get(SignatureHeader))
	if err != nil || NewVerifier([][]byte{[]byte("dest-secret")}).Check(sig, got.Body, time.Now(), time.Minute) != nil {
		t.Errorf("assets: signature %q is not a fresh one made with sign", got.Header.Get(SignatureHeader))
	}
	// The live log shows the delivery attempts next to the requests.
	var attempts []LogEntry
	getJSON(t, g.admin+"/mux-webhook/events?outcome=delivered", &attempts)
	byDest := map[string]int{}
	for _, e := range attempts {
		if e.ID == "deliver-1" && e.Attempt == 1 && e.Status == 200 {
			byDest[e.Destination]++
		}
	}
	if byDest["assets"] != 1 || byDest["analytics"] != 1 {
		t.Errorf("live log delivery attempts of deliver-1: %v", byDest)
	}
	// Without sign, Mux's original signature is passed on.
	a := analytics.requests()[0]
	if sig, err := ParseSignature(a.Header.Get(SignatureHeader)); err != nil || NewVerifier([][]byte{[]byte(testSecret)}).Check(sig, a.Body, time.Now(), time.Minute) != nil {
		t.Errorf("analytics: signature %q is not Mux's", a.Header.Get(SignatureHeader))
	}
}

// failingBackend answers 500 until failing is set to false, then 200,
// counting in got the deliveries it accepted.
func failingBackend(t *testing.T) (app *httptest.Server, failing *atomic.Bool, got *atomic.Int32) {
	failing, got = new(atomic.Bool), new(atomic.Int32)
	failing.Store(true)
	app = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if failing.Load() {
			w.WriteHeader(http.StatusInternalServerError)
			return
		}
		got.Add(1)
	}))
	t.Cleanup(app.Close)
	return app, failing, got
}

// TestQueueDeadLettersAndCLI: a destination that always fails makes the
// event a dead letter after max_attempts; the admin API and `caddy
// mux-webhook queue` show it; once the backend is fixed, the CLI
// redelivers it and it arrives; purge empties the dead letters; a change
// without a JSON content type is refused.
func TestQueueDeadLettersAndCLI(t *testing.T) {
	app, failing, got := failingBackend(t)
	dir := filepath.Join(t.TempDir(), "js")
	g := startGatewayWithAdmin(t, deliverGlobal(dir,
		fmt.Sprintf("\t\tdestination app %s {\n\t\t\tretry 20ms\n\t\t\tmax_attempts 2\n\t\t}", app.URL),
	), fmt.Sprintf("mux_webhook %s\n\tmux_deliver app", testSecret))
	before := scrape(t, g.admin)
	for _, id := range []string{"dl-1", "dl-2"} {
		if status, _, _ := do(t, signedRequest(t, g.url, testSecret, event("video.asset.errored", id, ""), time.Now())); status != http.StatusAccepted {
			t.Fatalf("%s: %d", id, status)
		}
	}
	var status []QueueStatus
	testwait.For(t, func() bool {
		status = nil
		getJSON(t, g.admin+"/mux-webhook/queue", &status)
		return len(status) == 1 && status[0].Dead == 2
	}, func() string { return fmt.Sprintf("queue status: %+v", status) })
	if s := status[0]; s.Name != "app" || s.Pending != 0 || s.LastError != "app answered 500" {
		t.Errorf("status: %+v", s)
	}
	var m map[string]float64
	testwait.For(t, func() bool {
		m = scrape(t, g.admin)
		return m[`caddy_mux_webhook_queue_dead{destination="app"}`] == 2
	}, func() string { return fmt.Sprintf("metrics: %v", m) })
	if d := m[`caddy_mux_webhook_deliveries_total{destination="app",result="dead"}`] - before[`caddy_mux_webhook_deliveries_total{destination="app",result="dead"}`]; d != 2 {
		t.Errorf("deliveries_total dead grew by %v, want 2", d)
	}
	if d := m[`caddy_mux_webhook_deliveries_total{destination="app",result="retry"}`] - before[`caddy_mux_webhook_deliveries_total{destination="app",result="retry"}`]; d != 2 {
		t.Errorf("deliveries_total retry grew by %v, want 2 (one per event before max_attempts 2)", d)
	}
	admin := strings.TrimPrefix(g.admin, "http://")
	out, err := runCommand(t, "", "queue", "dead", "app", "--address", admin)
	if err != nil || !strings.Contains(out, "dl-1") || !strings.Contains(out, "video.asset.errored") || !strings.Contains(out, "app answered 500") {
		t.Fatalf("queue dead: %v\n%s", err, out)
	}
	// A form cannot redeliver.
	req, _ := http.NewRequest(http.MethodPost, g.admin+"/mux-webhook/queue/redeliver", strings.NewReader("destination=app&all=true"))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	if code, _, _ := do(t, req); code != http.StatusUnsupportedMediaType {
		t.Errorf("a form's redeliver: %d, want 415", code)
	}
	failing.Store(false)
	if out, err := runCommand(t, "", "queue", "redeliver", "app", "dl-1", "--address", admin); err != nil || !strings.Contains(out, "redelivered 1") {
		t.Fatalf("queue redeliver: %v\n%s", err, out)
	}
	testwait.For(t, func() bool { return got.Load() == 1 }, func() string { return "the redelivered event never arrived" })
	if out, err := runCommand(t, "", "queue", "--address", admin); err != nil || !strings.Contains(out, "app") {
		t.Fatalf("queue: %v\n%s", err, out)
	}
	if out, err := runCommand(t, "y\n", "queue", "purge", "app", "--address", admin); err != nil || !strings.Contains(out, "purged") {
		t.Fatalf("queue purge: %v\n%s", err, out)
	}
	status = nil
	getJSON(t, g.admin+"/mux-webhook/queue", &status)
	if len(status) != 1 || status[0].Dead != 0 || status[0].Delivered != 1 {
		t.Errorf("after purge: %+v", status)
	}
}

// TestMuxDeliverQueueFull: when the queue holds max_bytes, mux_deliver
// answers 503 (Mux retries) and nothing stored is dropped: every event
// answered 202 is delivered once the backend takes them.
func TestMuxDeliverQueueFull(t *testing.T) {
	var up atomic.Bool
	var mu sync.Mutex
	delivered := map[string]bool{}
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !up.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		mu.Lock()
		delivered[r.Header.Get("Idempotency-Key")] = true
		mu.Unlock()
	}))
	t.Cleanup(app.Close)
	dir := filepath.Join(t.TempDir(), "js")
	cfg, g2 := gatewayConfigWith(t, "off",
		fmt.Sprintf("\tmux_webhook {\n\t\tqueue {\n\t\t\tdir %s\n\t\t\tmax_bytes 64KiB\n\t\t}\n\t\tdestination app %s {\n\t\t\tretry 100ms\n\t\t\tbreaker 10 200ms\n\t\t}\n\t}", dir, app.URL),
		fmt.Sprintf("mux_webhook %s\n\tmux_deliver app", testSecret))
	g2.load(cfg)
	fullCount := muxMetrics.enqueueFails.WithLabelValues("app", "full")
	before := testutil.ToFloat64(fullCount)
	var accepted []string
	full := false
	for i := range 100 { // 100 × 4 KiB is far over 64 KiB
		id := fmt.Sprint("full-", i)
		body := event("video.asset.ready", id, fmt.Sprintf(`{"pad":%q}`, strings.Repeat("p", 4<<10)))
		status, _, _ := do(t, signedRequest(t, g2.url, testSecret, body, time.Now()))
		if status == http.StatusServiceUnavailable {
			full = true
			break
		}
		if status != http.StatusAccepted {
			t.Fatalf("%s: %d", id, status)
		}
		accepted = append(accepted, id)
	}
	if !full || len(accepted) == 0 {
		t.Fatalf("no 503 after %d accepted events", len(accepted))
	}
	if d := testutil.ToFloat64(fullCount) - before; d != 1 {
		t.Errorf(`enqueue_failures_total{destination="app",reason="full"} grew by %v, want 1`, d)
	}
	up.Store(true)
	testwait.For(t, func() bool {
		mu.Lock()
		defer mu.Unlock()
		for _, id := range accepted {
			if !delivered[id] {
				return false
			}
		}
		return true
	}, func() string {
		return fmt.Sprintf("not every one of the %d accepted events was delivered", len(accepted))
	})
}

// TestMuxDeliverSlowBackend: a backend that takes longer than Mux's 5 s
// still gets the event, once: Mux got its 202 at once, and the attempt's
// own timeout (30s by default) is what counts.
func TestMuxDeliverSlowBackend(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: waits for real time by design (a backend that answers in 6 s, past Mux's 5); ./scripts/test runs it")
	}
	var got atomic.Int32
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(6 * time.Second)
		got.Add(1)
	}))
	t.Cleanup(slow.Close)
	dir := filepath.Join(t.TempDir(), "js")
	cfg, g := gatewayConfigWith(t, "off", deliverGlobal(dir, fmt.Sprintf("\t\tdestination slow %s", slow.URL)),
		fmt.Sprintf("mux_webhook %s\n\tmux_deliver slow", testSecret))
	g.load(cfg)
	if status, _, _ := do(t, signedRequest(t, g.url, testSecret, event("video.asset.ready", "slow-3", ""), time.Now())); status != http.StatusAccepted {
		t.Fatalf("%d, want 202", status)
	}
	if got.Load() != 0 {
		t.Error("the 202 waited for the backend")
	}
	deadline := time.Now().Add(15 * time.Second)
	for got.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond)
	if n := got.Load(); n != 1 {
		t.Fatalf("the slow backend completed %d deliveries, want 1", n)
	}
}

// TestMuxDeliverBackendDownThenUp: a destination down for a while gets
// every event once it is up again, after retries on its schedule; each
// attempt is counted (Mux-Webhook-Attempt, deliveries_total, the live
// log) and nothing is delivered twice.
func TestMuxDeliverBackendDownThenUp(t *testing.T) {
	const downFor = 3 // failed attempts per event before the backend is up
	var mu sync.Mutex
	tries := map[string]int{}     // attempts seen per event id
	delivered := map[string]int{} // 2xx answered per event id
	var lastAttempt sync.Map      // id → Mux-Webhook-Attempt of the delivery
	t.Setenv("MUX_TEST_APP_TOKEN", "token-from-env")
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id := r.Header.Get("Idempotency-Key")
		if r.Header.Get("Authorization") != "Bearer token-from-env" {
			t.Errorf("Authorization: %q; want the header line with {env.MUX_TEST_APP_TOKEN} resolved", r.Header.Get("Authorization"))
		}
		mu.Lock()
		defer mu.Unlock()
		tries[id]++
		if tries[id] <= downFor {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		delivered[id]++
		lastAttempt.Store(id, r.Header.Get("Mux-Webhook-Attempt"))
	}))
	t.Cleanup(app.Close)
	dir := filepath.Join(t.TempDir(), "js")
	g := startGatewayWithAdmin(t, deliverGlobal(dir,
		fmt.Sprintf("\t\tdestination app %s {\n\t\t\tretry 20ms 50ms\n\t\t\theader Authorization \"Bearer {env.MUX_TEST_APP_TOKEN}\"\n\t\t}", app.URL),
	), fmt.Sprintf("mux_webhook %s\n\tmux_deliver app", testSecret))
	before := scrape(t, g.admin)
	ids := []string{"down-1", "down-2", "down-3"}
	for _, id := range ids {
		if status, _, _ := do(t, signedRequest(t, g.url, testSecret, event("video.asset.ready", id, ""), time.Now())); status != http.StatusAccepted {
			t.Fatalf("%s: %d, want 202", id, status)
		}
	}
	testwait.For(t, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(delivered) == len(ids)
	}, func() string { return fmt.Sprintf("delivered %v after tries %v", delivered, tries) })
	time.Sleep(300 * time.Millisecond) // nothing more arrives
	mu.Lock()
	for _, id := range ids {
		if delivered[id] != 1 || tries[id] != downFor+1 {
			t.Errorf("%s: delivered %d times after %d tries; want once, after %d", id, delivered[id], tries[id], downFor+1)
		}
		if n, _ := lastAttempt.Load(id); n != fmt.Sprint(downFor+1) {
			t.Errorf("%s: delivered with Mux-Webhook-Attempt %v, want %d", id, n, downFor+1)
		}
	}
	mu.Unlock()
	var m map[string]float64
	testwait.For(t, func() bool {
		m = scrape(t, g.admin)
		return m[`caddy_mux_webhook_deliveries_total{destination="app",result="delivered"}`]-before[`caddy_mux_webhook_deliveries_total{destination="app",result="delivered"}`] == 3
	}, func() string { return fmt.Sprintf("metrics: %v", m) })
	if d := m[`caddy_mux_webhook_deliveries_total{destination="app",result="retry"}`] - before[`caddy_mux_webhook_deliveries_total{destination="app",result="retry"}`]; d != 3*downFor {
		t.Errorf("deliveries_total retry grew by %v, want %d", d, 3*downFor)
	}
	var retries []LogEntry
	getJSON(t, g.admin+"/mux-webhook/events?outcome=retry", &retries)
	n := 0
	for _, e := range retries {
		if e.ID == "down-2" && e.Destination == "app" && e.Status == http.StatusServiceUnavailable && e.Error == "app answered 503" {
			n++
		}
	}
	if n != downFor {
		t.Errorf("the live log shows %d failed attempts of down-2, want %d", n, downFor)
	}
	var status []QueueStatus
	getJSON(t, g.admin+"/mux-webhook/queue", &status)
	if len(status) != 1 || status[0].Delivered != 3 || status[0].Pending != 0 || status[0].Dead != 0 {
		t.Errorf("queue status: %+v", status)
	}
}

// TestMuxDeliverReloadsWhileEventsFlow: 20 config reloads while events
// arrive, alternating a destination's settings (new workers for it) and
// the stream's limits (applied to the running stream), with a second
// destination left as it was (its workers carry on): every event answered
// 202 reaches both destinations, and none twice, since no attempt's
// outcome was lost.
func TestMuxDeliverReloadsWhileEventsFlow(t *testing.T) {
	steady, changing := newUpstream(t, "steady"), newUpstream(t, "changing")
	dir := filepath.Join(t.TempDir(), "js")
	port := freePort(t)
	global := func(concurrency int, maxBytes string) string {
		return fmt.Sprintf("\tmux_webhook {\n\t\tqueue {\n\t\t\tdir %s\n\t\t\tmax_bytes %s\n\t\t}\n"+
			"\t\tdestination steady %s {\n\t\t\tretry 50ms\n\t\t}\n"+
			"\t\tdestination changing %s {\n\t\t\tretry 50ms\n\t\t\tconcurrency %d\n\t\t}\n\t}",
			dir, maxBytes, steady.URL, changing.URL, concurrency)
	}
	site := fmt.Sprintf("mux_webhook %s\n\tmux_deliver steady changing", testSecret)
	cfgA, g := gatewayConfigWith(t, fmt.Sprintf("localhost:%d", port), global(4, "64MiB"), site)
	cfgB := strings.Replace(cfgA, global(4, "64MiB"), global(2, "32MiB"), 1)
	g.admin = fmt.Sprintf("http://localhost:%d", port)
	g.load(cfgA)

	accepted := sendDuringReloads(t, g.url, "flow-", 400, 60*time.Second)
	for i := range 20 {
		cfg := cfgB
		if i%2 == 1 {
			cfg = cfgA
		}
		if err := loadCaddyfile(cfg); err != nil {
			t.Fatalf("reload %d: %v", i+1, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	ids := accepted()
	if len(ids) < 100 {
		t.Fatalf("only %d events were accepted during the reloads", len(ids))
	}
	count := func(u *upstream) map[string]int {
		got := map[string]int{}
		for _, r := range u.requests() {
			got[r.Header.Get("Idempotency-Key")]++
		}
		return got
	}
	testwait.For(t, func() bool {
		s, c := count(steady), count(changing)
		for _, id := range ids {
			if s[id] == 0 || c[id] == 0 {
				return false
			}
		}
		return true
	}, func() string {
		return fmt.Sprintf("of %d accepted events, steady got %d, changing %d", len(ids), len(count(steady)), len(count(changing)))
	})
	time.Sleep(300 * time.Millisecond)
	for _, u := range []*upstream{steady, changing} {
		repeated := 0
		for _, n := range count(u) {
			if n > 1 {
				repeated++
			}
		}
		t.Logf("%s: %d accepted events, %d delivered more than once", u.name, len(ids), repeated)
		if repeated > 0 {
			t.Errorf("%s received %d events more than once across reloads", u.name, repeated)
		}
	}
}

// TestQueueReloadChangesTheStream: a reload's max_bytes applies to the
// running stream (here: a smaller one fills, 503); renaming the stream of
// a running store is a load error that says what to do, and the running
// config carries on.
func TestQueueReloadChangesTheStream(t *testing.T) {
	down := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusServiceUnavailable)
	}))
	t.Cleanup(down.Close)
	dir := filepath.Join(t.TempDir(), "js")
	queueOpts := func(opts string) string {
		return fmt.Sprintf("\tmux_webhook {\n\t\tqueue {\n\t\t\tdir %s\n%s\t\t}\n\t\tdestination app %s {\n\t\t\tretry 1h\n\t\t}\n\t}", dir, opts, down.URL)
	}
	site := fmt.Sprintf("mux_webhook %s\n\tmux_deliver app", testSecret)
	cfg, g := gatewayConfigWith(t, "off", queueOpts(""), site)
	g.load(cfg)
	pad := fmt.Sprintf(`{"pad":%q}`, strings.Repeat("p", 4<<10))
	send := func(id string) int {
		status, _, _ := doAfterReload(t, func() *http.Request {
			return signedRequest(t, g.url, testSecret, event("video.asset.ready", id, pad), time.Now())
		})
		return status
	}
	for i := range 20 { // 80 KiB: fits the default 1 GiB
		if status := send(fmt.Sprint("big-", i)); status != http.StatusAccepted {
			t.Fatalf("big-%d: %d", i, status)
		}
	}
	small := strings.Replace(cfg, queueOpts(""), queueOpts("\t\t\tmax_bytes 64KiB\n"), 1)
	err := loadCaddyfile(small)
	if err == nil {
		// The stream already holds more than 64 KiB: JetStream may refuse
		// to shrink it below what it holds, or accept and refuse new
		// events. Either is fine, but never silence: new events get 503.
		if status := send("after-shrink"); status != http.StatusServiceUnavailable {
			t.Errorf("after max_bytes 64KiB on a stream holding 80 KiB: %d, want 503", status)
		}
	} else if !strings.Contains(err.Error(), "max_bytes") {
		t.Errorf("shrinking max_bytes: %v; want an error naming max_bytes", err)
	}
	renamed := strings.Replace(cfg, queueOpts(""), queueOpts("\t\t\tstream OTHER\n"), 1)
	err = loadCaddyfile(renamed)
	if err == nil || !strings.Contains(err.Error(), "cannot rename") || !strings.Contains(err.Error(), "MUX_WEBHOOK") {
		t.Fatalf("renaming the stream on reload: %v; want a load error naming the running stream", err)
	}
	if err := loadCaddyfile(cfg); err != nil { // back to the default: 1 GiB again
		t.Fatal(err)
	}
	if status := send("after-restore"); status != http.StatusAccepted {
		t.Errorf("after restoring max_bytes: %d, want 202", status)
	}
}

// sendDuringReloads sends n distinct signed events (ids prefix0, prefix1,
// …) to url one after another while the test reloads Caddy, bounded by
// limit; the function it returns waits for the last and returns the ids
// answered 202 (one cut by a reload is not: Mux would send it again).
func sendDuringReloads(t *testing.T, url, prefix string, n int, limit time.Duration) (accepted func() []string) {
	t.Helper()
	var mu sync.Mutex
	var ids []string
	done := make(chan struct{})
	go func() { // bounded in count and time
		defer close(done)
		client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
		deadline := time.Now().Add(limit)
		for i := 0; i < n && time.Now().Before(deadline); i++ {
			id := fmt.Sprint(prefix, i)
			resp, err := client.Do(signedRequest(t, url, testSecret, event("video.asset.ready", id, ""), time.Now()))
			if err != nil {
				continue // cut by a reload: Mux would retry; not answered 202
			}
			resp.Body.Close()
			if resp.StatusCode == http.StatusAccepted {
				mu.Lock()
				ids = append(ids, id)
				mu.Unlock()
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	return func() []string {
		<-done
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), ids...)
	}
}

// TestDeliverIdempotencyKeyEncoded: event ids holding control characters
// are delivered on the first attempt, with the README's encoded keys
// ("a\u0001b" → pct:a%01b, "a\nb" → pct:a%0Ab); a plain id is its own key.
func TestDeliverIdempotencyKeyEncoded(t *testing.T) {
	app := newUpstream(t, "app")
	dir := filepath.Join(t.TempDir(), "js")
	g := startGatewayWithAdmin(t, deliverGlobal(dir, fmt.Sprintf("\t\tdestination app %s {\n\t\t\tretry 20ms\n\t\t}", app.URL)),
		fmt.Sprintf("mux_webhook %s\n\tmux_deliver app", testSecret))
	want := map[string]string{"a\u0001b": "pct:a%01b", "a\nb": "pct:a%0Ab", "plain-1": "plain-1"}
	for id := range want {
		idJSON, _ := json.Marshal(id)
		body := []byte(fmt.Sprintf(`{"type":"video.asset.ready","id":%s,"data":{}}`, idJSON))
		if status, _, got := do(t, signedRequest(t, g.url, testSecret, body, time.Now())); status != http.StatusAccepted {
			t.Fatalf("id %q: %d %s", id, status, got)
		}
	}
	testwait.For(t, func() bool { return len(app.requests()) >= len(want) }, func() string { return fmt.Sprintf("app got %d", len(app.requests())) })
	time.Sleep(200 * time.Millisecond)
	keys := map[string]int{}
	for _, r := range app.requests() {
		keys[r.Header.Get("Idempotency-Key")]++
		if a := r.Header.Get("Mux-Webhook-Attempt"); a != "1" {
			t.Errorf("key %q: attempt %s, want 1", r.Header.Get("Idempotency-Key"), a)
		}
	}
	for id, key := range want {
		if keys[key] != 1 {
			t.Errorf("id %q: key %q received %d times; received %v", id, key, keys[key], keys)
		}
	}
}
