package queue

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// putObject queues event id of object for dest.
func putObject(t *testing.T, s *Store, dest, id, object string) bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	body := fmt.Sprintf(`{"type":"video.asset.updated","id":%q,"object":{"type":"asset","id":%q}}`, id, object)
	dup, err := s.Enqueue(ctx, Message{Destination: dest, EventID: []byte(`"` + id + `"`), ObjectID: object, ID: id, Type: "video.asset.updated",
		Body: []byte(body), Header: map[string]string{HeaderSignature: "t=1,v1=original"}})
	if err != nil {
		t.Fatal(err)
	}
	return dup
}

// streamMsgs is how many copies each named stream holds.
func streamMsgs(t *testing.T, s *Store, names ...string) []uint64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var out []uint64
	for _, name := range names {
		st, err := s.js.Stream(ctx, name)
		if err != nil {
			t.Fatalf("stream %s: %v", name, err)
		}
		out = append(out, st.CachedInfo().State.Msgs)
	}
	return out
}

// TestKeyAndPartition: an object's events share a key and a partition;
// an event without one gets a key of its own, never held; 1000 objects
// spread over 4 partitions.
func TestKeyAndPartition(t *testing.T) {
	a1, a2 := Key("asset-1", []byte(`"e1"`)), Key("asset-1", []byte(`"e2"`))
	if a1 != a2 || !ordered(a1) || len(a1) != 17 {
		t.Errorf("one object's keys: %q %q; want equal, ordered, 17 characters", a1, a2)
	}
	e1, e2 := Key("", []byte(`"e1"`)), Key("", []byte(`"e2"`))
	if e1 == e2 || ordered(e1) || Key("", []byte(`"e1"`)) != e1 {
		t.Errorf("keys without an object: %q %q; want distinct, stable, not ordered", e1, e2)
	}
	counts := make([]int, 4)
	for i := range 1000 {
		counts[partitionOf(Key(fmt.Sprintf("asset-%d", i), nil), 4)]++
	}
	for i, n := range counts {
		if n < 180 || n > 320 {
			t.Errorf("partition %d got %d of 1000 objects: %v", i, n, counts)
		}
	}
	if p := partitionOf(a1, 1); p != 0 {
		t.Errorf("one partition: %d", p)
	}
	for _, d := range []struct {
		n    uint64
		want time.Duration
	}{{0, holdFirst}, {1, holdFirst}, {2, 2 * holdFirst}, {3, 4 * holdFirst}, {5, 4 * time.Second}, {40, holdMax}} {
		if got := holdDelay(d.n); got != d.want {
			t.Errorf("holdDelay(%d) = %v, want %v", d.n, got, d.want)
		}
	}
}

