//go:build e2e

package muxwebhook

// Order per object on partitioned streams (issue #21), against the built
// binary: one object's failing event holds only its own later events;
// order and "never two at once" through two gateways on a three-node
// cluster; order kept across a SIGKILL of the gateway holding an attempt.

import (
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/internal/testorder"
	"github.com/caddy-mux-webhook/caddy-mux-webhook/internal/testwait"
)

// objectEvent is a signed-able event id of type typ for object.
func objectEvent(typ, id, object string) []byte {
	return []byte(fmt.Sprintf(`{"type":%q,"request_id":null,"object":{"type":"asset","id":%q},"id":%q,"environment":{"name":"Production","id":"env-1"},"data":{"id":%q},"created_at":"2024-05-01T10:00:00.000000Z","attempts":[],"accessor_source":null,"accessor":null}`,
		typ, object, id, object))
}

// sendInOrder posts each event in turn to url, each once the one before
// it is answered 202 (as Mux sends one object's events), retrying until
// limit.
func sendInOrder(t *testing.T, url func(i int) string, limit time.Duration, bodies ...[]byte) {
	t.Helper()
	client := &http.Client{Timeout: 10 * time.Second}
	deadline := time.Now().Add(limit)
	for i, body := range bodies {
		for {
			status, err := postEvent(client, url(i), body)
			if status == http.StatusAccepted {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("event %d never answered 202: %d %v", i, status, err)
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}

// TestOrderObjectOneFailingObject: order object on the embedded store's
// default 4 partitions, concurrency 4. The first of asset-late's 5 events
// fails twice (the second failure held until the rest is through), while
// 50 other objects' 2 events each are delivered, each object in order;
// meanwhile the status, the CLI and the metric count asset-late's 4 later
// events held. Then asset-late's arrive in order, never two at once, each
// later one on its first attempt (a held copy is not charged).
func TestOrderObjectOneFailingObject(t *testing.T) {
	t.Parallel() // its own processes and ports
	release := make(chan struct{})
	b := testorder.New(t, 5*time.Millisecond, func(_ *http.Request, id string, n int) int {
		if id == "late-0" && n <= 2 {
			if n == 2 {
				<-release
			}
			return http.StatusServiceUnavailable
		}
		return http.StatusNoContent
	})
	dir := filepath.Join(t.TempDir(), "js")
	g := startHealGateway(t, fmt.Sprintf("\tmux_webhook {\n\t\tqueue {\n\t\t\tdir %s\n\t\t}\n\t\tdestination app %s {\n\t\t\tretry 200ms\n\t\t\torder object\n\t\t}\n\t}", dir, b.URL))
	url := func(int) string { return g.base }
	var late [][]byte
	want := map[string][]string{}
	for i := range 5 {
		id := fmt.Sprint("late-", i)
		late = append(late, objectEvent("video.asset.updated", id, "asset-late"))
		want["asset-late"] = append(want["asset-late"], id)
	}
	sendInOrder(t, url, 20*time.Second, late...)
	var others [][]byte
	for i := range 50 {
		for k := range 2 {
			obj, id := fmt.Sprint("asset-", i), fmt.Sprintf("o%d-%d", i, k)
			others = append(others, objectEvent("video.asset.updated", id, obj))
			want[obj] = append(want[obj], id)
		}
	}
	sendInOrder(t, url, 30*time.Second, others...)
	testwait.Until(t, 60*time.Second, func() bool {
		for i := range 50 {
			if len(b.Of(fmt.Sprint("asset-", i))) != 2 {
				return false
			}
		}
		return true
	}, func() string {
		return "the other 50 objects were not all delivered while late-0 failed\n" + tail(g.out.String(), 4096)
	})
	if got := b.Of("asset-late"); len(got) != 0 {
		t.Fatalf("asset-late's events delivered before its first: %v", got)
	}
	testwait.Until(t, 20*time.Second, func() bool { return g.status(t).Held == 4 },
		func() string { return fmt.Sprintf("the status never counted 4 held: %+v", g.status(t)) })
	testwait.Until(t, 15*time.Second, func() bool { return scrape(t, g.admin)[`caddy_mux_webhook_queue_held{destination="app"}`] == 4 },
		func() string { return "caddy_mux_webhook_queue_held never said 4 (the gauges are read every 5s)" })
	out, err := runCommand(t, "", "queue", "--address", strings.TrimPrefix(g.admin, "http://"))
	if err != nil || !strings.Contains(out, "HELD") {
		t.Errorf("caddy mux-webhook queue: no HELD column: %v\n%s", err, out)
	}
	close(release)
	testwait.Until(t, 30*time.Second, func() bool { return len(b.Of("asset-late")) == 5 },
		func() string {
			return fmt.Sprintf("asset-late: %v\n%s", b.Of("asset-late"), tail(g.out.String(), 4096))
		})
	b.CheckOrder(t, want)
	if got := b.Attempts("late-0"); !slices.Equal(got, []string{"1", "2", "3"}) {
		t.Errorf("late-0's POSTs carried attempts %v, want 1 2 3", got)
	}
	for i := 1; i < 5; i++ {
		if got := b.Attempts(fmt.Sprint("late-", i)); !slices.Equal(got, []string{"1"}) {
			t.Errorf("late-%d, held meanwhile, came as %v; want one POST, attempt 1", i, got)
		}
	}
	// held may lag by up to 5s (it is counted at most every 5s).
	testwait.Until(t, 15*time.Second, func() bool { st := g.status(t); return st.Held == 0 && st.Pending+st.InFlight == 0 },
		func() string { return fmt.Sprintf("after: %+v", g.status(t)) })
}

// TestOrderObjectOnACluster: 10 objects × 20 events, sent through two
// gateways in turn, on a three-node cluster, to a destination with
// concurrency 8 and order object: every object's events arrive in the
// order they were accepted, never two of one object at once, each once.
func TestOrderObjectOnACluster(t *testing.T) {
	t.Parallel() // its own processes and ports
	c := startNATSCluster(t)
	b := testorder.New(t, 10*time.Millisecond, nil)
	gs := startClusterGateways(t, 2, clusterGlobal(c, "5s", b.URL, "\t\t\ttimeout 2s\n\t\t\tretry 100ms\n\t\t\tconcurrency 8\n\t\t\torder object"))
	c.waitPulling("app", len(gs))
	want := map[string][]string{}
	var wg sync.WaitGroup
	for o := range 10 {
		obj := fmt.Sprint("asset-", o)
		var bodies [][]byte
		for i := range 20 {
			id := fmt.Sprintf("%s-e%02d", obj, i)
			bodies = append(bodies, objectEvent("video.asset.updated", id, obj))
			want[obj] = append(want[obj], id)
		}
		wg.Add(1)
		go func() { // each object's events in turn, alternating gateways
			defer wg.Done()
			sendInOrder(t, func(i int) string { return gs[(o+i)%2].url() }, 60*time.Second, bodies...)
		}()
	}
	wg.Wait()
	start := time.Now()
	testwait.Until(t, 120*time.Second, func() bool {
		for o := range 10 {
			if len(b.Of(fmt.Sprint("asset-", o))) < 20 {
				return false
			}
		}
		return true
	}, func() string {
		var n []int
		for o := range 10 {
			n = append(n, len(b.Of(fmt.Sprint("asset-", o))))
		}
		return fmt.Sprintf("delivered per object: %v\n%s", n, tail(gs[0].out.String(), 2048))
	})
	t.Logf("200 events of 10 objects delivered in order %s after the last was accepted", time.Since(start).Round(time.Millisecond))
	b.CheckOrder(t, want)
}

// TestOrderKeptAcrossASIGKILL: the gateway is killed (SIGKILL) while it
// attempts the first of an object's 4 events; started again on the same
// store, the first is attempted again once its ack deadline passes, and
// only then the 3 others, in order. Another object's events, queued
// meanwhile, are not held.
func TestOrderKeptAcrossASIGKILL(t *testing.T) {
	t.Parallel() // its own processes and ports
	inAttempt := make(chan struct{}, 1)
	b := testorder.New(t, 0, func(r *http.Request, id string, n int) int {
		if id == "k-0" && n == 1 {
			inAttempt <- struct{}{}
			<-r.Context().Done() // the gateway dies while it waits
			return http.StatusServiceUnavailable
		}
		return http.StatusNoContent
	})
	dir := filepath.Join(t.TempDir(), "js")
	global := fmt.Sprintf("\tmux_webhook {\n\t\tqueue {\n\t\t\tdir %s\n\t\t}\n\t\tdestination app %s {\n\t\t\ttimeout 2s\n\t\t\tretry 200ms\n\t\t\torder object\n\t\t}\n\t}", dir, b.URL)
	g := startHealGateway(t, global)
	var bodies [][]byte
	for i := range 4 {
		bodies = append(bodies, objectEvent("video.asset.updated", fmt.Sprint("k-", i), "asset-k"))
	}
	sendInOrder(t, func(int) string { return g.base }, 20*time.Second, bodies...)
	select {
	case <-inAttempt:
	case <-time.After(20 * time.Second):
		t.Fatal("k-0 was never attempted")
	}
	if err := g.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = g.cmd.Wait()

	g2 := startHealGateway(t, global)
	sendInOrder(t, func(int) string { return g2.base }, 20*time.Second, objectEvent("video.asset.ready", "other-0", "asset-other"))
	testwait.Until(t, 30*time.Second, func() bool { return len(b.Of("asset-k")) == 4 && len(b.Of("asset-other")) == 1 },
		func() string { return fmt.Sprintf("asset-k: %v\n%s", b.Of("asset-k"), tail(g2.out.String(), 4096)) })
	b.CheckOrder(t, map[string][]string{"asset-k": {"k-0", "k-1", "k-2", "k-3"}, "asset-other": {"other-0"}})
	if !b.At("other-0").Before(b.At("k-0")) {
		t.Errorf("other-0 (another object) waited for asset-k's k-0: delivered at %v, k-0 at %v", b.At("other-0"), b.At("k-0"))
	}
	for i := 1; i < 4; i++ {
		if n := len(b.Attempts(fmt.Sprint("k-", i))); n != 1 {
			t.Errorf("k-%d POSTed %d times, want once", i, n)
		}
	}
}

// singleStreamCommit is the last commit whose queue was one stream
// (MUX_WEBHOOK, subjects MUX_WEBHOOK.deliver.<destination>).
const singleStreamCommit = "662db8a"

// singleStreamCaddy is a Caddy built from singleStreamCommit, named by
// MUX_SINGLE_STREAM_CADDY_BIN (./scripts/test builds it into .tools). On
// CI the variable must be set.
func singleStreamCaddy(t *testing.T) string {
	t.Helper()
	bin := os.Getenv("MUX_SINGLE_STREAM_CADDY_BIN")
	if bin == "" {
		if os.Getenv("CI") != "" {
			t.Fatal("MUX_SINGLE_STREAM_CADDY_BIN is not set; CI must run the upgrade test (see scripts/test)")
		}
		t.Skip("MUX_SINGLE_STREAM_CADDY_BIN not set: the upgrade test needs a Caddy built from " + singleStreamCommit + "; ./scripts/test builds one")
	}
	abs, err := filepath.Abs(bin)
	if err != nil {
		t.Fatal(err)
	}
	return abs
}

// TestUpgradeFromTheSingleStreamStore: a Caddy of the single-stream
// layout queues 20 events of 5 objects while the backend is down
// (attempting some), and is killed (SIGKILL). This version, started on
// the same store directory, delivers every one of them (the old stream is
// drained, an INFO line says so) and the events it accepts itself (into
// the partitions), each once; the status counted the old copies
// meanwhile. Started again, it deletes the emptied old stream.
func TestUpgradeFromTheSingleStreamStore(t *testing.T) {
	t.Parallel() // its own processes and ports
	old := singleStreamCaddy(t)
	var mu sync.Mutex
	up := false
	b := testorder.New(t, 0, func(*http.Request, string, int) int {
		mu.Lock()
		defer mu.Unlock()
		if !up {
			return http.StatusServiceUnavailable
		}
		return http.StatusNoContent
	})
	dir := filepath.Join(t.TempDir(), "js")
	port, admin := freePort(t), freePort(t)
	adminURL := fmt.Sprintf("http://127.0.0.1:%d", admin)
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	cfg := queueGatewayConfig(admin, fmt.Sprintf("\tmux_webhook {\n\t\tqueue {\n\t\t\tdir %s\n\t\t}\n\t\tdestination app %s {\n\t\t\ttimeout 2s\n\t\t\tretry 500ms\n\t\t\tbreaker off\n\t\t}\n\t}", dir, b.URL), port)
	home := t.TempDir()
	out, cmd := runCaddyIn(t, old, cfg, home, home, nil)
	waitQueueOpen(t, adminURL, out)
	want := map[string][]string{}
	var bodies [][]byte
	for i := range 20 {
		obj, id := fmt.Sprint("asset-", i%5), fmt.Sprint("old-", i)
		bodies = append(bodies, objectEvent("video.asset.updated", id, obj))
		want[obj] = append(want[obj], id)
	}
	sendInOrder(t, func(int) string { return base }, 30*time.Second, bodies...)
	testwait.Until(t, 20*time.Second, func() bool { return len(b.Attempts("old-19")) > 0 },
		func() string { return "the old version attempted nothing\n" + tail(out.String(), 2048) })
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()

	out, cmd = runCaddyIn(t, caddyBinary(t), cfg, home, home, nil)
	waitQueueOpen(t, adminURL, out)
	var st []QueueStatus
	testwait.Until(t, 20*time.Second, func() bool {
		return getJSON(t, adminURL+"/mux-webhook/queue", &st) == 200 && len(st) == 1 && st[0].Pending+st[0].InFlight == 20
	}, func() string { return fmt.Sprintf("the old copies are not counted: %+v", st) })
	mu.Lock()
	up = true
	mu.Unlock()
	var fresh [][]byte
	for i := range 10 {
		obj, id := fmt.Sprint("asset-", i%5), fmt.Sprint("new-", i)
		fresh = append(fresh, objectEvent("video.asset.updated", id, obj))
		want[obj] = append(want[obj], id)
	}
	sendInOrder(t, func(int) string { return base }, 30*time.Second, fresh...)
	testwait.Until(t, 60*time.Second, func() bool {
		n := 0
		for obj := range want {
			n += len(b.Of(obj))
		}
		return n >= 30
	}, func() string { return "not every event delivered after the upgrade\n" + tail(out.String(), 4096) })
	if !strings.Contains(out.String(), "the single stream of an earlier version holds copies") {
		t.Error("no INFO line said the old stream is drained")
	}
	for obj, ids := range want {
		if got := b.Of(obj); len(got) != len(ids) {
			t.Errorf("%s: delivered %v, want each of %v once", obj, got, ids)
		}
	}
	testwait.Until(t, 20*time.Second, func() bool {
		return getJSON(t, adminURL+"/mux-webhook/queue", &st) == 200 && len(st) == 1 && st[0].Pending+st[0].InFlight == 0
	}, func() string { return fmt.Sprintf("status after: %+v", st) })
	time.Sleep(time.Second) // the sweep of the old stream (every 250ms)
	if err := cmd.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
	out, _ = runCaddyIn(t, caddyBinary(t), cfg, home, home, nil)
	waitQueueOpen(t, adminURL, out)
	if !strings.Contains(out.String(), "the single stream of an earlier version is empty; deleted it") {
		t.Errorf("the emptied old stream was not deleted at the next start\n%s", tail(out.String(), 4096))
	}
}
