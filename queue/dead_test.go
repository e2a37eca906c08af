package queue

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
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

// putDead stores a dead letter of dest as bury does, under subject (the
// dead stream's, or the old place in the main stream).
func putDead(t *testing.T, s *Store, subject, id string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	m := nats.NewMsg(subject)
	m.Data = []byte(`{"type":"video.asset.ready","id":"` + id + `"}`)
	m.Header.Set(HeaderEventID, id)
	m.Header.Set(HeaderEventType, "video.asset.ready")
	m.Header.Set(headerAttempts, "3")
	m.Header.Set(headerLastError, "app answered 500")
	m.Header.Set(headerDeadAt, time.Now().UTC().Format(time.RFC3339))
	if _, err := s.js.PublishMsg(ctx, m); err != nil {
		t.Fatal(err)
	}
}

func deadIDs(t *testing.T, s *Store, dest string) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	dead, err := s.Dead(ctx, dest)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, d := range dead {
		ids = append(ids, d.ID)
	}
	return ids
}

// attemptLog records a destination's attempts and the highest
// Mux-Webhook-Attempt its backend saw.
type attemptLog struct {
	mu       sync.Mutex
	attempts []Attempt
}

func (l *attemptLog) add(a Attempt) { l.mu.Lock(); l.attempts = append(l.attempts, a); l.mu.Unlock() }

func (l *attemptLog) count(f func(Attempt) bool) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, a := range l.attempts {
		if f(a) {
			n++
		}
	}
	return n
}

func maxAttemptHeader(b *backend) int {
	reqs, _ := b.requests()
	m := 0
	for _, r := range reqs {
		n, _ := strconv.Atoi(r.Header.Get(HeaderAttempt))
		m = max(m, n)
	}
	return m
}

