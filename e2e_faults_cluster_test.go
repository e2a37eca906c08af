//go:build e2e

package muxwebhook

// Faults of several gateways on a three-node NATS cluster, against real
// processes killed with SIGKILL (harness in e2e_nats_helpers_test.go).

import (
	"fmt"
	"net/http"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/internal/testwait"
)

// TestFaultClusterGatewayAndNodeKilled: 2000 events are sent alternately
// to two gateways toward a slow backend; one gateway is killed, later the
// NATS node leading the destination's consumer; both are restarted. A
// sender whose gateway fails tries again, through the other one, as Mux
// would through a load balancer. Every event answered 202 is delivered at
// least once; an event delivered more than once was being attempted (or
// its acknowledgement was on its way) at a kill: its first arrival is
// close to one, and there are at most as many as the gateways can have in
// hand. The count is logged.
func TestFaultClusterGatewayAndNodeKilled(t *testing.T) {
	t.Parallel() // its own processes and ports
	c := startNATSCluster(t)
	const (
		n           = 2000
		concurrency = 4
		timeout     = 2 * time.Second // AckWait: timeout + 5s
	)
	// 50ms per event, 4 at a time per gateway: the events are sent faster
	// than they are delivered, so that there is work in hand at each kill.
	backend := newRecordingBackend(t, 50*time.Millisecond, nil)
	gs := startClusterGateways(t, 2, clusterGlobal(c, "2s", backend.URL,
		fmt.Sprintf("\t\t\ttimeout %s\n\t\t\tretry 100ms 200ms 500ms\n\t\t\tconcurrency %d", timeout, concurrency)))
	c.waitPulling("app", len(gs))
	_, consumerLeader := c.leaders("app")
	victim := c.node(consumerLeader)

	client := &http.Client{Timeout: 10 * time.Second}
	var (
		sent      atomic.Int32 // events settled: accepted or given up
		mu        sync.Mutex
		accepted  = map[string]bool{}
		refused   []string
		answers   = map[string]int{} // "<status>" or "error", of every try
		sendStart = time.Now()
	)
	// One event: to its gateway, then (on an error or a 503) alternately
	// to the other and back, at most 40 tries in about 20 s.
	sendOne := func(i int) {
		id := fmt.Sprintf("kill-%d", i)
		body := event("video.asset.ready", id, "")
		ok := false
		for try := range 40 {
			status, err := postEvent(client, gs[(i+try)%2].url(), body)
			mu.Lock()
			if err != nil {
				answers["error"]++
			} else {
				answers[fmt.Sprint(status)]++
			}
			mu.Unlock()
			if status == http.StatusAccepted {
				ok = true
				break
			}
			time.Sleep(time.Duration(min(try+1, 5)) * 100 * time.Millisecond)
		}
		mu.Lock()
		if ok {
			accepted[id] = true
		} else {
			refused = append(refused, id)
		}
		mu.Unlock()
		sent.Add(1)
	}
	work := make(chan int)
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for i := range work {
				sendOne(i)
			}
		})
	}
	go func() {
		for i := range n {
			work <- i
		}
		close(work)
	}()

	// The faults, as the sending goes on.
	waitSent := func(k int32) {
		testwait.Until(t, 60*time.Second, func() bool { return sent.Load() >= k }, func() string {
			return fmt.Sprintf("%d of %d events sent", sent.Load(), n)
		})
	}
	waitSent(400)
	before, other := gs[0].delivered(t), gs[1].delivered(t)
	gs[0].kill(t)
	gatewayKilled := time.Now()
	t.Logf("%s killed after %d events sent, %v delivered by it, %v by %s", gs[0].name, sent.Load(), before, other, gs[1].name)
	waitSent(900)
	resumeFrom := gs[1].delivered(t)
	c.kill(victim)
	t.Logf("NATS node %s (the consumer's leader) killed after %d events sent; %v delivered by %s", c.nodes[victim].name, sent.Load(), resumeFrom, gs[1].name)
	// Restarted at once, the gateway starts while the cluster elects new
	// leaders: it must wait for them, not give up.
	gs[0].start(t)
	t.Logf("%s restarted after %d events sent", gs[0].name, sent.Load())
	// The surviving gateway's pull died with the leader: it notices by
	// the missing heartbeats and pulls again from the new one: within the
	// election (NATS: 4-9s) and two missed heartbeats (2s), here with
	// room for a loaded machine. (With nats.go's default heartbeat it sat
	// idle for at least 30s.) In hand at the kill were at most
	// 2 × concurrency copies.
	testwait.Until(t, 25*time.Second, func() bool { return gs[1].delivered(t) > resumeFrom+4*concurrency }, func() string {
		return fmt.Sprintf("%s delivered %v since the node was killed", gs[1].name, gs[1].delivered(t)-resumeFrom)
	})
	resumed := time.Now()
	t.Logf("%s delivering again %s after the node was killed", gs[1].name, resumed.Sub(c.nodes[victim].killedAt).Round(100*time.Millisecond))
	waitSent(1500)
	c.start(victim)
	t.Logf("%s restarted after %d events sent", c.nodes[victim].name, sent.Load())
	wg.Wait()
	t.Logf("%d events sent in %s: %d accepted, %d given up; answers %v", n, time.Since(sendStart).Round(time.Millisecond), len(accepted), len(refused), answers)
	if len(accepted) < n*9/10 {
		t.Fatalf("only %d of %d events accepted", len(accepted), n)
	}

	// Every accepted event arrives; then the queue settles (a copy in
	// hand at a kill comes back after its ack wait, timeout + 5s).
	missing := func() []string {
		got := backend.received()
		var m []string
		for id := range accepted {
			if got[id] == 0 {
				m = append(m, id)
			}
		}
		sort.Strings(m)
		return m
	}
	testwait.Until(t, 120*time.Second, func() bool { return len(missing()) == 0 }, func() string {
		m := missing()
		return fmt.Sprintf("%d accepted events never delivered, e.g. %v", len(m), m[:min(len(m), 5)])
	})
	testwait.Until(t, 60*time.Second, func() bool {
		st := gs[1].queueStatus(t)
		return st.Pending == 0 && st.InFlight == 0
	}, func() string { return fmt.Sprintf("queue: %+v", gs[1].queueStatus(t)) })
	c.waitHealthy() // the restarted node caught up

	// Repeats: only of attempts in hand at a kill.
	nodeKilled := c.nodes[victim].killedAt
	near := func(at time.Time) bool {
		// An attempt in flight when its gateway died arrived before the
		// kill, within its timeout; an acknowledgement lost with the
		// consumer's leader was sent before the kill or until a new leader
		// was elected (NATS's election timeout is 4-9 s; on a loaded
		// machine, until delivery resumed, which is measured above, and
		// the new leader's first seconds).
		ackLost := nodeKilled.Add(15 * time.Second)
		if r := resumed.Add(5 * time.Second); r.After(ackLost) {
			ackLost = r
		}
		return (at.After(gatewayKilled.Add(-timeout-time.Second)) && at.Before(gatewayKilled.Add(time.Second))) ||
			(at.After(nodeKilled.Add(-timeout-time.Second)) && at.Before(ackLost))
	}
	repeats, extra := 0, 0
	for id, times := range backend.received() {
		if times < 2 {
			continue
		}
		repeats++
		extra += times - 1
		if at := backend.arrivals(id)[0]; !near(at) {
			t.Errorf("%s arrived %d times, first at %s: gateway killed at %s, node at %s; not an attempt in hand at a kill",
				id, times, at.Format("15:04:05.000"), gatewayKilled.Format("15:04:05.000"), nodeKilled.Format("15:04:05.000"))
		}
	}
	// In hand at a kill: per gateway, concurrency attempts and as many
	// fetched copies; the killed gateway's, and both at the node's kill.
	if limit := 3 * 2 * concurrency * 2; repeats > limit {
		t.Errorf("%d events delivered more than once; at most %d were in hand at the kills", repeats, limit)
	}
	// The gateway restarted during the election is up, and took its share.
	if resp, err := http.Get(gs[0].adminURL() + "/config/"); err != nil {
		t.Fatalf("%s, restarted while the cluster elected leaders, is gone: %v", gs[0].name, err)
	} else {
		resp.Body.Close()
	}
	if gs[0].delivered(t) == 0 {
		t.Errorf("%s delivered nothing after its restart", gs[0].name)
	}
	t.Logf("%d accepted events all delivered; %d delivered more than once (%d extra deliveries), all first attempted at a kill; deliveries g1 %v (since its restart), g2 %v",
		len(accepted), repeats, extra, gs[0].delivered(t), gs[1].delivered(t))
}

