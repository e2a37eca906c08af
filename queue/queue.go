// Package queue is the delivery queue of mux_deliver: verified events,
// stored durably on NATS JetStream, one copy per destination, before
// mux_deliver answers 202.
//
// This file holds the store: an embedded JetStream server (in-process,
// no port opened, every write fsynced before it is acknowledged) or an
// external NATS server, the stream, and Enqueue with its dedupe window.
// It knows nothing of Caddy: the Caddy glue stays in the plugin package.
//
// deliver.go holds the delivery workers and dead letters.
package queue

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Defaults, as SPEC's "Delivery queue" section documents them.
const (
	DefaultStream         = "MUX_WEBHOOK"
	DefaultMaxBytes       = 1 << 30 // 1 GiB
	DefaultDedupeWindow   = 24 * time.Hour
	DefaultEnqueueTimeout = 2 * time.Second
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
	// MaxBytes bounds the stream. Default: 1 GiB.
	MaxBytes int64
	// DedupeWindow: an event id is stored once per destination within it.
	// Default: 24h.
	DedupeWindow time.Duration
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
	cfg    Config
	server *server.Server // nil with an external NATS
	conn   *nats.Conn
	js     jetstream.JetStream
	stream jetstream.Stream // the stream's handle: its methods name it, no lookup each time

	handBacks *handBacks // deliveries handed back without an attempt, per copy of the stream

	unsweptMu sync.Mutex
	unswept   map[string]unswept // per subject: settled copies stopped workers could not delete

	dead deadLetters // <stream>_DEAD and the copies that could not be buried (dead.go)
}

var streamName = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// destinationName is what a destination's name may be: it becomes a
// subject token.
var destinationName = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// ValidDestination reports whether name can name a destination.
func ValidDestination(name string) bool { return destinationName.MatchString(name) }

// withDefaults fills in SPEC's defaults.
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
	if !streamName.MatchString(cfg.Stream) {
		return nil, fmt.Errorf("queue: stream name %q: use letters, digits, _ and - only", cfg.Stream)
	}
	s := &Store{cfg: cfg, handBacks: ledgerFor(cfg)}
	var err error
	if len(cfg.URLs) == 0 {
		if cfg.Dir == "" {
			return nil, errors.New("queue: the embedded server needs a store directory")
		}
		s.server, err = server.NewServer(&server.Options{
			ServerName: "mux_webhook",
			JetStream:  true,
			StoreDir:   cfg.Dir,
			DontListen: true,       // in-process connections only: no port
			SyncAlways: syncAlways, // fsync before every acknowledgement
			NoSigs:     true,
			NoLog:      true,
		})
		if err != nil {
			return nil, fmt.Errorf("queue: embedded NATS server: %v", err)
		}
		s.server.Start()
		if !s.server.ReadyForConnections(10 * time.Second) {
			s.server.Shutdown()
			return nil, errors.New("queue: the embedded NATS server did not start within 10s")
		}
		s.conn, err = nats.Connect("", nats.InProcessServer(s.server), nats.Name("mux_webhook"))
	} else {
		name := "mux_webhook"
		if cfg.Name != "" {
			name = cfg.Name
		}
		opts := []nats.Option{nats.Name(name), nats.MaxReconnects(-1)}
		if cfg.TLSCA != "" {
			opts = append(opts, nats.RootCAs(cfg.TLSCA))
		}
		if cfg.TLSCert != "" || cfg.TLSKey != "" {
			opts = append(opts, nats.ClientCert(cfg.TLSCert, cfg.TLSKey))
		}
		switch {
		case cfg.Creds != "":
			opts = append(opts, nats.UserCredentials(cfg.Creds))
		case cfg.User != "":
			opts = append(opts, nats.UserInfo(cfg.User, cfg.Password))
		case cfg.Token != "":
			opts = append(opts, nats.Token(cfg.Token))
		}
		s.conn, err = nats.Connect(strings.Join(cfg.URLs, ","), opts...)
	}
	if err != nil {
		s.Close()
		return nil, fmt.Errorf("queue: connecting to NATS: %v", err)
	}
	if s.js, err = jetstream.New(s.conn); err != nil {
		s.Close()
		return nil, fmt.Errorf("queue: JetStream: %v", err)
	}
	err = retrySetup(ctx, func(ctx context.Context) (err error) {
		s.stream, err = s.js.CreateOrUpdateStream(ctx, streamConfig(cfg))
		return err
	})
	if err != nil {
		s.Close()
		return nil, fmt.Errorf("queue: creating stream %s: %v", cfg.Stream, err)
	}
	return s.openDead(ctx)
}