// TestDeadLettersWhenTheStreamIsFull (README, "When things fail": "the stream is full
// (max_bytes) while a destination is down"): the stream filled up to
// max_bytes, the destination down, max_attempts 2: every copy becomes a
// dead letter (in <stream>_DEAD), none is attempted more than twice, and
// the listing shows them all.
func TestDeadLettersWhenTheStreamIsFull(t *testing.T) {
	s := openTest(t, Config{Dir: t.TempDir(), MaxBytes: 32 << 10})
	defer s.Close()
	pad := strings.Repeat("p", 1024)
	var ids []string
	for i := range 200 { // bounded: 32 KiB holds far fewer
		id := fmt.Sprintf("full-%03d", i)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := s.Enqueue(ctx, Message{Destination: "app", EventID: []byte(`"` + id + `"`), ID: id, Type: "video.asset.ready",
			Body: []byte(`{"id":"` + id + `","pad":"` + pad + `"}`)})
		cancel()
		if errors.Is(err, ErrFull) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	if len(ids) < 5 || len(ids) == 200 {
		t.Fatalf("%d copies stored before the stream was full", len(ids))
	}
	b := newBackend(t, func(int) int { return http.StatusServiceUnavailable })
	var log attemptLog
	// The breaker off: every copy of a destination that always fails is
	// to become a dead letter here.
	stop, err := s.StartWorkers(context.Background(), Destination{Name: "app", URL: b.URL, Retry: []time.Duration{20 * time.Millisecond}, MaxAttempts: 2, BreakerFailures: BreakerOff}, log.add)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	waitUntil(t, "every copy a dead letter", func() bool { return log.count(func(a Attempt) bool { return a.Result == "dead" }) >= len(ids) })
	if n := log.count(func(a Attempt) bool { return a.BuryErr != nil }); n != 0 {
		t.Errorf("%d copies could not be buried", n)
	}
	if m := maxAttemptHeader(b); m > 2 {
		t.Errorf("a POST carried %s %d, past max_attempts 2", HeaderAttempt, m)
	}
	reqs, _ := b.requests()
	if len(reqs) != 2*len(ids) {
		t.Errorf("%d POSTs for %d copies, want 2 each", len(reqs), len(ids))
	}
	got := deadIDs(t, s, "app")
	slices.Sort(got)
	if !slices.Equal(got, ids) {
		t.Errorf("dead letters listed: %d %v, want %d", len(got), got, len(ids))
	}
	st, err := s.Status(context.Background(), "app", false)
	if err != nil || st.Dead != uint64(len(ids)) {
		t.Errorf("status: %+v %v, want dead %d", st, err, len(ids))
	}
}

// TestDeadStreamFull: <stream>_DEAD full too (a tiny dead_max_bytes):
// the copies that do not fit stay queued (BuryErr says why), none is
// dropped or attempted past max_attempts; once dead letters are purged
// (up to a listing's bound), they are buried, without another POST, also
// by a process that did not see their attempts (a restart).
func TestDeadStreamFull(t *testing.T) {
	dir := t.TempDir()
	cfg := Config{Dir: dir, DeadMaxBytes: 2500}
	s := openTest(t, cfg)
	pad := strings.Repeat("p", 600)
	var ids []string
	for i := range 6 {
		id := fmt.Sprintf("df-%d", i)
		put(t, s, "app", id, []byte(`{"id":"`+id+`","pad":"`+pad+`"}`))
		ids = append(ids, id)
	}
	b := newBackend(t, func(int) int { return http.StatusInternalServerError })
	// Timeout 1s: a copy whose hand-back was lost with the closed
	// connection comes back after its ack deadline (timeout + 5s).
	dest := Destination{Name: "app", URL: b.URL, Timeout: time.Second, Retry: []time.Duration{20 * time.Millisecond}, MaxAttempts: 2, BreakerFailures: BreakerOff} // every copy to be a dead letter
	var log attemptLog
	stop, err := s.StartWorkers(context.Background(), dest, log.add)
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "copies that could not be buried", func() bool {
		return log.count(func(a Attempt) bool { return a.Result == "dead" }) > 0 &&
			log.count(func(a Attempt) bool { return a.BuryErr != nil && a.NoAttempt }) > 0
	})
	if n := log.count(func(a Attempt) bool { return a.BuryErr != nil && !errors.Is(a.BuryErr, ErrDeadFull) }); n > 0 {
		t.Errorf("%d bury errors that are not ErrDeadFull", n)
	}
	buried := deadIDs(t, s, "app")
	if len(buried) == 0 || len(buried) >= len(ids) {
		t.Fatalf("%d of %d buried with dead_max_bytes 2500", len(buried), len(ids))
	}
	if m := maxAttemptHeader(b); m > 2 {
		t.Errorf("a POST carried %s %d, past max_attempts 2", HeaderAttempt, m)
	}
	if st, err := s.Status(context.Background(), "app", false); err != nil || st.Pending+st.InFlight != uint64(len(ids)-len(buried)) {
		t.Errorf("status %+v %v: want %d copies still queued (none dropped)", st, err, len(ids)-len(buried))
	}
	// A restart: the next process knows nothing of the copies' attempts.
	stop()
	s.Close()
	s = openTest(t, cfg)
	defer s.Close()
	var log2 attemptLog
	stop, err = s.StartWorkers(context.Background(), dest, log2.add)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	seen := map[string]bool{}
	for _, id := range buried {
		seen[id] = true
	}
	for round := 0; len(seen) < len(ids) && round < 80; round++ { // at most ~20s
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		dead, err := s.Dead(ctx, "app")
		if err != nil {
			cancel()
			t.Fatal(err)
		}
		if len(dead) > 0 {
			if err := s.PurgeUpTo(ctx, "app", dead[len(dead)-1].Seq); err != nil {
				t.Fatal(err)
			}
		}
		cancel()
		time.Sleep(200 * time.Millisecond) // the stuck copies come back every 20ms
		for _, d := range deadIDs(t, s, "app") {
			seen[d] = true
		}
	}
	if len(seen) != len(ids) {
		t.Errorf("buried after purges: %v of %v", seen, ids)
	}
	if m := maxAttemptHeader(b); m > 2 {
		t.Errorf("a POST carried %s %d, past max_attempts 2", HeaderAttempt, m)
	}
	if reqs, _ := b.requests(); len(reqs) != 2*len(ids) {
		t.Errorf("%d POSTs for %d copies, want 2 each", len(reqs), len(ids))
	}
	if n := log2.count(func(a Attempt) bool { return !a.NoAttempt }); n != 0 {
		t.Errorf("after the restart, %d deliveries were attempts", n)
	}
	if n := log2.count(func(a Attempt) bool { return a.Result == "dead" && a.Number != 2 }); n > 0 {
		t.Errorf("%d copies buried after the restart with other than 2 attempts", n)
	}
}

