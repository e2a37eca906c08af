package muxwebhook

// The queue on the admin API (deliver_admin.go) and operating it: status
// while loading and after a rolled-back reload, dead letters with room of
// their own, redeliver and purge, destination URLs that never leak,
// last_error_at and counted duplicates. In-process Caddy.

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/internal/testwait"
)

// TestQueueAdminWhileLoading: the admin API serves while a config loads.
// GET /mux-webhook/queue must then not provision the mux_webhook app
// itself: the load would find a half-provisioned app ("unknown
// destination"), and both would write the config's map of apps at once
// (go test -race reports it). It answers once the app has started.
func TestQueueAdminWhileLoading(t *testing.T) {
	backend := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	t.Cleanup(backend.Close)
	adminPort := freePort(t)
	cfg, _ := gatewayConfigWith(t, fmt.Sprintf("127.0.0.1:%d", adminPort),
		deliverGlobal(t.TempDir(), "\t\tdestination app "+backend.URL),
		fmt.Sprintf("mux_webhook %s\n\tmux_deliver app", testSecret))
	stop := make(chan struct{})
	var ok atomic.Int32
	var wg sync.WaitGroup
	wg.Go(func() {
		client := &http.Client{Timeout: time.Second}
		for {
			select {
			case <-stop:
				return
			default:
			}
			resp, err := client.Get(fmt.Sprintf("http://127.0.0.1:%d/mux-webhook/queue", adminPort))
			if err == nil {
				if resp.StatusCode == http.StatusOK {
					ok.Add(1)
				}
				resp.Body.Close()
			}
		}
	})
	defer func() {
		close(stop)
		wg.Wait()
	}()
	// Each load starts the admin API anew, then provisions the apps.
	for i := range 10 {
		if err := loadCaddyfile(cfg); err != nil {
			t.Fatalf("load %d, with the queue endpoint polled: %v", i+1, err)
		}
		testwait.For(t, func() bool { return ok.Load() > 0 }, func() string { return "GET /mux-webhook/queue never answered 200" })
		ok.Store(0)
		if err := stopCaddy(); err != nil {
			t.Fatal(err)
		}
	}
}

// attemptBackend answers status() and records the highest
// Mux-Webhook-Attempt and how many POSTs it got, per event id.
type attemptBackend struct {
	*httptest.Server
	status     atomic.Int32
	maxAttempt atomic.Int32
	mu         sync.Mutex
	posts      map[string]int
}

func newAttemptBackend(t *testing.T, status int) *attemptBackend {
	b := &attemptBackend{posts: map[string]int{}}
	b.status.Store(int32(status))
	b.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		n, _ := strconv.Atoi(r.Header.Get("Mux-Webhook-Attempt"))
		for {
			m := b.maxAttempt.Load()
			if int32(n) <= m || b.maxAttempt.CompareAndSwap(m, int32(n)) {
				break
			}
		}
		b.mu.Lock()
		b.posts[r.Header.Get("Idempotency-Key")]++
		b.mu.Unlock()
		w.WriteHeader(int(b.status.Load()))
	}))
	t.Cleanup(b.Close)
	return b
}

func (b *attemptBackend) total() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := 0
	for _, v := range b.posts {
		n += v
	}
	return n
}

func queueStatus(t *testing.T, admin string) map[string]QueueStatus {
	t.Helper()
	var list []QueueStatus
	if code := getJSON(t, admin+"/mux-webhook/queue", &list); code != http.StatusOK {
		t.Fatalf("GET /mux-webhook/queue: %d", code)
	}
	out := map[string]QueueStatus{}
	for _, q := range list {
		out[q.Name] = q
	}
	return out
}

