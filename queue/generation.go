// Generations of a destination's consumer: acknowledgements name the
// consumer and a stream sequence only, so an attempt that began on a
// consumer since deleted (and made again, perhaps on a stream made again
// that reuses sequences) must not settle what the new consumer holds at
// that sequence: another event, which would then never be retried and be
// swept from the stream. Such an attempt's copy is left to the new
// consumer (delivered again at worst: Idempotency-Key tells).

package queue

import (
	"context"
	"errors"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// errStaleConsumer is what settling a copy delivered by a consumer since
// deleted returns: nothing was sent.
var errStaleConsumer = errors.New("queue: the copy's consumer was deleted since; left to the consumer made again")

// genMsg is a copy delivered by the workers' consumer of generation gen:
// it settles nothing once w's consumer is of another.
type genMsg struct {
	jetstream.Msg
	w   *workerRun
	gen uint64
}

func (m *genMsg) stale() bool { return m.w.gen.Load() != m.gen }

func (m *genMsg) Ack() error {
	if m.stale() {
		return errStaleConsumer
	}
	return m.Msg.Ack()
}

func (m *genMsg) DoubleAck(ctx context.Context) error {
	if m.stale() {
		return errStaleConsumer
	}
	return m.Msg.DoubleAck(ctx)
}

func (m *genMsg) Nak() error {
	if m.stale() {
		return errStaleConsumer
	}
	return m.Msg.Nak()
}

func (m *genMsg) NakWithDelay(delay time.Duration) error {
	if m.stale() {
		return errStaleConsumer
	}
	return m.Msg.NakWithDelay(delay)
}

func (m *genMsg) InProgress() error {
	if m.stale() {
		return errStaleConsumer
	}
	return m.Msg.InProgress()
}

func (m *genMsg) Term() error {
	if m.stale() {
		return errStaleConsumer
	}
	return m.Msg.Term()
}

func (m *genMsg) TermWithReason(reason string) error {
	if m.stale() {
		return errStaleConsumer
	}
	return m.Msg.TermWithReason(reason)
}
