// History: every verified event and every delivery attempt, kept in the
// stream <stream>_HISTORY for a time (history) and a size
// (history_max_bytes), searchable (history_search.go) and replayable
// (replay.go), with per-minute summaries for the console's charts
// (history_stats.go).
//
// The stream is written without an fsync per record (JetStream's async
// persist mode) and asynchronously: Record never waits for the store, so
// writing history never delays or fails the answer to Mux. What could not
// be written (the buffer full, the store away, a write refused) is
// counted (Dropped).
//
// Subjects carry what a search narrows by, so that JetStream's subject
// index answers it without reading every record:
//
//	<H>.e.<outcome>.<object>.<id>.<type tokens>   an event (body: the event, byte for byte)
//	<H>.a.<id>                                     an attempt (body: JSON)
//	<H>.m.<instance>                               a minute's summary of one gateway (JSON)
//
// <object> is "o" and 16 hex digits of the SHA-256 of the object id ("-"
// without one), <id> "i" and the same of the event id; the type's dotted
// tokens come last, so that a type glob's literal prefix is a subject
// filter. An event's attempts share one literal subject, which JetStream
// finds from its per-subject index without scanning. The index costs
// memory in the server: about 100 bytes per event kept (its two
// subjects), bounded by history_max_bytes.
package queue

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
)

// History's defaults, as the README's "Every setting" documents them.
const (
	DefaultHistoryAge      = 7 * 24 * time.Hour
	DefaultHistoryMaxBytes = 1 << 30 // 1 GiB
)

// Bounds of what waits to be written: beyond either, a record is dropped
// (and counted), never waited for.
const (
	historyBufferRecords = 8192
	historyBufferBytes   = 64 << 20
	// historyInFlight bounds the writes sent and not yet acknowledged, in
	// number and in bytes.
	historyInFlight      = 1024
	historyInFlightBytes = 64 << 20
	// historyAckWait: a write not acknowledged by then is counted dropped.
	historyAckWait = 5 * time.Second
)

// Headers of an event's history record.
const (
	hdrHistOutcome    = "Mux-History-Outcome"
	hdrHistType       = "Mux-History-Type"
	hdrHistID         = "Mux-History-Id"
	hdrHistObjectType = "Mux-History-Object-Type"
	hdrHistObjectID   = "Mux-History-Object-Id"
	hdrHistStatus     = "Mux-History-Status"
)

// HeaderReplay marks a replayed copy, and its delivery: the replay job's
// id.
const HeaderReplay = "Mux-Webhook-Replay"

// HistoryOutcomes are the outcomes history keeps: rejected requests are
// never written (a forger must not fill a disk).
var HistoryOutcomes = []string{"verified", "duplicate"}

// HistoryStream is the history's stream name for a queue's stream.
func HistoryStream(stream string) string { return stream + "_HISTORY" }

// HistoryConfig configures history.
type HistoryConfig struct {
	// MaxAge: records older than this go. Default: 7 days.
	MaxAge time.Duration
	// MaxBytes bounds the stream; the oldest records go first. Default: 1 GiB.
	MaxBytes int64
	// Instance names this gateway's per-minute summaries.
	Instance string
	// TypeMatcher makes the matcher of a type pattern: a replay job taken
	// up from the bucket filters as it did when it started.
	TypeMatcher func(pattern string) func(typ string) bool
	// OnDrop, if set, hears of each record that could not be written.
	OnDrop func()
	// Destination, if set, says why a replay job may not queue for a
	// destination (unknown, or without sign), or nil: checked when a job
	// starts and when a gateway takes one up.
	Destination func(name string) error
}

func (c HistoryConfig) withDefaults() HistoryConfig {
	if c.MaxAge == 0 {
		c.MaxAge = DefaultHistoryAge
	}
	if c.MaxBytes == 0 {
		c.MaxBytes = DefaultHistoryMaxBytes
	}
	if c.Instance == "" {
		c.Instance = "mux_webhook"
	}
	return c
}

// EventRecord is one verified event as history keeps it.
type EventRecord struct {
	Time                           time.Time
	Outcome                        string // "verified" or "duplicate"
	Type, ID, ObjectType, ObjectID string
	Status                         int // what the route answered
	Body                           []byte
}

