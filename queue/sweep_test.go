package queue

import (
	"context"
	"errors"
	"fmt"
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
	s, cons, subject := sweepSetup(t)
	ctx := context.Background()

	// The stopped workers' Store, its connection lost.
	nc, err := nats.Connect("", nats.InProcessServer(s.server))
	if err != nil {
		t.Fatal(err)
	}
	nc.Close()
	away := &Store{cfg: s.cfg, conn: nc, js: s.js, handBacks: s.handBacks, sweepGrace: s.sweepGrace}
	old := newSweeper(away, firstPart(s).stream, cons, subject)
	old.settled[2] = time.Now()
	stopped, cancel := context.WithCancel(ctx)
	cancel()
	start := time.Now()
	old.run(stopped) // its last sweep
	if took := time.Since(start); took >= sweepTimeout {
		t.Errorf("the last sweep waited %v for NATS", took)
	}
	if _, err := firstPart(s).stream.GetMsg(ctx, 2); err != nil {
		t.Fatalf("the settled copy is gone, with NATS away: %v", err)
	}

	// The next workers, NATS back.
	next := &sweeper{s: s, stream: firstPart(s).stream, cons: cons, subject: subject, created: old.created, settled: away.takeUnswept(subject, old.created)}
	if len(next.settled) != 1 {
		t.Fatalf("the next workers got %d copies to sweep, want 1", len(next.settled))
	}
	next.sweep(ctx, true, true)
	if _, err := firstPart(s).stream.GetMsg(ctx, 2); !errors.Is(err, jetstream.ErrMsgNotFound) {
		t.Errorf("the settled copy is still in the stream: %v", err)
	}
	if _, err := firstPart(s).stream.GetMsg(ctx, 1); err != nil {
		t.Errorf("the copy waiting for its retry was removed: %v", err)
	}
}

// TestSweepLeftWhileTheNextWorkersRun: a reload starts the destination's
// new workers before it stops the old ones, so what the old ones leave
// unswept comes after the new sweeper started: it must still be swept.
func TestSweepLeftWhileTheNextWorkersRun(t *testing.T) {
	s, cons, subject := sweepSetup(t)
	ctx := context.Background()

	// The new workers' sweeper runs first...
	next := newSweeper(s, firstPart(s).stream, cons, subject)
	runCtx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); next.run(runCtx) }()
	defer func() { stop(); <-done }()
	// ...then the old workers stop, their last sweep without NATS.
	s.keepUnswept(subject, cons.CachedInfo().Created, map[uint64]time.Time{2: time.Now().Add(-s.sweepGrace)})

	waitUntil(t, "the copy the old workers left to be swept", func() bool {
		_, err := firstPart(s).stream.GetMsg(ctx, 2)
		return errors.Is(err, jetstream.ErrMsgNotFound)
	})
	if _, err := firstPart(s).stream.GetMsg(ctx, 1); err != nil {
		t.Errorf("the copy waiting for its retry was removed: %v", err)
	}
}

// TestSweepForgetsAStreamMadeAgain: copies noted as settled on a stream
// (or consumer) since deleted and made again are not deleted by their
// sequence: the new stream reuses sequences, for copies not settled.
func TestSweepForgetsAStreamMadeAgain(t *testing.T) {
	s := openTest(t, Config{Dir: t.TempDir(), Partitions: 1})
	defer s.Close()
	ctx := context.Background()
	d := Destination{Name: "app"}
	d.defaults()
	for i := range 3 {
		put(t, s, "app", fmt.Sprint("old-", i), []byte(`{}`))
	}
	old, err := s.js.CreateOrUpdateConsumer(ctx, firstPart(s).name, consumerConfig(firstPart(s), d))
	if err != nil {
		t.Fatal(err)
	}
	subject := firstPart(s).filter("app")
	// Settled on the old stream, left unswept (NATS away); and a running
	// sweeper that noted one too.
	running := newSweeper(s, firstPart(s).stream, old, subject)
	running.settled[2] = time.Now().Add(-s.sweepGrace)
	s.keepUnswept(subject, old.CachedInfo().Created, map[uint64]time.Time{3: time.Now().Add(-s.sweepGrace)})

	// The stream is deleted and made again; its new copies take the same
	// sequences, none settled.
	if err := s.js.DeleteStream(ctx, firstPart(s).name); err != nil {
		t.Fatal(err)
	}
	time.Sleep(10 * time.Millisecond) // another creation time
	if _, err := s.js.CreateOrUpdateStream(ctx, partConfig(s.cfg, 0)); err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		put(t, s, "app", fmt.Sprint("new-", i), []byte(`{}`))
	}
	cons, err := s.js.CreateOrUpdateConsumer(ctx, firstPart(s).name, consumerConfig(firstPart(s), d))
	if err != nil {
		t.Fatal(err)
	}
	running.sweep(ctx, true, true)
	next := newSweeper(s, firstPart(s).stream, cons, subject)
	next.sweep(ctx, true, true)
	for seq := uint64(2); seq <= 3; seq++ {
		if _, err := firstPart(s).stream.GetMsg(ctx, seq); err != nil {
			t.Errorf("the new stream's copy at sequence %d was deleted: %v", seq, err)
		}
	}
}

// sweepSetup is a store with two copies for destination app: sequence 1
// waits for its retry (the ack floor stays below it), sequence 2 is the
// one settled; and app's consumer.
func sweepSetup(t *testing.T) (*Store, jetstream.Consumer, string) {
	t.Helper()
	s := openTest(t, Config{Dir: t.TempDir(), Partitions: 1})
	t.Cleanup(s.Close)
	put(t, s, "app", "waits-for-a-retry", []byte(`{}`))
	put(t, s, "app", "settled", []byte(`{}`))
	d := Destination{Name: "app"}
	d.defaults()
	cons, err := s.js.CreateOrUpdateConsumer(context.Background(), firstPart(s).name, consumerConfig(firstPart(s), d))
	if err != nil {
		t.Fatal(err)
	}
	return s, cons, firstPart(s).filter("app")
}
