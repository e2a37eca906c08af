//go:build e2e

package muxwebhook

// Real processes for history (#22): kept across a SIGKILL and a restart,
// each search filter's subset, the same history from both gateways of a
// cluster, a replay of 1 000 events delivered once each, marked and
// signed, a dry run that queues nothing, a forged flood that writes
// nothing, and a store that goes away: events answered as without
// history, the counter moving.

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/internal/testwait"
	"github.com/caddy-mux-webhook/caddy-mux-webhook/queue"
)

// historyPage is GET /mux-webhook/history's answer.
type historyPage struct {
	Events     []queue.HistoryEvent `json:"events"`
	NextBefore *uint64              `json:"next_before"`
}

// searchHistory asks admin's history with query q.
func searchHistory(t *testing.T, admin string, q url.Values) historyPage {
	t.Helper()
	var page historyPage
	if status := getJSON(t, admin+"/mux-webhook/history?"+q.Encode(), &page); status != http.StatusOK {
		t.Fatalf("history?%s: %d", q.Encode(), status)
	}
	return page
}

// tryHistory asks admin's history with query q: the page and the status
// (503 while history is opening).
func tryHistory(admin string, q url.Values) (historyPage, int) {
	var page historyPage
	resp, err := http.Get(admin + "/mux-webhook/history?" + q.Encode())
	if err != nil {
		return page, 0
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusOK {
		_ = json.NewDecoder(resp.Body).Decode(&page)
	}
	return page, resp.StatusCode
}

// waitHistory waits until admin's history holds n events for q.
func waitHistory(t *testing.T, admin string, q url.Values, n int, out *syncBuffer) historyPage {
	t.Helper()
	var page historyPage
	var status int
	testwait.Until(t, 20*time.Second, func() bool {
		page, status = tryHistory(admin, q)
		return status == http.StatusOK && len(page.Events) == n
	}, func() string {
		return fmt.Sprintf("history?%s: %d, %d events, want %d\n%s", q.Encode(), status, len(page.Events), n, tail(out.String(), 2048))
	})
	return page
}

// historyGateway runs a gateway process with its store in dir (kept
// across restarts), the destination app at backend (signing with
// signSecret), and its site queuing for app.
type historyGateway struct {
	t               *testing.T
	dir             string
	port, adminPort int
	global          string
	cmd             *exec.Cmd
	out             *syncBuffer
	admin, base     string
	bin             string
}

func newHistoryGateway(t *testing.T, global string) *historyGateway {
	g := &historyGateway{t: t, dir: t.TempDir(), port: freePort(t), adminPort: freePort(t), global: global, bin: caddyBinary(t)}
	g.admin = fmt.Sprintf("http://127.0.0.1:%d", g.adminPort)
	g.base = fmt.Sprintf("http://127.0.0.1:%d", g.port)
	return g
}

func (g *historyGateway) start(site string) {
	g.t.Helper()
	cfg := fmt.Sprintf("%s\nhttp://127.0.0.1:%d {\n%s\n}\n",
		testGlobals{admin: fmt.Sprintf("127.0.0.1:%d", g.adminPort), storage: filepath.Join(g.dir, "storage"), extra: g.global}, g.port, site)
	runDir := g.t.TempDir()
	g.out, g.cmd = runCaddyIn(g.t, g.bin, cfg, runDir, g.dir, nil)
	waitForHTTP(g.t, g.admin+"/config/", g.out)
}

// TestHistoryAcrossARestart: 40 verified events and their duplicates are
// kept; each search filter returns its subset; a forged flood writes
// nothing; after a SIGKILL and a restart on the same store, the same
// history is listed.
func TestHistoryAcrossARestart(t *testing.T) {
	t.Parallel()
	backend := newRecordingBackend(t, 0, nil)
	g := newHistoryGateway(t, fmt.Sprintf(`	mux_webhook {
		destination app %s {
			sign signing-secret-of-app
		}
	}`, backend.URL))
	site := fmt.Sprintf("\tmux_webhook %s {\n\t\tdedupe\n\t}\n\tmux_deliver app", testSecret)
	g.start(site)
	waitQueueOpen(t, g.admin, g.out)
	client := &http.Client{Timeout: 10 * time.Second}
	types := []string{"video.asset.created", "video.asset.ready", "video.live_stream.active", "video.upload.created"}
	var sent []string
	for i := range 40 {
		id := fmt.Sprintf("ev-%02d", i)
		body := objectEvent(types[i%4], id, fmt.Sprintf("obj-%d", i%5))
		if status, err := postEvent(client, g.base, body); err != nil || status != http.StatusAccepted {
			t.Fatalf("event %d: %d %v", i, status, err)
		}
		sent = append(sent, id)
	}
	waitDelivered(t, backend, 30*time.Second, g.out, sent...)
	// Mux's retries of 5 of them: duplicates (dedupe answers 200).
	for i := range 5 {
		body := objectEvent(types[i%4], fmt.Sprintf("ev-%02d", i), fmt.Sprintf("obj-%d", i%5))
		if status, err := postEvent(client, g.base, body); err != nil || status != http.StatusOK {
			t.Fatalf("duplicate %d: %d %v", i, status, err)
		}
	}
	all := waitHistory(t, g.admin, url.Values{"limit": {"1000"}}, 45, g.out)
	if all.Events[0].Outcome != "duplicate" || all.Events[0].ID != "ev-04" {
		t.Fatalf("newest: %+v", all.Events[0])
	}

	// Forged requests (a wrong secret, a stale timestamp): none is kept.
	for i := range 200 {
		body := objectEvent("video.asset.ready", fmt.Sprintf("forged-%d", i), "obj-0")
		ts := strconv.FormatInt(time.Now().Unix(), 10)
		if i%2 == 1 {
			ts = strconv.FormatInt(time.Now().Add(-time.Hour).Unix(), 10)
		}
		req, _ := http.NewRequest(http.MethodPost, g.base, bytes.NewReader(body))
		secret := "not-" + testSecret
		if i%2 == 1 {
			secret = testSecret
		}
		req.Header.Set("Mux-Signature", "t="+ts+",v1="+macHex(secret, ts, string(body)))
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized {
			t.Fatalf("forged %d: %d", i, resp.StatusCode)
		}
	}

	// Each filter's subset, checked against what was sent.
	check := func(q url.Values, keep func(i int, dup bool) bool) {
		t.Helper()
		want := 0
		for i := range 40 {
			if keep(i, false) {
				want++
			}
		}
		for i := range 5 {
			if keep(i, true) {
				want++
			}
		}
		page := waitHistory(t, g.admin, q, want, g.out)
		for _, e := range page.Events {
			if strings.HasPrefix(e.ID, "forged") {
				t.Fatalf("a forged request is in history: %+v", e)
			}
		}
	}
	check(url.Values{"type": {"video.asset.*"}}, func(i int, _ bool) bool { return i%4 < 2 })
	check(url.Values{"type": {"*.created"}}, func(i int, _ bool) bool { return i%4 == 0 || i%4 == 3 })
	check(url.Values{"type": {"video.live_stream.active"}}, func(i int, _ bool) bool { return i%4 == 2 })
	check(url.Values{"object": {"obj-3"}}, func(i int, _ bool) bool { return i%5 == 3 })
	check(url.Values{"id": {"ev-02"}}, func(i int, _ bool) bool { return i == 2 })
	check(url.Values{"outcome": {"duplicate"}}, func(_ int, dup bool) bool { return dup })
	check(url.Values{"outcome": {"verified"}, "type": {"video.upload.*"}}, func(i int, dup bool) bool { return !dup && i%4 == 3 })
	check(url.Values{"since": {time.Now().Add(time.Minute).UTC().Format(time.RFC3339)}}, func(int, bool) bool { return false })
	check(url.Values{"until": {"1h"}}, func(int, bool) bool { return false })
	// A page of 10, then the next one from next_before.
	first := searchHistory(t, g.admin, url.Values{"limit": {"10"}})
	if len(first.Events) != 10 || first.NextBefore == nil {
		t.Fatalf("first page: %d events, next %v", len(first.Events), first.NextBefore)
	}
	second := searchHistory(t, g.admin, url.Values{"limit": {"10"}, "before": {fmt.Sprint(*first.NextBefore)}})
	if len(second.Events) != 10 || second.Events[0].Seq >= first.Events[9].Seq {
		t.Fatalf("second page: %+v", second.Events)
	}
	// One event: its body, byte for byte, and its delivery attempt.
	ev07 := searchHistory(t, g.admin, url.Values{"id": {"ev-07"}}).Events[0]
	var detail queue.HistoryEvent
	if status := getJSON(t, fmt.Sprintf("%s/mux-webhook/history/%d", g.admin, ev07.Seq), &detail); status != http.StatusOK {
		t.Fatalf("history/%d: %d", ev07.Seq, status)
	}
	if detail.Body != string(objectEvent(types[3], "ev-07", "obj-2")) || len(detail.Attempts) != 1 || detail.Outcome != "verified" ||
		detail.Attempts[0].Destination != "app" || detail.Attempts[0].Result != "delivered" || detail.Status != http.StatusAccepted {
		t.Fatalf("detail of ev-07: %+v", detail)
	}
	m := scrape(t, g.admin)
	if m[`caddy_mux_webhook_requests_total{outcome="mismatch"}`] != 100 || m[`caddy_mux_webhook_requests_total{outcome="expired"}`] != 100 {
		t.Fatalf("the forged requests were not counted as rejected: %v", m)
	}
	if m["caddy_mux_webhook_history_dropped_total"] != 0 {
		t.Fatalf("history dropped %v records", m["caddy_mux_webhook_history_dropped_total"])
	}

	// SIGKILL, then the same store again.
	if err := g.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = g.cmd.Wait()
	g.start(site)
	waitQueueOpen(t, g.admin, g.out)
	again := waitHistory(t, g.admin, url.Values{"limit": {"1000"}}, 45, g.out)
	for i := range all.Events {
		a, b := all.Events[i], again.Events[i]
		if a.Seq != b.Seq || a.ID != b.ID || a.Outcome != b.Outcome || a.Type != b.Type {
			t.Fatalf("after the restart, event %d: %+v, before %+v", i, b, a)
		}
	}
}

// TestHistoryReplayThousand: a replay job of 1 000 matching events (of 1
// 100 kept) to a destination: each delivered once more, with
// Mux-Webhook-Replay: <job> and a valid signature of the destination's
// sign; a dry run first queues nothing; the job's state says done, and a
// second dry run counts the same.
func TestHistoryReplayThousand(t *testing.T) {
	t.Parallel()
	const signSecret = "signing-secret-of-app"
	var mu sync.Mutex
	got := map[string][]string{} // id → the Mux-Webhook-Replay of each delivery
	var bad []string
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		sig := r.Header.Get("Mux-Signature")
		ts, v1, _ := strings.Cut(strings.TrimPrefix(sig, "t="), ",v1=")
		mac := hmac.New(sha256.New, []byte(signSecret))
		mac.Write([]byte(ts + "." + string(body)))
		mu.Lock()
		defer mu.Unlock()
		if !hmac.Equal([]byte(hex.EncodeToString(mac.Sum(nil))), []byte(v1)) {
			bad = append(bad, r.Header.Get("Idempotency-Key"))
		}
		id := r.Header.Get("Idempotency-Key")
		got[id] = append(got[id], r.Header.Get("Mux-Webhook-Replay"))
	}))
	t.Cleanup(backend.Close)
	g := newHistoryGateway(t, fmt.Sprintf(`	mux_webhook {
		destination app %s {
			sign %s
			concurrency 16
		}
	}`, backend.URL, signSecret))
	g.start(fmt.Sprintf("\tmux_webhook %s\n\tmux_deliver app", testSecret))
	waitQueueOpen(t, g.admin, g.out)
	client := &http.Client{Timeout: 10 * time.Second}
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	for i := range 1100 {
		typ, id := "video.asset.ready", fmt.Sprintf("a-%04d", i)
		if i >= 1000 {
			typ, id = "video.live_stream.idle", fmt.Sprintf("l-%04d", i)
		}
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if status, err := postEvent(client, g.base, objectEvent(typ, id, "obj-"+strconv.Itoa(i%50))); err != nil || status != http.StatusAccepted {
				t.Errorf("event %s: %d %v", id, status, err)
			}
		}()
	}
	wg.Wait()
	delivered := func() (n int) {
		mu.Lock()
		defer mu.Unlock()
		for _, d := range got {
			n += len(d)
		}
		return n
	}
	testwait.Until(t, 60*time.Second, func() bool { return delivered() >= 1100 }, func() string {
		return fmt.Sprintf("%d of 1100 delivered", delivered())
	})
	waitHistory(t, g.admin, url.Values{"type": {"video.asset.*"}, "limit": {"1000"}}, 1000, g.out)

	post := func(req map[string]any, out any) int {
		t.Helper()
		body, _ := json.Marshal(req)
		resp, err := http.Post(g.admin+"/mux-webhook/history/replay", "application/json", bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if err := json.Unmarshal(b, out); err != nil {
			t.Fatalf("replay: %d %s", resp.StatusCode, b)
		}
		return resp.StatusCode
	}
	var dry struct {
		Matched uint64 `json:"matched"`
		DryRun  bool   `json:"dry_run"`
	}
	if status := post(map[string]any{"destination": "app", "type": "video.asset.*", "dry_run": true}, &dry); status != http.StatusOK || dry.Matched != 1000 || !dry.DryRun {
		t.Fatalf("dry run: %d %+v", status, dry)
	}
	time.Sleep(time.Second) // what a dry run would have queued would arrive by now
	if n := delivered(); n != 1100 {
		t.Fatalf("the dry run queued: %d deliveries, want 1100", n)
	}
	var list []QueueStatus
	getJSON(t, g.admin+"/mux-webhook/queue", &list)
	if len(list) != 1 || list[0].Pending != 0 {
		t.Fatalf("queue after the dry run: %+v", list)
	}
	var job queue.ReplayJob
	if status := post(map[string]any{"destination": "app", "type": "video.asset.*"}, &job); status != http.StatusAccepted || job.Job == "" || job.Matched != 1000 {
		t.Fatalf("replay: %d %+v", status, job)
	}
	testwait.Until(t, 60*time.Second, func() bool {
		var st queue.ReplayJob
		getJSON(t, g.admin+"/mux-webhook/history/replay/"+job.Job, &st)
		return st.Done && delivered() >= 2100
	}, func() string { return fmt.Sprintf("%d of 2100 delivered\n%s", delivered(), tail(g.out.String(), 2048)) })
	var st queue.ReplayJob
	getJSON(t, g.admin+"/mux-webhook/history/replay/"+job.Job, &st)
	if st.State != "done" || st.Queued != 1000 || st.Expired != 0 || st.Matched != 1000 {
		t.Fatalf("job: %+v", st)
	}
	time.Sleep(time.Second) // a copy queued twice would arrive by now
	mu.Lock()
	defer mu.Unlock()
	if len(bad) > 0 {
		t.Fatalf("%d deliveries with a signature that is not the destination's: %v", len(bad), bad[:min(5, len(bad))])
	}
	for i := range 1100 {
		id := fmt.Sprintf("a-%04d", i)
		want := []string{"", job.Job}
		if i >= 1000 {
			id, want = fmt.Sprintf("l-%04d", i), []string{""}
		}
		if fmt.Sprint(got[id]) != fmt.Sprint(want) {
			t.Fatalf("%s delivered with replay marks %q, want %q", id, got[id], want)
		}
	}
}

