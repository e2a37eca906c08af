// The Caddy glue of the delivery queue (package queue): the mux_webhook
// app's `queue` and `destination` settings, the store kept across config
// reloads, the delivery workers' lifecycle and log lines, and the
// mux_deliver handler, which answers 202 once every destination's copy of
// the verified event is stored.
//
//	mux_deliver [<matcher>] <destination>...

package muxwebhook

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/queue"
)

func init() {
	caddy.RegisterModule(Deliver{})
}

// QueueConfig configures the delivery queue (SPEC: "Delivery queue").
type QueueConfig struct {
	// Dir is the embedded JetStream server's store. Default:
	// {Caddy's data directory}/mux_webhook/jetstream.
	Dir string `json:"dir,omitempty"`
	// NATS connects to an external NATS server or cluster instead of
	// starting the embedded server.
	NATS *NATSConfig `json:"nats,omitempty"`
	// Stream is the JetStream stream's name. Default: MUX_WEBHOOK.
	Stream string `json:"stream,omitempty"`
	// MaxBytes bounds the stream; when it is full, mux_deliver answers 503
	// and stored events are never dropped. Default: 1 GiB.
	MaxBytes int64 `json:"max_bytes,omitempty"`
	// DeadMaxBytes bounds <stream>_DEAD, the dead letters' own stream
	// (a full stream never keeps a copy from becoming a dead letter); when
	// it is full, copies at their last attempt stay queued, retried at
	// the last retry interval, until dead letters are purged or
	// redelivered. Default: 1 GiB.
	DeadMaxBytes int64 `json:"dead_max_bytes,omitempty"`
	// DedupeWindow: a redelivered event id is queued once per destination
	// within it. Default: 24h.
	DedupeWindow caddy.Duration `json:"dedupe_window,omitempty"`
	// EnqueueTimeout bounds how long mux_deliver waits for every copy to
	// be stored before it answers 503. Default: 2s.
	EnqueueTimeout caddy.Duration `json:"enqueue_timeout,omitempty"`
}

// NATSConfig is an external NATS server or cluster.
type NATSConfig struct {
	// URLs of the servers, e.g. nats://10.0.0.1:4222.
	URLs []string `json:"urls,omitempty"`
	// Creds is a credentials file.
	Creds string `json:"creds,omitempty"`
	// User and Password, or Token, authenticate instead.
	User     string `json:"user,omitempty"`
	Password string `json:"password,omitempty"`
	Token    string `json:"token,omitempty"`
	// Replicas of the stream. Default: 1; use 3 on a 3-node cluster.
	Replicas int `json:"replicas,omitempty"`
	// TLSCA is a PEM file of the CA that signed the servers' certificates;
	// without it, tls:// URLs are checked against the system's roots.
	TLSCA string `json:"tls_ca,omitempty"`
	// TLSClientCert and TLSClientKey are PEM files of a client
	// certificate, for servers that verify clients.
	TLSClientCert string `json:"tls_client_cert,omitempty"`
	TLSClientKey  string `json:"tls_client_key,omitempty"`
	// Instance names this Caddy among those sharing the cluster: in its
	// delivery log lines and live log entries, the queue status, the
	// caddy_mux_webhook_instance metric and its NATS connection's name.
	// Default: the host name.
	Instance string `json:"instance,omitempty"`
}

// DestinationConfig is where mux_deliver delivers, by name.
type DestinationConfig struct {
	// URL receives a POST per event.
	URL string `json:"url,omitempty"`
	// Timeout bounds each attempt. Default: 30s.
	Timeout caddy.Duration `json:"timeout,omitempty"`
	// Retry are the delays between attempts; the last one repeats.
	// Default: 10s 1m 5m 30m 1h.
	Retry []caddy.Duration `json:"retry,omitempty"`
	// MaxAttempts makes an event a dead letter after this many failed
	// attempts. Default: 0, until max_age.
	MaxAttempts int `json:"max_attempts,omitempty"`
	// MaxAge makes an event a dead letter once it is this old. Default: 72h.
	MaxAge caddy.Duration `json:"max_age,omitempty"`
	// Concurrency is how many attempts run at once per Caddy instance.
	// Default: 4.
	Concurrency int `json:"concurrency,omitempty"`
	// StallAfter: when events wait this long past their due attempt with
	// nothing attempted (by any instance), the destination is stalled:
	// said by the status, an ERROR line and the
	// caddy_mux_webhook_queue_stalled metric. Default: 1m.
	StallAfter caddy.Duration `json:"stall_after,omitempty"`
	// Sign re-signs every attempt with this secret ({env.*} or {file.*}
	// as for mux_webhook); without it, Mux's original signature is sent.
	Sign string `json:"sign,omitempty"`
	// Header adds request headers.
	Header map[string]string `json:"header,omitempty"`
}

// stores holds the queue's store across config reloads: the embedded
// server is not restarted, and nothing queued is lost or repeated.
var stores = caddy.NewUsagePool()

