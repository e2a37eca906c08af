// Delivery: workers that POST each stored copy to its destination, retry
// it on the destination's schedule, and hand it to dead.go as a dead
// letter after max_attempts or max_age; their supervisor, which makes a
// consumer deleted by hand again; and each destination's Status.

package queue

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
)

// Destination defaults, as the README's "Every setting" documents them.
const (
	DefaultTimeout     = 30 * time.Second
	DefaultMaxAge      = 72 * time.Hour
	DefaultConcurrency = 4
)

// DefaultRetry is the delay between attempts; the last one repeats.
var DefaultRetry = []time.Duration{10 * time.Second, time.Minute, 5 * time.Minute, 30 * time.Minute, time.Hour}

// Headers of stored copies and of delivery requests.
const (
	HeaderSignature   = "Mux-Signature"
	HeaderEventID     = "Mux-Webhook-Event-Id" // stored: the id as text, for Idempotency-Key and logs
	HeaderEventType   = "Mux-Webhook-Event-Type"
	HeaderAttempt     = "Mux-Webhook-Attempt"
	HeaderDestination = "Mux-Webhook-Destination"
	headerLastError   = "Mux-Webhook-Last-Error"
	headerAttempts    = "Mux-Webhook-Attempts"
	headerDeadAt      = "Mux-Webhook-Dead-At"
)

// maxErrorText bounds an error kept with a dead letter.
const maxErrorText = 512

// Destination configures delivery to one URL.
type Destination struct {
	Name        string
	URL         string
	Timeout     time.Duration   // per attempt
	Retry       []time.Duration // delays between attempts; the last repeats
	MaxAttempts int             // 0: until MaxAge
	MaxAge      time.Duration   // then the copy becomes a dead letter
	Concurrency int             // attempts in flight in this process
	// Rate and RatePer pace the attempts of this process: at most Rate
	// per RatePer, spaced evenly (pace.go). 0: unpaced.
	Rate    int
	RatePer time.Duration
	// BreakerFailures failed attempts in a row, for the destination's
	// reasons, trip its breaker in this process (breaker.go); then one
	// copy is attempted every BreakerProbe. Defaults: 10 and 30s;
	// BreakerOff turns it off.
	BreakerFailures int
	BreakerProbe    time.Duration
	// StallAfter: copies waiting this long past their due time with
	// nothing attempted make the destination stalled (Watchdog).
	// Default: DefaultStallAfter.
	StallAfter time.Duration
	// StopGrace bounds how long a stop waits for attempts in progress
	// (at most Timeout). Default: DefaultStopGrace.
	StopGrace time.Duration
	// Sign, if set, makes the Mux-Signature of each attempt; else Mux's
	// original header is sent.
	Sign   func(body []byte, at time.Time) string
	Header map[string]string // extra request headers
	// OnError, if set, hears of the workers' subscription errors (missed
	// heartbeats of a consumer's leader that died, a lost connection):
	// the workers carry on and pull again.
	OnError func(error)
	// OnRestart, if set, hears of the workers subscribing anew by
	// themselves, after their consumer was deleted, their stream made
	// again or their subscription ended for good: with nil once they
	// pull again, else with why they cannot yet (they try again every
	// few seconds).
	OnRestart func(error)
	// OnPause, if set, hears of the workers finding their destination
	// paused by an operator (with the pause) or resumed (with nil):
	// SetPaused on any gateway sharing the stream.
	OnPause func(*Pause)
	// OnBreaker, if set, hears of the destination's breaker in this
	// process tripping, being probed again later, or resetting.
	OnBreaker func(BreakerState)
	// OrderObject delivers the copies of one object one at a time, in
	// the order they were stored (order.go).
	OrderObject bool
}

// Attempt is what one delivery attempt did.
type Attempt struct {
	Destination string
	EventID     string
	EventType   string
	Number      int
	Status      int // 0 when no response arrived
	Err         error
	Duration    time.Duration
	Result      string // "delivered", "retry" or "dead"
	// NoAttempt is a delivery that made no POST: the copy had reached
	// its bound (max_attempts, or max_age after an attempt) and could not
	// be kept as a dead letter then; it was buried now (Result "dead"),
	// or is still not (BuryErr). Number is then the attempts made, Err
	// the last one's error.
	NoAttempt bool
	// RetryAfter is what the answer's Retry-After asked (429 and 503
	// only, at most MaxRetryAfter): the next attempt waits at least that.
	RetryAfter time.Duration
	// NotCounted: the attempt was not charged to the copy (a 429, the
	// destination's pace): the next one carries the same number, and
	// only max_age bounds it.
	NotCounted bool
	// BuryErr, if set, is why the copy, at its bound, could not be kept
	// as a dead letter (<stream>_DEAD full or unavailable): it stays
	// queued, delivered again at the last retry interval, and is buried
	// then without another attempt.
	BuryErr error
	// Replay is the replay job that queued the copy (replay.go), if any.
	Replay string
}

func (d *Destination) defaults() {
	if d.Timeout == 0 {
		d.Timeout = DefaultTimeout
	}
	if len(d.Retry) == 0 {
		d.Retry = DefaultRetry
	}
	if d.MaxAge == 0 {
		d.MaxAge = DefaultMaxAge
	}
	if d.Concurrency == 0 {
		d.Concurrency = DefaultConcurrency
	}
	if d.StallAfter == 0 {
		d.StallAfter = DefaultStallAfter
	}
	if d.StopGrace == 0 {
		d.StopGrace = DefaultStopGrace
	}
	if d.BreakerFailures == 0 {
		d.BreakerFailures = DefaultBreakerFailures
	}
	if d.BreakerProbe == 0 {
		d.BreakerProbe = DefaultBreakerProbe
	}
}

// delay is the wait after attempt n (from 1) failed.
func (d *Destination) delay(n int) time.Duration {
	return d.Retry[min(n-1, len(d.Retry)-1)]
}

