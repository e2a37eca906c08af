package muxwebhook

// dedupe (dedupe.go): the memory record, redelivery suppressed, in-flight
// 409, and its two calls (claim, finish) under panics, reloads, rotation
// and a stuck id.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
)

func TestMemoryRecord(t *testing.T) {
	t0 := time.Unix(1_700_000_000, 0)
	m := newMemoryRecord(3, time.Hour)
	k := func(id string) idKey { return keyOf(&Event{IDRaw: []byte(`"` + id + `"`)}) }
	steps := []struct {
		do   string // begin, deliver, forget
		id   string
		at   time.Duration
		want dedupeVerdict
	}{
		{"begin", "a", 0, dedupeProceed},
		{"begin", "a", 0, dedupeInFlight},
		{"deliver", "a", time.Second, 0},
		{"begin", "a", 2 * time.Second, dedupeDuplicate},
		{"begin", "b", 3 * time.Second, dedupeProceed},
		{"forget", "b", 3 * time.Second, 0},
		{"begin", "b", 4 * time.Second, dedupeProceed}, // a failed delivery is not remembered
		{"begin", "a", time.Hour + time.Second, dedupeDuplicate},
		{"begin", "a", time.Hour + 2*time.Second, dedupeProceed}, // the window has passed
	}
	for i, s := range steps {
		now := t0.Add(s.at)
		switch s.do {
		case "begin":
			if got := m.begin(k(s.id), now); got != s.want {
				t.Fatalf("step %d: begin(%s) = %v, want %v", i, s.id, got, s.want)
			}
		case "deliver":
			m.markDelivered(k(s.id), now)
		case "forget":
			m.forget(k(s.id))
		}
	}
	// Bounded: the oldest entries go first.
	m = newMemoryRecord(3, time.Hour)
	for i := range 10 {
		id := fmt.Sprint(i)
		m.begin(k(id), t0)
		m.markDelivered(k(id), t0)
	}
	if m.len() != 3 {
		t.Fatalf("record holds %d entries, want at most 3", m.len())
	}
	if m.begin(k("9"), t0) != dedupeDuplicate || m.begin(k("0"), t0) != dedupeProceed {
		t.Fatal("eviction did not drop the oldest ids")
	}
}

func dedupeSite(up string, opts string) string {
	return fmt.Sprintf(`
	mux_webhook %s {
		dedupe %s
	}
	reverse_proxy %s`, testSecret, opts, up)
}

func TestDedupeSuppressesRedelivery(t *testing.T) {
	var calls atomic.Int32
	failFirst := atomic.Bool{}
	failFirst.Store(true)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		if r.Header.Get("X-Fail") != "" && failFirst.CompareAndSwap(true, false) {
			w.WriteHeader(http.StatusInternalServerError)
			return
		}
		fmt.Fprint(w, "delivered")
	}))
	t.Cleanup(up.Close)
	g := startGateway(t, dedupeSite(strings.TrimPrefix(up.URL, "http://"), ""))

	body := event("video.asset.ready", "dup-1", "")
	for i, want := range []string{"delivered", ""} {
		status, _, got := do(t, signedRequest(t, g.url, testSecret, body, time.Now()))
		if status != 200 || got != want {
			t.Fatalf("delivery %d: %d %q, want 200 %q", i+1, status, got, want)
		}
	}
	if calls.Load() != 1 {
		t.Fatalf("upstream called %d times, want 1", calls.Load())
	}
	found := false
	for _, l := range g.logLines() {
		if l["msg"] == "mux webhook" && l["outcome"] == "duplicate" && l["id"] == "dup-1" && l["status"] == float64(200) {
			found = true
		}
	}
	if !found {
		t.Error("no log line for the suppressed duplicate")
	}

	// A non-2xx answer is not remembered: Mux's retry is forwarded.
	body = event("video.asset.ready", "dup-2", "")
	req := signedRequest(t, g.url, testSecret, body, time.Now())
	req.Header.Set("X-Fail", "1")
	if status, _, _ := do(t, req); status != 500 {
		t.Fatalf("failing upstream: %d", status)
	}
	for i, want := range []string{"delivered", ""} {
		status, _, got := do(t, signedRequest(t, g.url, testSecret, body, time.Now()))
		if status != 200 || got != want {
			t.Fatalf("retry %d: %d %q, want 200 %q", i+1, status, got, want)
		}
	}
	if calls.Load() != 3 {
		t.Fatalf("upstream called %d times, want 3", calls.Load())
	}
}

