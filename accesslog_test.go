package muxwebhook

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/internal/testwait"
)

// jsonLinesOf reads a JSON-lines log file.
func jsonLinesOf(t *testing.T, file string) []map[string]any {
	t.Helper()
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []map[string]any
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64<<10), 4<<20)
	for sc.Scan() {
		var m map[string]any
		if json.Unmarshal(sc.Bytes(), &m) == nil {
			out = append(out, m)
		}
	}
	return out
}

// TestAccessLogCarriesTheEvent: on a site with `log`, the event's fields
// go into Caddy's access log line (a rejection's line at WARN), and the
// handler writes no line of its own: an event is logged once.
func TestAccessLogCarriesTheEvent(t *testing.T) {
	accessLog := filepath.Join(t.TempDir(), "access.log")
	cfg, g := gatewayConfigWith(t, "off", "", fmt.Sprintf(`log {
		output file %s
		format json
	}
	mux_webhook %s
	respond 204`, accessLog, testSecret))
	g.load(cfg)
	body := event("video.asset.ready", "access-1", "")
	if status, _, _ := do(t, signedRequest(t, g.url, testSecret, body, time.Now())); status != http.StatusNoContent {
		t.Fatalf("genuine: %d", status)
	}
	if status, _, _ := do(t, signedRequest(t, g.url, "forged", body, time.Now())); status != http.StatusUnauthorized {
		t.Fatalf("forged: %d", status)
	}
	var lines []map[string]any
	testwait.For(t, func() bool {
		lines = jsonLinesOf(t, accessLog)
		return len(lines) >= 2
	}, func() string { return fmt.Sprintf("access log: %v", lines) })
	verified, rejected := lines[0], lines[1]
	mux, _ := verified["mux"].(map[string]any)
	if verified["msg"] != "handled request" || verified["level"] != "info" || verified["status"] != float64(204) ||
		mux["outcome"] != "verified" || mux["type"] != "video.asset.ready" || mux["id"] != "access-1" || mux["object_type"] != "asset" {
		t.Errorf("the verified event's access log line: %v", verified)
	}
	mux, _ = rejected["mux"].(map[string]any)
	if rejected["level"] != "warn" || rejected["status"] != float64(401) || mux["outcome"] != "rejected" || mux["reason"] != "mismatch" || mux["id"] != nil {
		t.Errorf("the forgery's access log line: %v", rejected)
	}
	for _, l := range g.logLines() {
		if l["msg"] == "mux webhook" {
			t.Errorf("the handler logged a line of its own as well: %v", l)
		}
	}
}

// TestOwnLineWithoutAccessLog: without `log`, the handler writes its own
// line: a rejection at WARN (visible with no configuration), a verified
// event at DEBUG.
func TestOwnLineWithoutAccessLog(t *testing.T) {
	cfg, g := gatewayConfigWith(t, "off", "", fmt.Sprintf("mux_webhook %s\n\trespond 204", testSecret))
	g.load(cfg)
	body := event("video.asset.ready", "own-1", "")
	do(t, signedRequest(t, g.url, testSecret, body, time.Now()))
	do(t, signedRequest(t, g.url, "forged", body, time.Now()))
	levels := map[string]any{}
	testwait.For(t, func() bool {
		for _, l := range g.logLines() {
			if l["msg"] == "mux webhook" {
				levels[fmt.Sprint(l["outcome"])] = l["level"]
			}
		}
		return len(levels) == 2
	}, func() string { return fmt.Sprintf("levels by outcome: %v", levels) })
	if levels["verified"] != "debug" || levels["rejected"] != "warn" {
		t.Errorf("levels by outcome: %v; want verified at debug, rejected at warn", levels)
	}
}

