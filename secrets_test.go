package muxwebhook

// {env.*}/{file.*} secrets (secrets.go), and a missing secret failing the
// load.

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestSecretsFromEnvAndFile(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "mux")
	if err := os.WriteFile(file, []byte("file-secret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("MUX_TEST_SECRET_ENV", "env-secret")
	g := startGateway(t, fmt.Sprintf(`
	mux_webhook {env.MUX_TEST_SECRET_ENV} {
		secret {file.%s}
	}
	respond "ok {http.mux.event.id}" 200`, file))

	for _, secret := range []string{"env-secret", "file-secret"} {
		status, _, got := do(t, signedRequest(t, g.url, secret, event("video.asset.ready", secret, ""), time.Now()))
		if status != 200 || got != "ok "+secret {
			t.Errorf("secret %s: got %d %q", secret, status, got)
		}
	}
	// The file's trailing newline was trimmed: signing with it fails.
	if status, _, _ := do(t, signedRequest(t, g.url, "file-secret\n", event("video.asset.ready", "n", ""), time.Now())); status != 401 {
		t.Errorf("secret with newline: got %d, want 401", status)
	}
}

func TestMissingSecretFailsLoad(t *testing.T) {
	empty := filepath.Join(t.TempDir(), "empty")
	if err := os.WriteFile(empty, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("MUX_TEST_EMPTY", "")
	cases := []struct{ name, directive, mustName string }{
		{"unset env", "mux_webhook {env.MUX_TEST_DEFINITELY_UNSET}", "{env.MUX_TEST_DEFINITELY_UNSET}"},
		{"empty env", "mux_webhook {env.MUX_TEST_EMPTY}", "{env.MUX_TEST_EMPTY}"},
		{"empty file", "mux_webhook {file." + empty + "}", "{file." + empty + "}"},
		{"missing file", "mux_webhook {file." + empty + ".nope}", "{file." + empty + ".nope}"},
		{"unknown placeholder in a literal", "mux_webhook s3cr3t{oops}tail", "(redacted)"},
		{"second secret unset", "mux_webhook good-secret {\n\t\tsecret {env.MUX_TEST_DEFINITELY_UNSET}\n\t}", "secret 2 of 2"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cfg, _ := gatewayConfig(t, c.directive+"\n\trespond 204")
			err := loadCaddyfile(cfg)
			if err == nil {
				_ = stopCaddy()
				t.Fatal("config loaded without a usable secret")
			}
			msg := err.Error()
			if !strings.Contains(msg, "mux_webhook") || !strings.Contains(msg, c.mustName) {
				t.Errorf("error %q should name mux_webhook and %q", msg, c.mustName)
			}
			for _, leak := range []string{"s3cr3t", "tail", "good-secret"} {
				if strings.Contains(msg, leak) {
					t.Errorf("error %q leaks a secret", msg)
				}
			}
		})
	}
}
