// What the delivery queue keeps across config reloads, and who owns it.
// A reload provisions and starts the new config before it stops and
// cleans up the old one, and Caddy may roll a reload back after the new
// app started: every value below has one owner and a lifetime that
// survives exactly that.
//
//	value        (file)               what                                        lifetime
//	storePool    (here)               the open queue.Store (+ this process's     while a started config uses it (usage pool,
//	                                  delivered counts, last errors, watchdogs)  by dir or NATS URLs + credentials' hash)
//	workerPool   (here)               each destination's running workers         while a started config uses them (by the
//	                                                                             destination's settings, salted hash)
//	started      (here)               configs whose queue started, oldest first  start to cleanup; the newest's stream
//	                                                                             settings are the queue's (restore)
//	running      (app.go)             started apps, newest serves the admin API   Start to Stop
//	gauged       (deliver_observe.go) destinations with gauge series             the process
//	poolKeySalt  (deliver_config.go)  the salt of the pool keys' hashes          the process
//	muxMetrics   (metrics.go)         the collectors, registered per config      the process
//	liveLog      (livelog.go)         the live log's entries and subscribers     the process
//	ledgers      (here)               copies handed back unattempted, per stream the process (entries pruned after 48h):
//	                                  (queue.HandBacks, given to each Store)     outlives a Store a reload reopens
//	workerStopGrace (here)            a stop's grace for attempts in progress    the process (a test knob)
//	storeHistory (history.go)         the store's queue.History (writer, jobs)   the store's (in its storePool entry)
//
// The queue package holds no state of its own: what must outlive one
// Store or one config is given to it from here.

package muxwebhook

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/queue"
)

// storePool holds the queue's store across config reloads: the embedded
// server is not restarted, and nothing queued is lost or repeated.
var storePool = caddy.NewUsagePool()

// pooledStore is a store in the pool, with what this process's workers
// did per destination: like the store, it outlives reloads.
type pooledStore struct {
	*queue.Store

	mu    sync.Mutex
	stats map[string]*destinationStats // by destination name
	watch map[string]*stallWatch       // by destination name

	history storeHistory // the store's history, once a config with history on started (history.go)
}

// started are the configs whose queue started, oldest first, whatever
// their store: the newest one's stream settings and ack deadlines are the
// queue's. (A reload that changes the NATS credentials opens a store of
// its own, on the same stream.)
var started struct {
	sync.Mutex
	configs []*appQueue
}

// useStarted records that d's queue started.
func useStarted(d *appQueue) {
	started.Lock()
	defer started.Unlock()
	started.configs = append(started.configs, d)
}

// releaseStarted forgets d. If d was the newest config (a reload that
// Caddy rolled back after this app started), it returns the newest config
// still running, whose settings must be put back; else nil.
func releaseStarted(d *appQueue) *appQueue {
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
func (s *pooledStore) Destruct() error {
	s.history.close()
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
	// breaker is the destination's breaker in this process.
	breaker queue.BreakerState
}

// stat returns a copy of destination's counts.
func (s *pooledStore) stat(destination string) destinationStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	if st := s.stats[destination]; st != nil {
		return *st
	}
	return destinationStats{}
}

// setBreaker records the destination's breaker state, and returns the
// one before.
func (s *pooledStore) setBreaker(destination string, b queue.BreakerState) (was queue.BreakerState) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.stats[destination]
	if st == nil {
		st = &destinationStats{}
		s.stats[destination] = st
	}
	was, st.breaker = st.breaker, b
	return was
}

// count records an attempt's result.
func (s *pooledStore) count(a queue.Attempt) {
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

// appQueue is the app's provisioned queue: the store and the destinations.
type appQueue struct {
	cfg          QueueConfig
	poolKey      string
	qc           queue.Config
	handle       atomic.Pointer[pooledStore] // set once the app started
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
	// lastFillWarn is when the gauges last warned of a stream filling up
	// behind paused destinations (the gauges' goroutine's).
	lastFillWarn time.Time
	// historyOn: this config keeps history (history.go), with historyCfg
	// (atomic: a start that cannot open the store turns it off while
	// requests read it).
	historyOn  atomic.Bool
	historyCfg queue.HistoryConfig
	// historyOnly: the store is opened for history alone (no queue block,
	// no destination): failing to open it turns history off, nothing more.
	historyOnly bool
}

// store is the open store, or nil before the app started.
func (d *appQueue) store() *queue.Store {
	if h := d.handle.Load(); h != nil {
		return h.Store
	}
	return nil
}

// open opens (or shares) the store. It runs when the app starts, not
// when it is provisioned: `caddy validate` provisions a config in a
// process of its own, which must never open a running Caddy's store.
// A reload that shares the running store applies its max_bytes,
// dedupe_window and replicas to the stream.
func (d *appQueue) open() error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	val, loaded, err := storePool.LoadOrNew(d.poolKey, func() (caddy.Destructor, error) {
		qc := d.qc
		qc.HandBacks = ledgerFor(qc)
		s, err := queue.Open(ctx, qc)
		if err != nil {
			return nil, err
		}
		return &pooledStore{Store: s, stats: map[string]*destinationStats{}}, nil
	})
	if err != nil {
		return fmt.Errorf("mux_webhook: queue: %v", err)
	}
	h := val.(*pooledStore)
	if loaded {
		if err := h.Reconfigure(ctx, d.qc); err != nil {
			_, _ = storePool.Delete(d.poolKey)
			return fmt.Errorf("mux_webhook: %v", err)
		}
	}
	useStarted(d)
	d.handle.Store(h)
	d.openedOnce.Do(func() { close(d.opened) })
	return nil
}

