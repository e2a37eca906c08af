// Sweeping: the copies a destination's workers settled (delivered, or
// kept as dead letters) leave the stream in bulk, below the consumer's ack
// floor, and what stopped workers could not sweep is left to the next.

package queue

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// Settled copies (delivered, or kept as dead letters) leave the stream,
// which must not fill up with them; in bulk, not one by one: each removal
// is a write and an fsync of the store, which new events wait behind (one
// by one, they halved what the queue sustains). Every sweepInterval, one
// purge removes the destination's copies below the consumer's ack floor
// (all settled, by whichever instance); a copy settled above it (an
// earlier one waits for a retry) is deleted on its own once it has waited
// sweepGrace for the floor.
const (
	sweepInterval = 250 * time.Millisecond
	// sweepTimeout bounds a sweep's requests, the last one's included.
	sweepTimeout = 5 * time.Second
)

// defaultSweepGrace is Store.sweepGrace unless a test sets another.
const defaultSweepGrace = 5 * time.Second

// sweeper removes a destination's settled copies from the stream.
type sweeper struct {
	s       *Store
	stream  jetstream.Stream // the stream of the queue it sweeps
	cons    jetstream.Consumer
	subject string
	purged  uint64 // the ack floor of the last purge: copies up to it are gone
	// created is when the consumer was made, as the latest sweep found
	// it: another time means the consumer, or its stream, was deleted and
	// made again, and a stream made again reuses sequences: the copies
	// noted are no longer the ones settled.
	created time.Time

	mu      sync.Mutex
	settled map[uint64]time.Time // stream sequence: when it was settled
}

// newSweeper is the sweeper of the subject's workers on cons, a consumer
// of stream, with what earlier workers left to sweep.
func newSweeper(s *Store, stream jetstream.Stream, cons jetstream.Consumer, subject string) *sweeper {
	w := &sweeper{s: s, stream: stream, cons: cons, subject: subject, settled: map[uint64]time.Time{}}
	if info := cons.CachedInfo(); info != nil {
		w.created = info.Created
	}
	w.adopt()
	return w
}

// unswept are settled copies that stopped workers could not delete, on
// the consumer made at created.
type unswept struct {
	created time.Time
	settled map[uint64]time.Time
}

// keepUnswept leaves settled copies that stopped workers could not delete
// (on the consumer made at created) for the subject's other workers.
func (s *Store) keepUnswept(subject string, created time.Time, settled map[uint64]time.Time) {
	if len(settled) == 0 {
		return
	}
	s.unsweptMu.Lock()
	defer s.unsweptMu.Unlock()
	if s.unswept == nil {
		s.unswept = map[string]unswept{}
	}
	u, ok := s.unswept[subject]
	if !ok || !u.created.Equal(created) {
		u = unswept{created: created, settled: map[uint64]time.Time{}}
		s.unswept[subject] = u
	}
	for seq, at := range settled {
		u.settled[seq] = at
	}
}

// takeUnswept returns what earlier workers of the subject left to sweep,
// if it was on the consumer made at created.
func (s *Store) takeUnswept(subject string, created time.Time) map[uint64]time.Time {
	s.unsweptMu.Lock()
	defer s.unsweptMu.Unlock()
	u, ok := s.unswept[subject]
	if !ok {
		return nil
	}
	delete(s.unswept, subject)
	if !u.created.Equal(created) {
		return nil
	}
	return u.settled
}

// adopt takes over what stopped workers left to sweep: also those that
// stopped after this sweeper started (a reload starts the new workers
// before it stops the old ones).
func (w *sweeper) adopt() {
	m := w.s.takeUnswept(w.subject, w.created)
	if len(m) == 0 {
		return
	}
	w.mu.Lock()
	for seq, at := range m {
		w.settled[seq] = at
	}
	w.mu.Unlock()
}

// setConsumer makes the sweeper read the ack floor of cons, the
// workers' consumer made again.
func (w *sweeper) setConsumer(cons jetstream.Consumer) {
	w.mu.Lock()
	w.cons = cons
	w.mu.Unlock()
}

// consumer is the workers' current consumer.
func (w *sweeper) consumer() jetstream.Consumer {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.cons
}

