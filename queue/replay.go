// Replay by filter: a background job that queues a fresh copy of every
// event id history holds in a fixed range (its latest record there),
// oldest first, for one destination. The copies bypass the dedupe window
// (their dedupe key is the job's and the id), carry Mux-Webhook-Replay:
// <job>, and are signed by the destination's sign at delivery.
//
// The job's state is a key of the bucket <stream>_REPLAY: its range and
// filter, fixed when it starts, and how far it got. A job whose gateway
// stopped or died is taken up by a gateway that opens history (or checks,
// every 30 s) once its state has not moved for replayOrphaned: it starts
// again after the last id it saved as queued. A gateway that stops saves
// how far it got; one that died may have queued up to replayUnsaved more:
// of those, a copy still queued is stored once (its dedupe key, within
// the queue's dedupe window), and one delivered since is found by its
// attempt in history and not queued again.

package queue

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
)

// Replay's bounds.
const (
	// MaxReplay bounds the event ids one job may queue: narrow the filter
	// beyond that.
	MaxReplay = 1_000_000
	// replayFill: above this share of max_bytes, a job waits.
	replayFill = 0.80
	// replaySave: a running job's state is written at least this often
	// (its heartbeat).
	replaySave = 5 * time.Second
	// replayUnsaved: a running job's state is also written after every
	// this many copies; at most this many were queued after its last
	// save when its gateway died.
	replayUnsaved = 256
	// replayOrphaned: a running job whose state has not moved for this
	// long is taken up by another gateway.
	replayOrphaned = 30 * time.Second
)

// ReplayJob is a replay job's state, as the bucket keeps it and the API
// shows it.
type ReplayJob struct {
	Job         string `json:"job"`
	Destination string `json:"destination"`
	// Matched is how many event ids the job's range and filter hold;
	// Queued how many it queued; Expired how many aged out of history
	// before their turn.
	Matched uint64 `json:"matched"`
	Queued  uint64 `json:"queued"`
	Expired uint64 `json:"expired"`
	Done    bool   `json:"done"`
	// State is "running", "done", "failed" (Error says why) or
	// "cancelled".
	State   string    `json:"state"`
	Error   string    `json:"error,omitempty"`
	Created time.Time `json:"created"`
	Updated time.Time `json:"updated"`
	// The fixed range and filter, and the last sequence queued.
	FromSeq uint64       `json:"from_seq"`
	ToSeq   uint64       `json:"to_seq"`
	Cursor  uint64       `json:"cursor"`
	Filter  ReplayFilter `json:"filter"`
}

// ReplayFilter is a job's filter, kept with it.
type ReplayFilter struct {
	Type    string `json:"type,omitempty"`
	Object  string `json:"object,omitempty"`
	ID      string `json:"id,omitempty"`
	Outcome string `json:"outcome,omitempty"`
}

// ErrReplayNotFound: no such job.
var ErrReplayNotFound = errors.New("no such replay job")

// ErrReplayTooLarge: the filter matches more than MaxReplay events.
var ErrReplayTooLarge = fmt.Errorf("replay: the filter matches more than %d events; narrow it (type, object, since, until)", MaxReplay)

// replays are the jobs this process runs, and the revisions of the
// others' it has seen.
type replays struct {
	mu      sync.Mutex
	running map[string]runningJob
	wg      sync.WaitGroup
	seen    map[string]seenJob
}

// runningJob is a job this process runs: cancel stops it, done is
// closed once it has stopped (and saved how far it got).
type runningJob struct {
	cancel context.CancelFunc
	done   chan struct{}
}

// seenJob is a revision of a job's state and when this process first saw
// it (by its own monotonic clock).
type seenJob struct {
	rev uint64
	at  time.Time
}

// stale reports whether a running job's state has not moved for
// replayOrphaned: the same revision seen that long by this process's
// clock, so that clocks that differ between gateways and servers do not
// matter; or saved that long ago by the server's clock, much longer than
// any skew (a job left while this process was not running).
func (r *replays) stale(key string, rev uint64, saved time.Time) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.seen == nil {
		r.seen = map[string]seenJob{}
	}
	if time.Since(saved) > 10*replayOrphaned {
		return true
	}
	s, ok := r.seen[key]
	if !ok || s.rev != rev {
		r.seen[key] = seenJob{rev: rev, at: time.Now()}
		return false
	}
	return time.Since(s.at) >= replayOrphaned
}

func (r *replays) stopAll() {
	r.mu.Lock()
	for _, j := range r.running {
		j.cancel()
	}
	r.mu.Unlock()
	r.wg.Wait()
}

func (h *History) replayBucket() string { return h.s.cfg.Stream + "_REPLAY" }

