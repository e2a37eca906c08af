// The catalog of Mux event types known to this release, used to lint
// mux_event patterns at load time and by the `caddy mux-webhook` command.
// Unknown types are still valid events: Mux adds types over time.

package muxwebhook

import (
	_ "embed"
	"slices"
	"strings"
)

// catalogText is the list of known types, one per line, extracted from the
// official Mux Node SDK (see scripts/refresh-catalog).
//
//go:embed catalog/mux-event-types.txt
var catalogText string

// EventType describes one known Mux event type.
type EventType struct {
	// Type is the event type, e.g. video.asset.ready.
	Type string `json:"type"`
	// Object is the kind of object the event is about, e.g. asset or
	// live stream.
	Object string `json:"object"`
	// Description says when Mux sends it, in one line.
	Description string `json:"description"`
}

// Catalog returns every known event type, sorted by name.
func Catalog() []EventType { return catalog }

// IsKnownType reports whether typ is in the catalog.
func IsKnownType(typ string) bool {
	_, ok := knownType(typ)
	return ok
}

// knownType returns the catalog's own string for typ, if it is known.
func knownType(typ string) (string, bool) {
	i, ok := slices.BinarySearchFunc(catalog, typ, func(e EventType, t string) int {
		return strings.Compare(e.Type, t)
	})
	if !ok {
		return "", false
	}
	return catalog[i].Type, true
}

var catalog = buildCatalog(catalogText)

func buildCatalog(text string) []EventType {
	var out []EventType
	for line := range strings.SplitSeq(text, "\n") {
		typ := strings.TrimSpace(line)
		if typ == "" || strings.HasPrefix(typ, "#") {
			continue
		}
		obj, noun := objectOf(typ)
		out = append(out, EventType{Type: typ, Object: obj, Description: describe(typ, noun)})
	}
	slices.SortFunc(out, func(a, b EventType) int { return strings.Compare(a.Type, b.Type) })
	return slices.CompactFunc(out, func(a, b EventType) bool { return a.Type == b.Type })
}

// objectKinds maps type prefixes, most specific first, to the object kind
// and the noun phrase used in descriptions.
var objectKinds = []struct{ prefix, kind, noun string }{
	{"video.asset.static_renditions.", "static renditions", "the asset's set of static renditions"},
	{"video.asset.static_rendition.", "static rendition", "a static rendition (MP4/M4A file) of an asset"},
	{"video.asset.track.", "track", "a track (video, audio or text) of an asset"},
	{"video.asset.master.", "master", "the downloadable master copy of an asset"},
	{"video.asset.shots.", "shots", "the shot detection of an asset"},
	{"video.asset.", "asset", "an asset"},
	{"video.live_stream.simulcast_target.", "simulcast target", "a simulcast target of a live stream"},
	{"video.live_stream.", "live stream", "a live stream"},
	{"video.upload.", "upload", "a direct upload"},
	{"video.delivery.", "delivery", "delivery of an asset"},
	{"robots.directive_run.", "robots directive run", "a robots directive run"},
	{"robots.job.", "robots job", "a robots job"},
}

func objectOf(typ string) (kind, noun string) {
	for _, k := range objectKinds {
		if rest, ok := strings.CutPrefix(typ, k.prefix); ok {
			noun = k.noun
			if k.prefix == "robots.job." {
				if job, _, ok := strings.Cut(rest, "."); ok {
					noun = "a robots " + job + " job"
				}
			}
			return k.kind, noun
		}
	}
	return "other", "an object"
}

// specialDescriptions cover the events whose last word alone does not say
// what happened.
var specialDescriptions = map[string]string{
	"video.asset.live_stream_completed":               "The live stream that was recording into this asset ended; the asset now holds the full recording.",
	"video.asset.non_standard_input_detected":         "The uploaded input uses a non-standard format; Mux will normalise it, which may take longer and cost more.",
	"video.asset.warning":                             "Mux noticed something worth a look about an asset (e.g. an input it had to adjust); the asset is still usable.",
	"video.upload.asset_created":                      "A direct upload finished and Mux created an asset from it; data.asset_id names the asset.",
	"video.upload.cancelled":                          "A direct upload was cancelled before it completed.",
	"video.delivery.high_traffic":                     "An asset or live stream is being delivered to an unusually large audience.",
	"video.live_stream.active":                        "A live stream is receiving video and broadcasting to viewers.",
	"video.live_stream.connected":                     "An encoder connected to a live stream.",
	"video.live_stream.disconnected":                  "The encoder disconnected from a live stream.",
	"video.live_stream.idle":                          "A live stream has no encoder connected and is waiting.",
	"video.live_stream.recording":                     "A live stream started recording what it receives into an asset.",
	"video.live_stream.enabled":                       "A live stream was enabled and accepts encoder connections again.",
	"video.live_stream.disabled":                      "A live stream was disabled and refuses encoder connections.",
	"video.live_stream.warning":                       "Mux noticed a problem worth a look on a live stream (e.g. its input); the stream continues.",
	"video.live_stream.simulcast_target.broadcasting": "A simulcast target is re-broadcasting the live stream to its destination.",
	"video.live_stream.simulcast_target.starting":     "A simulcast target is connecting to its destination.",
	"video.live_stream.simulcast_target.idle":         "A simulcast target stopped re-broadcasting, usually because the live stream went idle.",
	"robots.directive_run.partial":                    "A robots directive run finished with only some of its jobs successful.",
}

// actionPhrases describe the common last words of event types; %s is the
// noun phrase of the object.
var actionPhrases = map[string]string{
	"created":    "Mux created %s.",
	"deleted":    "%s was deleted.",
	"errored":    "%s failed; data.errors says why.",
	"ready":      "%s is ready to use.",
	"updated":    "The settings of %s changed.",
	"preparing":  "Mux started preparing %s.",
	"skipped":    "Mux skipped %s, as requested or because the input does not allow it.",
	"pending":    "%s is queued and waiting to start.",
	"processing": "%s is running.",
	"completed":  "%s finished successfully; its results are in data.",
	"cancelled":  "%s was cancelled before it finished.",
}

func describe(typ, noun string) string {
	if d, ok := specialDescriptions[typ]; ok {
		return d
	}
	action := typ[strings.LastIndexByte(typ, '.')+1:]
	if phrase, ok := actionPhrases[action]; ok {
		return capitalize(strings.Replace(phrase, "%s", noun, 1))
	}
	return capitalize(noun) + ": " + strings.ReplaceAll(action, "_", " ") + "."
}

func capitalize(s string) string {
	if s == "" {
		return s
	}
	return strings.ToUpper(s[:1]) + s[1:]
}