// TestPartitionsSpreadDedupeAndDeliver: the default four partitions each
// take a share of 40 objects' events; max_bytes is split; the dedupe
// window holds (an event lands in the same partition); the status counts
// over all of them; the workers deliver every event once.
func TestPartitionsSpreadDedupeAndDeliver(t *testing.T) {
	s := openTest(t, Config{Dir: t.TempDir(), MaxBytes: 64 << 20})
	defer s.Close()
	names := []string{DefaultStream + "_0", DefaultStream + "_1", DefaultStream + "_2", DefaultStream + "_3"}
	for _, name := range names {
		st, err := s.js.Stream(context.Background(), name)
		if err != nil {
			t.Fatal(err)
		}
		if mb := st.CachedInfo().Config.MaxBytes; mb != 16<<20 {
			t.Errorf("%s max_bytes %d, want a quarter of 64MiB", name, mb)
		}
	}
	for i := range 40 {
		putObject(t, s, "app", fmt.Sprintf("ev-%d", i), fmt.Sprintf("asset-%d", i))
	}
	if !putObject(t, s, "app", "ev-7", "asset-7") {
		t.Error("the same event queued twice within the dedupe window")
	}
	msgs := streamMsgs(t, s, names...)
	var total uint64
	for i, n := range msgs {
		if n == 0 {
			t.Errorf("%s holds nothing of 40 objects' events: %v", names[i], msgs)
		}
		total += n
	}
	if total != 40 || pending(t, s, "app") != 40 {
		t.Errorf("stored %d (%v), pending %d; want 40", total, msgs, pending(t, s, "app"))
	}
	if q, err := s.Queued(context.Background()); err != nil || q["app"] != 40 {
		t.Errorf("queued %v %v; want app: 40", q, err)
	}
	st, err := s.Status(context.Background(), "app", true)
	if err != nil || st.Pending != 40 || !st.NoConsumer || st.Oldest.IsZero() || st.Held != 0 {
		t.Errorf("status before any worker: %+v %v", st, err)
	}

	b := newBackend(t, func(int) int { return http.StatusNoContent })
	stop, err := s.StartWorkers(context.Background(), Destination{Name: "app", URL: b.URL}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	waitUntil(t, "40 events delivered", func() bool { r, _ := b.requests(); return len(r) >= 40 })
	waitUntil(t, "the partitions swept", func() bool {
		for _, n := range streamMsgs(t, s, names...) {
			if n != 0 {
				return false
			}
		}
		return true
	})
	reqs, _ := b.requests()
	seen := map[string]int{}
	for _, r := range reqs {
		seen[r.Header.Get("Idempotency-Key")]++
	}
	if len(reqs) != 40 || len(seen) != 40 {
		t.Errorf("%d POSTs of %d events; want each of 40 once", len(reqs), len(seen))
	}
}

// putLegacy stores a copy as the single-stream versions did:
// <stream>.deliver.<dest>, no key.
func putLegacy(t *testing.T, s *Store, dest, id string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	m := nats.NewMsg(s.cfg.Stream + ".deliver." + dest)
	m.Data = []byte(`{"type":"video.asset.ready","id":"` + id + `"}`)
	m.Header.Set(HeaderSignature, "t=1,v1=original")
	m.Header.Set(HeaderEventID, id)
	m.Header.Set(HeaderEventType, "video.asset.ready")
	m.Header.Set(jetstream.MsgIDHeader, dedupeID(dest, []byte(`"`+id+`"`)))
	if _, err := s.js.PublishMsg(ctx, m); err != nil {
		t.Fatal(err)
	}
}

// TestUpgradeFromTheSingleStream: copies queued by the single-stream
// layout (one of them attempted once already, its count in the bucket
// under the key that layout gave it) are delivered after the upgrade,
// counted in the status meanwhile; new copies go to the partitions; the
// emptied single stream is deleted at the next start.
func TestUpgradeFromTheSingleStream(t *testing.T) {
	dir := t.TempDir()
	s := openTest(t, Config{Dir: dir})
	makeLegacyStream(t, s)
	for i := range 10 {
		putLegacy(t, s, "app", fmt.Sprintf("old-%d", i))
	}
	// old-0 was attempted once by the earlier version.
	m, err := s.legacyStream(t).GetMsg(context.Background(), 1)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.charge(context.Background(), &jetstream.MsgMetadata{Stream: s.cfg.Stream, Sequence: jetstream.SequencePair{Stream: m.Sequence}, Timestamp: m.Time}, 1); err != nil {
		t.Fatal(err)
	}
	s.Close()

	s = openTest(t, Config{Dir: dir})
	if s.legacy == nil {
		t.Fatal("the single stream holding copies is not drained")
	}
	for i := range 10 {
		putObject(t, s, "app", fmt.Sprintf("new-%d", i), fmt.Sprintf("asset-%d", i))
	}
	if n := pending(t, s, "app"); n != 20 {
		t.Errorf("pending %d, want 10 old + 10 new", n)
	}
	if n := streamMsgs(t, s, s.cfg.Stream)[0]; n != 10 {
		t.Errorf("the single stream holds %d; new copies went there", n)
	}
	a := newArrivals(t, func(string, int, http.ResponseWriter) {})
	stop, err := s.StartWorkers(context.Background(), Destination{Name: "app", URL: a.URL}, nil)
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "20 events delivered", func() bool {
		for i := range 10 {
			if at, _ := a.of(fmt.Sprintf("old-%d", i)); len(at) != 1 {
				return false
			}
			if at, _ := a.of(fmt.Sprintf("new-%d", i)); len(at) != 1 {
				return false
			}
		}
		return true
	})
	if _, n := a.of("old-0"); len(n) != 1 || n[0] != "2" {
		t.Errorf("old-0, attempted once before the upgrade, came as attempt %v; want 2", n)
	}
	waitUntil(t, "the single stream swept", func() bool { return streamMsgs(t, s, s.cfg.Stream)[0] == 0 })
	stop()
	s.Close()
	s = openTest(t, Config{Dir: dir})
	defer s.Close()
	if _, err := s.js.Stream(context.Background(), DefaultStream); err == nil || s.legacy != nil {
		t.Errorf("the emptied single stream was kept: %v", err)
	}
}