func TestDedupeInFlightGets409(t *testing.T) {
	arrived := make(chan struct{}, 1)
	release := make(chan struct{})
	var calls atomic.Int32
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		arrived <- struct{}{}
		<-release
		fmt.Fprint(w, "slow")
	}))
	t.Cleanup(up.Close)
	t.Cleanup(func() {
		select {
		case <-release:
		default:
			close(release)
		}
	})
	g := startGateway(t, dedupeSite(strings.TrimPrefix(up.URL, "http://"), "{\n\t\t\twindow 1h\n\t\t\tmax_entries 10\n\t\t}"))

	body := event("video.live_stream.active", "flight-1", "")
	first := make(chan int, 1)
	go func() {
		resp, err := http.DefaultClient.Do(signedRequest(t, g.url, testSecret, body, time.Now()))
		if err != nil {
			first <- 0
			return
		}
		resp.Body.Close()
		first <- resp.StatusCode
	}()
	select {
	case <-arrived:
	case <-time.After(10 * time.Second):
		t.Fatal("first delivery never reached the upstream")
	}
	if status, _, _ := do(t, signedRequest(t, g.url, testSecret, body, time.Now())); status != http.StatusConflict {
		t.Fatalf("delivery while in flight: %d, want 409", status)
	}
	close(release)
	if status := <-first; status != 200 {
		t.Fatalf("first delivery: %d", status)
	}
	if status, _, _ := do(t, signedRequest(t, g.url, testSecret, body, time.Now())); status != 200 || calls.Load() != 1 {
		t.Fatalf("after the first succeeded: %d, upstream calls %d", status, calls.Load())
	}
}

// TestPanicInRouteReleasesDedupe: reverse_proxy panics with
// http.ErrAbortHandler when its upstream dies mid-response. The request is
// logged and counted, its id is not left in flight, and the panic goes on.
func TestPanicInRouteReleasesDedupe(t *testing.T) {
	h, logs := observedHandler(t, &Handler{Secrets: []string{"s"}, Dedupe: &Dedupe{}})
	body := event("video.asset.ready", "panic-1", "")
	aborting := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		w.WriteHeader(http.StatusOK)
		panic(http.ErrAbortHandler)
	})
	var recovered any
	func() {
		defer func() { recovered = recover() }()
		_, _ = serveSigned(h, "s", body, aborting)
	}()
	if recovered != http.ErrAbortHandler {
		t.Fatalf("panic was %v, want http.ErrAbortHandler to go on", recovered)
	}
	line := lastLine(logs)
	if line == nil || line["outcome"] != "verified" || line["id"] != "panic-1" || line["aborted"] != true || line["status"] != int64(200) {
		t.Fatalf("log line of the aborted request: %v", line)
	}
	calls := 0
	ok := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error { calls++; return nil })
	if status, err := serveSigned(h, "s", body, ok); status != 200 || err != nil || calls != 1 {
		t.Fatalf("Mux's retry after the panic: %d %v, route ran %d times; want it delivered", status, err, calls)
	}
	if status, _ := serveSigned(h, "s", body, ok); status != 200 || calls != 1 {
		t.Fatalf("a redelivery after success: %d, route ran %d times; want a duplicate", status, calls)
	}
	if lastLine(logs)["outcome"] != "duplicate" {
		t.Errorf("log: %v", lastLine(logs))
	}
}

// TestInFlightIsAnOutcome: the 409 is logged with its reason and counted
// as in_flight, like every other refusal.
func TestInFlightIsAnOutcome(t *testing.T) {
	h, logs := observedHandler(t, &Handler{Secrets: []string{"s"}, Dedupe: &Dedupe{}})
	body := event("video.asset.ready", "flight-2", "")
	var inner int
	var innerErr error
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		inner, innerErr = serveSigned(h, "s", body, nil) // the retry, while this one is in flight
		return nil
	})
	if status, err := serveSigned(h, "s", body, next); status != 200 || err != nil {
		t.Fatalf("first delivery: %d %v", status, err)
	}
	if inner != http.StatusConflict || !errors.Is(innerErr, ErrInFlight) || !strings.Contains(innerErr.Error(), "mux_webhook: in_flight: ") {
		t.Fatalf("retry in flight: %d %v", inner, innerErr)
	}
	lines := logs.FilterMessage("mux webhook").All()
	if len(lines) != 2 {
		t.Fatalf("%d log lines", len(lines))
	}
	if m := lines[0].ContextMap(); m["outcome"] != "rejected" || m["reason"] != "in_flight" || m["status"] != int64(409) {
		t.Errorf("409 log line: %v", m)
	}
}

