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
	"sync"
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