// DefaultStopGrace bounds how long stopping a destination's workers waits
// for the attempts in progress (at most the destination's timeout).
const DefaultStopGrace = 5 * time.Second

// superviseInterval is how often a destination's workers check that
// their consumer still exists (and sooner, when their subscription
// reports an error).
const superviseInterval = 2 * time.Second

// StartWorkers runs d's workers until ctx ends or stop is called; observe, if
// set, hears of every attempt. Several processes running StartWorkers for the
// same destination on one stream share the work (one durable consumer per
// stream of the queue). The workers drain every stream of the queue: the
// partitions, others that exist (another gateway's more partitions, or an
// earlier config's), and the single stream of earlier versions; a stream
// that appears later is found within partScanInterval.
//
// The workers heal themselves: a consumer deleted by hand, a stream made
// again (restored from a backup) or a subscription ended for good is
// noticed within seconds, and the consumer (and the stream, if gone) made
// again; d.OnRestart hears of it.
func (s *Store) StartWorkers(ctx context.Context, d Destination, observe func(Attempt)) (stop func(), err error) {
	if !ValidDestination(d.Name) {
		return nil, fmt.Errorf("queue: destination name %q: use letters, digits, _ and - only", d.Name)
	}
	d.defaults()
	// Each stream's workers, and the scan, tell of restarts: one call at a
	// time, as for one stream.
	if f := d.OnRestart; f != nil {
		var mu sync.Mutex
		d.OnRestart = func(err error) {
			mu.Lock()
			defer mu.Unlock()
			f(err)
		}
	}
	ctx, cancel := context.WithCancel(ctx)
	g := &destWorkers{
		s: s, d: &d, observe: observe, ctx: ctx, cancelAttempts: cancel,
		client: &http.Client{
			Timeout:   d.Timeout,
			Transport: destinationTransport(d.Concurrency),
			CheckRedirect: func(*http.Request, []*http.Request) error {
				return http.ErrUseLastResponse // redirects are answers, not followed
			},
		},
		slots:    make(chan struct{}, d.Concurrency),
		settling: make(chan struct{}, d.Concurrency),
		pace:     newPacer(d.Rate, d.RatePer),
		parts:    map[string]*workerRun{},
		room:     newWaitingRoom(),
	}
	roomCtx, roomCancel := context.WithCancel(ctx)
	g.roomCancel, g.roomDone = roomCancel, make(chan struct{})
	go func() {
		defer close(g.roomDone)
		g.runRoom(roomCtx)
	}()
	g.br = newBreaker(g.d)
	g.tellBreaker() // closed: earlier workers' state is not these ones'
	// A paused destination's workers subscribe only once it is resumed
	// (supervise reads the pause every second).
	active := g.readPause(ctx)
	// The configured partitions now; the streams only drained (others'
	// partitions, the stream of earlier versions) by the scan, which
	// starts at once: one that cannot be reached does not hold up a start.
	for _, p := range s.configured() {
		if err := g.startPart(ctx, p, active); err != nil {
			g.stopAll()
			cancel()
			return nil, err
		}
	}
	scanCtx, scanCancel := context.WithCancel(ctx)
	scanned := make(chan struct{})
	go func() {
		defer close(scanned)
		g.scan(scanCtx)
	}()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			scanCancel()
			<-scanned // no new stream's workers from here on
			g.stopAll()
			cancel()
		})
	}
	go func() {
		<-ctx.Done()
		stop()
	}()
	return stop, nil
}

// destWorkers are one destination's workers, over every stream of the
// queue: what they share (the slots of their attempts in flight, the
// pace, the pause and the breaker), and a workerRun per stream.
type destWorkers struct {
	s       *Store
	d       *Destination
	client  *http.Client
	observe func(Attempt)
	ctx     context.Context // the attempts'; cancelled at the end of a stop
	// cancelAttempts cancels ctx.
	cancelAttempts context.CancelFunc
	slots          chan struct{}
	settling       chan struct{} // attempts answered, being settled
	pace           *pacer        // nil: unpaced
	paused         atomic.Bool   // by an operator: nothing is attempted
	br             *breaker      // nil: off

	pauseMu sync.Mutex // one reading of the pause at a time, for all streams
	// pauseRead is when the pause was last read; resumed is the latest
	// resume seen (one after it resets the breaker), once resumeRead.
	pauseRead  time.Time
	resumed    uint64
	resumeRead bool
	probes     atomic.Uint64 // rotates the stream a probe starts with
	// room holds, for every stream, the copies held behind an earlier one
	// of their object (order.go); roomCancel ends it (it hands back what
	// it held), roomDone is closed then.
	room       *waitingRoom
	roomCancel context.CancelFunc
	roomDone   chan struct{}

	mu      sync.Mutex // guards stopped, parts, each cc, and wg.Add against stop
	stopped bool
	parts   map[string]*workerRun // by stream name
	wg      sync.WaitGroup        // attempts and probes in progress
}

// workerRun is a destination's workers on one stream of the queue: their
// consumer and subscription (made again when lost), and their sweeper.
type workerRun struct {
	*destWorkers
	p    *part
	sw   *sweeper
	poke chan struct{} // the subscription reported an error: check now

	// gen counts the consumers the workers had: one deleted (noticed, or
	// replaced by one made at another time) makes the copies it
	// delivered settle nothing (genMsg).
	gen     atomic.Uint64
	created time.Time // when the current consumer was made
	// createdNano is created for the attempts (UnixNano; 0: unknown): a
	// copy stored after it and delivered for the first time has no
	// counted attempts to read.
	createdNano atomic.Int64
	// needConsumer: a probe found the consumer gone.
	needConsumer atomic.Bool

	cc jetstream.ConsumeContext // the current subscription (destWorkers.mu)
	// supCancel ends the supervisor, supervised is closed once it ended;
	// swCancel ends the sweeper (after a last sweep), swept likewise;
	supCancel, swCancel context.CancelFunc
	supervised, swept   chan struct{}
}