// History writes and reads the history stream of one Store.
type History struct {
	s    *Store
	name string
	js   jetstream.JetStream // its own: async publishes with their own bounds
	log  *zap.Logger

	cfgMu sync.Mutex
	cfg   HistoryConfig

	queue    chan *nats.Msg
	queued   atomic.Int64 // bytes waiting in queue
	inFlight atomic.Int64 // bytes sent and not yet acknowledged
	dropped  atomic.Uint64
	// dropLogged is when drop last logged (Unix ns).
	dropLogged atomic.Int64
	written    atomic.Uint64
	ensuring   atomic.Bool // a missing stream is being made again

	minutes minutes // this gateway's summaries (history_stats.go)
	replays replays // running replay jobs (replay.go)

	stop    chan struct{}
	stopMu  sync.RWMutex // enqueue (read) against Close's close(stop) (write)
	stopped sync.Once
	wg      sync.WaitGroup
}

// OpenHistory makes sure the history stream exists with cfg's limits and
// starts its writer. Close stops it.
func (s *Store) OpenHistory(ctx context.Context, cfg HistoryConfig) (*History, error) {
	cfg = cfg.withDefaults()
	h := &History{s: s, name: HistoryStream(s.cfg.Stream), log: s.log, cfg: cfg,
		queue: make(chan *nats.Msg, historyBufferRecords), stop: make(chan struct{})}
	var err error
	h.js, err = jetstream.New(s.conn,
		jetstream.WithPublishAsyncMaxPending(historyInFlight),
		jetstream.WithPublishAsyncTimeout(historyAckWait),
		jetstream.WithPublishAsyncErrHandler(func(_ jetstream.JetStream, msg *nats.Msg, err error) {
			h.inFlight.Add(-recordSize(msg))
			h.drop()
			if noStream(err) {
				h.ensureLater()
			}
		}),
		jetstream.WithPublishAsyncAckHandler(func(_ jetstream.JetStream, msg *nats.Msg, _ *jetstream.PubAck) {
			h.inFlight.Add(-recordSize(msg))
		}))
	if err != nil {
		return nil, fmt.Errorf("queue: history: %v", err)
	}
	if err := retrySetup(ctx, func(ctx context.Context) error { return h.ensure(ctx) }); err != nil {
		return nil, fmt.Errorf("queue: creating stream %s (history): %v%s", h.name, err, roomHint(err))
	}
	h.minutes.init()
	h.wg.Add(3)
	go h.write()
	go h.flushMinutes()
	go h.adoptReplays()
	return h, nil
}

// streamConfig is the history stream's config for cfg.
func (h *History) streamConfig(cfg HistoryConfig) jetstream.StreamConfig {
	sc := jetstream.StreamConfig{
		Name:        h.name,
		Description: "mux_webhook history: verified events and delivery attempts",
		Subjects:    []string{h.name + ".>"},
		Storage:     jetstream.FileStorage,
		Retention:   jetstream.LimitsPolicy,
		Discard:     jetstream.DiscardOld, // full: the oldest records go
		MaxAge:      cfg.MaxAge,
		MaxBytes:    cfg.MaxBytes,
		Replicas:    h.s.cfg.Replicas,
		AllowDirect: true, // searches read with direct gets, from any replica
	}
	if sc.Replicas <= 1 {
		// No fsync per record: history must not slow the queue (the
		// embedded server fsyncs every write of the queue's streams).
		// Replicated streams cannot have this mode; their writes are
		// flushed asynchronously already, unless the servers set
		// sync_always.
		sc.PersistMode = jetstream.AsyncPersistMode
	}
	return sc
}

// ensure makes the stream, or applies the config's limits to it. On a
// shared NATS, the larger limits of the gateways win (applySharedStream's
// rule: none lowers what another needs).
func (h *History) ensure(ctx context.Context) error {
	want := h.streamConfig(h.config())
	st, err := h.s.js.Stream(ctx, h.name)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		_, err = h.s.js.CreateStream(ctx, want)
		if errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			return nil
		}
		return err
	}
	if err != nil {
		return err
	}
	running := st.CachedInfo().Config
	if h.s.shared() {
		want.MaxAge = max(want.MaxAge, running.MaxAge)
		want.MaxBytes = max(want.MaxBytes, running.MaxBytes)
		want.Replicas = max(want.Replicas, running.Replicas)
	}
	if running.MaxAge == want.MaxAge && running.MaxBytes == want.MaxBytes && running.Replicas == want.Replicas &&
		running.AllowDirect && running.PersistMode == want.PersistMode {
		return nil
	}
	want.PersistMode = running.PersistMode // cannot change once made
	_, err = h.s.js.UpdateStream(ctx, want)
	return err
}

