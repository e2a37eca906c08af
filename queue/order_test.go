package queue

import (
	"context"
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/internal/testorder"
	"github.com/nats-io/nats.go/jetstream"
)

// TestOrderObjectHoldsOnlyItsObject: with order object and concurrency
// 4, an object whose first event fails twice holds its 4 later events
// (the status counts them held) while 20 other objects' events are
// delivered; then its events arrive in the order they were stored,
// never two at once, each later one on its first attempt (a held copy is
// not charged).
func TestOrderObjectHoldsOnlyItsObject(t *testing.T) {
	s := openTest(t, Config{Dir: t.TempDir()})
	defer s.Close()
	release := make(chan struct{})
	b := testorder.New(t, 10*time.Millisecond, func(_ *http.Request, id string, n int) int {
		if id == "a-0" && n <= 2 {
			if n == 2 {
				<-release
			}
			return http.StatusServiceUnavailable
		}
		return http.StatusNoContent
	})
	for i := range 5 {
		putObject(t, s, "app", fmt.Sprintf("a-%d", i), "asset-a")
	}
	for i := range 20 {
		putObject(t, s, "app", fmt.Sprintf("o-%d", i), fmt.Sprintf("asset-%d", i))
	}
	d := Destination{Name: "app", URL: b.URL, Concurrency: 4, OrderObject: true, Retry: []time.Duration{300 * time.Millisecond}}
	stop, err := s.StartWorkers(context.Background(), d, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	waitUntil(t, "the other 20 objects delivered while a-0 fails", func() bool {
		for i := range 20 {
			if len(b.Of(fmt.Sprintf("asset-%d", i))) != 1 {
				return false
			}
		}
		return true
	})
	if got := b.Of("asset-a"); len(got) != 0 {
		t.Fatalf("asset-a's events delivered before its first: %v", got)
	}
	waitUntil(t, "4 held in the status", func() bool {
		st, err := s.Status(context.Background(), "app", true)
		return err == nil && st.Held == 4
	})
	close(release)
	waitUntil(t, "asset-a's 5 events delivered", func() bool { return len(b.Of("asset-a")) == 5 })
	want := []string{"a-0", "a-1", "a-2", "a-3", "a-4"}
	b.CheckOrder(t, map[string][]string{"asset-a": want})
	if got := b.Attempts("a-0"); fmt.Sprint(got) != "[1 2 3]" {
		t.Errorf("a-0's attempts %v, want [1 2 3]", got)
	}
	for _, id := range want[1:] {
		if got := b.Attempts(id); fmt.Sprint(got) != "[1]" {
			t.Errorf("%s, held, came as attempts %v; want one POST, attempt 1", id, got)
		}
	}
}

// TestOrderObjectAfterADeadLetter: an object's first event that becomes
// a dead letter lets the next ones go, in order; a destination without
// order object does not wait.
func TestOrderObjectAfterADeadLetter(t *testing.T) {
	s := openTest(t, Config{Dir: t.TempDir()})
	defer s.Close()
	b := testorder.New(t, 0, func(_ *http.Request, id string, n int) int {
		if id == "a-0" {
			return http.StatusInternalServerError
		}
		return http.StatusNoContent
	})
	for i := range 4 {
		putObject(t, s, "app", fmt.Sprintf("a-%d", i), "asset-a")
	}
	d := Destination{Name: "app", URL: b.URL, Concurrency: 4, OrderObject: true, MaxAttempts: 2, Retry: []time.Duration{100 * time.Millisecond}}
	stop, err := s.StartWorkers(context.Background(), d, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	waitUntil(t, "a-1..a-3 delivered after a-0 died", func() bool { return len(b.Of("asset-a")) == 3 })
	if got := b.Of("asset-a"); fmt.Sprint(got) != "[a-1 a-2 a-3]" {
		t.Errorf("delivered %v", got)
	}
	if st, err := s.Status(context.Background(), "app", true); err != nil || st.Dead != 1 || st.Held != 0 {
		t.Errorf("status: %+v %v", st, err)
	}
}

// TestHeldCopyAfterAStop: workers stopped while an object's first event
// waits for its retry, and started again, still hold the later events
// until it is delivered (the hold is read from the stream, not memory).
func TestHeldCopyAfterAStop(t *testing.T) {
	dir := t.TempDir()
	s := openTest(t, Config{Dir: dir})
	var mu sync.Mutex
	up := false
	b := testorder.New(t, 0, func(_ *http.Request, id string, n int) int {
		mu.Lock()
		defer mu.Unlock()
		if id == "a-0" && !up {
			return http.StatusServiceUnavailable
		}
		return http.StatusNoContent
	})
	for i := range 3 {
		putObject(t, s, "app", fmt.Sprintf("a-%d", i), "asset-a")
	}
	d := Destination{Name: "app", URL: b.URL, OrderObject: true, Retry: []time.Duration{200 * time.Millisecond}}
	stop, err := s.StartWorkers(context.Background(), d, nil)
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "a-0 attempted", func() bool { return len(b.Attempts("a-0")) > 0 })
	stop()
	s.Close()
	s = openTest(t, Config{Dir: dir})
	defer s.Close()
	stop, err = s.StartWorkers(context.Background(), d, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	time.Sleep(time.Second)
	if got := b.Of("asset-a"); len(got) != 0 {
		t.Fatalf("after a restart, delivered %v before a-0", got)
	}
	mu.Lock()
	up = true
	mu.Unlock()
	waitUntil(t, "3 delivered", func() bool { return len(b.Of("asset-a")) == 3 })
	if got := b.Of("asset-a"); fmt.Sprint(got) != "[a-0 a-1 a-2]" {
		t.Errorf("delivered %v", got)
	}
}

// TestHoldAcknowledgesASettledCopy: a delivery of an ordered copy that
// is no longer stored (delivered by another delivery of it, whose ack
// deadline had passed) is acknowledged, never attempted; the copy behind
// it is held while the earlier one is stored, and goes once it is not.
func TestHoldAcknowledgesASettledCopy(t *testing.T) {
	s := openTest(t, Config{Dir: t.TempDir(), Partitions: 1})
	defer s.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	putObject(t, s, "app", "a", "asset-x")
	putObject(t, s, "app", "b", "asset-x")
	p := firstPart(s)
	d := Destination{Name: "app", OrderObject: true}
	d.defaults()
	cons, err := s.makeConsumer(ctx, p, d)
	if err != nil {
		t.Fatal(err)
	}
	batch, err := cons.Fetch(2, jetstream.FetchMaxWait(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	var msgs []jetstream.Msg
	for m := range batch.Messages() {
		msgs = append(msgs, m)
	}
	if len(msgs) != 2 {
		t.Fatalf("fetched %d copies, want 2", len(msgs))
	}
	g := &destWorkers{s: s, d: &d, ctx: ctx, room: newWaitingRoom()}
	w := &workerRun{destWorkers: g, p: p}
	w.sw = newSweeper(s, p.stream, cons, p.filter("app"))
	a, b := msgs[0], msgs[1]
	if w.hold(a) {
		t.Fatal("the first copy of its object was held")
	}
	if !w.hold(b) {
		t.Fatal("the second copy was not held while the first is stored")
	}
	metaA, _ := a.Metadata()
	if err := p.stream.DeleteMsg(ctx, metaA.Sequence.Stream); err != nil { // delivered by another delivery of it
		t.Fatal(err)
	}
	if !w.hold(a) {
		t.Fatal("a delivery of a copy no longer stored was attempted")
	}
	waitUntil(t, "the settled copy's delivery acknowledged (1 ack pending, the second copy's)", func() bool {
		info, err := cons.Info(ctx)
		return err == nil && info.NumAckPending == 1
	})
	if held := g.room.take(b.Subject(), 0); len(held) != 1 || w.hold(held[0].msg) {
		t.Errorf("the second copy, now first, is held still (room: %d)", len(held))
	}
}
