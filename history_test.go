package muxwebhook

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/internal/testwait"
	"github.com/caddy-mux-webhook/caddy-mux-webhook/queue"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// TestHistorySettings: the JSON config mirrors the Caddyfile's names;
// history is on by default where a queue is configured, off elsewhere,
// and `history off` turns it off.
func TestHistorySettings(t *testing.T) {
	out, err := adaptCaddyfile("{\n\tmux_webhook {\n\t\thistory 3d\n\t\thistory_max_bytes 2GiB\n\t}\n}\n:8080 {\n\trespond 204\n}\n")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, `"history": "3d"`) || !strings.Contains(out, `"history_max_bytes": 2147483648`) {
		t.Fatalf("JSON: %s", out)
	}
	for _, tt := range []struct {
		app  App
		on   bool
		want time.Duration
	}{
		{App{}, false, queue.DefaultHistoryAge},
		{App{Destinations: map[string]*DestinationConfig{"app": {}}}, true, queue.DefaultHistoryAge},
		{App{Queue: &QueueConfig{}}, false, queue.DefaultHistoryAge},
		{App{Queue: &QueueConfig{}, History: "1d"}, true, 24 * time.Hour},
		{App{Destinations: map[string]*DestinationConfig{"app": {}}, History: "off"}, false, 0},
		{App{History: "36h"}, true, 36 * time.Hour},
		{App{History: "7d"}, true, 7 * 24 * time.Hour},
	} {
		age, on, err := tt.app.historyAge()
		if err != nil || on != tt.on || age != tt.want {
			t.Errorf("%+v: age %v on %v err %v; want %v %v", tt.app, age, on, err, tt.want, tt.on)
		}
	}
}

// TestHistoryInProcess: a verified event is kept with its route's status
// and its delivery attempt; a forged one is not; a search answers with
// its filters, a bad filter with 400; a gateway with `history off`
// answers 404 and makes no history stream.
func TestHistoryInProcess(t *testing.T) {
	app := newUpstream(t, "app")
	dir := filepath.Join(t.TempDir(), "js")
	g := startGatewayWithAdmin(t, deliverGlobal(dir, fmt.Sprintf("\t\tdestination app %s {\n\t\t\tretry 20ms\n\t\t}", app.URL)),
		fmt.Sprintf("mux_webhook %s\n\tmux_deliver app", testSecret))
	body := event("video.asset.ready", "h-1", "")
	if status, _, got := do(t, signedRequest(t, g.url, testSecret, body, time.Now())); status != http.StatusAccepted {
		t.Fatalf("verified: %d %s", status, got)
	}
	if status, _, _ := do(t, signedRequest(t, g.url, "not-the-secret", event("video.asset.ready", "forged-1", ""), time.Now())); status != http.StatusUnauthorized {
		t.Fatalf("forged: %d", status)
	}
	var page struct {
		Events []queue.HistoryEvent `json:"events"`
	}
	testwait.For(t, func() bool {
		getJSON(t, g.admin+"/mux-webhook/history", &page)
		return len(page.Events) == 1 && len(page.Events[0].Attempts) == 1
	}, func() string { return fmt.Sprintf("history: %+v", page) })
	e := page.Events[0]
	if e.ID != "h-1" || e.Type != "video.asset.ready" || e.Status != http.StatusAccepted || e.Outcome != "verified" ||
		e.ObjectID != "obj-h-1" || e.Attempts[0].Result != "delivered" || e.Attempts[0].Status != http.StatusOK {
		t.Fatalf("kept: %+v", e)
	}
	for q, want := range map[string]int{"type=video.asset.*": 1, "type=video.live_stream.*": 0, "object=obj-h-1": 1, "id=h-2": 0, "outcome=duplicate": 0, "id=forged-1": 0} {
		page.Events = nil
		if status := getJSON(t, g.admin+"/mux-webhook/history?"+q, &page); status != http.StatusOK || len(page.Events) != want {
			t.Errorf("?%s: %d, %d events; want %d", q, status, len(page.Events), want)
		}
	}
	for _, q := range []string{"outcome=mismatch", "limit=0", "limit=1001", "since=yesterday", "before=x", "type=a%20b"} {
		var out map[string]any
		if status := getJSON(t, g.admin+"/mux-webhook/history?"+q, &out); status != http.StatusBadRequest {
			t.Errorf("?%s: %d, want 400 (%v)", q, status, out)
		}
	}
	var detail queue.HistoryEvent
	if status := getJSON(t, fmt.Sprintf("%s/mux-webhook/history/%d", g.admin, e.Seq), &detail); status != http.StatusOK || detail.Body != string(body) {
		t.Fatalf("detail: %d %+v", status, detail)
	}
	if status := getJSON(t, g.admin+"/mux-webhook/history/999999", &detail); status != http.StatusNotFound {
		t.Fatalf("no such event: %d", status)
	}
	// Replay needs a destination that signs.
	resp, err := http.Post(g.admin+"/mux-webhook/history/replay", "application/json", strings.NewReader(`{"destination":"app","dry_run":true}`))
	if err != nil {
		t.Fatal(err)
	}
	var refusal map[string]string
	_ = json.NewDecoder(resp.Body).Decode(&refusal)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(refusal["error"], "no sign") {
		t.Fatalf("replay without sign: %d %v", resp.StatusCode, refusal)
	}

	// history off: 404, and no stream.
	off := startGatewayWithAdmin(t, "\tmux_webhook {\n\t\thistory off\n\t\tqueue {\n\t\t\tdir "+filepath.Join(t.TempDir(), "js")+"\n\t\t}\n\t\tdestination app "+app.URL+"\n\t}",
		fmt.Sprintf("mux_webhook %s\n\tmux_deliver app", testSecret))
	do(t, signedRequest(t, off.url, testSecret, event("video.asset.ready", "h-off", ""), time.Now()))
	resp, err = http.Get(off.admin + "/mux-webhook/history?" + url.Values{"type": {"*"}}.Encode())
	if err != nil {
		t.Fatal(err)
	}
	var msg map[string]string
	_ = json.NewDecoder(resp.Body).Decode(&msg)
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound || !strings.Contains(msg["error"], "`history off`") {
		t.Fatalf("history off: %d %v, want a 404 that says `history off` turned it off", resp.StatusCode, msg)
	}
}

