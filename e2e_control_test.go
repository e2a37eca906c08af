//go:build e2e

package muxwebhook

// Delivery control against the built binary (issue #20): Retry-After
// honoured and a 429 not counted, and `rate` spacing attempts as the
// backend measures them.

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/internal/testwait"
)

// TestDeliveryControlRetryAfterAndRate: one Caddy, two destinations.
// "limited" answers each event 429 Retry-After: 1 twice, then 200: under
// max_attempts 2 and a retry of 100ms, every event is delivered, each
// POST carrying Mux-Webhook-Attempt 1, at least a second apart. "paced"
// has rate 5/s: 20 events are delivered on their first attempt, never
// more than a second's worth (5) plus 5 per second of the span at once.
func TestDeliveryControlRetryAfterAndRate(t *testing.T) {
	t.Parallel() // its own processes and ports
	type arrival struct {
		at     time.Time
		number string
	}
	var mu sync.Mutex
	got := map[string][]arrival{} // by destination and event id
	var paced []time.Time
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		dest, id := r.Header.Get("Mux-Webhook-Destination"), r.Header.Get("Idempotency-Key")
		mu.Lock()
		k := dest + "/" + id
		got[k] = append(got[k], arrival{time.Now(), r.Header.Get("Mux-Webhook-Attempt")})
		n := len(got[k])
		if dest == "paced" {
			paced = append(paced, time.Now())
		}
		mu.Unlock()
		if dest == "limited" && n <= 2 {
			w.Header().Set("Retry-After", "1")
			w.WriteHeader(http.StatusTooManyRequests)
		}
	}))
	t.Cleanup(backend.Close)
	global := fmt.Sprintf(`	mux_webhook {
		queue {
			dir %s
		}
		destination limited %s {
			retry 100ms
			max_attempts 2
		}
		destination paced %s {
			timeout 2s
			rate 5/s
		}
	}`, filepath.Join(t.TempDir(), "js"), backend.URL, backend.URL)
	site := fmt.Sprintf("\tmux_webhook %s\n\t@limited mux_event video.asset.errored\n\tmux_deliver @limited limited\n\tmux_deliver paced", testSecret)
	g := startBinaryGateway(t, "", global, site)
	waitQueueOpen(t, g.admin, g.out)

	send := func(typ, id string) {
		t.Helper()
		if status, err := postEvent(http.DefaultClient, g.base, event(typ, id, "")); err != nil || status != http.StatusAccepted {
			t.Fatalf("%s: %d %v", id, status, err)
		}
	}
	for i := range 3 {
		send("video.asset.errored", "limited-"+strconv.Itoa(i))
	}
	for i := range 20 {
		send("video.asset.ready", "paced-"+strconv.Itoa(i))
	}
	testwait.Until(t, 60*time.Second, func() bool {
		mu.Lock()
		defer mu.Unlock()
		done := 0
		for k, a := range got {
			if (len(k) > 8 && k[:8] == "limited/" && len(a) == 3) || (len(k) > 6 && k[:6] == "paced/") {
				done++
			}
		}
		return done == 23
	}, func() string {
		mu.Lock()
		defer mu.Unlock()
		return fmt.Sprintf("arrivals: %v\n%s", got, tail(g.out.String(), 4096))
	})

	mu.Lock()
	defer mu.Unlock()
	for i := range 3 {
		a := got["limited/limited-"+strconv.Itoa(i)]
		for j, x := range a {
			if x.number != "1" {
				t.Errorf("limited-%d: POST %d carried Mux-Webhook-Attempt %s, want 1 (a 429 is no attempt)", i, j+1, x.number)
			}
			if j > 0 && x.at.Sub(a[j-1].at) < 900*time.Millisecond {
				t.Errorf("limited-%d: POST %d came %s after a 429 with Retry-After: 1", i, j+1, x.at.Sub(a[j-1].at))
			}
		}
	}
	for k, a := range got {
		if len(k) > 6 && k[:6] == "paced/" && (len(a) != 1 || a[0].number != "1") {
			t.Errorf("%s: %d POSTs, numbers %v; want one, attempt 1 (the pace uses no attempt)", k, len(a), a)
		}
	}
	for i := range paced {
		for j := i; j < len(paced); j++ {
			if float64(j-i+1) > 5+5*paced[j].Sub(paced[i]).Seconds()+1 {
				t.Fatalf("paced arrivals %d..%d: %d within %s, above rate 5/s with a burst of 5", i, j, j-i+1, paced[j].Sub(paced[i]))
			}
		}
	}
	// No dead letter: the 429s did not count toward max_attempts 2.
	var status []QueueStatus
	getJSON(t, g.admin+"/mux-webhook/queue", &status)
	for _, s := range status {
		if s.Dead != 0 {
			t.Errorf("%s has %d dead letters", s.Name, s.Dead)
		}
	}
}