// storeHandle is a store in the pool, with what this process's workers
// did per destination: like the store, it outlives reloads.
type storeHandle struct {
	*queue.Store

	mu    sync.Mutex
	stats map[string]*destinationStats // by destination name
	watch map[string]*stallWatch       // by destination name
}

// stallWatch is a destination's watchdog and what it last found.
type stallWatch struct {
	queue.Watchdog
	stalled bool
	since   time.Time // nothing progressed since then
}

// checkStall reads a destination's latest status into its watchdog and
// reports whether it is stalled now, since when, and whether that
// changed.
func (s *storeHandle) checkStall(dest queue.Destination, st queue.Status, now time.Time) (stalled bool, since time.Time, changed bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.watch == nil {
		s.watch = map[string]*stallWatch{}
	}
	w := s.watch[dest.Name]
	if w == nil {
		w = &stallWatch{}
		s.watch[dest.Name] = w
	}
	stalled, since = w.Check(dest, st, now)
	changed = stalled != w.stalled
	w.stalled, w.since = stalled, since
	return stalled, since, changed
}

// holdStalls stops the watchdogs' clocks up to now: the queue is down,
// and says so itself.
func (s *storeHandle) holdStalls(now time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, w := range s.watch {
		w.Hold(now)
	}
}

// stall is what the watchdog last found of destination.
func (s *storeHandle) stall(destination string) (stalled bool, since time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if w := s.watch[destination]; w != nil {
		return w.stalled, w.since
	}
	return false, time.Time{}
}

// started are the configs whose queue started, oldest first, whatever
// their store: the newest one's stream settings and ack deadlines are the
// queue's. (A reload that changes the NATS credentials opens a store of
// its own, on the same stream.)
var started struct {
	sync.Mutex
	configs []*delivery
}

// useStarted records that d's queue started.
func useStarted(d *delivery) {
	started.Lock()
	defer started.Unlock()
	started.configs = append(started.configs, d)
}

// releaseStarted forgets d. If d was the newest config (a reload that
// Caddy rolled back after this app started), it returns the newest config
// still running, whose settings must be put back; else nil.
func releaseStarted(d *delivery) *delivery {
	started.Lock()
	defer started.Unlock()
	i := slices.Index(started.configs, d)
	if i < 0 {
		return nil
	}
	newest := i == len(started.configs)-1
	started.configs = slices.Delete(started.configs, i, i+1)
	if newest && len(started.configs) > 0 {
		return started.configs[len(started.configs)-1]
	}
	return nil
}

// Destruct closes the store when no config uses it any more.
func (s *storeHandle) Destruct() error {
	s.Close()
	return nil
}

// destinationStats counts what this process's workers did for one
// destination, since the store was opened.
type destinationStats struct {
	delivered uint64
	// lastError is the latest failed attempt's error, and lastErrorAt
	// when it was; both are cleared by a delivery.
	lastError   string
	lastErrorAt time.Time
}

// stat returns a copy of destination's counts.
func (s *storeHandle) stat(destination string) destinationStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	if st := s.stats[destination]; st != nil {
		return *st
	}
	return destinationStats{}
}

// count records an attempt's result.
func (s *storeHandle) count(a queue.Attempt) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.stats[a.Destination]
	if st == nil {
		st = &destinationStats{}
		s.stats[a.Destination] = st
	}
	switch {
	case a.Result == "delivered":
		st.delivered++
		st.lastError, st.lastErrorAt = "", time.Time{}
	case a.BuryErr != nil:
		st.lastError, st.lastErrorAt = "could not keep a copy as a dead letter: "+a.BuryErr.Error(), time.Now()
	case a.Err != nil && !a.NoAttempt:
		st.lastError, st.lastErrorAt = a.Err.Error(), time.Now()
	}
}

// delivery is the app's provisioned queue: the store and the destinations.
type delivery struct {
	cfg          QueueConfig
	poolKey      string
	qc           queue.Config
	handle       atomic.Pointer[storeHandle] // set once the app started
	opened       chan struct{}               // closed once handle is set
	openedOnce   sync.Once
	destinations map[string]queue.Destination
	workerKeys   map[string]string // by destination: its workers' key in the pool
	stopsMu      sync.Mutex
	stops        []func()
	stopped      bool // stop began: what is registered later is undone at once
	logger       *zap.Logger
	// instance names this Caddy in log lines, the live log, the queue
	// status and metrics: the nats block's instance, else the host name.
	instance string
}

// store is the open store, or nil before the app started.
func (d *delivery) store() *queue.Store {
	if h := d.handle.Load(); h != nil {
		return h.Store
	}
	return nil
}

