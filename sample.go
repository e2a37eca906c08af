// Realistic sample events of any catalog type, for `caddy mux-webhook send`
// and for tests: the envelope Mux sends (type, id, created_at, object,
// environment, data, attempts, ...) around a `data` shaped like the object.

package muxwebhook

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strings"
	"time"
)

// SampleOptions adjust a sample event.
type SampleOptions struct {
	// ID is the event id; a fresh random one when empty.
	ID string
	// Data replaces the generated `data` object (raw JSON).
	Data json.RawMessage
	// Passthrough, when set, is written to data.passthrough.
	Passthrough string
	// Now is the event's creation time; time.Now() when zero.
	Now time.Time
}

// sampleObjectTypes maps catalog object kinds to the object.type Mux sends.
var sampleObjectTypes = map[string]string{
	"asset":                "asset",
	"track":                "track",
	"static rendition":     "static_rendition",
	"static renditions":    "asset",
	"master":               "asset",
	"shots":                "asset",
	"live stream":          "live",
	"simulcast target":     "simulcast-target",
	"upload":               "upload",
	"delivery":             "asset",
	"robots job":           "robots.job",
	"robots directive run": "robots.directive_run",
}

// SampleEvent builds the JSON body of a realistic event of type typ. Types
// outside the catalog get a generic asset-like event.
func SampleEvent(typ string, opt SampleOptions) ([]byte, error) {
	if opt.ID == "" {
		opt.ID = newUUID()
	}
	if opt.Now.IsZero() {
		opt.Now = time.Now()
	}
	kind, _ := objectOf(typ)
	objType, ok := sampleObjectTypes[kind]
	if !ok {
		objType = "asset"
	}
	objID := randomID(32)
	var data json.RawMessage
	if opt.Data != nil {
		if !json.Valid(opt.Data) {
			return nil, fmt.Errorf("--data is not valid JSON")
		}
		data = opt.Data
	} else {
		d := sampleData(typ, kind, objID, opt.Now)
		b, err := json.Marshal(d)
		if err != nil {
			return nil, err
		}
		data = b
	}
	if opt.Passthrough != "" {
		var m map[string]any
		if err := json.Unmarshal(data, &m); err != nil || m == nil {
			return nil, fmt.Errorf("--passthrough needs data to be a JSON object")
		}
		m["passthrough"] = opt.Passthrough
		b, err := json.Marshal(m)
		if err != nil {
			return nil, err
		}
		data = b
	}
	envelope := struct {
		Type           string          `json:"type"`
		RequestID      *string         `json:"request_id"`
		Object         map[string]any  `json:"object"`
		ID             string          `json:"id"`
		Environment    map[string]any  `json:"environment"`
		Data           json.RawMessage `json:"data"`
		CreatedAt      string          `json:"created_at"`
		Attempts       []any           `json:"attempts"`
		AccessorSource *string         `json:"accessor_source"`
		Accessor       *string         `json:"accessor"`
	}{
		Type:        typ,
		Object:      map[string]any{"type": objType, "id": objID},
		ID:          opt.ID,
		Environment: map[string]any{"name": "Development", "id": "dev" + randomID(4)},
		Data:        data,
		CreatedAt:   opt.Now.UTC().Format("2006-01-02T15:04:05.000000Z"),
		Attempts:    []any{},
	}
	return json.Marshal(envelope)
}

// sampleData returns a `data` object shaped like the object the event is
// about, with a status that fits the event's last word.
func sampleData(typ, kind, id string, now time.Time) map[string]any {
	action := typ[strings.LastIndexByte(typ, '.')+1:]
	created := fmt.Sprint(now.Unix())
	status := map[string]string{
		"created": "preparing", "ready": "ready", "errored": "errored", "deleted": "deleted",
		"preparing": "preparing", "skipped": "skipped", "active": "active", "idle": "idle",
		"connected": "connected", "disconnected": "disconnected", "recording": "recording",
		"enabled": "idle", "disabled": "disabled", "broadcasting": "broadcasting",
		"starting": "starting", "pending": "pending", "processing": "processing",
		"completed": "completed", "cancelled": "cancelled", "partial": "completed",
		"asset_created": "asset_created",
	}[action]
	if status == "" {
		status = "ready"
	}
	playback := []map[string]any{{"policy": "public", "id": randomID(32)}}
	d := map[string]any{"id": id, "created_at": created, "status": status}
	switch kind {
	case "asset", "static renditions", "master", "shots", "delivery":
		d["playback_ids"] = playback
		d["duration"] = 23.857167
		d["aspect_ratio"] = "16:9"
		d["max_stored_resolution"] = "HD"
		d["resolution_tier"] = "1080p"
		d["video_quality"] = "basic"
		d["tracks"] = []map[string]any{
			{"type": "video", "id": randomID(32), "max_width": 1920, "max_height": 1080, "max_frame_rate": 29.97},
			{"type": "audio", "id": randomID(32), "max_channels": 2},
		}
		switch kind {
		case "static renditions":
			d["static_renditions"] = map[string]any{"status": status, "files": []map[string]any{{"name": "highest.mp4", "ext": "mp4", "status": status}}}
		case "master":
			d["master"] = map[string]any{"status": status, "url": "https://master.mux.com/" + randomID(24) + "/master.mp4"}
		case "shots":
			d = map[string]any{"asset_id": id, "status": status}
		case "delivery":
			d = map[string]any{"id": id, "asset_id": id, "playback_ids": playback, "delivered_seconds": 1234.5}
		}
	case "track":
		d["type"] = "text"
		d["text_type"] = "subtitles"
		d["language_code"] = "en"
		d["name"] = "English"
		d["asset_id"] = randomID(32)
	case "static rendition":
		d["asset_id"] = randomID(32)
		d["name"] = "highest.mp4"
		d["ext"] = "mp4"
		d["resolution_tier"] = "1080p"
	case "live stream":
		d["stream_key"] = "sk-" + randomID(24)
		d["playback_ids"] = playback
		d["reconnect_window"] = 60
		d["latency_mode"] = "standard"
		d["max_continuous_duration"] = 43200
		d["new_asset_settings"] = map[string]any{"playback_policies": []string{"public"}}
		if action == "recording" || action == "active" {
			d["active_asset_id"] = randomID(32)
		}
	case "simulcast target":
		d["url"] = "rtmp://live.example.com/app"
		d["live_stream_id"] = randomID(32)
	case "upload":
		d["timeout"] = 3600
		d["cors_origin"] = "*"
		d["url"] = "https://storage.googleapis.com/video-storage-us-east1-uploads/" + randomID(24)
		d["new_asset_settings"] = map[string]any{"playback_policies": []string{"public"}}
		if action == "asset_created" {
			d["asset_id"] = randomID(32)
		}
	case "robots job", "robots directive run":
		if job := strings.Split(typ, "."); len(job) == 4 {
			d["workflow"] = job[2]
		}
		d["parameters"] = map[string]any{"asset_id": randomID(32)}
		if status == "completed" {
			d["outputs"] = map[string]any{}
		}
	}
	if status == "errored" {
		d["errors"] = map[string]any{"type": "invalid_input", "messages": []string{"sample error"}}
	}
	return d
}

// randomID returns n random characters from Mux's id alphabet.
func randomID(n int) string {
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, n)
	_, _ = rand.Read(b)
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return string(b)
}

// newUUID returns a random (version 4) UUID, the form of Mux event ids.
func newUUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}
