package muxwebhook

// Tests of the request pipeline: the outcomes table, dedupe's two calls
// (claim, finish) under panics, reloads and rotation, exact id keys, what
// a request leaves in memory, and placeholders that are safe in headers.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/certmagic"
)

func TestOutcomeTable(t *testing.T) {
	seen := map[string]bool{}
	for _, o := range refusals {
		if o.Name == "" || seen[o.Name] || o.err == nil || o.Status < 400 || o.Status > 499 || !o.Refused() {
			t.Errorf("refusal row %+v: want a unique name, an error and a 4xx status", o)
		}
		seen[o.Name] = true
		if got := Reason(fmt.Errorf("wrapped: %w", o.err)); got != o.Name {
			t.Errorf("Reason(%v) = %q, want %q", o.err, got, o.Name)
		}
		if !outcomes[o.Name] {
			t.Errorf("%s is not a metrics/live log outcome", o.Name)
		}
	}
	if OutcomeVerified.Refused() || OutcomeDuplicate.Refused() || !outcomes["verified"] || !outcomes["duplicate"] {
		t.Error("success outcomes")
	}
	if len(OutcomeNames()) != len(refusals)+2 || len(outcomes) != len(refusals)+2 {
		t.Errorf("OutcomeNames %v", OutcomeNames())
	}
	if Reason(errors.New("other")) != "" {
		t.Error("Reason of an unrelated error")
	}
}

// observedHandler is a provisioned handler whose log lines the test reads.
func observedHandler(t *testing.T, h *Handler) (*Handler, *observer.ObservedLogs) {
	t.Helper()
	h = provisionedHandler(t, h)
	core, logs := observer.New(zapcore.DebugLevel)
	h.logger = zap.New(core)
	if h.dedupe != nil {
		h.dedupe.logger = h.logger
	}
	return h, logs
}

// serveSigned runs body, signed with secret, through h with next.
func serveSigned(h *Handler, secret string, body []byte, next caddyhttp.Handler) (int, error) {
	w := newRecorder()
	err := h.ServeHTTP(w, benchRequest(body, Sign([]byte(secret), body, time.Now())), next)
	if he, ok := errors.AsType[caddyhttp.HandlerError](err); ok {
		return he.StatusCode, err
	}
	return w.Code, err
}

