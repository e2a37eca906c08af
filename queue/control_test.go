package queue

import (
	"context"
	"fmt"
	"net/http"
	"strconv"
	"sync/atomic"
	"testing"
	"time"
)

// TestPauseHoldsAcrossARestartAndResumeDelivers: a paused destination's
// workers attempt nothing, also after the store is closed and opened
// again (a restart) with new workers; resumed, every copy is delivered on
// its first attempt (the pause used none), and the status says paused,
// since when and by whom while it was.
func TestPauseHoldsAcrossARestartAndResumeDelivers(t *testing.T) {
	dir := t.TempDir()
	b := newArrivals(t, func(string, int, http.ResponseWriter) {})
	var notices atomic.Int32
	dest := Destination{Name: "app", URL: b.URL, Retry: []time.Duration{50 * time.Millisecond},
		OnPause: func(*Pause) { notices.Add(1) }}
	s := openTest(t, Config{Dir: dir})
	stop, err := s.StartWorkers(context.Background(), dest, nil)
	if err != nil {
		t.Fatal(err)
	}
	put(t, s, "app", "before", []byte(`{"type":"video.asset.ready","id":"before"}`))
	waitUntil(t, "the first event delivered", func() bool { at, _ := b.of("before"); return len(at) == 1 })

	ctx := context.Background()
	if err := s.SetPaused(ctx, "app", true, "gw-test"); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the workers noticing the pause", func() bool { return notices.Load() == 1 })
	for i := range 5 {
		put(t, s, "app", "held-"+strconv.Itoa(i), []byte(fmt.Sprintf(`{"type":"video.asset.ready","id":"held-%d"}`, i)))
	}
	time.Sleep(1500 * time.Millisecond)
	if at, _ := b.of("held-0"); len(at) != 0 {
		t.Fatal("a paused destination got an event")
	}
	st, err := s.Status(ctx, "app", false)
	if err != nil || st.Pause == nil || st.Pause.By != "gw-test" || time.Since(st.Pause.Since) > time.Minute || st.Pending+st.InFlight != 5 {
		t.Fatalf("status while paused: %+v, pause %+v, %v", st, st.Pause, err)
	}
	var w Watchdog
	if stalled, _ := w.Check(dest, st, time.Now().Add(time.Hour)); stalled {
		t.Error("the watchdog calls a paused destination stalled")
	}

	// A restart: the pause is kept in JetStream.
	stop()
	s.Close()
	s = openTest(t, Config{Dir: dir})
	defer s.Close()
	stop, err = s.StartWorkers(context.Background(), dest, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	time.Sleep(1500 * time.Millisecond)
	if at, _ := b.of("held-0"); len(at) != 0 {
		t.Fatal("after a restart, a paused destination got an event")
	}
	if err := s.SetPaused(ctx, "app", false, "gw-test"); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "every held event delivered after resume", func() bool {
		for i := range 5 {
			if at, _ := b.of("held-" + strconv.Itoa(i)); len(at) != 1 {
				return false
			}
		}
		return true
	})
	for i := range 5 {
		if _, numbers := b.of("held-" + strconv.Itoa(i)); fmt.Sprint(numbers) != "[1]" {
			t.Errorf("held-%d: Mux-Webhook-Attempt %v, want [1]", i, numbers)
		}
	}
	if p, err := s.Paused(ctx, "app"); p != nil || err != nil {
		t.Errorf("resumed, yet Paused says %+v, %v", p, err)
	}
	if err := s.SetPaused(ctx, "app", false, ""); err != nil {
		t.Errorf("resuming an active destination: %v", err)
	}
}

// TestPausedPastMaxAgeGetsOneAttempt: a copy that failed once, then waited
// paused for longer than max_age, gets one attempt once the destination is
// resumed (delivered here), instead of being buried without a POST.
func TestPausedPastMaxAgeGetsOneAttempt(t *testing.T) {
	s := openTest(t, Config{Dir: t.TempDir()})
	defer s.Close()
	var up atomic.Bool
	b := newArrivals(t, func(id string, n int, w http.ResponseWriter) {
		if !up.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	})
	var paused atomic.Bool
	stop, err := s.StartWorkers(context.Background(), Destination{Name: "app", URL: b.URL, Timeout: 2 * time.Second, Retry: []time.Duration{300 * time.Millisecond}, MaxAge: 2 * time.Second,
		OnPause: func(p *Pause) { paused.Store(p != nil) }}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	ctx := context.Background()
	put(t, s, "app", "old", []byte(`{"type":"video.asset.ready","id":"old"}`))
	waitUntil(t, "a first failed attempt", func() bool { at, _ := b.of("old"); return len(at) == 1 })
	if err := s.SetPaused(ctx, "app", true, "test"); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the pause noticed", paused.Load)
	time.Sleep(2500 * time.Millisecond) // past max_age, paused
	before, _ := b.of("old")
	up.Store(true)
	if err := s.SetPaused(ctx, "app", false, "test"); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "one attempt after the resume", func() bool { at, _ := b.of("old"); return len(at) == len(before)+1 })
	st, err := s.Status(ctx, "app", false)
	if err != nil || st.Dead != 0 || st.Pending+st.InFlight != 0 {
		t.Errorf("after the resume: %+v %v (want it delivered, not a dead letter)", st, err)
	}
	if _, numbers := b.of("old"); numbers[len(numbers)-1] != strconv.Itoa(len(before)+1) {
		t.Errorf("attempts %v: the one after the resume is not the next number", numbers)
	}
}
