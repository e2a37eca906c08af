package muxwebhook

import (
	"encoding/json"
	"errors"
	"reflect"
	"testing"
)

const sampleEvent = `{
  "type": "video.asset.ready",
  "object": {"type": "asset", "id": "asset123"},
  "id": "3a56ac3d-33da-4366-855b-f592d898409d",
  "environment": {"name": "Production", "id": "env42"},
  "data": {
    "status": "ready",
    "playback_ids": [{"policy": "public", "id": "play1"}, {"policy": "signed", "id": "play2"}],
    "passthrough": "order-7",
    "duration": 23.5,
    "tracks": [ {"type": "video", "max_width": 1920} ],
    "nested": {"a\u002eb": true, "esc": "line\nbreak \u00e9"}
  },
  "created_at": "2024-01-01T00:00:00.000000Z",
  "attempts": [{"id": "x"}, {"id": "y"}],
  "accessor_source": null
}`

func TestDecodeEvent(t *testing.T) {
	ev, err := DecodeEvent([]byte(sampleEvent))
	if err != nil {
		t.Fatal(err)
	}
	want := Event{
		Type: "video.asset.ready", ID: "3a56ac3d-33da-4366-855b-f592d898409d",
		CreatedAt: "2024-01-01T00:00:00.000000Z", ObjectType: "asset", ObjectID: "asset123",
		EnvironmentID: "env42", EnvironmentName: "Production", Attempts: 2,
	}
	got := *ev
	got.Body, got.Data, got.IDRaw = nil, nil, nil
	if !reflect.DeepEqual(got, want) {
		t.Errorf("decoded\n %+v\nwant\n %+v", got, want)
	}
	if string(ev.IDRaw) != `"3a56ac3d-33da-4366-855b-f592d898409d"` {
		t.Errorf("IDRaw = %s", ev.IDRaw)
	}
	if string(ev.Body) != sampleEvent {
		t.Error("Body is not the input")
	}
}

func TestDecodeEventErrors(t *testing.T) {
	tests := []struct {
		body string
		want error
	}{
		{``, ErrBadJSON},
		{`   `, ErrBadJSON},
		{`null`, ErrBadJSON},
		{`[]`, ErrBadJSON},
		{`"video.asset.ready"`, ErrBadJSON},
		{`{"type":"a"} {}`, ErrBadJSON},
		{`{"type":"a",}`, ErrBadJSON},
		{`{"type":"a"`, ErrBadJSON},
		{`{"type":"a","data":{"x":01}}`, ErrBadJSON},
		{`{"type":"a","data":"` + "\x01" + `"}`, ErrBadJSON},
		{`{"type":"a","data":"\x"}`, ErrBadJSON},
		{`{"type":"a","data":[1,]}`, ErrBadJSON},
		{`{'type':'a'}`, ErrBadJSON},
		{`{}`, ErrNoType},
		{`{"type":""}`, ErrNoType},
		{`{"type":1}`, ErrNoType},
		{`{"type":null}`, ErrNoType},
		{`{"type":["a"]}`, ErrNoType},
		{`{"Type":"a"}`, ErrNoType},
		{`{"type":"a","type":2}`, ErrNoType}, // the last duplicate wins, as in JSON.parse
	}
	for _, tt := range tests {
		_, err := DecodeEvent([]byte(tt.body))
		if !errors.Is(err, tt.want) {
			t.Errorf("DecodeEvent(%q) = %v, want %v", tt.body, err, tt.want)
		}
	}
}

func TestDecodeEventEdgeCases(t *testing.T) {
	tests := []struct {
		body     string
		typ      string
		attempts int
	}{
		{`{"type":"video.asset.ready"}`, "video.asset.ready", 0},
		{` {"type" : "a" } `, "a", 0},
		{`{"\u0074ype":"esc\u0061ped"}`, "escaped", 0},
		{`{"type":2,"type":"b"}`, "b", 0},
		{"{\"type\":\"a\x80\x80b\"}", "a\uFFFD\uFFFDb", 0}, // invalid UTF-8, as encoding/json reads it
		{`{"type":"a","attempts":[]}`, "a", 0},
		{`{"type":"a","attempts":[1,[2,3],{"x":[]}]}`, "a", 3},
		{`{"type":"a","attempts":"three"}`, "a", 0},
		{`{"type":"new.type.from.the.future","data":{"deep":[[[[{}]]]]}}`, "new.type.from.the.future", 0},
	}
	for _, tt := range tests {
		ev, err := DecodeEvent([]byte(tt.body))
		if err != nil {
			t.Errorf("DecodeEvent(%q): %v", tt.body, err)
			continue
		}
		if ev.Type != tt.typ || ev.Attempts != tt.attempts {
			t.Errorf("DecodeEvent(%q) = type %q attempts %d, want %q %d", tt.body, ev.Type, ev.Attempts, tt.typ, tt.attempts)
		}
	}
}

