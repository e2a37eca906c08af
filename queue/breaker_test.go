package queue

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestBreakerCounts: failures in a row for the destination's reasons
// trip it (a 2xx starts the count again, another 4xx counts for nothing);
// a failed probe sets the next one a probe interval later, a delivered one
// resets it; a reset (a resume) closes it.
func TestBreakerCounts(t *testing.T) {
	b := newBreaker(&Destination{BreakerFailures: 3, BreakerProbe: time.Minute})
	now := time.Unix(1000, 0)
	fail := func(status int) Attempt { return Attempt{Status: status, Err: errors.New("x")} }
	for _, a := range []Attempt{fail(503), fail(0), {Status: 200}, fail(429), fail(400), fail(404), fail(500)} {
		if b.record(a, now) {
			t.Fatalf("tripped after %+v, with no 3 destination failures in a row", a)
		}
	}
	if !b.record(fail(502), now) || !b.tripped() {
		t.Fatal("a third destination failure in a row (429, 500, 502; the 4xx between count for nothing) did not trip it")
	}
	if b.record(fail(502), now) {
		t.Error("an attempt begun before the trip tripped it again")
	}
	if b.record(Attempt{Err: errors.New("x"), NoAttempt: true}, now) {
		t.Error("a burial without a POST changed it")
	}
	if b.probeDue(now.Add(59 * time.Second)) {
		t.Error("a probe due before the interval")
	}
	if !b.probeDue(now.Add(time.Minute)) || b.probeDue(now.Add(time.Minute)) {
		t.Error("one probe due at the interval, and only one at a time")
	}
	if b.probed(false, now.Add(time.Minute)) || b.snapshot().NextProbe != now.Add(2*time.Minute) || !b.tripped() {
		t.Errorf("a failed probe: %+v", b.snapshot())
	}
	if !b.probeDue(now.Add(2*time.Minute)) || !b.probed(true, now.Add(2*time.Minute)) || b.tripped() {
		t.Errorf("a delivered probe did not reset it: %+v", b.snapshot())
	}
	for range 3 {
		b.record(fail(503), now)
	}
	if !b.tripped() || !b.reset(now) || b.tripped() || b.reset(now) {
		t.Error("reset (a resume) does not close a tripped breaker, once")
	}
	for range 3 {
		b.record(fail(503), now)
	}
	if !b.record(Attempt{Status: 200}, now) || b.tripped() {
		t.Error("a 2xx of an attempt begun before the trip did not reset it (the first 2xx resets it)")
	}
	if newBreaker(&Destination{BreakerFailures: BreakerOff}) != nil {
		t.Error("breaker off still breaks")
	}
}

// TestBreakerWeekendOutage: a backend down for "a weekend" (compressed: a
// retry schedule of 100ms) trips the breaker after 5 failures; then it is
// probed about once per 500ms, not hammered with every copy's retries;
// once it is back, a probe resets the breaker and every event is delivered,
// none a dead letter, each with its attempts counted right: numbers from
// 1, each the one before or one more (a failed probe charges nothing,
// nor does a delivery lost on its way to workers that stopped pulling:
// the count travels with the copy, attempts.go).
func TestBreakerWeekendOutage(t *testing.T) {
	s := openTest(t, Config{Dir: t.TempDir()})
	defer s.Close()
	var up atomic.Bool
	b := newArrivals(t, func(id string, n int, w http.ResponseWriter) {
		if !up.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	})
	var mu sync.Mutex
	var states []BreakerState
	stop, err := s.StartWorkers(context.Background(), Destination{Name: "app", URL: b.URL, Timeout: 2 * time.Second,
		Retry: []time.Duration{100 * time.Millisecond}, BreakerFailures: 5, BreakerProbe: 500 * time.Millisecond,
		OnBreaker: func(st BreakerState) { mu.Lock(); states = append(states, st); mu.Unlock() }}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	const n = 20
	for i := range n {
		id := "weekend-" + strconv.Itoa(i)
		put(t, s, "app", id, []byte(`{"type":"video.asset.ready","id":"`+id+`"}`))
	}
	waitUntil(t, "the breaker tripping", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return slices.ContainsFunc(states, func(s BreakerState) bool { return s.Tripped })
	})
	tripped := time.Now()
	b.mu.Lock()
	atTrip := len(b.all)
	b.mu.Unlock()
	time.Sleep(3 * time.Second) // the weekend
	b.mu.Lock()
	during := b.all[atTrip:]
	b.mu.Unlock()
	// Without the breaker: 20 copies every 100ms, some 600 attempts.
	// With it: a probe every 500ms (and the attempts in flight at the
	// trip, at most concurrency 4).
	if max := 4 + int(time.Since(tripped)/(500*time.Millisecond)) + 1; len(during) > max {
		t.Errorf("the tripped destination got %d requests in %s, want at most %d", len(during), time.Since(tripped), max)
	}
	for i := 5; i < len(during); i++ {
		if gap := during[i].Sub(during[i-1]); gap < 400*time.Millisecond {
			t.Errorf("probes %d and %d came %s apart, want a probe interval (500ms)", i, i+1, gap)
		}
	}
	up.Store(true)
	waitUntil(t, "every event delivered", func() bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		for i := range n {
			at := b.at["weekend-"+strconv.Itoa(i)]
			if len(at) == 0 {
				return false
			}
		}
		return true
	})
	mu.Lock()
	if last := states[len(states)-1]; last.Tripped {
		t.Errorf("the breaker did not reset: %+v", states)
	}
	mu.Unlock()
	st, err := s.Status(context.Background(), "app", false)
	if err != nil || st.Dead != 0 {
		t.Errorf("dead letters: %+v %v", st, err)
	}
	for i := range n {
		_, numbers := b.of("weekend-" + strconv.Itoa(i))
		prev := 0
		for _, v := range numbers {
			k, _ := strconv.Atoi(v)
			if k != prev && k != prev+1 || k < 1 {
				t.Errorf("weekend-%d: attempts %v: want numbers from 1, each the one before or one more", i, numbers)
				break
			}
			prev = k
		}
	}
}

// TestResumeResetsTheBreaker: a tripped destination whose next probe is
// an hour away is reset by a resume (SetPaused false), and delivers at
// once.
func TestResumeResetsTheBreaker(t *testing.T) {
	s := openTest(t, Config{Dir: t.TempDir()})
	defer s.Close()
	var up atomic.Bool
	b := newArrivals(t, func(id string, n int, w http.ResponseWriter) {
		if !up.Load() {
			w.WriteHeader(http.StatusBadGateway)
		}
	})
	var tripped, reset atomic.Bool
	stop, err := s.StartWorkers(context.Background(), Destination{Name: "app", URL: b.URL, Retry: []time.Duration{50 * time.Millisecond},
		BreakerFailures: 3, BreakerProbe: time.Hour,
		OnBreaker: func(st BreakerState) {
			if st.Tripped {
				tripped.Store(true)
			} else if tripped.Load() {
				reset.Store(true) // not the closed state new workers start with
			}
		}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	put(t, s, "app", "held", []byte(`{"type":"video.asset.ready","id":"held"}`))
	waitUntil(t, "the breaker tripping", tripped.Load)
	up.Store(true)
	if err := s.SetPaused(context.Background(), "app", false, "test"); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the resume resetting the breaker", reset.Load)
	waitUntil(t, "the event delivered (3 failures, then a 2xx)", func() bool { at, _ := b.of("held"); return len(at) == 4 })
}
