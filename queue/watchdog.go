// The watchdog: a stall is never silent. Copies that wait with nothing
// attempted for longer than their schedule allows make the destination
// stalled, whatever the cause (workers that stopped pulling, a consumer
// that cannot be made again, a bug): the glue says so in the status, an
// ERROR line and a metric.

package queue

import "time"

// DefaultStallAfter is how long past its due time a copy may wait with
// nothing attempted before its destination is stalled.
const DefaultStallAfter = time.Minute

// Watchdog follows one destination's Status readings. It lives as long
// as the process watches the destination (across reloads).
type Watchdog struct {
	progress      time.Time // when the destination last made progress, or was idle
	lastDelivered time.Time
	// longestRetry is the longest retry delay of the configs read since
	// the queue was last empty: a copy scheduled under an earlier config
	// (a reload shortened retry) waits out the delay it was given.
	longestRetry time.Duration
}

// Check reads st, the destination's latest Status, and reports whether d
// is stalled: copies wait and the stream handed none to any worker (of
// any instance sharing it) for longer than the schedule allows: for a
// copy due now (pending), the attempt's timeout and stall_after; for
// copies waiting for a retry, the longest retry delay on top (of every
// config read since the queue was last empty: a reload may have
// shortened it under copies already scheduled). It also
// returns since when nothing progressed.
func (w *Watchdog) Check(d Destination, st Status, now time.Time) (stalled bool, since time.Time) {
	d.defaults()
	if w.progress.IsZero() || st.Pending+st.InFlight == 0 || st.LastDelivered.After(w.lastDelivered) {
		w.progress = now
	}
	if st.LastDelivered.After(w.lastDelivered) {
		w.lastDelivered = st.LastDelivered
	}
	if st.Pending+st.InFlight == 0 {
		w.longestRetry = 0
		return false, time.Time{}
	}
	if st.Pause != nil {
		w.progress = now // its copies wait on purpose
		return false, time.Time{}
	}
	w.longestRetry = max(w.longestRetry, slicesMax(d.Retry))
	allowed := d.Timeout + d.StallAfter
	if st.Pending == 0 {
		allowed += w.longestRetry
	}
	if d.Rate > 0 && d.RatePer > 0 {
		allowed += d.RatePer / time.Duration(d.Rate) // copies spaced by the pace wait on purpose
	}
	return now.Sub(w.progress) > allowed, w.progress
}

// Hold counts the time up to now as no idle time: the queue could not be
// read, or stored nothing (Store.Down), which its own status, log line
// and metric say; that nothing was attempted meanwhile is not the
// destination's stall.
func (w *Watchdog) Hold(now time.Time) {
	if !w.progress.IsZero() {
		w.progress = now
	}
}

func slicesMax(ds []time.Duration) time.Duration {
	var m time.Duration
	for _, d := range ds {
		m = max(m, d)
	}
	return m
}
