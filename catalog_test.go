package muxwebhook

import (
	"os"
	"strings"
	"testing"
)

// TestCatalogPinned checks the catalog against the pinned list of types
// extracted from the Mux Node SDK (catalog/mux-event-types.txt).
func TestCatalogPinned(t *testing.T) {
	raw, err := os.ReadFile("catalog/mux-event-types.txt")
	if err != nil {
		t.Fatal(err)
	}
	want := strings.Fields(string(raw))
	got := Catalog()
	if len(got) != len(want) || len(got) != 117 {
		t.Fatalf("catalog has %d types, the pinned list %d (want 117)", len(got), len(want))
	}
	seen := map[string]bool{}
	for _, e := range got {
		seen[e.Type] = true
		if e.Object == "" || e.Object == "other" {
			t.Errorf("%s: no object kind", e.Type)
		}
		if len(e.Description) < 15 || strings.Contains(e.Description, "%s") || e.Description[0] < 'A' || e.Description[0] > 'Z' {
			t.Errorf("%s: poor description %q", e.Type, e.Description)
		}
	}
	for _, w := range want {
		if !seen[w] || !IsKnownType(w) {
			t.Errorf("pinned type %s missing from the catalog", w)
		}
	}
	if IsKnownType("video.asset.nope") || IsKnownType("") {
		t.Error("IsKnownType accepts unknown types")
	}
}

func TestCatalogObjects(t *testing.T) {
	tests := map[string]string{
		"video.asset.ready":                          "asset",
		"video.asset.track.ready":                    "track",
		"video.asset.static_rendition.ready":         "static rendition",
		"video.asset.static_renditions.ready":        "static renditions",
		"video.asset.master.ready":                   "master",
		"video.live_stream.active":                   "live stream",
		"video.live_stream.simulcast_target.created": "simulcast target",
		"video.upload.created":                       "upload",
		"video.delivery.high_traffic":                "delivery",
		"robots.job.summarize.completed":             "robots job",
		"robots.directive_run.partial":               "robots directive run",
	}
	for typ, want := range tests {
		if got, _ := objectOf(typ); got != want {
			t.Errorf("objectOf(%s) = %q, want %q", typ, got, want)
		}
	}
}
