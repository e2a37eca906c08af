package muxwebhook

// The store of #18: one owner per store directory, whatever its spelling;
// a message limit that follows max_body; Idempotency-Key always a valid
// header value; a shared stream's settings never lowered by a gateway.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// sizedEvent is a Mux event of exactly size bytes.
func sizedEvent(t *testing.T, id string, size int) []byte {
	t.Helper()
	head := fmt.Sprintf(`{"type":"video.asset.ready","id":%q,"data":{"pad":"`, id)
	const tail = `"}}`
	pad := size - len(head) - len(tail)
	if pad < 0 {
		t.Fatalf("no event of %d bytes", size)
	}
	return []byte(head + strings.Repeat("p", pad) + tail)
}

// TestQueueMessageFollowsMaxBody: an event of exactly max_body (2 MiB on
// one route; the default 1 MiB on another) is queued (202), delivered byte
// for byte, and, to a destination that fails with max_attempts 1, kept as
// a dead letter: NATS's default message limit (1 MiB) took neither.
func TestQueueMessageFollowsMaxBody(t *testing.T) {
	ok := newUpstream(t, "ok")
	down := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusInternalServerError)
	}))
	t.Cleanup(down.Close)
	dir := filepath.Join(t.TempDir(), "js")
	g := startGatewayWithAdmin(t, deliverGlobal(dir,
		fmt.Sprintf("\t\tdestination ok %s {\n\t\t\tretry 20ms\n\t\t}", ok.URL),
		fmt.Sprintf("\t\tdestination down %s {\n\t\t\tretry 20ms\n\t\t\tmax_attempts 1\n\t\t}", down.URL),
	), fmt.Sprintf(`
	handle /big {
		mux_webhook %s {
			max_body 2MiB
		}
		mux_deliver ok down
	}
	handle {
		mux_webhook %s
		mux_deliver ok down
	}`, testSecret, testSecret))
	sent := map[string][]byte{
		"max-2mib": sizedEvent(t, "max-2mib", 2<<20),
		"max-1mib": sizedEvent(t, "max-1mib", 1<<20),
	}
	for id, body := range sent {
		url := g.url + "/"
		if id == "max-2mib" {
			url = g.url + "/big"
		}
		if status, _, got := do(t, signedRequest(t, url, testSecret, body, time.Now())); status != http.StatusAccepted {
			t.Fatalf("%s (%d bytes): %d %s, want 202", id, len(body), status, got)
		}
	}
	var dead []map[string]any
	waitFor(t, func() bool {
		dead = nil
		getJSON(t, g.admin+"/mux-webhook/queue/dead?destination=down", &dead)
		return len(ok.requests()) >= 2 && len(dead) >= 2
	}, func() string { return fmt.Sprintf("ok got %d, dead letters of down: %v", len(ok.requests()), dead) })
	time.Sleep(200 * time.Millisecond) // nothing more arrives
	got := map[string]int{}
	for _, r := range ok.requests() {
		id := r.Header.Get("Idempotency-Key")
		got[id]++
		if !bytes.Equal(r.Body, sent[id]) {
			t.Errorf("%s: delivered %d bytes, not the %d sent", id, len(r.Body), len(sent[id]))
		}
	}
	if len(got) != 2 || got["max-2mib"] != 1 || got["max-1mib"] != 1 {
		t.Errorf("ok received %v; want each event once", got)
	}
	deadIDs := map[string]bool{}
	for _, d := range dead {
		deadIDs[fmt.Sprint(d["id"])] = true
	}
	if len(dead) != 2 || !deadIDs["max-2mib"] || !deadIDs["max-1mib"] {
		t.Errorf("dead letters of down: %v; want max-2mib and max-1mib", dead)
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
	waitFor(t, func() bool { return len(app.requests()) >= len(want) }, func() string { return fmt.Sprintf("app got %d", len(app.requests())) })
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
	waitFor(t, func() bool {
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

// TestQueueNATSMaxPayloadTooSmall: an external NATS server whose
// max_payload (2MB here) cannot hold an event of a handler's max_body
// (4MiB) and its headers is a load error naming max_payload, its value
// and the max_body; under max_body's default it loads.
func TestQueueNATSMaxPayloadTooSmall(t *testing.T) {
	dir := t.TempDir()
	port := freePort(t)
	url := fmt.Sprintf("nats://127.0.0.1:%d", port)
	natsServerWithConfig(t, dir, fmt.Sprintf("127.0.0.1:%d", port),
		fmt.Sprintf("listen: 127.0.0.1:%d\njetstream { store_dir: %q }\n", port, filepath.Join(dir, "store")))
	global := fmt.Sprintf("\tmux_webhook {\n\t\tqueue {\n\t\t\tnats %s\n\t\t}\n\t\tdestination app http://127.0.0.1:1\n\t}", url)
	cfg, _ := gatewayConfigWith(t, "off", global, fmt.Sprintf("mux_webhook %s\n\tmux_deliver app", testSecret))
	if err := loadCaddyfile(cfg); err != nil {
		t.Fatalf("max_body 1MiB on max_payload 2MB: %v", err)
	}
	if err := stopCaddy(); err != nil {
		t.Fatal(err)
	}
	big, _ := gatewayConfigWith(t, "off", global, fmt.Sprintf("mux_webhook %s {\n\t\tmax_body 4MiB\n\t}\n\tmux_deliver app", testSecret))
	err := loadCaddyfile(big)
	if err == nil {
		_ = stopCaddy()
		t.Fatal("max_body 4MiB on a NATS server with max_payload 2MB loaded")
	}
	for _, want := range []string{"max_payload is 2097152", "max_body 4194304", "max_payload: "} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("load error %q does not say %q", err, want)
		}
	}
}

// TestQueueSharedStreamNeverLowered: gateway A runs the shared stream with
// replicas 3 and max_bytes 64MiB on a three-node cluster; gateway B,
// started with replicas 1 and max_bytes 16MiB, logs a WARN naming each
// and leaves the stream at R3 and 64 MiB; its events are queued and
// delivered. A reload of B that raises max_bytes to 128MiB raises it.
func TestQueueSharedStreamNeverLowered(t *testing.T) {
	c := startNATSCluster(t)
	app := newUpstream(t, "app")
	global := func(replicas int, maxBytes string) string {
		return fmt.Sprintf("\tmux_webhook {\n\t\tqueue {\n\t\t\tnats %s {\n\t\t\t\treplicas %d\n\t\t\t}\n\t\t\tmax_bytes %s\n\t\t}\n"+
			"\t\tdestination app %s {\n\t\t\tretry 50ms\n\t\t}\n\t}", c.urls(), replicas, maxBytes, app.URL)
	}
	site := fmt.Sprintf("mux_webhook %s\n\tmux_deliver app", testSecret)
	cfgA, _ := gatewayConfigWith(t, "off", global(3, "64MiB"), site)
	if err := loadCaddyfile(cfgA); err != nil {
		t.Fatal(err)
	}
	if err := stopCaddy(); err != nil {
		t.Fatal(err)
	}
	streamInfo := func() jetstream.StreamConfig {
		t.Helper()
		nc, err := nats.Connect(strings.ReplaceAll(c.urls(), " ", ","))
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		js, _ := jetstream.New(nc)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		st, err := js.Stream(ctx, "MUX_WEBHOOK")
		if err != nil {
			t.Fatal(err)
		}
		return st.CachedInfo().Config
	}
	if sc := streamInfo(); sc.Replicas != 3 || sc.MaxBytes != 64<<20 {
		t.Fatalf("after A: %d replicas, max_bytes %d", sc.Replicas, sc.MaxBytes)
	}
	cfgB, g := gatewayConfigWith(t, "off", global(1, "16MiB"), site)
	g.load(cfgB)
	warned := map[string]map[string]any{}
	for _, l := range g.logLines() {
		if l["level"] == "warn" && strings.Contains(fmt.Sprint(l["msg"]), "lower than the shared stream's") {
			warned[fmt.Sprint(l["setting"])] = l
		}
	}
	if w := warned["replicas"]; w == nil || w["configured"] != "1" || w["running"] != "3" {
		t.Errorf("B's WARN for replicas: %v (all: %v)", w, warned)
	}
	if w := warned["max_bytes"]; w == nil || w["configured"] != fmt.Sprint(16<<20) || w["running"] != fmt.Sprint(64<<20) {
		t.Errorf("B's WARN for max_bytes: %v (all: %v)", w, warned)
	}
	if sc := streamInfo(); sc.Replicas != 3 || sc.MaxBytes != 64<<20 {
		t.Errorf("after B: %d replicas, max_bytes %d; want 3 and %d", sc.Replicas, sc.MaxBytes, 64<<20)
	}
	if status, _, got := do(t, signedRequest(t, g.url, testSecret, event("video.asset.ready", "shared-1", ""), time.Now())); status != http.StatusAccepted {
		t.Fatalf("B: %d %s", status, got)
	}
	waitFor(t, func() bool { return len(app.requests()) >= 1 }, func() string { return "app got nothing from B" })
	if err := loadCaddyfile(strings.Replace(cfgB, global(1, "16MiB"), global(1, "128MiB"), 1)); err != nil {
		t.Fatal(err)
	}
	if sc := streamInfo(); sc.Replicas != 3 || sc.MaxBytes != 128<<20 {
		t.Errorf("after B's reload to 128MiB: %d replicas, max_bytes %d; want 3 and %d", sc.Replicas, sc.MaxBytes, 128<<20)
	}
}
