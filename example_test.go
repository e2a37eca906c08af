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
	"strings"
	"testing"
	"time"
)

const demoSecret = "dev-only-secret-DO-NOT-USE-IN-PRODUCTION"

// caddyBinary returns the xcaddy-built binary named by MUX_CADDY_BIN. On CI
// the variable must be set: these tests may not be skipped there.
func caddyBinary(t *testing.T) string {
	t.Helper()
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
// free ones, and returns the gateway's base URL.
func startDemo(t *testing.T) string {
	t.Helper()
	bin := caddyBinary(t)
	src, err := os.ReadFile("examples/Caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	cfg := string(src)
	ports := map[string]int{}
	for _, p := range []string{"2019", "8080", "9001", "9002"} {
		n := freePort(t)
		ports[p] = n
		cfg = strings.ReplaceAll(cfg, ":"+p, fmt.Sprintf(":%d", n))
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, bin, "run", "--config", path, "--adapter", "caddyfile")
	cmd.Env = append(os.Environ(), "HOME="+dir, "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
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
	base := fmt.Sprintf("http://localhost:%d", ports["8080"])
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := http.Get(base + "/")
		if err == nil {
			resp.Body.Close()
			return base
		}
		if time.Now().After(deadline) {
			t.Fatalf("demo Caddy did not come up: %v\n%s", err, out.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestDemoBinaryRoutesEvents(t *testing.T) {
	base := startDemo(t)
	cases := []struct{ typ, want string }{
		{"video.asset.ready", "assets service received video.asset.ready (d1)"},
		{"video.upload.asset_created", "assets service received video.upload.asset_created (d2)"},
		{"video.live_stream.active", "live service received video.live_stream.active (d3)"},
		{"video.asset.track.ready", "assets service received video.asset.track.ready (d4)"},
		{"robots.job.summarize.completed", "ignored robots.job.summarize.completed"},
	}
	for i, c := range cases {
		body := event(c.typ, fmt.Sprintf("d%d", i+1), "")
		status, _, got := do(t, signedRequest(t, base+"/mux", demoSecret, body, time.Now()))
		if status != 200 || got != c.want {
			t.Errorf("%s: got %d %q, want 200 %q", c.typ, status, got, c.want)
		}
	}
	status, _, _ := do(t, signedRequest(t, base+"/mux", "not-the-demo-secret", event("video.asset.ready", "x", ""), time.Now()))
	if status != 401 {
		t.Errorf("forged event: got %d, want 401", status)
	}
}

func TestDemoSendEventScript(t *testing.T) {
	base := startDemo(t)
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