// TestHistoryStoreUnavailable: with history on a NATS server that dies,
// the gateway answers as without history, at once, and
// caddy_mux_webhook_history_dropped_total counts what was not recorded;
// once NATS is back, history records again.
func TestHistoryStoreUnavailable(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	conf := fmt.Sprintf("listen: %s\njetstream { store_dir: %q }\n", addr, filepath.Join(dir, "js"))
	nats := natsServerWithConfig(t, dir, addr, conf)
	g := newHistoryGateway(t, fmt.Sprintf(`	mux_webhook {
		history 1d
		queue {
			nats nats://%s
		}
	}`, addr))
	g.start(fmt.Sprintf("\tmux_webhook %s\n\trespond 204", testSecret))
	client := &http.Client{Timeout: 10 * time.Second}
	testwait.Until(t, 30*time.Second, func() bool {
		if _, status := tryHistory(g.admin, url.Values{}); status != http.StatusOK {
			return false // opening
		}
		_, err := postEvent(client, g.base, objectEvent("video.asset.ready", "first", "o"))
		page, _ := tryHistory(g.admin, url.Values{"id": {"first"}})
		return err == nil && len(page.Events) > 0
	}, func() string { return tail(g.out.String(), 2048) })

	if err := nats.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = nats.Wait()
	for i := range 20 {
		start := time.Now()
		status, err := postEvent(client, g.base, objectEvent("video.asset.ready", fmt.Sprintf("while-down-%d", i), "o"))
		if err != nil || status != http.StatusNoContent {
			t.Fatalf("event %d with the store down: %d %v", i, status, err)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Fatalf("event %d waited %v for history", i, d)
		}
	}
	testwait.Until(t, 30*time.Second, func() bool {
		return scrape(t, g.admin)["caddy_mux_webhook_history_dropped_total"] >= 20
	}, func() string {
		return fmt.Sprintf("dropped: %v\n%s", scrape(t, g.admin)["caddy_mux_webhook_history_dropped_total"], tail(g.out.String(), 2048))
	})
	// Back: recorded again.
	natsServerWithConfig(t, dir, addr, conf)
	testwait.Until(t, 60*time.Second, func() bool {
		if _, err := postEvent(client, g.base, objectEvent("video.asset.ready", "after", "o")); err != nil {
			return false
		}
		page, _ := tryHistory(g.admin, url.Values{"id": {"after"}})
		return len(page.Events) > 0
	}, func() string { return tail(g.out.String(), 2048) })
}