// replayKV opens (or makes) the jobs' bucket.
func (h *History) replayKV(ctx context.Context) (jetstream.KeyValue, error) {
	kv, err := h.s.js.KeyValue(ctx, h.replayBucket())
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		kv, err = h.s.js.CreateKeyValue(ctx, jetstream.KeyValueConfig{
			Bucket:      h.replayBucket(),
			Description: "caddy-mux-webhook: replay jobs",
			History:     1,
			TTL:         h.config().MaxAge, // a job outlives its events by no more than history does
			Storage:     jetstream.FileStorage,
			Replicas:    h.s.cfg.Replicas,
		})
		if errors.Is(err, jetstream.ErrBucketExists) {
			kv, err = h.s.js.KeyValue(ctx, h.replayBucket())
		}
	}
	return kv, err
}

// Replay counts the event ids f matches and, unless dryRun, starts a job
// queuing a copy of each for destination.
func (h *History) Replay(ctx context.Context, destination string, f HistoryFilter, dryRun bool) (ReplayJob, error) {
	if !ValidDestination(destination) {
		return ReplayJob{}, fmt.Errorf("destination name %q: use letters, digits, _ and - only", destination)
	}
	if check := h.config().Destination; check != nil {
		if err := check(destination); err != nil {
			return ReplayJob{}, err
		}
	}
	job := ReplayJob{Destination: destination, State: "running", Created: time.Now().UTC(),
		Filter: ReplayFilter{Type: f.Type, Object: f.Object, ID: f.ID, Outcome: f.Outcome}}
	lower, upper, ok, err := h.seqRange(ctx, f)
	if err != nil {
		return ReplayJob{}, err
	}
	if ok {
		job.FromSeq, job.ToSeq = lower, upper
		seqs, err := h.latest(ctx, job, f, nil)
		if err != nil {
			return ReplayJob{}, err
		}
		job.Matched = uint64(len(seqs))
	}
	if dryRun {
		job.State, job.Done = "dry_run", true
		return job, nil
	}
	var id [6]byte
	_, _ = rand.Read(id[:])
	job.Job = "r" + hex.EncodeToString(id[:])
	job.Updated = time.Now().UTC()
	if !ok || job.Matched == 0 {
		job.State, job.Done = "done", true
	}
	kv, err := h.replayKV(ctx)
	if err != nil {
		return ReplayJob{}, fmt.Errorf("replay: the jobs' bucket: %w", err)
	}
	data, _ := json.Marshal(job)
	rev, err := kv.Create(ctx, job.Job, data)
	if err != nil {
		return ReplayJob{}, fmt.Errorf("replay: saving the job: %w", err)
	}
	if !job.Done {
		h.runReplay(job, rev, f.Match, false)
	}
	return job, nil
}

// ReplayStatus returns a job's state.
func (h *History) ReplayStatus(ctx context.Context, job string) (ReplayJob, error) {
	kv, err := h.replayKV(ctx)
	if err != nil {
		return ReplayJob{}, err
	}
	j, _, err := readJob(ctx, kv, job)
	return j, err
}

// readJob reads a job's state and its revision.
func readJob(ctx context.Context, kv jetstream.KeyValue, job string) (ReplayJob, uint64, error) {
	e, err := kv.Get(ctx, job)
	if errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrInvalidKey) {
		return ReplayJob{}, 0, ErrReplayNotFound
	}
	if err != nil {
		return ReplayJob{}, 0, err
	}
	var j ReplayJob
	if err := json.Unmarshal(e.Value(), &j); err != nil {
		return ReplayJob{}, 0, err
	}
	return j, e.Revision(), nil
}

// CancelReplay stops a job: its state becomes "cancelled" (done), the
// copies it queued stay queued, and counted in queued. A gateway running
// it stops at its next save (within 5 s or 256 copies) and adds what it
// queued since; this one stops at once, saving how far it got first.
func (h *History) CancelReplay(ctx context.Context, job string) (ReplayJob, error) {
	h.replays.mu.Lock()
	r, mine := h.replays.running[job]
	h.replays.mu.Unlock()
	if mine {
		r.cancel()
		select {
		case <-r.done:
		case <-ctx.Done():
			return ReplayJob{}, ctx.Err()
		}
	}
	kv, err := h.replayKV(ctx)
	if err != nil {
		return ReplayJob{}, err
	}
	for try := 0; ; try++ {
		j, rev, err := readJob(ctx, kv, job)
		if err != nil {
			return ReplayJob{}, err
		}
		if j.Done {
			return j, nil // done, failed or cancelled already
		}
		j.State, j.Done, j.Error, j.Updated = "cancelled", true, "cancelled by an operator", time.Now().UTC()
		data, _ := json.Marshal(j)
		if _, err = kv.Update(ctx, job, data, rev); err == nil {
			h.log.Info("mux_webhook history: replay job cancelled", zap.String("job", job), zap.Uint64("queued", j.Queued))
			return j, nil
		}
		if try >= 10 || ctx.Err() != nil {
			return ReplayJob{}, err // its runner saved meanwhile, ten times
		}
	}
}

