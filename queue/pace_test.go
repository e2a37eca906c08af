package queue

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"testing"
	"time"
)

// TestPacerSpacesEvenly: with a fake clock, n/per gives a token every
// per/n, in turn, holds one second's worth at most, and takes back a
// token that found nothing to do.
func TestPacerSpacesEvenly(t *testing.T) {
	p := newPacer(5, time.Second) // 200ms apart, a burst of 5
	now := time.Unix(1000, 0)
	for i := range 5 {
		if w := p.reserve(now); w != 0 {
			t.Fatalf("token %d of the first second's burst waits %s", i+1, w)
		}
	}
	for i, want := 6, 200*time.Millisecond; i <= 8; i, want = i+1, want+200*time.Millisecond {
		if w := p.reserve(now); w != want {
			t.Errorf("token %d: waits %s, want %s", i, w, want)
		}
	}
	p.refund() // the 8th found no copy
	if w := p.reserve(now); w != 600*time.Millisecond {
		t.Errorf("after a refund, the next token waits %s, want 600ms", w)
	}
	// After a quiet minute, the bucket holds one second's worth, not more.
	later := now.Add(time.Minute)
	free := 0
	for range 20 {
		if p.reserve(later) == 0 {
			free++
		}
	}
	if free != 5 {
		t.Errorf("after a quiet minute, %d tokens at once, want 5 (one second's worth)", free)
	}
	if newPacer(0, time.Second) != nil {
		t.Error("rate 0 paces")
	}
	if slow := newPacer(10, time.Hour); slow.burst != 1 {
		t.Errorf("10/h holds %v tokens, want 1", slow.burst)
	}
}

func TestRetryAfterParsing(t *testing.T) {
	now := time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)
	for _, c := range []struct {
		status int
		value  string
		want   time.Duration
	}{
		{429, "7", 7 * time.Second},
		{503, "120", 2 * time.Minute},
		{429, now.Add(90 * time.Second).Format(http.TimeFormat), 90 * time.Second},
		{429, "86400", MaxRetryAfter},                           // at most 1h
		{429, "4294967296", MaxRetryAfter},                      // beyond 32 bits: still at most 1h
		{429, "99999999999999999999999", MaxRetryAfter},         // beyond 64 bits too
		{429, now.Add(-time.Minute).Format(http.TimeFormat), 0}, // past
		{429, "soon", 0},                                        // unreadable
		{429, "-5", 0},                                          // not delay-seconds
		{500, "7", 0},                                           // only 429 and 503
		{429, "", 0},
	} {
		resp := &http.Response{StatusCode: c.status, Header: http.Header{}}
		if c.value != "" {
			resp.Header.Set("Retry-After", c.value)
		}
		if got := retryAfter(resp, now); got != c.want {
			t.Errorf("%d Retry-After %q: %s, want %s", c.status, c.value, got, c.want)
		}
	}
}

// arrivals is a backend that records, per event id, when each attempt
// arrived and its Mux-Webhook-Attempt, and answers what answer says.
type arrivals struct {
	*httptest.Server
	mu     sync.Mutex
	at     map[string][]time.Time
	number map[string][]string
	all    []time.Time
}

func newArrivals(t *testing.T, answer func(id string, n int, w http.ResponseWriter)) *arrivals {
	a := &arrivals{at: map[string][]time.Time{}, number: map[string][]string{}}
	a.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id := r.Header.Get("Idempotency-Key")
		a.mu.Lock()
		now := time.Now()
		a.at[id] = append(a.at[id], now)
		a.all = append(a.all, now)
		a.number[id] = append(a.number[id], r.Header.Get(HeaderAttempt))
		n := len(a.at[id])
		a.mu.Unlock()
		answer(id, n, w)
	}))
	t.Cleanup(a.Close)
	return a
}

func (a *arrivals) of(id string) ([]time.Time, []string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]time.Time(nil), a.at[id]...), append([]string(nil), a.number[id]...)
}

