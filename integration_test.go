package muxwebhook

// Whole-server tests, like Caddy's caddytest/integration: an in-process
// Caddy loaded from a Caddyfile routes signed events to real
// reverse_proxy upstreams, files and responses, and rejects the rest.

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// routingSite is the product's headline Caddyfile, pointed at two upstreams.
func routingSite(assets, live *upstream) string {
	return fmt.Sprintf(`
	mux_webhook /mux %s
	@assets mux_event video.asset.*
	handle @assets {
		reverse_proxy %s {
			header_up X-Mux-Event-Type {http.mux.event.type}
		}
	}
	@live mux_event video.live_stream.*
	handle @live {
		reverse_proxy %s {
			header_up X-Mux-Event-Type {http.mux.event.type}
		}
	}
	handle {
		respond "other {http.mux.event.type}" 200
	}`, testSecret, assets.hostPort(), live.hostPort())
}

func TestRoutesEventsToUpstreams(t *testing.T) {
	assets, live := newUpstream(t, "assets"), newUpstream(t, "live")
	g := startGateway(t, routingSite(assets, live))

	cases := []struct {
		typ, wantBody string
	}{
		{"video.asset.ready", "assets got video.asset.ready"},
		{"video.asset.static_renditions.ready", "assets got video.asset.static_renditions.ready"},
		{"video.live_stream.active", "live got video.live_stream.active"},
		{"video.upload.created", "other video.upload.created"},
		{"brand.new.type", "other brand.new.type"},
	}
	for i, c := range cases {
		body := event(c.typ, fmt.Sprintf("evt-%d", i), "")
		status, _, got := do(t, signedRequest(t, g.url+"/mux", testSecret, body, time.Now()))
		if status != http.StatusOK || got != c.wantBody {
			t.Errorf("%s: got %d %q, want 200 %q", c.typ, status, got, c.wantBody)
		}
	}
	if n := len(assets.requests()); n != 2 {
		t.Errorf("assets upstream got %d requests, want 2", n)
	}
	if n := len(live.requests()); n != 1 {
		t.Errorf("live upstream got %d requests, want 1", n)
	}
}

func TestUpstreamSeesOriginalRequest(t *testing.T) {
	assets, live := newUpstream(t, "assets"), newUpstream(t, "live")
	g := startGateway(t, routingSite(assets, live))

	// Odd but valid JSON: spacing and escapes must survive byte for byte.
	body := []byte("{ \"type\" : \"video.asset.ready\",\n\t\"id\":\"e\\u0031\", \"data\": {\"passthrough\":\"caf\u00e9 \\\"q\\\"\"} }\n")

	t.Run("content-length", func(t *testing.T) {
		req := signedRequest(t, g.url+"/mux?x=1", testSecret, body, time.Now())
		sig := req.Header.Get("Mux-Signature")
		if status, _, _ := do(t, req); status != 200 {
			t.Fatalf("status %d", status)
		}
		got := assets.requests()[len(assets.requests())-1]
		checkForwarded(t, got, body, sig)
		if got.URI != "/mux?x=1" || got.Method != http.MethodPost {
			t.Errorf("upstream saw %s %s", got.Method, got.URI)
		}
	})

	t.Run("chunked", func(t *testing.T) {
		req := signedRequest(t, g.url+"/mux", testSecret, body, time.Now())
		sig := req.Header.Get("Mux-Signature")
		// An io.Reader of unknown length makes the client send chunked.
		req.Body = io.NopCloser(io.MultiReader(bytes.NewReader(body[:10]), bytes.NewReader(body[10:])))
		req.ContentLength = -1
		if status, _, _ := do(t, req); status != 200 {
			t.Fatalf("status %d", status)
		}
		got := assets.requests()[len(assets.requests())-1]
		checkForwarded(t, got, body, sig)
	})
}

func checkForwarded(t *testing.T, got received, body []byte, sig string) {
	t.Helper()
	if !bytes.Equal(got.Body, body) {
		t.Errorf("body changed:\n got %q\nwant %q", got.Body, body)
	}
	if got.ContentLength != int64(len(body)) {
		t.Errorf("upstream ContentLength = %d, want %d", got.ContentLength, len(body))
	}
	if len(got.TransferEncoding) != 0 {
		t.Errorf("upstream TransferEncoding = %v, want none", got.TransferEncoding)
	}
	if got.Header.Get("Mux-Signature") != sig {
		t.Errorf("Mux-Signature = %q, want %q", got.Header.Get("Mux-Signature"), sig)
	}
	if got.Header.Get("X-Mux-Event-Type") != "video.asset.ready" {
		t.Errorf("header_up placeholder = %q", got.Header.Get("X-Mux-Event-Type"))
	}
}

