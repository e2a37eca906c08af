// Package queue is the delivery queue of mux_deliver: verified events,
// stored durably on NATS JetStream, one copy per destination, before
// mux_deliver answers 202.
//
// This file holds the store: an embedded JetStream server (in-process,
// no port opened, every write fsynced before it is acknowledged) or an
// external NATS server, the stream, and Enqueue with its dedupe window.
// It knows nothing of Caddy: the Caddy glue stays in the plugin package.
//
// The other files: deliver.go, the delivery workers and their
// supervisor; sweep.go, settled copies leaving the stream; dead.go, dead
// letters in <stream>_DEAD; health.go, the store healing itself (a full
// disk, nats-server's log, Down); watchdog.go, stalls; generation.go,
// acks of consumers since deleted; handback.go, copies handed back
// unattempted; lock.go, the store directory's lock; idempotency.go, the
// Idempotency-Key.
package queue

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
)

// Defaults, as the README's "Every setting" documents them.
const (
	DefaultStream         = "MUX_WEBHOOK"
	DefaultMaxBytes       = 1 << 30 // 1 GiB
	DefaultDedupeWindow   = 24 * time.Hour
	DefaultEnqueueTimeout = 2 * time.Second
	DefaultMaxBody        = 1 << 20 // mux_webhook's default max_body
)

// The queue's message limit. A copy is the event's body and headers (Mux's
// signature, the id and type, the Idempotency-Key when the id needs
// encoding); its dead letter adds the last error (at most 512 bytes), the
// attempts and the time. MaxEvent is the largest body mux_webhook accepts
// (its max_body may be up to 16 MiB); HeaderRoom is what the headers may
// take on top: generous, an event's id and type are a few dozen bytes.
const (
	MaxEvent   = 16 << 20
	HeaderRoom = 64 << 10
	// embeddedMaxPayload is the embedded server's max_payload: any event
	// mux_webhook accepts, and its dead letter, fit. (NATS's default, 1
	// MiB, refused events near max_body's default for ever.) Above 8 MiB
	// nats-server warns that large payloads are "generally discouraged":
	// it holds each message in memory while it is sent; ours are stored
	// once and delivered one by one per worker.
	embeddedMaxPayload = MaxEvent + HeaderRoom
)

// ErrFull is returned by Enqueue when the stream holds max_bytes: stored
// events are never dropped to make room, so the new one is refused.
var ErrFull = errors.New("the delivery queue is full (max_bytes)")

// Config configures the store.
type Config struct {
	// Dir is the embedded server's store directory. Required without URLs.
	Dir string
	// URLs, if set, connect to an external NATS server or cluster instead
	// of starting the embedded one.
	URLs []string
	// Credentials for the external server: a creds file, or user and
	// password, or a token.
	Creds, User, Password, Token string
	// TLSCA is a PEM file of the CA that signed the servers' certificates
	// (else the system's roots, for tls:// URLs); TLSCert and TLSKey are a
	// client certificate, for servers that verify clients. Either turns
	// TLS on.
	TLSCA, TLSCert, TLSKey string
	// Name names this process's connection to the external server (shown
	// by the server's monitoring, e.g. `nats server report connections`).
	// Default: mux_webhook.
	Name string
	// Replicas of the stream on an external cluster. Default: 1.
	Replicas int
	// Stream is the JetStream stream's name. Default: MUX_WEBHOOK.
	Stream string
	// MaxBytes bounds the queue's streams together (split evenly over the
	// partitions). Default: 1 GiB.
	MaxBytes int64
	// Partitions is how many streams the queue spreads copies over
	// (partition.go). Default: 4 on the embedded server, 1 with URLs.
	Partitions int
	// MaxBody is the largest event body the queue must take (the largest
	// max_body of the mux_webhook handlers feeding it). An external
	// server whose max_payload cannot hold it and its headers
	// (HeaderRoom) is an error. Default: 1 MiB.
	MaxBody int64
	// DedupeWindow: an event id is stored once per destination within it.
	// Default: 24h.
	DedupeWindow time.Duration
	// Logger receives the queue's own log lines and the embedded NATS
	// server's warnings and errors. Nil: none.
	Logger *zap.Logger
	// PasswordFunc and TokenFunc, if set, are asked at each connection to
	// the external server instead of Password and Token: a secret rotated
	// in its file is used at the next reconnection, without a reload.
	PasswordFunc, TokenFunc func() string
	// HandBacks is the ledger of deliveries handed back unattempted
	// (handback.go): give every Store opened on one stream the same one,
	// so that a reload that opens another (new credentials) still counts
	// what the old one's workers handed back. Nil: a ledger of its own.
	HandBacks *HandBacks

	// healPause, if set, runs just before heal starts the embedded
	// server again: tests widen that moment.
	healPause func()
	// DeadMaxBytes bounds <Stream>_DEAD, the dead letters' own stream
	// (dead.go). Default: 1 GiB.
	DeadMaxBytes int64
}

