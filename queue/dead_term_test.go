package queue

import (
	"context"
	"net/http"
	"testing"
	"time"
)

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
	s := openTest(t, Config{Dir: t.TempDir()})
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
	if err := s.js.DeleteConsumer(ctx, s.cfg.Stream, "deliver_app"); err != nil {
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
		st, err := s.Status(context.Background(), "app")
		return err == nil && st.Pending+st.InFlight == 0
	})
}
