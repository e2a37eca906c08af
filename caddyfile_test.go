package muxwebhook

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/caddyfile_adapt")

const goldenSeparator = "\n----------\n"

// TestCaddyfileAdapt adapts every testdata/caddyfile_adapt/*.caddyfiletest
// (a Caddyfile, a separator line, the expected JSON) and compares.
func TestCaddyfileAdapt(t *testing.T) {
	files, err := filepath.Glob("testdata/caddyfile_adapt/*.caddyfiletest")
	if err != nil || len(files) == 0 {
		t.Fatalf("no golden files found: %v", err)
	}
	for _, file := range files {
		t.Run(filepath.Base(file), func(t *testing.T) {
			raw, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			input, want, ok := strings.Cut(string(raw), goldenSeparator)
			if !ok {
				t.Fatalf("%s: missing %q separator", file, strings.TrimSpace(goldenSeparator))
			}
			got, err := adaptCaddyfile(input + "\n")
			if err != nil {
				t.Fatalf("adapting: %v", err)
			}
			if *update {
				if err := os.WriteFile(file, []byte(input+goldenSeparator+got+"\n"), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			if got != strings.TrimSpace(want) {
				t.Errorf("adapted JSON differs\n--- got\n%s\n--- want\n%s", got, want)
			}
		})
	}
}

// adaptCaddyfile returns the indented JSON for a Caddyfile, failing on
// warnings as well as errors.
func adaptCaddyfile(input string) (string, error) {
	adapter := caddyconfig.GetAdapter("caddyfile")
	out, warnings, err := adapter.Adapt([]byte(input), nil)
	if err != nil {
		return "", err
	}
	// Formatting is the golden files' business, not the harness's.
	warnings = slices.DeleteFunc(warnings, func(w caddyconfig.Warning) bool {
		return strings.Contains(w.Message, "input is not formatted")
	})
	if len(warnings) > 0 {
		return "", &adaptWarnings{warnings}
	}
	var buf bytes.Buffer
	if err := json.Indent(&buf, out, "", "\t"); err != nil {
		return "", err
	}
	return buf.String(), nil
}

type adaptWarnings struct{ w []caddyconfig.Warning }

func (a *adaptWarnings) Error() string {
	var b strings.Builder
	for _, w := range a.w {
		b.WriteString(w.String() + "\n")
	}
	return "warnings: " + b.String()
}

func TestGlobalOptionErrors(t *testing.T) {
	tests := []struct{ input, wantErr string }{
		{"mux_webhook {\n log_size many\n}", "log_size"},
		{"mux_webhook {\n log_size -1\n}", "log_size must be between"},
		{"mux_webhook {\n log_body 2MiB\n}", "log_body"},
		{"mux_webhook {\n colour blue\n}", "unknown global option"},
		{"mux_webhook {\n history 10s\n}", "history \"10s\": want a duration of at least 1m"},
		{"mux_webhook {\n history forever\n}", "or off"},
		{"mux_webhook {\n history\n}", "wrong argument count"},
		{"mux_webhook {\n history_max_bytes 0\n}", "history_max_bytes"},
		{"mux_webhook {\n history_max_bytes lots\n}", "history_max_bytes \"lots\": want a size"},
		{"mux_webhook 5", "takes a block"},
		{"mux_webhook {\n queue {\n nats nats://127.0.0.1:4222 {\n tls_client_auth client.pem\n }\n }\n}", "tls_client_auth takes a certificate file and a key file"},
		{"mux_webhook {\n queue {\n nats nats://127.0.0.1:4222 {\n instance two words\n }\n }\n}", "wrong argument count"},
		{"mux_webhook {\n queue {\n nats nats://127.0.0.1:4222 {\n instance g/1\n }\n }\n}", "queue nats instance"},
		{"mux_webhook {\n queue {\n nats nats://127.0.0.1:4222 {\n name g1\n }\n }\n}", "tls_ca, tls_client_auth or instance"},
	}
	for _, tt := range tests {
		_, err := adaptCaddyfile("{\n" + tt.input + "\n}\n:8080 {\n respond 204\n}\n")
		if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
			t.Errorf("%q: err = %v, want %q", tt.input, err, tt.wantErr)
		}
	}
}

func TestCaddyfileErrors(t *testing.T) {
	tests := []struct {
		name, input, wantErr string
	}{
		{"no secret", "mux_webhook", "no signing secret"},
		{"no secret with matcher", "mux_webhook /mux", "no signing secret"},
		{"empty secret line", "mux_webhook {\n secret\n}", "secret needs a value"},
		{"zero tolerance", "mux_webhook s {\n tolerance 0s\n}", "tolerance must be greater than 0"},
		{"negative tolerance", "mux_webhook s {\n tolerance -1m\n}", "tolerance must be greater than 0"},
		{"bad tolerance", "mux_webhook s {\n tolerance soon\n}", "tolerance"},
		{"tolerance arity", "mux_webhook s {\n tolerance 1m 2m\n}", "wrong argument count"},
		{"bad max_body", "mux_webhook s {\n max_body lots\n}", "max_body"},
		{"zero max_body", "mux_webhook s {\n max_body 0\n}", "want a size from 1B to 16MiB"},
		{"negative max_body", "mux_webhook s {\n max_body -1\n}", "want a size from 1B to 16MiB"},
		{"huge max_body", "mux_webhook s {\n max_body 1TiB\n}", "want a size from 1B to 16MiB"},
		{"bad body_timeout", "mux_webhook s {\n body_timeout soon\n}", "body_timeout"},
		{"zero body_timeout", "mux_webhook s {\n body_timeout 0s\n}", "body_timeout"},
		{"unknown option", "mux_webhook s {\n secrets x\n}", `unknown option "secrets"`},
		{"dedupe window", "mux_webhook s {\n dedupe never\n}", "dedupe window"},
		{"dedupe zero window", "mux_webhook s {\n dedupe {\n window 0s\n }\n}", "dedupe window"},
		{"dedupe max_entries", "mux_webhook s {\n dedupe {\n max_entries lots\n }\n}", "max_entries"},
		{"dedupe storage arg", "mux_webhook s {\n dedupe {\n storage redis\n }\n}", "takes no argument"},
		{"dedupe unknown", "mux_webhook s {\n dedupe {\n ttl 1h\n }\n}", "unknown dedupe option"},
		{"store without path", "mux_store", "want [<matcher>] <path-template>"},
		{"store too many", "mux_store @m /a /b", "want [<matcher>] <path-template>"},
		{"store bad status", "mux_store /s/{http.mux.event.id} {\n status 500\n}", "want a 2xx code"},
		{"store unknown", "mux_store /s/x {\n mode 0600\n}", "unknown option"},
		{"ui with args", "mux_webhook_ui x", "takes no arguments"},
		{"matcher without pattern", "@m mux_event\nrespond @m 200", "at least one event type pattern"},
		{"matcher with block", "@m mux_event a {\n b\n}\nrespond @m 200", "does not take a block"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := adaptCaddyfile(":8080 {\n" + tt.input + "\n}\n")
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("err = %v, want one containing %q", err, tt.wantErr)
			}
		})
	}
}