// provisionDelivery opens (or shares) the store and checks the
// destinations. It returns nil when neither is configured.
func (a *App) provisionDelivery(ctx caddy.Context) (*delivery, error) {
	if a.Queue == nil && len(a.Destinations) == 0 {
		return nil, nil
	}
	cfg := QueueConfig{}
	if a.Queue != nil {
		cfg = *a.Queue
	}
	if cfg.EnqueueTimeout == 0 {
		cfg.EnqueueTimeout = caddy.Duration(queue.DefaultEnqueueTimeout)
	}
	if cfg.Dir == "" {
		cfg.Dir = filepath.Join(caddy.AppDataDir(), "mux_webhook", "jetstream")
	}
	if cfg.MaxBytes < 0 || cfg.DeadMaxBytes < 0 || cfg.DedupeWindow < 0 || cfg.EnqueueTimeout < 0 {
		return nil, errors.New("mux_webhook: queue max_bytes, dead_max_bytes, dedupe_window and enqueue_timeout must not be negative")
	}
	if cfg.NATS == nil {
		// One spelling per directory: the store's pool key, its workers'
		// keys and the hand-back ledger name it, so that a reload to
		// `dir D/` or to a symlink to D shares the open store (a second
		// store on it would be refused: the directory is locked).
		dir, err := canonicalDir(cfg.Dir)
		if err != nil {
			return nil, err
		}
		cfg.Dir = dir
	}
	d := &delivery{
		cfg: cfg, destinations: map[string]queue.Destination{}, workerKeys: map[string]string{}, logger: ctx.Logger(),
		instance: hostname(), opened: make(chan struct{}),
	}
	for name, dc := range a.Destinations {
		dest, signSecret, err := dc.destination(name)
		if err != nil {
			return nil, err
		}
		d.destinations[name] = dest
		key, err := workerKey(dc, dest, signSecret)
		if err != nil {
			return nil, err
		}
		d.workerKeys[name] = key
	}
	qc := queue.Config{
		Dir: cfg.Dir, Stream: cfg.Stream, MaxBytes: cfg.MaxBytes, DedupeWindow: time.Duration(cfg.DedupeWindow),
		Logger:       d.logger,
		DeadMaxBytes: cfg.DeadMaxBytes,
	}
	d.poolKey = "mux_webhook.queue.dir." + cfg.Dir
	if n := cfg.NATS; n != nil {
		// Password and token may be {env.*} or {file.*}, resolved here as
		// secrets are: never as plain text in the JSON config.
		repl := caddy.NewReplacer()
		password, err := repl.ReplaceOrErr(n.Password, true, true)
		if err != nil && n.Password != "" {
			return nil, errors.New("mux_webhook: queue nats password: a placeholder in it is unset or empty")
		}
		token, err := repl.ReplaceOrErr(n.Token, true, true)
		if err != nil && n.Token != "" {
			return nil, errors.New("mux_webhook: queue nats token: a placeholder in it is unset or empty")
		}
		if n.Instance != "" {
			if !instanceName.MatchString(n.Instance) {
				return nil, fmt.Errorf("mux_webhook: queue nats instance %q: use letters, digits, '.', '_' and '-' only (at most 64)", n.Instance)
			}
			d.instance = n.Instance
		}
		if (n.TLSClientCert == "") != (n.TLSClientKey == "") {
			return nil, errors.New("mux_webhook: queue nats: a TLS client certificate needs both its cert and its key file")
		}
		qc.URLs, qc.Creds, qc.User, qc.Password, qc.Token, qc.Replicas = n.URLs, n.Creds, n.User, password, token, n.Replicas
		// Read again at each connection: a password rotated on the server
		// and then in its {file.*} is taken up at the next reconnection,
		// without a reload.
		qc.PasswordFunc = rereadSecret(n.Password, password)
		qc.TokenFunc = rereadSecret(n.Token, token)
		qc.TLSCA, qc.TLSCert, qc.TLSKey = n.TLSCA, n.TLSClientCert, n.TLSClientKey
		qc.Name = "mux_webhook " + d.instance
		// The instance is in the key: a reload that renames it opens a
		// connection with the new name. So are the credentials, as a
		// salted hash of their resolved values: a password rotated in its
		// {file.*} and reloaded connects anew with it.
		d.poolKey = "mux_webhook.queue.nats." + strings.Join(n.URLs, ",") + "." + cfg.Stream + "." + d.instance +
			"." + n.TLSCA + "." + n.TLSClientCert + "." + n.TLSClientKey +
			"." + saltedHash([]byte(n.Creds), credsContent(n.Creds), []byte(n.User), []byte(password), []byte(token))
	}
	d.qc = qc
	for name, cfgJSON := range d.workerKeys {
		d.workerKeys[name] = d.poolKey + ".destination." + name + "." + cfgJSON
	}
	return d, nil
}

// rereadSecret returns a function that resolves raw's {env.*} and
// {file.*} placeholders again at each call, or nil when raw has none;
// while they resolve to nothing, it keeps last, the value resolved at
// load.
func rereadSecret(raw, last string) func() string {
	if !strings.Contains(raw, "{") {
		return nil
	}
	return func() string {
		v, err := caddy.NewReplacer().ReplaceOrErr(raw, true, true)
		if err != nil || v == "" {
			return last
		}
		return v
	}
}

