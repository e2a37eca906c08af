package queue

import (
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// handBacks counts, per copy (its stream sequence), the deliveries that
// were handed back without an attempt: copies fetched by workers that then
// stopped (a reload that changed the destination, a shutdown). JetStream
// counts every delivery, and its count is the attempt number a backend
// sees and what max_attempts and the retry schedule go by; without this
// ledger each reload would use up an attempt of every copy it caught
// fetched. It lives with the Store, so it outlasts the workers of one
// config: the next workers of this process subtract it. A copy that
// another process takes next, or one handed back by a process that then
// exits, still counts one attempt more (at most `concurrency` copies per
// destination and stop).
type handBacks struct {
	mu sync.Mutex
	m  map[uint64]handBack
}

type handBack struct {
	n    uint64    // deliveries handed back without an attempt
	last time.Time // when the latest was
}

// handBackTTL: an entry older than this is dropped (its copy was settled
// by another process, or purged); the ledger stays bounded by the copies
// handed back within it.
const handBackTTL = 48 * time.Hour

// handBack returns msg to the queue at once, not attempted, and notes
// that this delivery was not an attempt.
func (s *Store) handBack(msg jetstream.Msg) {
	if meta, err := msg.Metadata(); err == nil {
		s.handBacks.add(meta.Sequence.Stream, time.Now())
	}
	_ = msg.Nak()
}

func (h *handBacks) add(seq uint64, now time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.m == nil {
		h.m = map[uint64]handBack{}
	}
	for k, v := range h.m {
		if now.Sub(v.last) > handBackTTL {
			delete(h.m, k)
		}
	}
	e := h.m[seq]
	h.m[seq] = handBack{n: e.n + 1, last: now}
}

// attemptNumber is the attempt that delivery `delivered` (JetStream's
// count, from 1) of the copy at seq is: the deliveries handed back without
// an attempt do not count.
func (h *handBacks) attemptNumber(seq, delivered uint64) int {
	if delivered <= 1 {
		return int(delivered) // a first delivery: nothing was handed back
	}
	h.mu.Lock()
	n := h.m[seq].n
	h.mu.Unlock()
	if n >= delivered {
		return 1
	}
	return int(delivered - n)
}

// settled forgets the copy at seq: delivered or kept as a dead letter.
func (h *handBacks) settled(seq uint64) {
	h.mu.Lock()
	delete(h.m, seq)
	h.mu.Unlock()
}