// pauseVia pauses or resumes destination through the admin API at admin
// (http://host:port), as `caddy mux-webhook queue pause|resume` does.
func pauseVia(t *testing.T, admin, verb, destination string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, admin+"/mux-webhook/queue/"+verb, strings.NewReader(`{"destination":"`+destination+`"}`))
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", verb, destination, err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("%s %s: %d", verb, destination, resp.StatusCode)
	}
}

// stateOf is destination's state in the queue status at admin.
func stateOf(t *testing.T, admin, destination string) string {
	t.Helper()
	var status []QueueStatus
	getJSON(t, admin+"/mux-webhook/queue", &status)
	for _, s := range status {
		if s.Name == destination {
			return s.State
		}
	}
	return ""
}

// TestPauseAcrossARestart: a destination paused, then its Caddy killed
// (SIGKILL) with events queued and started again on the same store: the
// pause holds (nothing is attempted, the status says paused); resumed,
// every event is delivered once, on its first attempt.
func TestPauseAcrossARestart(t *testing.T) {
	t.Parallel() // its own processes and ports
	backend := newRecordingBackend(t, 0, nil)
	dir := filepath.Join(t.TempDir(), "js")
	global := fmt.Sprintf("\tmux_webhook {\n\t\tqueue {\n\t\t\tdir %s\n\t\t}\n\t\tdestination app %s {\n\t\t\tretry 100ms\n\t\t\ttimeout 5s\n\t\t}\n\t}", dir, backend.URL)
	g := startHealGateway(t, global)
	pauseVia(t, g.admin, "pause", "app")
	// In effect once the workers read it (every second).
	testwait.For(t, func() bool { return g.logged("info", "mux webhook destination paused: its events wait") },
		func() string {
			return "the workers never said the destination is paused\n" + tail(g.out.String(), 4096)
		})
	const n = 10
	ids := ids("held-", n)
	g.sendAll(t, 10*time.Second, ids...)
	time.Sleep(1500 * time.Millisecond)
	if got := len(backend.received()); got != 0 {
		t.Fatalf("a paused destination got %d events", got)
	}
	if err := g.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = g.cmd.Wait()

	g2 := startHealGateway(t, global)
	if s := stateOf(t, g2.admin, "app"); s != "paused" {
		t.Fatalf("after the restart, app is %q, want paused", s)
	}
	time.Sleep(2 * time.Second)
	if got := len(backend.received()); got != 0 {
		t.Fatalf("after the restart, the paused destination got %d events", got)
	}
	if !g2.logged("info", "mux webhook destination paused: its events wait") {
		t.Error("the restarted gateway did not say the destination is paused")
	}
	pauseVia(t, g2.admin, "resume", "app")
	waitDelivered(t, backend, 30*time.Second, g2.out, ids...)
	for id, times := range backend.received() {
		if times != 1 {
			t.Errorf("%s delivered %d times", id, times)
		}
	}
	if s := stateOf(t, g2.admin, "app"); s != "active" {
		t.Errorf("after resume, app is %q", s)
	}
}

