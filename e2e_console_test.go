//go:build e2e

package muxwebhook

// The console in a real browser (Debian's Chromium, driven by web/browser-test.js),
// which also takes the screenshots of docs/observability.md (docs/console-*.png).

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestConsoleInBrowser runs web/browser-test.js: headless Chromium,
// driven by playwright-core, opens the console where a browser can (a site
// route with mux_webhook_ui; Caddy's admin API refuses browser
// navigations), watches events and their delivery attempts arrive, finds
// the dead letter of a failing destination, sees cross-site requests
// refused, and redelivers it with a click once the backend is fixed; then
// the History view (history is on by default with a queue) lists, searches
// and shows the events, replays the live stream event to analytics after
// confirming its count, and the Charts view draws the last 24 h.
// Set MUX_SCREENSHOTS=docs to save a screenshot of each view there.
func TestConsoleInBrowser(t *testing.T) {
	chromium := os.Getenv("CHROMIUM")
	if chromium == "" {
		chromium = "/usr/bin/chromium"
	}
	node, err := exec.LookPath("node")
	if err == nil {
		_, err = os.Stat(chromium)
	}
	if err == nil {
		_, err = os.Stat("node_modules/playwright-core/package.json")
	}
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("the browser test needs node, npm ci and Debian's chromium: %v", err)
		}
		t.Skipf("node, playwright-core or chromium missing (apt-get install chromium; npm ci): %v", err)
	}
	// The backend of "app": 500 until the browser test fixes it.
	var mu sync.Mutex
	failing, received := true, []string{}
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		switch {
		case r.URL.Path == "/fix" && r.Method == http.MethodPost:
			failing = false
		case r.URL.Path == "/received":
			_ = json.NewEncoder(w).Encode(received)
		case r.URL.Path == "/hook" && failing:
			w.WriteHeader(http.StatusInternalServerError)
		case r.URL.Path == "/hook":
			received = append(received, r.Header.Get("Idempotency-Key"))
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(app.Close)
	analytics := newUpstream(t, "analytics")
	cfg, g := gatewayConfigWith(t, "off", deliverGlobal(filepath.Join(t.TempDir(), "js"),
		fmt.Sprintf("\t\tdestination app %s/hook {\n\t\t\tretry 100ms\n\t\t\tmax_attempts 2\n\t\t}", app.URL),
		// sign: a replay from the history is signed with it (refused without).
		fmt.Sprintf("\t\tdestination analytics %s {\n\t\t\tretry 100ms\n\t\t\tsign analytics-secret\n\t\t}", analytics.URL),
	), fmt.Sprintf(`
	mux_webhook /mux %s
	@assets mux_event video.asset.*
	handle /mux {
		mux_deliver @assets app analytics
		mux_deliver analytics
	}
	handle_path /mux-webhook* {
		mux_webhook_ui
	}`, testSecret))
	g.load(cfg)

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	args := []string{"web/browser-test.js", g.url + "/mux-webhook/", g.url + "/mux", testSecret, app.URL}
	if dir := os.Getenv("MUX_SCREENSHOTS"); dir != "" {
		args = append(args, dir)
	}
	cmd := exec.CommandContext(ctx, node, args...)
	cmd.Env = append(os.Environ(), "CHROMIUM="+chromium)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("browser test: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "browser test passed") {
		t.Fatalf("browser test did not finish:\n%s", out)
	}
	t.Logf("%s", out)
	mu.Lock()
	defer mu.Unlock()
	if len(received) != 1 || !strings.HasPrefix(received[0], "br-a-") {
		t.Errorf("the app backend received %q, want the one redelivered event", received)
	}
	// The console's replay reached analytics: a fresh copy of the live
	// stream event, marked with its job, once.
	analytics.mu.Lock()
	defer analytics.mu.Unlock()
	var replayed []string
	for _, r := range analytics.reqs {
		if job := r.Header.Get("Mux-Webhook-Replay"); job != "" {
			replayed = append(replayed, job+" "+r.Header.Get("Idempotency-Key")+" "+string(r.Body))
		}
	}
	if len(replayed) != 1 || !strings.Contains(replayed[0], `"br-l-`) {
		t.Errorf("analytics received %d replayed copies %q, want the live stream event once", len(replayed), replayed)
	}
}