// latest returns, oldest first, the sequence of each event id's latest
// record in the job's range that f matches. beat, if set, keeps a running
// job's state moving while it reads.
func (h *History) latest(ctx context.Context, job ReplayJob, f HistoryFilter, beat func() bool) ([]uint64, error) {
	last := map[[8]byte]uint64{}
	var tooMany, takenUp bool
	read := 0
	err := h.scan(ctx, scanRequest{seq: job.FromSeq, filter: h.subjectFilter(f), upTo: job.ToSeq}, func(r rawRecord) bool {
		if read++; beat != nil && !beat() {
			takenUp = true
			return false
		}
		if !f.matches(r) {
			return true
		}
		var k [8]byte
		if id := r.header.Get(hdrHistID); id != "" {
			copy(k[:], hashBytes(headerSafe(id)))
		} else {
			// No id: each record is an event of its own (only the same
			// bytes would be the same event).
			k = [8]byte{0xff, byte(r.seq >> 48), byte(r.seq >> 40), byte(r.seq >> 32), byte(r.seq >> 24), byte(r.seq >> 16), byte(r.seq >> 8), byte(r.seq)}
		}
		if _, seen := last[k]; !seen && len(last) >= MaxReplay {
			tooMany = true
			return false
		}
		last[k] = r.seq
		return true
	})
	if err != nil {
		return nil, err
	}
	if tooMany {
		return nil, ErrReplayTooLarge
	}
	if takenUp {
		return nil, errTakenUp
	}
	seqs := make([]uint64, 0, len(last))
	for _, seq := range last {
		seqs = append(seqs, seq)
	}
	slices.Sort(seqs)
	return seqs, nil
}

func hashBytes(s string) []byte {
	b, _ := hex.DecodeString(hash16(s))
	return b
}

// runReplay runs job in the background, in this process.
//
// adopted: the job is taken up from a gateway that stopped or died; the
// copies it queued after its last save are found again (replayUnsaved).
func (h *History) runReplay(job ReplayJob, rev uint64, match func(string) bool, adopted bool) {
	ctx, cancel := context.WithCancel(context.Background())
	h.replays.mu.Lock()
	select {
	case <-h.stop: // closing: a gateway takes the job up later
		h.replays.mu.Unlock()
		cancel()
		return
	default:
	}
	if h.replays.running == nil {
		h.replays.running = map[string]runningJob{}
	}
	if _, dup := h.replays.running[job.Job]; dup {
		h.replays.mu.Unlock()
		cancel()
		return
	}
	done := make(chan struct{})
	h.replays.running[job.Job] = runningJob{cancel: cancel, done: done}
	h.replays.wg.Add(1)
	h.replays.mu.Unlock()
	go func() {
		defer h.replays.wg.Done()
		defer func() {
			h.replays.mu.Lock()
			delete(h.replays.running, job.Job)
			h.replays.mu.Unlock()
			cancel()
			close(done)
		}()
		h.replay(ctx, job, rev, match, adopted)
	}()
}