// Message is one queued copy of a verified event for one destination.
type Message struct {
	// Destination is the configured destination's name.
	Destination string
	// EventID is the event's id as sent (its JSON); with Destination it
	// keys the dedupe window.
	EventID []byte
	// ObjectID is the event's object.id: the copies of one object land in
	// one partition, on one subject (Key), in the order they were stored.
	// Empty: the event id picks the partition.
	ObjectID string
	// ID and Type are the event's id and type as text: Idempotency-Key,
	// logs and dead letters show them.
	ID, Type string
	// Body is the verified body, byte for byte.
	Body []byte
	// Header holds what delivery needs besides the body (e.g. Mux's
	// original Mux-Signature, the event type and id for logs).
	Header map[string]string
}

// Store is the durable queue.
type Store struct {
	cfgMu  sync.Mutex // guards cfg's stream settings, which Reconfigure changes
	cfg    Config
	server *embedded // nil with an external NATS
	lock   *dirLock  // the embedded server's store directory, held
	conn   *nats.Conn
	js     jetstream.JetStream
	// parts are the configured partitions, where new copies go;
	// Reconfigure replaces them. legacy is the single stream of earlier
	// versions, drained (nil: none). partsCache lists the other streams
	// to drain (partition.go).
	parts      atomic.Pointer[[]*part]
	legacy     *part
	partsCache partsCache

	handBacks *HandBacks // deliveries handed back without an attempt, per copy of the stream

	controlMu sync.Mutex
	controlKV jetstream.KeyValue // the pauses' bucket, once opened (control.go)

	attemptsMu sync.Mutex
	attempts   jetstream.KeyValue // the counted attempts' bucket, once opened (attempts.go)
	// attemptsWarned is when a failure of that bucket was last logged.
	attemptsWarned time.Time
	// sweepGrace: a settled copy above the ack floor is deleted on its own
	// once it waited this long for the floor (sweep.go).
	sweepGrace time.Duration

	log     *zap.Logger
	natsLog *natsLog      // the embedded server's log, with its latest error
	done    chan struct{} // closed by Close: ends heal
	healed  chan struct{} // closed when heal returned (embedded only)
	moved   chan struct{} // closed when moving old dead letters ended

	unsweptMu sync.Mutex
	unswept   map[string]unswept // per subject: settled copies stopped workers could not delete

	dead deadLetters // <stream>_DEAD and the copies that could not be buried (dead.go)

	heldMu    sync.Mutex
	heldCount map[string]heldCount // per destination, the latest count of held copies
}

var streamName = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// partitionSuffix matches a partition's stream name (partName).
var partitionSuffix = regexp.MustCompile(`^(.+)_[0-9]+$`)

// destinationName is what a destination's name may be: it becomes a
// subject token.
var destinationName = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// ValidStream says what is wrong with a stream name, if anything: a name
// ending in _DEAD would be another stream's dead letters (DeadStream).
func ValidStream(name string) error {
	if !streamName.MatchString(name) {
		return fmt.Errorf("queue: stream name %q: use letters, digits, _ and - only", name)
	}
	if strings.HasSuffix(name, "_DEAD") {
		return fmt.Errorf("queue: stream name %q: a name ending in _DEAD is the dead letters' stream of %s: choose another", name, strings.TrimSuffix(name, "_DEAD"))
	}
	if strings.HasSuffix(name, "_HISTORY") {
		return fmt.Errorf("queue: stream name %q: a name ending in _HISTORY is the history's stream of %s: choose another", name, strings.TrimSuffix(name, "_HISTORY"))
	}
	if m := partitionSuffix.FindStringSubmatch(name); m != nil {
		return fmt.Errorf("queue: stream name %q: a name ending in _<digits> is a partition of the stream %s: choose another", name, m[1])
	}
	return nil
}

