package muxwebhook

import (
	"context"
	"net/http/httptest"
	"slices"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func TestGlobMatch(t *testing.T) {
	tests := []struct {
		pattern, s string
		want       bool
	}{
		{"video.asset.ready", "video.asset.ready", true},
		{"video.asset.ready", "video.asset.readyx", false},
		{"video.asset.ready", "Video.asset.ready", false},
		{"video.asset.*", "video.asset.ready", true},
		{"video.asset.*", "video.asset.static_renditions.ready", true},
		{"video.asset.*", "video.asset.", true},
		{"video.asset.*", "video.assets.ready", false},
		{"video.asset.*", "video.live_stream.active", false},
		{"*", "anything.at.all", true},
		{"*", "", true},
		{"*.ready", "video.asset.ready", true},
		{"*.ready", "video.asset.ready.not", false},
		{"video.*.ready", "video.asset.track.ready", true},
		{"video.*.ready", "video.ready", false},
		{"**", "x", true},
		{"a*b*c", "aXbYc", true},
		{"a*b*c", "aXbY", false},
		{"a*a*a*a*b", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", false},
		{"robots.job.*.completed", "robots.job.summarize.completed", true},
	}
	for _, tt := range tests {
		if got := globMatch(tt.pattern, tt.s); got != tt.want {
			t.Errorf("globMatch(%q, %q) = %v, want %v", tt.pattern, tt.s, got, tt.want)
		}
	}
}

func TestMatcherFailsClosedWithoutEvent(t *testing.T) {
	m := MatchMuxEvent{"*"}
	r := httptest.NewRequest("POST", "/", nil)
	vars := map[string]any{}
	r = r.WithContext(context.WithValue(r.Context(), caddyhttp.VarsCtxKey, vars))
	if m.Match(r) {
		t.Fatal("matched a request without a verified event")
	}
	vars[EventVar] = &Event{Type: "video.asset.ready"}
	if !m.Match(r) {
		t.Fatal("did not match a verified event")
	}
	if (MatchMuxEvent{"video.live_stream.*", "video.upload.*"}).Match(r) {
		t.Fatal("matched the wrong family")
	}
	// A string in the vars map (as a `vars` directive could set) is not an event.
	vars[EventVar] = "video.asset.ready"
	if m.Match(r) {
		t.Fatal("matched a forged variable")
	}
}

func TestMatcherUnmarshalCaddyfile(t *testing.T) {
	tests := []struct {
		input   string
		want    MatchMuxEvent
		wantErr bool
	}{
		{"mux_event video.asset.*", MatchMuxEvent{"video.asset.*"}, false},
		{"mux_event a b\nmux_event c", MatchMuxEvent{"a", "b", "c"}, false},
		{"mux_event", nil, true},
		{"mux_event a {\n b\n}", nil, true},
	}
	for _, tt := range tests {
		var m MatchMuxEvent
		err := m.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tt.input))
		if (err != nil) != tt.wantErr {
			t.Errorf("%q: err = %v, wantErr %v", tt.input, err, tt.wantErr)
			continue
		}
		if !tt.wantErr && !slices.Equal(m, tt.want) {
			t.Errorf("%q: got %v, want %v", tt.input, m, tt.want)
		}
	}
}

func TestMatcherValidate(t *testing.T) {
	for _, bad := range []MatchMuxEvent{{}, {""}, {"video asset"}, {"a", "\t"}} {
		if bad.Validate() == nil {
			t.Errorf("Validate(%q) = nil, want an error", []string(bad))
		}
	}
	if err := (MatchMuxEvent{"video.asset.*", "x"}).Validate(); err != nil {
		t.Errorf("Validate: %v", err)
	}
}
