// Order per object (a destination's order object): a copy is attempted
// only once every earlier copy of its object for the destination is
// delivered or a dead letter. An object's copies share one subject of one
// partition (partition.go), so the hold is one question to the stream:
// is this copy the first one still stored on its subject? A settled copy
// of an ordered destination leaves the stream before it is acknowledged
// (sweeper.remove), so the answer holds across gateways and restarts; a
// settled copy left behind (its delete failed, then the process died)
// is known by the consumer's ack floor once it is below it. A held copy
// is not attempted and not charged: it waits in the workers' memory (the
// waiting room) or, past its bounds, in the stream.

package queue

import (
	"cmp"
	"context"
	"errors"
	"math"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
)

// A held copy waits in the waiting room, looked at again at once when
// this process settles the copy of its object before it, and by a scan of
// every held object (for copies settled by other gateways) every
// holdPoll, or holdScan once more than holdScanMany objects are held (a
// scan asks the stream once per object). Its ack deadline is pushed back
// every holdProgress. The room keeps at most holdRoomPerObject copies of
// one object (a failing object does not take the room from the others),
// holdRoomCopies and holdRoomBytes in all; a copy past those goes back to
// the stream, to be handed out again after holdDelay: holdFirst, doubling
// with each delivery up to holdMax.
const (
	holdPoll          = 200 * time.Millisecond
	holdScan          = time.Second
	holdScanMany      = 64
	holdProgress      = time.Second
	holdRoomPerObject = 8
	holdRoomCopies    = 4096
	holdRoomBytes     = 32 << 20
	holdFirst         = 250 * time.Millisecond
	holdMax           = 5 * time.Second
	// holdAsk bounds one question to the stream about a held subject.
	holdAsk = 2 * time.Second
)

// holdDelay is how long a copy held for the delivered-th time waits.
func holdDelay(delivered uint64) time.Duration {
	return min(holdFirst<<min(max(delivered, 1)-1, 5), holdMax)
}

// isObjectSubject reports whether subject holds an object's copies (its
// last token is an object's key), which order object holds in sequence.
func isObjectSubject(subject string) bool {
	return ordered(subject[strings.LastIndexByte(subject, '.')+1:])
}

// held is one copy in the waiting room.
type held struct {
	w        *workerRun // its stream's workers
	msg      jetstream.Msg
	seq      uint64
	size     int
	progress time.Time // when its ack deadline was last pushed back
}

// waitingRoom is a destination's held copies, by subject (a stream's).
type waitingRoom struct {
	mu        sync.Mutex
	bySubject map[string][]held // in stream order, one per sequence
	copies    int
	bytes     int
	poke      chan struct{}
	settled   map[string]bool // subjects whose copy before the held ones was settled here
	scanned   time.Time       // when every subject was last looked at
}

func newWaitingRoom() *waitingRoom {
	return &waitingRoom{bySubject: map[string][]held{}, poke: make(chan struct{}, 1)}
}

// add keeps msg, unless the room is full (for its object, or in all). A
// copy already held (delivered again: its deadline passed) is replaced
// by the newer delivery, which is the one the server now waits for.
func (r *waitingRoom) add(w *workerRun, msg jetstream.Msg, seq uint64) bool {
	size := len(msg.Data()) + len(msg.Subject()) + 512
	subject := msg.Subject()
	r.mu.Lock()
	defer r.mu.Unlock()
	list := r.bySubject[subject]
	if i := slices.IndexFunc(list, func(h held) bool { return h.seq == seq }); i >= 0 {
		r.bytes += size - list[i].size
		list[i] = held{w: w, msg: msg, seq: seq, size: size, progress: time.Now()}
		return true
	}
	if len(list) >= holdRoomPerObject || r.copies >= holdRoomCopies || r.bytes+size > holdRoomBytes {
		return false
	}
	list = append(list, held{w: w, msg: msg, seq: seq, size: size, progress: time.Now()})
	slices.SortFunc(list, func(a, b held) int { return cmp.Compare(a.seq, b.seq) })
	r.bySubject[subject] = list
	r.copies++
	r.bytes += size
	return true
}