// ensureLater makes a stream deleted by hand again, once at a time.
func (h *History) ensureLater() {
	if !h.ensuring.CompareAndSwap(false, true) {
		return
	}
	go func() {
		defer h.ensuring.Store(false)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err := h.s.js.Stream(ctx, h.name)
		missing := errors.Is(err, jetstream.ErrStreamNotFound)
		if err := h.ensure(ctx); err != nil {
			h.log.Warn("mux_webhook history: the history stream is missing and could not be made again; records are dropped (caddy_mux_webhook_history_dropped_total)",
				zap.String("stream", h.name), zap.Error(err))
		} else if missing {
			h.log.Warn("mux_webhook history: the history stream was gone (deleted by hand?); made it again, empty: the history before it is lost, and records written meanwhile were dropped (caddy_mux_webhook_history_dropped_total)",
				zap.String("stream", h.name))
		}
	}()
}

// Reconfigure applies a reloaded config's history and history_max_bytes.
func (h *History) Reconfigure(ctx context.Context, cfg HistoryConfig) error {
	cfg = cfg.withDefaults()
	h.cfgMu.Lock()
	h.cfg = cfg
	h.cfgMu.Unlock()
	if err := h.ensure(ctx); err != nil {
		return fmt.Errorf("queue: updating stream %s (history, history_max_bytes): %v%s", h.name, err, roomHint(err))
	}
	return nil
}

// matcher is pattern's type matcher (nil: none, or no pattern).
func (h *History) matcher(pattern string) func(string) bool {
	if pattern == "" || h.config().TypeMatcher == nil {
		return nil
	}
	return h.config().TypeMatcher(pattern)
}

func (h *History) config() HistoryConfig {
	h.cfgMu.Lock()
	defer h.cfgMu.Unlock()
	return h.cfg
}

// dropLogEvery: a WARN says that records are being dropped, at most this
// often (the metric counts each).
const dropLogEvery = time.Minute

// drop counts a record that could not be written, and says so in the log
// at most once a minute.
func (h *History) drop() {
	n := h.dropped.Add(1)
	if f := h.config().OnDrop; f != nil {
		f()
	}
	now := time.Now().UnixNano()
	if last := h.dropLogged.Load(); now-last >= int64(dropLogEvery) && h.dropLogged.CompareAndSwap(last, now) {
		h.log.Warn("mux_webhook history: records could not be written (buffer full, store away or refusing); the events were answered as without history",
			zap.String("stream", h.name), zap.Uint64("dropped_since_open", n))
	}
}

// Dropped is how many records could not be written since the history was
// opened.
func (h *History) Dropped() uint64 { return h.dropped.Load() }

// Written is how many records the store acknowledged or were sent.
func (h *History) Written() uint64 { return h.written.Load() }

// RecordEvent keeps a verified event. It never blocks: without room in
// the buffer, the record is dropped and counted. The body is kept as
// given and must not change afterwards.
func (h *History) RecordEvent(r EventRecord) {
	if h == nil {
		return
	}
	h.minutes.event(r.Time, r.Outcome)
	msg := nats.NewMsg(h.eventSubject(r))
	msg.Data = r.Body
	hdr := msg.Header
	hdr.Set(hdrHistOutcome, r.Outcome)
	hdr.Set(hdrHistType, headerSafe(r.Type))
	hdr.Set(hdrHistID, headerSafe(r.ID))
	if r.ObjectType != "" {
		hdr.Set(hdrHistObjectType, headerSafe(r.ObjectType))
	}
	if r.ObjectID != "" {
		hdr.Set(hdrHistObjectID, headerSafe(r.ObjectID))
	}
	hdr.Set(hdrHistStatus, strconv.Itoa(r.Status))
	h.enqueue(msg)
}

// AttemptRecord is one delivery attempt as history keeps it (JSON).
type AttemptRecord struct {
	Destination string    `json:"destination"`
	Attempt     int       `json:"attempt"`
	Status      int       `json:"status"`
	DurationMS  float64   `json:"duration_ms"`
	Result      string    `json:"result"`
	Error       string    `json:"error"`            // "" when none
	Replay      string    `json:"replay,omitempty"` // the replay job of a replayed copy
	Time        time.Time `json:"time"`
}

// RecordAttempt keeps a delivery attempt, like RecordEvent.
func (h *History) RecordAttempt(a Attempt) {
	if h == nil {
		return
	}
	now := time.Now()
	h.minutes.attempt(now, a)
	r := AttemptRecord{Destination: a.Destination, Attempt: a.Number, Status: a.Status, Result: a.Result,
		DurationMS: float64(a.Duration.Microseconds()) / 1000, Replay: a.Replay, Time: now.UTC()}
	if a.Err != nil {
		r.Error = truncateText(a.Err.Error(), maxErrorText)
	}
	data, _ := json.Marshal(r)
	msg := nats.NewMsg(h.name + ".a." + idToken(a.EventID))
	msg.Data = data
	h.enqueue(msg)
}