// adminDo sends a change to the admin API with a JSON content type.
func adminDo(t *testing.T, method, url, body string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(method, url, strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	code, _, got := do(t, req)
	return code, got
}

// TestDeadStreamFullOperatorSees (README, "When things fail": "the stream is full (max_bytes)
// while a destination is down", <stream>_DEAD full too): with a tiny
// dead_max_bytes, the copies that do not fit stay queued, with an ERROR
// line, caddy_mux_webhook_dead_letter_failures_total and the status
// saying so; no POST goes past max_attempts; once the operator purges
// dead letters (the CLI, --yes), the rest are buried.
func TestDeadStreamFullOperatorSees(t *testing.T) {
	b := newAttemptBackend(t, http.StatusInternalServerError)
	dir := filepath.Join(t.TempDir(), "js")
	g := startGatewayWithAdmin(t, fmt.Sprintf(`	mux_webhook {
		queue {
			dir %s
			dead_max_bytes 3000
		}
		destination app %s {
			retry 20ms
			max_attempts 2
			timeout 1s
			breaker off
		}
	}`, dir, b.URL), fmt.Sprintf("mux_webhook %s\n\tmux_deliver app", testSecret))
	// (breaker off: every copy of the failing backend is to die at
	// max_attempts, not wait for a probe.)
	// (timeout 1s: NATS may hold a copy nak'd every 20 ms until its ack
	// deadline, timeout + 5s, seen once in a few runs.)
	const n = 8
	pad := fmt.Sprintf(`{"pad":%q}`, strings.Repeat("p", 400))
	for i := range n {
		if code, _, _ := do(t, signedRequest(t, g.url, testSecret, event("video.asset.errored", fmt.Sprintf("df-%d", i), pad), time.Now())); code != http.StatusAccepted {
			t.Fatalf("event %d: %d", i, code)
		}
	}
	var m map[string]float64
	testwait.For(t, func() bool {
		m = scrape(t, g.admin)
		return m[`caddy_mux_webhook_dead_letter_failures_total{destination="app"}`] > 0
	}, func() string { return fmt.Sprintf("metrics: %v", m) })
	testwait.For(t, func() bool { return strings.Contains(g.rawLog(), "could not be kept as a dead letter") },
		func() string { return "no ERROR line about the dead letter not kept" })
	for _, l := range g.logLines() {
		if msg, _ := l["msg"].(string); strings.Contains(msg, "could not be kept as a dead letter") {
			if l["level"] != "error" || l["destination"] != "app" || l["id"] == "" {
				t.Errorf("the line: %v", l)
			}
			break
		}
	}
	st := queueStatus(t, g.admin)["app"]
	if st.Dead == 0 || st.Dead >= n || st.Pending+st.InFlight == 0 || !strings.Contains(st.LastError, "dead letter") {
		t.Errorf("status while <stream>_DEAD is full: %+v", st)
	}
	admin := strings.TrimPrefix(g.admin, "http://")
	purged := 0
	for round := 0; purged < n && round < 60; round++ { // at most ~20s
		out, err := runCommand(t, "", "queue", "purge", "app", "--yes", "--address", admin)
		if err != nil {
			t.Fatalf("queue purge --yes: %v\n%s", err, out)
		}
		var k int
		if _, err := fmt.Sscanf(out, "purged %d", &k); err == nil {
			purged += k
		}
		time.Sleep(300 * time.Millisecond)
	}
	if purged != n {
		t.Errorf("%d dead letters purged in all, want %d (every copy buried once)", purged, n)
	}
	if a := b.maxAttempt.Load(); a > 2 {
		t.Errorf("a POST carried Mux-Webhook-Attempt %d, past max_attempts 2", a)
	}
	if got := b.total(); got != 2*n {
		t.Errorf("%d POSTs for %d events, want 2 each", got, n)
	}
}

// TestQueueAdminAfterRolledBackReload (README, "When things fail": "a reload that Caddy rolls
// back"): the running config keeps serving GET /mux-webhook/queue, the
// CLI and the console's queue view.
func TestQueueAdminAfterRolledBackReload(t *testing.T) {
	b := newAttemptBackend(t, http.StatusOK)
	port := freePort(t)
	cfg, g := gatewayConfigWith(t, fmt.Sprintf("localhost:%d", port), deliverGlobal(filepath.Join(t.TempDir(), "js"), "\t\tdestination app "+b.URL),
		fmt.Sprintf("mux_webhook /mux %s\n\tmux_deliver /mux app\n\thandle_path /console/* {\n\t\tmux_webhook_ui\n\t}", testSecret))
	g.admin = fmt.Sprintf("http://localhost:%d", port)
	g.load(cfg)
	rolledBackReloads(t, cfg, 16)
	if st := queueStatus(t, g.admin); st["app"].Name != "app" || !st["app"].Configured {
		t.Errorf("after rolled-back reloads, GET /mux-webhook/queue: %+v", st)
	}
	var list []QueueStatus
	if code := getJSON(t, g.url+"/console/queue", &list); code != http.StatusOK || len(list) != 1 || list[0].Name != "app" {
		t.Errorf("after rolled-back reloads, the console's queue: %d %+v", code, list)
	}
	if out, err := runCommand(t, "", "queue", "--address", strings.TrimPrefix(g.admin, "http://")); err != nil || !strings.Contains(out, "app") {
		t.Errorf("after rolled-back reloads, caddy mux-webhook queue: %v\n%s", err, out)
	}
	// And it still delivers.
	if code, _, _ := do(t, signedRequest(t, g.url+"/mux", testSecret, event("video.asset.ready", "after-rollback", ""), time.Now())); code != http.StatusAccepted {
		t.Fatalf("event: %d", code)
	}
	testwait.For(t, func() bool { return b.total() == 1 }, func() string { return "the event was not delivered" })
}

// TestDestinationURLNeverShown: a destination URL with a password that
// is not valid (a % not followed by hex digits) or a bad port is a load
// error naming the option, never quoting it; a URL with user, password
// and query, its backend down, shows none of them in the log, the dead
// letter, the status or the live log.
func TestDestinationURLNeverShown(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "js")
	for _, c := range []struct{ url, secret string }{
		{"http://alice:p%zzw0rd@127.0.0.1:1/x", "zzw0rd"},
		{"http://alice:s3cr3t@127.0.0.1:99999/x", "s3cr3t"},
		{"http://alice:s3cr3t@127.0.0.1:port/x", "s3cr3t"},
		{"http://tok-a1b2/en9x@127.0.0.1:1/x", "tok-a1b2"}, // a '/' not escaped in the credentials: host "tok-a1b2"
	} {
		cfg, _ := gatewayConfigWith(t, "off", deliverGlobal(dir, "\t\tdestination app "+c.url), "mux_webhook s\n\tmux_deliver app")
		err := loadCaddyfile(cfg)
		if err == nil {
			_ = stopCaddy()
			t.Errorf("%s loaded", c.url)
			continue
		}
		if !strings.Contains(err.Error(), "destination app url") || strings.Contains(err.Error(), c.secret) || strings.Contains(err.Error(), "alice") {
			t.Errorf("%s: load error %q: want one naming 'destination app url', without the user or password", c.url, err)
		}
	}

	secrets := []string{"alice-usr", "tok-7f3q", "secret-9q2"}
	g := startGatewayWithAdmin(t, deliverGlobal(dir,
		"\t\tdestination app http://alice-usr:tok-7f3q@127.0.0.1:1/x?k=secret-9q2 {\n\t\t\tretry 20ms\n\t\t\tmax_attempts 2\n\t\t}"),
		fmt.Sprintf("mux_webhook %s\n\tmux_deliver app", testSecret))
	if code, _, _ := do(t, signedRequest(t, g.url, testSecret, event("video.asset.ready", "url-1", ""), time.Now())); code != http.StatusAccepted {
		t.Fatalf("event: %d", code)
	}
	testwait.For(t, func() bool { return queueStatus(t, g.admin)["app"].Dead == 1 }, func() string { return "no dead letter" })
	seen := map[string]string{"log file": g.rawLog()}
	for what, path := range map[string]string{
		"dead letters": "/mux-webhook/queue/dead?destination=app", "status": "/mux-webhook/queue", "live log": "/mux-webhook/events",
	} {
		resp, err := http.Get(g.admin + path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		seen[what] = string(body)
	}
	if !strings.Contains(seen["status"], "http://127.0.0.1:1/x") {
		t.Errorf("status: the URL without user and query is not shown: %s", seen["status"])
	}
	if !strings.Contains(seen["dead letters"], "url-1") || !strings.Contains(seen["live log"], "url-1") {
		t.Errorf("the dead letter or the live log does not show the attempt: %s / %s", seen["dead letters"], seen["live log"])
	}
	for what, text := range seen {
		for _, s := range secrets {
			if strings.Contains(text, s) {
				t.Errorf("the %s shows %q", what, s)
			}
		}
	}
}

// TestQueueOperating: last_error and last_error_at, cleared by a
// delivery; duplicates counted and logged; purge up to a listing's seq,
// a bad up_to refused, the CLI's purge asking; redeliver naming ids that
// are not dead letters; dead letters of a removed destination listed and
// purged, not redelivered.
func TestQueueOperating(t *testing.T) {
	app := newAttemptBackend(t, http.StatusInternalServerError)
	old := newAttemptBackend(t, http.StatusInternalServerError)
	dir := filepath.Join(t.TempDir(), "js")
	port := freePort(t)
	global := func(dests ...string) string { return deliverGlobal(dir, dests...) }
	appDest := fmt.Sprintf("\t\tdestination app %s {\n\t\t\tretry 20ms\n\t\t\tmax_attempts 2\n\t\t}", app.URL)
	oldDest := fmt.Sprintf("\t\tdestination old %s {\n\t\t\tretry 20ms\n\t\t\tmax_attempts 1\n\t\t}", old.URL)
	cfg, g := gatewayConfigWith(t, fmt.Sprintf("localhost:%d", port), global(appDest, oldDest), fmt.Sprintf("mux_webhook %s\n\tmux_deliver app old", testSecret))
	g.admin = fmt.Sprintf("http://localhost:%d", port)
	g.load(cfg)
	admin := strings.TrimPrefix(g.admin, "http://")
	before := scrape(t, g.admin)
	send := func(id string) {
		t.Helper()
		if code, _, _ := do(t, signedRequest(t, g.url, testSecret, event("video.asset.ready", id, ""), time.Now())); code != http.StatusAccepted {
			t.Fatalf("%s: %d", id, code)
		}
	}
	for range 3 { // Mux's retries: queued once, counted twice
		send("op-1")
	}
	send("op-2")
	testwait.For(t, func() bool { st := queueStatus(t, g.admin); return st["app"].Dead == 2 && st["old"].Dead == 2 },
		func() string { return fmt.Sprintf("%+v", queueStatus(t, g.admin)) })

	// Duplicates.
	m := scrape(t, g.admin)
	for _, d := range []string{"app", "old"} {
		k := `caddy_mux_webhook_queue_duplicates_total{destination="` + d + `"}`
		if got := m[k] - before[k]; got != 2 {
			t.Errorf("%s grew by %v, want 2", k, got)
		}
	}
	dupLines := 0
	for _, l := range g.logLines() {
		if msg, _ := l["msg"].(string); strings.Contains(msg, "already queued") && l["level"] == "debug" && l["destination"] == "app" && l["id"] == "op-1" {
			dupLines++
		}
	}
	if dupLines != 2 {
		t.Errorf("%d DEBUG lines for op-1's duplicates to app, want 2", dupLines)
	}

	// last_error and when.
	st := queueStatus(t, g.admin)["app"]
	at, err := time.Parse(time.RFC3339, st.LastErrorAt)
	if st.LastError != "app answered 500" || err != nil || time.Since(at) > time.Hour || time.Until(at) > time.Minute {
		t.Errorf("status after failures: %+v", st)
	}
	if out, err := runCommand(t, "", "queue", "--address", admin); err != nil || !strings.Contains(out, st.LastErrorAt) || !strings.Contains(out, "app answered 500") {
		t.Errorf("queue: %v\n%s", err, out)
	}

	// Redeliver: one dead letter and ids that are not.
	app.status.Store(http.StatusOK)
	code, body := adminDo(t, http.MethodPost, g.admin+"/mux-webhook/queue/redeliver", `{"destination":"app","ids":["op-1","nope-1"]}`)
	if code != http.StatusNotFound || !strings.Contains(body, `nope-1`) || !strings.Contains(body, "redelivered 1") {
		t.Errorf("redeliver op-1 and nope-1: %d %s", code, body)
	}
	testwait.For(t, func() bool { return queueStatus(t, g.admin)["app"].Delivered == 1 }, func() string { return "op-1 was not delivered" })
	if st := queueStatus(t, g.admin)["app"]; st.LastError != "" || st.LastErrorAt != "" {
		t.Errorf("after a delivery, last_error %q at %q: want both cleared", st.LastError, st.LastErrorAt)
	}
	if out, err := runCommand(t, "", "queue", "redeliver", "app", "not-an-id", "--address", admin); err == nil || !strings.Contains(err.Error()+out, "not-an-id") {
		t.Errorf("queue redeliver app not-an-id: %v\n%s", err, out)
	}

	// Purge: a bad up_to, the CLI without an answer, with "n", with up_to.
	if code, body := adminDo(t, http.MethodDelete, g.admin+"/mux-webhook/queue/dead?destination=app&up_to=abc", "{}"); code != http.StatusBadRequest {
		t.Errorf("up_to=abc: %d %s", code, body)
	}
	for _, stdin := range []string{"", "n\n"} {
		if out, err := runCommand(t, stdin, "queue", "purge", "app", "--address", admin); err == nil || !strings.Contains(out, "purge 1 dead letters of app? [y/N]") {
			t.Errorf("queue purge app, answering %q: %v\n%s", stdin, err, out)
		}
	}
	if st := queueStatus(t, g.admin)["app"]; st.Dead != 1 {
		t.Fatalf("refused purges dropped dead letters: %+v", st)
	}
	var dead []struct {
		Seq uint64 `json:"seq"`
		ID  string `json:"id"`
	}
	getJSON(t, g.admin+"/mux-webhook/queue/dead?destination=app", &dead)
	if len(dead) != 1 || dead[0].ID != "op-2" || dead[0].Seq == 0 {
		t.Fatalf("app's dead letters: %+v", dead)
	}
	app.status.Store(http.StatusInternalServerError)
	send("op-3") // buried after the listing
	testwait.For(t, func() bool { return queueStatus(t, g.admin)["app"].Dead == 2 }, func() string { return "op-3 not buried" })
	if code, body := adminDo(t, http.MethodDelete, fmt.Sprintf("%s/mux-webhook/queue/dead?destination=app&up_to=%d", g.admin, dead[0].Seq), "{}"); code != http.StatusOK {
		t.Fatalf("purge up_to: %d %s", code, body)
	}
	getJSON(t, g.admin+"/mux-webhook/queue/dead?destination=app", &dead)
	if len(dead) != 1 || dead[0].ID != "op-3" {
		t.Errorf("after purging up to the listing: %+v, want op-3 kept", dead)
	}

	// old is removed: its dead letters stay visible and purgeable.
	testwait.For(t, func() bool { return queueStatus(t, g.admin)["old"].Dead == 3 }, func() string { return "op-3 not buried for old" })
	newCfg := strings.Replace(cfg, oldDest, "", 1)
	newCfg = strings.Replace(newCfg, "mux_deliver app old", "mux_deliver app", 1)
	if err := loadCaddyfile(newCfg); err != nil {
		t.Fatal(err)
	}
	testwait.For(t, func() bool { _, ok := queueStatus(t, g.admin)["old"]; return ok }, func() string { return "old not listed" })
	if st := queueStatus(t, g.admin)["old"]; st.Configured || st.URL != "" || st.Dead != 3 {
		t.Errorf("the removed destination: %+v, want configured false, no url, 3 dead", st)
	}
	var oldDead []json.RawMessage
	if code := getJSON(t, g.admin+"/mux-webhook/queue/dead?destination=old", &oldDead); code != http.StatusOK || len(oldDead) != 3 {
		t.Errorf("old's dead letters: %d %d", code, len(oldDead))
	}
	if code, body := adminDo(t, http.MethodPost, g.admin+"/mux-webhook/queue/redeliver", `{"destination":"old","all":true}`); code != http.StatusBadRequest {
		t.Errorf("redeliver to a removed destination: %d %s", code, body)
	}
	if out, err := runCommand(t, "y\n", "queue", "purge", "old", "--address", admin); err != nil || !strings.Contains(out, "purged 3") {
		t.Errorf("queue purge old: %v\n%s", err, out)
	}
	if _, ok := queueStatus(t, g.admin)["old"]; ok {
		t.Errorf("old is still listed after its dead letters were purged")
	}
	if code := getJSON(t, g.admin+"/mux-webhook/queue/dead?destination=never", nil); code != http.StatusBadRequest {
		t.Errorf("a destination never configured: %d", code)
	}
}

// TestQueuePauseAndResume: `caddy mux-webhook queue pause app` holds the
// destination's events (none is attempted), the status, the CLI, the
// metric and an INFO line say so; resumed through the admin API, every
// event is delivered on its first attempt. Changes need JSON and a
// configured destination.
func TestQueuePauseAndResume(t *testing.T) {
	app := newAttemptBackend(t, http.StatusOK)
	dir := filepath.Join(t.TempDir(), "js")
	g := startGatewayWithAdmin(t, deliverGlobal(dir, "\t\tdestination app "+app.URL+" {\n\t\t\tretry 50ms\n\t\t}"),
		fmt.Sprintf("mux_webhook %s\n\tmux_deliver app", testSecret))
	admin := strings.TrimPrefix(g.admin, "http://")
	if out, err := runCommand(t, "", "queue", "pause", "app", "--address", admin); err != nil || !strings.Contains(out, "app is paused") {
		t.Fatalf("queue pause: %v\n%s", err, out)
	}
	testwait.For(t, func() bool { return strings.Contains(g.rawLog(), "mux webhook destination paused: its events wait") },
		func() string { return "no INFO line from the workers" })
	for i := range 3 {
		if status, _, _ := do(t, signedRequest(t, g.url, testSecret, event("video.asset.ready", fmt.Sprint("paused-", i), ""), time.Now())); status != http.StatusAccepted {
			t.Fatalf("paused-%d: %d", i, status)
		}
	}
	time.Sleep(1500 * time.Millisecond)
	if n := app.total(); n != 0 {
		t.Fatalf("a paused destination got %d requests", n)
	}
	st := queueStatus(t, g.admin)["app"]
	if st.State != "paused" || st.StateSince == "" || st.Pending+st.InFlight != 3 {
		t.Errorf("status while paused: %+v", st)
	}
	if out, err := runCommand(t, "", "queue", "--address", admin); err != nil || !strings.Contains(out, "PAUSED: app since ") {
		t.Errorf("queue: %v\n%s", err, out)
	}
	var m map[string]float64
	testwait.For(t, func() bool {
		m = scrape(t, g.admin)
		return m[`caddy_mux_webhook_destination_state{destination="app",state="paused"}`] == 1 && m[`caddy_mux_webhook_destination_state{destination="app",state="active"}`] == 0
	}, func() string { return fmt.Sprintf("metrics: %v", m) })

	for _, c := range []struct {
		body, contentType string
		want              int
	}{
		{`{"destination":"nope"}`, "application/json", http.StatusBadRequest},
		{`destination=app`, "application/x-www-form-urlencoded", http.StatusUnsupportedMediaType},
		{`{"destination":"app","extra":1}`, "application/json", http.StatusBadRequest},
	} {
		req, _ := http.NewRequest(http.MethodPost, g.admin+"/mux-webhook/queue/resume", strings.NewReader(c.body))
		req.Header.Set("Content-Type", c.contentType)
		if code, _, _ := do(t, req); code != c.want {
			t.Errorf("resume %s (%s): %d, want %d", c.body, c.contentType, code, c.want)
		}
	}
	if code, body := adminDo(t, http.MethodPost, g.admin+"/mux-webhook/queue/resume", `{"destination":"app"}`); code != http.StatusOK || !strings.Contains(body, `"state":"active"`) {
		t.Fatalf("resume: %d %s", code, body)
	}
	testwait.For(t, func() bool { return app.total() == 3 }, func() string { return fmt.Sprintf("%d of 3 delivered after resume", app.total()) })
	if n := app.maxAttempt.Load(); n != 1 {
		t.Errorf("an event came as attempt %d, want every one as attempt 1 (the pause used none)", n)
	}
	if st := queueStatus(t, g.admin)["app"]; st.State != "active" || st.StateSince != "" {
		t.Errorf("status after resume: %+v", st)
	}
}

// TestPausedDestinationFillingWarns: while a destination is paused, its
// events fill the stream it shares; at 80 % of max_bytes a WARN line says
// so (and what to do), before mux_deliver has to answer 503.
func TestPausedDestinationFillingWarns(t *testing.T) {
	app := newAttemptBackend(t, http.StatusOK)
	dir := filepath.Join(t.TempDir(), "js")
	// One partition: the test follows one stream filling up.
	g := startGatewayWithAdmin(t, fmt.Sprintf("\tmux_webhook {\n\t\tqueue {\n\t\t\tdir %s\n\t\t\tmax_bytes 64KiB\n\t\t\tpartitions 1\n\t\t}\n\t\tdestination app %s\n\t}", dir, app.URL),
		fmt.Sprintf("mux_webhook %s\n\tmux_deliver app", testSecret))
	if code, body := adminDo(t, http.MethodPost, g.admin+"/mux-webhook/queue/pause", `{"destination":"app"}`); code != http.StatusOK {
		t.Fatalf("pause: %d %s", code, body)
	}
	testwait.For(t, func() bool { return strings.Contains(g.rawLog(), "mux webhook destination paused: its events wait") },
		func() string { return "the workers never noticed the pause" })
	const warning = "the stream is filling up while destinations are paused"
	pad := fmt.Sprintf(`{"pad":%q}`, strings.Repeat("p", 4<<10))
	sent := 0
	for i := 0; i < 30 && !strings.Contains(g.rawLog(), warning); i++ {
		status, _, _ := do(t, signedRequest(t, g.url, testSecret, event("video.asset.ready", fmt.Sprint("fill-", i), pad), time.Now()))
		if status == http.StatusServiceUnavailable {
			break // full: the warning had to come before
		}
		if status != http.StatusAccepted {
			t.Fatalf("fill-%d: %d", i, status)
		}
		sent++
		if sent >= 12 { // past 80 % of 64 KiB: wait for the gauges (every 5s)
			testwait.For(t, func() bool { return strings.Contains(g.rawLog(), warning) }, func() string { return "no WARN line with the stream at 80 %" })
		}
	}
	if !strings.Contains(g.rawLog(), warning) {
		t.Fatalf("no WARN line after %d events of 4 KiB in a 64 KiB stream", sent)
	}
	if app.total() != 0 {
		t.Errorf("a paused destination got %d requests", app.total())
	}
}