// streamConfig is the stream as cfg describes it.
func streamConfig(cfg Config) jetstream.StreamConfig {
	return jetstream.StreamConfig{
		Name:       cfg.Stream,
		Subjects:   []string{cfg.Stream + ".deliver.>", cfg.Stream + ".dead.>"},
		Storage:    jetstream.FileStorage,
		Retention:  jetstream.LimitsPolicy,
		Discard:    jetstream.DiscardNew, // full: refuse the new, keep the stored
		MaxBytes:   cfg.MaxBytes,
		Duplicates: cfg.DedupeWindow,
		Replicas:   cfg.Replicas,
	}
}

// Reconfigure applies a reloaded config's max_bytes, dedupe_window and
// replicas to the open store's stream. The stream itself (its name, the
// server or directory) cannot change while events are queued in it:
// that is an error saying what to do.
func (s *Store) Reconfigure(ctx context.Context, cfg Config) error {
	cfg = withDefaults(cfg)
	if cfg.Stream != s.cfg.Stream {
		return fmt.Errorf("queue: the stream is %s in the running Caddy; a reload cannot rename it (its queued events would wait forever): keep stream %s, or give the new stream its own dir", s.cfg.Stream, s.cfg.Stream)
	}
	if err := s.reconfigureDead(ctx, cfg); err != nil {
		return err
	}
	if cfg.MaxBytes == s.cfg.MaxBytes && cfg.DedupeWindow == s.cfg.DedupeWindow && cfg.Replicas == s.cfg.Replicas {
		return nil
	}
	if _, err := s.js.UpdateStream(ctx, streamConfig(cfg)); err != nil {
		return fmt.Errorf("queue: updating stream %s (max_bytes, dedupe_window, replicas): %v", s.cfg.Stream, err)
	}
	s.cfg.MaxBytes, s.cfg.DedupeWindow, s.cfg.Replicas = cfg.MaxBytes, cfg.DedupeWindow, cfg.Replicas
	return nil
}

// Queued returns, per destination name, how many copies the stream holds
// for it (dead letters apart): also for destinations no longer
// configured, whose copies wait until one is configured again.
func (s *Store) Queued(ctx context.Context) (map[string]uint64, error) {
	stream, err := s.js.Stream(ctx, s.cfg.Stream)
	if err != nil {
		return nil, err
	}
	prefix := s.cfg.Stream + ".deliver."
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

// setupTimeout bounds how long Open and Deliver try to create the stream
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

// Subject is where a destination's copies are stored.
func (s *Store) Subject(destination string) string {
	return s.cfg.Stream + ".deliver." + destination
}

// Enqueue stores one copy of an event for one destination and returns once
// the server acknowledged it as stored (on the embedded server: fsynced).
// A copy with the same destination and event id within the dedupe window
// is acknowledged without being stored again; duplicate reports it.
func (s *Store) Enqueue(ctx context.Context, m Message) (duplicate bool, err error) {
	if !ValidDestination(m.Destination) {
		return false, fmt.Errorf("queue: destination name %q: use letters, digits, _ and - only", m.Destination)
	}
	msg := nats.NewMsg(s.Subject(m.Destination))
	msg.Data = m.Body
	for k, v := range m.Header {
		msg.Header.Set(k, v)
	}
	msg.Header.Set(HeaderEventID, m.ID)
	msg.Header.Set(HeaderEventType, m.Type)
	msg.Header.Set(jetstream.MsgIDHeader, dedupeID(m.Destination, m.EventID))
	ack, err := s.js.PublishMsg(ctx, msg)
	if err != nil {
		if isFull(err) {
			return false, ErrFull
		}
		return false, fmt.Errorf("queue: not stored: %w", err)
	}
	return ack.Duplicate, nil
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

// Pending returns how many copies are stored for destination.
func (s *Store) Pending(ctx context.Context, destination string) (uint64, error) {
	st, err := s.js.Stream(ctx, s.cfg.Stream)
	if err != nil {
		return 0, err
	}
	info, err := st.Info(ctx, jetstream.WithSubjectFilter(s.Subject(destination)))
	if err != nil {
		return 0, err
	}
	return info.State.Subjects[s.Subject(destination)], nil
}

// Close drains the connection and shuts the embedded server down.
func (s *Store) Close() {
	if s.conn != nil {
		s.conn.Close()
	}
	if s.server != nil {
		s.server.Shutdown()
		s.server.WaitForShutdown()
	}
}
