package queue

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// TestSweepLeftForTheNextWorkers: workers that stop while NATS is away
// cannot delete the copies they settled above the ack floor (an earlier
// copy waits for its retry); their last sweep does not wait for NATS, and
// leaves those copies with the Store, whose next workers delete them.
func TestSweepLeftForTheNextWorkers(t *testing.T) {
	s := openTest(t, Config{Dir: t.TempDir()})
	defer s.Close()
	put(t, s, "app", "waits-for-a-retry", []byte(`{}`)) // sequence 1: the ack floor stays below it
	put(t, s, "app", "settled", []byte(`{}`))           // sequence 2: settled, above the floor
	ctx := context.Background()
	d := Destination{Name: "app"}
	d.defaults()
	cons, err := s.js.CreateOrUpdateConsumer(ctx, s.cfg.Stream, s.consumerConfig(d))
	if err != nil {
		t.Fatal(err)
	}
	subject := s.Subject("app")

	// The stopped workers' Store, its connection lost.
	nc, err := nats.Connect("", nats.InProcessServer(s.server))
	if err != nil {
		t.Fatal(err)
	}
	nc.Close()
	away := &Store{cfg: s.cfg, conn: nc, js: s.js, stream: s.stream, handBacks: s.handBacks}
	old := &sweeper{s: away, cons: cons, subject: subject, settled: map[uint64]time.Time{2: time.Now()}}
	stopped, cancel := context.WithCancel(ctx)
	cancel()
	start := time.Now()
	old.run(stopped) // its last sweep
	if took := time.Since(start); took >= sweepTimeout {
		t.Errorf("the last sweep waited %v for NATS", took)
	}
	if _, err := s.stream.GetMsg(ctx, 2); err != nil {
		t.Fatalf("the settled copy is gone, with NATS away: %v", err)
	}

	// The next workers, NATS back.
	next := &sweeper{s: s, cons: cons, subject: subject, settled: away.takeUnswept(subject)}
	if len(next.settled) != 1 {
		t.Fatalf("the next workers got %d copies to sweep, want 1", len(next.settled))
	}
	next.sweep(ctx, true, true)
	if _, err := s.stream.GetMsg(ctx, 2); !errors.Is(err, jetstream.ErrMsgNotFound) {
		t.Errorf("the settled copy is still in the stream: %v", err)
	}
	if _, err := s.stream.GetMsg(ctx, 1); err != nil {
		t.Errorf("the copy waiting for its retry was removed: %v", err)
	}
}