// ValidDestination reports whether name can name a destination.
func ValidDestination(name string) bool { return destinationName.MatchString(name) }

// withDefaults fills in the defaults.
func withDefaults(cfg Config) Config {
	if cfg.Stream == "" {
		cfg.Stream = DefaultStream
	}
	if cfg.MaxBytes == 0 {
		cfg.MaxBytes = DefaultMaxBytes
	}
	if cfg.DedupeWindow == 0 {
		cfg.DedupeWindow = DefaultDedupeWindow
	}
	if cfg.Replicas == 0 {
		cfg.Replicas = 1
	}
	if cfg.MaxBody == 0 {
		cfg.MaxBody = DefaultMaxBody
	}
	if cfg.Partitions == 0 {
		cfg.Partitions = DefaultPartitions
		if len(cfg.URLs) > 0 {
			cfg.Partitions = DefaultExternalPartitions
		}
	}
	return cfg
}

// Open starts (or connects to) the server and makes sure the stream
// exists with the configured limits.
func Open(ctx context.Context, cfg Config) (*Store, error) {
	return open(ctx, cfg, true)
}

// open is Open; benchmarks turn syncAlways off to tell JetStream's own
// cost from the fsync's.
func open(ctx context.Context, cfg Config, syncAlways bool) (*Store, error) {
	cfg = withDefaults(cfg)
	if err := ValidStream(cfg.Stream); err != nil {
		return nil, err
	}
	if cfg.Partitions < 1 || cfg.Partitions > MaxPartitions {
		return nil, fmt.Errorf("queue: partitions %d: use 1 to %d", cfg.Partitions, MaxPartitions)
	}
	s := &Store{cfg: cfg, handBacks: cfg.HandBacks, log: cfg.Logger, done: make(chan struct{}), sweepGrace: defaultSweepGrace}
	if s.handBacks == nil {
		s.handBacks = NewHandBacks()
	}
	if s.log == nil {
		s.log = zap.NewNop()
	}
	var err error
	if len(cfg.URLs) == 0 {
		if cfg.Dir == "" {
			return nil, errors.New("queue: the embedded server needs a store directory")
		}
		// The directory's lock first: a second server on it must not
		// start, recover or write anything.
		if s.lock, err = lockDir(cfg.Dir); err != nil {
			return nil, err
		}
		s.natsLog = &natsLog{log: s.log.Named("nats")}
		s.server = &embedded{log: s.natsLog, opts: func() *server.Options {
			return &server.Options{
				ServerName: "mux_webhook",
				JetStream:  true,
				StoreDir:   cfg.Dir,
				DontListen: true,       // in-process connections only: no port
				SyncAlways: syncAlways, // fsync before every acknowledgement
				MaxPayload: embeddedMaxPayload,
				NoSigs:     true,
			}
		}}
		if err = s.server.start(); err != nil {
			s.lock.release()
			return nil, err
		}
		// Through s.server, whichever server runs: when heal starts a new
		// one, the connection reconnects to it.
		s.conn, err = nats.Connect("", nats.InProcessServer(s.server), nats.Name("mux_webhook"),
			nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	} else {
		name := "mux_webhook"
		if cfg.Name != "" {
			name = cfg.Name
		}
		// Never given up: not after an auth error twice (an expired creds
		// file or a password rotated on the server first, fixed later),
		// not after any number of failed reconnections. While it is away,
		// mux_deliver answers 503 and Down says why.
		opts := []nats.Option{nats.Name(name), nats.MaxReconnects(-1), nats.IgnoreAuthErrorAbort(),
			nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
				if err != nil {
					s.log.Error("mux_webhook queue: disconnected from NATS; reconnecting", zap.Error(err))
				}
			}),
			nats.ReconnectHandler(func(*nats.Conn) { s.log.Info("mux_webhook queue: reconnected to NATS") }),
			nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
				s.log.Warn("mux_webhook queue: NATS", zap.Error(err))
			}),
		}
		if cfg.TLSCA != "" {
			opts = append(opts, nats.RootCAs(cfg.TLSCA))
		}
		if cfg.TLSCert != "" || cfg.TLSKey != "" {
			opts = append(opts, nats.ClientCert(cfg.TLSCert, cfg.TLSKey))
		}
		switch {
		case cfg.Creds != "":
			opts = append(opts, nats.UserCredentials(cfg.Creds))
		case cfg.User != "" && cfg.PasswordFunc != nil:
			user, password := cfg.User, cfg.PasswordFunc
			opts = append(opts, nats.UserInfoHandler(func() (string, string) { return user, password() }))
		case cfg.User != "":
			opts = append(opts, nats.UserInfo(cfg.User, cfg.Password))
		case cfg.TokenFunc != nil:
			opts = append(opts, nats.TokenHandler(cfg.TokenFunc))
		case cfg.Token != "":
			opts = append(opts, nats.Token(cfg.Token))
		}
		s.conn, err = nats.Connect(strings.Join(cfg.URLs, ","), opts...)
	}
	if err != nil {
		s.Close()
		if _, ok := errors.AsType[*url.Error](err); ok {
			// Not err: it quotes the URL, password included.
			return nil, errors.New("queue: connecting to NATS: a server URL is not a valid URL: check its port, and write a % in its user or password as %25 (or use the nats block's user and password)")
		}
		return nil, fmt.Errorf("queue: connecting to NATS: %v", err)
	}
	if err := s.checkMaxPayload(cfg); err != nil {
		s.Close()
		return nil, err
	}
	if s.js, err = jetstream.New(s.conn); err != nil {
		s.Close()
		return nil, fmt.Errorf("queue: JetStream: %v", err)
	}
	if err := s.openParts(ctx, cfg); err != nil {
		s.Close()
		return nil, err
	}
	if s.server != nil {
		s.healed = make(chan struct{})
		go func() {
			defer close(s.healed)
			s.heal(s.done)
		}()
	}
	return s.openDead(ctx)
}

