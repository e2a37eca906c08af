package queue

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// TestStopsDoNotUseUpAttempts: workers stopped again and again (reloads)
// while a copy waits, fetched, behind a hung attempt hand that copy back,
// and that is no attempt: every request the backend gets carries as
// Mux-Webhook-Attempt one more than the requests it got before for the
// same event (the hung attempts, cancelled by the stops, reached it and
// count).
func TestStopsDoNotUseUpAttempts(t *testing.T) {
	s := openTest(t, Config{Dir: t.TempDir(), Stream: "HANDBACK_TEST"}) // a ledger of its own (none given: the Store makes one)
	defer s.Close()

	var mu sync.Mutex
	seen := map[string]int{}      // requests so far, per event id
	delivered := map[string]int{} // 2xx answers, per event id
	var wrong []string
	total, hang := 0, true
	done := make(chan struct{})
	b := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.ReadAll(r.Body)
		id := r.Header.Get("Idempotency-Key")
		n, _ := strconv.Atoi(r.Header.Get(HeaderAttempt))
		mu.Lock()
		seen[id]++
		total++
		if n != seen[id] {
			wrong = append(wrong, fmt.Sprintf("%s: attempt %d, request %d", id, n, seen[id]))
		}
		h := hang
		if !h {
			delivered[id]++
		}
		mu.Unlock()
		if h {
			select { // until the stopping worker cancels it
			case <-r.Context().Done():
			case <-done:
			}
			return
		}
		w.WriteHeader(http.StatusNoContent)
	}))
	defer b.Close()
	defer close(done)

	const events = 4
	for i := range events {
		put(t, s, "app", fmt.Sprint("hb-", i), []byte(`{}`))
	}
	requests := func() int {
		mu.Lock()
		defer mu.Unlock()
		return total
	}
	d := Destination{Name: "app", URL: b.URL, Concurrency: 1, Timeout: time.Minute, MaxAttempts: 100, StopGrace: 100 * time.Millisecond,
		Retry: []time.Duration{10 * time.Millisecond}}
	handedBack := 0
	for range 5 {
		before := requests()
		stop, err := s.StartWorkers(context.Background(), d, nil)
		if err != nil {
			t.Fatal(err)
		}
		// One attempt hangs; with concurrency 1 the next copy is fetched
		// and waits for the slot.
		waitUntil(t, "an attempt in progress", func() bool { return requests() > before })
		time.Sleep(100 * time.Millisecond)
		stop()
		s.handBacks.mu.Lock()
		handedBack = max(handedBack, len(s.handBacks.m))
		s.handBacks.mu.Unlock()
	}
	if handedBack == 0 {
		t.Fatal("no stop handed back a fetched copy: nothing was tested")
	}

	mu.Lock()
	hang = false
	mu.Unlock()
	stop, err := s.StartWorkers(context.Background(), d, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	waitUntil(t, "every event delivered", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(delivered) == events
	})
	mu.Lock()
	defer mu.Unlock()
	for _, w := range wrong {
		t.Error(w)
	}
	for id, n := range delivered {
		if n != 1 {
			t.Errorf("%s delivered %d times", id, n)
		}
	}
	waitUntil(t, "the ledger emptied as the copies settled", func() bool {
		s.handBacks.mu.Lock()
		defer s.handBacks.mu.Unlock()
		return len(s.handBacks.m) == 0
	})
}

// TestHandBackLedgerBounded: entries older than handBackTTL go (their
// copies were settled elsewhere), and an attempt number is never below 1.
func TestHandBackLedgerBounded(t *testing.T) {
	var h HandBacks
	t0 := time.Now()
	stored := t0.Add(-time.Minute)
	h.add(copyRef{seq: 1}, stored, 1, t0)
	h.add(copyRef{seq: 1}, stored, 2, t0)
	if got := h.attemptNumber(copyRef{seq: 1}, stored, 3, t0); got != 1 {
		t.Errorf("3rd delivery after 2 hand-backs: attempt %d, want 1", got)
	}
	if got := h.attemptNumber(copyRef{seq: 2}, stored, 4, t0); got != 4 {
		t.Errorf("no hand-back: attempt %d, want 4", got)
	}
	h.add(copyRef{seq: 2}, stored, 1, t0.Add(handBackTTL+time.Second))
	if _, ok := h.m[copyRef{seq: 1}]; ok || len(h.m) != 1 {
		t.Errorf("the old entry stayed: %v", h.m)
	}
	h.settled(copyRef{seq: 2})
	if len(h.m) != 0 {
		t.Errorf("a settled copy stayed: %v", h.m)
	}
}