func TestMapPicksUpstream(t *testing.T) {
	a, b := newUpstream(t, "a"), newUpstream(t, "b")
	g := startGateway(t, fmt.Sprintf(`
	map {http.mux.event.type} {upstream} {
		~^video\.upload\. %s
		default %s
	}
	mux_webhook %s
	reverse_proxy {upstream} {
		header_up X-Mux-Event-Type {http.mux.event.type}
	}`, a.hostPort(), b.hostPort(), testSecret))

	for _, c := range []struct{ typ, want string }{
		{"video.upload.created", "a got video.upload.created"},
		{"video.asset.ready", "b got video.asset.ready"},
	} {
		status, _, got := do(t, signedRequest(t, g.url, testSecret, event(c.typ, "m1", ""), time.Now()))
		if status != 200 || got != c.want {
			t.Errorf("%s: got %d %q, want %q", c.typ, status, got, c.want)
		}
	}
}

func TestFileServerRoute(t *testing.T) {
	root := t.TempDir()
	if err := os.WriteFile(filepath.Join(root, "video.asset.ready.json"), []byte(`{"ack":"asset"}`), 0o644); err != nil {
		t.Fatal(err)
	}
	g := startGateway(t, fmt.Sprintf(`
	mux_webhook %s
	@assets mux_event video.asset.*
	handle @assets {
		root * %s
		method GET
		rewrite * /{http.mux.event.type}.json
		file_server
	}
	handle {
		respond 204
	}`, testSecret, root))

	status, _, got := do(t, signedRequest(t, g.url, testSecret, event("video.asset.ready", "f1", ""), time.Now()))
	if status != 200 || got != `{"ack":"asset"}` {
		t.Errorf("got %d %q", status, got)
	}
	status, _, _ = do(t, signedRequest(t, g.url, testSecret, event("video.upload.created", "f2", ""), time.Now()))
	if status != 204 {
		t.Errorf("non-asset event: got %d, want 204", status)
	}
}

func TestExpressionRoute(t *testing.T) {
	vip := newUpstream(t, "vip")
	g := startGateway(t, fmt.Sprintf(`
	mux_webhook %s
	@vip expression mux_event('video.upload.*', 'video.asset.created') && {http.mux.data.passthrough}.startsWith('vip')
	handle @vip {
		reverse_proxy %s
	}
	handle {
		respond "plain" 200
	}`, testSecret, vip.hostPort()))

	cases := []struct{ typ, pass, want string }{
		{"video.upload.created", "vip", "vip got "},
		{"video.asset.created", "vip", "vip got "},
		{"video.upload.created", "nobody", "plain"},
		{"video.upload.created", "vip-gold", "vip got "},
		{"video.asset.ready", "vip", "plain"},
	}
	for _, c := range cases {
		body := event(c.typ, "x", `{"passthrough":"`+c.pass+`"}`)
		status, _, got := do(t, signedRequest(t, g.url, testSecret, body, time.Now()))
		if status != 200 || got != c.want {
			t.Errorf("%s/%s: got %d %q, want %q", c.typ, c.pass, status, got, c.want)
		}
	}
}

