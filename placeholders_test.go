package muxwebhook

// {http.mux.*} placeholders (placeholders.go) in responses, log_append and
// headers.

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/internal/testwait"
)

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

func TestPlaceholdersInRespond(t *testing.T) {
	g := startGateway(t, fmt.Sprintf(`
	mux_webhook %s
	handle {
		header >X-Event-Id {http.mux.event.id}
		respond "type={http.mux.event.type} id={http.mux.event.id} created={http.mux.event.created_at} object={http.mux.object.type}/{http.mux.object.id} env={http.mux.environment.id}/{http.mux.environment.name} attempts={http.mux.attempts} t={http.mux.signature.timestamp} pass={http.mux.data.passthrough} play={http.mux.data.playback_ids.0.id} dur={http.mux.data.duration} tracks={http.mux.data.tracks} missing=[{http.mux.data.nope}] unknown=[{http.mux.nope}]" 200
	}`, testSecret))

	body := []byte(`{"type":"video.asset.ready","object":{"type":"asset","id":"a1"},"id":"evt-9","environment":{"name":"Prod","id":"env-7"},"data":{"passthrough":"order 42","playback_ids":[{"id":"pb1","policy":"public"}],"duration":12.5,"tracks":[{"type":"video"}]},"created_at":"2024-05-01T10:00:00Z","attempts":[{"id":"a"},{"id":"b"}]}`)
	at := time.Now()
	status, hdr, got := do(t, signedRequest(t, g.url, testSecret, body, at))
	want := fmt.Sprintf(`type=video.asset.ready id=evt-9 created=2024-05-01T10:00:00Z object=asset/a1 env=env-7/Prod attempts=2 t=%d pass=order 42 play=pb1 dur=12.5 tracks=[{"type":"video"}] missing=[] unknown=[{http.mux.nope}]`, at.Unix())
	if status != 200 || got != want {
		t.Errorf("got %d\n %q\nwant\n %q", status, got, want)
	}
	if hdr.Get("X-Event-Id") != "evt-9" {
		t.Errorf("deferred header placeholder = %q", hdr.Get("X-Event-Id"))
	}
}

// TestPlaceholdersInLogAppend: log_append (evaluated lazily, when the
// access log is written) sees the event.
func TestPlaceholdersInLogAppend(t *testing.T) {
	g := startGateway(t, fmt.Sprintf(`
	log
	log_append mux_type {http.mux.event.type}
	log_append mux_asset {http.mux.data.playback_ids.0.id}
	mux_webhook %s
	respond 204`, testSecret))
	body := event("video.asset.ready", "la-1", `{"playback_ids":[{"id":"pb-9"}]}`)
	if status, _, _ := do(t, signedRequest(t, g.url, testSecret, body, time.Now())); status != 204 {
		t.Fatalf("status %d", status)
	}
	testwait.For(t, func() bool {
		for _, l := range g.logLines() {
			if l["mux_type"] == "video.asset.ready" && l["mux_asset"] == "pb-9" {
				return true
			}
		}
		return false
	}, func() string { return g.rawLog() })
}