// credsContent is a creds file's content, for the pool key: a file fixed
// in place (an expired JWT replaced) and reloaded connects anew with it.
// Unreadable, it is nil: connecting will say why.
func credsContent(path string) []byte {
	if path == "" {
		return nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	return b
}

// canonicalDir is the store directory as one path: absolute, symlinks
// resolved. It creates the directory (0700) if it does not exist: a path
// that does not exist yet has no resolved form.
func canonicalDir(dir string) (string, error) {
	abs, err := filepath.Abs(dir)
	if err == nil {
		err = os.MkdirAll(abs, 0o700)
	}
	if err == nil {
		abs, err = filepath.EvalSymlinks(abs)
	}
	if err != nil {
		return "", fmt.Errorf("mux_webhook: queue dir %s: %v: give the queue a directory Caddy can create and write", dir, err)
	}
	return abs, nil
}

// The embedded queue's message limit holds an event of the largest
// max_body: this fails to build if it did not.
const _ = uint64(queue.MaxEvent - MaxMaxBody)

// instanceName is what an instance may be called: it appears in log
// lines, a metric label and the NATS connection's name.
var instanceName = regexp.MustCompile(`^[A-Za-z0-9._-]{1,64}$`)

// hostname is the default instance name: the host's name if it is a valid
// instance name, else "mux_webhook".
func hostname() string {
	if h, err := os.Hostname(); err == nil && instanceName.MatchString(h) {
		return h
	}
	return "mux_webhook"
}

// open opens (or shares) the store. It runs when the app starts, not
// when it is provisioned: `caddy validate` provisions a config in a
// process of its own, which must never open a running Caddy's store.
// A reload that shares the running store applies its max_bytes,
// dedupe_window and replicas to the stream.
func (d *delivery) open() error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	val, loaded, err := stores.LoadOrNew(d.poolKey, func() (caddy.Destructor, error) {
		s, err := queue.Open(ctx, d.qc)
		if err != nil {
			return nil, err
		}
		return &storeHandle{Store: s, stats: map[string]*destinationStats{}}, nil
	})
	if err != nil {
		return fmt.Errorf("mux_webhook: queue: %v", err)
	}
	h := val.(*storeHandle)
	if loaded {
		if err := h.Reconfigure(ctx, d.qc); err != nil {
			_, _ = stores.Delete(d.poolKey)
			return fmt.Errorf("mux_webhook: %v", err)
		}
	}
	useStarted(d)
	d.handle.Store(h)
	d.openedOnce.Do(func() { close(d.opened) })
	return nil
}

// warnOrphans logs the copies queued for destinations the config no
// longer has: they are kept (a destination configured again under its
// name delivers them) and count against max_bytes. It runs with the
// gauges, not in start: a reload must not wait for a queue that does
// not answer just to say this.
func (d *delivery) warnOrphans(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, queueGaugeInterval)
	defer cancel()
	queued, err := d.store().Queued(ctx)
	if err != nil {
		return
	}
	for name, n := range queued {
		if _, ok := d.destinations[name]; !ok && n > 0 {
			d.logger.Warn("mux_webhook: events are queued for a destination that is no longer configured; they wait until it is configured again",
				zap.String("destination", name), zap.Uint64("queued", n))
		}
	}
}

// poolKeySalt makes the pool keys' hashes (workers, NATS stores) ones no
// one can test a guessed secret against.
var poolKeySalt = func() []byte {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	return b
}()

// workerKey tells a destination's workers apart across reloads: the same
// configuration with the same resolved values ({env.*}, {file.*}: a
// secret rotated in its file and reloaded) keeps its workers; anything
// else gets new ones. It holds no secret, only a salted hash.
func workerKey(dc *DestinationConfig, dest queue.Destination, signSecret []byte) (string, error) {
	dcJSON, err := json.Marshal(dc)
	if err != nil {
		return "", err
	}
	fields := [][]byte{dcJSON, signSecret}
	for _, k := range slices.Sorted(maps.Keys(dest.Header)) {
		fields = append(fields, []byte(k), []byte(dest.Header[k]))
	}
	return saltedHash(fields...), nil
}

// saltedHash is an HMAC of the fields, each prefixed by its length, under
// this process's random salt: it tells values apart in a pool key without
// holding them.
func saltedHash(fields ...[]byte) string {
	m := hmac.New(sha256.New, poolKeySalt)
	for _, b := range fields {
		var n [8]byte
		binary.BigEndian.PutUint64(n[:], uint64(len(b)))
		m.Write(n[:])
		m.Write(b)
	}
	return hex.EncodeToString(m.Sum(nil))
}