func TestRejections(t *testing.T) {
	assets, live := newUpstream(t, "assets"), newUpstream(t, "live")
	catchAll := newUpstream(t, "catch-all")
	site := strings.Replace(routingSite(assets, live), `respond "other {http.mux.event.type}" 200`, "reverse_proxy "+catchAll.hostPort(), 1)
	site = strings.Replace(site, "mux_webhook /mux "+testSecret, "mux_webhook /mux "+testSecret+" {\n\t\tmax_body 2KiB\n\t\ttolerance 2m\n\t}", 1)
	g := startGateway(t, site)

	now := time.Now()
	valid := event("video.asset.ready", "r1", "")
	sign := func(secret string, at time.Time, body []byte) string {
		ts := strconv.FormatInt(at.Unix(), 10)
		return "t=" + ts + ",v1=" + macHex(secret, ts, string(body))
	}
	big := event("video.asset.ready", "big", `{"pad":"`+strings.Repeat("x", 3000)+`"}`)
	cases := []struct {
		name, method, header, reason string
		body                         []byte
		chunked                      bool
		status                       int
	}{
		{"GET", "GET", sign(testSecret, now, nil), "method", nil, false, 405},
		{"PUT", "PUT", sign(testSecret, now, valid), "method", valid, false, 405},
		{"too large", "POST", sign(testSecret, now, big), "too_large", big, false, 413},
		{"too large chunked", "POST", sign(testSecret, now, big), "too_large", big, true, 413},
		{"too large, no signature", "POST", "", "too_large", big, false, 413},
		{"missing signature", "POST", "", "missing", valid, false, 401},
		{"malformed", "POST", "t=abc,v1=00", "malformed", valid, false, 401},
		{"no v1", "POST", "t=" + strconv.FormatInt(now.Unix(), 10) + ",v0=abc", "no_v1", valid, false, 401},
		{"wrong secret", "POST", sign("not-the-secret", now, valid), "mismatch", valid, false, 401},
		{"body tampered", "POST", sign(testSecret, now, valid), "mismatch", append(append([]byte{}, valid...), ' '), false, 401},
		{"expired", "POST", sign(testSecret, now.Add(-3*time.Minute), valid), "expired", valid, false, 401},
		{"future", "POST", sign(testSecret, now.Add(3*time.Minute), valid), "future", valid, false, 401},
		{"forged and expired", "POST", sign("nope", now.Add(-time.Hour), valid), "mismatch", valid, false, 401},
		{"not JSON", "POST", sign(testSecret, now, []byte("type=video.asset.ready")), "bad_json", []byte("type=video.asset.ready"), false, 400},
		{"JSON array", "POST", sign(testSecret, now, []byte(`[{"type":"x"}]`)), "bad_json", []byte(`[{"type":"x"}]`), false, 400},
		{"no type", "POST", sign(testSecret, now, []byte(`{"id":"x"}`)), "no_type", []byte(`{"id":"x"}`), false, 400},
		{"empty type", "POST", sign(testSecret, now, []byte(`{"type":""}`)), "no_type", []byte(`{"type":""}`), false, 400},
		{"empty chunked body", "POST", sign(testSecret, now, nil), "bad_json", nil, true, 400},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			req, err := http.NewRequest(c.method, g.url+"/mux", bytes.NewReader(c.body))
			if err != nil {
				t.Fatal(err)
			}
			if c.chunked {
				req.Body = io.NopCloser(bytes.NewReader(c.body))
				req.ContentLength = -1
			}
			if c.header != "" {
				req.Header.Set("Mux-Signature", c.header)
			}
			status, hdr, body := do(t, req)
			if status != c.status {
				t.Fatalf("status = %d, want %d", status, c.status)
			}
			if len(body) > 64 {
				t.Errorf("error body is %d bytes; Mux echoes it in attempts[], keep it tiny", len(body))
			}
			if c.status == 405 && hdr.Get("Allow") != "POST" {
				t.Errorf("Allow = %q, want POST", hdr.Get("Allow"))
			}
			if !hasRejection(g, c.reason, c.status) {
				t.Errorf("no log line with reason %q and status %d", c.reason, c.status)
			}
		})
	}
	for _, u := range []*upstream{assets, live, catchAll} {
		if n := len(u.requests()); n != 0 {
			t.Errorf("%d rejected requests reached upstream %s", n, u.name)
		}
	}
	if strings.Contains(g.rawLog(), testSecret) {
		t.Error("the secret appears in the log")
	}
	// The same gateway still accepts a genuine event.
	if status, _, _ := do(t, signedRequest(t, g.url+"/mux", testSecret, valid, now)); status != 200 || len(assets.requests()) != 1 {
		t.Errorf("genuine event after rejections: status %d, assets got %d", status, len(assets.requests()))
	}
}

func hasRejection(g *gateway, reason string, status int) bool {
	for _, l := range g.logLines() {
		if l["msg"] == "mux webhook" && l["outcome"] == "rejected" && l["reason"] == reason && l["status"] == float64(status) {
			return true
		}
	}
	return false
}

func TestUpstreamDownIsNot2xx(t *testing.T) {
	g := startGateway(t, fmt.Sprintf(`
	mux_webhook %s
	reverse_proxy 127.0.0.1:%d`, testSecret, freePort(t)))
	status, _, _ := do(t, signedRequest(t, g.url, testSecret, event("video.asset.ready", "d1", ""), time.Now()))
	if status < 500 {
		t.Fatalf("upstream down: status %d, want a 5xx so that Mux retries", status)
	}
}

func TestHandleErrorsSeesEvent(t *testing.T) {
	g := startGateway(t, fmt.Sprintf(`
	mux_webhook %s
	reverse_proxy 127.0.0.1:%d
	handle_errors 502 {
		@asset mux_event video.asset.*
		respond @asset "parked {http.mux.event.id}" 202
		respond "down" 503
	}
	handle_errors 401 {
		respond "no {http.mux.event.type}" 401
	}`, testSecret, freePort(t)))

	status, _, got := do(t, signedRequest(t, g.url, testSecret, event("video.asset.ready", "h1", ""), time.Now()))
	if status != 202 || got != "parked h1" {
		t.Errorf("asset event: got %d %q, want 202 %q", status, got, "parked h1")
	}
	status, _, got = do(t, signedRequest(t, g.url, testSecret, event("video.upload.created", "h2", ""), time.Now()))
	if status != 503 || got != "down" {
		t.Errorf("upload event: got %d %q, want 503 down", status, got)
	}
	// A forged request reaches handle_errors without an event: the
	// placeholders are unset, which respond leaves as written.
	status, _, got = do(t, signedRequest(t, g.url, "wrong", event("video.asset.ready", "h3", ""), time.Now()))
	if status != 401 || got != "no {http.mux.event.type}" {
		t.Errorf("forged: got %d %q, want 401 %q", status, got, "no {http.mux.event.type}")
	}
}