// Reconfigure applies a reloaded config's max_bytes, dedupe_window,
// replicas and partitions to the open store's streams (on external NATS,
// shared streams: none is lowered, see applySharedStream). Partitions no
// longer configured are drained, not deleted; new copies go to the new
// ones. The stream itself (its name, the server or directory) cannot
// change while events are queued in it: that is an error saying what to
// do.
func (s *Store) Reconfigure(ctx context.Context, cfg Config) error {
	cfg = withDefaults(cfg)
	if cfg.Stream != s.cfg.Stream {
		return fmt.Errorf("queue: the stream is %s in the running Caddy; a reload cannot rename it (its queued events would wait forever): keep stream %s, or give the new stream its own dir", s.cfg.Stream, s.cfg.Stream)
	}
	if cfg.Partitions < 1 || cfg.Partitions > MaxPartitions {
		return fmt.Errorf("queue: partitions %d: use 1 to %d", cfg.Partitions, MaxPartitions)
	}
	if err := s.checkMaxPayload(cfg); err != nil {
		return err
	}
	if err := s.reconfigureDead(ctx, cfg); err != nil {
		return err
	}
	if cur := s.config(); cfg.MaxBytes == cur.MaxBytes && cfg.DedupeWindow == cur.DedupeWindow && cfg.Replicas == cur.Replicas && cfg.Partitions == cur.Partitions {
		return nil
	}
	parts := make([]*part, cfg.Partitions)
	for i := range parts {
		st, err := s.makePart(ctx, partConfig(cfg, i))
		if err != nil {
			return fmt.Errorf("queue: updating stream %s (max_bytes, dedupe_window, replicas, partitions): %v%s", partName(cfg.Stream, i), err, roomHint(err))
		}
		parts[i] = &part{name: partName(cfg.Stream, i), stream: st}
	}
	s.cfgMu.Lock()
	s.cfg.MaxBytes, s.cfg.DedupeWindow, s.cfg.Replicas, s.cfg.Partitions = cfg.MaxBytes, cfg.DedupeWindow, cfg.Replicas, cfg.Partitions
	s.cfgMu.Unlock()
	s.parts.Store(&parts)
	s.partsCache.mu.Lock()
	s.partsCache.at = time.Time{} // fewer partitions: list the others now, to drain them
	s.partsCache.mu.Unlock()
	return nil
}

