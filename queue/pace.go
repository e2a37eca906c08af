// Delivery control in the worker's path: `rate` (a pace per destination
// and process: the workers fetch a copy only when a token is free, so the
// copies that wait stay in the stream) and `Retry-After` (a 429 or 503
// that says when to come back: the copy is handed back with that delay,
// and a 429 is charged nothing).

package queue

import (
	"context"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// MaxRetryAfter bounds how long a Retry-After may put a copy off.
const MaxRetryAfter = time.Hour

// pacer spaces one destination's attempts in this process: a token bucket
// that gains one token every interval and holds one second's worth (at
// least one). The paced workers take a token before they fetch a copy
// (pacedPull), so the copies that wait for their turn wait in the stream,
// unfetched: nothing is held in memory or handed back for them.
type pacer struct {
	interval time.Duration
	burst    float64

	mu     sync.Mutex
	tokens float64
	last   time.Time
}

// newPacer is the pace of n attempts per `per`, or nil for none.
func newPacer(n int, per time.Duration) *pacer {
	if n <= 0 || per <= 0 {
		return nil
	}
	interval := per / time.Duration(n)
	burst := max(1, float64(time.Second/interval))
	return &pacer{interval: interval, burst: burst, tokens: burst}
}

// reserve takes the next token and returns how long until it is due (0:
// now). Tokens are handed out in turn, evenly spaced.
func (p *pacer) reserve(now time.Time) time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.last.IsZero() {
		p.last = now
	}
	p.tokens = min(p.burst, p.tokens+float64(now.Sub(p.last))/float64(p.interval))
	p.last = now
	p.tokens--
	if p.tokens >= 0 {
		return 0
	}
	return time.Duration(-p.tokens * float64(p.interval))
}

// refund gives back a token that found no copy to attempt.
func (p *pacer) refund() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.tokens = min(p.burst, p.tokens+1)
}

// take waits for a token; false if ctx ended first (the token is given
// back).
func (p *pacer) take(ctx context.Context) bool {
	wait := p.reserve(time.Now())
	if wait == 0 {
		return true
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		p.refund()
		return false
	}
}

// pacedPull is the subscription of paced workers: it takes a token, then
// fetches one copy and hands it to handle, again and again. It is a
// jetstream.ConsumeContext, so the supervisor stops, drains and replaces
// it as it does a Consume.
type pacedPull struct {
	cancel context.CancelFunc
	closed chan struct{}
}

func (w *workerRun) pacedPull(cons jetstream.Consumer, handle func(jetstream.Msg)) *pacedPull {
	ctx, cancel := context.WithCancel(w.ctx)
	pp := &pacedPull{cancel: cancel, closed: make(chan struct{})}
	go func() {
		defer close(pp.closed)
		for w.pace.take(ctx) {
			batch, err := cons.Fetch(1, jetstream.FetchMaxWait(2*time.Second))
			if err != nil {
				w.pace.refund()
				w.noticeGone(err)
				if !sleepCtx(ctx, time.Second) {
					return
				}
				continue
			}
			got := false
			for msg := range batch.Messages() {
				got = true
				handle(msg)
			}
			if !got {
				w.pace.refund() // nothing was due: the token is not used
			}
			w.noticeGone(batch.Error())
		}
	}()
	return pp
}

// Stop ends the pull; a copy being handed to the workers is handled.
func (pp *pacedPull) Stop() { pp.cancel() }

// Drain is Stop: a paced pull fetches one copy at a time, and hands it on.
func (pp *pacedPull) Drain() { pp.cancel() }

// Closed is closed once the pull ended.
func (pp *pacedPull) Closed() <-chan struct{} { return pp.closed }

// sleepCtx sleeps d, or until ctx ends (false).
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
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
