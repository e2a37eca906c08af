// Order per object (a destination's order object): a copy is attempted
// only once every earlier copy of its object for the destination is
// delivered or a dead letter. An object's copies share one subject of one
// partition (partition.go), so the hold is one question to the stream:
// is the first copy still stored on this subject an earlier one? A
// settled copy of an ordered destination leaves the stream before it is
// acknowledged (settle), so the answer holds across gateways, restarts
// and a SIGKILL at any moment. A held copy goes back unattempted and
// uncharged, and is looked at again after holdDelay.

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
)

// A held copy waits in the workers' memory (the waiting room), looked at
// again every holdPoll, and at once when this process settles a copy of
// an ordered destination, its ack deadline kept alive every holdProgress.
// The room is bounded by copies and bytes; a copy held past those goes
// back to the stream, to be handed out again after holdDelay: holdFirst,
// doubling with each delivery up to holdMax.
const (
	holdPoll       = 200 * time.Millisecond
	holdProgress   = 2 * time.Second
	holdRoomCopies = 256
	holdRoomBytes  = 32 << 20
	holdFirst      = 250 * time.Millisecond
	holdMax        = 5 * time.Second
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
	bySubject map[string][]held // in stream order
	copies    int
	bytes     int
	poke      chan struct{}
}

func newWaitingRoom() *waitingRoom {
	return &waitingRoom{bySubject: map[string][]held{}, poke: make(chan struct{}, 1)}
}

// add keeps msg, unless the room is full.
func (r *waitingRoom) add(w *workerRun, msg jetstream.Msg, seq uint64) bool {
	size := len(msg.Data()) + 512
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.copies >= holdRoomCopies || r.bytes+size > holdRoomBytes {
		return false
	}
	subject := msg.Subject()
	list := append(r.bySubject[subject], held{w: w, msg: msg, seq: seq, size: size, progress: time.Now()})
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

// subjects lists the subjects with copies held, and pushes back the ack
// deadline of those due.
func (r *waitingRoom) subjects(now time.Time) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]string, 0, len(r.bySubject))
	for subject, list := range r.bySubject {
		out = append(out, subject)
		for i := range list {
			if now.Sub(list[i].progress) >= holdProgress {
				_ = list[i].msg.InProgress()
				list[i].progress = now
			}
		}
	}
	return out
}

// wake has the room look at its copies now.
func (r *waitingRoom) wake() {
	select {
	case r.poke <- struct{}{}:
	default:
	}
}

// hold keeps msg back, unattempted and not charged, when the destination
// orders by object and an earlier copy of msg's object is still stored;
// it reports whether it did. The copy waits in the room (or, the room
// full, in the stream). A stream that cannot answer holds the copy too:
// order before progress.
func (w *workerRun) hold(msg jetstream.Msg) bool {
	if !w.d.OrderObject || w.p.legacy || !isObjectSubject(msg.Subject()) {
		return false
	}
	meta, err := msg.Metadata()
	if err != nil {
		return false
	}
	first, err := w.firstOf(msg.Subject())
	if err == nil && first >= meta.Sequence.Stream {
		return false // the first of its object still stored
	}
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return false // itself deleted meanwhile: the attempt finds out
	}
	w.mu.Lock()
	stopped := w.stopped
	w.mu.Unlock()
	if stopped || !w.room.add(w, msg, meta.Sequence.Stream) {
		w.s.handBackAfter(msg, holdDelay(meta.NumDelivered))
	}
	return true
}

// firstOf is the sequence of the first copy stored on subject, in w's
// stream.
func (w *workerRun) firstOf(subject string) (uint64, error) {
	ctx, cancel := context.WithTimeout(w.ctx, 5*time.Second)
	defer cancel()
	m, err := w.p.stream.GetMsg(ctx, 1, jetstream.WithGetMsgSubject(subject))
	if err != nil {
		return 0, err
	}
	return m.Sequence, nil
}

// runRoom looks at the held copies every holdPoll (and when woken) until
// ctx ends: those that are now the first of their object go to the
// workers. Then every copy still held goes back to the stream.
func (g *destWorkers) runRoom(ctx context.Context) {
	t := time.NewTicker(holdPoll)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			for _, subject := range g.room.subjects(time.Now()) {
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
		for _, subject := range g.room.subjects(time.Now()) {
			w := g.room.workersOf(subject)
			if w == nil {
				continue
			}
			first, err := w.firstOf(subject)
			if errors.Is(err, jetstream.ErrMsgNotFound) {
				first = math.MaxUint64 // none stored: all were settled meanwhile
			} else if err != nil {
				continue
			}
			for _, h := range g.room.take(subject, first) {
				go h.w.handle(h.msg) // attempted if still first; held again if not
			}
		}
	}
}

// workersOf is the workers of the stream whose copies of subject are held.
func (r *waitingRoom) workersOf(subject string) *workerRun {
	r.mu.Lock()
	defer r.mu.Unlock()
	if list := r.bySubject[subject]; len(list) > 0 {
		return list[0].w
	}
	return nil
}
