// Counted attempts travel with the copy: each attempt charged to a copy
// (a failure that is the copy's: not a 429, not a failed probe of a
// tripped destination, not a delivery handed back unattempted or lost on
// its way to a worker that stopped pulling) is written to the key-value
// bucket <stream>_ATTEMPTS, keyed by the copy (its stream, sequence and the
// time it was stored: a stream made again reuses sequences). The attempt
// number a backend sees, max_attempts and the retry schedule go by that
// count: the same on every gateway sharing the stream, and across
// restarts. A copy's first delivery reads nothing (it has no count yet);
// its key goes when it is delivered or buried. If the bucket cannot be
// read, the process's hand-back ledger gives the number instead (a WARN
// says so): delivery never waits on the bucket.

package queue

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
)

// attemptsTTL bounds how long a copy's count is kept (a copy held longer,
// by a long pause, counts from 1 again).
const attemptsTTL = 90 * 24 * time.Hour

// attemptsBucket is the name of the stream's bucket of counted attempts.
func (s *Store) attemptsBucket() string { return s.cfg.Stream + "_ATTEMPTS" }

// attemptsKV opens the bucket of counted attempts, making it if missing.
func (s *Store) attemptsKV(ctx context.Context) (jetstream.KeyValue, error) {
	s.attemptsMu.Lock()
	defer s.attemptsMu.Unlock()
	if s.attempts != nil {
		return s.attempts, nil
	}
	kv, err := s.js.KeyValue(ctx, s.attemptsBucket())
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		kv, err = s.js.CreateKeyValue(ctx, jetstream.KeyValueConfig{
			Bucket:      s.attemptsBucket(),
			Description: "caddy-mux-webhook: attempts charged to each queued copy",
			History:     1,
			TTL:         attemptsTTL,
			// No MaxBytes: a bound is reserved against the embedded
			// server's storage, which it sizes from the disk's free space
			// when it starts (small after a full disk): the bucket could
			// not be made. Its keys go when their copy settles, or after
			// the TTL.
			Storage:  jetstream.FileStorage,
			Replicas: s.cfg.Replicas,
		})
		if errors.Is(err, jetstream.ErrBucketExists) {
			kv, err = s.js.KeyValue(ctx, s.attemptsBucket())
		}
	}
	if err != nil {
		return nil, err
	}
	s.attempts = kv
	return kv, nil
}

// attemptsKey names a copy in the bucket: its stream (a partition's
// sequences start at 1 like the others'), its sequence and when it was
// stored. A copy of the single stream of earlier versions keeps the key
// they gave it.
func (s *Store) attemptsKey(meta *jetstream.MsgMetadata) string {
	if meta.Stream == s.cfg.Stream {
		return fmt.Sprintf("c%d_%d", meta.Sequence.Stream, meta.Timestamp.UnixNano())
	}
	return fmt.Sprintf("%s.c%d_%d", meta.Stream, meta.Sequence.Stream, meta.Timestamp.UnixNano())
}

// counted is how many attempts were charged to the copy.
func (s *Store) counted(ctx context.Context, meta *jetstream.MsgMetadata) (int, error) {
	kv, err := s.attemptsKV(ctx)
	if err != nil {
		return 0, err
	}
	e, err := kv.Get(ctx, s.attemptsKey(meta))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return 0, nil
	}
	if err != nil {
		s.forgetAttemptsKV(err)
		return 0, err
	}
	n, err := strconv.Atoi(string(e.Value()))
	if err != nil || n < 0 {
		return 0, fmt.Errorf("queue: the attempts of a copy are %q", e.Value())
	}
	return n, nil
}

// charge records that n attempts were charged to the copy.
func (s *Store) charge(ctx context.Context, meta *jetstream.MsgMetadata, n int) error {
	kv, err := s.attemptsKV(ctx)
	if err != nil {
		return err
	}
	if _, err := kv.Put(ctx, s.attemptsKey(meta), []byte(strconv.Itoa(n))); err != nil {
		s.forgetAttemptsKV(err)
		return err
	}
	return nil
}

// uncharge drops the copy's count: it was delivered or buried.
func (s *Store) uncharge(ctx context.Context, meta *jetstream.MsgMetadata) {
	kv, err := s.attemptsKV(ctx)
	if err != nil {
		return
	}
	if err := kv.Purge(ctx, s.attemptsKey(meta)); err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
		s.forgetAttemptsKV(err)
	}
}

// forgetAttemptsKV drops the opened bucket after an error that says it is
// gone (deleted by hand, its stream made again): the next use opens it
// again, making it if need be.
func (s *Store) forgetAttemptsKV(err error) {
	if errors.Is(err, jetstream.ErrBucketNotFound) || errors.Is(err, jetstream.ErrStreamNotFound) || errors.Is(err, jetstream.ErrNoStreamResponse) {
		s.attemptsMu.Lock()
		s.attempts = nil
		s.attemptsMu.Unlock()
	}
}

// chargeOrWarn is charge; a failure is logged (at most once a minute):
// the copy's count stays behind, so max_attempts and the schedule see
// fewer attempts than were made.
func (s *Store) chargeOrWarn(ctx context.Context, meta *jetstream.MsgMetadata, n int) {
	if err := s.charge(ctx, meta, n); err != nil {
		s.warnAttempts("write", err)
	}
}

// warnAttempts logs, at most once a minute, that the bucket of counted
// attempts could not be read or written.
func (s *Store) warnAttempts(what string, err error) {
	s.attemptsMu.Lock()
	due := time.Since(s.attemptsWarned) > time.Minute
	if due {
		s.attemptsWarned = time.Now()
	}
	s.attemptsMu.Unlock()
	if due && s.log != nil {
		s.log.Warn("mux_webhook queue: could not "+what+" a copy's counted attempts in "+s.attemptsBucket()+
			"; reading: the attempt number is this process's guess; writing: the copy's count stays behind",
			zap.Error(err))
	}
}