// replay queues job's copies after its cursor, saving its state as it
// goes; it returns when done, failed, or ctx ends (the state then stays
// "running", for a gateway to take up, saved as far as it got).
func (h *History) replay(ctx context.Context, job ReplayJob, rev uint64, match func(string) bool, adopted bool) {
	kv, err := h.replayKV(ctx)
	if err != nil {
		return
	}
	gone := false // the destination left this gateway's config (a reload)
	left := false // its state is another's now (cancelled, or taken up)
	var save func() bool
	defer func() {
		if ctx.Err() != nil && !job.Done && !left {
			save() // stopped (a Close, or a cancel here): how far it got
		}
	}()
	save = func() bool {
		if check := h.config().Destination; check != nil && !job.Done {
			if err := check(job.Destination); err != nil {
				job.State, job.Error, job.Done = "failed", fmt.Sprintf("%v (in this gateway's config, since the job started)", err), true
				gone = true
			}
		}
		job.Updated = time.Now().UTC()
		data, _ := json.Marshal(job)
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		r, err := kv.Update(sctx, job.Job, data, rev)
		if err != nil {
			left = true
			if h.cancelledMeanwhile(sctx, kv, job) {
				return false
			}
			h.log.Warn("mux_webhook history: a replay job's state could not be saved (taken up by another gateway, or the bucket is away); this gateway leaves it",
				zap.String("job", job.Job), zap.Error(err))
			return false
		}
		rev = r
		if gone {
			h.log.Error("mux_webhook history: a replay job failed: its destination is no longer configured for it", zap.String("job", job.Job), zap.String("destination", job.Destination), zap.String("error", job.Error))
		}
		return !gone
	}
	fail := func(err error) {
		job.State, job.Error, job.Done = "failed", err.Error(), true
		save()
		h.log.Error("mux_webhook history: a replay job failed", zap.String("job", job.Job), zap.String("destination", job.Destination), zap.Error(err))
	}
	if check := h.config().Destination; check != nil {
		if err := check(job.Destination); err != nil {
			fail(fmt.Errorf("%v (in this gateway's config)", err))
			return
		}
	}
	lastSave := time.Now()
	beat := func() bool {
		if time.Since(lastSave) < replaySave {
			return true
		}
		lastSave = time.Now()
		return save()
	}
	f := HistoryFilter{Type: job.Filter.Type, Object: job.Filter.Object, ID: job.Filter.ID, Outcome: job.Filter.Outcome, Match: match}
	seqs, err := h.latest(ctx, job, f, beat)
	if err != nil {
		if ctx.Err() == nil && !errors.Is(err, errTakenUp) {
			fail(err)
		}
		return
	}
	todo := seqs[:0]
	for _, seq := range seqs {
		if seq > job.Cursor {
			todo = append(todo, seq)
		}
	}
	// What matched when the job started and is neither queued nor still
	// held has aged out.
	job.Expired = job.Matched - min(job.Matched, job.Queued+uint64(len(todo)))
	h.log.Info("mux_webhook history: replaying", zap.String("job", job.Job), zap.String("destination", job.Destination),
		zap.Uint64("matched", job.Matched), zap.Int("to_queue", len(todo)))
	for i, seq := range todo {
		if i%16 == 0 {
			if err := h.waitForRoom(ctx, beat); err != nil {
				return
			}
		}
		var rec *rawRecord
		err := h.scan(ctx, scanRequest{seq: seq, filter: h.name + ".e.>", max: 1}, func(r rawRecord) bool {
			if r.seq == seq {
				rec = &r
			}
			return false
		})
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			fail(err)
			return
		}
		if rec == nil {
			job.Expired++ // aged out meanwhile
		} else if adopted && i < replayUnsaved && h.attemptedFor(ctx, job.Job, *rec) {
			job.Queued++ // queued before the take-up, and delivered (or tried) since
		} else if err := h.enqueueReplay(ctx, job, *rec, beat); err != nil {
			if ctx.Err() != nil || errors.Is(err, errTakenUp) {
				return
			}
			fail(err)
			return
		} else {
			job.Queued++
		}
		job.Cursor = seq
		if time.Since(lastSave) >= replaySave || i%replayUnsaved == replayUnsaved-1 {
			if !save() {
				return
			}
			lastSave = time.Now()
		}
	}
	job.State, job.Done = "done", true
	save()
	h.log.Info("mux_webhook history: replay done", zap.String("job", job.Job), zap.String("destination", job.Destination),
		zap.Uint64("queued", job.Queued), zap.Uint64("expired", job.Expired))
}

// enqueueReplay queues one record's copy for the job. A full partition
// or a store that is away is waited for (beat keeps the job's state
// moving meanwhile); other errors are tried 20 times.
func (h *History) enqueueReplay(ctx context.Context, job ReplayJob, r rawRecord, beat func() bool) error {
	id := r.header.Get(hdrHistID)
	eventID := id
	if id == "" {
		eventID = "seq:" + fmt.Sprint(r.seq)
	}
	m := Message{Destination: job.Destination, EventID: []byte("replay:" + job.Job + ":" + eventID),
		ObjectID: r.header.Get(hdrHistObjectID), ID: id, Type: r.header.Get(hdrHistType), Body: r.data,
		Header: map[string]string{HeaderReplay: job.Job}}
	for try := 0; ; {
		ectx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := h.s.Enqueue(ectx, m)
		cancel()
		if err == nil || ctx.Err() != nil {
			return err
		}
		if waitable := errors.Is(err, ErrFull) || h.s.Down() != nil || !h.s.conn.IsConnected(); !waitable {
			if try++; try >= 20 {
				return err
			}
		}
		if err := wait(ctx, beat); err != nil {
			return err
		}
	}
}

