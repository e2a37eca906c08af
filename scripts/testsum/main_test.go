package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// run feeds events to testsum (built from this package) and returns its
// output and exit code.
func run(t *testing.T, events []event, args ...string) (string, int) {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "testsum")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	var in strings.Builder
	for _, e := range events {
		b, _ := json.Marshal(e)
		in.Write(b)
		in.WriteByte('\n')
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdin = strings.NewReader(in.String())
	out, err := cmd.CombinedOutput()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return string(out), code
}

const pkg = "github.com/caddy-mux-webhook/caddy-mux-webhook"

func TestCountsAndSkipReasons(t *testing.T) {
	log := filepath.Join(t.TempDir(), "go-test.log")
	out, code := run(t, []event{
		{Action: "run", Package: pkg, Test: "TestA"},
		{Action: "output", Package: pkg, Test: "TestA", Output: "caddy says hello\n"},
		{Action: "pass", Package: pkg, Test: "TestA"},
		{Action: "run", Package: pkg, Test: "TestB"},
		{Action: "output", Package: pkg, Test: "TestB", Output: "=== RUN   TestB\n"},
		{Action: "output", Package: pkg, Test: "TestB", Output: "    e2e_helpers_test.go:12: nats-server not installed\n"},
		{Action: "output", Package: pkg, Test: "TestB", Output: "--- SKIP: TestB (0.00s)\n"},
		{Action: "skip", Package: pkg, Test: "TestB"},
		{Action: "pass", Package: pkg, Test: "TestC/sub"},
		{Action: "output", Package: pkg, Test: "BenchmarkX", Output: "BenchmarkX/a-2         \t"},
		{Action: "output", Package: pkg, Test: "BenchmarkX", Output: "       1\t   1765839 ns/op\n"},
		{Action: "pass", Package: pkg, Test: "TestC"},
		{Action: "output", Package: pkg, Output: "ok  \t" + pkg + "\t1.0s\n"},
		{Action: "pass", Package: pkg},
	}, "-log", log)
	if code != 0 {
		t.Errorf("exit %d, want 0:\n%s", code, out)
	}
	if !strings.Contains(out, "2 passed, 0 failed, 1 skipped\n") {
		t.Errorf("no summary line:\n%s", out)
	}
	if !strings.Contains(out, "skipped TestB (.): e2e_helpers_test.go:12: nats-server not installed") {
		t.Errorf("no skip reason:\n%s", out)
	}
	if !strings.Contains(out, "BenchmarkX/a-2         \t       1\t   1765839 ns/op\n") {
		t.Errorf("a benchmark result written in two parts is not shown whole:\n%s", out)
	}
	if strings.Contains(out, "caddy says hello") {
		t.Errorf("a passing test's output was shown:\n%s", out)
	}
	if b, _ := os.ReadFile(log); !strings.Contains(string(b), "caddy says hello") {
		t.Errorf("the log file lacks the test's output: %q", b)
	}
	if _, code := run(t, []event{{Action: "skip", Package: pkg, Test: "TestB"}}, "-noskip"); code != 1 {
		t.Errorf("-noskip with a skipped test: exit %d, want 1", code)
	}
}

func TestFailureShowsItsOutput(t *testing.T) {
	out, code := run(t, []event{
		{Action: "output", Package: pkg, Test: "TestF", Output: "    x_test.go:3: got 1, want 2\n"},
		{Action: "output", Package: pkg, Test: "TestF/sub", Output: "    x_test.go:9: sub failed\n"},
		{Action: "fail", Package: pkg, Test: "TestF/sub"},
		{Action: "fail", Package: pkg, Test: "TestF"},
		{Action: "output", Package: pkg, Output: "FAIL\t" + pkg + "\t1.0s\n"},
		{Action: "fail", Package: pkg},
	})
	if code != 1 {
		t.Errorf("exit %d, want 1", code)
	}
	for _, want := range []string{"got 1, want 2", "sub failed", "0 passed, 1 failed, 0 skipped", "failed TestF (.)", "FAIL\t" + pkg} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}

func TestBuildFailureFailsTheRun(t *testing.T) {
	out, code := run(t, []event{
		{Action: "build-output", ImportPath: pkg + " [" + pkg + ".test]", Output: "x.go:1: undefined: y\n"},
		{Action: "build-fail", ImportPath: pkg + " [" + pkg + ".test]"},
		{Action: "output", Package: pkg, Output: "FAIL\t" + pkg + " [build failed]\n"},
		{Action: "fail", Package: pkg},
	})
	if code != 1 || !strings.Contains(out, "undefined: y") {
		t.Errorf("exit %d, output:\n%s", code, out)
	}
}
