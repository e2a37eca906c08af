// The circuit breaker: a destination that fails again and again is given
// a rest instead of every copy's attempts. After BreakerFailures failed
// attempts in a row for the destination's reasons (no answer, a timeout, a
// 5xx or a 429), this process's workers stop pulling its copies (they
// wait in the queue, using no attempt, and none dies of max_age), and
// every BreakerProbe one due copy is attempted as a probe: a 2xx resets
// the breaker and delivery resumes; a probe that fails for the
// destination's reasons is not charged to its copy; one answered with
// another 4xx is (the event's trouble, not the destination's: a poison
// event cannot keep a healthy destination tripped). The breaker is this
// process's: each gateway trips and probes on what it sees. Resuming the
// destination (SetPaused) resets it on every gateway.

package queue

import (
	"net/http"
	"sync"
	"time"
)

// Breaker defaults: `breaker 10 30s`.
const (
	DefaultBreakerFailures = 10
	DefaultBreakerProbe    = 30 * time.Second
)

// BreakerOff, as Destination.BreakerFailures, turns the breaker off.
const BreakerOff = -1

// BreakerState is a destination's breaker in this process.
type BreakerState struct {
	Tripped bool
	// Since is when it tripped, or was last reset (zero: never tripped).
	Since time.Time
	// NextProbe is when the next probe is due, while tripped.
	NextProbe time.Time
}

// breaker counts a destination's failures in a row and trips.
type breaker struct {
	failures int
	probe    time.Duration

	mu      sync.Mutex
	run     int // failed attempts in a row, for the destination's reasons
	state   BreakerState
	probing bool
}

// newBreaker is d's breaker, or nil when it is off.
func newBreaker(d *Destination) *breaker {
	if d.BreakerFailures == BreakerOff {
		return nil
	}
	return &breaker{failures: d.BreakerFailures, probe: d.BreakerProbe}
}

// destinationTrouble reports whether an attempt failed for the
// destination's reasons: no answer (a connection error, a timeout), a 5xx
// or a 429. Any other 4xx is the event's trouble.
func destinationTrouble(a Attempt) bool {
	return a.Err != nil && (a.Status == 0 || a.Status >= 500 || a.Status == http.StatusTooManyRequests)
}

// record counts an attempt that was no probe; it reports whether it
// tripped the breaker, or reset it.
func (b *breaker) record(a Attempt, now time.Time) (changed bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case a.NoAttempt:
		return false // no POST: nothing said of the destination
	case b.state.Tripped && a.Err == nil:
		// An attempt begun before it tripped was delivered: the first
		// 2xx resets it.
		b.run = 0
		b.state = BreakerState{Since: now}
		return true
	case b.state.Tripped:
		return false // an attempt begun before it tripped
	case a.Err == nil:
		b.run = 0
	case destinationTrouble(a):
		b.run++
		if b.run >= b.failures {
			b.state = BreakerState{Tripped: true, Since: now, NextProbe: now.Add(b.probe)}
			return true
		}
	}
	return false
}

// tripped reports whether the breaker is tripped.
func (b *breaker) tripped() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.state.Tripped
}

// probeDue reports whether a probe should start now; it then counts one
// in flight until probed is called.
func (b *breaker) probeDue(now time.Time) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.state.Tripped || b.probing || now.Before(b.state.NextProbe) {
		return false
	}
	b.probing = true
	return true
}

// probed records a probe's outcome (ok: a copy was attempted and
// delivered; nothing to probe is no outcome): it reports whether the
// breaker reset.
func (b *breaker) probed(ok bool, now time.Time) (reset bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.probing = false
	if !b.state.Tripped {
		return false
	}
	if ok {
		b.run = 0
		b.state = BreakerState{Since: now}
		return true
	}
	b.state.NextProbe = now.Add(b.probe)
	return false
}

// reset closes the breaker (the destination was resumed); it reports
// whether it was tripped.
func (b *breaker) reset(now time.Time) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.run = 0
	if !b.state.Tripped {
		return false
	}
	b.state = BreakerState{Since: now}
	return true
}

// snapshot is the breaker's state.
func (b *breaker) snapshot() BreakerState {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.state
}