// start runs the delivery workers, logging each failed attempt at WARN
// and each dead letter at ERROR (never a secret).
func (d *appQueue) start() error {
	err := d.open()
	if err == nil {
		d.openHistory(d.handle.Load())
		return d.startWorkers()
	}
	if d.historyOnly {
		// Opened for history alone (`history 7d` without a queue):
		// never a load error; the gateway runs without it.
		d.logger.Warn("mux_webhook history: history is off: the queue's store could not be opened (another process may hold its directory: give this one its own `queue { dir }`)", zap.Error(err))
		d.historyOn.Store(false)
		return nil
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
				d.openHistory(d.handle.Load())
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
func (d *appQueue) addStop(f func()) {
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
func (d *appQueue) startWorkers() error {
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
			dest.OnPause = func(p *queue.Pause) {
				d := w.observe.Load()
				if p == nil {
					d.logger.Info("mux webhook destination resumed: delivering its events again",
						zap.String("destination", dest.Name), zap.String("instance", d.instance))
					return
				}
				d.logger.Info("mux webhook destination paused: its events wait, using no attempt, until it is resumed (caddy mux-webhook queue resume)",
					zap.String("destination", dest.Name), zap.Time("since", p.Since), zap.String("by", p.By), zap.String("instance", d.instance))
			}
			dest.OnBreaker = func(b queue.BreakerState) {
				d := w.observe.Load()
				was := d.handle.Load().setBreaker(dest.Name, b)
				switch {
				case !b.Tripped && b.Since.IsZero():
					// New workers, closed: nothing happened to say.
				case b.Tripped && !was.Tripped:
					d.logger.Error("mux webhook destination tripped: it failed again and again; its events wait, using no attempt, and one is attempted as a probe every interval",
						zap.String("destination", dest.Name), zap.Int("failures", cmp.Or(dest.BreakerFailures, queue.DefaultBreakerFailures)),
						zap.Duration("probe", cmp.Or(dest.BreakerProbe, queue.DefaultBreakerProbe)),
						zap.Time("next_probe", b.NextProbe), zap.String("instance", d.instance))
				case !b.Tripped && was.Tripped:
					d.logger.Info("mux webhook destination reset: a probe was delivered, or the destination resumed; delivering again",
						zap.String("destination", dest.Name), zap.String("instance", d.instance))
				}
			}
			dest.StopGrace = workerStopGrace
			stop, err := d.store().StartWorkers(context.Background(), dest, w.observeAttempt)
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
	observe atomic.Pointer[appQueue] // the newest config using them logs their attempts

	mu    sync.Mutex
	users []*appQueue // the started configs using them, oldest first
}

// use makes d, a config that just started, log the workers' attempts.
func (w *workers) use(d *appQueue) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.users = append(w.users, d)
	w.observe.Store(d)
}

// release forgets d: the newest config still using the workers logs
// their attempts (after a reload that Caddy rolled back, the running one).
func (w *workers) release(d *appQueue) {
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

// stop stops the config's workers and gauges. Destinations stop at once,
// not in turn: each may wait for its attempts in progress (a grace of up
// to workerStopGrace), and a shutdown must not wait that once per
// destination.
func (d *appQueue) stop() {
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

func (d *appQueue) cleanup() {
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
		// And its history settings (on or off, age, bytes), on its store.
		running.openHistory(running.handle.Load())
	}
	_, _ = storePool.Delete(d.poolKey)
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
func (d *appQueue) restore(h *pooledStore, newer *appQueue) {
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

// ledgers holds the hand-back ledger of each stream: its name, and its
// directory or NATS URLs (not the credentials, which a reload may
// change, opening another Store on the same stream).
var ledgers sync.Map

// ledgerFor is the ledger of cfg's stream.
func ledgerFor(cfg queue.Config) *queue.HandBacks {
	stream := cfg.Stream
	if stream == "" {
		stream = queue.DefaultStream
	}
	where := cfg.Dir
	if len(cfg.URLs) > 0 {
		where = strings.Join(slices.Sorted(slices.Values(cfg.URLs)), ",")
	}
	h, _ := ledgers.LoadOrStore(stream+"\x00"+where, queue.NewHandBacks())
	return h.(*queue.HandBacks)
}

// workerStopGrace bounds how long stopping a destination's workers (a
// reload that changed it, a shutdown) waits for its attempts in progress
// (at most the destination's timeout); a variable for tests.
var workerStopGrace = queue.DefaultStopGrace
