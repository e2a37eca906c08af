package queue

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// natsOnLoopback runs a NATS server with JetStream on a random port of
// 127.0.0.1 for the test, as an external server to connect to.
func natsOnLoopback(t *testing.T) string {
	t.Helper()
	ns, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: t.TempDir(), NoSigs: true, NoLog: true, MaxPayload: 2 << 20})
	if err != nil {
		t.Fatal(err)
	}
	ns.Start()
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats server did not start")
	}
	t.Cleanup(func() { ns.Shutdown(); ns.WaitForShutdown() })
	return ns.ClientURL()
}

// TestSharedAckDeadlineNeverShortened: two gateways share a destination's
// consumer on external NATS with different timeouts. The one with the
// shorter timeout keeps the longer ack deadline (else the other's long
// attempts would be handed out again mid-attempt) and says so at WARN;
// the one with the longer timeout raises it.
func TestSharedAckDeadlineNeverShortened(t *testing.T) {
	url := natsOnLoopback(t)
	b := newBackend(t, func(int) int { return http.StatusNoContent })
	coreA, logsA := observer.New(zapcore.WarnLevel)
	a := openTest(t, Config{URLs: []string{url}, Logger: zap.New(coreA)})
	defer a.Close()
	stopA, err := a.StartWorkers(context.Background(), Destination{Name: "app", URL: b.URL, Timeout: 30 * time.Second}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer stopA()
	coreB, logsB := observer.New(zapcore.WarnLevel)
	bs := openTest(t, Config{URLs: []string{url}, Logger: zap.New(coreB)})
	defer bs.Close()
	stopB, err := bs.StartWorkers(context.Background(), Destination{Name: "app", URL: b.URL, Timeout: 5 * time.Second}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer stopB()
	ackWait := func() time.Duration {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c, err := a.js.Consumer(ctx, a.cfg.Stream, "deliver_app")
		if err != nil {
			t.Fatal(err)
		}
		return c.CachedInfo().Config.AckWait
	}
	if got := ackWait(); got != 35*time.Second {
		t.Errorf("after the gateway with timeout 5s started: ack wait %s, want 35s (kept)", got)
	}
	if logsB.FilterMessageSnippet("shorter than the shared consumer's").Len() != 1 {
		t.Errorf("the gateway with the shorter timeout logged %v; want one WARN", logsB.All())
	}
	if logsA.FilterMessageSnippet("ack deadline").Len() != 0 {
		t.Errorf("the first gateway logged %v; want nothing", logsA.All())
	}
	put(t, bs, "app", "shared-1", []byte(`{"id":"shared-1"}`))
	waitUntil(t, "a delivery through either", func() bool { return deliveredIDs(b)["shared-1"] == 1 })
}
