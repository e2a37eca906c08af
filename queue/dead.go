// Dead letters: the copies that could not be delivered within
// max_attempts or max_age. They live in a stream of their own,
// <stream>_DEAD (limit dead_max_bytes, DiscardNew), so that a full main
// stream (max_bytes) never keeps a copy from becoming one. If
// <stream>_DEAD is full too, the copy stays queued, delivered again at
// the destination's last retry interval, and is buried then without
// another attempt: no copy uses more than max_attempts counted
// attempts, none is dropped.
//
// Earlier versions kept dead letters in the main stream, under
// <stream>.dead.<destination>: Open moves them into <stream>_DEAD.

package queue

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
)

// DefaultDeadMaxBytes bounds <stream>_DEAD unless DeadMaxBytes says
// otherwise.
const DefaultDeadMaxBytes = 1 << 30 // 1 GiB

// maxUnburied bounds the copies this process remembers as not buried
// (their attempts and last error); past it, a copy over max_attempts is
// still buried without another attempt, with what the count tells.
const maxUnburied = 10000

// deadLetters is the Store's part for dead letters.
type deadLetters struct {
	stream jetstream.Stream // <stream>_DEAD

	mu       sync.Mutex
	unburied map[copyRef]unburied // by copy: copies at their bound, not yet buried
}

// unburied is a copy that reached its bound but could not be buried.
type unburied struct {
	stored time.Time // the copy's time in the stream: a stream made again reuses sequences
	a      Attempt   // its last attempt
}

// DeadStream is the name of the dead letters' stream of the stream named
// stream.
func DeadStream(stream string) string { return stream + "_DEAD" }

// deadSubject is where destination's dead letters are kept.
func (s *Store) deadSubject(destination string) string {
	return DeadStream(s.cfg.Stream) + "." + destination
}

// oldDeadPrefix is where earlier versions kept dead letters, in the main
// stream.
func (s *Store) oldDeadPrefix() string { return s.cfg.Stream + ".dead." }

// deadStreamConfig is <stream>_DEAD as cfg describes it: the main
// stream's storage and replicas, its own limit.
func deadStreamConfig(cfg Config) jetstream.StreamConfig {
	limit := cfg.DeadMaxBytes
	if limit == 0 {
		limit = DefaultDeadMaxBytes
	}
	return jetstream.StreamConfig{
		Name:      DeadStream(cfg.Stream),
		Subjects:  []string{DeadStream(cfg.Stream) + ".>"},
		Storage:   jetstream.FileStorage,
		Retention: jetstream.LimitsPolicy,
		Discard:   jetstream.DiscardNew, // full: the copy waits in the main stream, nothing is dropped
		MaxBytes:  limit,
		// A copy buried twice (a lost Term, another gateway) is kept once.
		Duplicates: cfg.DedupeWindow,
		Replicas:   cfg.Replicas,
	}
}

// openDead makes sure <stream>_DEAD exists, then moves the dead letters
// of earlier versions into it. Open returns what it returns; on an error
// it closes s.
func (s *Store) openDead(ctx context.Context) (*Store, error) {
	name := DeadStream(s.cfg.Stream)
	err := retrySetup(ctx, func(ctx context.Context) (err error) {
		s.dead.stream, err = s.makeDeadStream(ctx, s.cfg)
		return err
	})
	if err != nil {
		s.Close()
		return nil, fmt.Errorf("queue: creating stream %s (dead letters): %v%s", name, err, roomHint(err))
	}
	// Dead letters an earlier version kept in the main stream are moved
	// in the background: a large backlog must not hold up (or, past the
	// start's timeout, fail) Caddy's start. Close waits for it.
	mctx, cancel := context.WithCancel(context.Background())
	s.moved = make(chan struct{})
	go func() {
		defer close(s.moved)
		defer cancel()
		go func() {
			select {
			case <-s.done:
				cancel()
			case <-mctx.Done():
			}
		}()
		if err := s.moveOldDead(mctx); err != nil && mctx.Err() == nil {
			s.log.Error("mux_webhook queue: dead letters of an earlier version stay in the main stream (listed once moved; moving is tried again at the next start)", zap.Error(err))
		}
	}()
	return s, nil
}

