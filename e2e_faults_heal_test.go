//go:build e2e

package muxwebhook

// The queue heals itself (README, "When things fail"): a NATS connection
// refused for good, a consumer or stream deleted by hand, a full disk
// under the embedded store; and a stall is never silent. Each against real
// processes: the built Caddy, real nats-server processes, a real full
// filesystem.

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/internal/testfs"
	"github.com/caddy-mux-webhook/caddy-mux-webhook/internal/testwait"
)

// healGateway is the built Caddy with an admin API, one site that queues
// every verified event for destination app, and the given mux_webhook
// global option.
type healGateway struct {
	base, admin string
	out         *syncBuffer
	cmd         *exec.Cmd
}

func startHealGateway(t *testing.T, global string) *healGateway {
	t.Helper()
	port, admin := freePort(t), freePort(t)
	cfg := queueGatewayConfig(admin, global, port)
	dir := t.TempDir()
	g := &healGateway{base: fmt.Sprintf("http://127.0.0.1:%d", port), admin: fmt.Sprintf("http://127.0.0.1:%d", admin)}
	g.out, g.cmd = runCaddyIn(t, caddyBinary(t), cfg, dir, dir, nil)
	waitQueueOpen(t, g.admin, g.out)
	return g
}

// send posts one signed event and returns the status (0: no answer).
func (g *healGateway) send(t *testing.T, id string) int {
	t.Helper()
	status, _ := postEvent(http.DefaultClient, g.base, event("video.asset.ready", id, ""))
	return status
}

// logged reports whether the gateway's output has a line at level whose
// message holds msg.
func (g *healGateway) logged(level, msg string) bool {
	for _, line := range strings.Split(g.out.String(), "\n") {
		if strings.Contains(line, `"level":"`+level+`"`) && strings.Contains(line, msg) {
			return true
		}
	}
	return false
}

func (g *healGateway) status(t *testing.T) QueueStatus {
	t.Helper()
	var list []QueueStatus
	if code := getJSON(t, g.admin+"/mux-webhook/queue", &list); code != 200 || len(list) != 1 {
		t.Fatalf("queue status %d: %+v", code, list)
	}
	return list[0]
}