// TestFaultClusterUnreachable: every NATS node is killed. Both gateways
// answer 503 within enqueue_timeout and acknowledge nothing; when the
// nodes come back on their stores, the events queued before are delivered,
// and new events are accepted and delivered.
func TestFaultClusterUnreachable(t *testing.T) {
	t.Parallel() // its own processes and ports
	c := startNATSCluster(t)
	var up atomic.Bool
	backend := newRecordingBackend(t, 0, func(string) bool { return !up.Load() })
	gs := startClusterGateways(t, 2, clusterGlobal(c, "1s", backend.URL, "\t\t\ttimeout 2s\n\t\t\tretry 200ms"))
	c.waitPulling("app", len(gs))
	client := &http.Client{Timeout: 10 * time.Second}
	const queued = 10
	for i := range queued {
		// As Mux does, a 503 is sent again: just after the cluster
		// formed, the stream's leader may still be settling.
		id := fmt.Sprint("before-", i)
		var status int
		var err error
		for try := 0; try < 10; try++ {
			if status, err = postEvent(client, gs[i%2].url(), event("video.asset.ready", id, "")); status != http.StatusServiceUnavailable {
				break
			}
			t.Logf("%s: 503, sent again", id)
			time.Sleep(500 * time.Millisecond)
		}
		if status != http.StatusAccepted {
			t.Fatalf("%s: %d %v, want 202", id, status, err)
		}
	}
	// Queued and failing (the backend is down): they stay in the stream.
	testwait.For(t, func() bool { return gs[0].queueStatus(t).Pending+gs[0].queueStatus(t).InFlight == queued }, func() string {
		return fmt.Sprintf("queue: %+v", gs[0].queueStatus(t))
	})

	for i := range c.nodes {
		c.kill(i)
	}
	for i := range 4 {
		g := gs[i%2]
		start := time.Now()
		status, err := postEvent(client, g.url(), event("video.asset.ready", fmt.Sprint("during-", i), ""))
		took := time.Since(start)
		if status != http.StatusServiceUnavailable {
			t.Fatalf("during-%d to %s with every NATS node down: %d %v, want 503", i, g.name, status, err)
		}
		// enqueue_timeout is 1s; the rest is slack for a loaded machine.
		if took > 5*time.Second {
			t.Errorf("during-%d: 503 after %s; enqueue_timeout is 1s", i, took)
		}
	}

	up.Store(true)
	for i := range c.nodes {
		c.start(i)
	}
	c.waitHealthy()
	// The gateways reconnect by themselves; Mux retries the refused events.
	for i := range 4 {
		id := fmt.Sprint("during-", i)
		testwait.Until(t, 30*time.Second, func() bool {
			status, _ := postEvent(client, gs[i%2].url(), event("video.asset.ready", id, ""))
			return status == http.StatusAccepted
		}, func() string { return id + " never accepted after the nodes came back" })
	}
	if status, err := postEvent(client, gs[1].url(), event("video.asset.ready", "after", "")); status != http.StatusAccepted {
		t.Fatalf("after: %d %v, want 202", status, err)
	}
	want := []string{"after"}
	for i := range queued {
		want = append(want, fmt.Sprint("before-", i))
	}
	for i := range 4 {
		want = append(want, fmt.Sprint("during-", i))
	}
	testwait.Until(t, 60*time.Second, func() bool {
		got := backend.received()
		for _, id := range want {
			if got[id] == 0 {
				return false
			}
		}
		return true
	}, func() string { return fmt.Sprintf("delivered so far: %v", backend.received()) })
	got := backend.received()
	for id := range got {
		if !slices.Contains(want, id) {
			t.Errorf("%s delivered, never accepted", id)
		}
	}
}
