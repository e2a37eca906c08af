package queue

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/internal/testwait"
)

// backend is a real HTTP server on 127.0.0.1 that records attempts and
// answers with fail() deciding the status.
type backend struct {
	*httptest.Server
	mu   sync.Mutex
	got  []*http.Request
	body [][]byte
	fail func(n int) int // status for the n-th request (from 1)
}

func newBackend(t *testing.T, fail func(n int) int) *backend {
	b := &backend{fail: fail}
	b.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		b.mu.Lock()
		b.got = append(b.got, r)
		b.body = append(b.body, body)
		n := len(b.got)
		f := b.fail
		b.mu.Unlock()
		w.WriteHeader(f(n))
	}))
	t.Cleanup(b.Close)
	return b
}

func (b *backend) requests() ([]*http.Request, [][]byte) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]*http.Request(nil), b.got...), append([][]byte(nil), b.body...)
}

func (b *backend) setFail(f func(n int) int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.fail = f
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	testwait.Until(t, 15*time.Second, cond, func() string { return "waiting for " + what })
}

func sign(secret string) func([]byte, time.Time) string {
	return func(body []byte, at time.Time) string {
		ts := strconv.FormatInt(at.Unix(), 10)
		m := hmac.New(sha256.New, []byte(secret))
		m.Write([]byte(ts + "." + string(body)))
		return "t=" + ts + ",v1=" + hex.EncodeToString(m.Sum(nil))
	}
}

func put(t *testing.T, s *Store, dest, id string, body []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := s.Enqueue(ctx, Message{Destination: dest, EventID: []byte(`"` + id + `"`), ID: id, Type: "video.asset.ready", Body: body,
		Header: map[string]string{HeaderSignature: "t=1,v1=original"}}); err != nil {
		t.Fatal(err)
	}
}

