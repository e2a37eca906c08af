package queue

import (
	"testing"
	"time"
)

// TestWatchdog: a destination is stalled only when copies wait and the
// stream handed none to a worker for longer than the schedule allows:
// timeout + stall_after for copies due now, plus the longest retry delay
// for copies waiting for a retry; any delivery, or an empty queue, is
// progress.
func TestWatchdog(t *testing.T) {
	d := Destination{Name: "app", Timeout: 10 * time.Second, Retry: []time.Duration{time.Second, 30 * time.Second}, StallAfter: time.Minute}
	t0 := time.Unix(1_800_000_000, 0)
	at := func(s int) time.Time { return t0.Add(time.Duration(s) * time.Second) }
	var w Watchdog
	steps := []struct {
		at    int
		st    Status
		stall bool
	}{
		{0, Status{}, false},
		{5, Status{Pending: 3}, false},                           // due now: 70s allowed since the last progress (0)
		{69, Status{Pending: 3}, false},                          //
		{71, Status{Pending: 3}, true},                           // nothing handed out for 71s
		{72, Status{Pending: 2, LastDelivered: at(72)}, false},   // a delivery is progress
		{150, Status{InFlight: 2, LastDelivered: at(72)}, false}, // waiting for a retry: 100s allowed
		{173, Status{InFlight: 2, LastDelivered: at(72)}, true},
		{174, Status{}, false}, // all settled
		{399, Status{}, false}, // (read every few seconds: still nothing queued)
		{400, Status{Pending: 1, NoConsumer: true}, false},
		{471, Status{Pending: 1, NoConsumer: true}, true},
	}
	for _, s := range steps {
		got, since := w.Check(d, s.st, at(s.at))
		if got != s.stall {
			t.Errorf("at %ds with %+v: stalled %v, want %v (since %v)", s.at, s.st, got, s.stall, since.Sub(t0))
		}
	}
}