// shared reports whether the stream is on external NATS, where other
// gateways, with configs of their own, may share it. The embedded store
// has one owner (its directory is locked), whose config is the stream's.
func (s *Store) shared() bool { return len(s.cfg.URLs) > 0 }

// applySharedStream makes sure a shared stream (a partition, or
// <stream>_DEAD) exists and holds what want, this gateway's config, needs,
// without taking from other gateways what theirs need: replicas,
// max_bytes and dedupe_window are never lowered (the running stream's
// larger value is kept) and raised if want asks for more. Each setting
// that differs is logged at WARN, configured and running value: the
// gateways' configs should agree. (Last writer wins would let one
// gateway started without `replicas 3` scale the stream down to one
// copy, or one smaller max_bytes make every gateway answer 503.)
func (s *Store) applySharedStream(ctx context.Context, want jetstream.StreamConfig) (jetstream.Stream, error) {
	st, err := s.js.Stream(ctx, want.Name)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		st, err = s.js.CreateStream(ctx, want)
		if !errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			return st, err
		}
		st, err = s.js.Stream(ctx, want.Name) // another gateway made it meanwhile
	}
	if err != nil {
		return nil, err
	}
	running := st.CachedInfo().Config
	merged, changed := s.mergeShared(running, want)
	if !changed {
		return st, nil
	}
	return s.js.UpdateStream(ctx, merged)
}

// mergeShared is want with running's larger replicas, max_bytes and
// dedupe_window kept, and whether it differs from running; it logs each
// setting that differs.
func (s *Store) mergeShared(running, want jetstream.StreamConfig) (jetstream.StreamConfig, bool) {
	merged := want
	changed := !slices.Equal(running.Subjects, want.Subjects) || running.Discard != want.Discard
	setting := func(name string, configured, current int64, show func(int64) string, keep func(int64)) {
		switch {
		case configured < current:
			keep(current)
			s.log.Warn("queue: this config's "+name+" is lower than the shared stream's; the stream keeps its own (a gateway never lowers it): give every gateway the same setting",
				zap.String("stream", want.Name), zap.String("setting", name), zap.String("configured", show(configured)), zap.String("running", show(current)))
		case configured > current:
			changed = true
			s.log.Warn("queue: this config's "+name+" is higher than the shared stream's; raising the stream's: give every gateway the same setting",
				zap.String("stream", want.Name), zap.String("setting", name), zap.String("configured", show(configured)), zap.String("running", show(current)))
		}
	}
	num := func(n int64) string { return strconv.FormatInt(n, 10) }
	setting("replicas", int64(want.Replicas), int64(running.Replicas), num, func(n int64) { merged.Replicas = int(n) })
	maxBytes := "max_bytes"
	if want.Name == DeadStream(s.cfg.Stream) {
		maxBytes = "dead_max_bytes"
	}
	setting(maxBytes, want.MaxBytes, running.MaxBytes, num, func(n int64) { merged.MaxBytes = n })
	setting("dedupe_window", int64(want.Duplicates), int64(running.Duplicates),
		func(n int64) string { return time.Duration(n).String() }, func(n int64) { merged.Duplicates = time.Duration(n) })
	return merged, changed
}

// checkMaxPayload makes sure the server takes the largest event cfg may
// queue, with its headers: else such an event would be answered 503 on
// every retry, and a copy near the limit could never be a dead letter.
func (s *Store) checkMaxPayload(cfg Config) error {
	need := cfg.MaxBody + HeaderRoom
	if mp := s.conn.MaxPayload(); mp > 0 && mp < need {
		return fmt.Errorf("queue: the NATS server's max_payload is %d bytes; max_body %d needs at least %d (max_body plus %d for headers): raise max_payload in the NATS servers' config (max_payload: %d), or lower max_body",
			mp, cfg.MaxBody, need, HeaderRoom, need)
	}
	return nil
}

// Queued returns, per destination name, how many copies the stream holds
// for it (dead letters apart): also for destinations no longer
// configured, whose copies wait until one is configured again.
func (s *Store) Queued(ctx context.Context) (map[string]uint64, error) {
	out := map[string]uint64{}
	for _, p := range s.drained(ctx) {
		filter := p.name + ".deliver.*.*"
		if p.legacy {
			filter = p.name + ".deliver.*"
		}
		_, subjects, err := subjectTotal(ctx, p, filter)
		if err != nil {
			if p.legacy && errors.Is(err, jetstream.ErrStreamNotFound) {
				continue // deleted by hand: nothing left to count
			}
			return nil, err
		}
		for subject, n := range subjects {
			out[p.destinationOf(subject)] += n
		}
	}
	return out, nil
}

