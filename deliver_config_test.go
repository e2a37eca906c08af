package muxwebhook

// The queue's settings (deliver_config.go): load-time errors that name the
// option, and a message limit that follows max_body.

import (
	"bytes"
	"fmt"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/internal/testwait"
	"github.com/caddy-mux-webhook/caddy-mux-webhook/queue"
	"github.com/caddyserver/caddy/v2"
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
	testwait.For(t, func() bool {
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

// TestMuxDeliverConfigErrors: an unknown destination is a load error; so
// is a bad destination.
func TestMuxDeliverConfigErrors(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "js")
	cases := []struct{ global, site, want string }{
		{deliverGlobal(dir, "\t\tdestination app http://127.0.0.1:1"), "mux_webhook s\n\tmux_deliver nope", `unknown destination "nope"`},
		{"", "mux_webhook s\n\tmux_deliver app", `unknown destination "app"`},
		{deliverGlobal(dir, "\t\tdestination app ftp://x"), "mux_webhook s\n\tmux_deliver app", "must start with http://"},
		{deliverGlobal(dir, "\t\tdestination a.b http://127.0.0.1:1"), "mux_webhook s\n\tmux_deliver a.b", "destination name"},
		{deliverGlobal(dir, "\t\tdestination app http://127.0.0.1:1 {\n\t\t\theader Authorization \"Bearer {env.MUX_TEST_UNSET_TOKEN}\"\n\t\t}"), "mux_webhook s\n\tmux_deliver app", "header Authorization: a placeholder in it is unset or empty"},
		{deliverGlobal(dir, "\t\tdestination app http://127.0.0.1:1 {\n\t\t\trate 0/s\n\t\t}"), "mux_webhook s\n\tmux_deliver app", `destination app rate "0/s": want <n>/<s|m|h>`},
		{deliverGlobal(dir, "\t\tdestination app http://127.0.0.1:1 {\n\t\t\trate five/s\n\t\t}"), "mux_webhook s\n\tmux_deliver app", `destination app rate "five/s": want <n>/<s|m|h>`},
		{deliverGlobal(dir, "\t\tdestination app http://127.0.0.1:1 {\n\t\t\trate 5/d\n\t\t}"), "mux_webhook s\n\tmux_deliver app", `destination app rate "5/d": want <n>/<s|m|h>`},
		{deliverGlobal(dir, "\t\tdestination app http://127.0.0.1:1 {\n\t\t\trate 5\n\t\t}"), "mux_webhook s\n\tmux_deliver app", `destination app rate "5": want <n>/<s|m|h>`},
		{deliverGlobal(dir, "\t\tdestination app http://127.0.0.1:1 {\n\t\t\trate\n\t\t}"), "mux_webhook s\n\tmux_deliver app", `destination app rate: want one value`},
		{deliverGlobal(dir, "\t\tdestination app http://127.0.0.1:1 {\n\t\t\tbreaker -1 1s\n\t\t}"), "mux_webhook s\n\tmux_deliver app", `destination app breaker -1 1s: want breaker <failures> <probe>`},
		{deliverGlobal(dir, "\t\tdestination app http://127.0.0.1:1 {\n\t\t\tbreaker ten 30s\n\t\t}"), "mux_webhook s\n\tmux_deliver app", `destination app breaker ten 30s: want breaker <failures> <probe>`},
		{deliverGlobal(dir, "\t\tdestination app http://127.0.0.1:1 {\n\t\t\tbreaker 10 0s\n\t\t}"), "mux_webhook s\n\tmux_deliver app", `destination app breaker 10 0s: want a probe interval greater than 0`},
		{deliverGlobal(dir, "\t\tdestination app http://127.0.0.1:1 {\n\t\t\tbreaker 10\n\t\t}"), "mux_webhook s\n\tmux_deliver app", `destination app breaker: want breaker <failures> <probe>`},
	}
	for _, c := range cases {
		cfg, _ := gatewayConfigWith(t, "off", c.global, c.site)
		err := loadCaddyfile(cfg)
		if err == nil {
			_ = stopCaddy()
			t.Errorf("%q loaded", c.site)
			continue
		}
		if !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: %v, want %q", c.site, err, c.want)
		}
	}
}

// TestDestinationRateFromJSON: a JSON config's rate is checked as the
// Caddyfile's is, naming the destination and the option, and a good one
// reaches the queue.
func TestDestinationRateFromJSON(t *testing.T) {
	for _, bad := range []string{"0/s", "five/s", "5/d", "5", "-1/m", "5/"} {
		dc := &DestinationConfig{URL: "http://127.0.0.1:1", Rate: bad}
		if _, _, err := dc.destination("app"); err == nil || !strings.Contains(err.Error(), `destination app: rate "`+bad+`"`) {
			t.Errorf("rate %q: %v", bad, err)
		}
	}
	dc := &DestinationConfig{URL: "http://127.0.0.1:1", Rate: "100/m"}
	d, _, err := dc.destination("app")
	if err != nil || d.Rate != 100 || d.RatePer != time.Minute {
		t.Errorf("rate 100/m: %+v, %v", d, err)
	}
}

// TestDestinationBreakerFromJSON: a JSON config's breaker is checked as
// the Caddyfile's is, and reaches the queue (off included).
func TestDestinationBreakerFromJSON(t *testing.T) {
	for _, bad := range []*BreakerConfig{{Failures: -1, Probe: caddy.Duration(time.Second)}, {}, {Failures: 10, Probe: -1}, {Off: true, Failures: 3}} {
		dc := &DestinationConfig{URL: "http://127.0.0.1:1", Breaker: bad}
		if _, _, err := dc.destination("app"); err == nil || !strings.Contains(err.Error(), "destination app: breaker: ") {
			t.Errorf("breaker %+v: %v", bad, err)
		}
	}
	dc := &DestinationConfig{URL: "http://127.0.0.1:1", Breaker: &BreakerConfig{Failures: 3, Probe: caddy.Duration(time.Second)}}
	if d, _, err := dc.destination("app"); err != nil || d.BreakerFailures != 3 || d.BreakerProbe != time.Second {
		t.Errorf("breaker 3 1s: %+v, %v", d, err)
	}
	dc = &DestinationConfig{URL: "http://127.0.0.1:1", Breaker: &BreakerConfig{Probe: caddy.Duration(time.Minute)}}
	if d, _, err := dc.destination("app"); err != nil || d.BreakerFailures != 0 || d.BreakerProbe != time.Minute {
		t.Errorf("breaker with a probe only (failures default): %+v, %v", d, err)
	}
	dc = &DestinationConfig{URL: "http://127.0.0.1:1", Breaker: &BreakerConfig{Off: true}}
	if d, _, err := dc.destination("app"); err != nil || d.BreakerFailures != queue.BreakerOff {
		t.Errorf("breaker off: %+v, %v", d, err)
	}
}