// startPart starts the destination's workers on p, trying until ctx ends
// or setupTimeout has passed.
func (g *destWorkers) startPart(ctx context.Context, p *part, active bool) error {
	var cons jetstream.Consumer
	err := retrySetup(ctx, func(ctx context.Context) (err error) {
		cons, err = g.s.makeConsumer(ctx, p, *g.d)
		return err
	})
	if err != nil {
		return fmt.Errorf("queue: consumer for %s on %s: %w", g.d.Name, p.name, err)
	}
	w := &workerRun{destWorkers: g, p: p, poke: make(chan struct{}, 1)}
	// The sweeper outlives the attempts, for a last sweep of what they
	// settled.
	w.sw = newSweeper(g.s, p.stream, cons, p.filter(g.d.Name))
	swCtx, swCancel := context.WithCancel(context.WithoutCancel(g.ctx))
	w.swCancel, w.swept = swCancel, make(chan struct{})
	go func() {
		defer close(w.swept)
		w.sw.run(swCtx)
	}()
	var cc jetstream.ConsumeContext
	if active {
		if cc, err = w.consume(cons); err != nil {
			swCancel()
			<-w.swept
			return fmt.Errorf("queue: consuming %s on %s: %v", g.d.Name, p.name, err)
		}
	}
	supCtx, supCancel := context.WithCancel(g.ctx)
	w.supCancel, w.supervised = supCancel, make(chan struct{})
	g.mu.Lock()
	if g.stopped {
		g.mu.Unlock()
		supCancel()
		close(w.supervised)
		if cc != nil {
			cc.Drain()
		}
		swCancel()
		<-w.swept
		return nil
	}
	g.parts[p.name] = w
	g.mu.Unlock()
	go func() {
		defer close(w.supervised)
		w.supervise(supCtx, cons, cc)
	}()
	return nil
}