// errTakenUp: a job's state could not be saved (another gateway took it
// up, or the bucket is away): this process leaves it.
var errTakenUp = errors.New("replay: the job's state could not be saved: left to the gateway that took it up")

// wait waits a second, keeping the job's state moving with beat.
func wait(ctx context.Context, beat func() bool) error {
	if !beat() {
		return errTakenUp
	}
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(time.Second):
		return nil
	}
}

// waitForRoom waits while the queue holds more than replayFill of its
// max_bytes, keeping the job's state moving with beat.
func (h *History) waitForRoom(ctx context.Context, beat func() bool) error {
	for {
		if h.s.fill(ctx) <= replayFill {
			return nil
		}
		if err := wait(ctx, beat); err != nil {
			return err
		}
	}
}

// fill is the share of its bound the fullest partition holds (0 when it
// cannot tell): an object's copies all go to one partition.
func (s *Store) fill(ctx context.Context) float64 {
	var most float64
	for _, p := range s.configured() {
		info, err := p.stream.Info(ctx)
		if err != nil {
			return 0
		}
		if limit := info.Config.MaxBytes; limit > 0 {
			most = max(most, float64(info.State.Bytes)/float64(limit))
		}
	}
	return most
}

// adoptReplays takes up the running jobs whose state has not moved for
// replayOrphaned (their gateway stopped or died), at open and every 30s.
func (h *History) adoptReplays() {
	defer h.wg.Done()
	t := time.NewTimer(time.Second)
	defer t.Stop()
	for {
		select {
		case <-h.stop:
			return
		case <-t.C:
		}
		h.adoptOnce()
		t.Reset(replayOrphaned / 3)
	}
}

func (h *History) adoptOnce() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	go func() {
		select {
		case <-h.stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	kv, err := h.s.js.KeyValue(ctx, h.replayBucket())
	if err != nil {
		return // no job ever
	}
	keys, err := kv.ListKeys(ctx)
	if err != nil {
		return
	}
	for key := range keys.Keys() {
		e, err := kv.Get(ctx, key)
		if err != nil {
			continue
		}
		var j ReplayJob
		if json.Unmarshal(e.Value(), &j) != nil || j.Done || !h.replays.stale(key, e.Revision(), e.Created()) {
			continue
		}
		h.replays.mu.Lock()
		_, mine := h.replays.running[j.Job]
		h.replays.mu.Unlock()
		if mine {
			continue
		}
		if check := h.config().Destination; check != nil && check(j.Destination) != nil {
			continue // left for a gateway that has the destination
		}
		// Claimed by updating the revision read: another gateway taking
		// it up at the same moment fails here.
		j.Updated = time.Now().UTC()
		data, _ := json.Marshal(j)
		rev, err := kv.Update(ctx, key, data, e.Revision())
		if err != nil {
			continue
		}
		h.log.Info("mux_webhook history: taking up a replay job whose gateway stopped", zap.String("job", j.Job), zap.Uint64("cursor", j.Cursor))
		h.runReplay(j, rev, h.matcher(j.Filter.Type), true)
	}
}

// cancelledMeanwhile reports whether job was cancelled by an operator
// since this process last saved it; if so, what it queued since is added
// to the cancelled state (an operator reads how many copies went out).
func (h *History) cancelledMeanwhile(ctx context.Context, kv jetstream.KeyValue, job ReplayJob) bool {
	for range 10 {
		now, rev, err := readJob(ctx, kv, job.Job)
		if err != nil || now.State != "cancelled" {
			return false
		}
		if now.Queued >= job.Queued {
			return true
		}
		now.Queued, now.Cursor, now.Expired = job.Queued, job.Cursor, max(now.Expired, job.Expired)
		data, _ := json.Marshal(now)
		if _, err := kv.Update(ctx, job.Job, data, rev); err == nil {
			h.log.Info("mux_webhook history: replay job cancelled by an operator; stopped", zap.String("job", job.Job), zap.Uint64("queued", job.Queued))
			return true
		}
	}
	return true
}

// attemptedFor reports whether history holds a delivery attempt of r's
// event for job: a copy queued by the gateway that ran the job before it
// was taken up, after its last save, and delivered (or tried) since. The
// copies still queued are found by the queue's dedupe instead; a copy
// delivered and then swept is no longer there to find.
func (h *History) attemptedFor(ctx context.Context, job string, r rawRecord) bool {
	id := r.header.Get(hdrHistID)
	if id == "" {
		return false
	}
	attempts, err := h.attemptsOf(ctx, id, r.time)
	if err != nil {
		return false
	}
	for _, a := range attempts {
		if a.Replay == job {
			return true
		}
	}
	return false
}
