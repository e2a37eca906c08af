// Pause and resume: an operator holds a destination's copies, on every
// gateway sharing the stream, until told otherwise. The state is kept in
// JetStream, in the key-value bucket <stream>_CONTROL (one key per paused
// destination), not in a process and not only as a consumer setting: it
// survives restarts, reloads and consumers made again. A destination's
// workers read it every second; while it is paused they pull nothing, and
// copies they had fetched go back unattempted. Its copies wait: no
// attempt is used, and none becomes a dead letter by max_age (burial
// follows a failed attempt only, so a copy past max_age gets one attempt
// once the destination is resumed).

package queue

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// Pause is a destination paused by an operator.
type Pause struct {
	Since time.Time `json:"since"`
	// By names who paused it: the instance whose admin API was asked.
	By string `json:"by,omitempty"`
}

// pauseCheckInterval is how often workers read their destination's pause.
const pauseCheckInterval = time.Second

// controlBucket is the name of the stream's key-value bucket of pauses.
func (s *Store) controlBucket() string { return s.cfg.Stream + "_CONTROL" }

// control opens the bucket of pauses, making it if it is missing (a first
// pause, or a bucket deleted by hand).
func (s *Store) control(ctx context.Context, create bool) (jetstream.KeyValue, error) {
	s.controlMu.Lock()
	defer s.controlMu.Unlock()
	if s.controlKV != nil {
		return s.controlKV, nil
	}
	kv, err := s.js.KeyValue(ctx, s.controlBucket())
	if errors.Is(err, jetstream.ErrBucketNotFound) && create {
		kv, err = s.js.CreateKeyValue(ctx, jetstream.KeyValueConfig{
			Bucket:      s.controlBucket(),
			Description: "caddy-mux-webhook: destinations paused by an operator",
			History:     1,
			Storage:     jetstream.FileStorage,
			Replicas:    s.cfg.Replicas,
		})
		if errors.Is(err, jetstream.ErrBucketExists) {
			kv, err = s.js.KeyValue(ctx, s.controlBucket())
		}
	}
	if err == nil {
		s.controlKV = kv // opened once: the workers read it every second
	}
	return kv, err
}

// forgetControl drops the opened bucket after an error that says it is
// gone (deleted by hand): the next use opens it again.
func (s *Store) forgetControl(err error) {
	if errors.Is(err, jetstream.ErrBucketNotFound) || errors.Is(err, jetstream.ErrStreamNotFound) || errors.Is(err, jetstream.ErrNoStreamResponse) {
		s.controlMu.Lock()
		s.controlKV = nil
		s.controlMu.Unlock()
	}
}

// SetPaused pauses destination (by names who asked) or resumes it. It is in
// effect on every gateway sharing the stream within a second or two.
func (s *Store) SetPaused(ctx context.Context, destination string, paused bool, by string) error {
	if !ValidDestination(destination) {
		return fmt.Errorf("queue: destination name %q: use letters, digits, _ and - only", destination)
	}
	kv, err := s.control(ctx, true)
	if err != nil {
		return fmt.Errorf("queue: the pauses' bucket %s: %v", s.controlBucket(), err)
	}
	key := "paused." + destination
	if !paused {
		if err := kv.Delete(ctx, key); err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
			return fmt.Errorf("queue: resuming %s: %v", destination, err)
		}
		// The resume's time: it resets the destination's breaker on
		// every gateway (resumedAt).
		b, _ := json.Marshal(Pause{Since: time.Now().UTC(), By: by})
		if _, err := kv.Put(ctx, "resumed."+destination, b); err != nil {
			return fmt.Errorf("queue: resuming %s: %v", destination, err)
		}
		return nil
	}
	if _, err := kv.Get(ctx, key); err == nil {
		return nil // paused already: keep since when
	}
	b, _ := json.Marshal(Pause{Since: time.Now().UTC(), By: by})
	if _, err := kv.Put(ctx, key, b); err != nil {
		return fmt.Errorf("queue: pausing %s: %v", destination, err)
	}
	return nil
}

// Paused reports whether destination is paused, and since when.
func (s *Store) Paused(ctx context.Context, destination string) (*Pause, error) {
	kv, err := s.control(ctx, false)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	e, err := kv.Get(ctx, "paused."+destination)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, nil
	}
	if err != nil {
		s.forgetControl(err)
		return nil, err
	}
	var p Pause
	if err := json.Unmarshal(e.Value(), &p); err != nil || p.Since.IsZero() {
		p = Pause{Since: e.Created()} // written by hand: paused all the same
	}
	return &p, nil
}

// resumed is the revision of destination's latest resume in the bucket
// (0: never): it only grows, whatever the clocks of the gateways that
// resumed it.
func (s *Store) resumed(ctx context.Context, destination string) (uint64, error) {
	kv, err := s.control(ctx, false)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	e, err := kv.Get(ctx, "resumed."+destination)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return 0, nil
	}
	if err != nil {
		s.forgetControl(err)
		return 0, err
	}
	return e.Revision(), nil
}

// Usage is how many bytes the fullest partition of the queue holds, and
// its bound (its share of max_bytes; on a shared stream, the running
// one's): the first to fill up refuses new copies of its objects.
func (s *Store) Usage(ctx context.Context) (bytes uint64, maxBytes int64, err error) {
	for _, p := range s.configured() {
		info, err := p.stream.Info(ctx)
		if err != nil {
			return 0, 0, err
		}
		b, mb := info.State.Bytes, info.Config.MaxBytes
		if mb > 0 && (maxBytes <= 0 || float64(b)/float64(mb) > float64(bytes)/float64(maxBytes)) {
			bytes, maxBytes = b, mb
		}
	}
	return bytes, maxBytes, nil
}