// scan starts workers on the streams of the queue that are not running:
// at once, then every partScanInterval until ctx ends (streams that
// appear: another gateway's partitions, a partition made again by a
// reload).
func (g *destWorkers) scan(ctx context.Context) {
	t := time.NewTicker(partScanInterval)
	defer t.Stop()
	for {
		for _, p := range g.s.drained(ctx) {
			g.mu.Lock()
			_, running := g.parts[p.name]
			g.mu.Unlock()
			if !running && ctx.Err() == nil {
				err := g.startPart(ctx, p, !g.paused.Load())
				if p.drainOnly() && errors.Is(err, jetstream.ErrStreamNotFound) {
					continue // drained and deleted meanwhile
				}
				if err != nil && g.d.OnRestart != nil && ctx.Err() == nil {
					g.d.OnRestart(err)
				}
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// running is the destination's workers, one per stream.
func (g *destWorkers) running() []*workerRun {
	g.mu.Lock()
	defer g.mu.Unlock()
	out := make([]*workerRun, 0, len(g.parts))
	for _, w := range g.parts {
		out = append(out, w)
	}
	slices.SortFunc(out, func(a, b *workerRun) int { return strings.Compare(a.p.name, b.p.name) })
	return out
}

// stopAll stops the workers on every stream. Copies fetched but not
// started go back to the queue at once (not after AckWait); attempts in
// progress get a grace period to finish, so that a stop does not make a
// backend see an event twice. Then they are cancelled and retried. (The
// callback stores nothing once stopped: it only hands copies back,
// noting that those deliveries were no attempts.)
func (g *destWorkers) stopAll() {
	g.mu.Lock()
	g.stopped = true
	g.mu.Unlock()
	runs := g.running()
	for _, w := range runs {
		w.supCancel()
		<-w.supervised // no new subscription from here on: w.cc is the last
	}
	for _, w := range runs {
		g.mu.Lock()
		last := w.cc
		g.mu.Unlock()
		if last != nil { // nil: paused since the start, never subscribed
			last.Drain()
		}
	}
	g.roomCancel() // held copies back to the stream
	<-g.roomDone
	// The hand-backs are published, not confirmed: on their way before
	// the connection may close (else they wait for the ack deadline).
	if g.s.conn.IsConnected() {
		_ = g.s.conn.FlushTimeout(time.Second)
	}
	idle := make(chan struct{})
	go func() { g.wg.Wait(); close(idle) }()
	grace := time.NewTimer(min(g.d.Timeout, g.d.StopGrace))
	select {
	case <-idle:
	case <-grace.C:
	case <-g.ctx.Done():
	}
	grace.Stop()
	g.cancelAttempts()
	<-idle
	for _, w := range runs {
		w.swCancel() // and a last sweep of what the attempts settled
		<-w.swept
	}
	g.client.CloseIdleConnections()
}

// destinationTransport is a destination's own HTTP transport: Go's
// defaults (proxy from the environment, HTTP/2 when the backend offers
// it, the same timeouts), with room to keep a connection open for every
// attempt in flight. The default transport, shared by the whole process,
// keeps 2 per host: with concurrency 4, every other attempt would open a
// new connection (and a TLS handshake) and close it after.
func destinationTransport(concurrency int) *http.Transport {
	t := &http.Transport{Proxy: http.ProxyFromEnvironment, ForceAttemptHTTP2: true, MaxIdleConns: 100,
		IdleConnTimeout: 90 * time.Second, TLSHandshakeTimeout: 10 * time.Second, ExpectContinueTimeout: time.Second}
	if dt, ok := http.DefaultTransport.(*http.Transport); ok {
		t = dt.Clone() // unless a program replaced it
	}
	t.MaxIdleConnsPerHost = max(concurrency, 2)
	t.MaxIdleConns = max(t.MaxIdleConns, t.MaxIdleConnsPerHost)
	return t
}

// makeConsumer creates (or updates) d's durable consumer on p, and p's
// stream first if it is gone (a configured partition's). On a cluster, it
// waits for the consumer's leader: a pull sent with none would find no
// one and be tried again only once the heartbeats are missed.
func (s *Store) makeConsumer(ctx context.Context, p *part, d Destination) (jetstream.Consumer, error) {
	cfg := s.sharedAckWait(ctx, p, consumerConfig(p, d))
	cons, err := s.js.CreateOrUpdateConsumer(ctx, p.name, cfg)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		if err = s.ensurePart(ctx, p); err == nil {
			cons, err = s.js.CreateOrUpdateConsumer(ctx, p.name, cfg)
		}
	}
	if err != nil {
		return nil, err
	}
	info, err := cons.Info(ctx)
	if err == nil && info.Cluster != nil && info.Cluster.Leader == "" {
		err = errNoLeader
	}
	return cons, err
}

// sharedAckWait keeps, on external NATS, the larger ack deadline of the
// consumer that gateways share: one started with a shorter timeout would
// otherwise cut the others' attempts short (the copy handed to another
// worker while one still attempts it: a duplicate), and two timeouts
// would flip it at every start. A WARN names the two. The embedded store
// has one owner, whose timeout is the deadline.
func (s *Store) sharedAckWait(ctx context.Context, p *part, cfg jetstream.ConsumerConfig) jetstream.ConsumerConfig {
	if s.server != nil {
		return cfg
	}
	cons, err := s.js.Consumer(ctx, p.name, cfg.Durable)
	if err != nil {
		return cfg // none yet (or not one of ours: making it says why)
	}
	running := cons.CachedInfo().Config.AckWait
	if running == cfg.AckWait {
		return cfg
	}
	fields := []zap.Field{zap.String("stream", p.name), zap.String("consumer", cfg.Durable), zap.Duration("configured", cfg.AckWait), zap.Duration("running", running)}
	if running > cfg.AckWait {
		s.log.Warn("queue: this config's ack deadline (the destination's timeout + 5s) is shorter than the shared consumer's; it keeps its own (a gateway never shortens it): give every gateway the same timeout", fields...)
		cfg.AckWait = running
	} else {
		s.log.Warn("queue: this config's ack deadline (the destination's timeout + 5s) is longer than the shared consumer's; raising the consumer's: give every gateway the same timeout", fields...)
	}
	return cfg
}

// consume subscribes the workers to cons.
func (w *workerRun) consume(cons jetstream.Consumer) (jetstream.ConsumeContext, error) {
	if info := cons.CachedInfo(); info != nil && !info.Created.Equal(w.created) {
		if !w.created.IsZero() {
			w.gen.Add(1) // another consumer than the one before
		}
		w.created = info.Created
		w.createdNano.Store(info.Created.UnixNano())
	}
	gen := w.gen.Load()
	handle := func(msg jetstream.Msg) { w.handle(&genMsg{Msg: msg, w: w, gen: gen}) }
	if w.pace != nil {
		// Paced: a copy is fetched only when a token is free.
		pp := w.pacedPull(cons, handle)
		w.mu.Lock()
		w.cc = pp
		w.mu.Unlock()
		return pp, nil
	}
	cc, err := cons.Consume(handle, jetstream.PullMaxMessages(w.d.Concurrency),
		// A pull waits at the consumer's leader. If that node dies, or
		// the pull found no leader, the missing heartbeats are what tells:
		// one a second, a new pull after two are missed (the default, half
		// the 30s expiry, would leave the destination idle for 30s after
		// a failover).
		jetstream.PullExpiry(5*time.Second), jetstream.PullHeartbeat(time.Second),
		jetstream.ConsumeErrHandler(func(_ jetstream.ConsumeContext, err error) {
			if w.d.OnError != nil {
				w.d.OnError(err)
			}
			select { // the supervisor checks the consumer now
			case w.poke <- struct{}{}:
			default:
			}
		}))
	if err != nil {
		return nil, err
	}
	w.mu.Lock()
	w.cc = cc
	w.mu.Unlock()
	return cc, nil
}

// handle is the subscription's callback: it starts an attempt of msg in a
// free slot, or hands msg back when the workers stop.
func (w *workerRun) handle(msg jetstream.Msg) {
	w.mu.Lock()
	stopped := w.stopped
	w.mu.Unlock()
	if stopped {
		w.s.handBack(msg) // stopping: back to the queue at once, for another worker
		return
	}
	if w.holding() {
		// Paused or tripped: back unattempted, not at once (the pull
		// already at the server would hand it straight back here).
		w.s.handBackAfter(msg, pauseCheckInterval)
		return
	}
	select {
	case w.slots <- struct{}{}:
	default:
		if !w.waitSlot(msg) {
			w.s.handBack(msg)
			return
		}
	}
	w.mu.Lock()
	if w.stopped {
		w.mu.Unlock()
		<-w.slots
		w.s.handBack(msg)
		return
	}
	w.wg.Add(1)
	w.mu.Unlock()
	// The ack deadline ran while the copy waited for a slot: start it
	// again, so that the server does not hand it to another worker while
	// this one attempts it.
	_ = msg.InProgress()
	go func() {
		defer w.wg.Done()
		// Once its POST is answered 2xx, an attempt settles (acknowledged,
		// confirmed, maybe deleted) in a slot of its own, so that the next
		// POST need not wait for that: at most concurrency attempts POST,
		// and as many settle, at once.
		settling := false
		posted := func() {
			w.settling <- struct{}{}
			<-w.slots
			settling = true
		}
		defer func() {
			if settling {
				<-w.settling
			} else {
				<-w.slots
			}
		}()
		if w.hold(msg) {
			return // an earlier copy of its object comes first
		}
		a := w.s.attempt(w.ctx, w.client, w.d, msg, w.sw, false, w.createdNano.Load(), posted)
		if w.observe != nil {
			w.observe(a)
		}
		if w.d.OrderObject && a.Result != "retry" {
			w.room.settle(msg.Subject()) // the next copy of its object may be waiting here
		}
		if w.br != nil && w.ctx.Err() == nil && w.br.record(a, time.Now()) {
			w.tellBreaker()
			w.pokeAll() // stop, or start again, pulling
		}
	}()
}

// waitSlot waits for a slot for msg, pushing its ack deadline back
// meanwhile: else the server hands it to another worker, and both
// attempt it. It reports false if the workers stop first.
func (w *workerRun) waitSlot(msg jetstream.Msg) bool {
	progress := time.NewTicker(holdProgress)
	defer progress.Stop()
	for {
		select {
		case w.slots <- struct{}{}:
			return true
		case <-progress.C:
			_ = msg.InProgress()
		case <-w.ctx.Done():
			return false
		}
	}
}

// holding reports whether the workers attempt nothing: the destination is
// paused, or its breaker tripped (then only probes are attempted).
func (g *destWorkers) holding() bool {
	return g.paused.Load() || (g.br != nil && g.br.tripped())
}

// tellBreaker tells OnBreaker the breaker's state (closed when it is
// off), unless the workers stopped: newer ones speak for the destination.
func (g *destWorkers) tellBreaker() {
	g.mu.Lock()
	stopped := g.stopped
	g.mu.Unlock()
	if g.d.OnBreaker == nil || stopped {
		return
	}
	var st BreakerState
	if g.br != nil {
		st = g.br.snapshot()
	}
	g.d.OnBreaker(st)
}

// pokeSupervisor makes the supervisor look at once.
func (w *workerRun) pokeSupervisor() {
	select {
	case w.poke <- struct{}{}:
	default:
	}
}

// pokeAll makes the supervisors of every stream look at once.
func (g *destWorkers) pokeAll() {
	for _, w := range g.running() {
		w.pokeSupervisor()
	}
}

// probe attempts the next due copy of a tripped destination, if there is
// one, from whichever stream of the queue has one (each probe starts
// with the next stream): a 2xx resets the breaker; a failure for the
// destination's reasons is not charged to the copy (attempt).
func (g *destWorkers) probe() {
	ok := false
	g.mu.Lock()
	if g.stopped {
		g.mu.Unlock()
		g.br.probed(false, time.Now())
		return
	}
	g.wg.Add(1)
	g.mu.Unlock()
	defer func() { // the outcome is told before a stop can end
		if g.br.probed(ok, time.Now()) {
			g.pokeAll() // pull again
		}
		g.tellBreaker()
		g.wg.Done()
	}()
	runs := g.running()
	first := int(g.probes.Add(1))
	for i := range runs {
		w := runs[(first+i)%len(runs)]
		got, delivered := w.probeOnce(i == len(runs)-1)
		if got {
			ok = delivered
			return
		}
	}
}

// probeOnce attempts as a probe the next due copy of w's stream, if there
// is one (waiting a little for it when wait is set): got reports whether
// there was one (not held behind an earlier copy of its object), ok
// whether it was delivered.
func (w *workerRun) probeOnce(wait bool) (got, ok bool) {
	cons := w.sw.consumer()
	var batch jetstream.MessageBatch
	var err error
	if wait {
		batch, err = cons.Fetch(1, jetstream.FetchMaxWait(2*time.Second))
	} else {
		batch, err = cons.FetchNoWait(1)
	}
	if err != nil {
		w.noticeGone(err)
		return false, false
	}
	gen := w.gen.Load()
	for msg := range batch.Messages() {
		m := &genMsg{Msg: msg, w: w, gen: gen}
		if w.hold(m) {
			continue
		}
		a := w.s.attempt(w.ctx, w.client, w.d, m, w.sw, true, w.createdNano.Load(), nil)
		if w.observe != nil {
			w.observe(a)
		}
		got, ok = true, a.Err == nil
	}
	w.noticeGone(batch.Error())
	return got, ok
}

// noticeGone has the supervisor make the consumer again when err says it,
// or its stream, is gone.
func (w *workerRun) noticeGone(err error) {
	if errors.Is(err, jetstream.ErrConsumerNotFound) || errors.Is(err, jetstream.ErrStreamNotFound) {
		w.needConsumer.Store(true)
		w.pokeSupervisor()
	}
}

// supervise keeps the workers subscribed until ctx ends: when the
// subscription ended by itself (a terminal pull error, a connection
// closed), or the consumer is gone (deleted by hand, its stream deleted or
// made again), it makes the consumer again and subscribes anew, trying
// every superviseInterval until it can. A consumer that exists but does
// not answer (NATS away, an election) is waited for: the subscription
// pulls again by itself.
func (w *workerRun) supervise(ctx context.Context, cons jetstream.Consumer, cc jetstream.ConsumeContext) {
	t := time.NewTicker(superviseInterval)
	defer t.Stop()
	p := time.NewTicker(pauseCheckInterval)
	defer p.Stop()
	var lastCheck time.Time   // of the consumer, while tripped
	var ended <-chan struct{} // nil once cc was stopped here: a closed channel would spin
	broken := cc == nil       // cc was stopped (or never made: paused), and no new subscription made yet
	// held: cc was stopped (or never made) on purpose, for a pause or a
	// trip: subscribing again is no restart to tell of.
	held := cc == nil
	if cc != nil {
		ended = cc.Closed()
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-ended:
			ended = nil
			broken = true
		case <-w.poke:
		case <-t.C:
		case <-p.C:
			wasHolding := w.holding()
			w.readPause(ctx)
			if !wasHolding && !w.holding() && !broken {
				continue // nothing changed (a stream's workers not subscribed
				// while another stream's read the resume go on below)
			}
		}
		if w.holding() {
			// Paused, or the breaker tripped: pull nothing more; what
			// was fetched goes back unattempted (handle), attempts in
			// progress end. A tripped destination's next due copy is
			// attempted as a probe every BreakerProbe.
			if !broken {
				cc.Drain()
				ended, broken, held = nil, true, true
			}
			if !w.paused.Load() {
				// Tripped: the probes need the consumer; one deleted
				// by hand (or its stream) is made again meanwhile.
				if nc := w.healWhileHolding(ctx, cons, &lastCheck); nc != nil {
					cons = nc
				}
				if w.br.probeDue(time.Now()) {
					go w.probe()
				}
			}
			continue
		}
		if !broken {
			ictx, cancel := context.WithTimeout(ctx, 5*time.Second)
			_, err := cons.Info(ictx)
			cancel()
			if !errors.Is(err, jetstream.ErrConsumerNotFound) && !errors.Is(err, jetstream.ErrStreamNotFound) {
				continue
			}
			w.gen.Add(1) // the copies it delivered settle nothing now
			cc.Stop()
			ended, broken = nil, true
		}
		if ctx.Err() != nil {
			return
		}
		mctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		nc, err := w.s.makeConsumer(mctx, w.p, *w.d)
		cancel()
		var ncc jetstream.ConsumeContext
		if err == nil {
			ncc, err = w.consume(nc)
		}
		if w.p.drainOnly() && errors.Is(err, jetstream.ErrStreamNotFound) {
			return // a stream only drained is gone: nothing is left to deliver from it
		}
		if err != nil {
			if ctx.Err() == nil && w.d.OnRestart != nil {
				w.d.OnRestart(err)
			}
			continue
		}
		w.sw.setConsumer(nc)
		cons, cc, ended, broken = nc, ncc, ncc.Closed(), false
		if w.d.OnRestart != nil && !held {
			w.d.OnRestart(nil)
		}
		held = false
	}
}

// consumerConfig is the durable consumer on p that d's workers share.
func consumerConfig(p *part, d Destination) jetstream.ConsumerConfig {
	return jetstream.ConsumerConfig{
		Durable:       "deliver_" + d.Name,
		FilterSubject: p.filter(d.Name),
		AckPolicy:     jetstream.AckExplicitPolicy,
		// An attempt's outcome is known within its timeout; a process that
		// dies mid-attempt has the copy redelivered after that.
		AckWait:    d.Timeout + 5*time.Second,
		MaxDeliver: -1, // attempts are counted here, against max_attempts and max_age
		// Copies waiting for a retry's delay count as pending acks: no
		// bound, or failing events would hold up the destination's new
		// ones (PullMaxMessages bounds what is fetched at once).
		MaxAckPending: -1,
	}
}

// RestoreConsumer applies d's consumer settings (the ack deadline its
// timeout gives) again, as StartWorkers did: after workers for another
// version of d, since stopped, changed them.
func (s *Store) RestoreConsumer(ctx context.Context, d Destination) error {
	if !ValidDestination(d.Name) {
		return fmt.Errorf("queue: destination name %q: use letters, digits, _ and - only", d.Name)
	}
	d.defaults()
	// On external NATS, the shared deadline is never shortened here either.
	for _, p := range s.drained(ctx) {
		if _, err := s.js.CreateOrUpdateConsumer(ctx, p.name, s.sharedAckWait(ctx, p, consumerConfig(p, d))); err != nil {
			if p.drainOnly() && errors.Is(err, jetstream.ErrStreamNotFound) {
				continue
			}
			return fmt.Errorf("queue: consumer for %s on %s: %v", d.Name, p.name, err)
		}
	}
	return nil
}

// attempt makes one delivery attempt of msg and settles it.
func (s *Store) attempt(ctx context.Context, client *http.Client, d *Destination, msg jetstream.Msg, sw *sweeper, probe bool, consumerCreated int64, posted func()) Attempt {
	a := Attempt{Destination: d.Name, EventID: msg.Headers().Get(HeaderEventID), EventType: msg.Headers().Get(HeaderEventType),
		Replay: msg.Headers().Get(HeaderReplay)}
	meta, err := msg.Metadata()
	if err != nil {
		a.Err, a.Result = err, "retry"
		_ = msg.NakWithDelay(d.delay(1))
		return a
	}
	// A copy stored after its consumer was made, delivered for the
	// first time, has no count to read.
	fresh := meta.NumDelivered <= 1 && consumerCreated != 0 && meta.Timestamp.UnixNano() > consumerCreated
	n, err := 0, error(nil)
	if !fresh {
		n, err = s.counted(ctx, meta)
	}
	a.Number = n + 1
	if err != nil {
		// The count cannot be read (the bucket unavailable): this
		// process's ledger of deliveries that were no attempt gives the
		// number; delivery never waits on the bucket.
		s.warnAttempts("read", err)
		a.Number = s.handBacks.attemptNumber(refOf(meta), meta.Timestamp, meta.NumDelivered, time.Now())
	}
	if s.buryAgain(ctx, d, msg, meta, sw, &a) {
		return a
	}
	start := time.Now()
	a.Status, a.RetryAfter, a.Err = s.post(ctx, client, d, msg, a.Number)
	if posted != nil && a.Err == nil {
		// Delivered: its settling need not hold up the next POST. (A
		// failure keeps its slot until it is settled: a copy delivered
		// again meanwhile, its consumer made again, must find it buried.)
		posted()
	}
	a.Duration = time.Since(start)
	if ctx.Err() != nil && a.Err != nil {
		// Stopped mid-attempt (a reload or shutdown): not the
		// destination's failure; the copy goes back to the queue. The
		// POST may have reached the backend: it counts.
		a.Result = "retry"
		if !probe {
			s.chargeOrWarn(context.WithoutCancel(ctx), meta, a.Number)
		}
		_ = msg.Nak()
		return a
	}
	if a.Err == nil {
		a.Result = "delivered"
		// Acknowledged and confirmed: a lost ack would mean one more
		// delivery, which Idempotency-Key lets the backend tell. Then
		// the copy leaves the stream, which must not fill up with what
		// was delivered.
		if d.OrderObject && sw.remove(context.WithoutCancel(ctx), msg, meta) {
			// Gone before it is acknowledged: the next copy of its object
			// may go at once, on any gateway (order.go).
			_ = msg.Ack()
			if a.Number > 1 {
				s.uncharge(context.WithoutCancel(ctx), meta)
			}
		} else if msg.DoubleAck(context.WithoutCancel(ctx)) == nil {
			sw.settle(meta.Sequence.Stream)
			if a.Number > 1 {
				s.uncharge(context.WithoutCancel(ctx), meta)
			}
		}
		s.handBacks.settled(refOf(meta))
		return a
	}
	if probe && destinationTrouble(a) {
		// A probe of a tripped destination that failed for the
		// destination's reasons is not charged to the copy: it waits
		// for the next probe, or the reset.
		a.NotCounted, a.Result = true, "retry"
		s.handBacks.add(refOf(meta), meta.Timestamp, meta.NumDelivered, time.Now())
		_ = msg.NakWithDelay(max(d.BreakerProbe, a.RetryAfter))
		return a
	}
	next := max(d.delay(a.Number), a.RetryAfter)
	// A 429 is the destination's pace, not the copy's failure: no
	// attempt is charged (this delivery goes in the hand-back ledger),
	// and only max_age bounds it.
	a.NotCounted = a.Status == http.StatusTooManyRequests
	if !a.NotCounted {
		// Charged to the copy, durably: the next delivery, here or on
		// another gateway, after a restart too, is attempt a.Number+1.
		s.chargeOrWarn(context.WithoutCancel(ctx), meta, a.Number)
	}
	if (!a.NotCounted && d.MaxAttempts > 0 && a.Number >= d.MaxAttempts) || time.Since(meta.Timestamp)+next > d.MaxAge {
		s.settleDead(ctx, d, msg, meta, sw, &a)
		return a
	}
	a.Result = "retry"
	if a.NotCounted {
		s.handBacks.add(refOf(meta), meta.Timestamp, meta.NumDelivered, time.Now())
	}
	_ = msg.NakWithDelay(next)
	return a
}

// post sends one attempt; any non-2xx is an error. It also returns the
// answer's Retry-After (retryAfter).
func (s *Store) post(ctx context.Context, client *http.Client, d *Destination, msg jetstream.Msg, n int) (int, time.Duration, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, d.URL, bytes.NewReader(msg.Data()))
	if err != nil {
		// Not err: a *url.Error quotes the URL, password and query included.
		return 0, 0, fmt.Errorf("%s: the destination's url is not a valid URL", d.Name)
	}
	for k, v := range d.Header {
		req.Header.Set(k, v)
	}
	req.Header.Set("Content-Type", "application/json")
	sig := msg.Headers().Get(HeaderSignature)
	if d.Sign != nil {
		sig = d.Sign(msg.Data(), time.Now())
	}
	req.Header.Set(HeaderSignature, sig)
	req.Header.Set(HeaderAttempt, strconv.Itoa(n))
	req.Header.Set(HeaderDestination, d.Name)
	if job := msg.Headers().Get(HeaderReplay); job != "" {
		req.Header.Set(HeaderReplay, job)
	}
	// The key as Enqueue kept it when the id needed encoding; else the
	// id, which is then its own key (a copy stored before keys were kept
	// is encoded here).
	if key := msg.Headers().Get(headerIdempotencyKey); key != "" {
		req.Header.Set("Idempotency-Key", key)
	} else if id := msg.Headers().Get(HeaderEventID); id != "" {
		req.Header.Set("Idempotency-Key", IdempotencyKey(id))
	}
	resp, err := client.Do(req)
	if err != nil {
		// Not the *url.Error: it would repeat the URL, query and all,
		// into logs and dead letters.
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return 0, 0, fmt.Errorf("%s: %v", d.Name, err)
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return resp.StatusCode, retryAfter(resp, time.Now()), fmt.Errorf("%s answered %d", d.Name, resp.StatusCode)
	}
	return resp.StatusCode, 0, nil
}

// errNoLeader is a clustered consumer without a leader, for now.
var errNoLeader = errors.New("the consumer has no leader yet")

// Status is what the queue holds for one destination, over every stream
// of the queue.
type Status struct {
	// Pending copies wait for their next attempt; InFlight are being
	// attempted (or wait for a retry's delay); Dead are dead letters (in
	// <stream>_DEAD).
	Pending, InFlight, Dead uint64
	// Oldest is when the oldest copy not yet delivered was stored; zero
	// when there is none.
	Oldest time.Time
	// LastDelivered is when the stream last handed a copy to a worker of
	// any instance (an attempt began); zero if never, or if the
	// destination has no consumer (NoConsumer).
	LastDelivered time.Time
	NoConsumer    bool
	// Paused: the destination's consumer is paused in NATS (by hand:
	// `nats consumer pause`): nothing is handed out until it resumes.
	Paused bool
	// Pause is set while an operator has paused the destination
	// (SetPaused): its copies wait on purpose.
	Pause *Pause
	// Held, of Pending and InFlight, wait for an earlier copy of their
	// object to be delivered or dead (order object; counted only when
	// Status is asked for an ordered destination).
	Held uint64
}

// Status reports destination's queue, from the streams: the same on every
// instance sharing them. ordered counts the copies held behind an earlier
// one of their object (Held), which reads every object's subject: only
// for a destination with order object.
func (s *Store) Status(ctx context.Context, destination string, ordered bool) (Status, error) {
	var st Status
	var err error
	if st.Dead, err = s.deadCount(ctx, destination); err != nil {
		return st, err
	}
	// The pause cannot be read (the bucket away): the rest of the
	// status still can; the workers keep the last state they read.
	st.Pause, _ = s.Paused(ctx, destination)
	for _, p := range s.drained(ctx) {
		err := s.partStatus(ctx, p, destination, &st)
		if p.drainOnly() && errors.Is(err, jetstream.ErrStreamNotFound) {
			continue // drained and deleted
		}
		if err != nil {
			return st, err
		}
	}
	if ordered {
		st.Held = s.held(ctx, destination)
	}
	return st, nil
}

// heldEvery is how often held is counted again; between, the last count
// is given (SPEC: "it may lag by up to 5 s").
const heldEvery = 5 * time.Second

// held counts destination's copies held behind an earlier one of their
// object: on every object subject, all but the first. It reads every such
// subject of every stream, so at most every heldEvery, within 3s; a
// count that cannot be made gives the last one (never an error: the rest
// of the status does not wait for it).
func (s *Store) held(ctx context.Context, destination string) uint64 {
	s.heldMu.Lock()
	defer s.heldMu.Unlock()
	last := s.heldCount[destination]
	if !last.at.IsZero() && time.Since(last.at) < heldEvery {
		return last.n
	}
	hctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	var n uint64
	for _, p := range s.drained(hctx) {
		if p.legacy {
			continue
		}
		_, subjects, err := subjectTotal(hctx, p, p.filter(destination))
		if err != nil {
			return last.n
		}
		for subject, c := range subjects {
			if c > 1 && isObjectSubject(subject) {
				n += c - 1 // all but the first of the object's
			}
		}
	}
	if s.heldCount == nil {
		s.heldCount = map[string]heldCount{}
	}
	s.heldCount[destination] = heldCount{n: n, at: time.Now()}
	return n
}

// heldCount is a count of held copies, and when it was made.
type heldCount struct {
	n  uint64
	at time.Time
}

// partStatus adds what p holds for destination to st.
func (s *Store) partStatus(ctx context.Context, p *part, destination string, st *Status) error {
	oldest := func(floor uint64) {
		m, err := p.stream.GetMsg(ctx, floor+1, jetstream.WithGetMsgSubject(p.filter(destination)))
		if err == nil && (st.Oldest.IsZero() || m.Time.Before(st.Oldest)) {
			st.Oldest = m.Time
		}
	}
	cons, err := p.stream.Consumer(ctx, "deliver_"+destination)
	if errors.Is(err, jetstream.ErrConsumerNotFound) || errors.Is(err, jetstream.ErrNotPullConsumer) {
		// No worker ever ran, or the consumer was deleted, or one made by
		// hand in its place is no use to the workers: everything stored
		// is pending.
		st.NoConsumer = true
		n, _, err := subjectTotal(ctx, p, p.filter(destination))
		if err != nil {
			return err
		}
		st.Pending += n
		if n > 0 {
			oldest(0)
		}
		return nil
	}
	if err != nil {
		return err
	}
	ci, err := cons.Info(ctx)
	if err != nil {
		return err
	}
	st.Pending += ci.NumPending
	st.InFlight += uint64(ci.NumAckPending)
	if ci.Delivered.Last != nil && ci.Delivered.Last.After(st.LastDelivered) {
		st.LastDelivered = *ci.Delivered.Last
	}
	st.Paused = st.Paused || ci.Paused
	if ci.NumPending+uint64(ci.NumAckPending) > 0 {
		oldest(ci.AckFloor.Stream)
	}
	return nil
}

// readPause reads whether the destination is paused, and tells OnPause of
// a change; it reports whether the workers may attempt (not paused). A
// pause that cannot be read keeps the last known state. The workers of
// every stream call it each second: it reads once for them all.
func (g *destWorkers) readPause(ctx context.Context) (active bool) {
	g.pauseMu.Lock()
	defer g.pauseMu.Unlock()
	if time.Since(g.pauseRead) < pauseCheckInterval/2 {
		return !g.paused.Load() // just read, for another stream's workers
	}
	g.pauseRead = time.Now()
	pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	pause, err := g.s.Paused(pctx, g.d.Name)
	cancel()
	if err != nil {
		return !g.paused.Load()
	}
	if paused := pause != nil; paused != g.paused.Load() {
		g.paused.Store(paused)
		// Every stream's workers stop (or start) pulling now, not at
		// their next look: a stream still pulling would fetch copies
		// only to hand them back.
		g.pokeAll()
		if g.d.OnPause != nil {
			g.d.OnPause(pause)
		}
	}
	if g.br != nil {
		// A resume on any gateway resets the breaker here too.
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		rev, err := g.s.resumed(rctx, g.d.Name)
		cancel()
		if err == nil {
			if g.resumeRead && rev > g.resumed && g.br.reset(time.Now()) {
				g.tellBreaker()
			}
			g.resumed = max(g.resumed, rev)
			g.resumeRead = true // a resume from before the workers started resets nothing
		}
	}
	return pause == nil
}

// healWhileHolding checks, at most every superviseInterval (or at once
// when a probe found it gone), that the consumer of a tripped destination
// still exists, and makes it again if not; it returns the new consumer,
// or nil.
func (w *workerRun) healWhileHolding(ctx context.Context, cons jetstream.Consumer, lastCheck *time.Time) jetstream.Consumer {
	if !w.needConsumer.Load() && time.Since(*lastCheck) < superviseInterval {
		return nil
	}
	*lastCheck = time.Now()
	ictx, cancel := context.WithTimeout(ctx, 5*time.Second)
	_, err := cons.Info(ictx)
	cancel()
	if !errors.Is(err, jetstream.ErrConsumerNotFound) && !errors.Is(err, jetstream.ErrStreamNotFound) {
		w.needConsumer.Store(false)
		return nil
	}
	mctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	nc, err := w.s.makeConsumer(mctx, w.p, *w.d)
	cancel()
	if err != nil {
		if ctx.Err() == nil && w.d.OnRestart != nil {
			w.d.OnRestart(err)
		}
		return nil
	}
	w.needConsumer.Store(false)
	w.gen.Add(1) // the copies the old one delivered settle nothing
	if info := nc.CachedInfo(); info != nil {
		w.created = info.Created
		w.createdNano.Store(info.Created.UnixNano())
	}
	w.sw.setConsumer(nc)
	if w.d.OnRestart != nil {
		w.d.OnRestart(nil)
	}
	return nc
}
