//go:build e2e

package muxwebhook

// Tests of the xcaddy-built binary: the README's demo (examples/Caddyfile)
// and its curl/openssl recipe (examples/send-event.sh), run as a user would.

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/internal/testwait"
)

// startDemo runs the binary on examples/Caddyfile with its ports moved to
// free ones, and returns the gateway's base URL and the admin API's
// address.
func startDemo(t *testing.T) (base, admin string) {
	t.Helper()
	bin := caddyBinary(t)
	src, err := os.ReadFile("examples/Caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	cfg := string(src)
	ports := map[string]int{}
	for _, p := range []string{"2019", "8080", "9001", "9002", "9003"} {
		n := freePort(t)
		ports[p] = n
		cfg = strings.ReplaceAll(cfg, ":"+p, fmt.Sprintf(":%d", n))
	}
	out := runCaddyBinary(t, bin, cfg)
	base = fmt.Sprintf("http://localhost:%d", ports["8080"])
	waitForHTTP(t, base, out)
	return base, fmt.Sprintf("localhost:%d", ports["2019"])
}

func TestDemoBinaryRoutesEvents(t *testing.T) {
	t.Parallel() // its own processes and ports
	base, _ := startDemo(t)
	cases := []struct {
		typ    string
		status int
		want   string
	}{
		{"video.asset.ready", 200, "assets service received video.asset.ready (d1)"},
		{"video.upload.asset_created", 200, "assets service received video.upload.asset_created (d2)"},
		{"video.live_stream.active", 200, "live service received video.live_stream.active (d3)"},
		{"video.asset.track.ready", 200, "assets service received video.asset.track.ready (d4)"},
		{"robots.job.summarize.completed", 202, ""}, // queued for analytics
	}
	for i, c := range cases {
		body := event(c.typ, fmt.Sprintf("d%d", i+1), "")
		status, _, got := do(t, signedRequest(t, base+"/mux", demoSecret, body, time.Now()))
		if status != c.status || got != c.want {
			t.Errorf("%s: got %d %q, want %d %q", c.typ, status, got, c.status, c.want)
		}
	}
	status, _, _ := do(t, signedRequest(t, base+"/mux", "not-the-demo-secret", event("video.asset.ready", "x", ""), time.Now()))
	if status != 401 {
		t.Errorf("forged event: got %d, want 401", status)
	}
	// The console's page and the live log's entries.
	req, _ := http.NewRequest(http.MethodGet, base+"/mux-webhook/", nil)
	if status, hdr, page := do(t, req); status != 200 || !strings.Contains(hdr.Get("Content-Type"), "text/html") || !strings.Contains(page, "Mux webhooks · console") {
		t.Errorf("console page: %d %s", status, hdr.Get("Content-Type"))
	}
	req, _ = http.NewRequest(http.MethodGet, base+"/mux-webhook/events?outcome=verified", nil)
	if status, _, list := do(t, req); status != 200 || !strings.Contains(list, `"id":"d1"`) {
		t.Errorf("live log entries: %d %.200s", status, list)
	}
}

func TestDemoSendEventScript(t *testing.T) {
	t.Parallel() // its own processes and ports
	base, _ := startDemo(t)
	for _, tool := range []string{"sh", "curl", "openssl"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is needed for examples/send-event.sh: %v", tool, err)
		}
	}
	cases := []struct{ typ, want string }{
		{"video.asset.ready", "assets service received video.asset.ready"},
		{"video.live_stream.idle", "live service received video.live_stream.idle"},
		{"video.upload.created", "assets service received video.upload.created"},
	}
	for _, c := range cases {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		out, err := exec.CommandContext(ctx, "sh", "examples/send-event.sh", c.typ, base+"/mux").CombinedOutput()
		cancel()
		if err != nil {
			t.Fatalf("send-event.sh %s: %v\n%s", c.typ, err, out)
		}
		if !strings.Contains(string(out), "HTTP/1.1 200") || !strings.Contains(string(out), c.want) {
			t.Errorf("send-event.sh %s printed:\n%s\nwant 200 and %q", c.typ, out, c.want)
		}
	}
}

// TestDemoSendCommand is the README's demo: the built binary's
// `caddy mux-webhook send` delivers events of four families, and each
// lands at its upstream, the last one through the queue, which
// `caddy mux-webhook queue` then shows delivered.
func TestDemoSendCommand(t *testing.T) {
	t.Parallel() // its own processes and ports
	base, admin := startDemo(t)
	bin := caddyBinary(t)
	cases := []struct{ typ, want string }{
		{"video.asset.ready", "200 OK assets service received video.asset.ready"},
		{"video.live_stream.active", "200 OK live service received video.live_stream.active"},
		{"video.upload.asset_created", "200 OK assets service received video.upload.asset_created"},
		{"robots.job.summarize.completed", "202 Accepted"},
	}
	for _, c := range cases {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		cmd := exec.CommandContext(ctx, bin, "mux-webhook", "send", "--to", base+"/mux", "--type", c.typ)
		cmd.Env = append(os.Environ(), SecretEnv+"="+demoSecret)
		out, err := cmd.CombinedOutput()
		cancel()
		if err != nil || !strings.Contains(string(out), c.want) {
			t.Errorf("send %s: err %v, printed:\n%s\nwant %q", c.typ, err, out, c.want)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "mux-webhook", "send", "--to", base+"/mux", "--type", "video.asset.ready", "--secret", "wrong").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "401") {
		t.Errorf("send with a wrong secret: err %v, printed:\n%s", err, out)
	}
	// The README's last command: the queued event shows as delivered.
	delivered := regexp.MustCompile(`(?m)^analytics\s+0\s+0\s+0\s+1\s+0\s+-`)
	testwait.For(t, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		out, err = exec.CommandContext(ctx, bin, "mux-webhook", "queue", "--address", admin).CombinedOutput()
		return err == nil && delivered.Match(out)
	}, func() string { return fmt.Sprintf("caddy mux-webhook queue: %v\n%s", err, out) })
}