// TestOldDeadLettersMoved: dead letters an earlier version kept in the
// main stream (<stream>.dead.<destination>) are moved to <stream>_DEAD
// when the store opens, once, and leave the main stream.
func TestOldDeadLettersMoved(t *testing.T) {
	dir := t.TempDir()
	s := openTest(t, Config{Dir: dir})
	makeLegacyStream(t, s)
	for _, id := range []string{"old-1", "old-2", "old-3"} {
		putDead(t, s, DefaultStream+".dead.x", id)
	}
	putDead(t, s, DefaultStream+".dead.y", "old-y")
	s.Close()
	for open := 1; open <= 2; open++ {
		s = openTest(t, Config{Dir: dir})
		<-s.moved // in the background
		if got := deadIDs(t, s, "x"); !slices.Equal(got, []string{"old-1", "old-2", "old-3"}) {
			t.Errorf("open %d: dead letters of x: %v", open, got)
		}
		dead, _ := s.Dead(context.Background(), "x")
		if len(dead) > 0 && (dead[0].Attempts != 3 || dead[0].LastError != "app answered 500" || dead[0].DeadAt.IsZero()) {
			t.Errorf("open %d: moved dead letter: %+v", open, dead[0])
		}
		if got := deadIDs(t, s, "y"); !slices.Equal(got, []string{"old-y"}) {
			t.Errorf("open %d: dead letters of y: %v", open, got)
		}
		// Moved: the single stream of that version holds none of them
		// (and, empty, is deleted at the next start).
		if open == 2 {
			_, err := s.js.Stream(context.Background(), DefaultStream)
			if !errors.Is(err, jetstream.ErrStreamNotFound) || s.legacy != nil {
				t.Errorf("open 2: the emptied stream of the earlier version is still there: %v", err)
			}
		} else if info, err := s.legacy.stream.Info(context.Background(), jetstream.WithSubjectFilter(DefaultStream+".dead.>")); err != nil || len(info.State.Subjects) != 0 {
			t.Errorf("open %d: the main stream still holds %v (%v)", open, info.State.Subjects, err)
		}
		s.Close()
	}
}