// reconfigureDead applies a reloaded config's dead_max_bytes and
// replicas to <stream>_DEAD.
func (s *Store) reconfigureDead(ctx context.Context, cfg Config) error {
	if cfg.DeadMaxBytes == s.cfg.DeadMaxBytes && cfg.Replicas == s.cfg.Replicas && cfg.DedupeWindow == s.cfg.DedupeWindow {
		return nil
	}
	cfg.Stream = s.cfg.Stream
	if _, err := s.makeDeadStream(ctx, cfg); err != nil {
		return fmt.Errorf("queue: updating stream %s (dead_max_bytes, replicas): %v", DeadStream(s.cfg.Stream), err)
	}
	s.cfgMu.Lock() // bury reads it
	s.cfg.DeadMaxBytes = cfg.DeadMaxBytes
	s.cfgMu.Unlock()
	return nil
}

// makeDeadStream creates or updates <stream>_DEAD as cfg describes it;
// on external NATS, where other gateways share it, without lowering its
// replicas, dead_max_bytes or dedupe window (applySharedStream).
func (s *Store) makeDeadStream(ctx context.Context, cfg Config) (jetstream.Stream, error) {
	if s.shared() {
		return s.applySharedStream(ctx, deadStreamConfig(cfg))
	}
	return s.js.CreateOrUpdateStream(ctx, deadStreamConfig(cfg))
}

// moveOldDead moves the dead letters kept in the main stream by earlier
// versions (<stream>.dead.<destination>) into <stream>_DEAD, oldest
// first, then deletes them from the main stream. Each is published with a
// message id of its old place, so that a move cut short and done again
// keeps it once (within the dedupe window).
func (s *Store) moveOldDead(ctx context.Context) error {
	if s.legacy == nil {
		return nil // no stream of an earlier version
	}
	stream := s.legacy.stream
	prefix := s.oldDeadPrefix()
	info, err := stream.Info(ctx, jetstream.WithSubjectFilter(prefix+">"))
	if err != nil {
		return fmt.Errorf("queue: looking for dead letters of an earlier version in %s: %v", s.cfg.Stream, err)
	}
	if len(info.State.Subjects) == 0 {
		return nil
	}
	for seq := info.State.FirstSeq; ; {
		m, err := stream.GetMsg(ctx, seq, jetstream.WithGetMsgSubject(prefix+">"))
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("queue: moving dead letters of an earlier version to %s: %v", DeadStream(s.cfg.Stream), err)
		}
		msg := nats.NewMsg(s.deadSubject(strings.TrimPrefix(m.Subject, prefix)))
		msg.Data = m.Data
		for k, vs := range m.Header {
			if k == jetstream.MsgIDHeader {
				continue
			}
			for _, v := range vs {
				msg.Header.Add(k, v)
			}
		}
		msg.Header.Set(jetstream.MsgIDHeader, fmt.Sprintf("moved:%d:%d", m.Sequence, m.Time.UnixNano()))
		if _, err := s.js.PublishMsg(ctx, msg); err != nil {
			if isFull(err) {
				return fmt.Errorf("queue: the dead letters of an earlier version do not fit in %s: raise dead_max_bytes (they take up to %d bytes in %s)",
					DeadStream(s.cfg.Stream), info.State.Bytes, s.cfg.Stream)
			}
			return fmt.Errorf("queue: moving dead letters of an earlier version to %s: %v", DeadStream(s.cfg.Stream), err)
		}
		if err := stream.DeleteMsg(ctx, m.Sequence); err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
			return fmt.Errorf("queue: moving dead letters of an earlier version: deleting %s #%d: %v", s.cfg.Stream, m.Sequence, err)
		}
		seq = m.Sequence + 1
	}
}