// TestHistoryCommand: `caddy mux-webhook history` against a running
// gateway: a search by type glob, a limit the server refuses, a replay's
// dry run and a replay with its progress to done (the backend gets each
// copy once, marked), and the errors that say what to change.
func TestHistoryCommand(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	replayed := map[string]int{}
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Mux-Webhook-Replay") != "" {
			mu.Lock()
			replayed[r.Header.Get("Idempotency-Key")]++
			mu.Unlock()
		}
	}))
	t.Cleanup(backend.Close)
	g := newHistoryGateway(t, fmt.Sprintf("\tmux_webhook {\n\t\tdestination app %s {\n\t\t\tsign signing-secret-of-app\n\t\t}\n\t}", backend.URL))
	g.start(fmt.Sprintf("\tmux_webhook %s\n\tmux_deliver app", testSecret))
	waitQueueOpen(t, g.admin, g.out)
	client := &http.Client{Timeout: 10 * time.Second}
	for i := range 6 {
		typ, id := "video.asset.ready", fmt.Sprintf("cli-a-%d", i)
		if i >= 4 {
			typ, id = "video.live_stream.idle", fmt.Sprintf("cli-l-%d", i)
		}
		if status, err := postEvent(client, g.base, objectEvent(typ, id, "o")); err != nil || status != http.StatusAccepted {
			t.Fatalf("event %s: %d %v", id, status, err)
		}
	}
	waitHistory(t, g.admin, url.Values{}, 6, g.out)
	address := strings.TrimPrefix(g.admin, "http://")
	run := func(args ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		out, err := exec.CommandContext(ctx, g.bin, append([]string{"mux-webhook", "history", "--address", address}, args...)...).CombinedOutput()
		return string(out), err
	}
	out, err := run("--type", "video.asset.*")
	if err != nil {
		t.Fatalf("history --type: %v\n%s", err, out)
	}
	for i := range 6 {
		id := fmt.Sprintf("cli-a-%d", i)
		if i >= 4 {
			id = fmt.Sprintf("cli-l-%d", i)
		}
		if listed := strings.Contains(out, id); listed != (i < 4) {
			t.Errorf("history --type video.asset.*: %s listed %v:\n%s", id, listed, out)
		}
	}
	if out, err := run("--limit", "0"); err == nil || !strings.Contains(out, "limit") {
		t.Errorf("history --limit 0: %v, want an error about the limit:\n%s", err, out)
	}
	if out, err := run("replay", "--to", "app", "--type", "video.asset.*", "--limit", "3"); err == nil || !strings.Contains(out, "--limit is a search's") {
		t.Errorf("history replay --limit: %v, want refused:\n%s", err, out)
	}
	if out, err := run("cancel"); err == nil || !strings.Contains(out, "name the job") {
		t.Errorf("history cancel without a job: %v:\n%s", err, out)
	}
	out, err = run("replay", "--to", "app", "--type", "video.asset.*", "--dry-run")
	if err != nil || !strings.Contains(out, "4 events would be queued to app (dry run: nothing queued)") {
		t.Fatalf("history replay --dry-run: %v\n%s", err, out)
	}
	out, err = run("replay", "--to", "app", "--type", "video.asset.*")
	if err != nil || !strings.Contains(out, "4/4 queued, 0 expired, done") {
		t.Fatalf("history replay: %v\n%s", err, out)
	}
	job := regexp.MustCompile(`replay job (r[0-9a-f]+)`).FindStringSubmatch(out)
	if job == nil {
		t.Fatalf("history replay named no job:\n%s", out)
	}
	testwait.Until(t, 30*time.Second, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(replayed) == 4
	}, func() string { return fmt.Sprintf("replayed: %v", replayed) })
	if out, err := run("cancel", job[1]); err != nil || !strings.Contains(out, "done; 4 of 4 queued") {
		t.Errorf("history cancel of an ended job: %v\n%s", err, out)
	}
	mu.Lock()
	defer mu.Unlock()
	for id, n := range replayed {
		if !strings.HasPrefix(id, "cli-a-") || n != 1 {
			t.Errorf("%s replayed %d times", id, n)
		}
	}
}