// remove deletes msg's copy from the stream now, before it is
// acknowledged (an ordered destination's: the next copy of its object
// goes once it is gone). It reports whether the copy is gone; if not,
// it is acknowledged and swept as any other. A copy of a consumer since
// deleted, or whose sequence now holds another message (the stream was
// made again: sequences are reused), is not touched.
func (w *sweeper) remove(ctx context.Context, msg jetstream.Msg, meta *jetstream.MsgMetadata) bool {
	if g, ok := msg.(*genMsg); ok && g.stale() {
		return false
	}
	seq := meta.Sequence.Stream
	var m *jetstream.RawStreamMsg
	var err error
	for try := 0; ; try++ {
		m, err = w.stream.GetMsg(ctx, seq)
		if !errors.Is(err, jetstream.ErrMsgNotFound) {
			break
		}
		// Not found: gone already, once the stream (its leader, on a
		// cluster) has stored it; the consumer's node may have handed it
		// out first.
		info, ierr := w.stream.Info(ctx)
		if ierr == nil && info.State.LastSeq >= seq {
			return true
		}
		if try == 20 {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil || !m.Time.Equal(meta.Timestamp) {
		return false
	}
	for range 3 {
		err = w.stream.DeleteMsg(ctx, seq)
		if err == nil || errors.Is(err, jetstream.ErrMsgNotFound) {
			return true
		}
		if answered(err) {
			return false
		}
	}
	return false
}

// settle records that the copy at stream sequence seq was settled.
func (w *sweeper) settle(seq uint64) {
	w.mu.Lock()
	w.settled[seq] = time.Now()
	w.mu.Unlock()
}

// run sweeps until ctx ends, then once more, for the last settled copies;
// what that one could not delete (NATS away) is left with the Store for
// the destination's next workers. The first sweep that reaches NATS also
// removes what an earlier process settled but did not sweep before it
// stopped.
func (w *sweeper) run(ctx context.Context) {
	t := time.NewTicker(sweepInterval)
	defer t.Stop()
	first := true
	for {
		select {
		case <-ctx.Done():
			last, cancel := context.WithTimeout(context.WithoutCancel(ctx), sweepTimeout)
			w.sweep(last, true, true)
			cancel()
			w.mu.Lock()
			w.s.keepUnswept(w.subject, w.created, w.settled)
			w.mu.Unlock()
			return
		case <-t.C:
			w.adopt()
			sctx, cancel := context.WithTimeout(ctx, sweepTimeout)
			if w.sweep(sctx, first, false) {
				first = false
			}
			cancel()
		}
	}
}

// sweep purges the settled copies below the ack floor and deletes those
// above it that waited sweepGrace (all of them when last is set). It
// reports whether it reached NATS.
func (w *sweeper) sweep(ctx context.Context, always, last bool) bool {
	w.mu.Lock()
	n := len(w.settled)
	w.mu.Unlock()
	if n == 0 && !always {
		return false
	}
	if !w.s.conn.IsConnected() {
		// NATS is away (an external server down, a password changed):
		// a request would wait out ctx for nothing, and the last sweep
		// hold up a reload. What is settled stays noted for a later
		// sweep (or the next workers', see run).
		return false
	}
	info, err := w.consumer().Info(ctx)
	if err != nil {
		// JetStream answered (no such consumer, no leader yet): NATS was
		// reached, and the first sweep's work waits for the next one
		// with copies settled.
		return answered(err)
	}
	if !info.Created.Equal(w.created) {
		// The consumer (or its stream) was made again: what was noted
		// and purged is of the one before.
		w.mu.Lock()
		clear(w.settled)
		w.mu.Unlock()
		w.purged, w.created = 0, info.Created
	}
	if floor := info.AckFloor.Stream; floor > w.purged {
		if w.stream.Purge(ctx, jetstream.WithPurgeSubject(w.subject), jetstream.WithPurgeSequence(floor+1)) == nil {
			w.purged = floor
		}
	}
	now := time.Now()
	var late []uint64
	w.mu.Lock()
	for seq, at := range w.settled {
		if seq <= w.purged {
			delete(w.settled, seq)
		} else if last || now.Sub(at) >= w.s.sweepGrace {
			late = append(late, seq)
			delete(w.settled, seq)
		}
	}
	w.mu.Unlock()
	for _, seq := range late {
		// An answer (not found: another instance's purge was first; not
		// allowed) settles it; no answer (NATS went away): noted again,
		// for a later sweep.
		if err := w.stream.DeleteMsg(ctx, seq); err != nil && !answered(err) {
			w.settle(seq)
		}
	}
	return true
}

// answered reports whether err is JetStream's answer to a request, rather
// than no answer (a timeout, a lost connection).
func answered(err error) bool {
	var api jetstream.JetStreamError
	return errors.As(err, &api)
}
