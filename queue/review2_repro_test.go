//go:build review2repro

// Reproductions of review findings left open (run with -tags review2repro);
// they fail on the current code.

package queue

import (
	"context"
	"fmt"
	"net/http"
	"testing"
	"time"
)

// TestAttemptsBoundedAcrossAConsumerMadeAgain: max_attempts 3, a backend
// that always fails, the destination's consumer deleted by hand after
// each attempt (the workers make it again). After the third POST the
// copy must be a dead letter; it is not: JetStream's delivery count, the
// attempt number, starts from 1 on the consumer made again, so each
// deletion buys max_attempts more POSTs.
func TestAttemptsBoundedAcrossAConsumerMadeAgain(t *testing.T) {
	s := openTest(t, Config{Dir: t.TempDir()})
	defer s.Close()
	b := newBackend(t, func(int) int { return http.StatusInternalServerError })
	rs := &restarts{}
	stop, err := s.Deliver(context.Background(), Destination{Name: "app", URL: b.URL, MaxAttempts: 3, Retry: []time.Duration{time.Hour}, Timeout: 2 * time.Second, OnRestart: rs.on}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	posts := func() int { r, _ := b.requests(); return len(r) }
	put(t, s, "app", "bounded", []byte(`{"id":"bounded"}`))
	for n := 1; n <= 2; n++ {
		waitUntil(t, "a POST", func() bool { return posts() == n })
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		if err := s.js.DeleteConsumer(ctx, s.cfg.Stream, "deliver_app"); err != nil {
			t.Fatal(err)
		}
		cancel()
	}
	waitUntil(t, "the third POST", func() bool { return posts() == 3 })
	waitUntil(t, "a dead letter after 3 POSTs (max_attempts 3)", func() bool {
		dead, err := s.Dead(context.Background(), "app")
		return err == nil && len(dead) == 1
	})
}

// TestMovingManyOldDeadLettersFitsTheStart: the dead letters of an
// earlier version are moved one by one inside Open (a publish and a
// delete, each fsynced), within the start's 30 s (deliver.go's open).
// This measures the rate and fails if 100000 old dead letters (100 MB at
// 1 KiB each, a tenth of the old default max_bytes) would not fit: then
// Caddy fails to start after the upgrade, again at each restart, until
// enough were moved.
func TestMovingManyOldDeadLettersFitsTheStart(t *testing.T) {
	dir := t.TempDir()
	s := openTest(t, Config{Dir: dir})
	const n = 2000
	for i := range n {
		putDead(t, s, DefaultStream+".dead.x", fmt.Sprintf("old-%d", i))
	}
	s.Close()
	start := time.Now()
	s = openTest(t, Config{Dir: dir})
	took := time.Since(start)
	s.Close()
	perSecond := float64(n) / took.Seconds()
	t.Logf("moved %d old dead letters in %s (%.0f/s): 30 s move %.0f", n, took, perSecond, 30*perSecond)
	if 30*perSecond < 100000 {
		t.Errorf("at %.0f/s, 100000 old dead letters take %s: longer than the start's 30 s", perSecond, time.Duration(float64(100000)/perSecond*float64(time.Second)))
	}
}
