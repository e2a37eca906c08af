package muxwebhook

import (
	"fmt"
	"net/http"
	"testing"
)

func newTestLog(size, body int) *liveLogState {
	l := &liveLogState{subs: map[chan LogEntry]struct{}{}}
	l.configure(size, body)
	return l
}

func TestLiveLogRingBounds(t *testing.T) {
	l := newTestLog(3, 10)
	for i := range 5 {
		l.add(LogEntry{ID: fmt.Sprint(i), Outcome: "verified", Type: "video.asset.ready"})
	}
	got := l.query("", "", 100)
	if len(got) != 3 || got[0].ID != "4" || got[2].ID != "2" || got[0].Seq != 5 {
		t.Fatalf("ring holds %+v, want the newest 3, newest first", got)
	}
	// Shrinking keeps the newest; growing keeps them all.
	l.configure(2, 10)
	if got := l.query("", "", 100); len(got) != 2 || got[0].ID != "4" || got[1].ID != "3" {
		t.Fatalf("after shrinking: %+v", got)
	}
	l.configure(10, 10)
	l.add(LogEntry{ID: "5"})
	if got := l.query("", "", 100); len(got) != 3 || got[0].ID != "5" {
		t.Fatalf("after growing: %+v", got)
	}
	// Size 0 turns it off.
	l.configure(0, 10)
	l.add(LogEntry{ID: "6"})
	if got := l.query("", "", 100); len(got) != 0 {
		t.Fatalf("log_size 0 still logs: %+v", got)
	}
}

func TestLiveLogQueryFilters(t *testing.T) {
	l := newTestLog(100, 10)
	for _, e := range []LogEntry{
		{Type: "video.asset.ready", Outcome: "verified"},
		{Type: "video.live_stream.active", Outcome: "verified"},
		{Type: "video.asset.created", Outcome: "duplicate"},
		{Outcome: "mismatch"},
	} {
		l.add(e)
	}
	tests := []struct {
		typ, outcome string
		limit, want  int
	}{
		{"", "", 100, 4},
		{"video.asset.*", "", 100, 2},
		{"", "verified", 100, 2},
		{"video.asset.*", "verified", 100, 1},
		{"", "mismatch", 100, 1},
		{"", "", 2, 2},
	}
	for _, tt := range tests {
		if got := l.query(tt.typ, tt.outcome, tt.limit); len(got) != tt.want {
			t.Errorf("query(%q, %q, %d) = %d entries, want %d", tt.typ, tt.outcome, tt.limit, len(got), tt.want)
		}
	}
}

func TestLiveLogSubscribers(t *testing.T) {
	l := newTestLog(10, 10)
	ch, ok := l.subscribe()
	if !ok {
		t.Fatal("subscribe refused")
	}
	// A subscriber that does not read misses entries instead of blocking.
	for range subscriberBuffer + 10 {
		l.add(LogEntry{})
	}
	if len(ch) != subscriberBuffer {
		t.Fatalf("subscriber holds %d entries, want %d", len(ch), subscriberBuffer)
	}
	l.unsubscribe(ch)
	var chans []chan LogEntry
	for range maxSubscribers {
		c, ok := l.subscribe()
		if !ok {
			t.Fatal("refused below the bound")
		}
		chans = append(chans, c)
	}
	if _, ok := l.subscribe(); ok {
		t.Fatalf("more than %d subscribers accepted", maxSubscribers)
	}
	for _, c := range chans {
		l.unsubscribe(c)
	}
}

func TestLoggedHeadersRedacts(t *testing.T) {
	h := http.Header{
		"Mux-Signature": {"t=1,v1=abc"},
		"Authorization": {"Bearer x"},
		"Cookie":        {"s=1"},
		"Content-Type":  {"application/json"},
		"X-Long":        {string(make([]byte, 2000))},
	}
	got := loggedHeaders(h)
	for _, name := range []string{"Mux-Signature", "Authorization", "Cookie"} {
		if v := got[name]; len(v) != 1 || v[0] != "[redacted]" {
			t.Errorf("%s = %v, want [redacted]", name, v)
		}
	}
	if got["Content-Type"][0] != "application/json" {
		t.Errorf("Content-Type = %v", got["Content-Type"])
	}
	if v := got["X-Long"]; len(v) != 1 || len(v[0]) > maxLoggedHeaderBytes+4 {
		t.Errorf("long header kept whole: %d bytes", len(v[0]))
	}
	for i := range 100 {
		h.Set(fmt.Sprintf("X-Extra-%d", i), "v")
	}
	if got := loggedHeaders(h); len(got) > maxLoggedHeaders {
		t.Errorf("%d headers kept, want at most %d", len(got), maxLoggedHeaders)
	}
}