// TestNodeBackendExample runs examples/backend.js behind a real gateway.
func TestNodeBackendExample(t *testing.T) {
	node, err := exec.LookPath("node")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("node is required on CI for the backend example test")
		}
		t.Skip("node not installed")
	}
	port := freePort(t)
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, node, "examples/backend.js")
	cmd.Env = append(os.Environ(), fmt.Sprintf("PORT=%d", port))
	out := processOutput(t, "node-backend")
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); _ = cmd.Wait() })
	testwait.For(t, func() bool { return strings.Contains(out.String(), "backend listening") }, out.String)

	g := startGateway(t, fmt.Sprintf(`
	mux_webhook %s
	@assets mux_event video.asset.*
	handle @assets {
		reverse_proxy 127.0.0.1:%d {
			header_up X-Mux-Event-Type {http.mux.event.type}
		}
	}
	handle {
		respond 204
	}`, testSecret, port))
	body := event("video.asset.ready", "node-1", `{"id":"asset-9","status":"ready"}`)
	status, _, got := do(t, signedRequest(t, g.url, testSecret, body, time.Now()))
	if status != 200 || got != "handled video.asset.ready asset-9" {
		t.Fatalf("got %d %q", status, got)
	}
	testwait.For(t, func() bool {
		return strings.Contains(out.String(), "received video.asset.ready node-1 for asset obj-node-1")
	}, out.String)
}

// TestDemoBinaryForgeriesNeverReachUpstreams runs the xcaddy-built binary
// on examples/Caddyfile, with an access log added to each demo upstream
// (served by the same Caddy), and sends forgeries to /mux and to the
// demo's other paths: none may be answered by, or logged at, an upstream,
// nor queued for one. Genuine events then are, once each: two proxied, one
// delivered through the queue.
func TestDemoBinaryForgeriesNeverReachUpstreams(t *testing.T) {
	t.Parallel() // its own processes and ports
	bin := caddyBinary(t)
	src, err := os.ReadFile("examples/Caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	cfg, dir := string(src), t.TempDir()
	logs := map[string]string{}
	for _, p := range []string{"9001", "9002", "9003"} {
		site := "http://localhost:" + p + " {"
		if !strings.Contains(cfg, site) {
			t.Fatalf("examples/Caddyfile has no site %q any more: update this test", site)
		}
		logs[p] = filepath.Join(dir, p+".log")
		cfg = strings.Replace(cfg, site, site+"\n\tlog {\n\t\toutput file "+logs[p]+"\n\t\tformat json\n\t}", 1)
	}
	ports := map[string]int{}
	for _, p := range []string{"2019", "8080", "9001", "9002", "9003"} {
		ports[p] = freePort(t)
		cfg = strings.ReplaceAll(cfg, ":"+p, fmt.Sprintf(":%d", ports[p]))
	}
	out := runCaddyBinary(t, bin, cfg)
	base := fmt.Sprintf("http://localhost:%d", ports["8080"])
	waitForHTTP(t, base, out)

	for _, f := range forgedRequests(t, base, "/mux", demoSecret, false) {
		status, _, body := do(t, f.req)
		if strings.Contains(body, "service received") {
			t.Errorf("%s to %s was answered by an upstream: %d %q", f.what, f.path, status, body)
		}
		if f.verified && f.req.Method == http.MethodPost && status != http.StatusUnauthorized {
			t.Errorf("%s to %s: %d, want 401", f.what, f.path, status)
		}
	}
	genuine := map[string]struct {
		typ    string
		status int
		want   string // the answer; %s is the event id
	}{
		"9001": {"video.asset.ready", 200, "assets service received video.asset.ready (%s)"},
		"9002": {"video.live_stream.active", 200, "live service received video.live_stream.active (%s)"},
		"9003": {"robots.job.summarize.completed", 202, ""}, // queued, delivered by Caddy
	}
	for p, g := range genuine {
		id := "genuine-" + p
		status, _, body := do(t, signedRequest(t, base+"/mux", demoSecret, event(g.typ, id, ""), time.Now()))
		if w := strings.ReplaceAll(g.want, "%s", id); status != g.status || body != w {
			t.Errorf("%s: %d %q, want %d %q", g.typ, status, body, g.status, w)
		}
	}
	// Each upstream logged the genuine event, and nothing else.
	for p, path := range logs {
		lines := func() []string {
			b, _ := os.ReadFile(path)
			return strings.Split(strings.TrimSpace(string(b)), "\n")
		}
		testwait.For(t, func() bool { return strings.Contains(strings.Join(lines(), ""), "genuine-"+p) }, out.String)
		time.Sleep(300 * time.Millisecond) // nothing else arrives late from the queue
		for _, l := range lines() {
			if !strings.Contains(l, `"genuine-`+p+`"`) {
				t.Errorf("upstream :%s served a request that was not the genuine event: %.400s", p, l)
			}
		}
		if n := len(lines()); n != 1 {
			t.Errorf("upstream :%s logged %d requests, want 1", p, n)
		}
	}
}
