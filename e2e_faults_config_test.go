//go:build e2e

package muxwebhook

// "A bad JSON config: a load error that names the field; never a panic"
// (README, "When things fail").

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestFaultBadJSONConfigs runs the real binary on bad JSON configs: each
// must make `caddy run` exit non-zero, soon, with a message that names the
// field, and never panic.
func TestFaultBadJSONConfigs(t *testing.T) {
	t.Parallel() // its own processes and ports
	bin := caddyBinary(t)
	cases := []struct {
		name    string
		app     string // the mux_webhook app's JSON ("" for none)
		handler string // extra fields of the mux_webhook handler
		want    string // in the output: the field's name
	}{
		{"negative log_size", `{"log_size": -1}`, ``, "log_size"},
		{"negative log_body", `{"log_body": -1}`, ``, "log_body"},
		{"negative tolerance", ``, `"tolerance": "-5m"`, "tolerance"},
		{"negative max_body", ``, `"max_body": -1`, "max_body"},
		{"negative dedupe window", ``, `"dedupe": {"window": "-1h"}`, "window"},
		{"negative dedupe max_entries", ``, `"dedupe": {"max_entries": -1}`, "max_entries"},
		{"negative body_timeout", ``, `"body_timeout": "-1s"`, "body_timeout"},
		{"max_body over the ceiling", ``, `"max_body": 1099511627776`, "max_body"},
		{"unknown field in the handler", ``, `"secret_typo": "x"`, "secret_typo"},
		{"unknown field in the app", `{"log_sise": 5}`, ``, "log_sise"},
		{"unknown field in dedupe", ``, `"dedupe": {"windw": "1h"}`, "windw"},
	}
	for _, c := range cases {
		t.Run(strings.ReplaceAll(c.name, " ", "_"), func(t *testing.T) {
			cfg := badConfig(freePort(t), c.app, c.handler)
			if !json.Valid([]byte(cfg)) {
				t.Fatalf("the test's config is not JSON: %s", cfg)
			}
			out, err := runCaddyJSON(t, bin, cfg)
			var exit *exec.ExitError
			switch {
			case errors.Is(err, context.DeadlineExceeded):
				t.Fatalf("caddy run did not exit within %s on a bad config (it runs it); output:\n%s", badConfigWait, out)
			case !errors.As(err, &exit):
				t.Fatalf("caddy run: %v; output:\n%s", err, out)
			case exit.ExitCode() == 0:
				t.Fatalf("caddy run exited 0 on a bad config; output:\n%s", out)
			}
			if strings.Contains(out, "panic") {
				t.Errorf("caddy run panicked; output:\n%s", out)
			}
			if !strings.Contains(out, c.want) {
				t.Errorf("the error does not name %q; output:\n%s", c.want, out)
			}
		})
	}
}

// badConfigWait bounds each `caddy run` on a bad config; a config that
// loads would run until then.
const badConfigWait = 30 * time.Second

// badConfig is a JSON config with one mux_webhook route listening on
// 127.0.0.1:port, no admin endpoint, the given app and handler fields.
func badConfig(port int, app, handler string) string {
	apps := ""
	if app != "" {
		apps = `"mux_webhook": ` + app + `,`
	}
	if handler != "" {
		handler = ", " + handler
	}
	return fmt.Sprintf(`{
	"admin": {"disabled": true},
	"apps": {
		%s
		"http": {"servers": {"gateway": {
			"listen": ["127.0.0.1:%d"],
			"automatic_https": {"disable": true},
			"routes": [{"handle": [
				{"handler": "mux_webhook", "secrets": ["test-only-secret"]%s},
				{"handler": "static_response", "status_code": 204}
			]}]
		}}}
	}
}`, apps, port, handler)
}