// destination turns a configured destination into the queue's; it also
// returns the resolved signing secret, if any.
func (dc *DestinationConfig) destination(name string) (queue.Destination, []byte, error) {
	if !queue.ValidDestination(name) {
		return queue.Destination{}, nil, fmt.Errorf("mux_webhook: destination name %q: use letters, digits, _ and - only", name)
	}
	if err := checkDestinationURL(dc.URL); err != nil {
		return queue.Destination{}, nil, fmt.Errorf("mux_webhook: destination %s url: %v", name, err)
	}
	if dc.Timeout < 0 || dc.MaxAge < 0 || dc.MaxAttempts < 0 || dc.Concurrency < 0 || dc.StallAfter < 0 {
		return queue.Destination{}, nil, fmt.Errorf("mux_webhook: destination %s: timeout, max_age, max_attempts, concurrency and stall_after must not be negative", name)
	}
	d := queue.Destination{
		Name: name, URL: dc.URL, Timeout: time.Duration(dc.Timeout), MaxAttempts: dc.MaxAttempts,
		MaxAge: time.Duration(dc.MaxAge), Concurrency: dc.Concurrency, StallAfter: time.Duration(dc.StallAfter),
	}
	if len(dc.Header) > 0 {
		// Values may hold a token: {env.*} and {file.*} are resolved
		// here, as for sign, and never written back to the config.
		repl := caddy.NewReplacer()
		d.Header = make(map[string]string, len(dc.Header))
		for k, v := range dc.Header {
			value, err := repl.ReplaceOrErr(v, true, true)
			if err != nil {
				return queue.Destination{}, nil, fmt.Errorf("mux_webhook: destination %s: header %s: a placeholder in it is unset or empty", name, k)
			}
			if strings.ContainsAny(value, "\r\n\x00") {
				return queue.Destination{}, nil, fmt.Errorf("mux_webhook: destination %s: header %s: the value holds a line break or NUL", name, k)
			}
			d.Header[k] = value
		}
	}
	for _, r := range dc.Retry {
		if r <= 0 {
			return queue.Destination{}, nil, fmt.Errorf("mux_webhook: destination %s: retry delays must be greater than 0", name)
		}
		d.Retry = append(d.Retry, time.Duration(r))
	}
	if dc.Sign != "" {
		secrets, err := resolveSecrets([]string{dc.Sign})
		if err != nil {
			return queue.Destination{}, nil, fmt.Errorf("destination %s: sign: %v", name, err)
		}
		secret := secrets[0]
		d.Sign = func(body []byte, at time.Time) string { return Sign(secret, body, at) }
		return d, secret, nil
	}
	return d, nil, nil
}

// start runs the delivery workers, logging each failed attempt at WARN
// and each dead letter at ERROR (never a secret).
func (d *delivery) start() error {
	err := d.open()
	if err == nil {
		return d.startWorkers()
	}
	if !queue.NoRoom(err) {
		return err
	}
	// The embedded store's disk is full (a restart while it was, say):
	// Caddy starts all the same, so that its other sites serve, and
	// mux_deliver answers 503 (Mux retries) until the queue opens, which
	// is tried every few seconds.
	d.logger.Error("mux_webhook queue: the store cannot open: its disk has no room; mux_deliver answers 503 until it has, tried every 5s",
		zap.String("dir", d.qc.Dir), zap.Error(err))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(5 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			err := d.open()
			if err == nil {
				d.logger.Info("mux_webhook queue: the store opened; delivering", zap.String("dir", d.qc.Dir))
				if err := d.startWorkers(); err != nil {
					d.logger.Error("mux_webhook queue: the store opened, but the delivery workers did not start; restart Caddy", zap.Error(err))
				}
				return
			}
			if !queue.NoRoom(err) {
				d.logger.Error("mux_webhook queue: the store cannot open; restart Caddy once this is fixed", zap.Error(err))
				return
			}
		}
	}()
	d.addStop(func() { cancel(); <-done })
	return nil
}

// addStop registers what stop must do (start's retry may register the
// workers' while a stop begins).
func (d *delivery) addStop(f func()) {
	d.stopsMu.Lock()
	defer d.stopsMu.Unlock()
	if d.stopped {
		go f() // stop has begun: undo at once
		return
	}
	d.stops = append(d.stops, f)
}

// startWorkers runs each destination's workers on the open store, and the
// gauges.
func (d *delivery) startWorkers() error {
	var started []func() // undone here if a destination's workers fail to start
	for name, dest := range d.destinations {
		key := d.workerKeys[name]
		val, _, err := workerPool.LoadOrNew(key, func() (caddy.Destructor, error) {
			w := &workers{}
			w.observe.Store(d)
			dest.OnError = func(err error) {
				d := w.observe.Load()
				d.logger.Warn("mux webhook delivery: the queue's subscription failed; pulling again",
					zap.String("destination", dest.Name), zap.String("instance", d.instance), zap.Error(err))
			}
			var lastFailure time.Time // OnRestart's calls come one at a time
			dest.OnRestart = func(err error) {
				d := w.observe.Load()
				if err == nil {
					lastFailure = time.Time{}
					d.logger.Warn("mux webhook delivery: the destination's consumer was gone (deleted, or its stream made again); made it again and delivering",
						zap.String("destination", dest.Name), zap.String("instance", d.instance))
					return
				}
				if time.Since(lastFailure) < time.Minute {
					return
				}
				lastFailure = time.Now()
				d.logger.Error("mux webhook delivery: the destination's consumer is gone and cannot be made again; its events wait, trying again every few seconds",
					zap.String("destination", dest.Name), zap.String("instance", d.instance), zap.Error(err))
			}
			stop, err := d.store().Deliver(context.Background(), dest, w.observeAttempt)
			if err != nil {
				return nil, err
			}
			w.stop = stop
			return w, nil
		})
		if err != nil {
			var wg sync.WaitGroup
			for _, undo := range started {
				wg.Go(undo)
			}
			wg.Wait()
			return fmt.Errorf("mux_webhook: %v", err)
		}
		w := val.(*workers)
		w.use(d)
		started = append(started, func() {
			w.release(d)
			_, _ = workerPool.Delete(key)
		})
	}
	for _, f := range started {
		d.addStop(f)
	}
	muxMetrics.instance.Reset()
	muxMetrics.instance.WithLabelValues(d.instance).Set(1)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		d.warnOrphans(ctx)
		d.gauges(ctx)
	}()
	d.addStop(func() { cancel(); <-done })
	return nil
}