// legacyStream is the single stream of the earlier layout.
func (s *Store) legacyStream(t *testing.T) jetstream.Stream {
	t.Helper()
	st, err := s.js.Stream(context.Background(), s.cfg.Stream)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// TestFewerPartitionsStrandNothing: copies stored under 4 partitions are
// delivered by workers of a store reopened with 2 (the other two are
// drained, with a WARN), and of one reloaded from 2 to 1.
func TestFewerPartitionsStrandNothing(t *testing.T) {
	dir := t.TempDir()
	s := openTest(t, Config{Dir: dir, Partitions: 4})
	for i := range 20 {
		putObject(t, s, "app", fmt.Sprintf("a-%d", i), fmt.Sprintf("asset-%d", i))
	}
	s.Close()
	core, logs := observer.New(zapcore.WarnLevel)
	s = openTest(t, Config{Dir: dir, Partitions: 2, Logger: zap.New(core)})
	defer s.Close()
	for i := range 20 {
		putObject(t, s, "app", fmt.Sprintf("b-%d", i), fmt.Sprintf("asset-%d", i))
	}
	if err := s.Reconfigure(context.Background(), Config{Dir: dir, Partitions: 1}); err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		putObject(t, s, "app", fmt.Sprintf("c-%d", i), fmt.Sprintf("asset-%d", i))
	}
	if n := streamMsgs(t, s, DefaultStream+"_0")[0]; n < 20 {
		t.Errorf("partition 0 holds %d; after the reload to 1 partition every new copy goes there", n)
	}
	if n := pending(t, s, "app"); n != 60 {
		t.Errorf("pending %d, want 60 over the 4 streams", n)
	}
	a := newArrivals(t, func(string, int, http.ResponseWriter) {})
	stop, err := s.StartWorkers(context.Background(), Destination{Name: "app", URL: a.URL}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	waitUntil(t, "60 events delivered", func() bool {
		for _, p := range []string{"a", "b", "c"} {
			for i := range 20 {
				if at, _ := a.of(fmt.Sprintf("%s-%d", p, i)); len(at) != 1 {
					return false
				}
			}
		}
		return true
	})
	warned := map[string]bool{}
	for _, e := range logs.FilterMessageSnippet("beyond this config's partitions").All() {
		warned[e.ContextMap()["stream"].(string)] = true
	}
	for _, name := range []string{DefaultStream + "_1", DefaultStream + "_2", DefaultStream + "_3"} {
		if !warned[name] {
			t.Errorf("no WARN names %s: %v", name, warned)
		}
	}
}

// TestMorePartitionsByReload: a reload from 1 partition to 3 makes the
// new streams and spreads new copies over them; workers started before
// the reload deliver from the new streams too (found by their scan).
func TestMorePartitionsByReload(t *testing.T) {
	if testing.Short() {
		t.Skip("waits for a stream scan (10s); runs without -short")
	}
	dir := t.TempDir()
	s := openTest(t, Config{Dir: dir, Partitions: 1})
	defer s.Close()
	a := newArrivals(t, func(string, int, http.ResponseWriter) {})
	stop, err := s.StartWorkers(context.Background(), Destination{Name: "app", URL: a.URL}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	if err := s.Reconfigure(context.Background(), Config{Dir: dir, Partitions: 3}); err != nil {
		t.Fatal(err)
	}
	for i := range 30 {
		putObject(t, s, "app", fmt.Sprintf("ev-%d", i), fmt.Sprintf("asset-%d", i))
	}
	testwaitLong(t, "30 events delivered from 3 partitions", func() bool {
		for i := range 30 {
			if at, _ := a.of(fmt.Sprintf("ev-%d", i)); len(at) != 1 {
				return false
			}
		}
		return true
	})
}

// testwaitLong is waitUntil with room for a stream scan.
func testwaitLong(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(2*partScanInterval + 10*time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestRedeliveredDeadLetterKeepsItsPartition: a dead letter redelivered
// goes back to its object's partition and subject.
func TestRedeliveredDeadLetterKeepsItsPartition(t *testing.T) {
	s := openTest(t, Config{Dir: t.TempDir()})
	defer s.Close()
	var mu sync.Mutex
	failing := true
	b := newBackend(t, func(int) int {
		mu.Lock()
		defer mu.Unlock()
		if failing {
			return http.StatusInternalServerError
		}
		return http.StatusNoContent
	})
	putObject(t, s, "app", "ev-1", "asset-9")
	stop, err := s.StartWorkers(context.Background(), Destination{Name: "app", URL: b.URL, MaxAttempts: 1}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	waitUntil(t, "a dead letter", func() bool { st, _ := s.Status(context.Background(), "app", false); return st.Dead == 1 })
	stop()
	if n, err := s.Redeliver(context.Background(), "app", []string{"ev-1"}, false); n != 1 || err != nil {
		t.Fatalf("redeliver: %d %v", n, err)
	}
	key := Key("asset-9", nil)
	p := s.configured()[partitionOf(key, 4)]
	m, err := p.stream.GetMsg(context.Background(), 1, jetstream.WithGetMsgSubject(p.subject("app", key)))
	if err != nil || !strings.Contains(string(m.Data), "ev-1") {
		t.Fatalf("the redelivered copy is not on its object's subject %s: %v", p.subject("app", key), err)
	}
}
