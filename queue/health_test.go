package queue

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/internal/testfs"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// deliveredIDs are the Idempotency-Keys a backend answered 2xx to.
func deliveredIDs(b *backend) map[string]int {
	reqs, _ := b.requests()
	out := map[string]int{}
	for _, r := range reqs {
		out[r.Header.Get("Idempotency-Key")]++
	}
	return out
}

// restarts records the OnRestart reports of a destination's workers.
type restarts struct {
	mu   sync.Mutex
	ok   int
	errs []error
}

func (r *restarts) on(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err == nil {
		r.ok++
	} else {
		r.errs = append(r.errs, err)
	}
}

func (r *restarts) recovered() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.ok
}

// healSetup is an embedded store with destination app's workers running
// toward a backend that answers 204, their OnRestart reports recorded;
// all stopped when the test ends.
func healSetup(t *testing.T) (*Store, *backend, *restarts) {
	t.Helper()
	s := openTest(t, Config{Dir: t.TempDir(), Partitions: 1})
	t.Cleanup(s.Close)
	b := newBackend(t, func(int) int { return http.StatusNoContent })
	rs := &restarts{}
	stop, err := s.StartWorkers(context.Background(), Destination{Name: "app", URL: b.URL, OnRestart: rs.on}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(stop)
	return s, b, rs
}

// TestWorkersRecoverADeletedConsumer: a destination's consumer deleted by
// hand (`nats consumer rm`) is noticed and made again by the workers
// themselves: every event queued afterwards is delivered, with no reload.
func TestWorkersRecoverADeletedConsumer(t *testing.T) {
	s, b, rs := healSetup(t)
	put(t, s, "app", "before", []byte(`{"id":"before"}`))
	waitUntil(t, "the first delivery", func() bool { return deliveredIDs(b)["before"] == 1 })
	// Swept from the stream (within sweepInterval): a copy delivered but
	// not yet swept when the consumer goes is delivered again by the one
	// made anew, a repeat Idempotency-Key tells.
	waitUntil(t, "the delivered copy swept", func() bool { return pending(t, s, "app") == 0 })

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.js.DeleteConsumer(ctx, firstPart(s).name, "deliver_app"); err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		put(t, s, "app", fmt.Sprintf("after-%d", i), []byte(fmt.Sprintf(`{"id":"after-%d"}`, i)))
	}
	waitUntil(t, "every event queued after the deletion delivered", func() bool {
		got := deliveredIDs(b)
		for i := range 5 {
			if got[fmt.Sprintf("after-%d", i)] == 0 {
				return false
			}
		}
		return true
	})
	if rs.recovered() == 0 {
		t.Error("the workers did not report subscribing anew")
	}
	if n := deliveredIDs(b)["before"]; n != 1 {
		t.Errorf("the event delivered before the deletion was delivered %d times", n)
	}
}

// TestWorkersRecoverADeletedStream: the stream deleted (to restore a
// backup, say) is made again by the next Enqueue or by the workers, and
// delivery goes on.
func TestWorkersRecoverADeletedStream(t *testing.T) {
	s, b, rs := healSetup(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.js.DeleteStream(ctx, firstPart(s).name); err != nil {
		t.Fatal(err)
	}
	put(t, s, "app", "after-stream", []byte(`{"id":"after-stream"}`))
	waitUntil(t, "delivery into the stream made again", func() bool { return deliveredIDs(b)["after-stream"] == 1 })
	if rs.recovered() == 0 {
		t.Error("the workers did not report subscribing anew")
	}
}

// TestEmbeddedStoreRecoversFromAFullDisk: the embedded store's filesystem
// fills (a real, small tmpfs): nats-server shuts its JetStream down;
// Enqueue fails with ErrDown and the server's reason, logged at ERROR.
// Once the filler is deleted, the store accepts and delivers again, with
// no restart, and nothing stored before is lost.
func TestEmbeddedStoreRecoversFromAFullDisk(t *testing.T) {
	dir := testfs.Small(t, "24m")
	core, logs := observer.New(zap.DebugLevel)
	s := openTest(t, Config{Dir: filepath.Join(dir, "js"), MaxBytes: 4 << 20, DeadMaxBytes: 2 << 20, Logger: zap.New(core)})
	defer s.Close()
	b := newBackend(t, func(int) int { return http.StatusServiceUnavailable })
	// The breaker off: the backend is fixed once the disk has room, and
	// the copies are to come at their 100ms schedule, not a probe's.
	stop, err := s.StartWorkers(context.Background(), Destination{Name: "app", URL: b.URL, Retry: []time.Duration{100 * time.Millisecond}, BreakerFailures: BreakerOff}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	put(t, s, "app", "kept", []byte(`{"id":"kept"}`))

	filler := filepath.Join(dir, "filler")
	testfs.Fill(t, filler)
	var failed error
	body := []byte(`{"id":"x","pad":"` + strings.Repeat("p", 64<<10) + `"}`)
	for i := 0; i < 200 && failed == nil; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, failed = s.Enqueue(ctx, Message{Destination: "app", EventID: []byte(fmt.Sprintf(`"fill-%d"`, i)), ID: "fill", Body: body})
		cancel()
	}
	if failed == nil {
		t.Fatal("a full disk never refused an event")
	}
	t.Logf("refused: %v", failed)
	for _, e := range logs.FilterLevelExact(zap.ErrorLevel).All() {
		t.Logf("log: %s", e.Message)
	}
	waitUntil(t, "the store saying it is down", func() bool { return errors.Is(s.Down(), ErrDown) })
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	_, err = s.Enqueue(ctx, Message{Destination: "app", EventID: []byte(`"while-full"`), ID: "while-full", Body: []byte(`{}`)})
	cancel()
	if !errors.Is(err, ErrDown) {
		t.Errorf("Enqueue on a full disk: %v, want ErrDown", err)
	}
	waitUntil(t, "an ERROR line with the reason", func() bool {
		return logs.FilterLevelExact(zap.ErrorLevel).FilterMessageSnippet("embedded store stopped").Len() > 0
	})

	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	b.setFail(func(int) int { return http.StatusNoContent })
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, err := s.Enqueue(ctx, Message{Destination: "app", EventID: []byte(`"after-full"`), ID: "after-full", Body: []byte(`{"id":"after-full"}`)})
		cancel()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("still refused 30s after the disk had room: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	waitUntil(t, "the copies stored before and after delivered", func() bool {
		got := deliveredIDs(b)
		return got["kept"] > 0 && got["after-full"] > 0
	})
	waitUntil(t, "a log line saying the store accepts events again", func() bool {
		return logs.FilterMessageSnippet("accepts events again").Len() > 0
	})
}

