package queue

import (
	"context"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
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

	stop, err := s.Deliver(context.Background(), Destination{Name: "app", URL: srv.URL, Concurrency: 2, Timeout: 20 * time.Second,
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
	{ // the stream made again: sequence 1 again
		done := make(chan error, 1)
		go func() {
			_, err := s.Enqueue(ctx, Message{Destination: "app", EventID: []byte(`"new"`), ID: "new", Body: []byte(`{"id":"new"}`)})
			done <- err
		}()
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(3 * time.Second):
			buf := make([]byte, 1<<20)
			for _, g := range strings.Split(string(buf[:runtime.Stack(buf, true)]), "\n\n") {
				if strings.Contains(g, "Enqueue") || strings.Contains(g, "supervise") {
					t.Logf("%s", g)
				}
			}
			t.Fatal("Enqueue into the stream made again hangs")
		}
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