// ErrDeadFull is bury's error when <stream>_DEAD holds dead_max_bytes.
var ErrDeadFull = errors.New("the dead letters' stream is full (dead_max_bytes)")

// bury stores msg as a dead letter of destination, with the attempts made
// and the last error.
func (s *Store) bury(ctx context.Context, destination string, msg jetstream.Msg, a Attempt) error {
	dead := nats.NewMsg(s.deadSubject(destination))
	dead.Data = msg.Data()
	for k, vs := range msg.Headers() {
		if k == jetstream.MsgIDHeader {
			continue
		}
		for _, v := range vs {
			dead.Header.Add(k, v)
		}
	}
	text := "unknown"
	if a.Err != nil {
		text = truncateText(a.Err.Error(), maxErrorText)
	}
	dead.Header.Set(headerLastError, text)
	dead.Header.Set(headerAttempts, strconv.Itoa(a.Number))
	dead.Header.Set(headerDeadAt, time.Now().UTC().Format(time.RFC3339))
	if meta, err := msg.Metadata(); err == nil {
		// Buried twice (a lost Term, another attempt) is kept once.
		dead.Header.Set(jetstream.MsgIDHeader, fmt.Sprintf("dead:%s:%s:%d:%d", destination, meta.Stream, meta.Sequence.Stream, meta.Timestamp.UnixNano()))
	}
	_, err := s.js.PublishMsg(context.WithoutCancel(ctx), dead)
	if err != nil && noStream(err) && s.Down() == nil {
		// The dead letters' stream was deleted by hand: made again.
		tctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		_, cerr := s.makeDeadStream(tctx, s.config())
		cancel()
		if cerr == nil {
			s.log.Warn("mux_webhook queue: the dead letters' stream was gone (deleted by hand?); made it again", zap.String("stream", DeadStream(s.cfg.Stream)))
			_, err = s.js.PublishMsg(context.WithoutCancel(ctx), dead)
		}
	}
	if err != nil && isFull(err) {
		return fmt.Errorf("%w: %s", ErrDeadFull, DeadStream(s.cfg.Stream))
	}
	return err
}

// settleDead keeps msg, whose attempt a was its last, as a dead letter
// and settles it; if it cannot be kept, the copy stays queued at the
// last retry interval, noted for buryAgain, and a.BuryErr says why.
func (s *Store) settleDead(ctx context.Context, d *Destination, msg jetstream.Msg, meta *jetstream.MsgMetadata, sw *sweeper, a *Attempt) {
	seq := meta.Sequence.Stream
	if err := s.bury(ctx, d.Name, msg, *a); err != nil {
		a.BuryErr, a.Result = err, "retry"
		s.dead.note(refOf(meta), meta.Timestamp, *a)
		_ = msg.NakWithDelay(d.Retry[len(d.Retry)-1])
		return
	}
	a.Result = "dead"
	if d.OrderObject && sw.remove(context.WithoutCancel(ctx), msg, meta) {
		// Gone before it is settled: the next copy of its object may go.
		_ = msg.Term()
		s.dead.forget(refOf(meta))
		s.uncharge(context.WithoutCancel(ctx), meta)
	} else if msg.Term() == nil {
		s.dead.forget(refOf(meta))
		sw.settle(seq)
		s.uncharge(context.WithoutCancel(ctx), meta)
	} else {
		// Buried but not settled (its consumer was deleted since, NATS
		// is away): the copy comes again, maybe counted from 1 by a
		// consumer made again, and is buried again (kept once) without
		// another POST.
		s.dead.note(refOf(meta), meta.Timestamp, *a)
	}
	s.handBacks.settled(refOf(meta))
}

