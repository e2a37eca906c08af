//go:build e2e

package muxwebhook

import (
	"os"
	"os/exec"
	"regexp"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// TestPrometheusAlerts: examples/prometheus/alerts.yml names only metrics
// the plugin exports, is valid (promtool check rules), and every alert
// fires on the series it is meant for and not before (promtool test
// rules alerts_test.yml). On CI promtool (Debian's prometheus package)
// must be there.
func TestPrometheusAlerts(t *testing.T) {
	t.Parallel() // its own processes and ports
	raw, err := os.ReadFile("examples/prometheus/alerts.yml")
	if err != nil {
		t.Fatal(err)
	}
	if err := registerMetrics(nil); err != nil {
		t.Fatal(err)
	}
	exported := map[string]bool{}
	descs := make(chan *prometheus.Desc, 64)
	go func() {
		for _, c := range muxCollectors() {
			c.Describe(descs)
		}
		close(descs)
	}()
	fqName := regexp.MustCompile(`fqName: "([a-z_]+)"`)
	for d := range descs {
		if m := fqName.FindStringSubmatch(d.String()); m != nil {
			exported[m[1]] = true
		}
	}
	used := regexp.MustCompile(`caddy_mux_webhook_[a-z_]+`).FindAllString(string(raw), -1)
	if len(used) < 5 {
		t.Fatalf("alerts.yml names %d metrics", len(used))
	}
	for _, name := range used {
		if !exported[name] {
			t.Errorf("alerts.yml uses %s, which the plugin does not export", name)
		}
	}

	promtool, err := exec.LookPath("promtool")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("promtool is not installed; .ci/run installs Debian's prometheus package")
		}
		t.Skip("promtool not installed (apt-get install prometheus)")
	}
	for _, args := range [][]string{{"check", "rules", "alerts.yml"}, {"test", "rules", "alerts_test.yml"}} {
		cmd := exec.Command(promtool, args...)
		cmd.Dir = "examples/prometheus"
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("promtool %v: %v\n%s", args, err, out)
		}
	}
}
