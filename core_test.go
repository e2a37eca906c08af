package muxwebhook

import (
	"go/parser"
	"go/token"
	"strconv"
	"strings"
	"testing"
)

// TestCoreImportsNoCaddy: the files that decide whether bytes came from
// Mux and what they say stay free of Caddy (and of any logger), so that
// they can be read, tested and reused on their own.
func TestCoreImportsNoCaddy(t *testing.T) {
	for _, file := range []string{"verify.go", "jsonscan.go", "events.go"} {
		f, err := parser.ParseFile(token.NewFileSet(), file, nil, parser.ImportsOnly)
		if err != nil {
			t.Fatal(err)
		}
		for _, imp := range f.Imports {
			path, _ := strconv.Unquote(imp.Path.Value)
			if strings.Contains(path, ".") {
				t.Errorf("%s imports %s: the core may use the standard library only", file, path)
			}
		}
	}
}