// TestHistoryStreamDeletedByHand: the history stream deleted on the NATS
// server (`nats stream rm MUX_WEBHOOK_HISTORY`) while events come: every
// event is still answered at once, the stream is made again by the next
// write that finds it gone, with a WARN that says so and the records lost
// meanwhile counted, and every event after that is listed again, with no
// reload or restart.
func TestHistoryStreamDeletedByHand(t *testing.T) {
	t.Parallel()
	natsURL, _ := natsServer(t)
	g := newHistoryGateway(t, fmt.Sprintf("\tmux_webhook {\n\t\thistory 1d\n\t\tqueue {\n\t\t\tnats %s\n\t\t}\n\t}", natsURL))
	g.start(fmt.Sprintf("\tmux_webhook %s\n\trespond 204", testSecret))
	client := &http.Client{Timeout: 10 * time.Second}
	send := func(id string) {
		t.Helper()
		start := time.Now()
		if status, err := postEvent(client, g.base, objectEvent("video.asset.ready", id, "o")); err != nil || status != http.StatusNoContent {
			t.Fatalf("event %s: %d %v", id, status, err)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Fatalf("event %s waited %v for history", id, d)
		}
	}
	testwait.Until(t, 30*time.Second, func() bool {
		_, status := tryHistory(g.admin, url.Values{})
		return status == http.StatusOK
	}, func() string { return tail(g.out.String(), 2048) })
	for i := range 5 {
		send(fmt.Sprintf("before-%d", i))
	}
	waitHistory(t, g.admin, url.Values{"id": {"before-4"}}, 1, g.out)

	js := jetStreamOf(t, natsURL)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := js.DeleteStream(ctx, "MUX_WEBHOOK_HISTORY"); err != nil {
		t.Fatal(err)
	}
	// A search while it is gone answers (an error or nothing), at once.
	start := time.Now()
	if _, status := tryHistory(g.admin, url.Values{}); time.Since(start) > 5*time.Second {
		t.Fatalf("a search with the stream gone took %v (status %d)", time.Since(start), status)
	}
	// The first writes find it gone: dropped, counted, and it is made again.
	n := 0
	testwait.Until(t, 30*time.Second, func() bool {
		n++
		send(fmt.Sprintf("during-%d", n))
		page, status := tryHistory(g.admin, url.Values{"id": {fmt.Sprintf("during-%d", n)}})
		return status == http.StatusOK && len(page.Events) == 1
	}, func() string { return tail(g.out.String(), 4096) })
	if !strings.Contains(g.out.String(), "the history stream was gone") {
		t.Errorf("no WARN line said the history stream was made again:\n%s", tail(g.out.String(), 4096))
	}
	// Every event sent meanwhile is either listed or counted as dropped
	// (a write's error comes with its acknowledgement, within 5 s).
	var listed int
	var dropped float64
	settled := time.Now()
	testwait.Until(t, 15*time.Second, func() bool {
		dropped = scrape(t, g.admin)["caddy_mux_webhook_history_dropped_total"]
		listed = len(searchHistory(t, g.admin, url.Values{"type": {"video.asset.ready"}, "limit": {"1000"}}).Events)
		return dropped >= 1 && float64(listed)+dropped >= float64(n)
	}, func() string {
		return fmt.Sprintf("%d events sent with the stream gone: %d listed, %v counted as dropped (caddy_mux_webhook_history_dropped_total); want at least the first one dropped and none missing from both", n, listed, dropped)
	})
	t.Logf("settled after %v", time.Since(settled))
	// From then on, nothing is lost; what was before is gone with the
	// stream (the operator deleted it).
	for i := range 10 {
		send(fmt.Sprintf("after-%d", i))
	}
	waitHistory(t, g.admin, url.Values{"id": {"after-9"}}, 1, g.out)
	for i := range 10 {
		id := fmt.Sprintf("after-%d", i)
		if got := searchHistory(t, g.admin, url.Values{"id": {id}}); len(got.Events) != 1 {
			t.Errorf("%s: %d events in history, want 1", id, len(got.Events))
		}
	}
	if got := searchHistory(t, g.admin, url.Values{"id": {"before-0"}}); len(got.Events) != 0 {
		t.Errorf("before-0 still listed after its stream was deleted: %+v", got.Events)
	}
	t.Logf("history stream deleted by hand: %d events sent until one was listed again; %d of them listed, %v records dropped", n, listed, dropped)
}