// buryAgain buries, without another attempt, a copy that reached its
// bound earlier but could not be buried then: one this process noted, one
// whose count is over max_attempts, or one attempted before and now past
// max_age. It reports whether msg was such a copy (then a says what
// became of it).
func (s *Store) buryAgain(ctx context.Context, d *Destination, msg jetstream.Msg, meta *jetstream.MsgMetadata, sw *sweeper, a *Attempt) bool {
	prev, known := s.dead.noted(refOf(meta), meta.Timestamp)
	overAttempts := d.MaxAttempts > 0 && a.Number > d.MaxAttempts
	// A copy past max_age is not buried here: it gets one attempt (a
	// destination paused or tripped for longer than max_age holds its
	// copies alive), and is buried after it, if it fails.
	if !known && !overAttempts {
		return false
	}
	a.NoAttempt = true
	switch {
	case known:
		a.Number, a.Status, a.Err = prev.Number, prev.Status, prev.Err
	default:
		a.Number = d.MaxAttempts
		a.Err = errors.New("attempted max_attempts times; the last error is not known to this process")
	}
	s.settleDead(ctx, d, msg, meta, sw, a)
	return true
}

func (dl *deadLetters) note(seq copyRef, stored time.Time, a Attempt) {
	dl.mu.Lock()
	defer dl.mu.Unlock()
	if dl.unburied == nil {
		dl.unburied = map[copyRef]unburied{}
	}
	if _, ok := dl.unburied[seq]; !ok && len(dl.unburied) >= maxUnburied {
		return
	}
	a.BuryErr, a.NoAttempt = nil, false
	dl.unburied[seq] = unburied{stored: stored, a: a}
}

func (dl *deadLetters) noted(seq copyRef, stored time.Time) (Attempt, bool) {
	dl.mu.Lock()
	defer dl.mu.Unlock()
	u, ok := dl.unburied[seq]
	if !ok || !u.stored.Equal(stored) {
		return Attempt{}, false
	}
	return u.a, true
}

func (dl *deadLetters) forget(seq copyRef) {
	dl.mu.Lock()
	delete(dl.unburied, seq)
	dl.mu.Unlock()
}

// DeadLetter is one event that could not be delivered.
type DeadLetter struct {
	// Seq is the dead letter's sequence in <stream>_DEAD: a purge up to
	// it drops what a listing showed, not what was buried after.
	Seq       uint64    `json:"seq"`
	ID        string    `json:"id"`
	Type      string    `json:"type"`
	Attempts  int       `json:"attempts"`
	LastError string    `json:"last_error"`
	DeadAt    time.Time `json:"dead_at"`
}

// maxListed bounds what one Dead call returns.
const maxListed = 10000

// Dead lists destination's dead letters, oldest first (at most 10000).
// It reads their headers only: a listing holds no event body.
func (s *Store) Dead(ctx context.Context, destination string) ([]DeadLetter, error) {
	out := []DeadLetter{}
	err := s.eachDead(ctx, destination, func(dl DeadLetter) (bool, error) {
		out = append(out, dl)
		return len(out) < maxListed, nil
	})
	return out, err
}

// DeadCounts returns, per destination name, how many dead letters
// <stream>_DEAD holds: also for destinations no longer configured.
func (s *Store) DeadCounts(ctx context.Context) (map[string]uint64, error) {
	return subjectCounts(ctx, s.dead.stream, DeadStream(s.cfg.Stream)+".")
}

// deadCount is how many dead letters destination has.
func (s *Store) deadCount(ctx context.Context, destination string) (uint64, error) {
	info, err := s.dead.stream.Info(ctx, jetstream.WithSubjectFilter(s.deadSubject(destination)))
	if err != nil {
		return 0, err
	}
	return info.State.Subjects[s.deadSubject(destination)], nil
}

// deadNextWait bounds the wait for the next dead letter of a listing:
// past it, the listing checks whether one is left to read (a purge may
// have dropped the rest meanwhile).
const deadNextWait = 2 * time.Second