// workerPool holds each destination's delivery workers across config
// reloads that leave the destination as it was: its attempts in progress
// carry on, nothing is cancelled or attempted twice because of a reload.
// A destination a reload changes gets new workers; the old ones stop.
var workerPool = caddy.NewUsagePool()

// workers are one destination's running delivery workers.
type workers struct {
	stop    func()
	observe atomic.Pointer[delivery] // the newest config using them logs their attempts

	mu    sync.Mutex
	users []*delivery // the started configs using them, oldest first
}

// use makes d, a config that just started, log the workers' attempts.
func (w *workers) use(d *delivery) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.users = append(w.users, d)
	w.observe.Store(d)
}

// release forgets d: the newest config still using the workers logs
// their attempts (after a reload that Caddy rolled back, the running one).
func (w *workers) release(d *delivery) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if i := slices.Index(w.users, d); i >= 0 {
		w.users = slices.Delete(w.users, i, i+1)
	}
	if len(w.users) > 0 {
		w.observe.Store(w.users[len(w.users)-1])
	}
}

func (w *workers) observeAttempt(a queue.Attempt) { w.observe.Load().logAttempt(a) }

// Destruct stops the workers when no config uses them any more; what they
// had not delivered stays queued.
func (w *workers) Destruct() error {
	w.stop()
	return nil
}

// queueGaugeInterval is how often the queue gauges are read from the
// stream.
const queueGaugeInterval = 5 * time.Second

