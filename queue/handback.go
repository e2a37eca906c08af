package queue

import (
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// copyRef names a stored copy in this process's ledgers: its stream (a
// partition's sequences start at 1 like the others') and sequence.
type copyRef struct {
	stream string
	seq    uint64
}

// refOf is the copy meta describes.
func refOf(meta *jetstream.MsgMetadata) copyRef {
	return copyRef{stream: meta.Stream, seq: meta.Sequence.Stream}
}

// HandBacks counts, per copy (its stream and sequence), the deliveries that
// were handed back without an attempt, or with one not charged to the
// copy: copies fetched by workers that then stopped (a reload that changed
// the destination, a shutdown), copies held while the destination is
// paused or tripped, and attempts answered 429. JetStream
// counts every delivery, and its count is the attempt number a backend
// sees and what max_attempts and the retry schedule go by; without this
// ledger each reload would use up an attempt of every copy it caught
// fetched. The glue keeps one per stream in the process, so it outlasts
// the workers of one config, and the Store of one connection (a reload
// that changes the credentials opens another): the next workers of this
// process subtract it. A copy that another process takes next, or one
// handed back by a process that then exits, still counts one attempt more
// (at most `concurrency` copies per destination and stop).
type HandBacks struct {
	mu     sync.Mutex
	m      map[copyRef]handBack
	pruned time.Time // when entries older than handBackTTL were last dropped
}

type handBack struct {
	n    uint64    // deliveries handed back without an attempt
	last time.Time // when the latest was, or the latest attempt
	// stored and delivered tell whether a later delivery's count still
	// includes those hand-backs: the copy's time in the stream (a stream
	// deleted and made again reuses sequences) and the highest count
	// handed back (a consumer deleted and made again counts from 1).
	stored    time.Time
	delivered uint64
}

// NewHandBacks is an empty ledger.
func NewHandBacks() *HandBacks { return &HandBacks{} }

// handBackTTL: an entry older than this is dropped (its copy was settled
// by another process, or purged); the ledger stays bounded by the copies
// handed back within it.
const handBackTTL = 48 * time.Hour

// handBack returns msg to the queue at once, not attempted, and notes
// that this delivery was not an attempt.
func (s *Store) handBack(msg jetstream.Msg) {
	s.handBackAfter(msg, 0)
}

// handBackAfter is handBack with a delay before the copy is handed out
// again (a held destination's copies, a 429).
func (s *Store) handBackAfter(msg jetstream.Msg, delay time.Duration) {
	if meta, err := msg.Metadata(); err == nil {
		s.handBacks.add(refOf(meta), meta.Timestamp, meta.NumDelivered, time.Now())
	}
	if delay > 0 {
		_ = msg.NakWithDelay(delay)
		return
	}
	_ = msg.Nak()
}

func (h *HandBacks) add(seq copyRef, stored time.Time, delivered uint64, now time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.m == nil {
		h.m = map[copyRef]handBack{}
	}
	if now.Sub(h.pruned) > time.Minute {
		h.pruned = now
		for k, v := range h.m {
			if now.Sub(v.last) > handBackTTL {
				delete(h.m, k)
			}
		}
	}
	e, ok := h.m[seq]
	if !ok || !e.current(stored, delivered) {
		e = handBack{}
	}
	h.m[seq] = handBack{n: e.n + 1, last: now, stored: stored, delivered: delivered}
}

// current reports whether delivery `delivered` of the copy stored at
// `stored` comes after e's hand-backs, on the same count: else the stream
// or the consumer was made again since (or a stale delivery, fetched
// before the latest hand-back, is attempted late), and e no longer
// applies.
func (e handBack) current(stored time.Time, delivered uint64) bool {
	return e.stored.Equal(stored) && delivered > e.delivered
}

// attemptNumber is the attempt that delivery `delivered` (JetStream's
// count, from 1) of the copy at seq, stored at `stored`, is: the
// deliveries handed back without an attempt do not count. An entry that
// no longer applies is dropped: the number is then JetStream's count,
// never lower than it should be.
func (h *HandBacks) attemptNumber(seq copyRef, stored time.Time, delivered uint64, now time.Time) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	e, ok := h.m[seq]
	if !ok {
		return int(delivered)
	}
	if !e.current(stored, delivered) {
		delete(h.m, seq)
		return int(delivered)
	}
	e.last = now // still being delivered: kept past handBackTTL
	h.m[seq] = e
	if e.n >= delivered { // cannot be: each hand-back had a count of its own, below this one
		return 1
	}
	return int(delivered - e.n)
}

// settled forgets the copy at seq: delivered or kept as a dead letter.
func (h *HandBacks) settled(seq copyRef) {
	h.mu.Lock()
	delete(h.m, seq)
	h.mu.Unlock()
}