// eachDead calls fn with destination's headers-only dead letters, oldest
// first, one at a time, up to the last one stored when it started, until
// fn returns false or an error. It reads with ONE ordered consumer (made
// again from where it was only if no server answered, as on a cluster just
// after an election, up to 5 times), and every wait ends with ctx.
func (s *Store) eachDead(ctx context.Context, destination string, fn func(DeadLetter) (bool, error)) error {
	subject := s.deadSubject(destination)
	info, err := s.dead.stream.Info(ctx, jetstream.WithSubjectFilter(subject))
	if err != nil {
		return err
	}
	if info.State.Subjects[subject] == 0 {
		return nil
	}
	last, next := info.State.LastSeq, uint64(0) // next: the first sequence not yet read
	for try := 1; ; try++ {
		done, err := s.eachDeadFrom(ctx, subject, next, last, fn, &next)
		if done || err == nil {
			return err
		}
		if !noResponders(err) && !errors.Is(err, errDeadStuck) || try == 5 || ctx.Err() != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Duration(try) * 100 * time.Millisecond):
		}
	}
}

// eachDeadFrom is one reading of eachDead, from sequence from (0: the
// first); next is kept at the first sequence not yet read. done reports
// that fn stopped it or failed.
func (s *Store) eachDeadFrom(ctx context.Context, subject string, from, last uint64, fn func(DeadLetter) (bool, error), next *uint64) (done bool, err error) {
	cfg := jetstream.OrderedConsumerConfig{FilterSubjects: []string{subject}, HeadersOnly: true}
	if from > 0 {
		cfg.DeliverPolicy, cfg.OptStartSeq = jetstream.DeliverByStartSequencePolicy, from
	}
	cons, err := s.js.OrderedConsumer(ctx, DeadStream(s.cfg.Stream), cfg)
	if err != nil {
		return false, err
	}
	it, err := cons.Messages(jetstream.PullMaxMessages(64))
	if err != nil {
		return false, err
	}
	defer it.Stop()
	stuck := 0 // waits in a row that brought nothing, though letters are left
	for {
		wctx, cancel := context.WithTimeout(ctx, deadNextWait)
		msg, err := it.Next(jetstream.NextContext(wctx))
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return true, ctx.Err()
			}
			if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) {
				// Nothing came: is a letter left up to last?
				m, gerr := s.dead.stream.GetMsg(ctx, max(*next, 1), jetstream.WithGetMsgSubject(subject))
				if errors.Is(gerr, jetstream.ErrMsgNotFound) || gerr == nil && m.Sequence > last {
					return true, nil
				}
				if gerr != nil {
					return false, gerr
				}
				if stuck++; stuck >= 3 {
					return false, errDeadStuck // read again, with a new consumer
				}
				continue
			}
			return false, err
		}
		stuck = 0
		meta, err := msg.Metadata()
		if err != nil {
			continue
		}
		if meta.Sequence.Stream > last {
			return true, nil
		}
		*next = meta.Sequence.Stream + 1
		h := msg.Headers()
		attempts, _ := strconv.Atoi(h.Get(headerAttempts))
		deadAt, _ := time.Parse(time.RFC3339, h.Get(headerDeadAt))
		more, err := fn(DeadLetter{
			Seq: meta.Sequence.Stream, ID: h.Get(HeaderEventID), Type: h.Get(HeaderEventType),
			Attempts: attempts, LastError: h.Get(headerLastError), DeadAt: deadAt,
		})
		if err != nil || !more || meta.Sequence.Stream == last || meta.NumPending == 0 {
			return true, err
		}
	}
}

// errDeadStuck: the ordered consumer of a listing brought nothing for
// several waits though letters are left (seen on a cluster): the listing
// reads on with a new one, from where it was.
var errDeadStuck = errors.New("queue: the dead letters' reader got nothing, though letters are left")

// noResponders is a request no server answered yet (a cluster's stream or
// consumer just after an election), however the client wrapped it.
func noResponders(err error) bool {
	return errors.Is(err, nats.ErrNoResponders) || errors.Is(err, jetstream.ErrNoStreamResponse) ||
		strings.Contains(err.Error(), "no responders")
}