// TestPurgeUpToAndRedeliverUnknown: a purge up to a listing's last
// sequence keeps what was buried after the listing; redelivering ids of
// which some are not dead letters redelivers the others and names them.
func TestPurgeUpToAndRedeliverUnknown(t *testing.T) {
	s := openTest(t, Config{Dir: t.TempDir()})
	defer s.Close()
	ctx := context.Background()
	putDead(t, s, s.deadSubject("app"), "p-1")
	putDead(t, s, s.deadSubject("app"), "p-2")
	listed, err := s.Dead(ctx, "app")
	if err != nil || len(listed) != 2 {
		t.Fatalf("listing: %v %v", listed, err)
	}
	putDead(t, s, s.deadSubject("app"), "p-3") // buried after the listing
	if err := s.PurgeUpTo(ctx, "app", listed[len(listed)-1].Seq); err != nil {
		t.Fatal(err)
	}
	if got := deadIDs(t, s, "app"); !slices.Equal(got, []string{"p-3"}) {
		t.Errorf("after a purge up to the listing: %v, want [p-3]", got)
	}
	putDead(t, s, s.deadSubject("app"), "p-4")
	n, err := s.Redeliver(ctx, "app", []string{"p-3", "nope", "p-3", "nix"}, false)
	var nd *NotDeadError
	if n != 1 || !errors.As(err, &nd) || !slices.Equal(nd.IDs, []string{"nope", "nix"}) {
		t.Errorf("redeliver p-3, nope, nix: %d %v", n, err)
	}
	if got := deadIDs(t, s, "app"); !slices.Equal(got, []string{"p-4"}) {
		t.Errorf("after redelivering p-3: %v", got)
	}
	if p := pending(t, s, "app"); p != 1 {
		t.Errorf("%d copies queued after redelivering one", p)
	}
	if err := s.Purge(ctx, "app"); err != nil {
		t.Fatal(err)
	}
	if got := deadIDs(t, s, "app"); len(got) != 0 {
		t.Errorf("after purge: %v", got)
	}
}

// TestDeadListingBoundedByContext: with NATS gone, listing dead letters
// ends with an error once the request's context does, instead of waiting
// or retrying on.
func TestDeadListingBoundedByContext(t *testing.T) {
	s := openTest(t, Config{Dir: t.TempDir()})
	defer s.Close()
	putDead(t, s, s.deadSubject("app"), "gone-1")
	s.server.shutdown() // the connection stays, reconnecting
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := s.Dead(ctx, "app")
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil {
			t.Error("listing with NATS gone succeeded")
		}
	case <-time.After(30 * time.Second): // far past the 1s deadline: it ignores its context
		t.Fatal("listing with NATS gone did not end with its context")
	}
}

// TestBuriedCopyWhoseTermFailedIsNotAttemptedAgain: a copy's last
// attempt (its next retry would be past max_age) is in flight when its
// consumer is deleted by hand; the workers make the consumer again, and
// the attempt fails. The copy is kept as a dead letter, but its Term
// settles nothing (the consumer it came from is gone), so the new
// consumer delivers it again, before max_age. It must be buried again
// (kept once) without another POST: without, the backend saw a POST
// after the copy became a dead letter (which, answered 2xx, would leave
// an event both delivered and a dead letter).
func TestBuriedCopyWhoseTermFailedIsNotAttemptedAgain(t *testing.T) {
	s := openTest(t, Config{Dir: t.TempDir(), Partitions: 1})
	defer s.Close()
	rs := &restarts{}
	release := make(chan struct{})
	b := newBackend(t, func(n int) int {
		if n == 1 {
			<-release // the attempt in flight while its consumer goes
		}
		return http.StatusInternalServerError
	})
	defer func() {
		select {
		case <-release:
		default:
			close(release)
		}
	}()
	log := &attemptLog{}
	stop, err := s.StartWorkers(context.Background(), Destination{Name: "app", URL: b.URL, MaxAge: time.Hour, Retry: []time.Duration{2 * time.Hour}, Concurrency: 1,
		Timeout: 3 * time.Second, OnRestart: rs.on}, log.add)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	put(t, s, "app", "last", []byte(`{"id":"last"}`))
	posts := func() int { r, _ := b.requests(); return len(r) }
	waitUntil(t, "the attempt in flight", func() bool { return posts() == 1 })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.js.DeleteConsumer(ctx, firstPart(s).name, "deliver_app"); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the consumer made again", func() bool { return rs.recovered() > 0 })
	close(release)
	waitUntil(t, "the copy buried again, without a POST", func() bool {
		return log.count(func(a Attempt) bool { return a.Result == "dead" }) >= 2 || posts() > 1
	})
	if n := posts(); n != 1 {
		t.Errorf("the backend saw %d POSTs; want 1 (the copy was a dead letter after it)", n)
	}
	if dead := deadIDs(t, s, "app"); len(dead) != 1 {
		t.Errorf("dead letters: %v; want one", dead)
	}
	waitUntil(t, "the copy settled", func() bool {
		st, err := s.Status(context.Background(), "app", false)
		return err == nil && st.Pending+st.InFlight == 0
	})
}

