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
	"context"
	"errors"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// A held copy is looked at again after holdFirst, doubling with each
// delivery up to holdMax: an object whose earlier copy is delivered at
// once goes on within a fraction of a second; one waiting behind a retry
// costs one look every holdMax.
const (
	holdFirst = 250 * time.Millisecond
	holdMax   = 5 * time.Second
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

// hold hands msg back, unattempted and not charged, when the destination
// orders by object and an earlier copy of msg's object is still stored;
// it reports whether it did. A stream that cannot answer holds the copy
// too: order before progress.
func (w *workerRun) hold(msg jetstream.Msg) bool {
	if !w.d.OrderObject || w.p.legacy || !isObjectSubject(msg.Subject()) {
		return false
	}
	meta, err := msg.Metadata()
	if err != nil {
		return false
	}
	ctx, cancel := context.WithTimeout(w.ctx, 5*time.Second)
	first, err := w.p.stream.GetMsg(ctx, 1, jetstream.WithGetMsgSubject(msg.Subject()))
	cancel()
	if err == nil && first.Sequence >= meta.Sequence.Stream {
		return false // the first of its object still stored
	}
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return false // itself deleted meanwhile: the attempt finds out
	}
	w.s.handBackAfter(msg, holdDelay(meta.NumDelivered))
	return true
}
