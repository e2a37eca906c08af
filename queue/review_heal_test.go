package queue

import (
	"context"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"
)

// TestAttemptInFlightWhileTheStreamIsMadeAgain: an attempt of a copy
// from the stream before it was deleted ends after the stream was made
// again, and its copy's sequence was reused by a new event, which a new
// worker tried and is retrying: the old attempt's acknowledgement must
// not settle the new event (acks name the stream sequence, and the
// consumer has the same name). Every event answered after the stream was
// made again is delivered.
func TestAttemptInFlightWhileTheStreamIsMadeAgain(t *testing.T) {
	s := openTest(t, Config{Dir: t.TempDir()})
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
	if err := s.js.DeleteStream(ctx, s.cfg.Stream); err != nil {
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