// gauges keeps the queue metrics current until ctx ends.
func (d *delivery) gauges(ctx context.Context) {
	t := time.NewTicker(queueGaugeInterval)
	defer t.Stop()
	for {
		d.dropRemovedGauges()
		up := 1.0
		if d.store().Down() != nil {
			// Not connected, or the embedded store refuses writes: no
			// reading needed to say so (it would wait out its timeout).
			muxMetrics.queueUp.Set(0)
			d.handle.Load().holdStalls(time.Now())
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				continue
			}
		}
		for name := range d.destinations {
			qctx, cancel := context.WithTimeout(ctx, queueGaugeInterval)
			st, err := d.store().Status(qctx, name)
			cancel()
			if err != nil {
				if ctx.Err() == nil {
					up = 0
				}
				continue
			}
			muxMetrics.queuePending.WithLabelValues(name).Set(float64(st.Pending + st.InFlight))
			muxMetrics.queueDead.WithLabelValues(name).Set(float64(st.Dead))
			oldest := 0.0
			if !st.Oldest.IsZero() {
				oldest = time.Since(st.Oldest).Seconds()
			}
			muxMetrics.queueOldest.WithLabelValues(name).Set(oldest)
			d.watchStall(name, st)
		}
		if ctx.Err() == nil {
			muxMetrics.queueUp.Set(up)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// watchStall runs the destination's watchdog on its latest status: the
// metric, and an ERROR line when it stalls (INFO when it no longer is).
func (d *delivery) watchStall(name string, st queue.Status) {
	h := d.handle.Load()
	stalled, since, changed := h.checkStall(d.destinations[name], st, time.Now())
	v := 0.0
	if stalled {
		v = 1
	}
	muxMetrics.queueStalled.WithLabelValues(name).Set(v)
	if !changed {
		return
	}
	fields := []zap.Field{zap.String("destination", name), zap.Uint64("pending", st.Pending), zap.Uint64("in_flight", st.InFlight),
		zap.Time("since", since), zap.String("instance", d.instance)}
	if stalled {
		hint := "no worker took a copy that was due: check the ERROR lines before this one"
		switch {
		case st.NoConsumer:
			hint = "the destination has no consumer in the stream, and no worker could make it again"
		case st.Paused:
			hint = "the destination's consumer is paused in NATS: nats consumer resume <stream> deliver_<destination>"
		}
		d.logger.Error("mux webhook delivery stalled: events wait and nothing was attempted for longer than their retry schedule allows",
			append(fields, zap.String("why", hint))...)
	} else {
		d.logger.Info("mux webhook delivery is no longer stalled", fields...)
	}
}

// gauged are the destinations the queue gauges have series for.
var gauged = struct {
	sync.Mutex
	names map[string]bool
}{names: map[string]bool{}}

// dropRemovedGauges removes the gauge series of destinations a reload
// removed, so that no stale figure is exported for them. (While an old
// config stops, its loop may set one once more; the next pass drops it.)
func (d *delivery) dropRemovedGauges() {
	gauged.Lock()
	defer gauged.Unlock()
	for name := range gauged.names {
		if _, ok := d.destinations[name]; !ok {
			muxMetrics.queuePending.DeleteLabelValues(name)
			muxMetrics.queueDead.DeleteLabelValues(name)
			muxMetrics.queueOldest.DeleteLabelValues(name)
			muxMetrics.queueStalled.DeleteLabelValues(name)
			delete(gauged.names, name)
		}
	}
	for name := range d.destinations {
		gauged.names[name] = true
	}
}

func (d *delivery) logAttempt(a queue.Attempt) {
	if a.Result != "" && !(a.NoAttempt && a.Result != "dead") {
		muxMetrics.deliveries.WithLabelValues(a.Destination, a.Result).Inc()
	}
	if a.Result != "" && !a.NoAttempt {
		muxMetrics.deliveryTime.WithLabelValues(a.Destination).Observe(a.Duration.Seconds())
	}
	if a.BuryErr != nil {
		muxMetrics.deadLetterFails.WithLabelValues(a.Destination).Inc()
	}
	d.handle.Load().count(a)

	fields := []zap.Field{
		zap.String("destination", a.Destination), zap.String("id", a.EventID), zap.String("type", a.EventType),
		zap.Int("attempt", a.Number), zap.Int("status", a.Status), zap.Duration("duration", a.Duration),
		zap.String("instance", d.instance),
	}
	if liveLog.bodyCap() >= 0 {
		e := LogEntry{
			Time: time.Now().Add(-a.Duration), Outcome: a.Result, Status: a.Status,
			DurationMS: float64(a.Duration.Microseconds()) / 1000,
			Type:       a.EventType, ID: a.EventID, Method: http.MethodPost, URI: "→ " + a.Destination,
			Headers: map[string][]string{}, BodyUnavailable: "a delivery attempt: the body is the event's",
			Destination: a.Destination, Attempt: a.Number, Instance: d.instance,
		}
		if a.Err != nil {
			e.Error = a.Err.Error()
		}
		if a.BuryErr != nil {
			e.Error += "; could not keep it as a dead letter: " + a.BuryErr.Error()
		}
		liveLog.add(e)
	}
	switch {
	case a.BuryErr != nil:
		d.logger.Error("mux webhook delivery: the copy reached its last attempt but could not be kept as a dead letter; it stays queued and is tried again at the last retry interval (purge or redeliver dead letters, or raise dead_max_bytes)",
			append(fields, zap.Bool("attempted", !a.NoAttempt), zap.Error(a.Err), zap.NamedError("dead_letter_error", a.BuryErr))...)
		return
	case a.NoAttempt && a.Result == "dead":
		d.logger.Error("mux webhook delivery failed for good; kept as a dead letter (now that there is room)", append(fields, zap.Error(a.Err))...)
		return
	}
	switch a.Result {
	case "delivered":
		d.logger.Info("mux webhook delivered", fields...)
	case "retry":
		d.logger.Warn("mux webhook delivery failed; will retry", append(fields, zap.Error(a.Err))...)
	case "dead":
		d.logger.Error("mux webhook delivery failed for good; kept as a dead letter", append(fields, zap.Error(a.Err))...)
	}
}

// stop stops the config's workers and gauges. Destinations stop at once,
// not in turn: each may wait for its attempts in progress (a grace of up
// to queue.StopGrace), and a shutdown must not wait that once per
// destination.
func (d *delivery) stop() {
	d.stopsMu.Lock()
	stops := d.stops
	d.stops, d.stopped = nil, true
	d.stopsMu.Unlock()
	var wg sync.WaitGroup
	for _, stop := range stops {
		wg.Go(stop)
	}
	wg.Wait()
}

func (d *delivery) cleanup() {
	d.stop()
	h := d.handle.Load()
	if h == nil {
		return
	}
	if running := releaseStarted(d); running != nil {
		// d's store has just reached NATS (the running config's may
		// be reconnecting, e.g. with credentials being revoked): the
		// running config's settings go back through it, also when it is
		// a store of its own (other credentials) on the same stream.
		if rh := running.handle.Load(); rh == h || rh != nil && sameStream(running.qc, d.qc) {
			running.restore(h, d)
		}
	}
	_, _ = stores.Delete(d.poolKey)
}

// sameStream reports whether two configs' queues are one stream on
// external NATS servers, reached with other credentials, instance names,
// TLS files or URLs (the same cluster may be named by other URLs). If
// they are not, applying a config's own settings to its stream again is
// a request for nothing.
func sameStream(a, b queue.Config) bool {
	stream := func(c queue.Config) string {
		if c.Stream == "" {
			return queue.DefaultStream
		}
		return c.Stream
	}
	return len(a.URLs) > 0 && len(b.URLs) > 0 && stream(a) == stream(b)
}

// restore puts back d's stream settings and the ack deadlines of its
// destinations that newer, a config that started after d, changed (it
// ran workers of its own for them), before Caddy rolled that reload back
// (another app failed to start): d, the config still running, carries on
// as it was. The requests go through h, newer's store, which knows the
// settings newer applied. What newer left as it was costs no request to
// the queue.
func (d *delivery) restore(h *storeHandle, newer *delivery) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := h.Reconfigure(ctx, d.qc); err != nil {
		d.logger.Error("mux_webhook: a reload was rolled back, but the stream keeps its max_bytes, dedupe_window and replicas", zap.Error(err))
	}
	for name, dest := range d.destinations {
		// The ack deadline is the one consumer setting a config chooses
		// (from its timeout).
		if nd, ok := newer.destinations[name]; !ok || nd.Timeout == dest.Timeout {
			continue
		}
		if err := h.RestoreConsumer(ctx, dest); err != nil {
			d.logger.Error("mux_webhook: a reload was rolled back, but the destination keeps its ack deadline", zap.String("destination", dest.Name), zap.Error(err))
		}
	}
}

// Deliver is the mux_deliver handler: a terminal handler that stores one
// copy of the event mux_webhook verified earlier in the request per named
// destination, and answers 202 once all are stored (503 if any could not
// be, within enqueue_timeout; Mux's retry is then stored once per
// destination, thanks to the dedupe window). Without a verified event it
// answers 500 and stores nothing.
type Deliver struct {
	// Destinations are names configured with the mux_webhook global
	// option's destination lines.
	Destinations []string `json:"destinations,omitempty"`

	delivery *delivery
	logger   *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (Deliver) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.mux_deliver",
		New: func() caddy.Module { return new(Deliver) },
	}
}