// NotDeadError names the event ids Redeliver was asked for that are not
// dead letters of the destination (the others were redelivered).
type NotDeadError struct {
	Destination string
	IDs         []string
}

func (e *NotDeadError) Error() string {
	return fmt.Sprintf("not dead letters of %s: %s", e.Destination, strings.Join(e.IDs, ", "))
}

// Redeliver puts dead letters of destination back in its queue, attempts
// counted from 1 again: those whose event ids are listed, or all of them
// (however many were dead when it started). It returns how many went
// back; ids that are not dead letters of destination make a
// *NotDeadError, after the others went back.
func (s *Store) Redeliver(ctx context.Context, destination string, ids []string, all bool) (int, error) {
	want := map[string]bool{}
	for _, id := range ids {
		want[id] = true
	}
	found := map[string]bool{}
	var seqs []uint64
	err := s.eachDead(ctx, destination, func(dl DeadLetter) (bool, error) {
		if all || want[dl.ID] {
			seqs = append(seqs, dl.Seq)
		}
		if want[dl.ID] {
			found[dl.ID] = true
		}
		return true, nil
	})
	if err != nil {
		return 0, err
	}
	n := 0
	for _, seq := range seqs {
		dead, err := s.dead.stream.GetMsg(ctx, seq)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue // redelivered or purged meanwhile
		}
		if err != nil {
			return n, err
		}
		// Into its object's partition, after the copies stored since: a
		// dead letter of an earlier version has no key, its event id
		// gives one.
		key := dead.Header.Get(HeaderKey)
		if key == "" {
			key = Key("", []byte(dead.Header.Get(HeaderEventID)))
		}
		parts := s.configured()
		p := parts[partitionOf(key, len(parts))]
		msg := nats.NewMsg(p.subject(destination, key))
		msg.Data = dead.Data
		for k, vs := range dead.Header {
			switch k {
			case headerLastError, headerAttempts, headerDeadAt, jetstream.MsgIDHeader, HeaderKey:
				continue
			}
			for _, v := range vs {
				msg.Header.Add(k, v)
			}
		}
		// A fresh message id: the dedupe window must not swallow it.
		msg.Header.Set(jetstream.MsgIDHeader, fmt.Sprintf("redeliver:%s:%d:%d", destination, seq, dead.Time.UnixNano()))
		msg.Header.Set(HeaderKey, key)
		_, err = s.js.PublishMsg(ctx, msg)
		if err != nil && noStream(err) && s.ensurePart(ctx, p) == nil {
			_, err = s.js.PublishMsg(ctx, msg)
		}
		if err != nil {
			return n, err
		}
		if err := s.dead.stream.DeleteMsg(ctx, seq); err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
			return n, err
		}
		n++
	}
	if !all {
		var missing []string
		seen := map[string]bool{}
		for _, id := range ids {
			if !found[id] && !seen[id] {
				seen[id] = true
				missing = append(missing, id)
			}
		}
		if len(missing) > 0 {
			return n, &NotDeadError{Destination: destination, IDs: missing}
		}
	}
	return n, nil
}

// Purge drops destination's dead letters.
func (s *Store) Purge(ctx context.Context, destination string) error {
	return s.PurgeUpTo(ctx, destination, 0)
}

// PurgeUpTo drops destination's dead letters up to sequence upTo (a
// listing's last Seq), keeping those buried after; 0 drops them all.
func (s *Store) PurgeUpTo(ctx context.Context, destination string, upTo uint64) error {
	opts := []jetstream.StreamPurgeOpt{jetstream.WithPurgeSubject(s.deadSubject(destination))}
	if upTo > 0 {
		opts = append(opts, jetstream.WithPurgeSequence(upTo+1)) // below it
	}
	return s.dead.stream.Purge(ctx, opts...)
}
