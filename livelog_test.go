package muxwebhook

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"
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
	got := l.query(logFilter{}, 100)
	if len(got) != 3 || got[0].ID != "4" || got[2].ID != "2" || got[0].Seq != 5 {
		t.Fatalf("ring holds %+v, want the newest 3, newest first", got)
	}
	// Shrinking keeps the newest; growing keeps them all.
	l.configure(2, 10)
	if got := l.query(logFilter{}, 100); len(got) != 2 || got[0].ID != "4" || got[1].ID != "3" {
		t.Fatalf("after shrinking: %+v", got)
	}
	l.configure(10, 10)
	l.add(LogEntry{ID: "5"})
	if got := l.query(logFilter{}, 100); len(got) != 3 || got[0].ID != "5" {
		t.Fatalf("after growing: %+v", got)
	}
	// Size 0 turns it off.
	l.configure(0, 10)
	l.add(LogEntry{ID: "6"})
	if got := l.query(logFilter{}, 100); len(got) != 0 {
		t.Fatalf("log_size 0 still logs: %+v", got)
	}
}

func TestLiveLogQueryFilters(t *testing.T) {
	l := newTestLog(100, 10)
	for _, e := range []LogEntry{
		{Type: "video.asset.ready", Outcome: "verified", ID: "ev-1", ObjectID: "as-1"},
		{Type: "video.live_stream.active", Outcome: "verified", ID: "ev-2", ObjectID: "ls-1"},
		{Type: "video.asset.created", Outcome: "duplicate", ID: "ev-3", ObjectID: "as-1"},
		{Outcome: "mismatch"},
		{Type: "video.asset.ready", Outcome: "retry", ID: "ev-1", Destination: "app", Attempt: 1},
		{Type: "video.asset.ready", Outcome: "delivered", ID: "ev-1", Destination: "app", Attempt: 2},
	} {
		l.add(e)
	}
	tests := []struct {
		f           logFilter
		limit, want int
	}{
		{logFilter{}, 100, 6},
		{logFilter{Type: "video.asset.*"}, 100, 4},
		{logFilter{Outcome: "verified"}, 100, 2},
		{logFilter{Type: "video.asset.*", Outcome: "verified"}, 100, 1},
		{logFilter{Outcome: "mismatch"}, 100, 1},
		{logFilter{}, 2, 2},
		{logFilter{ID: "ev-1"}, 100, 3}, // the request and its two delivery attempts
		{logFilter{ID: "ev"}, 100, 0},   // ids match exactly
		{logFilter{ID: "ev-1", Outcome: "retry"}, 100, 1},
		{logFilter{ObjectID: "as-1"}, 100, 2},
		{logFilter{ObjectID: "as-1", Type: "video.asset.created"}, 100, 1},
	}
	for _, tt := range tests {
		if got := l.query(tt.f, tt.limit); len(got) != tt.want {
			t.Errorf("query(%+v, %d) = %d entries, want %d", tt.f, tt.limit, len(got), tt.want)
		}
	}
}