// TestDedupeKeysIdsExactly: ids that JSON reads alike are distinct events.
func TestDedupeKeysIdsExactly(t *testing.T) {
	h, _ := observedHandler(t, &Handler{Secrets: []string{"s"}, Dedupe: &Dedupe{}})
	withID := func(raw string) []byte {
		return []byte(`{"type":"video.asset.ready","id":` + raw + `,"data":{}}`)
	}
	pairs := [][2]string{
		{"\"u\xff\"", "\"u\xfe\""},
		{`"\ud800"`, `"\udbff"`},
		{`7`, `"7"`},
		{`"x"`, `["x"]`},
	}
	for _, p := range pairs {
		calls := 0
		next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error { calls++; return nil })
		for _, raw := range p {
			if status, err := serveSigned(h, "s", withID(raw), next); status != 200 || err != nil {
				t.Fatalf("id %s: %d %v", raw, status, err)
			}
		}
		if calls != 2 {
			t.Errorf("ids %q and %q: route ran %d times, want 2 (distinct ids)", p[0], p[1], calls)
		}
		if status, _ := serveSigned(h, "s", withID(p[0]), next); status != 200 || calls != 2 {
			t.Errorf("id %q again: route ran %d times, want a duplicate", p[0], calls)
		}
	}
}

// TestDedupeSurvivesReloadAndRotation: the record of delivered ids is kept
// across reloads that tune dedupe and across a secret rotation (A, then A
// and B, then B); another endpoint (secret C) has its own.
func TestDedupeSurvivesReloadAndRotation(t *testing.T) {
	up := newUpstream(t, "app")
	base := fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
	storage := t.TempDir()
	load := func(secrets, dedupe string) {
		t.Helper()
		cfg := fmt.Sprintf(`%s
%s {
	mux_webhook {
		secret %s
		dedupe %s
	}
	reverse_proxy %s
}
`, testGlobals{storage: storage}, base, secrets, dedupe, up.hostPort())
		if err := loadCaddyfile(cfg); err != nil {
			t.Fatalf("load: %v\n%s", err, cfg)
		}
	}
	t.Cleanup(func() { _ = stopCaddy() })
	body := event("video.asset.ready", "rotate-1", "")
	deliver := func(secret string) int {
		t.Helper()
		status, _, _ := doAfterReload(t, func() *http.Request { return signedRequest(t, base, secret, body, time.Now()) })
		return status
	}
	load("A-secret", "1h")
	if deliver("A-secret") != 200 || len(up.requests()) != 1 {
		t.Fatal("first delivery")
	}
	steps := []struct{ secrets, dedupe, signWith string }{
		{"A-secret B-secret", "{\n\t\t\twindow 2h\n\t\t\tmax_entries 500\n\t\t}", "B-secret"},
		{"B-secret", "", "B-secret"},
		{"B-secret", "30m", "B-secret"},
	}
	for _, s := range steps {
		load(s.secrets, s.dedupe)
		if status := deliver(s.signWith); status != 200 || len(up.requests()) != 1 {
			t.Fatalf("after reload to secrets %q dedupe %q: %d, upstream saw %d requests; want the id remembered",
				s.secrets, s.dedupe, status, len(up.requests()))
		}
	}
	load("C-secret", "1h")
	if deliver("C-secret") != 200 || len(up.requests()) != 2 {
		t.Fatalf("another endpoint's first delivery of the id: upstream saw %d requests, want 2", len(up.requests()))
	}
}

