package muxwebhook

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

func TestLintPatterns(t *testing.T) {
	tests := []struct {
		pattern string
		warn    bool
		closest string
	}{
		{"video.asset.ready", false, ""},
		{"video.asset.*", false, ""},
		{"*", false, ""},
		{"*.ready", false, ""},
		{"robots.job.*.completed", false, ""},
		{"ideo.live_stream.active", true, "video.live_stream.active"},
		{"video.asset.redy", true, "video.asset.ready"},
		{"video.livestream.*", true, "video.live_stream.*"},
		{"video.assets.*", true, "video.asset.*"},
		{"video.upload.asset_ready", true, "video.upload.asset_created"},
	}
	for _, tt := range tests {
		core, logs := observer.New(zap.DebugLevel)
		lintPatterns(zap.New(core), []string{tt.pattern})
		entries := logs.All()
		if !tt.warn {
			if len(entries) != 0 {
				t.Errorf("%q: unexpected warning %v", tt.pattern, entries[0].ContextMap())
			}
			continue
		}
		if len(entries) != 1 || entries[0].Level != zap.WarnLevel {
			t.Fatalf("%q: want one warning, got %d entries", tt.pattern, len(entries))
		}
		fields := entries[0].ContextMap()
		if fields["pattern"] != tt.pattern || fields["closest_known"] != tt.closest {
			t.Errorf("%q: warning fields %v, want closest_known %q", tt.pattern, fields, tt.closest)
		}
		if !strings.Contains(entries[0].Message, "no known Mux event type") {
			t.Errorf("%q: message %q", tt.pattern, entries[0].Message)
		}
	}
}

func TestEditDistance(t *testing.T) {
	tests := []struct {
		a, b string
		want int
	}{
		{"", "", 0}, {"a", "", 1}, {"", "abc", 3}, {"kitten", "sitting", 3},
		{"ideo.x", "video.x", 1}, {"abc", "abc", 0}, {"ab", "ba", 2},
	}
	for _, tt := range tests {
		if got := editDistance(tt.a, tt.b); got != tt.want {
			t.Errorf("editDistance(%q, %q) = %d, want %d", tt.a, tt.b, got, tt.want)
		}
	}
}

// TestLintAtLoadTime loads a real config with a typo and finds the warning
// in Caddy's log; the typo'd route still works for the type as written.
func TestLintAtLoadTime(t *testing.T) {
	g := startGateway(t, fmt.Sprintf(`
	mux_webhook %s
	@live mux_event ideo.live_stream.active
	respond @live "typo route" 200
	@expr expression mux_event('video.assett.*')
	respond @expr "expr route" 200
	respond 204`, testSecret))
	var found []string
	for _, l := range g.logLines() {
		if strings.Contains(fmt.Sprint(l["msg"]), "no known Mux event type") {
			found = append(found, fmt.Sprintf("%v→%v", l["pattern"], l["closest_known"]))
		}
	}
	want := []string{"ideo.live_stream.active→video.live_stream.active", "video.assett.*→video.asset.*"}
	for _, w := range want {
		if !strings.Contains(strings.Join(found, " "), w) {
			t.Errorf("no load-time warning %s; got %v", w, found)
		}
	}
	status, _, got := do(t, signedRequest(t, g.url, testSecret, event("ideo.live_stream.active", "l1", ""), time.Now()))
	if status != 200 || got != "typo route" {
		t.Errorf("unknown type did not route as written: %d %q", status, got)
	}
}

// TestBadPatternFailsLoad: a pattern that can never be meant is a config
// error at load time, not a warning.
func TestBadPatternFailsLoad(t *testing.T) {
	for _, pattern := range []string{`""`, `"video asset"`} {
		cfg, _ := gatewayConfig(t, fmt.Sprintf("mux_webhook %s\n\t@m mux_event %s\n\trespond @m 200", testSecret, pattern))
		err := loadCaddyfile(cfg)
		if err == nil {
			_ = stopCaddy()
			t.Fatalf("pattern %s loaded", pattern)
		}
		if !strings.Contains(err.Error(), "mux_event") {
			t.Errorf("pattern %s: error %q does not name mux_event", pattern, err)
		}
	}
}