// TestLiveLogSubscribeAfter: a client resuming after a sequence number
// gets what the ring still holds after it, then new entries on its
// channel, with no gap and no repeat; what the ring dropped is counted.
func TestLiveLogSubscribeAfter(t *testing.T) {
	seqs := func(es []LogEntry) []uint64 {
		out := []uint64{}
		for _, e := range es {
			out = append(out, e.Seq)
		}
		return out
	}
	u := func(n uint64) *uint64 { return &n }
	for _, c := range []struct {
		name   string
		after  *uint64
		want   []uint64
		missed uint64
	}{
		{"no Last-Event-ID: live entries only", nil, []uint64{}, 0},
		{"up to date", u(8), []uint64{}, 0},
		{"two behind", u(6), []uint64{7, 8}, 0},
		{"exactly at the ring's start", u(3), []uint64{4, 5, 6, 7, 8}, 0},
		{"older than the ring", u(1), []uint64{4, 5, 6, 7, 8}, 2},
		{"from the start", u(0), []uint64{4, 5, 6, 7, 8}, 3},
		{"from before a restart", u(1000), []uint64{4, 5, 6, 7, 8}, 3},
	} {
		l := newTestLog(5, 10)
		for i := range 8 { // seqs 1..8; the ring holds 4..8
			l.add(LogEntry{ID: fmt.Sprint(i + 1)})
		}
		ch, backlog, missed, ok := l.subscribeAfter(c.after)
		if !ok {
			t.Fatalf("%s: refused", c.name)
		}
		if got := seqs(backlog); fmt.Sprint(got) != fmt.Sprint(c.want) || missed != c.missed {
			t.Errorf("%s: backlog %v, missed %d; want %v, missed %d", c.name, got, missed, c.want, c.missed)
		}
		l.add(LogEntry{ID: "next"})
		if e := <-ch; e.ID != "next" || len(ch) != 0 {
			t.Errorf("%s: after the backlog the channel has %+v and %d more", c.name, e, len(ch))
		}
		l.unsubscribe(ch)
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

// TestLiveLogEntriesDoNotPinBodies: the decoded event's strings point into
// the request body; a live log entry must not keep that body alive. 500
// entries made from 256 KiB bodies with log_body 16 KiB keep about
// 500 x 16 KiB of body text, not the 128 MiB of bodies.
func TestLiveLogEntriesDoNotPinBodies(t *testing.T) {
	const entries, bodySize, logBody = 500, 256 << 10, 16 << 10
	l := newTestLog(entries, logBody)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for i := range entries {
		body := event("video.asset.ready", fmt.Sprintf("pin-%d", i), `{"passthrough":"`+strings.Repeat("p", bodySize)+`"}`)
		ev, err := DecodeEvent(body)
		if err != nil {
			t.Fatal(err)
		}
		rec := &result{start: time.Now(), outcome: OutcomeVerified, status: 200, event: ev, body: body}
		l.add(newLogEntry(httptest.NewRequest(http.MethodPost, "/mux", nil), rec, time.Millisecond, logBody))
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	retained := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	if total := int64(entries * bodySize); retained > total/4 {
		t.Errorf("%d entries retain %d MiB of heap; their bodies total %d MiB, the entries need about %d MiB",
			entries, retained>>20, total>>20, entries*logBody>>20)
	}
	got := l.query(logFilter{}, 1)
	if len(got) != 1 || got[0].ID != fmt.Sprintf("pin-%d", entries-1) || got[0].ObjectID != "obj-"+got[0].ID ||
		got[0].Type != "video.asset.ready" || got[0].EnvironmentID != "env-1" || len(got[0].Body) != logBody || !got[0].BodyTruncated {
		t.Errorf("newest entry: %+v", got[0])
	}
	runtime.KeepAlive(l)
}

// TestLiveLogCutsLongFields: an entry keeps at most maxLoggedFieldBytes of
// each text field, marked as cut, valid UTF-8, whatever the request sent.
func TestLiveLogCutsLongFields(t *testing.T) {
	l := newTestLog(10, 64)
	l.add(LogEntry{
		Type:     "video.asset.ready",
		ID:       strings.Repeat("i", 500<<10),
		ObjectID: strings.Repeat("é", maxLoggedFieldBytes), // 2 bytes each: cut mid-character
		URI:      "/mux?" + strings.Repeat("q", 100<<10),
		Body:     strings.Repeat("b", 1000), // larger than log_body: cut too
	})
	e := l.query(logFilter{}, 1)[0]
	if e.Type != "video.asset.ready" {
		t.Errorf("short field changed: %q", e.Type)
	}
	for name, v := range map[string]string{"id": e.ID, "object_id": e.ObjectID, "uri": e.URI} {
		if len(v) > maxLoggedFieldBytes+len(cutMark) || !strings.HasSuffix(v, cutMark) || !utf8.ValidString(v) {
			t.Errorf("%s: %d bytes, cut mark %v, valid UTF-8 %v; want at most %d bytes plus %q",
				name, len(v), strings.HasSuffix(v, cutMark), utf8.ValidString(v), maxLoggedFieldBytes, cutMark)
		}
	}
	if len(e.Body) != 64 || !e.BodyTruncated {
		t.Errorf("body of %d bytes (truncated %v), want log_body=64", len(e.Body), e.BodyTruncated)
	}
}

// TestLoggedHeadersCopies: handlers that run after the entry is made
// (request_header in handle_errors) edit the request's header values in
// place; the entry must not see that, nor race with it (run with -race).
func TestLoggedHeadersCopies(t *testing.T) {
	h := http.Header{"X-Probe": {"before"}, "Content-Type": {"application/json"}}
	logged := loggedHeaders(h)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // a stream marshalling the entry meanwhile
		defer wg.Done()
		for range 100 {
			if _, err := json.Marshal(logged); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	for i := range 100 {
		h["X-Probe"][0] = fmt.Sprint("after-", i)
		h["Content-Type"][0] = "text/plain"
	}
	wg.Wait()
	if v := logged["X-Probe"]; len(v) != 1 || v[0] != "before" {
		t.Errorf("X-Probe logged as %q, want what was sent: before", v)
	}
	if v := logged["Content-Type"]; len(v) != 1 || v[0] != "application/json" {
		t.Errorf("Content-Type logged as %q", v)
	}
}