// sendAll sends each id until it is answered 202, as Mux does (bounded by
// limit), and fails the test for one never accepted.
func (g *healGateway) sendAll(t *testing.T, limit time.Duration, ids ...string) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for _, id := range ids {
		for g.send(t, id) != http.StatusAccepted {
			if time.Now().After(deadline) {
				t.Fatalf("%s never answered 202 within %s\n%s", id, limit, tail(g.out.String(), 4096))
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
}

// TestFaultConsumerAndStreamDeletedByHand: a destination's consumer
// deleted (`nats consumer rm`), then the whole stream deleted (`nats
// stream rm`, as before restoring a backup): every event answered 202
// afterwards is delivered, with no reload or restart, and the WARN line
// says what was made again.
func TestFaultConsumerAndStreamDeletedByHand(t *testing.T) {
	t.Parallel() // its own processes and ports
	natsURL, _ := natsServer(t)
	backend := newRecordingBackend(t, 0, nil)
	g := startHealGateway(t, fmt.Sprintf("\tmux_webhook {\n\t\tqueue {\n\t\t\tnats %s\n\t\t}\n\t\tdestination app %s {\n\t\t\tretry 200ms\n\t\t}\n\t}", natsURL, backend.URL))
	js := jetStreamOf(t, natsURL)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	g.sendAll(t, 10*time.Second, "first")
	waitDelivered(t, backend, 15*time.Second, g.out, "first")
	// Swept from the stream, so that the consumer made again does not
	// deliver it again.
	testwait.Until(t, 10*time.Second, func() bool { return g.status(t).Pending+g.status(t).InFlight == 0 }, func() string { return "first never settled" })

	if err := js.DeleteConsumer(ctx, "MUX_WEBHOOK_0", "deliver_app"); err != nil {
		t.Fatal(err)
	}
	afterConsumer := ids("after-consumer", 5)
	g.sendAll(t, 10*time.Second, afterConsumer...)
	waitDelivered(t, backend, 20*time.Second, g.out, afterConsumer...)
	if !g.logged("warn", "consumer was gone") {
		t.Error("no WARN line said the consumer was made again")
	}

	if err := js.DeleteStream(ctx, "MUX_WEBHOOK_0"); err != nil {
		t.Fatal(err)
	}
	afterStream := ids("after-stream", 5)
	g.sendAll(t, 10*time.Second, afterStream...)
	repeats := waitDelivered(t, backend, 20*time.Second, g.out, afterStream...)
	if !g.logged("warn", "made it again") {
		t.Error("no WARN line said the stream was made again")
	}
	t.Logf("11 events across a deleted consumer and a deleted stream: all delivered, %d repeats", repeats)
}

// TestFaultNATSAuthRotated: the external server's password is rotated on
// the server first (it restarts with the new one): the gateway's
// reconnections are refused again and again, which nats.go would end for
// good. Meanwhile mux_deliver answers 503 (Mux retries) and an ERROR line
// says why; once the new password is in the gateway's {file.*}, it
// reconnects by itself, with no reload, and every event answered 202
// before and after is delivered.
func TestFaultNATSAuthRotated(t *testing.T) {
	t.Parallel() // its own processes and ports
	dir := t.TempDir()
	port := freePort(t)
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	store := t.TempDir()
	natsConf := func(password string) string {
		return fmt.Sprintf("listen: %s\njetstream { store_dir: %q }\nauthorization { user: mux, password: %q }\n", addr, store, password)
	}
	server := natsServerWithConfig(t, dir, addr, natsConf("old-secret-1"))
	pwFile := filepath.Join(dir, "nats-password")
	if err := os.WriteFile(pwFile, []byte("old-secret-1"), 0o600); err != nil {
		t.Fatal(err)
	}
	backend := newRecordingBackend(t, 0, nil)
	g := startHealGateway(t, fmt.Sprintf("\tmux_webhook {\n\t\tqueue {\n\t\t\tnats nats://%s {\n\t\t\t\tuser mux\n\t\t\t\tpassword {file.%s}\n\t\t\t}\n\t\t\tenqueue_timeout 1s\n\t\t}\n\t\tdestination app %s {\n\t\t\tretry 200ms\n\t\t}\n\t}", addr, pwFile, backend.URL))
	g.sendAll(t, 10*time.Second, "before")
	waitDelivered(t, backend, 15*time.Second, g.out, "before")

	// The server first: SIGKILL, and up again on the same store with the
	// new password.
	if err := server.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = server.Wait()
	natsServerWithConfig(t, t.TempDir(), addr, natsConf("new-secret-2"))
	// Long enough for nats.go to be refused twice (it reconnects every
	// 2s), which ended the connection for good before.
	deadline := time.Now().Add(8 * time.Second)
	for time.Now().Before(deadline) {
		if status := g.send(t, "while-refused"); status != http.StatusServiceUnavailable {
			t.Fatalf("while NATS refuses the gateway: %d, want 503", status)
		}
		time.Sleep(time.Second)
	}
	if !g.logged("error", "could not queue the event") {
		t.Error("no ERROR line for the events answered 503")
	}
	if up := scrape(t, g.admin)["caddy_mux_webhook_queue_up"]; up != 0 {
		t.Errorf("caddy_mux_webhook_queue_up is %v while NATS refuses the gateway, want 0", up)
	}

	if err := os.WriteFile(pwFile, []byte("new-secret-2"), 0o600); err != nil {
		t.Fatal(err)
	}
	after := append([]string{"while-refused"}, ids("after", 5)...)
	g.sendAll(t, 30*time.Second, after...)
	waitDelivered(t, backend, 20*time.Second, g.out, after...)
	for _, secret := range []string{"old-secret-1", "new-secret-2"} {
		if strings.Contains(g.out.String(), secret) {
			t.Errorf("the gateway's output shows the password %q", secret)
		}
	}
}

// TestFaultStalledDestination: a destination whose copies nobody takes
// (its consumer paused by hand, `nats consumer pause`: it exists, so
// nothing makes it again, and pulls get nothing) is not silent: within
// stall_after past the due attempt, its status says stalled, an ERROR
// line and the CLI say so, and caddy_mux_webhook_queue_stalled is 1.
// Once the consumer is resumed, everything is delivered and the stall
// clears.
func TestFaultStalledDestination(t *testing.T) {
	t.Parallel() // its own processes and ports
	natsURL, _ := natsServer(t)
	backend := newRecordingBackend(t, 0, nil)
	g := startHealGateway(t, fmt.Sprintf("\tmux_webhook {\n\t\tqueue {\n\t\t\tnats %s\n\t\t}\n\t\tdestination app %s {\n\t\t\ttimeout 1s\n\t\t\tretry 200ms\n\t\t\tstall_after 1s\n\t\t}\n\t}", natsURL, backend.URL))
	js := jetStreamOf(t, natsURL)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, err := js.PauseConsumer(ctx, "MUX_WEBHOOK_0", "deliver_app", time.Now().Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	stuck := ids("stuck", 3)
	g.sendAll(t, 10*time.Second, stuck...)
	testwait.Until(t, 30*time.Second, func() bool { return g.status(t).Stalled }, func() string {
		return fmt.Sprintf("never stalled: %+v\n%s", g.status(t), tail(g.out.String(), 4096))
	})
	st := g.status(t)
	if st.StalledSince == "" || st.Pending+st.InFlight != 3 {
		t.Errorf("stalled status: %+v", st)
	}
	if !g.logged("error", "mux webhook delivery stalled") || !strings.Contains(g.out.String(), "consumer is paused in NATS") {
		t.Error("no ERROR line said the destination is stalled, and why")
	}
	if v := scrape(t, g.admin)[`caddy_mux_webhook_queue_stalled{destination="app"}`]; v != 1 {
		t.Errorf(`caddy_mux_webhook_queue_stalled{destination="app"} = %v, want 1`, v)
	}
	if len(backend.received()) != 0 {
		t.Fatalf("delivered while stalled: %v", backend.received())
	}
	if out, err := exec.Command(caddyBinary(t), "mux-webhook", "queue", "--address", strings.TrimPrefix(g.admin, "http://")).CombinedOutput(); err != nil || !strings.Contains(string(out), "STALLED: app:") {
		t.Errorf("caddy mux-webhook queue while stalled: %v\n%s", err, out)
	}

	if _, err := js.ResumeConsumer(ctx, "MUX_WEBHOOK_0", "deliver_app"); err != nil {
		t.Fatal(err)
	}
	waitDelivered(t, backend, 20*time.Second, g.out, stuck...)
	testwait.Until(t, 20*time.Second, func() bool { return !g.status(t).Stalled }, func() string { return "still stalled after delivering" })
	if !g.logged("info", "no longer stalled") {
		t.Error("no INFO line said the stall cleared")
	}
	if v := scrape(t, g.admin)[`caddy_mux_webhook_queue_stalled{destination="app"}`]; v != 0 {
		t.Errorf(`caddy_mux_webhook_queue_stalled{destination="app"} = %v after the stall, want 0`, v)
	}
}

// TestFaultEmbeddedDiskFull: the embedded store's filesystem (a real,
// small tmpfs) fills: mux_deliver answers 503 (never 202 for what is not
// stored), an ERROR line gives nats-server's reason; once the filler is
// deleted, the gateway accepts and delivers again by itself, and every
// event answered 202 before, during and after is delivered.
func TestFaultEmbeddedDiskFull(t *testing.T) {
	caddyBinary(t) // skips under -short or without the binary, before mounting
	mnt := testfs.Small(t, "24m")
	backend := newRecordingBackend(t, 0, nil)
	g := startHealGateway(t, fmt.Sprintf("\tmux_webhook {\n\t\tqueue {\n\t\t\tdir %s\n\t\t\tmax_bytes 4MiB\n\t\t\tdead_max_bytes 2MiB\n\t\t}\n\t\tdestination app %s {\n\t\t\tretry 200ms\n\t\t}\n\t}", filepath.Join(mnt, "js"), backend.URL))
	g.sendAll(t, 10*time.Second, "before")
	waitDelivered(t, backend, 15*time.Second, g.out, "before")

	filler := filepath.Join(mnt, "filler")
	testfs.Fill(t, filler)
	accepted := []string{}
	refused := ""
	for i := 0; i < 200 && refused == ""; i++ {
		id := "full-" + strconv.Itoa(i)
		switch status := g.send(t, id); status {
		case http.StatusAccepted:
			accepted = append(accepted, id)
		case http.StatusServiceUnavailable:
			refused = id
		default:
			t.Fatalf("%s: %d", id, status)
		}
	}
	if refused == "" {
		t.Fatal("a full disk never made mux_deliver answer 503")
	}
	testwait.Until(t, 10*time.Second, func() bool { return g.logged("error", "embedded store stopped") }, func() string {
		return "no ERROR line said why the store stopped\n" + tail(g.out.String(), 4096)
	})
	if status := g.send(t, "while-full"); status != http.StatusServiceUnavailable {
		t.Errorf("while the disk is full: %d, want 503", status)
	}

	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	after := append([]string{refused, "while-full"}, ids("after", 5)...)
	g.sendAll(t, 30*time.Second, after...)
	repeats := waitDelivered(t, backend, 30*time.Second, g.out, append(accepted, after...)...)
	testwait.Until(t, 10*time.Second, func() bool { return g.logged("info", "accepts events again") }, func() string {
		return "no INFO line said the store accepts events again"
	})
	t.Logf("disk full after %d events accepted; all %d delivered after it was freed, %d repeats", len(accepted), len(accepted)+len(after), repeats)
}

// TestFaultStartedOnAFullDisk: Caddy (re)started while its embedded
// store's disk is full (killed during the outage, restarted by its
// service manager) starts all the same: its sites serve, mux_deliver
// answers 503 and an ERROR line says why; once the disk has room, the
// queue opens by itself and delivers what it held and what comes next.
func TestFaultStartedOnAFullDisk(t *testing.T) {
	caddyBinary(t) // skips under -short or without the binary, before mounting
	mnt := testfs.Small(t, "24m")
	var down atomic.Bool
	down.Store(true) // the first Caddy queues an event its backend does not take yet, and is killed
	backend := newRecordingBackend(t, 0, func(string) bool { return down.Load() })
	global := fmt.Sprintf("\tmux_webhook {\n\t\tqueue {\n\t\t\tdir %s\n\t\t\tmax_bytes 4MiB\n\t\t\tdead_max_bytes 2MiB\n\t\t}\n\t\tdestination app %s {\n\t\t\tretry 200ms\n\t\t\ttimeout 2s\n\t\t}\n\t}", filepath.Join(mnt, "js"), backend.URL)
	// (timeout 2s: a copy in flight at the kill comes back after its ack
	// deadline, timeout + 5s.)
	g := startHealGateway(t, global)
	g.sendAll(t, 10*time.Second, "held")
	if err := g.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = g.cmd.Wait()
	down.Store(false)

	filler := filepath.Join(mnt, "filler")
	testfs.Fill(t, filler)
	port, admin := freePort(t), freePort(t)
	dir := t.TempDir()
	out, _ := runCaddyIn(t, caddyBinary(t), queueGatewayConfig(admin, global, port), dir, dir, nil)
	g = &healGateway{base: fmt.Sprintf("http://127.0.0.1:%d", port), admin: fmt.Sprintf("http://127.0.0.1:%d", admin), out: out}
	testwait.Until(t, 20*time.Second, func() bool { return g.send(t, "while-full") == http.StatusServiceUnavailable },
		func() string { return "the site never answered 503 on a full disk\n" + tail(out.String(), 4096) })
	if !g.logged("error", "the store cannot open: its disk has no room") {
		t.Errorf("no ERROR line said why the queue is not open\n%s", tail(out.String(), 4096))
	}

	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	g.sendAll(t, 30*time.Second, "while-full", "after")
	waitDelivered(t, backend, 30*time.Second, out, "held", "while-full", "after")
	if !g.logged("info", "the store opened; delivering") {
		t.Error("no INFO line said the queue opened")
	}
}
