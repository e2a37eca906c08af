package muxwebhook

// Prometheus metrics (metrics.go).

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestMetricsFamilyOfNewTypes: a type Mux adds to a known family counts
// in that family, not as unknown.
func TestMetricsFamilyOfNewTypes(t *testing.T) {
	up := newUpstream(t, "app")
	g := startGatewayWithAdmin(t, "", fmt.Sprintf("mux_webhook %s\n\treverse_proxy %s", testSecret, up.hostPort()))
	before := scrape(t, g.admin)
	do(t, signedRequest(t, g.url, testSecret, event("video.asset.brand_new", "fam-1", ""), time.Now()))
	after := scrape(t, g.admin)
	name := `caddy_mux_webhook_responses_total{code="2xx",family="video.asset"}`
	if after[name]-before[name] != 1 {
		t.Errorf("%s grew by %v, want 1", name, after[name]-before[name])
	}
	name = `caddy_mux_webhook_events_total{type="unknown"}`
	if after[name]-before[name] != 1 {
		t.Errorf("%s grew by %v, want 1", name, after[name]-before[name])
	}
}

func TestMetrics(t *testing.T) {
	up := newUpstream(t, "assets")
	g := startGatewayWithAdmin(t, "", liveLogSite(up))
	before := scrape(t, g.admin)

	do(t, signedRequest(t, g.url, testSecret, event("video.asset.ready", "m-1", ""), time.Now()))
	do(t, signedRequest(t, g.url, testSecret, event("video.asset.ready", "m-2", ""), time.Now()))
	do(t, signedRequest(t, g.url, testSecret, event("video.upload.created", "m-3", ""), time.Now()))
	do(t, signedRequest(t, g.url, testSecret, event("attacker.chosen.type", "m-4", ""), time.Now()))
	do(t, signedRequest(t, g.url, "forged", event("video.asset.ready", "m-5", ""), time.Now()))
	req, _ := http.NewRequest(http.MethodGet, g.url, nil)
	do(t, req)

	after := scrape(t, g.admin)
	delta := func(name string) float64 { return after[name] - before[name] }
	want := map[string]float64{
		`caddy_mux_webhook_requests_total{outcome="verified"}`:                4,
		`caddy_mux_webhook_requests_total{outcome="mismatch"}`:                1,
		`caddy_mux_webhook_requests_total{outcome="method"}`:                  1,
		`caddy_mux_webhook_events_total{type="video.asset.ready"}`:            2,
		`caddy_mux_webhook_events_total{type="video.upload.created"}`:         1,
		`caddy_mux_webhook_events_total{type="unknown"}`:                      1,
		`caddy_mux_webhook_responses_total{code="2xx",family="video.asset"}`:  2,
		`caddy_mux_webhook_responses_total{code="2xx",family="video.upload"}`: 1,
		`caddy_mux_webhook_responses_total{code="2xx",family="unknown"}`:      1,
		`caddy_mux_webhook_verify_duration_seconds_count`:                     5,
	}
	for name, w := range want {
		if got := delta(name); got != w {
			t.Errorf("%s grew by %v, want %v", name, got, w)
		}
	}
	for name := range after {
		if strings.Contains(name, "attacker") {
			t.Errorf("an attacker-chosen value became a label: %s", name)
		}
	}
}