// subjectCounts returns, per destination, how many messages stream holds
// on the subjects prefix<destination>.
func subjectCounts(ctx context.Context, stream jetstream.Stream, prefix string) (map[string]uint64, error) {
	info, err := stream.Info(ctx, jetstream.WithSubjectFilter(prefix+"*"))
	if err != nil {
		return nil, err
	}
	out := map[string]uint64{}
	for subject, n := range info.State.Subjects {
		out[strings.TrimPrefix(subject, prefix)] = n
	}
	return out, nil
}

// setupTimeout bounds how long Open and StartWorkers try to create the stream
// and the consumers: on a cluster, a node may have just died and its
// leaderships be up for election (NATS takes seconds), which must not
// stop a Caddy instance that starts meanwhile.
const setupTimeout = 30 * time.Second

// retrySetup calls f, each time with up to 5s, until it succeeds, fails
// for good, ctx ends or setupTimeout has passed.
func retrySetup(ctx context.Context, f func(context.Context) error) error {
	deadline := time.Now().Add(setupTimeout)
	for {
		tctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err := f(tctx)
		cancel()
		if err == nil || !transient(err) || ctx.Err() != nil || time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// transient reports whether a JetStream API call failed in a way that
// passes by itself: no answer in time (an election), the cluster
// answering that it is temporarily unavailable, or a consumer without a
// leader yet. A server without JetStream is not.
func transient(err error) bool {
	if errors.Is(err, errNoLeader) {
		return true
	}
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) {
		return apiErr.Code == 503 && apiErr.ErrorCode != jetstream.JSErrCodeJetStreamNotEnabled &&
			apiErr.ErrorCode != jetstream.JSErrCodeJetStreamNotEnabledForAccount
	}
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout)
}

// Enqueue stores one copy of an event for one destination and returns once
// the server acknowledged it as stored (on the embedded server: fsynced).
// A copy with the same destination and event id within the dedupe window
// is acknowledged without being stored again; duplicate reports it.
func (s *Store) Enqueue(ctx context.Context, m Message) (duplicate bool, err error) {
	if !ValidDestination(m.Destination) {
		return false, fmt.Errorf("queue: destination name %q: use letters, digits, _ and - only", m.Destination)
	}
	if s.server != nil {
		// The embedded store refuses writes (a full disk): no answer would
		// come before ctx ends; Mux is told at once.
		if down := s.Down(); down != nil {
			return false, fmt.Errorf("queue: not stored: %w", down)
		}
	}
	key := Key(m.ObjectID, m.EventID)
	parts := s.configured()
	p := parts[partitionOf(key, len(parts))]
	msg := nats.NewMsg(p.subject(m.Destination, key))
	msg.Data = m.Body
	for k, v := range m.Header {
		msg.Header.Set(k, v)
	}
	msg.Header.Set(HeaderEventID, m.ID)
	msg.Header.Set(HeaderEventType, m.Type)
	msg.Header.Set(HeaderKey, key)
	if ik := IdempotencyKey(m.ID); ik != m.ID {
		// NATS headers turn line breaks into spaces and trim the ends:
		// the key is kept as delivery sends it.
		msg.Header.Set(headerIdempotencyKey, ik)
	}
	msg.Header.Set(jetstream.MsgIDHeader, dedupeID(m.Destination, m.EventID))
	for {
		ack, err := s.js.PublishMsg(ctx, msg)
		if err != nil && noStream(err) && s.Down() == nil {
			// No stream takes the subject: it was deleted (by hand, or to
			// restore a backup). It is made again, and the copy stored in
			// it.
			if s.ensurePart(ctx, p) == nil {
				ack, err = s.js.PublishMsg(ctx, msg)
			}
		}
		if err == nil {
			return ack.Duplicate, nil
		}
		if isFull(err) {
			return false, ErrFull
		}
		if !inProcess(err) {
			if down := s.Down(); down != nil {
				return false, fmt.Errorf("queue: not stored: %w", down)
			}
			return false, fmt.Errorf("queue: not stored: %w", err)
		}
		// The same copy, sent by another gateway at the same instant, is
		// being stored (a cluster's proposal): publishing again gets the
		// verdict, stored (a duplicate) or not (then this one is).
		select {
		case <-ctx.Done():
			return false, fmt.Errorf("queue: not stored: %w", err)
		case <-time.After(inProcessBackoff):
		}
	}
}