// TestSharedDeadStreamNeverLowered: on external NATS the dead letters'
// stream, <stream>_DEAD, is shared like the main stream: a gateway
// opened (or reloaded) with a smaller dead_max_bytes or dedupe_window
// keeps the running stream's (a WARN names dead_max_bytes); a larger
// one raises it. (Without: the last gateway to open or reload wins,
// e.g. a gateway started without `replicas 3` scales the dead letters
// down to one copy.)
func TestSharedDeadStreamNeverLowered(t *testing.T) {
	url := natsOnLoopback(t)
	a := openTest(t, Config{URLs: []string{url}, DeadMaxBytes: 64 << 20, DedupeWindow: 24 * time.Hour})
	defer a.Close()
	dead := func() (int64, time.Duration) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		st, err := a.js.Stream(ctx, DeadStream(a.cfg.Stream))
		if err != nil {
			t.Fatal(err)
		}
		c := st.CachedInfo().Config
		return c.MaxBytes, c.Duplicates
	}
	core, logs := observer.New(zapcore.WarnLevel)
	b := openTest(t, Config{URLs: []string{url}, DeadMaxBytes: 8 << 20, DedupeWindow: time.Minute, Logger: zap.New(core)})
	defer b.Close()
	if mb, dw := dead(); mb != 64<<20 || dw != 24*time.Hour {
		t.Errorf("after a gateway with smaller settings opened: %s has max_bytes %d, duplicates %s; want 64MiB, 24h (kept)", DeadStream(a.cfg.Stream), mb, dw)
	}
	if logs.FilterMessageSnippet("dead_max_bytes").Len() == 0 {
		t.Errorf("the gateway with the smaller dead_max_bytes logged %v; want a WARN naming dead_max_bytes", logs.All())
	}
	// A reload of that gateway, still lower: kept too.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := b.Reconfigure(ctx, Config{URLs: []string{url}, DeadMaxBytes: 16 << 20, DedupeWindow: 2 * time.Minute}); err != nil {
		t.Fatal(err)
	}
	if mb, dw := dead(); mb != 64<<20 || dw != 24*time.Hour {
		t.Errorf("after its reload with smaller settings: max_bytes %d, duplicates %s; want 64MiB, 24h (kept)", mb, dw)
	}
	// Higher: raised.
	if err := b.Reconfigure(ctx, Config{URLs: []string{url}, DeadMaxBytes: 128 << 20, DedupeWindow: 2 * time.Minute}); err != nil {
		t.Fatal(err)
	}
	if mb, _ := dead(); mb != 128<<20 {
		t.Errorf("after a reload with a larger dead_max_bytes: %d; want 128MiB (raised)", mb)
	}
}

// TestReconfigureDeadMaxBytesGuarded: a reload's dead_max_bytes is
// written under the lock that bury's reading of the config takes (run
// with -race: without, a data race).
func TestReconfigureDeadMaxBytesGuarded(t *testing.T) {
	dir := t.TempDir()
	s := openTest(t, Config{Dir: dir})
	defer s.Close()
	done := make(chan struct{})
	read := make(chan struct{})
	go func() {
		defer close(read)
		for {
			select {
			case <-done:
				return
			default:
				_ = s.config().DeadMaxBytes // as bury does
			}
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := s.Reconfigure(ctx, Config{Dir: dir, DeadMaxBytes: 32 << 20})
	close(done)
	<-read
	if err != nil {
		t.Fatal(err)
	}
	if got := s.config().DeadMaxBytes; got != 32<<20 {
		t.Errorf("dead_max_bytes after the reload: %d, want 32MiB", got)
	}
}