// TestFailedReloadKeepsTheRecord: a reload that fails to load must not
// shrink (or shorten) what the running config remembers: the record keeps
// the largest bounds of the configs using it.
func TestFailedReloadKeepsTheRecord(t *testing.T) {
	up := newUpstream(t, "app")
	base := fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
	storage := t.TempDir()
	config := func(dedupe, extra string) string {
		return fmt.Sprintf(`%s
%s {
	mux_webhook %s {
		dedupe %s
	}
	%s
	reverse_proxy %s
}
`, testGlobals{storage: storage}, base, testSecret, dedupe, extra, up.hostPort())
	}
	if err := loadCaddyfile(config("{\n\t\t\tmax_entries 100\n\t\t}", "")); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = stopCaddy() })
	bodies := make([][]byte, 5)
	for i := range bodies {
		bodies[i] = event("video.asset.ready", fmt.Sprintf("keep-%d", i), "")
		if status, _, _ := do(t, signedRequest(t, base, testSecret, bodies[i], time.Now())); status != 200 {
			t.Fatalf("delivery %d: %d", i, status)
		}
	}
	// A reload with a tiny record that then fails (mux_store with a
	// relative directory is refused at load).
	if err := loadCaddyfile(config("{\n\t\t\tmax_entries 1\n\t\t}", "mux_store relative/{http.mux.event.id}.json")); err == nil {
		t.Fatal("the broken reload loaded")
	}
	for i, body := range bodies {
		if status, _, _ := doAfterReload(t, func() *http.Request { return signedRequest(t, base, testSecret, body, time.Now()) }); status != 200 {
			t.Fatalf("redelivery %d: %d", i, status)
		}
	}
	if n := len(up.requests()); n != len(bodies) {
		t.Fatalf("upstream saw %d requests, want %d: the failed reload made the running config forget ids", n, len(bodies))
	}
}

// TestClaimPanicReleasesTheId: a storage module that panics in the middle
// of a claim leaves neither the id in flight nor a lock held.
func TestClaimPanicReleasesTheId(t *testing.T) {
	h := provisionedHandler(t, &Handler{Secrets: []string{"claim-panic"}, Dedupe: &Dedupe{}})
	h.dedupe.storage = panickyStorage{}
	ev := &Event{ID: "p-1", IDRaw: []byte(`"p-1"`)}
	func() {
		defer func() { _ = recover() }()
		h.dedupe.claim(context.Background(), ev)
		t.Fatal("claim did not panic")
	}()
	h.dedupe.storage = nil
	if c, v := h.dedupe.claim(context.Background(), ev); v != dedupeProceed || c == nil {
		t.Fatalf("after a panic in claim: verdict %v, want the id free", v)
	}
}

// panickyStorage panics on every lock.
type panickyStorage struct{ certmagic.Storage }

func (panickyStorage) Lock(context.Context, string) error { panic("storage module bug") }

// TestPurgeVisitsEveryRecord: with more records than one purge pass
// visits, the passes go round, so every expired record is deleted.
func TestPurgeVisitsEveryRecord(t *testing.T) {
	fs := &certmagic.FileStorage{Path: t.TempDir()}
	now := time.Unix(1_800_000_000, 0)
	dd := &deduper{scopes: []string{"s"}, storage: fs, logger: zap.NewNop(), now: func() time.Time { return now }}
	ctx := context.Background()
	defer func(n int) { maxPurgePerPass = n }(maxPurgePerPass)
	maxPurgePerPass = 10
	const n = 25
	live, _ := json.Marshal(storedRecord{Expires: now.Add(time.Hour).Unix()})
	dead, _ := json.Marshal(storedRecord{Expires: now.Add(-time.Hour).Unix()})
	for i := range n {
		rec := live
		if i == n-1 {
			rec = dead // sorts last
		}
		var k idKey
		k[0], k[1] = byte(i>>8), byte(i)
		if i == n-1 {
			k[0], k[1] = 0xff, 0xff
		}
		if err := fs.Store(ctx, storageKey("s", k), rec); err != nil {
			t.Fatal(err)
		}
	}
	purged := 0
	for range 3 {
		purged += dd.purge(ctx)
	}
	if purged != 1 {
		t.Fatalf("3 passes of %d purged %d records, want the 1 expired one behind %d live ones", maxPurgePerPass, purged, n-1)
	}
}

// TestStuckIdDoesNotBlockExpiry: an id left in flight (its request never
// finished) does not keep the delivered ids behind it from expiring.
func TestStuckIdDoesNotBlockExpiry(t *testing.T) {
	t0 := time.Unix(1_700_000_000, 0)
	m := newMemoryRecord(10, time.Hour)
	k := func(id string) idKey { return keyOf(&Event{IDRaw: []byte(`"` + id + `"`)}) }
	m.begin(k("stuck"), t0)
	m.begin(k("done"), t0)
	m.markDelivered(k("done"), t0)
	if m.begin(k("done"), t0.Add(time.Minute)) != dedupeDuplicate {
		t.Fatal("a delivered id within the window")
	}
	if v := m.begin(k("done"), t0.Add(time.Hour+time.Second)); v != dedupeProceed {
		t.Fatalf("a delivered id after the window: %v, want it expired despite the stuck id before it", v)
	}
}
