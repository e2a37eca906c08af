package muxwebhook

// The mux_webhook app (app.go): its settings checked at provisioning.

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
)

// TestAppRefusesNegativeSettings: Caddy provisions a module before it
// validates it, so the app's Provision must refuse negative settings
// itself, before they reach the live log (a negative log_size panicked
// making the ring; a negative log_body turned the live log off).
func TestAppRefusesNegativeSettings(t *testing.T) {
	for _, c := range []struct{ app, field string }{
		{`{"log_size": -1}`, "log_size"},
		{`{"log_body": -1}`, "log_body"},
		{`{"log_size": 100001}`, "log_size"},
	} {
		sizeBefore, bodyBefore := liveLogSettings()
		var cfg caddy.Config
		if err := json.Unmarshal([]byte(`{"admin": {"disabled": true}, "apps": {"mux_webhook": `+c.app+`}}`), &cfg); err != nil {
			t.Fatal(err)
		}
		err := func() (err error) {
			defer func() {
				if p := recover(); p != nil {
					err = fmt.Errorf("panic: %v", p)
				}
			}()
			return caddy.Validate(&cfg)
		}()
		if err == nil || !strings.Contains(err.Error(), c.field) || strings.Contains(err.Error(), "panic") {
			t.Errorf("%s: got %v, want a load error naming %s", c.app, err, c.field)
		}
		if size, body := liveLogSettings(); size != sizeBefore || body != bodyBefore {
			t.Errorf("%s: the refused config changed the live log to size %d, body %d (was %d, %d)", c.app, size, body, sizeBefore, bodyBefore)
		}
	}
}

func liveLogSettings() (size, body int) {
	liveLog.mu.Lock()
	defer liveLog.mu.Unlock()
	return liveLog.size, liveLog.bodyMax
}
