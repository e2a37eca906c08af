//go:build review2repro

// Reproductions of review findings left open (run with -tags review2repro);
// they fail on the current code.

package muxwebhook

import (
	"strings"
	"testing"
)

// TestDestinationURLUserinfoWithASlash: a token in the url's userinfo
// holding '/', '?' or '#' unescaped makes url.Parse read the part before
// it as the host and the rest (token included) as the path, query or
// fragment: the load check passes, every POST goes to the wrong host
// (its DNS error quotes that host: the token's start), and redactURL
// shows the path, token and all. Want: a load error (or at least a
// WARN), and nothing of the token shown.
func TestDestinationURLUserinfoWithASlash(t *testing.T) {
	for _, raw := range []string{"https://tok3n/secr3t@hooks.example.com/x", "http://user:12/pa55@hooks.example.com/"} {
		if err := checkDestinationURL(raw); err == nil {
			t.Errorf("a url whose userinfo holds an unescaped '/': accepted at load")
		}
		if shown := redactURL(raw); strings.Contains(shown, "secr3t") || strings.Contains(shown, "pa55") || strings.Contains(shown, "tok3n") {
			t.Errorf("redactURL shows %q", shown)
		}
	}
}
