// Delivery control in the worker's path: `rate` (a pace per destination
// and process, copies waiting in the queue) and `Retry-After` (a 429 or
// 503 that says when to come back). Neither uses up an attempt: a copy
// spaced out by the pace, or answered 429, is handed back to the queue
// with a delay, and that delivery is no attempt (the hand-back ledger).

package queue

import (
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// MaxRetryAfter bounds how long a Retry-After may put a copy off.
const MaxRetryAfter = time.Hour

// pacer spaces one destination's attempts in this process: a token bucket
// that gains one token every interval and holds one second's worth (at
// least one). A copy that finds no token reserves the next free one and
// waits for it in the queue; the reservations, by stream sequence, are
// kept until their copy comes back (or for two hours, then dropped).
type pacer struct {
	interval time.Duration
	burst    float64

	mu       sync.Mutex
	tokens   float64
	last     time.Time
	reserved map[uint64]time.Time // copy → when its token is due
}

// newPacer is the pace of n attempts per `per`, or nil for none.
func newPacer(n int, per time.Duration) *pacer {
	if n <= 0 || per <= 0 {
		return nil
	}
	interval := per / time.Duration(n)
	burst := max(1, float64(time.Second/interval))
	return &pacer{interval: interval, burst: burst, tokens: burst, reserved: map[uint64]time.Time{}}
}

// maxPaceWait bounds one hand-back's delay: a copy whose token is due
// later comes back, finds it not yet due, and waits again.
const maxPaceWait = 10 * time.Minute

// admit reports whether the copy at seq may be attempted now; if not, how
// long it should wait in the queue. A copy that comes back for the token
// it reserved takes it; another takes a token if one is free, else
// reserves the next one.
func (p *pacer) admit(seq uint64, now time.Time) (wait time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if due, ok := p.reserved[seq]; ok {
		if now.Before(due) {
			return min(due.Sub(now), maxPaceWait)
		}
		delete(p.reserved, seq)
		return 0
	}
	if p.last.IsZero() {
		p.last = now
	}
	p.tokens = min(p.burst, p.tokens+float64(now.Sub(p.last))/float64(p.interval))
	p.last = now
	p.tokens--
	if p.tokens >= 0 {
		return 0
	}
	// The token this copy takes is due once the deficit has refilled.
	due := now.Add(time.Duration(-p.tokens * float64(p.interval)))
	if len(p.reserved) > 0 && len(p.reserved)%1024 == 0 {
		for k, v := range p.reserved {
			if now.Sub(v) > 2*time.Hour {
				delete(p.reserved, k)
			}
		}
	}
	p.reserved[seq] = due
	return min(due.Sub(now), maxPaceWait)
}

// retryAfter is how long an answer asks to be left alone: its Retry-After
// (delay-seconds or an HTTP date) on a 429 or 503, at most MaxRetryAfter;
// 0 when there is none, or it is unreadable or past.
func retryAfter(resp *http.Response, now time.Time) time.Duration {
	if resp.StatusCode != http.StatusTooManyRequests && resp.StatusCode != http.StatusServiceUnavailable {
		return 0
	}
	v := strings.TrimSpace(resp.Header.Get("Retry-After"))
	if v == "" {
		return 0
	}
	var d time.Duration
	if secs, err := strconv.ParseUint(v, 10, 64); err == nil {
		d = MaxRetryAfter
		if secs < uint64(MaxRetryAfter/time.Second) {
			d = time.Duration(secs) * time.Second
		}
	} else if numErr, ok := err.(*strconv.NumError); ok && numErr.Err == strconv.ErrRange && strings.Trim(v, "0123456789") == "" {
		d = MaxRetryAfter // more delay-seconds than fit: at most an hour
	} else if at, err := http.ParseTime(v); err == nil {
		d = at.Sub(now)
	}
	return min(max(d, 0), MaxRetryAfter)
}