// TestPauseSharedByTheGatewaysOfACluster: two gateways on a three-node
// NATS cluster; a pause asked of the first holds the second too (events
// sent to either wait, both statuses say paused); resumed through the
// second, every event is delivered once.
func TestPauseSharedByTheGatewaysOfACluster(t *testing.T) {
	t.Parallel() // its own processes and ports
	c := startNATSCluster(t)
	backend := newRecordingBackend(t, 0, nil)
	gs := startClusterGateways(t, 2, clusterGlobal(c, "5s", backend.URL, "\t\t\ttimeout 2s\n\t\t\tretry 100ms"))
	c.waitPulling("app", len(gs))
	pauseVia(t, gs[0].adminURL(), "pause", "app")
	testwait.For(t, func() bool { return stateOf(t, gs[1].adminURL(), "app") == "paused" },
		func() string { return "the second gateway does not see the pause" })
	time.Sleep(2 * time.Second) // both gateways' workers have read it
	client := &http.Client{Timeout: 10 * time.Second}
	const n = 20
	for i := range n {
		g := gs[i%2]
		if status, err := postEvent(client, g.url(), event("video.asset.ready", fmt.Sprint("held-", i), "")); status != http.StatusAccepted {
			t.Fatalf("held-%d to %s: %d %v", i, g.name, status, err)
		}
	}
	time.Sleep(2 * time.Second)
	if got := len(backend.received()); got != 0 {
		t.Fatalf("a destination paused on the cluster got %d events", got)
	}
	pauseVia(t, gs[1].adminURL(), "resume", "app")
	testwait.Until(t, 30*time.Second, func() bool { return len(backend.received()) == n }, func() string {
		return fmt.Sprintf("%d of %d delivered after resume", len(backend.received()), n)
	})
	for id, times := range backend.received() {
		if times != 1 {
			t.Errorf("%s delivered %d times", id, times)
		}
	}
}

// TestFaultWeekendOutageTripsTheBreaker: a backend down for "a weekend"
// (compressed: retry 100ms, breaker 5 500ms) against the built binary:
// after 5 failures in a row the destination trips (ERROR line, the status
// and the metric say so, with the next probe), is then probed about once
// per interval instead of hammered by every event's retries, and once the
// backend is back a probe resets it (INFO line) and every event is
// delivered once, none a dead letter.
func TestFaultWeekendOutageTripsTheBreaker(t *testing.T) {
	t.Parallel() // its own processes and ports
	var down atomic.Bool
	down.Store(true)
	var mu sync.Mutex
	var failed []time.Time
	backend := newRecordingBackend(t, 0, func(string) bool {
		if !down.Load() {
			return false
		}
		mu.Lock()
		failed = append(failed, time.Now())
		mu.Unlock()
		return true
	})
	global := fmt.Sprintf("\tmux_webhook {\n\t\tqueue {\n\t\t\tdir %s\n\t\t}\n\t\tdestination app %s {\n\t\t\tretry 100ms\n\t\t\ttimeout 2s\n\t\t\tbreaker 5 500ms\n\t\t}\n\t}",
		filepath.Join(t.TempDir(), "js"), backend.URL)
	g := startHealGateway(t, global)
	const n = 20
	ids := ids("weekend-", n)
	g.sendAll(t, 10*time.Second, ids...)
	testwait.For(t, func() bool { return g.logged("error", "mux webhook destination tripped") },
		func() string { return "no ERROR line: the breaker never tripped\n" + tail(g.out.String(), 4096) })
	st := g.status(t)
	if st.State != "tripped" || st.NextProbe == "" {
		t.Errorf("status while tripped: %+v", st)
	}
	mu.Lock()
	atTrip := len(failed)
	mu.Unlock()
	tripped := time.Now()
	time.Sleep(3 * time.Second) // the weekend
	mu.Lock()
	during := len(failed) - atTrip
	mu.Unlock()
	// 20 events retried every 100ms would be some 600 requests; a probe
	// every 500ms (and the attempts in flight at the trip, concurrency 4)
	// is what a tripped destination gets.
	if max := 4 + int(time.Since(tripped)/(500*time.Millisecond)) + 1; during > max {
		t.Errorf("the tripped destination got %d requests in %s, want at most %d", during, time.Since(tripped), max)
	}
	testwait.For(t, func() bool { // the gauges are read every 5s
		return scrape(t, g.admin)[`caddy_mux_webhook_destination_state{destination="app",state="tripped"}`] == 1
	}, func() string { return "the state metric never said tripped" })
	down.Store(false)
	waitDelivered(t, backend, 30*time.Second, g.out, ids...)
	testwait.For(t, func() bool { return g.logged("info", "mux webhook destination reset") },
		func() string { return "no INFO line: the breaker never reset" })
	for _, id := range ids {
		if got := len(backend.arrivals(id)); got != 1 {
			t.Errorf("%s delivered %d times", id, got)
		}
	}
	testwait.For(t, func() bool {
		st = g.status(t)
		return st.State == "active" && st.Dead == 0 && st.Pending+st.InFlight == 0
	},
		func() string { return fmt.Sprintf("after the outage: %+v", st) })
}