// TestAccessLogKeepsErrorLevel: an aborted request whose route had
// answered a 5xx is an ERROR line in Caddy's access log, as any 5xx is;
// the handler raises a line's level, never lowers it.
func TestAccessLogKeepsErrorLevel(t *testing.T) {
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		conn, buf, err := http.NewResponseController(w).Hijack()
		if err != nil {
			t.Error(err)
			return
		}
		buf.WriteString("HTTP/1.1 502 Bad Gateway\r\nContent-Length: 1000\r\n\r\npartial")
		buf.Flush()
		conn.Close()
	}))
	t.Cleanup(up.Close)
	accessLog := filepath.Join(t.TempDir(), "access.log")
	cfg, g := gatewayConfigWith(t, "off", "", fmt.Sprintf(`log {
		output file %s
		format json
	}
	mux_webhook %s
	reverse_proxy %s`, accessLog, testSecret, strings.TrimPrefix(up.URL, "http://")))
	g.load(cfg)
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := client.Do(signedRequest(t, g.url, testSecret, event("video.asset.ready", "abort-502", ""), time.Now()))
	if err == nil {
		_, err = io.ReadAll(resp.Body)
		resp.Body.Close()
	}
	if err == nil {
		t.Fatal("the response arrived whole; the test did not make reverse_proxy abort")
	}
	var lines []map[string]any
	testwait.For(t, func() bool {
		lines = jsonLinesOf(t, accessLog)
		return len(lines) >= 1
	}, func() string { return fmt.Sprintf("access log: %v", lines) })
	mux, _ := lines[0]["mux"].(map[string]any)
	if lines[0]["status"] != float64(502) || mux["aborted"] != true {
		t.Fatalf("not the aborted 502: %v", lines[0])
	}
	if lines[0]["level"] != "error" {
		t.Errorf("the aborted 502's access log line is at %v, want error (as Caddy logs any 5xx)", lines[0]["level"])
	}
}

// TestAccessLogSeveralSites: with sites with and without `log` on one
// server, and log_skip, every request is logged exactly once, either in
// an access log line or in the handler's own line, and a rejection is a
// WARN wherever it is.
func TestAccessLogSeveralSites(t *testing.T) {
	accessLog := filepath.Join(t.TempDir(), "access.log")
	cfg, g := gatewayConfigWith(t, "off", "", fmt.Sprintf("mux_webhook %s\n\trespond 204", testSecret))
	port := strings.TrimPrefix(g.url, "http://127.0.0.1:")
	cfg += fmt.Sprintf(`
http://localhost:%s {
	log {
		output file %s
		format json
	}
	log_skip /skipped*
	mux_webhook %s
	respond 204
}
`, port, accessLog, testSecret)
	g.load(cfg)
	logged := "http://localhost:" + port
	want := map[string]string{ // uri: level
		"/logged-ok": "info", "/logged-forged": "warn",
		"/unlogged-forged": "warn", "/skipped-forged": "warn",
	}
	for uri := range want {
		base, secret := logged, testSecret
		if strings.HasPrefix(uri, "/unlogged") {
			base = g.url
		}
		if strings.HasSuffix(uri, "forged") {
			secret = "forged"
		}
		do(t, signedRequest(t, base+uri, secret, event("video.asset.ready", "sites"+strings.ReplaceAll(uri, "/", "-"), ""), time.Now()))
	}
	seen := map[string][]string{} // uri: levels of the lines about it
	collect := func() bool {
		seen = map[string][]string{}
		for _, l := range append(g.logLines(), jsonLinesOf(t, accessLog)...) {
			switch {
			case l["msg"] == "mux webhook":
				seen[fmt.Sprint(l["uri"])] = append(seen[fmt.Sprint(l["uri"])], fmt.Sprint(l["level"]))
			case l["msg"] == "handled request" && l["mux"] != nil:
				uri := fmt.Sprint(l["request"].(map[string]any)["uri"])
				seen[uri] = append(seen[uri], fmt.Sprint(l["level"]))
			}
		}
		return len(seen) >= len(want)
	}
	testwait.For(t, collect, func() string { return fmt.Sprintf("lines by uri: %v", seen) })
	time.Sleep(100 * time.Millisecond)
	collect()
	for uri, level := range want {
		if got := seen[uri]; len(got) != 1 || got[0] != level {
			t.Errorf("%s: logged at %v; want once, at %s", uri, got, level)
		}
	}
}
