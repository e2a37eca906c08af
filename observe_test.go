package muxwebhook

// The request's log line (observe.go).

import (
	"strings"
	"testing"
	"time"
)

func TestRequestLogLine(t *testing.T) {
	up := newUpstream(t, "assets")
	g := startGateway(t, liveLogSite(up))
	body := []byte(`{"type":"video.asset.ready","id":"log-1","object":{"type":"asset","id":"a-9"},"environment":{"id":"env-3","name":"P"},"attempts":[{},{}],"data":{}}`)
	do(t, signedRequest(t, g.url, testSecret, body, time.Now()))
	var line map[string]any
	for _, l := range g.logLines() {
		if l["msg"] == "mux webhook" && l["id"] == "log-1" {
			line = l
		}
	}
	if line == nil {
		t.Fatal("no log line for the event")
	}
	want := map[string]any{
		"outcome": "verified", "reason": "", "type": "video.asset.ready", "object_type": "asset",
		"object_id": "a-9", "environment_id": "env-3", "attempts": float64(2), "status": float64(200),
	}
	for k, v := range want {
		if line[k] != v {
			t.Errorf("%s = %v, want %v", k, line[k], v)
		}
	}
	if _, ok := line["duration"].(float64); !ok {
		t.Errorf("no duration: %v", line)
	}
	// The test logs at debug level: the body is there, cut short.
	if b, _ := line["body"].(string); b == "" || len(b) > maxLoggedBody {
		t.Errorf("debug body %q", b)
	}
	if strings.Contains(g.rawLog(), testSecret) {
		t.Error("the secret is in the log")
	}
}