// TestHistoryOnACluster: two gateways on a three-node cluster see the
// same history: events sent to either are listed by both, with the
// attempts of whichever gateway delivered them.
func TestHistoryOnACluster(t *testing.T) {
	t.Parallel()
	c := startNATSCluster(t)
	backend := newRecordingBackend(t, 0, nil)
	gs := startClusterGateways(t, 2, clusterGlobal(c, "5s", backend.URL, "\t\t\ttimeout 2s"))
	client := &http.Client{Timeout: 10 * time.Second}
	var sent []string
	for i := range 20 {
		id := fmt.Sprintf("c-%02d", i)
		if status, err := postEvent(client, gs[i%2].url(), objectEvent("video.asset.ready", id, "obj")); err != nil || status != http.StatusAccepted {
			t.Fatalf("event %s: %d %v", id, status, err)
		}
		sent = append(sent, id)
	}
	waitDelivered(t, backend, 60*time.Second, gs[0].out, sent...)
	for _, g := range gs {
		page := waitHistory(t, g.adminURL(), url.Values{}, 20, g.out)
		testwait.Until(t, 20*time.Second, func() bool {
			page = searchHistory(t, g.adminURL(), url.Values{})
			for _, e := range page.Events {
				if len(e.Attempts) == 0 {
					return false
				}
			}
			return true
		}, func() string { return fmt.Sprintf("%s: events without attempts: %+v", g.name, page.Events) })
	}
}