func TestDataValue(t *testing.T) {
	ev, err := DecodeEvent([]byte(sampleEvent))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		path, want string
		ok         bool
	}{
		{"passthrough", "order-7", true},
		{"status", "ready", true},
		{"playback_ids.0.id", "play1", true},
		{"playback_ids.1.policy", "signed", true},
		{"playback_ids.2.id", "", false},
		{"playback_ids.01.id", "", false},
		{"playback_ids.-1.id", "", false},
		{"playback_ids.+1.id", "", false},
		{"playback_ids.-0.id", "", false},
		{"playback_ids.x", "", false},
		{"duration", "23.5", true},
		{"tracks", `[{"type":"video","max_width":1920}]`, true},
		{"tracks.0", `{"type":"video","max_width":1920}`, true},
		{"tracks.0.max_width", "1920", true},
		{"nested.a.b", "", false},
		{"nested.esc", "line\nbreak é", true},
		{"missing", "", false},
		{"passthrough.deeper", "", false},
		{"", "", false},
	}
	for _, tt := range tests {
		got, ok := ev.DataValue(tt.path)
		if got != tt.want || ok != tt.ok {
			t.Errorf("DataValue(%q) = %q, %v; want %q, %v", tt.path, got, ok, tt.want, tt.ok)
		}
	}
	if v, ok := (&Event{}).DataValue("x"); ok || v != "" {
		t.Errorf("event without data: DataValue = %q, %v", v, ok)
	}
}

// TestScannerAgreesWithEncodingJSON checks the hand-written validator
// against the standard library on valid and invalid documents.
func TestScannerAgreesWithEncodingJSON(t *testing.T) {
	docs := []string{
		`{}`, `{"a":1}`, `{"a":-0.5e+10}`, `{"a":1E5}`, `{"a":-}`, `{"a":1.}`, `{"a":.5}`,
		`{"a":01}`, `{"a":-01}`, `{"a":0}`, `{"a":true,"b":false,"c":null}`, `{"a":tru}`,
		`{"a":nul}`, `{"a":"\u12"}`, `{"a":"\uZZZZ"}`, `{"a":"\ud83d\ude00"}`, `{"a":"\/"}`,
		`{"a":"` + "\t" + `"}`, `{"a":"é"}`, `{"a":[]}`, `{"a":[,]}`, `{"a":[1 2]}`,
		`{"a":{"b":{"c":[1,{"d":"e"}]}}}`, `{"a" "b"}`, `{"a":1 "b":2}`, `{1:2}`,
		"{\"a\":1}\n", `{"a":1}x`, `{"a":"b\"c"}`, `{"a":"b\\"}`, `{"a":"b\\\"}`,
		`{"a":1e}`, `{"a":1e+}`, `{"a":--1}`, `{"a":+1}`, `{"a":Infinity}`, `{"a":NaN}`,
	}
	for _, d := range docs {
		s := jsonScanner{b: []byte(d)}
		var err error
		if s.peek() == '{' {
			err = s.object(nil)
			if err == nil {
				err = s.end()
			}
		} else {
			err = errSyntax
		}
		ours := err == nil
		if std := json.Valid([]byte(d)); ours != std {
			t.Errorf("%q: scanner valid=%v, encoding/json valid=%v", d, ours, std)
		}
	}
}

func TestDepthBound(t *testing.T) {
	deep := `{"type":"a","data":` + repeat("[", maxJSONDepth+10) + repeat("]", maxJSONDepth+10) + `}`
	if _, err := DecodeEvent([]byte(deep)); !errors.Is(err, ErrBadJSON) {
		t.Fatalf("nesting beyond %d: err = %v, want ErrBadJSON", maxJSONDepth, err)
	}
	ok := `{"type":"a","data":` + repeat("[", 100) + repeat("]", 100) + `}`
	if _, err := DecodeEvent([]byte(ok)); err != nil {
		t.Fatalf("nesting of 100: %v", err)
	}
}

func repeat(s string, n int) string {
	b := make([]byte, 0, len(s)*n)
	for range n {
		b = append(b, s...)
	}
	return string(b)
}
