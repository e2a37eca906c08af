package muxwebhook

// Fuzz targets. Their seed corpora (the f.Add calls, and testdata/fuzz)
// run as ordinary tests; `go test -fuzz FuzzX` explores further.

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"
)

// FuzzDecodeEvent checks the hand-written scanner against encoding/json:
// a body is accepted as an event exactly when it is valid JSON whose top
// level is an object with a non-empty string "type".
func FuzzDecodeEvent(f *testing.F) {
	f.Add([]byte(sampleEvent))
	f.Add([]byte(`{"type":"video.asset.ready","data":{"a":[1,2.5e3,-0,true,false,null,"\u00e9\n"]}}`))
	f.Add([]byte(`{"type":"a","data":"\ud800"}`))
	f.Add([]byte(`{"type":1}`))
	f.Add([]byte(`[{"type":"a"}]`))
	f.Add([]byte(`{"type":"a",}`))
	f.Add([]byte(`{"type":"a"}x`))
	f.Add([]byte(`{"type":"a\"b\\c","x":"12345678\"9"}`))
	f.Add([]byte(benchPayload(2048)))
	f.Fuzz(func(t *testing.T, body []byte) {
		if bytes.Count(body, []byte("["))+bytes.Count(body, []byte("{")) >= maxJSONDepth {
			return // deeper than we accept; encoding/json allows more
		}
		ev, err := DecodeEvent(body)
		var top map[string]json.RawMessage
		stdErr := json.Unmarshal(body, &top)
		switch {
		case !json.Valid(body):
			if !errors.Is(err, ErrBadJSON) {
				t.Fatalf("invalid JSON %q: err = %v, want ErrBadJSON", body, err)
			}
		case stdErr != nil || top == nil:
			if !errors.Is(err, ErrBadJSON) {
				t.Fatalf("JSON that is not an object %q: err = %v", body, err)
			}
		default:
			var typ string
			typeOK := json.Unmarshal(top["type"], &typ) == nil && len(top["type"]) > 0 && top["type"][0] == '"' && typ != ""
			if typeOK != (err == nil) {
				t.Fatalf("%q: type ok=%v but err = %v", body, typeOK, err)
			}
			if err == nil && ev.Type != typ {
				t.Fatalf("%q: Type = %q, encoding/json says %q", body, ev.Type, typ)
			}
		}
	})
}

// FuzzParseSignature: no panic, and whatever parses verifies consistently.
func FuzzParseSignature(f *testing.F) {
	body := []byte(`{"type":"a"}`)
	f.Add(Sign([]byte("k"), body, time.Unix(1700000000, 0)))
	f.Add("t=1,v1=" + strings.Repeat("a", 64) + ",v1=zz,v0=1")
	f.Add(" , t = 2 ,\tv1=")
	f.Add("t=99999999999999999999,v1=00")
	f.Fuzz(func(t *testing.T, header string) {
		sig, err := ParseSignature(header)
		if err != nil {
			if Reason(err) == "" {
				t.Fatalf("%q: error without a reason: %v", header, err)
			}
			return
		}
		if !isTimestamp(sig.Timestamp) {
			t.Fatalf("%q: accepted t=%q", header, sig.Timestamp)
		}
		_, verr := Verify(header, body, [][]byte{[]byte("k")}, time.Unix(sig.Unix, 0), time.Minute)
		if verr != nil && !errors.Is(verr, ErrMismatch) {
			t.Fatalf("%q: parsed, then %v", header, verr)
		}
	})
}

// FuzzGlobMatch compares globMatch with a simple recursive definition.
func FuzzGlobMatch(f *testing.F) {
	f.Add("video.asset.*", "video.asset.ready")
	f.Add("*a*b", "xxaxxb")
	f.Add("a*", "")
	f.Fuzz(func(t *testing.T, pattern, s string) {
		if len(pattern) > 32 || len(s) > 64 {
			return
		}
		if got, want := globMatch(pattern, s), globReference(pattern, s); got != want {
			t.Fatalf("globMatch(%q, %q) = %v, want %v", pattern, s, got, want)
		}
	})
}

// globReference is the textbook dynamic-programming matcher:
// match[i][j] says whether p[i:] matches s[j:]. It is independent of
// globMatch's backtracking, and polynomial even for many stars.
func globReference(p, s string) bool {
	match := make([][]bool, len(p)+1)
	for i := range match {
		match[i] = make([]bool, len(s)+1)
	}
	match[len(p)][len(s)] = true
	for i := len(p) - 1; i >= 0; i-- {
		for j := len(s); j >= 0; j-- {
			if p[i] == '*' {
				match[i][j] = match[i+1][j] || (j < len(s) && match[i][j+1])
			} else {
				match[i][j] = j < len(s) && p[i] == s[j] && match[i+1][j+1]
			}
		}
	}
	return match[0][0]
}

// FuzzDataPath: lookups never panic and agree with encoding/json on
// whether a path exists.
func FuzzDataPath(f *testing.F) {
	f.Add(`{"a":{"b":[1,{"c":"x"}]}}`, "a.b.1.c")
	f.Add(`{"a":[0,1,2]}`, "a.2")
	f.Add(`{"a":"s"}`, "a.0")
	f.Add(`[1]`, "0")
	f.Fuzz(func(t *testing.T, data, path string) {
		if !json.Valid([]byte(data)) || path == "" {
			return
		}
		ev := &Event{Data: []byte(data)}
		got, ok := ev.DataValue(path)
		var v any
		if err := json.Unmarshal([]byte(data), &v); err != nil {
			return
		}
		want, wantOK := referenceLookup(v, strings.Split(path, "."))
		if ok != wantOK {
			t.Fatalf("DataValue(%s, %q) found=%v, reference %v", data, path, ok, wantOK)
		}
		if ok {
			if s, isStr := want.(string); isStr && got != s {
				t.Fatalf("DataValue(%s, %q) = %q, want %q", data, path, got, s)
			}
		}
	})
}

func referenceLookup(v any, path []string) (any, bool) {
	for _, step := range path {
		switch x := v.(type) {
		case map[string]any:
			next, ok := x[step]
			if !ok {
				return nil, false
			}
			v = next
		case []any:
			i := 0
			if step == "" || (len(step) > 1 && step[0] == '0') {
				return nil, false
			}
			for _, c := range step {
				if c < '0' || c > '9' {
					return nil, false
				}
				i = i*10 + int(c-'0')
				if i > len(x) {
					return nil, false
				}
			}
			if i >= len(x) {
				return nil, false
			}
			v = x[i]
		default:
			return nil, false
		}
	}
	return v, true
}