// TestRetryAfterHonouredAnd429NotCounted: a 429 with Retry-After puts the
// copy off by what it asks, not the 50ms schedule, and is no attempt: two
// 429s and a 200 under max_attempts 2 deliver the event, each POST
// carrying Mux-Webhook-Attempt 1. A 503 with Retry-After is waited out
// too, and counts.
func TestRetryAfterHonouredAnd429NotCounted(t *testing.T) {
	s := openTest(t, Config{Dir: t.TempDir()})
	defer s.Close()
	b := newArrivals(t, func(id string, n int, w http.ResponseWriter) {
		switch {
		case id == "too-many" && n <= 2:
			w.Header().Set("Retry-After", "1")
			w.WriteHeader(http.StatusTooManyRequests)
		case id == "unavailable" && n == 1:
			w.Header().Set("Retry-After", time.Now().Add(2*time.Second).UTC().Format(http.TimeFormat))
			w.WriteHeader(http.StatusServiceUnavailable)
		default:
			w.WriteHeader(http.StatusOK)
		}
	})
	var mu sync.Mutex
	var results []Attempt
	stop, err := s.StartWorkers(context.Background(), Destination{Name: "app", URL: b.URL, Retry: []time.Duration{50 * time.Millisecond}, MaxAttempts: 2},
		func(a Attempt) { mu.Lock(); results = append(results, a); mu.Unlock() })
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	put(t, s, "app", "too-many", []byte(`{"type":"video.asset.ready","id":"too-many"}`))
	put(t, s, "app", "unavailable", []byte(`{"type":"video.asset.ready","id":"unavailable"}`))
	waitUntil(t, "both delivered", func() bool {
		mu.Lock()
		defer mu.Unlock()
		n := 0
		for _, a := range results {
			if a.Result == "delivered" {
				n++
			}
			if a.Result == "dead" {
				t.Fatalf("%s became a dead letter: %+v", a.EventID, a)
			}
		}
		return n == 2
	})
	at, numbers := b.of("too-many")
	if fmt.Sprint(numbers) != "[1 1 1]" {
		t.Errorf("too-many: Mux-Webhook-Attempt %v, want [1 1 1] (a 429 is no attempt)", numbers)
	}
	for i := 1; i < len(at); i++ {
		if gap := at[i].Sub(at[i-1]); gap < 900*time.Millisecond {
			t.Errorf("too-many: attempt %d came %s after a 429 with Retry-After: 1", i+1, gap)
		}
	}
	at, numbers = b.of("unavailable")
	if fmt.Sprint(numbers) != "[1 2]" {
		t.Errorf("unavailable: Mux-Webhook-Attempt %v, want [1 2] (a 503 counts)", numbers)
	}
	if len(at) == 2 && at[1].Sub(at[0]) < time.Second {
		t.Errorf("unavailable: the second attempt came %s after a 503 asking for 2s (an HTTP date, whole seconds)", at[1].Sub(at[0]))
	}
	mu.Lock()
	defer mu.Unlock()
	for _, a := range results {
		if a.Status == http.StatusTooManyRequests && (!a.NotCounted || a.RetryAfter != time.Second) {
			t.Errorf("a 429's attempt: %+v", a)
		}
		if a.Status == http.StatusServiceUnavailable && (a.NotCounted || a.RetryAfter <= 0) {
			t.Errorf("a 503's attempt: %+v", a)
		}
	}
}

// TestRateSpacesAttempts: rate 5/s with concurrency 4 and 20 copies
// waiting: every copy is delivered on its first attempt (the pace uses
// none), and the backend never sees more than one second's worth (5) plus
// 5 per second of the span: in every run of arrivals i..j,
// j-i+1 <= 5 + 5*(t_j - t_i) (+1 for the clock's edges).
func TestRateSpacesAttempts(t *testing.T) {
	s := openTest(t, Config{Dir: t.TempDir()})
	defer s.Close()
	b := newArrivals(t, func(string, int, http.ResponseWriter) {})
	const n = 20
	for i := range n {
		id := "paced-" + strconv.Itoa(i)
		put(t, s, "app", id, []byte(`{"type":"video.asset.ready","id":"`+id+`"}`))
	}
	stop, err := s.StartWorkers(context.Background(), Destination{Name: "app", URL: b.URL, Concurrency: 4, Rate: 5, RatePer: time.Second}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	// The copies that wait for their turn wait in the stream, unfetched:
	// no more are out of it than the attempts the pace lets through.
	time.Sleep(500 * time.Millisecond)
	if st, err := s.Status(context.Background(), "app", false); err != nil || st.InFlight > 4 || st.Pending == 0 {
		t.Errorf("while paced: %d in flight, %d pending (%v); want copies waiting, at most the concurrency (4) out of the stream", st.InFlight, st.Pending, err)
	}
	waitUntil(t, "every copy delivered", func() bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		return len(b.at) == n
	})
	b.mu.Lock()
	defer b.mu.Unlock()
	for id, numbers := range b.number {
		if fmt.Sprint(numbers) != "[1]" {
			t.Errorf("%s: Mux-Webhook-Attempt %v, want [1]", id, numbers)
		}
	}
	all := b.all
	for i := range all {
		for j := i; j < len(all); j++ {
			allowed := 5 + 5*all[j].Sub(all[i]).Seconds() + 1
			if float64(j-i+1) > allowed {
				t.Fatalf("arrivals %d..%d: %d within %s, above rate 5/s with a burst of 5", i, j, j-i+1, all[j].Sub(all[i]))
			}
		}
	}
	if span := all[len(all)-1].Sub(all[0]); span < 2500*time.Millisecond {
		t.Errorf("20 copies at 5/s (a burst of 5) took %s, want at least 3s", span)
	}
}
