// The mux_event request matcher: routes verified events by type.

package muxwebhook

import (
	"fmt"
	"net/http"
	"reflect"
	"strings"
	"unicode"

	"cel.dev/cel-go/cel"
	"cel.dev/cel-go/common/types/ref"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func init() {
	caddy.RegisterModule(MatchMuxEvent{})
}

// MatchMuxEvent matches requests whose Mux event, verified earlier in the
// same request by the mux_webhook handler, has a type that matches any of
// the patterns. In a pattern, `*` stands for any run of characters, dots
// included (`video.asset.*` matches `video.asset.static_renditions.ready`);
// everything else matches itself, case-sensitively. A request without a
// verified event never matches: the matcher never reads the body.
//
// Caddyfile: `mux_event <pattern>...`; repeated lines in one named matcher
// are merged.
type MatchMuxEvent []string

// CaddyModule returns the Caddy module information.
func (MatchMuxEvent) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.matchers.mux_event",
		New: func() caddy.Module { return new(MatchMuxEvent) },
	}
}

// Provision warns about patterns that match no known event type.
func (m MatchMuxEvent) Provision(ctx caddy.Context) error {
	lintPatterns(ctx.Logger(), m)
	return nil
}

// Validate rejects patterns that can never be meant: empty ones and ones
// containing white space.
func (m MatchMuxEvent) Validate() error {
	if len(m) == 0 {
		return fmt.Errorf("mux_event: at least one event type pattern is required")
	}
	for _, p := range m {
		if err := checkPattern(p); err != nil {
			return err
		}
	}
	return nil
}

func checkPattern(p string) error {
	if p == "" {
		return fmt.Errorf("mux_event: empty pattern; use * to match every event type")
	}
	if strings.IndexFunc(p, unicode.IsSpace) >= 0 {
		return fmt.Errorf("mux_event: pattern %q contains white space; event types never do", p)
	}
	return nil
}

// Match returns true if the request carries a verified event whose type
// matches one of the patterns.
func (m MatchMuxEvent) Match(r *http.Request) bool {
	ok, _ := m.MatchWithError(r)
	return ok
}

// MatchWithError is like Match; it never fails.
func (m MatchMuxEvent) MatchWithError(r *http.Request) (bool, error) {
	ev := EventFromRequest(r)
	if ev == nil {
		return false, nil
	}
	for _, p := range m {
		if globMatch(p, ev.Type) {
			return true, nil
		}
	}
	return false, nil
}

// CELLibrary makes the matcher available to `expression`:
//
//	expression mux_event('video.asset.*', 'video.upload.*')
func (MatchMuxEvent) CELLibrary(ctx caddy.Context) (cel.Library, error) {
	return caddyhttp.CELMatcherImpl(
		"mux_event",
		"mux_event_match_request_list",
		[]*cel.Type{cel.ListType(cel.StringType)},
		func(data ref.Val) (caddyhttp.RequestMatcherWithError, error) {
			list, err := data.ConvertToNative(reflect.TypeFor[[]string]())
			if err != nil {
				return nil, err
			}
			m := MatchMuxEvent(list.([]string))
			if err := m.Validate(); err != nil {
				return nil, err
			}
			return m, m.Provision(ctx)
		},
	)
}

// globMatch reports whether s matches pattern, where `*` matches any run of
// bytes. It runs in O(len(pattern)·len(s)) at worst, without recursion.
func globMatch(pattern, s string) bool {
	p, i := 0, 0
	starP, starI := -1, 0
	for i < len(s) {
		switch {
		case p < len(pattern) && pattern[p] == '*':
			starP, starI = p, i
			p++
		case p < len(pattern) && pattern[p] == s[i]:
			p++
			i++
		case starP >= 0:
			starI++
			p, i = starP+1, starI
		default:
			return false
		}
	}
	for p < len(pattern) && pattern[p] == '*' {
		p++
	}
	return p == len(pattern)
}

// Interface guards
var (
	_ caddyhttp.RequestMatcherWithError = (*MatchMuxEvent)(nil)
	_ caddyhttp.CELLibraryProducer      = (*MatchMuxEvent)(nil)
	_ caddy.Provisioner                 = (*MatchMuxEvent)(nil)
	_ caddy.Validator                   = (*MatchMuxEvent)(nil)
)