// take removes and returns the room's copies of subject up to seq (all
// when seq is 0).
func (r *waitingRoom) take(subject string, upTo uint64) []held {
	r.mu.Lock()
	defer r.mu.Unlock()
	list := r.bySubject[subject]
	n := 0
	for n < len(list) && (upTo == 0 || list[n].seq <= upTo) {
		r.copies--
		r.bytes -= list[n].size
		n++
	}
	out := list[:n:n]
	if n == len(list) {
		delete(r.bySubject, subject)
	} else {
		r.bySubject[subject] = slices.Clone(list[n:])
	}
	return out
}

// subjects lists the subjects with copies held, with the workers of
// their stream.
func (r *waitingRoom) subjects() map[string]*workerRun {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make(map[string]*workerRun, len(r.bySubject))
	for subject, list := range r.bySubject {
		out[subject] = list[0].w
	}
	return out
}

// renew pushes back the ack deadline of the copies due: on a ticker of
// its own, so that slow questions to the stream never let one pass.
func (r *waitingRoom) renew(now time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, list := range r.bySubject {
		for i := range list {
			if now.Sub(list[i].progress) >= holdProgress {
				_ = list[i].msg.InProgress()
				list[i].progress = now
			}
		}
	}
}

// settle has the room look now at the copies of subject, whose copy
// this process just settled.
func (r *waitingRoom) settle(subject string) {
	r.mu.Lock()
	if _, ok := r.bySubject[subject]; !ok {
		r.mu.Unlock()
		return
	}
	if r.settled == nil {
		r.settled = map[string]bool{}
	}
	r.settled[subject] = true
	r.mu.Unlock()
	select {
	case r.poke <- struct{}{}:
	default:
	}
}

// due returns the subjects to look at now: those settle named, or all of
// them when a scan is due.
func (r *waitingRoom) due(now time.Time) map[string]*workerRun {
	r.mu.Lock()
	defer r.mu.Unlock()
	every := holdPoll
	if len(r.bySubject) > holdScanMany {
		every = holdScan
	}
	out := map[string]*workerRun{}
	if now.Sub(r.scanned) >= every {
		r.scanned = now
		for subject, list := range r.bySubject {
			out[subject] = list[0].w
		}
	} else {
		for subject := range r.settled {
			if list := r.bySubject[subject]; len(list) > 0 {
				out[subject] = list[0].w
			}
		}
	}
	clear(r.settled)
	return out
}

// hold keeps msg back, unattempted and not charged, when the destination
// orders by object and msg is not the first copy of its object still
// stored; it reports whether it did. An earlier copy waits for its turn:
// msg waits in the room (or, the room full, in the stream). A copy no
// longer stored was settled meanwhile (this delivery is a stale one: its
// deadline passed while it waited): it is acknowledged, never attempted.
// A stream that cannot answer holds the copy too: order before progress.
func (w *workerRun) hold(msg jetstream.Msg) bool {
	if !w.d.OrderObject || w.p.legacy || !isObjectSubject(msg.Subject()) {
		return false
	}
	meta, err := msg.Metadata()
	if err != nil {
		return false
	}
	seq := meta.Sequence.Stream
	first, err := w.firstOf(msg.Subject(), seq)
	switch {
	case err == nil && first == seq:
		return false // the first of its object still stored: its turn
	case err == nil && first > seq, errors.Is(err, jetstream.ErrMsgNotFound) && w.applied(seq):
		// Settled by another delivery of it: nothing to do. (Not found
		// alone does not say so: on a cluster, the consumer's node may
		// hand out a copy before the stream's leader, which answers,
		// has stored it; the leader's last sequence tells.)
		_ = msg.Ack()
		w.s.handBacks.settled(refOf(meta))
		w.s.log.Info("mux_webhook queue: a delivery of an ordered copy already settled was acknowledged, not attempted",
			zap.String("destination", w.d.Name), zap.String("stream", w.p.name), zap.Uint64("seq", seq),
			zap.Uint64("first", first), zap.String("id", msg.Headers().Get(HeaderEventID)), zap.Error(err))
		return true
	}
	if w.pace != nil {
		w.pace.refund() // the token was for an attempt
	}
	w.mu.Lock()
	stopped := w.stopped
	w.mu.Unlock()
	if stopped || !w.room.add(w, msg, seq) {
		w.s.handBackAfter(msg, holdDelay(meta.NumDelivered))
	}
	return true
}