// Provision finds the destinations in the mux_webhook app.
func (h *Deliver) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	if len(h.Destinations) == 0 {
		return errors.New("mux_deliver: name at least one destination, e.g. mux_deliver app")
	}
	appVal, err := ctx.App("mux_webhook")
	if err != nil {
		return fmt.Errorf("mux_deliver: loading the mux_webhook app: %v", err)
	}
	d := appVal.(*App).delivery
	for _, name := range h.Destinations {
		if d == nil || d.destinations[name].Name == "" {
			return fmt.Errorf("mux_deliver: unknown destination %q; declare it in the global options: mux_webhook { destination %s <url> }", name, name)
		}
	}
	h.delivery = d
	return nil
}

// ServeHTTP stores the verified event for every destination.
func (h *Deliver) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	ev := EventFromRequest(r)
	if ev == nil {
		h.logger.Error("mux_deliver: no verified event in this request; put mux_webhook before it in the route", zap.String("uri", r.RequestURI))
		return caddyhttp.Error(http.StatusInternalServerError, errors.New("mux_deliver: no verified event"))
	}
	ctx, cancel := context.WithTimeout(r.Context(), time.Duration(h.delivery.cfg.EnqueueTimeout))
	defer cancel()
	store := h.delivery.store()
	if store == nil {
		// Caddy starts its apps in no fixed order: a request may come in
		// before the queue is open. It waits, within enqueue_timeout.
		select {
		case <-h.delivery.opened:
			store = h.delivery.store()
		case <-ctx.Done():
			return caddyhttp.Error(http.StatusServiceUnavailable, errors.New("mux_deliver: the queue is not open yet"))
		}
	}
	key := ev.IDRaw
	if len(key) == 0 {
		key = ev.Body // no id: only the same bytes are the same event
	}
	for _, name := range h.Destinations {
		dup, err := store.Enqueue(ctx, queue.Message{
			Destination: name, EventID: key, ID: ev.ID, Type: ev.Type, Body: ev.Body,
			Header: map[string]string{queue.HeaderSignature: ev.Signature},
		})
		if err != nil {
			reason := "unavailable"
			if errors.Is(err, queue.ErrFull) {
				reason = "full"
			}
			muxMetrics.enqueueFails.WithLabelValues(name, reason).Inc()
			h.logger.Error("mux_deliver: could not queue the event; answering 503 so that Mux retries",
				zap.String("destination", name), zap.String("type", ev.Type), zap.String("id", ev.ID), zap.Error(err))
			return caddyhttp.Error(http.StatusServiceUnavailable, fmt.Errorf("mux_deliver: %w", err))
		}
		if dup {
			muxMetrics.queueDuplicates.WithLabelValues(name).Inc()
			h.logger.Debug("mux_deliver: the event is already queued for this destination (dedupe window); not queued again",
				zap.String("destination", name), zap.String("id", ev.ID))
		}
	}
	w.WriteHeader(http.StatusAccepted)
	return nil
}

// Interface guards
var (
	_ caddyhttp.MiddlewareHandler = (*Deliver)(nil)
	_ caddy.Provisioner           = (*Deliver)(nil)
)