// TestCloseWhileHealing: Close while heal starts the embedded JetStream
// again (a reload or a stop just as the full disk was freed) returns only
// once heal is done: nothing of the old server recovers or writes the
// store after its directory's lock is released for the next owner.
func TestCloseWhileHealing(t *testing.T) {
	healing := make(chan struct{})
	var once sync.Once
	pause := func() { once.Do(func() { close(healing) }); time.Sleep(500 * time.Millisecond) } // recovering a large store
	s := openTest(t, Config{Dir: t.TempDir(), healPause: pause})
	s.natsLog.broken.Store(true) // as a failed write leaves it
	<-healing
	s.Close()
	buf := make([]byte, 4<<20)
	if stacks := string(buf[:runtime.Stack(buf, true)]); strings.Contains(stacks, "(*Store).heal") {
		t.Errorf("heal still runs after Close returned:\n%s", stacks)
	}
}

// TestDeadStreamDeletedByHand: the dead letters' stream deleted by hand
// is made again by the next copy that becomes a dead letter, which is
// kept there.
func TestDeadStreamDeletedByHand(t *testing.T) {
	s := openTest(t, Config{Dir: t.TempDir()})
	defer s.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.js.DeleteStream(ctx, DeadStream(s.cfg.Stream)); err != nil {
		t.Fatal(err)
	}
	b := newBackend(t, func(int) int { return http.StatusInternalServerError })
	stop, err := s.StartWorkers(context.Background(), Destination{Name: "app", URL: b.URL, MaxAttempts: 1}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	put(t, s, "app", "doomed", []byte(`{"id":"doomed"}`))
	waitUntil(t, "the dead letter kept", func() bool {
		dead, err := s.Dead(context.Background(), "app")
		return err == nil && len(dead) == 1 && dead[0].ID == "doomed"
	})
}

// TestAttemptInFlightWhileTheStreamIsMadeAgain: an attempt of a copy
// from the stream before it was deleted ends after the stream was made
// again, and its copy's sequence was reused by a new event, which a new
// worker tried and is retrying: the old attempt's acknowledgement must
// not settle the new event (acks name the stream sequence, and the
// consumer has the same name). Every event answered after the stream was
// made again is delivered.
func TestAttemptInFlightWhileTheStreamIsMadeAgain(t *testing.T) {
	s := openTest(t, Config{Dir: t.TempDir(), Partitions: 1})
	defer s.Close()
	release := make(chan struct{})
	var mu sync.Mutex
	seen := map[string]int{}
	delivered := map[string]int{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id := r.Header.Get("Idempotency-Key")
		mu.Lock()
		seen[id]++
		n := seen[id]
		mu.Unlock()
		switch {
		case id == "old" && n == 1:
			<-release // slow: still in flight while the stream is deleted and made again
		case id == "new" && n == 1:
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		mu.Lock()
		delivered[id]++
		mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
	}))
	defer srv.Close()
	defer close(release)
	count := func(m map[string]int, id string) int { mu.Lock(); defer mu.Unlock(); return m[id] }

	stop, err := s.StartWorkers(context.Background(), Destination{Name: "app", URL: srv.URL, Concurrency: 2, Timeout: 20 * time.Second,
		Retry: []time.Duration{3 * time.Second}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	put(t, s, "app", "old", []byte(`{"id":"old"}`))
	waitUntil(t, "the old copy's attempt in flight", func() bool { return count(seen, "old") == 1 })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.js.DeleteStream(ctx, firstPart(s).name); err != nil {
		t.Fatal(err)
	}
	// The stream made again (sequence 1 again), by this Enqueue or by the
	// workers' supervisor: a publish that lands while the stream is being
	// made may get no answer (mux_deliver would answer 503 and Mux send it
	// again), so it is sent again, as Mux would.
	var enqueued error
	for try := 0; try < 4; try++ {
		tctx, tcancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, enqueued = s.Enqueue(tctx, Message{Destination: "app", EventID: []byte(`"new"`), ID: "new", Body: []byte(`{"id":"new"}`)})
		tcancel()
		if enqueued == nil {
			break
		}
	}
	if enqueued != nil {
		t.Fatalf("Enqueue into the stream made again, 4 tries: %v", enqueued)
	}
	waitUntil(t, "the new event's first attempt (failed, retried in 3s)", func() bool { return count(seen, "new") == 1 })
	release <- struct{}{} // the old attempt succeeds now, and acknowledges "its" sequence 1
	deadline := time.Now().Add(15 * time.Second)
	for count(delivered, "new") == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the event answered after the stream was made again was never delivered (attempts %d); pending %d", count(seen, "new"), pending(t, s, "app"))
		}
		time.Sleep(50 * time.Millisecond)
	}
}