// TestDeliverRetriesUntilUp: a backend down for two attempts gets the
// event on the third, signed afresh each time, byte for byte, with the
// attempt number, the destination and the idempotency key.
func TestDeliverRetriesUntilUp(t *testing.T) {
	s := openTest(t, Config{Dir: t.TempDir()})
	defer s.Close()
	b := newBackend(t, func(n int) int {
		if n <= 2 {
			return http.StatusServiceUnavailable
		}
		return http.StatusNoContent
	})
	var mu sync.Mutex
	var attempts []Attempt
	stop, err := s.StartWorkers(context.Background(), Destination{Name: "app", URL: b.URL, Retry: []time.Duration{50 * time.Millisecond}, Sign: sign("dest-secret")},
		func(a Attempt) { mu.Lock(); attempts = append(attempts, a); mu.Unlock() })
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	body := []byte(`{"type":"video.asset.ready","id":"up-1","data":{"x":"\u00e9"}}`)
	put(t, s, "app", "up-1", body)
	waitUntil(t, "three attempts", func() bool { mu.Lock(); defer mu.Unlock(); return len(attempts) == 3 })
	reqs, bodies := b.requests()
	for i, r := range reqs {
		if got := r.Header.Get(HeaderAttempt); got != strconv.Itoa(i+1) {
			t.Errorf("attempt %d: %s %q", i+1, HeaderAttempt, got)
		}
		if r.Header.Get(HeaderDestination) != "app" || r.Header.Get("Idempotency-Key") != "up-1" || r.Header.Get("Content-Type") != "application/json" {
			t.Errorf("attempt %d: headers %v", i+1, r.Header)
		}
		if string(bodies[i]) != string(body) {
			t.Errorf("attempt %d: body changed", i+1)
		}
		sig := r.Header.Get(HeaderSignature)
		var ts int64
		fmt.Sscanf(sig, "t=%d", &ts)
		if want := sign("dest-secret")(body, time.Unix(ts, 0)); sig != want {
			t.Errorf("attempt %d: signature %q, want %q", i+1, sig, want)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if attempts[0].Result != "retry" || attempts[1].Result != "retry" || attempts[2].Result != "delivered" || attempts[2].Status != 204 {
		t.Errorf("attempts: %+v", attempts)
	}
	time.Sleep(200 * time.Millisecond)
	if reqs, _ := b.requests(); len(reqs) != 3 {
		t.Errorf("backend got %d requests after delivery, want 3", len(reqs))
	}
}

// TestDeadLetterAndRedeliver: a backend that always fails makes the event
// a dead letter after max_attempts, kept with the attempts and the last
// error; once the backend is fixed, redelivering it delivers it, counting
// attempts from 1 again; purge drops dead letters.
func TestDeadLetterAndRedeliver(t *testing.T) {
	s := openTest(t, Config{Dir: t.TempDir()})
	defer s.Close()
	b := newBackend(t, func(int) int { return http.StatusInternalServerError })
	var mu sync.Mutex
	results := map[string]int{}
	stop, err := s.StartWorkers(context.Background(), Destination{Name: "app", URL: b.URL, Retry: []time.Duration{20 * time.Millisecond}, MaxAttempts: 3},
		func(a Attempt) { mu.Lock(); results[a.Result]++; mu.Unlock() })
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	put(t, s, "app", "dead-1", []byte(`{"type":"video.asset.ready","id":"dead-1"}`))
	put(t, s, "app", "dead-2", []byte(`{"type":"video.asset.ready","id":"dead-2"}`))
	waitUntil(t, "two dead letters", func() bool { mu.Lock(); defer mu.Unlock(); return results["dead"] == 2 })
	dead, err := s.Dead(context.Background(), "app")
	if err != nil || len(dead) != 2 {
		t.Fatalf("dead letters: %v %+v", err, dead)
	}
	d := dead[0]
	if d.ID != "dead-1" {
		d = dead[1] // they die in either order: attempts run concurrently
	}
	if d.ID != "dead-1" || d.Type != "video.asset.ready" || d.Attempts != 3 || d.LastError != "app answered 500" || d.DeadAt.IsZero() {
		t.Errorf("dead letter: %+v", d)
	}
	if reqs, _ := b.requests(); len(reqs) != 6 {
		t.Errorf("backend got %d attempts, want 3 per event", len(reqs))
	}
	if reqs, _ := b.requests(); reqs[0].Header.Get(HeaderSignature) != "t=1,v1=original" {
		t.Errorf("without sign, Mux's original header: %q", reqs[0].Header.Get(HeaderSignature))
	}

	b.setFail(func(int) int { return http.StatusOK })
	n, err := s.Redeliver(context.Background(), "app", []string{"dead-1"}, false)
	if err != nil || n != 1 {
		t.Fatalf("redeliver: %d %v", n, err)
	}
	waitUntil(t, "the redelivered event", func() bool { mu.Lock(); defer mu.Unlock(); return results["delivered"] == 1 })
	reqs, _ := b.requests()
	if last := reqs[len(reqs)-1]; last.Header.Get("Idempotency-Key") != "dead-1" || last.Header.Get(HeaderAttempt) != "1" {
		t.Errorf("redelivered attempt: key %q, attempt %q", last.Header.Get("Idempotency-Key"), last.Header.Get(HeaderAttempt))
	}
	if dead, _ := s.Dead(context.Background(), "app"); len(dead) != 1 || dead[0].ID != "dead-2" {
		t.Fatalf("after redelivering one: %+v", dead)
	}
	if err := s.Purge(context.Background(), "app"); err != nil {
		t.Fatal(err)
	}
	if dead, _ := s.Dead(context.Background(), "app"); len(dead) != 0 {
		t.Fatalf("after purge: %+v", dead)
	}
}

// TestFanOut: each destination gets its own copy and its own retries.
func TestFanOut(t *testing.T) {
	s := openTest(t, Config{Dir: t.TempDir()})
	defer s.Close()
	a := newBackend(t, func(int) int { return 200 })
	b := newBackend(t, func(n int) int {
		if n == 1 {
			return 502
		}
		return 200
	})
	for _, d := range []Destination{{Name: "assets", URL: a.URL}, {Name: "analytics", URL: b.URL, Retry: []time.Duration{20 * time.Millisecond}}} {
		stop, err := s.StartWorkers(context.Background(), d, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer stop()
	}
	body := []byte(`{"type":"video.asset.ready","id":"fan-1"}`)
	put(t, s, "assets", "fan-1", body)
	put(t, s, "analytics", "fan-1", body)
	waitUntil(t, "both copies", func() bool {
		ra, _ := a.requests()
		rb, _ := b.requests()
		return len(ra) == 1 && len(rb) == 2
	})
}

// TestSettledCopiesLeaveTheStream: delivered copies are removed from the
// stream, which must not fill up with them: in bulk below the consumer's
// ack floor, one by one above it (an earlier copy waits for a retry), and
// by the last sweep when the workers stop.
func TestSettledCopiesLeaveTheStream(t *testing.T) {
	run := func(t *testing.T, stuck bool, grace time.Duration, stopEarly bool) {
		s := openTest(t, Config{Dir: t.TempDir()})
		defer s.Close()
		s.sweepGrace = grace
		b := newBackend(t, func(int) int { return http.StatusOK })
		if stuck {
			b.setFail(func(n int) int {
				if n == 1 {
					return http.StatusServiceUnavailable // the first copy: retried in an hour
				}
				return http.StatusOK
			})
		}
		var delivered atomic.Int32
		stop, err := s.StartWorkers(context.Background(), Destination{Name: "app", URL: b.URL, Concurrency: 1, Retry: []time.Duration{time.Hour}},
			func(a Attempt) {
				if a.Result == "delivered" {
					delivered.Add(1)
				}
			})
		if err != nil {
			t.Fatal(err)
		}
		defer stop()
		for i := range 20 {
			put(t, s, "app", fmt.Sprint("settled-", i), []byte(fmt.Sprintf(`{"type":"video.asset.ready","id":"settled-%d"}`, i)))
		}
		want := int32(20)
		if stuck {
			want = 19
		}
		waitUntil(t, "the deliveries", func() bool { return delivered.Load() == want })
		left := uint64(20) - uint64(want) // the stuck copy stays
		if stopEarly {
			stop()
			if n := pending(t, s, "app"); n != left {
				t.Fatalf("after stop: %d copies in the stream, want %d", n, left)
			}
			return
		}
		waitUntil(t, "the settled copies to leave the stream", func() bool { return pending(t, s, "app") == left })
	}
	t.Run("below the ack floor", func(t *testing.T) { run(t, false, time.Hour, false) })
	t.Run("above the ack floor", func(t *testing.T) { run(t, true, 100*time.Millisecond, false) })
	t.Run("last sweep at stop", func(t *testing.T) { run(t, true, time.Hour, true) })
}

// TestDeliverStopLeavesNoGoroutine: workers stopped while the store stays
// open (a reload that changed their destination) leave no goroutine
// behind, also when attempts hung and copies were fetched but not started.
func TestDeliverStopLeavesNoGoroutine(t *testing.T) {
	s := openTest(t, Config{Dir: t.TempDir()})
	defer s.Close()
	done := make(chan struct{})
	b := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.ReadAll(r.Body) // then the server notices the client going away
		select {
		case <-r.Context().Done():
		case <-done:
		}
	}))
	defer b.Close()
	defer close(done)
	for i := range 10 {
		put(t, s, "app", fmt.Sprint("leak-", i), []byte(`{}`))
	}
	var before int
	var beforeSites map[string]int
	for round := range 5 {
		stop, err := s.StartWorkers(context.Background(), Destination{Name: "app", URL: b.URL, Concurrency: 2, Timeout: time.Minute, StopGrace: 200 * time.Millisecond}, nil)
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(300 * time.Millisecond)
		stop()
		if round == 0 { // the durable consumer's server goroutines stay
			time.Sleep(200 * time.Millisecond)
			before, beforeSites = runtime.NumGoroutine(), goroutineSites()
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > before {
		var extra []string
		for site, k := range goroutineSites() {
			if k > beforeSites[site] {
				extra = append(extra, fmt.Sprintf("%d more: %s", k-beforeSites[site], site))
			}
		}
		t.Errorf("%d goroutines after 4 more stops, %d before:\n%s", n, before, strings.Join(extra, "\n"))
	}
}

// goroutineSites counts goroutines by their top function and creator.
func goroutineSites() map[string]int {
	buf := make([]byte, 4<<20)
	buf = buf[:runtime.Stack(buf, true)]
	out := map[string]int{}
	for _, g := range strings.Split(string(buf), "\n\n") {
		lines := strings.Split(g, "\n")
		if len(lines) < 2 {
			continue
		}
		created := ""
		for i, l := range lines {
			if strings.HasPrefix(l, "created by") && i+1 < len(lines) {
				created = l + " " + strings.TrimSpace(lines[i+1])
			}
		}
		out[created]++
	}
	return out
}

// TestDeliverKeepsConnections: a destination keeps a connection open for
// each attempt in flight. With Go's shared default transport (2 idle
// connections per host), every other attempt at concurrency 4 opened a
// connection of its own and closed it after: 200 copies took about 100
// connections (and as many TLS handshakes to an https backend).
func TestDeliverKeepsConnections(t *testing.T) {
	const n, concurrency = 200, 4
	var conns, served atomic.Int64
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		time.Sleep(time.Millisecond) // attempts overlap
		served.Add(1)
	}))
	srv.Config.ConnState = func(_ net.Conn, state http.ConnState) {
		if state == http.StateNew {
			conns.Add(1)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	s := openTest(t, Config{Dir: t.TempDir()})
	defer s.Close()
	for i := range n {
		put(t, s, "app", fmt.Sprintf("conn-%d", i), []byte(`{"type":"video.asset.ready"}`))
	}
	stop, err := s.StartWorkers(context.Background(), Destination{Name: "app", URL: srv.URL, Concurrency: concurrency}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	waitUntil(t, "every copy delivered", func() bool { return served.Load() >= n })
	if got := conns.Load(); got > 2*concurrency {
		t.Errorf("%d copies at concurrency %d opened %d connections to the backend, want at most %d (kept open and reused)", n, concurrency, got, 2*concurrency)
	}
	t.Logf("%d copies, %d connections", n, conns.Load())
}