// recordSize is what a record holds in memory: the buffer its body
// shares (a chunked body's may be larger than the body), its subject and
// headers.
func recordSize(msg *nats.Msg) int64 {
	n := cap(msg.Data) + len(msg.Subject) + 64
	for k, vs := range msg.Header {
		for _, v := range vs {
			n += len(k) + len(v) + 4
		}
	}
	return int64(n)
}

// enqueue hands msg to the writer, or drops it (and after Close).
func (h *History) enqueue(msg *nats.Msg) {
	h.stopMu.RLock()
	defer h.stopMu.RUnlock()
	select {
	case <-h.stop:
		h.drop()
		return
	default:
	}
	size := recordSize(msg)
	if h.queued.Add(size) > historyBufferBytes {
		h.queued.Add(-size)
		h.drop()
		return
	}
	select {
	case h.queue <- msg:
	default:
		h.queued.Add(-size)
		h.drop()
	}
}

// write sends the buffered records as async publishes, at most
// historyInFlight unacknowledged; failures are counted by the error
// handler.
func (h *History) write() {
	defer h.wg.Done()
	for {
		select {
		case <-h.stop:
			return
		case msg := <-h.queue:
			size := recordSize(msg)
			h.queued.Add(-size)
			if h.s.server != nil && h.s.Down() != nil {
				h.drop() // the embedded store refuses writes (a full disk)
				continue
			}
			// Writes in flight are bounded by bytes too: each is held
			// until its acknowledgement.
			for h.inFlight.Load() > historyInFlightBytes {
				select {
				case <-h.stop:
					h.drop()
					return
				case <-time.After(time.Millisecond):
				}
			}
			h.inFlight.Add(size)
			if _, err := h.js.PublishMsgAsync(msg); err != nil {
				h.inFlight.Add(-size)
				h.drop()
				continue
			}
			h.written.Add(1)
		}
	}
}

// Close stops the writer (what waits in its buffer is not written, and
// counted as dropped) and the replay jobs of this process, after a last
// minute's summary.
func (h *History) Close() {
	if h == nil {
		return
	}
	h.stopped.Do(func() {
		h.stopMu.Lock()
		close(h.stop)
		h.stopMu.Unlock()
		h.replays.stopAll()
		h.wg.Wait()
		for range len(h.queue) { // not written: counted
			<-h.queue
			h.drop()
		}
		h.flushMinute(true)
		select {
		case <-h.js.PublishAsyncComplete():
		case <-time.After(2 * time.Second):
		}
		// Its reply subscription on the store's shared connection goes;
		// writes still unacknowledged are counted by the error handler.
		h.js.CleanupPublisher()
	})
}

// eventSubject is the subject of an event's record.
func (h *History) eventSubject(r EventRecord) string {
	var b strings.Builder
	b.Grow(len(h.name) + 64 + len(r.Type))
	b.WriteString(h.name)
	b.WriteString(".e.")
	b.WriteString(r.Outcome)
	b.WriteByte('.')
	b.WriteString(objectToken(r.ObjectID))
	b.WriteByte('.')
	b.WriteString(idToken(r.ID))
	b.WriteByte('.')
	b.WriteString(typeTokens(headerSafe(r.Type)))
	return b.String()
}

// objectToken is an object id's subject token.
func objectToken(objectID string) string {
	if objectID == "" {
		return "-"
	}
	return "o" + hash16(headerSafe(objectID))
}

// idToken is an event id's subject token (of the id as a header keeps it).
func idToken(id string) string { return "i" + hash16(headerSafe(id)) }

func hash16(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:8])
}

// typeToken is what a type's dotted token may be to stand in a subject as
// it is; a type with another token stands as "x" and a hash.
var typeToken = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// typeTokens is a type's subject tokens: its own where they can stand in
// a subject, "x" and a hash of the token where one cannot (an empty one,
// a space, a wildcard), and beyond 16 tokens "x" and a hash of the rest:
// a glob's literal leading tokens stay a prefix of the subject.
func typeTokens(typ string) string {
	tokens := strings.Split(typ, ".")
	if len(tokens) > 16 {
		tokens = append(tokens[:15], "x"+hash16(strings.Join(tokens[15:], ".")))
	}
	for i, t := range tokens {
		if !typeToken.MatchString(t) {
			tokens[i] = "x" + hash16(t)
		}
	}
	return strings.Join(tokens, ".")
}

// headerSafe is a value as a NATS header keeps it: line breaks become
// spaces, and the ends are trimmed. Ids are hashed in this form, so that
// an attempt (whose id went through a copy's header) finds its event.
func headerSafe(v string) string {
	if strings.ContainsAny(v, "\r\n") {
		v = strings.NewReplacer("\r", " ", "\n", " ").Replace(v)
	}
	return strings.TrimSpace(v)
}

func truncateText(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}
