package queue

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/internal/testwait"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// prefixMatch is a stand-in for mux_event's glob in these tests: a
// trailing '*' only.
func prefixMatch(pattern string) func(string) bool {
	return func(typ string) bool {
		if p, ok := strings.CutSuffix(pattern, "*"); ok {
			return strings.HasPrefix(typ, p)
		}
		return typ == pattern
	}
}

func openHistoryTest(t *testing.T) (*Store, *History) {
	t.Helper()
	s := openTest(t, Config{Dir: t.TempDir()})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	h, err := s.OpenHistory(ctx, HistoryConfig{Instance: "test", TypeMatcher: prefixMatch})
	if err != nil {
		s.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close(); s.Close() })
	return s, h
}

// search runs f until it returns want events (the writes are async), at
// most 5s.
func search(t *testing.T, h *History, f HistoryFilter, want int) ([]HistoryEvent, uint64) {
	t.Helper()
	if f.Type != "" {
		f.Match = prefixMatch(f.Type)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		got, next, err := h.Search(context.Background(), f)
		if err != nil {
			t.Fatal(err)
		}
		if len(got) == want || time.Now().After(deadline) {
			if len(got) != want {
				t.Fatalf("search %+v: %d events, want %d", f, len(got), want)
			}
			return got, next
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestHistorySearchFilters: each filter returns its subset, newest first,
// from the subject index; paging with next_before walks the rest; the
// body and the attempts come with Get.
func TestHistorySearchFilters(t *testing.T) {
	_, h := openHistoryTest(t)
	start := time.Now()
	types := []string{"video.asset.created", "video.asset.ready", "video.live_stream.active"}
	for i := range 30 {
		outcome := "verified"
		if i%5 == 4 {
			outcome = "duplicate"
		}
		h.RecordEvent(EventRecord{Time: time.Now(), Outcome: outcome, Type: types[i%3], ID: fmt.Sprintf("ev-%d", i),
			ObjectType: "asset", ObjectID: fmt.Sprintf("obj-%d", i%4), Status: 202, Body: fmt.Appendf(nil, `{"id":"ev-%d"}`, i)})
	}
	h.RecordAttempt(Attempt{Destination: "app", EventID: "ev-7", Number: 1, Status: 500, Err: errors.New("HTTP 500"), Result: "retry", Duration: 3 * time.Millisecond})
	h.RecordAttempt(Attempt{Destination: "app", EventID: "ev-7", Number: 2, Status: 200, Result: "delivered", Duration: 2 * time.Millisecond})
	all, _ := search(t, h, HistoryFilter{}, 30)
	for i := 1; i < len(all); i++ {
		if all[i].Seq >= all[i-1].Seq {
			t.Fatalf("not newest first: %d then %d", all[i-1].Seq, all[i].Seq)
		}
	}
	if all[0].ID != "ev-29" || all[0].Type != types[29%3] || all[0].ObjectID != "obj-1" || all[0].Status != 202 || all[0].Outcome != "duplicate" {
		t.Fatalf("newest: %+v", all[0])
	}
	got, _ := search(t, h, HistoryFilter{Type: "video.asset.*"}, 20)
	for _, e := range got {
		if !strings.HasPrefix(e.Type, "video.asset.") {
			t.Fatalf("type filter let %s through", e.Type)
		}
	}
	search(t, h, HistoryFilter{Type: "video.asset.ready"}, 10)
	got, _ = search(t, h, HistoryFilter{Object: "obj-2"}, 7)
	for _, e := range got {
		if e.ObjectID != "obj-2" {
			t.Fatalf("object filter let %s through", e.ObjectID)
		}
	}
	got, _ = search(t, h, HistoryFilter{ID: "ev-7"}, 1)
	if len(got[0].Attempts) != 2 || got[0].Attempts[0].Status != 500 || got[0].Attempts[1].Result != "delivered" {
		t.Fatalf("ev-7's attempts: %+v", got[0].Attempts)
	}
	search(t, h, HistoryFilter{Outcome: "duplicate"}, 6)
	search(t, h, HistoryFilter{Since: time.Now().Add(time.Hour)}, 0)
	search(t, h, HistoryFilter{Since: start.Add(-time.Second), Until: start.Add(-time.Millisecond)}, 0)
	search(t, h, HistoryFilter{Until: time.Now().Add(time.Hour), Outcome: "verified", Type: "video.live_stream.*"}, 8)

	// Paging: 30 events by 12.
	var seen []uint64
	before := uint64(0)
	for page := 0; ; page++ {
		got, next, err := h.Search(context.Background(), HistoryFilter{Limit: 12, Before: before})
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range got {
			seen = append(seen, e.Seq)
		}
		if next == 0 {
			break
		}
		if page > 5 {
			t.Fatal("paging does not end")
		}
		before = next
	}
	if len(seen) != 30 {
		t.Fatalf("paging saw %d events, want 30", len(seen))
	}

	ev, err := h.Get(context.Background(), got[0].Seq)
	if err != nil || ev.Body != fmt.Sprintf(`{"id":%q}`, ev.ID) {
		t.Fatalf("Get: %+v, %v", ev, err)
	}
	if _, err := h.Get(context.Background(), 1<<40); !errors.Is(err, ErrHistoryNotFound) {
		t.Fatalf("Get of nothing: %v", err)
	}
}

// TestHistoryReplay: a job queues one copy per matching event id (its
// latest record), oldest first, marked with the job; a dry run only
// counts; the job's state says done.
func TestHistoryReplay(t *testing.T) {
	s, h := openHistoryTest(t)
	for i := range 20 {
		typ := "video.asset.ready"
		if i%2 == 1 {
			typ = "video.live_stream.idle"
		}
		h.RecordEvent(EventRecord{Time: time.Now(), Outcome: "verified", Type: typ, ID: fmt.Sprintf("ev-%d", i), ObjectID: "obj", Status: 202, Body: fmt.Appendf(nil, `{"id":"ev-%d"}`, i)})
	}
	// A duplicate of ev-0: replayed once.
	h.RecordEvent(EventRecord{Time: time.Now(), Outcome: "duplicate", Type: "video.asset.ready", ID: "ev-0", ObjectID: "obj", Status: 200, Body: []byte(`{"id":"ev-0"}`)})
	search(t, h, HistoryFilter{}, 21)
	f := HistoryFilter{Type: "video.asset.*", Match: prefixMatch("video.asset.*")}
	dry, err := h.Replay(context.Background(), "app", f, true)
	if err != nil || dry.Matched != 10 || dry.Job != "" {
		t.Fatalf("dry run: %+v, %v", dry, err)
	}
	if n := pending(t, s, "app"); n != 0 {
		t.Fatalf("a dry run queued %d", n)
	}
	job, err := h.Replay(context.Background(), "app", f, false)
	if err != nil || job.Matched != 10 || job.Job == "" {
		t.Fatalf("replay: %+v, %v", job, err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err := h.ReplayStatus(context.Background(), job.Job)
		if err != nil {
			t.Fatal(err)
		}
		if st.Done {
			if st.State != "done" || st.Queued != 10 || st.Expired != 0 {
				t.Fatalf("job: %+v", st)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("job not done: %+v", st)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if n := pending(t, s, "app"); n != 10 {
		t.Fatalf("queued %d copies, want 10", n)
	}
	// Oldest first, each marked with the job, on the object's subject.
	p := s.configured()[partitionOf(Key("obj", nil), len(s.configured()))]
	cons, err := p.stream.OrderedConsumer(context.Background(), jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for range 10 {
		m, err := cons.Next(jetstream.FetchMaxWait(2 * time.Second))
		if err != nil {
			t.Fatal(err)
		}
		if m.Headers().Get(HeaderReplay) != job.Job {
			t.Fatalf("copy without the job's mark: %v", m.Headers())
		}
		ids = append(ids, m.Headers().Get(HeaderEventID))
	}
	if want := "ev-2 ev-4 ev-6 ev-8 ev-10 ev-12 ev-14 ev-16 ev-18 ev-0"; strings.Join(ids, " ") != want {
		t.Fatalf("order: %v, want %s (ev-0's latest record is the duplicate)", ids, want)
	}
	// A second job queues them again (the dedupe window is bypassed).
	job2, err := h.Replay(context.Background(), "app", HistoryFilter{ID: "ev-4"}, false)
	if err != nil || job2.Matched != 1 {
		t.Fatalf("second job: %+v, %v", job2, err)
	}
	for deadline := time.Now().Add(5 * time.Second); pending(t, s, "app") != 11; {
		if time.Now().After(deadline) {
			t.Fatalf("the second job's copy: %d queued, want 11", pending(t, s, "app"))
		}
		time.Sleep(50 * time.Millisecond)
	}
	if _, err := h.ReplayStatus(context.Background(), "nope"); !errors.Is(err, ErrReplayNotFound) {
		t.Fatalf("unknown job: %v", err)
	}
}

// TestHistoryStats: the minutes' summaries sum events by outcome and
// attempts by destination, with quantiles of their durations.
func TestHistoryStats(t *testing.T) {
	_, h := openHistoryTest(t)
	now := time.Now()
	for i := range 10 {
		h.RecordEvent(EventRecord{Time: now, Outcome: "verified", Type: "video.asset.ready", ID: fmt.Sprint(i), Status: 202, Body: []byte("{}")})
		h.RecordAttempt(Attempt{Destination: "app", EventID: fmt.Sprint(i), Number: 1, Status: 200, Result: "delivered", Duration: time.Duration(i+1) * time.Millisecond})
	}
	h.RecordAttempt(Attempt{Destination: "app", EventID: "x", Number: 1, Status: 500, Result: "retry", Duration: time.Second})
	h.flushMinute(true) // written now, not at the minute's end
	st, err := h.Stats(context.Background(), now.Add(-time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	var events uint64
	for _, m := range st.Minutes {
		events += m.Outcomes["verified"]
	}
	var delivered, retry uint64
	var p99 float64
	for _, m := range st.Destinations["app"] {
		delivered += m.Delivered
		retry += m.Retry
		p99 = max(p99, m.P99MS)
	}
	if events != 10 || delivered != 10 || retry != 1 || p99 < 1000 {
		t.Fatalf("stats: %d events, %d delivered, %d retry, p99 %.1f ms: %+v", events, delivered, retry, p99, st)
	}
}

// TestHistoryNeverBlocks: with the writer's buffer full, records are
// dropped and counted, not waited for.
func TestHistoryNeverBlocks(t *testing.T) {
	core, logs := observer.New(zapcore.WarnLevel)
	s := openTest(t, Config{Dir: t.TempDir(), Logger: zap.New(core)})
	h, err := s.OpenHistory(context.Background(), HistoryConfig{Instance: "test"})
	if err != nil {
		s.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close(); s.Close() })
	body := make([]byte, 1<<20)
	for range 200 { // 200 MiB offered, more than the buffer's 64 MiB
		h.RecordEvent(EventRecord{Time: time.Now(), Outcome: "verified", Type: "video.asset.ready", ID: "x", Status: 202, Body: body})
	}
	if h.Dropped() == 0 {
		t.Fatal("nothing dropped with 200 MiB offered at once")
	}
	// The operator sees it: one WARN (at most one a minute), and the count.
	warned := logs.FilterMessageSnippet("records could not be written").All()
	if len(warned) != 1 {
		t.Fatalf("%d WARN lines for %d records dropped, want 1", len(warned), h.Dropped())
	}
}

// BenchmarkHistorySearch: searches over 100 000 stored events (2 KiB
// bodies, 1 000 objects, 4 types, one attempt each), each filter as the
// admin API asks it: what one search takes. With -benchtime=1x (the
// test suite's smoke run) the store holds 2 000 events.
func BenchmarkHistorySearch(b *testing.B) {
	n := 100_000
	if testing.Short() || benchSmoke() {
		n = 2_000
	}
	s, err := Open(context.Background(), Config{Dir: b.TempDir()})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	h, err := s.OpenHistory(context.Background(), HistoryConfig{Instance: "bench", TypeMatcher: prefixMatch})
	if err != nil {
		b.Fatal(err)
	}
	defer h.Close()
	types := []string{"video.asset.created", "video.asset.ready", "video.live_stream.active", "video.upload.created"}
	body := make([]byte, 2048)
	start := time.Now()
	for i := range n {
		for h.queued.Load() > historyBufferBytes/2 || len(h.queue) > historyBufferRecords/2 { // the writer's pace, not a drop
			time.Sleep(time.Millisecond)
		}
		id := fmt.Sprintf("ev-%06d", i)
		h.RecordEvent(EventRecord{Time: time.Now(), Outcome: "verified", Type: types[i%4], ID: id,
			ObjectType: "asset", ObjectID: fmt.Sprintf("obj-%d", i%1000), Status: 202, Body: body})
		h.RecordAttempt(Attempt{Destination: "app", EventID: id, Number: 1, Status: 200, Result: "delivered", Duration: time.Millisecond})
	}
	for deadline := time.Now().Add(2 * time.Minute); ; {
		st, _ := s.js.Stream(context.Background(), h.name)
		if st != nil && st.CachedInfo().State.Msgs >= uint64(2*n) {
			break
		}
		if time.Now().After(deadline) || h.Dropped() > 0 {
			var msgs uint64
			if st != nil {
				msgs = st.CachedInfo().State.Msgs
			}
			b.Fatalf("the store holds %d records of %d written (%d dropped)", msgs, 2*n, h.Dropped())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if h.Dropped() > 0 {
		b.Fatalf("%d records dropped while filling", h.Dropped())
	}
	b.Logf("%d events and %d attempts written in %v", n, n, time.Since(start).Round(time.Millisecond))
	middle := time.Now().Add(-time.Since(start) / 2)
	for _, bc := range []struct {
		name string
		f    HistoryFilter
	}{
		{"newest-100", HistoryFilter{}},
		{"type-glob", HistoryFilter{Type: "video.live_stream.*"}},
		{"object", HistoryFilter{Object: "obj-7"}},
		{"id", HistoryFilter{ID: "ev-000042"}},
		{"object-since-half", HistoryFilter{Object: "obj-7", Since: middle}},
		{"nothing-matches", HistoryFilter{ID: "no-such-event"}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			f := bc.f
			if f.Type != "" {
				f.Match = prefixMatch(f.Type)
			}
			var got int
			for b.Loop() {
				events, _, err := h.Search(context.Background(), f)
				if err != nil {
					b.Fatal(err)
				}
				got = len(events)
			}
			b.ReportMetric(float64(got), "events")
		})
	}
}

// benchSmoke reports whether benchmarks run once each (-benchtime=1x, the
// test suite's smoke run): then a small store will do.
func benchSmoke() bool {
	f := flag.Lookup("test.benchtime")
	return f != nil && f.Value.String() == "1x"
}

// TestHistoryOddTypesAndIDs: a type with tokens a subject cannot hold
// keeps its valid leading tokens, so a glob's prefix still finds it; an id
// with spaces and line breaks at its ends is found by id, with the
// attempts its copy's (trimmed) header reported.
func TestHistoryOddTypesAndIDs(t *testing.T) {
	_, h := openHistoryTest(t)
	for i, typ := range []string{"video.asset.", "video.asset.a b", "video..ready", "video.asset.*", "video.asset.>", strings.Repeat("video.", 20) + "x"} {
		h.RecordEvent(EventRecord{Time: time.Now(), Outcome: "verified", Type: typ, ID: fmt.Sprint("odd-", i), Status: 202, Body: []byte("{}")})
	}
	h.RecordEvent(EventRecord{Time: time.Now(), Outcome: "verified", Type: "video.asset.ready", ID: " X\n", ObjectID: "\tobj ", Status: 202, Body: []byte("{}")})
	h.RecordAttempt(Attempt{Destination: "app", EventID: "X", Number: 1, Status: 200, Result: "delivered"})
	search(t, h, HistoryFilter{Type: "video.*"}, 7)
	search(t, h, HistoryFilter{Type: "video.asset.*"}, 5)
	got, _ := search(t, h, HistoryFilter{ID: " X\n"}, 1)
	if len(got[0].Attempts) != 1 {
		t.Fatalf("attempts of the id with odd ends: %+v", got[0])
	}
	search(t, h, HistoryFilter{ID: "X"}, 1)
	search(t, h, HistoryFilter{Object: "obj"}, 1)
}

// TestHistoryRetention: records older than MaxAge go, and beyond MaxBytes
// the oldest go first; a reopened store keeps what is left.
func TestHistoryRetention(t *testing.T) {
	dir := t.TempDir()
	s := openTest(t, Config{Dir: dir})
	ctx := context.Background()
	h, err := s.OpenHistory(ctx, HistoryConfig{Instance: "test", MaxBytes: 64 << 10})
	if err != nil {
		t.Fatal(err)
	}
	body := make([]byte, 1024)
	for i := range 200 { // 200 KiB offered to 64 KiB
		h.RecordEvent(EventRecord{Time: time.Now(), Outcome: "verified", Type: "video.asset.ready", ID: fmt.Sprint("b-", i), Status: 202, Body: body})
	}
	var got []HistoryEvent
	testwait.For(t, func() bool {
		got, _, err = h.Search(ctx, HistoryFilter{Limit: 1000})
		return err == nil && len(got) > 0 && got[0].ID == "b-199"
	}, func() string { return fmt.Sprintf("%d events, %v", len(got), err) })
	if len(got) >= 64 || got[len(got)-1].ID == "b-0" {
		t.Fatalf("max_bytes 64 KiB keeps %d events of 1 KiB, the oldest %s", len(got), got[len(got)-1].ID)
	}
	// By age: a reconfigured history of 1s lets them all go.
	if err := h.Reconfigure(ctx, HistoryConfig{Instance: "test", MaxAge: time.Second, MaxBytes: 64 << 10}); err != nil {
		t.Fatal(err)
	}
	testwait.For(t, func() bool {
		got, _, err = h.Search(ctx, HistoryFilter{Limit: 1000})
		return err == nil && len(got) == 0
	}, func() string { return fmt.Sprintf("%d events after max_age 1s, %v", len(got), err) })
	h.RecordEvent(EventRecord{Time: time.Now(), Outcome: "verified", Type: "video.asset.ready", ID: "kept", Status: 202, Body: body})
	if err := h.Reconfigure(ctx, HistoryConfig{Instance: "test"}); err != nil {
		t.Fatal(err)
	}
	testwait.For(t, func() bool {
		got, _, err = h.Search(ctx, HistoryFilter{Limit: 1000})
		return err == nil && len(got) == 1
	}, func() string { return fmt.Sprintf("%d events, %v", len(got), err) })
	h.Close()
	s.Close()
	// Reopened: still there.
	s = openTest(t, Config{Dir: dir})
	defer s.Close()
	h, err = s.OpenHistory(ctx, HistoryConfig{Instance: "test"})
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if got, _, err = h.Search(ctx, HistoryFilter{}); err != nil || len(got) != 1 || got[0].ID != "kept" {
		t.Fatalf("after reopening: %+v, %v", got, err)
	}
}

// BenchmarkHistoryWrite: what one history record (2 KiB, the event's
// headers) costs to write on the embedded server: through the writer
// (async publishes, each acknowledged), and, for comparison, as core NATS
// publishes without acknowledgements (which the writer does not use: a
// record the store refused could not be counted).
func BenchmarkHistoryWrite(b *testing.B) {
	body := make([]byte, 2048)
	open := func(b *testing.B) (*Store, *History) {
		s, err := Open(context.Background(), Config{Dir: b.TempDir()})
		if err != nil {
			b.Fatal(err)
		}
		h, err := s.OpenHistory(context.Background(), HistoryConfig{Instance: "bench"})
		if err != nil {
			b.Fatal(err)
		}
		return s, h
	}
	stored := func(b *testing.B, s *Store, h *History, n uint64) {
		for deadline := time.Now().Add(time.Minute); ; {
			st, err := s.js.Stream(context.Background(), h.name)
			if err == nil && st.CachedInfo().State.Msgs >= n {
				return
			}
			if time.Now().After(deadline) {
				b.Fatalf("not all %d records stored", n)
			}
			time.Sleep(time.Millisecond)
		}
	}
	b.Run("writer", func(b *testing.B) {
		s, h := open(b)
		defer s.Close()
		defer h.Close()
		n := 0
		for b.Loop() {
			for len(h.queue) > historyBufferRecords/2 {
				time.Sleep(50 * time.Microsecond)
			}
			h.RecordEvent(EventRecord{Time: time.Now(), Outcome: "verified", Type: "video.asset.ready", ID: fmt.Sprint("w-", n),
				ObjectType: "asset", ObjectID: "obj", Status: 202, Body: body})
			n++
		}
		stored(b, s, h, uint64(n))
		if h.Dropped() > 0 {
			b.Fatalf("%d dropped", h.Dropped())
		}
	})
	b.Run("core-publish", func(b *testing.B) {
		s, h := open(b)
		defer s.Close()
		defer h.Close()
		n := 0
		for b.Loop() {
			msg := nats.NewMsg(h.eventSubject(EventRecord{Outcome: "verified", Type: "video.asset.ready", ID: fmt.Sprint("c-", n), ObjectID: "obj"}))
			msg.Data = body
			msg.Header.Set(hdrHistOutcome, "verified")
			msg.Header.Set(hdrHistType, "video.asset.ready")
			msg.Header.Set(hdrHistID, fmt.Sprint("c-", n))
			msg.Header.Set(hdrHistObjectType, "asset")
			msg.Header.Set(hdrHistObjectID, "obj")
			msg.Header.Set(hdrHistStatus, "202")
			if err := s.conn.PublishMsg(msg); err != nil {
				b.Fatal(err)
			}
			n++
		}
		stored(b, s, h, uint64(n))
	})
}

// TestReplayCancel: a job waiting for room in a queue above 80 % of its
// bytes is cancelled: its state says so, and it queues nothing more.
func TestReplayCancel(t *testing.T) {
	s := openTest(t, Config{Dir: t.TempDir(), MaxBytes: 256 << 10})
	ctx := context.Background()
	h, err := s.OpenHistory(ctx, HistoryConfig{Instance: "test"})
	if err != nil {
		s.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close(); s.Close() })
	body := make([]byte, 1024)
	for i := range 400 {
		h.RecordEvent(EventRecord{Time: time.Now(), Outcome: "verified", Type: "video.asset.ready", ID: fmt.Sprint("c-", i), ObjectID: "one", Status: 202, Body: body})
	}
	search(t, h, HistoryFilter{Limit: 1000}, 400)
	job, err := h.Replay(ctx, "app", HistoryFilter{}, false)
	if err != nil || job.Matched != 400 {
		t.Fatalf("replay: %+v %v", job, err)
	}
	// One object: one partition of 64 KiB, above 80 % after about 50 copies.
	var st ReplayJob
	testwait.For(t, func() bool {
		n := pending(t, s, "app")
		st, _ = h.ReplayStatus(ctx, job.Job)
		return n > 40 && !st.Done
	}, func() string { return fmt.Sprintf("queued %d, job %+v", pending(t, s, "app"), st) })
	time.Sleep(2 * time.Second) // waiting for room: no more copies
	before := pending(t, s, "app")
	if before >= 400 {
		t.Fatalf("the job did not wait for room: %d queued", before)
	}
	st, err = h.CancelReplay(ctx, job.Job)
	if err != nil || st.State != "cancelled" || !st.Done {
		t.Fatalf("cancel: %+v %v", st, err)
	}
	// What it queued is counted: the job saved how far it got as it
	// stopped (it had not saved since it started).
	if st.Queued != uint64(before) {
		t.Fatalf("cancelled job says queued %d, %d copies were queued", st.Queued, before)
	}
	if st, err = h.ReplayStatus(ctx, job.Job); err != nil || st.State != "cancelled" {
		t.Fatalf("after cancel: %+v %v", st, err)
	}
	if _, err := h.CancelReplay(ctx, "nope"); !errors.Is(err, ErrReplayNotFound) {
		t.Fatalf("cancel of no job: %v", err)
	}
	testwait.For(t, func() bool {
		h.replays.mu.Lock()
		defer h.replays.mu.Unlock()
		return len(h.replays.running) == 0
	}, func() string { return "the job still runs in this process" })
	if after := pending(t, s, "app"); after != before {
		t.Fatalf("queued %d after the cancel, %d before", after, before)
	}
}

// TestReplayStale: a job is taken up once its revision has not moved for
// replayOrphaned by this process's clock, whatever the server's time says
// (clocks may differ); or at once when the server saved it long ago.
func TestReplayStale(t *testing.T) {
	var r replays
	now := time.Now()
	if r.stale("j", 1, now.Add(-time.Hour)) != true {
		t.Fatal("saved an hour ago by the server's clock: not stale")
	}
	// A server clock 2 minutes ahead or behind changes nothing.
	for _, saved := range []time.Time{now.Add(2 * time.Minute), now.Add(-2 * time.Minute)} {
		var r replays
		if r.stale("j", 1, saved) {
			t.Fatalf("first seen (saved %v): stale", saved.Sub(now))
		}
		r.seen["j"] = seenJob{rev: 1, at: time.Now().Add(-replayOrphaned)}
		if !r.stale("j", 1, saved) {
			t.Fatalf("same revision for replayOrphaned (saved %v): not stale", saved.Sub(now))
		}
		if r.stale("j", 2, saved) {
			t.Fatal("a new revision: stale")
		}
	}
}

// TestReplayCancelledElsewhere: a job cancelled by another gateway (its
// state marked cancelled, the job not running there) is stopped by the
// gateway running it at its next save, which adds what it queued since to
// the cancelled state.
func TestReplayCancelledElsewhere(t *testing.T) {
	s := openTest(t, Config{Dir: t.TempDir(), MaxBytes: 256 << 10})
	ctx := context.Background()
	h, err := s.OpenHistory(ctx, HistoryConfig{Instance: "runner"})
	if err != nil {
		s.Close()
		t.Fatal(err)
	}
	other, err := s.OpenHistory(ctx, HistoryConfig{Instance: "other"})
	if err != nil {
		h.Close()
		s.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { other.Close(); h.Close(); s.Close() })
	body := make([]byte, 1024)
	for i := range 400 {
		h.RecordEvent(EventRecord{Time: time.Now(), Outcome: "verified", Type: "video.asset.ready", ID: fmt.Sprint("e-", i), ObjectID: "one", Status: 202, Body: body})
	}
	search(t, h, HistoryFilter{Limit: 1000}, 400)
	job, err := h.Replay(ctx, "app", HistoryFilter{}, false)
	if err != nil {
		t.Fatal(err)
	}
	// It waits for room after about 50 copies (one partition of 64 KiB).
	testwait.For(t, func() bool { return pending(t, s, "app") > 40 }, func() string { return fmt.Sprintf("queued %d", pending(t, s, "app")) })
	time.Sleep(time.Second)
	queued := pending(t, s, "app")
	st, err := other.CancelReplay(ctx, job.Job)
	if err != nil || st.State != "cancelled" {
		t.Fatalf("cancel from the other: %+v %v", st, err)
	}
	testwait.Until(t, 3*replaySave, func() bool {
		h.replays.mu.Lock()
		defer h.replays.mu.Unlock()
		return len(h.replays.running) == 0
	}, func() string { return "the runner never stopped" })
	if st, err = h.ReplayStatus(ctx, job.Job); err != nil || st.State != "cancelled" || st.Queued != uint64(queued) {
		t.Fatalf("after the runner stopped: %+v %v, want cancelled with queued %d", st, err, queued)
	}
}

// TestReplayTakenUpAfterACrash: a job whose gateway died after queuing
// copies it had not saved yet (its state says cursor 0, queued 0), and
// whose copies were delivered and swept since, is taken up: the copies
// delivered are found by their attempts in history and not queued again,
// although the queue no longer remembers their dedupe keys.
func TestReplayTakenUpAfterACrash(t *testing.T) {
	s := openTest(t, Config{Dir: t.TempDir(), DedupeWindow: time.Second})
	ctx := context.Background()
	h, err := s.OpenHistory(ctx, HistoryConfig{Instance: "test"})
	if err != nil {
		s.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close(); s.Close() })
	var mu sync.Mutex
	got := map[string]int{}
	b := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		got[r.Header.Get("Idempotency-Key")]++
		mu.Unlock()
	}))
	t.Cleanup(b.Close)
	stop, err := s.StartWorkers(ctx, Destination{Name: "app", URL: b.URL}, h.RecordAttempt)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	const n = 60
	for i := range n {
		h.RecordEvent(EventRecord{Time: time.Now(), Outcome: "verified", Type: "video.asset.ready", ID: fmt.Sprint("t-", i), ObjectID: fmt.Sprint("o-", i), Status: 202, Body: []byte(`{}`)})
	}
	search(t, h, HistoryFilter{Limit: 1000}, n)
	job, err := h.Replay(ctx, "app", HistoryFilter{}, false)
	if err != nil {
		t.Fatal(err)
	}
	delivered := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(got)
	}
	testwait.For(t, func() bool { return delivered() == n }, func() string { return fmt.Sprintf("%d of %d delivered", delivered(), n) })
	testwait.For(t, func() bool {
		st, err := h.ReplayStatus(ctx, job.Job)
		return err == nil && st.Done
	}, func() string { return "the job never ended" })
	// Its gateway "died" before its first save: the state as it was at
	// the start. The copies are delivered and swept, and the queue's
	// dedupe window is over.
	kv, err := h.replayKV(ctx)
	if err != nil {
		t.Fatal(err)
	}
	start := job
	start.State, start.Done, start.Queued, start.Cursor = "running", false, 0, 0
	data, _ := json.Marshal(start)
	rev, err := kv.Put(ctx, job.Job, data)
	if err != nil {
		t.Fatal(err)
	}
	testwait.For(t, func() bool { return pending(t, s, "app") == 0 }, func() string { return "copies not swept" })
	time.Sleep(2 * time.Second) // past the dedupe window
	h.runReplay(start, rev, nil, true)
	var st ReplayJob
	testwait.For(t, func() bool {
		st, err = h.ReplayStatus(ctx, job.Job)
		return err == nil && st.Done
	}, func() string { return fmt.Sprintf("the job taken up never ended: %+v", st) })
	time.Sleep(500 * time.Millisecond) // a copy queued again would be delivered by now
	mu.Lock()
	defer mu.Unlock()
	for id, c := range got {
		if c != 1 {
			t.Errorf("%s delivered %d times for one job", id, c)
		}
	}
	if st.State != "done" || st.Queued != n {
		t.Errorf("job taken up: %+v, want done with queued %d", st, n)
	}
}