// TestReplayJobSurvivesASIGKILL: a replay job of 3 000 events whose
// gateway is killed (SIGKILL) while it queues is taken up after the
// restart, once its state has not moved for 30 s: it ends done, every
// event delivered once with the job's mark, none twice.
func TestReplayJobSurvivesASIGKILL(t *testing.T) {
	t.Parallel()
	const n = 3000
	var mu sync.Mutex
	marks := map[string]int{} // id → deliveries marked with a replay job
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Mux-Webhook-Replay") != "" {
			mu.Lock()
			marks[r.Header.Get("Idempotency-Key")]++
			mu.Unlock()
		}
	}))
	t.Cleanup(backend.Close)
	g := newHistoryGateway(t, fmt.Sprintf(`	mux_webhook {
		destination app %s {
			sign signing-secret-of-app
			concurrency 16
		}
	}`, backend.URL))
	site := fmt.Sprintf("\tmux_webhook %s\n\tmux_deliver app", testSecret)
	g.start(site)
	waitQueueOpen(t, g.admin, g.out)
	client := &http.Client{Timeout: 10 * time.Second}
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			id := fmt.Sprintf("k-%04d", i)
			if status, err := postEvent(client, g.base, objectEvent("video.asset.ready", id, "obj-"+strconv.Itoa(i%100))); err != nil || status != http.StatusAccepted {
				t.Errorf("event %s: %d %v", id, status, err)
			}
		}()
	}
	wg.Wait()
	waitHistory(t, g.admin, url.Values{"limit": {"1"}, "id": {fmt.Sprintf("k-%04d", n-1)}}, 1, g.out)
	resp, err := http.Post(g.admin+"/mux-webhook/history/replay", "application/json", strings.NewReader(`{"destination":"app","since":"1h"}`))
	if err != nil {
		t.Fatal(err)
	}
	var job queue.ReplayJob
	_ = json.NewDecoder(resp.Body).Decode(&job)
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted || job.Matched != n {
		t.Fatalf("replay: %d %+v", resp.StatusCode, job)
	}
	// Killed while it queues.
	testwait.Until(t, 30*time.Second, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(marks) > 0
	}, func() string { return "no replayed copy delivered" })
	if err := g.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = g.cmd.Wait()
	mu.Lock()
	before := len(marks)
	inHand := map[string]bool{} // delivered before the kill: may come again (at least once)
	for id := range marks {
		inHand[id] = true
	}
	mu.Unlock()
	if before >= n {
		t.Fatalf("the job was done before the kill (%d delivered): make it longer", before)
	}
	g.start(site)
	waitQueueOpen(t, g.admin, g.out)
	var st queue.ReplayJob
	testwait.Until(t, 120*time.Second, func() bool {
		st = queue.ReplayJob{}
		getJSON(t, g.admin+"/mux-webhook/history/replay/"+job.Job, &st)
		mu.Lock()
		defer mu.Unlock()
		return st.Done && len(marks) >= n
	}, func() string {
		mu.Lock()
		defer mu.Unlock()
		return fmt.Sprintf("job %+v; %d of %d delivered (%d before the kill)\n%s", st, len(marks), n, before, tail(g.out.String(), 2048))
	})
	if st.State != "done" || st.Queued+st.Expired < n || st.Expired != 0 {
		t.Fatalf("job after the restart: %+v", st)
	}
	time.Sleep(time.Second) // a copy queued twice would arrive by now
	mu.Lock()
	defer mu.Unlock()
	repeats := 0
	for id, k := range marks {
		if k > 1 && !inHand[id] || k > 2 {
			t.Errorf("%s: delivered %d times for the job: queued twice", id, k)
		}
		repeats += k - 1
	}
	// A copy delivered before the kill whose acknowledgement the embedded
	// store had not kept yet is delivered again (at least once): each at
	// most once more, and only those.
	if repeats > before {
		t.Errorf("%d repeated deliveries, more than the %d delivered before the kill", repeats, before)
	}
	t.Logf("killed with %d of %d replayed copies delivered; the job was taken up and finished; %d delivered again (delivered before the kill, their acknowledgements lost with it)", before, n, repeats)
	if lines := strings.Count(g.out.String(), "taking up a replay job"); lines != 1 {
		t.Errorf("%d log lines of a replay job taken up, want 1", lines)
	}
}