// duplicateInProcess is JetStream's error code for a message whose id is
// being stored by another publish at that moment
// (JSStreamDuplicateMessageConflict, "duplicate message id is in
// process"): on a cluster, until that proposal is applied.
const duplicateInProcess = 10158

// inProcessBackoff is how long Enqueue waits before it publishes again a
// copy another publish is storing (a cluster's proposal takes a few ms).
const inProcessBackoff = 25 * time.Millisecond

// inProcess recognises the answer "duplicate message id is in process".
func inProcess(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) && apiErr.ErrorCode == duplicateInProcess
}

// noStream reports whether a publish found no stream for its subject.
func noStream(err error) bool {
	return errors.Is(err, jetstream.ErrNoStreamResponse) || errors.Is(err, nats.ErrNoResponders) ||
		errors.Is(err, jetstream.ErrStreamNotFound)
}

// config is the store's config as the latest Reconfigure left it.
func (s *Store) config() Config {
	s.cfgMu.Lock()
	defer s.cfgMu.Unlock()
	return s.cfg
}

// insufficientResources is JetStream's error code for a stream whose
// max_bytes it cannot reserve (JSInsufficientResourcesErr).
const insufficientResources = 10047

// NoRoom reports whether err is the store's disk being full: JetStream
// could not reserve a stream's bytes, or a write found no space. That
// passes once space is freed.
func NoRoom(err error) bool {
	var apiErr *jetstream.APIError
	return err != nil && (errors.As(err, &apiErr) && apiErr.ErrorCode == insufficientResources ||
		strings.Contains(err.Error(), "no space left on device") || strings.Contains(err.Error(), "insufficient storage resources"))
}

// roomHint says what to change when JetStream cannot reserve a stream's
// bytes: both streams reserve their whole bound on the store's disk.
func roomHint(err error) string {
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) && apiErr.ErrorCode == insufficientResources {
		return ": the store has less room than max_bytes + dead_max_bytes (JetStream reserves both): lower them, or give the store more room"
	}
	return ""
}

// storeFailed is JetStream's error code for a message it could not store
// (JSStreamStoreFailedF), which with DiscardNew includes a full stream.
const storeFailed = 10077

// isFull recognises the server's refusal of a message that would take the
// stream over max_bytes.
func isFull(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) && apiErr.ErrorCode == storeFailed &&
		strings.Contains(apiErr.Description, "maximum bytes")
}

// dedupeID keys the dedupe window: the destination and a hash of the
// event id as sent (fixed length, any bytes).
func dedupeID(destination string, eventID []byte) string {
	sum := sha256.Sum256(eventID)
	return destination + ":" + hex.EncodeToString(sum[:])
}

// Pending returns how many copies are stored for destination, in every
// stream of the queue.
func (s *Store) Pending(ctx context.Context, destination string) (uint64, error) {
	var total uint64
	for _, p := range s.drained(ctx) {
		n, _, err := subjectTotal(ctx, p, p.filter(destination))
		if err != nil {
			if p.legacy && errors.Is(err, jetstream.ErrStreamNotFound) {
				continue
			}
			return 0, err
		}
		total += n
	}
	return total, nil
}

// Close drains the connection and shuts the embedded server down.
func (s *Store) Close() {
	if s.done != nil {
		select {
		case <-s.done:
		default:
			close(s.done)
		}
	}
	if s.moved != nil {
		<-s.moved // moving dead letters of an earlier version: ends with done
	}
	if s.healed != nil {
		// heal, if it is starting JetStream again, must be done before the
		// server shuts down and the directory's lock is released: else it
		// could recover and write the store after the next owner took it.
		<-s.healed
	}
	if s.conn != nil {
		s.conn.Close()
	}
	if s.server != nil {
		s.server.shutdown()
	}
	s.lock.release() // after the server: it wrote its last
}
