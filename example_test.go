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
	"sync"
	"syscall"
	"testing"
	"time"
)

const demoSecret = "dev-only-secret-DO-NOT-USE-IN-PRODUCTION"

// caddyBinary returns the xcaddy-built binary named by MUX_CADDY_BIN. On CI
// the variable must be set: these tests may not be skipped there.
func caddyBinary(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("-short: this test starts the built Caddy (a real process); ./scripts/test runs it")
	}
	bin := os.Getenv("MUX_CADDY_BIN")
	if bin == "" {
		if os.Getenv("CI") != "" {
			t.Fatal("MUX_CADDY_BIN is not set; CI must run the binary tests (see .ci/run)")
		}
		t.Skip("MUX_CADDY_BIN not set; run ./scripts/test to build Caddy with xcaddy and run these")
	}
	abs, err := filepath.Abs(bin)
	if err != nil {
		t.Fatal(err)
	}
	return abs
}

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

// waitForHTTP waits up to 10 s until base answers.
func waitForHTTP(t *testing.T, base string, out *syncBuffer) {
	t.Helper()
	waitFor(t, func() bool {
		resp, err := http.Get(base + "/")
		if err == nil {
			resp.Body.Close()
		}
		return err == nil
	}, out.String)
}

func TestDemoBinaryRoutesEvents(t *testing.T) {
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

// runCaddyBinary runs `bin run` on the Caddyfile cfg, with its own HOME,
// until the test ends, and returns its output (logged if the test fails).
func runCaddyBinary(t *testing.T, bin, cfg string) *syncBuffer {
	t.Helper()
	dir := t.TempDir()
	out, _ := runCaddyIn(t, bin, cfg, dir, dir, nil)
	return out
}

// runCaddyIn runs `bin run` on cfg, written to dir/Caddyfile, with HOME
// (and XDG directories) at home, as the user cred names if not nil (then in
// dir, since that user may not enter the test's working directory), until
// the test ends, and returns its output and the process (to kill it).
func runCaddyIn(t *testing.T, bin, cfg, dir, home string, cred *syscall.Credential) (*syncBuffer, *exec.Cmd) {
	t.Helper()
	path := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, bin, "run", "--config", path, "--adapter", "caddyfile")
	if cred != nil {
		cmd.Dir = dir
	}
	cmd.Env = append(os.Environ(), "HOME="+home, "XDG_DATA_HOME="+home, "XDG_CONFIG_HOME="+home)
	// Caddy dies with the test process, even if it is killed or times out
	// before its cleanups run.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Credential: cred}
	out := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("caddy output:\n%s", out.String())
		}
	})
	return out, cmd
}

// TestDemoSendCommand is the README's demo: the built binary's
// `caddy mux-webhook send` delivers events of four families, and each
// lands at its upstream, the last one through the queue, which
// `caddy mux-webhook queue` then shows delivered.
func TestDemoSendCommand(t *testing.T) {
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
	delivered := regexp.MustCompile(`(?m)^analytics\s+0\s+0\s+1\s+0\s+-`)
	waitFor(t, func() bool {
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
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); _ = cmd.Wait() })
	waitFor(t, func() bool { return strings.Contains(out.String(), "backend listening") }, out.String)

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
	waitFor(t, func() bool {
		return strings.Contains(out.String(), "received video.asset.ready node-1 for asset obj-node-1")
	}, out.String)
}

type syncBuffer struct {
	mu  sync.Mutex
	buf strings.Builder
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