// TestHistoryOnlyWhenTheStoreIsHeld: a gateway with `history 7d` and no
// destination, on a data directory whose store another Caddy process
// holds, starts all the same: history off with a WARN naming why, its
// events answered as without history.
func TestHistoryOnlyWhenTheStoreIsHeld(t *testing.T) {
	t.Parallel()
	backend := newRecordingBackend(t, 0, nil)
	first := newHistoryGateway(t, fmt.Sprintf("\tmux_webhook {\n\t\tdestination app %s\n\t}", backend.URL))
	first.start(fmt.Sprintf("\tmux_webhook %s\n\tmux_deliver app", testSecret))
	waitQueueOpen(t, first.admin, first.out)
	second := newHistoryGateway(t, "\tmux_webhook {\n\t\thistory 7d\n\t}")
	second.dir = first.dir // the same data directory: its store is held
	second.start(fmt.Sprintf("\tmux_webhook %s\n\trespond 204", testSecret))
	client := &http.Client{Timeout: 10 * time.Second}
	if status, err := postEvent(client, second.base, objectEvent("video.asset.ready", "held-1", "o")); err != nil || status != http.StatusNoContent {
		t.Fatalf("event at the second gateway: %d %v", status, err)
	}
	testwait.Until(t, 10*time.Second, func() bool {
		return strings.Contains(second.out.String(), "history is off: the queue's store could not be opened")
	}, func() string { return tail(second.out.String(), 2048) })
	resp, err := http.Get(second.admin + "/mux-webhook/history")
	if err != nil {
		t.Fatal(err)
	}
	said, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound || !strings.Contains(string(said), "could not be opened") {
		t.Fatalf("history of the second gateway: %d %s, want 404 saying why it is off", resp.StatusCode, said)
	}
	// The first carries on, with its history.
	if status, err := postEvent(client, first.base, objectEvent("video.asset.ready", "held-2", "o")); err != nil || status != http.StatusAccepted {
		t.Fatalf("event at the first gateway: %d %v", status, err)
	}
	waitHistory(t, first.admin, url.Values{"id": {"held-2"}}, 1, first.out)
}
