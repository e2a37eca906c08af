// Command testsum reads `go test -json` on its standard input and prints
// what a person running ./scripts/test needs: each package's result line,
// benchmark results, the whole output of every failed test, and at the end
// one line "N passed, N failed, N skipped" followed by each skipped test
// and its reason. Everything go test printed goes to the file named by
// -log, so nothing is lost by leaving it out of the terminal.
//
// It exits 1 when a test or a package failed (a build failure, a panic
// outside a test), or when -noskip is set and a test was skipped.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
)

// event is one line of `go test -json` (cmd/test2json).
type event struct {
	Action     string
	Package    string
	ImportPath string
	Test       string
	Output     string
	Elapsed    float64
}

type key struct{ pkg, test string }

func main() {
	logPath := flag.String("log", "", "write go test's whole output to this file")
	noSkip := flag.Bool("noskip", false, "a skipped test fails the run")
	flag.Parse()

	var logw io.Writer = io.Discard
	if *logPath != "" {
		f, err := os.Create(*logPath)
		if err != nil {
			fmt.Fprintln(os.Stderr, "testsum:", err)
			os.Exit(2)
		}
		defer f.Close()
		logw = f
	}

	output := map[key]*strings.Builder{}
	partial := map[key]string{} // output after the last newline, by test
	var passed, failed, skipped []key
	failedPkgs := map[string]bool{}
	sc := bufio.NewScanner(os.Stdin)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	for sc.Scan() {
		line := sc.Bytes()
		var e event
		if err := json.Unmarshal(line, &e); err != nil || e.Action == "" {
			// go test's own messages (go: downloading…, vet's findings
			// when -json could not wrap them) pass through.
			fmt.Println(string(line))
			fmt.Fprintln(logw, string(line))
			continue
		}
		pkg := e.Package
		if pkg == "" {
			pkg = e.ImportPath
		}
		k := key{pkg, e.Test}
		switch e.Action {
		case "build-output":
			fmt.Print(e.Output)
			fmt.Fprint(logw, e.Output)
		case "build-fail":
			failedPkgs[pkg] = true
		case "output":
			fmt.Fprint(logw, e.Output)
			b := output[k]
			if b == nil {
				b = &strings.Builder{}
				output[k] = b
			}
			if b.Len() < 4<<20 {
				b.WriteString(e.Output)
			}
			// A benchmark's result line may come in several events.
			line := partial[k] + e.Output
			for {
				i := strings.IndexByte(line, '\n')
				if i < 0 {
					break
				}
				if isBenchResult(line[:i]) {
					fmt.Println(line[:i])
				}
				line = line[i+1:]
			}
			partial[k] = line
		case "pass", "fail", "skip":
			if e.Test == "" {
				// The package's end: print its summary line as go test does.
				for _, l := range strings.SplitAfter(output[k].String(), "\n") {
					if strings.HasPrefix(l, "ok ") || strings.HasPrefix(l, "FAIL") || strings.HasPrefix(l, "?") {
						fmt.Print(l)
					}
				}
				if e.Action == "fail" {
					failedPkgs[pkg] = true
				}
				continue
			}
			if strings.Contains(e.Test, "/") {
				continue // subtests are counted in their test
			}
			switch e.Action {
			case "pass":
				passed = append(passed, k)
			case "fail":
				failed = append(failed, k)
				fmt.Printf("--- FAIL: %s (%s)\n", e.Test, pkg)
				for tk, b := range output {
					if tk.pkg == pkg && (tk.test == e.Test || strings.HasPrefix(tk.test, e.Test+"/")) {
						fmt.Print(indent(b.String()))
					}
				}
			case "skip":
				skipped = append(skipped, k)
			}
		}
	}
	if err := sc.Err(); err != nil {
		fmt.Fprintln(os.Stderr, "testsum: reading go test's output:", err)
		os.Exit(2)
	}
	// Output not attributed to a test of a failed package (a panic, a
	// build error) is shown whole.
	for pkg := range failedPkgs {
		if b := output[key{pkg, ""}]; b != nil {
			fmt.Printf("--- output of %s:\n%s", pkg, indent(b.String()))
		}
	}

	fmt.Printf("%d passed, %d failed, %d skipped\n", len(passed), len(failed), len(skipped))
	sort.Slice(skipped, func(i, j int) bool { return skipped[i].test < skipped[j].test })
	for _, k := range skipped {
		fmt.Printf("skipped %s (%s): %s\n", k.test, short(k.pkg), skipReason(output[k]))
	}
	for _, k := range failed {
		fmt.Printf("failed %s (%s)\n", k.test, short(k.pkg))
	}
	for pkg := range failedPkgs {
		fmt.Printf("failed package %s\n", short(pkg))
	}
	if *logPath != "" {
		fmt.Printf("go test's whole output: %s\n", *logPath)
	}
	if len(failed) > 0 || len(failedPkgs) > 0 || (*noSkip && len(skipped) > 0) {
		os.Exit(1)
	}
}

// isBenchResult is a benchmark's result line.
func isBenchResult(s string) bool {
	return strings.HasPrefix(s, "Benchmark") && strings.Contains(s, "ns/op")
}

// skipReason is the message t.Skip printed: the lines of the test's output
// after its === RUN line and before --- SKIP, joined.
func skipReason(b *strings.Builder) string {
	if b == nil {
		return "(no reason given)"
	}
	var reason []string
	for _, l := range strings.Split(b.String(), "\n") {
		t := strings.TrimSpace(l)
		if t == "" || strings.HasPrefix(t, "=== ") || strings.HasPrefix(t, "--- SKIP") {
			continue
		}
		reason = append(reason, t)
	}
	if len(reason) == 0 {
		return "(no reason given)"
	}
	return strings.Join(reason, " ")
}

func short(pkg string) string {
	if i := strings.LastIndex(pkg, "/caddy-mux-webhook"); i >= 0 {
		return "." + strings.TrimPrefix(pkg[i:], "/caddy-mux-webhook")
	}
	return pkg
}

func indent(s string) string {
	return "    " + strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n    ") + "\n"
}
