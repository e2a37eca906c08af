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

// TestWatchdogAfterAReloadShortensRetry: copies scheduled for a retry in
// an hour, then a reload to retry 10s: they wait out the hour they were
// given, which is no stall.
func TestWatchdogAfterAReloadShortensRetry(t *testing.T) {
	long := Destination{Name: "app", Timeout: 10 * time.Second, Retry: []time.Duration{time.Hour}, StallAfter: time.Minute}
	short := long
	short.Retry = []time.Duration{10 * time.Second}
	t0 := time.Unix(1_800_000_000, 0)
	var w Watchdog
	w.Check(long, Status{InFlight: 2, LastDelivered: t0}, t0)
	if stalled, _ := w.Check(short, Status{InFlight: 2, LastDelivered: t0}, t0.Add(30*time.Minute)); stalled {
		t.Error("stalled 30 minutes into the hour the copies were scheduled for, after a reload to retry 10s")
	}
	if stalled, _ := w.Check(short, Status{InFlight: 2, LastDelivered: t0}, t0.Add(62*time.Minute)); !stalled {
		t.Error("not stalled past the hour plus timeout and stall_after")
	}
	w.Check(short, Status{}, t0.Add(63*time.Minute)) // emptied: the new schedule only
	if stalled, _ := w.Check(short, Status{InFlight: 1, LastDelivered: t0}, t0.Add(63*time.Minute+5*time.Second)); stalled {
		t.Error("stalled at once")
	}
	if stalled, _ := w.Check(short, Status{InFlight: 1, LastDelivered: t0}, t0.Add(65*time.Minute)); !stalled {
		t.Error("an emptied queue kept the old config's hour")
	}
}

// TestWatchdogHold: while the queue is down (it says so itself), time
// does not count toward a stall: the first reading after it is back is
// not a stall.
func TestWatchdogHold(t *testing.T) {
	d := Destination{Name: "app", Timeout: time.Second, StallAfter: time.Second}
	t0 := time.Unix(1_800_000_000, 0)
	var w Watchdog
	w.Check(d, Status{Pending: 1}, t0)
	w.Hold(t0.Add(time.Minute)) // down for a minute
	if stalled, _ := w.Check(d, Status{Pending: 1}, t0.Add(time.Minute+time.Second)); stalled {
		t.Error("stalled right after the queue came back")
	}
	if stalled, _ := w.Check(d, Status{Pending: 1}, t0.Add(time.Minute+3*time.Second)); !stalled {
		t.Error("not stalled 3s after the queue came back with nothing attempted")
	}
}