// TestHandBackLedgerStale: an entry whose copy's count started again (a
// consumer made again) or whose sequence is another copy's (a stream made
// again) is dropped, not subtracted.
func TestHandBackLedgerStale(t *testing.T) {
	var h HandBacks
	t0 := time.Now()
	stored := t0.Add(-time.Minute)
	h.add(copyRef{seq: 1}, stored, 1, t0)
	h.add(copyRef{seq: 1}, stored, 2, t0)
	if got := h.attemptNumber(copyRef{seq: 1}, stored, 1, t0); got != 1 || len(h.m) != 0 {
		t.Errorf("a count from 1 again: attempt %d, ledger %v", got, h.m)
	}
	h.add(copyRef{seq: 1}, stored, 1, t0)
	if got := h.attemptNumber(copyRef{seq: 1}, stored.Add(time.Second), 2, t0); got != 2 || len(h.m) != 0 {
		t.Errorf("another copy at the same sequence: attempt %d, ledger %v", got, h.m)
	}
}

// TestHandBackLedgerOutlivesTheStore: a reload that changes the connection
// (new credentials) opens another Store on the same stream; what the old
// one's workers handed back still counts with the new one's.
func TestHandBackLedgerOutlivesTheStore(t *testing.T) {
	dir := t.TempDir()
	ledger := NewHandBacks()
	a := openTest(t, Config{Dir: dir, Stream: "LEDGER_TEST", HandBacks: ledger})
	a.Close()
	b := openTest(t, Config{Dir: dir, Stream: "LEDGER_TEST", HandBacks: ledger})
	defer b.Close()
	if b.handBacks != ledger {
		t.Error("a new Store given the stream's ledger has a ledger of its own: the old one's hand-backs would count as attempts")
	}
	c := openTest(t, Config{Dir: t.TempDir(), Stream: "OTHER_LEDGER_TEST"})
	defer c.Close()
	if c.handBacks == ledger || c.handBacks == nil {
		t.Error("a Store given no ledger shares one, or has none")
	}
}

// TestHandBacksDoNotOutliveTheirCounts: the ledger subtracts hand-backs
// from JetStream's delivery count; when that count starts again (the
// destination's consumer deleted and made again, or the stream deleted
// and made again by another instance, its sequences reused), what this
// Store handed back before must not lower the attempt numbers: the
// backend sees attempts 1, 2 and the copy is a dead letter after
// max_attempts 2, not after 4.
func TestHandBacksDoNotOutliveTheirCounts(t *testing.T) {
	for _, reset := range []string{"consumer", "stream"} {
		t.Run(reset, func(t *testing.T) {
			s := openTest(t, Config{Dir: t.TempDir(), Partitions: 1})
			defer s.Close()
			ctx := context.Background()
			d := Destination{Name: "app", MaxAttempts: 2, Retry: []time.Duration{10 * time.Millisecond}}
			d.defaults()
			put(t, s, "app", "first", []byte(`{}`))

			// Workers that stopped twice handed the fetched copy back.
			cons, err := s.js.CreateOrUpdateConsumer(ctx, firstPart(s).name, consumerConfig(firstPart(s), d))
			if err != nil {
				t.Fatal(err)
			}
			for range 2 {
				batch, err := cons.Fetch(1, jetstream.FetchMaxWait(5*time.Second))
				if err != nil {
					t.Fatal(err)
				}
				n := 0
				for msg := range batch.Messages() {
					s.handBack(msg)
					n++
				}
				if n != 1 {
					t.Fatalf("fetched %d copies, want 1", n)
				}
			}

			switch reset {
			case "consumer": // e.g. `nats consumer rm`, then the next workers make it again
				if err := s.js.DeleteConsumer(ctx, firstPart(s).name, "deliver_app"); err != nil {
					t.Fatal(err)
				}
			case "stream": // deleted; another instance's Open makes it again: sequences from 1
				if err := s.js.DeleteStream(ctx, firstPart(s).name); err != nil {
					t.Fatal(err)
				}
				if _, err := s.js.CreateOrUpdateStream(ctx, partConfig(s.cfg, 0)); err != nil {
					t.Fatal(err)
				}
				put(t, s, "app", "second", []byte(`{}`))
			}

			b := newBackend(t, func(int) int { return http.StatusInternalServerError })
			d.URL = b.URL
			stop, err := s.StartWorkers(ctx, d, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer stop()
			waitUntil(t, "a dead letter", func() bool {
				dead, err := s.Dead(ctx, "app")
				return err == nil && len(dead) == 1
			})
			stop()
			reqs, _ := b.requests()
			var got []int
			for _, r := range reqs {
				n, _ := strconv.Atoi(r.Header.Get(HeaderAttempt))
				got = append(got, n)
			}
			if len(got) != 2 || got[0] != 1 || got[1] != 2 {
				t.Errorf("attempt numbers the backend saw: %v, want [1 2] (max_attempts 2)", got)
			}
		})
	}
}