// applied reports whether w's stream (its leader, on a cluster) has
// stored its message seq, whether or not it is still there; false when
// that cannot be read.
func (w *workerRun) applied(seq uint64) bool {
	ctx, cancel := context.WithTimeout(w.ctx, holdAsk)
	defer cancel()
	info, err := w.p.stream.Info(ctx)
	return err == nil && info.State.LastSeq >= seq
}

// firstOf is the sequence of the first copy stored on subject, in w's
// stream, up to seq. A first copy at or below the consumer's ack floor
// is settled (its delete failed, and the process that settled it died
// before its sweep): it is deleted now, and the next one looked at.
func (w *workerRun) firstOf(subject string, seq uint64) (uint64, error) {
	ctx, cancel := context.WithTimeout(w.ctx, holdAsk)
	defer cancel()
	var floor uint64
	floorRead := false
	from := uint64(1)
	for {
		m, err := w.p.stream.GetMsg(ctx, from, jetstream.WithGetMsgSubject(subject))
		if err != nil {
			return 0, err
		}
		if m.Sequence >= seq {
			return m.Sequence, nil
		}
		if !floorRead {
			info, err := w.sw.consumer().Info(ctx)
			if err != nil {
				return m.Sequence, nil // not known: it waits
			}
			floor, floorRead = info.AckFloor.Stream, true
		}
		if m.Sequence > floor {
			return m.Sequence, nil // an earlier copy not settled
		}
		_ = w.p.stream.DeleteMsg(ctx, m.Sequence) // settled, left behind
		w.s.log.Info("mux_webhook queue: an ordered copy left behind below the ack floor was deleted",
			zap.String("destination", w.d.Name), zap.String("stream", w.p.name), zap.Uint64("seq", m.Sequence),
			zap.Uint64("ack_floor", floor), zap.String("id", m.Header.Get(HeaderEventID)))
		from = m.Sequence + 1
	}
}

// runRoom looks at the held copies every holdPoll (and when woken) until
// ctx ends: those that are now the first of their object go to the
// workers. Then every copy still held goes back to the stream.
func (g *destWorkers) runRoom(ctx context.Context) {
	t := time.NewTicker(holdPoll)
	defer t.Stop()
	renewed := make(chan struct{})
	go func() {
		defer close(renewed)
		rt := time.NewTicker(holdProgress / 2)
		defer rt.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case now := <-rt.C:
				g.room.renew(now)
			}
		}
	}()
	defer func() { <-renewed }()
	for {
		select {
		case <-ctx.Done():
			for subject := range g.room.subjects() {
				for _, h := range g.room.take(subject, 0) {
					// With a delay, not a plain Nak: a delay is kept in the
					// consumer's stored state, so a copy handed back by a
					// process that then exits comes again soon; a plain
					// Nak's only in the server's memory, lost if it
					// restarts (then the copy waits for its ack deadline).
					g.s.handBackAfter(h.msg, holdFirst)
				}
			}
			return
		case <-t.C:
		case <-g.room.poke:
		}
		for subject, w := range g.room.due(time.Now()) {
			if ctx.Err() != nil {
				break
			}
			first, err := w.firstOf(subject, math.MaxUint64)
			if errors.Is(err, jetstream.ErrMsgNotFound) {
				first = math.MaxUint64 // none stored: all were settled meanwhile
			} else if err != nil {
				continue
			}
			for _, h := range g.room.take(subject, first) {
				go h.w.release(ctx, h.msg) // attempted if still first; held again if not
			}
		}
	}
}

// release hands a copy the room let go to the workers, after a token of
// the destination's pace.
func (w *workerRun) release(ctx context.Context, msg jetstream.Msg) {
	if w.pace != nil && !w.pace.take(ctx) {
		w.s.handBackAfter(msg, holdFirst)
		return
	}
	w.handle(msg)
}