func lastLine(logs *observer.ObservedLogs) map[string]any {
	all := logs.FilterMessage("mux webhook").All()
	if len(all) == 0 {
		return nil
	}
	return all[len(all)-1].ContextMap()
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
		cfg := fmt.Sprintf(`{
	admin off
	persist_config off
	auto_https off
	default_bind 127.0.0.1
	storage file_system %s
}
%s {
	mux_webhook {
		secret %s
		dedupe %s
	}
	reverse_proxy %s
}
`, storage, base, secrets, dedupe, up.hostPort())
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

// TestRequestsDoNotPinBodies: 1 000 remembered ids of 64 KiB events (and
// their live log entries) keep a small fraction of the 64 MiB of bodies.
func TestRequestsDoNotPinBodies(t *testing.T) {
	h, _ := observedHandler(t, &Handler{Secrets: []string{"pin-secret"}, Dedupe: &Dedupe{}})
	h.logger = zap.NewNop()
	// After provisioning, which applies the live log's defaults: the live
	// log keeps 1 KiB of each body, 0.5 MiB in all.
	liveLog.configure(DefaultLogSize, 1024)
	t.Cleanup(func() { liveLog.configure(DefaultLogSize, DefaultLogBody) })
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error { return nil })
	const n, size = 1000, 64 << 10
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	pad := strings.Repeat("p", size)
	for i := range n {
		id := fmt.Sprintf("pin-%d-%s", i, pad[:200])
		body := fmt.Appendf(nil, `{"type":"video.asset.ready","id":%q,"object":{"type":"asset","id":"a%d"},"data":{"passthrough":%q}}`, id, i, pad)
		if status, err := serveSigned(h, "pin-secret", body, next); status != 200 || err != nil {
			t.Fatalf("event %d: %d %v", i, status, err)
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	if h.dedupe.memory.len() != n {
		t.Fatalf("dedupe remembers %d ids, want %d", h.dedupe.memory.len(), n)
	}
	grown := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	t.Logf("heap grew by %.1f MiB after %d events of %d KiB", float64(grown)/(1<<20), n, size>>10)
	if grown > 8<<20 {
		t.Errorf("heap grew by %.1f MiB after %d remembered events of %d KiB: bodies are pinned", float64(grown)/(1<<20), n, size>>10)
	}
}

// TestClaimedLengthIsNotAllocated: a body that claims 16 MiB and sends 100
// bytes costs a small buffer, not the claim.
func TestClaimedLengthIsNotAllocated(t *testing.T) {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	_, err := readBounded(strings.NewReader(strings.Repeat("x", 100)), MaxMaxBody, MaxMaxBody)
	runtime.ReadMemStats(&after)
	if !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("short body: %v", err)
	}
	if got := after.TotalAlloc - before.TotalAlloc; got > 64<<10 {
		t.Errorf("allocated %d bytes for 100 that arrived", got)
	}
	// A body that arrives in full, in small reads, of known and unknown
	// length, is read exactly; too much is refused.
	body := strings.Repeat("0123456789", 100_000)
	for _, length := range []int64{int64(len(body)), -1} {
		got, err := readBounded(io.MultiReader(strings.NewReader(body[:7]), strings.NewReader(body[7:])), length, 1<<20)
		if err != nil || string(got) != body || int64(cap(got)) > 4*int64(len(body)) {
			t.Errorf("length %d: err %v, read %d bytes, cap %d", length, err, len(got), cap(got))
		}
		if _, err := readBounded(strings.NewReader(body), length, int64(len(body))-1); !errors.Is(err, ErrTooLarge) && length < 0 {
			t.Errorf("length %d over the limit: %v", length, err)
		}
	}
}

// TestPlaceholdersAreSafeInHeaders: free text with CR, LF, NUL or ESC in
// data.passthrough, forwarded in a header by header_up, is delivered (the
// control characters become spaces in the header; the body is unchanged).
func TestPlaceholdersAreSafeInHeaders(t *testing.T) {
	up := newUpstream(t, "app")
	g := startGateway(t, fmt.Sprintf(`
	mux_webhook %s
	reverse_proxy %s {
		header_up X-Mux-Passthrough {http.mux.data.passthrough}
		header_up X-Mux-Event-Type {http.mux.event.type}
	}`, testSecret, up.hostPort()))
	for i, pt := range []string{`line1\nline2`, `a\r\nb`, `x\u0000y`, `\u001b[31mred`, "tab\\tkept", "plain"} {
		body := event("video.asset.ready", fmt.Sprintf("ctl-%d", i), `{"passthrough":"`+pt+`"}`)
		status, _, _ := do(t, signedRequest(t, g.url, testSecret, body, time.Now()))
		if status != 200 {
			t.Fatalf("passthrough %s: %d, want 200", pt, status)
		}
		got := up.requests()[i]
		if v := got.Header.Get("X-Mux-Passthrough"); strings.ContainsFunc(v, isControl) || v == "" {
			t.Errorf("passthrough %s reached the upstream as %q", pt, v)
		}
		if string(got.Body) != string(body) {
			t.Errorf("passthrough %s: body changed", pt)
		}
	}
	if v := up.requests()[0].Header.Get("X-Mux-Passthrough"); v != "line1 line2" {
		t.Errorf("newline became %q, want a space", v)
	}
	if v := up.requests()[4].Header.Get("X-Mux-Passthrough"); v != "tab\tkept" {
		t.Errorf("tab became %q, want it kept", v)
	}
}

// TestSlowBodyGets408: a body that does not arrive within body_timeout is
// answered 408 and nothing is forwarded, with a genuine or a forged but
// well-formed signature.
func TestSlowBodyGets408(t *testing.T) {
	up := newUpstream(t, "app")
	g := startGateway(t, fmt.Sprintf(`
	mux_webhook %s {
		body_timeout 500ms
	}
	reverse_proxy %s`, testSecret, up.hostPort()))
	body := event("video.asset.ready", "slow-1", "")
	for _, secret := range []string{testSecret, "forged"} {
		req := signedRequest(t, g.url, secret, body, time.Now())
		conn, err := net.Dial("tcp", strings.TrimPrefix(g.url, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(conn, "POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\nMux-Signature: %s\r\n\r\n%s",
			len(body), req.Header.Get("Mux-Signature"), body[:10])
		_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		start := time.Now()
		resp, err := http.ReadResponse(bufioReader(conn), nil)
		conn.Close()
		if err != nil {
			t.Fatalf("secret %s: no response: %v\n%s", secret, err, g.rawLog())
		}
		if resp.StatusCode != http.StatusRequestTimeout {
			t.Errorf("secret %s: %d after %s, want 408", secret, resp.StatusCode, time.Since(start))
		}
	}
	if n := len(up.requests()); n != 0 {
		t.Fatalf("upstream got %d requests", n)
	}
	found := false
	for _, l := range g.logLines() {
		found = found || l["msg"] == "mux webhook" && l["reason"] == "body_timeout" && l["status"] == float64(408)
	}
	if !found {
		t.Error("no log line with reason body_timeout")
	}
}

// TestMetricsFamilyOfNewTypes: a type Mux adds to a known family counts
// in that family, not as unknown.
func TestMetricsFamilyOfNewTypes(t *testing.T) {
	up := newUpstream(t, "app")
	g := startGatewayWithAdmin(t, "", fmt.Sprintf("mux_webhook %s\n\treverse_proxy %s", testSecret, up.hostPort()))
	before := scrape(t, g.admin)
	do(t, signedRequest(t, g.url, testSecret, event("video.asset.brand_new", "fam-1", ""), time.Now()))
	after := scrape(t, g.admin)
	name := `caddy_mux_webhook_responses_total{code="2xx",family="video.asset"}`
	if after[name]-before[name] != 1 {
		t.Errorf("%s grew by %v, want 1", name, after[name]-before[name])
	}
	name = `caddy_mux_webhook_events_total{type="unknown"}`
	if after[name]-before[name] != 1 {
		t.Errorf("%s grew by %v, want 1", name, after[name]-before[name])
	}
}

func bufioReader(r io.Reader) *bufio.Reader { return bufio.NewReader(r) }

// TestFailedReloadKeepsTheRecord: a reload that fails to load must not
// shrink (or shorten) what the running config remembers: the record keeps
// the largest bounds of the configs using it.
func TestFailedReloadKeepsTheRecord(t *testing.T) {
	up := newUpstream(t, "app")
	base := fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
	storage := t.TempDir()
	config := func(dedupe, extra string) string {
		return fmt.Sprintf(`{
	admin off
	persist_config off
	auto_https off
	default_bind 127.0.0.1
	storage file_system %s
}
%s {
	mux_webhook %s {
		dedupe %s
	}
	%s
	reverse_proxy %s
}
`, storage, base, testSecret, dedupe, extra, up.hostPort())
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

// TestBodyTimeoutWithoutDeadlines: where the response writer cannot set a
// read deadline, a body that does not arrive still ends at body_timeout.
func TestBodyTimeoutWithoutDeadlines(t *testing.T) {
	h := provisionedHandler(t, &Handler{Secrets: []string{"s"}, BodyTimeout: caddy.Duration(100 * time.Millisecond)})
	pr, pw := io.Pipe()
	t.Cleanup(func() { pw.Close() })
	r := httptest.NewRequest(http.MethodPost, "/", pr)
	r.ContentLength = 100
	done := make(chan error, 1)
	go func() {
		_, err := h.readBody(httptest.NewRecorder(), r) // no SetReadDeadline
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, ErrBodyTimeout) {
			t.Fatalf("err = %v, want ErrBodyTimeout", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("readBody still waiting for a body that never comes")
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