// TestHistoryOffAndOnByReload: a reload to `history off` stops recording
// (the endpoints answer 404, nothing is counted as dropped); a reload back
// on records again, on the same store.
func TestHistoryOffAndOnByReload(t *testing.T) {
	app := newUpstream(t, "app")
	dir := filepath.Join(t.TempDir(), "js")
	port := freePort(t)
	global := func(history string) string {
		return "\tmux_webhook {\n\t\thistory " + history + "\n\t\tqueue {\n\t\t\tdir " + dir + "\n\t\t}\n\t\tdestination app " + app.URL + "\n\t}"
	}
	site := fmt.Sprintf("mux_webhook %s\n\tmux_deliver app", testSecret)
	cfg, g := gatewayConfigWith(t, fmt.Sprintf("localhost:%d", port), global("7d"), site)
	g.admin = fmt.Sprintf("http://localhost:%d", port)
	g.load(cfg)
	count := func() (int, int) {
		var page struct {
			Events []queue.HistoryEvent `json:"events"`
		}
		status := getJSON(t, g.admin+"/mux-webhook/history?limit=1000", &page)
		return status, len(page.Events)
	}
	do(t, signedRequest(t, g.url, testSecret, event("video.asset.ready", "on-1", ""), time.Now()))
	testwait.For(t, func() bool { s, n := count(); return s == 200 && n == 1 }, func() string { s, n := count(); return fmt.Sprint(s, n) })
	dropped := testutil.ToFloat64(muxMetrics.historyDropped)

	// Off by reload: 404, nothing recorded, nothing counted as dropped.
	if err := loadCaddyfile(strings.Replace(cfg, "history 7d", "history off", 1)); err != nil {
		t.Fatal(err)
	}
	if status, _, _ := do(t, signedRequest(t, g.url, testSecret, event("video.asset.ready", "off-1", ""), time.Now())); status != http.StatusAccepted {
		t.Fatalf("with history off: %d", status)
	}
	testwait.For(t, func() bool { return len(app.requests()) >= 2 }, func() string { return "off-1 not delivered" })
	if s, _ := count(); s != http.StatusNotFound {
		t.Fatalf("history off: %d", s)
	}
	// On again: the same store's history, recording.
	if err := loadCaddyfile(cfg); err != nil {
		t.Fatal(err)
	}
	do(t, signedRequest(t, g.url, testSecret, event("video.asset.ready", "on-2", ""), time.Now()))
	testwait.For(t, func() bool { s, n := count(); return s == 200 && n == 2 }, func() string { s, n := count(); return fmt.Sprint(s, n) })
	var page struct {
		Events []queue.HistoryEvent `json:"events"`
	}
	getJSON(t, g.admin+"/mux-webhook/history?id=off-1", &page)
	if len(page.Events) != 0 {
		t.Fatalf("an event answered with history off was recorded: %+v", page.Events)
	}
	if d := testutil.ToFloat64(muxMetrics.historyDropped) - dropped; d != 0 {
		t.Fatalf("%v records counted as dropped across the reloads", d)
	}
}
