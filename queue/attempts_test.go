package queue

import (
	"context"
	"fmt"
	"net/http"
	"testing"
	"time"
)

// TestCountedAttemptsSurviveARestart: a copy answered 503 (charged) and
// then 429 (not charged) has had three deliveries and one counted attempt;
// after the Store is closed and opened again with an empty hand-back
// ledger (a restart), its next attempt is number 2, read from the bucket
// of counted attempts, not 3 (JetStream's deliveries).
func TestCountedAttemptsSurviveARestart(t *testing.T) {
	dir := t.TempDir()
	b := newArrivals(t, func(id string, n int, w http.ResponseWriter) {
		switch n {
		case 1:
			w.WriteHeader(http.StatusServiceUnavailable)
		case 2:
			w.WriteHeader(http.StatusTooManyRequests)
		}
	})
	dest := Destination{Name: "app", URL: b.URL, Retry: []time.Duration{50 * time.Millisecond}, BreakerFailures: BreakerOff}
	s := openTest(t, Config{Dir: dir})
	stop, err := s.StartWorkers(context.Background(), dest, nil)
	if err != nil {
		t.Fatal(err)
	}
	put(t, s, "app", "survivor", []byte(`{"type":"video.asset.ready","id":"survivor"}`))
	waitUntil(t, "a 503 and a 429", func() bool { at, _ := b.of("survivor"); return len(at) == 2 })
	stop()
	s.Close()

	s = openTest(t, Config{Dir: dir, HandBacks: NewHandBacks()})
	defer s.Close()
	stop, err = s.StartWorkers(context.Background(), dest, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	waitUntil(t, "the delivery after the restart", func() bool { at, _ := b.of("survivor"); return len(at) == 3 })
	if _, numbers := b.of("survivor"); fmt.Sprint(numbers) != "[1 2 2]" {
		t.Errorf("Mux-Webhook-Attempt %v, want [1 2 2]: the 503 counts, the 429 does not, and the count outlives the process", numbers)
	}
	waitUntil(t, "its count dropped once delivered", func() bool {
		kv, err := s.attemptsKV(context.Background())
		if err != nil {
			return false
		}
		keys, _ := kv.Keys(context.Background())
		return len(keys) == 0
	})
}
