// What the delivery queue shows an operator: each attempt's log line,
// metrics and live log entry; the queue gauges read every 5 s; the stall
// watchdog (a destination whose copies wait with nothing attempted); and
// the warning about copies queued for destinations no longer configured.

package muxwebhook

import (
	"context"
	"net/http"
	"slices"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/queue"
)

// stallWatch is a destination's watchdog and what it last found.
type stallWatch struct {
	queue.Watchdog
	stalled bool
	since   time.Time // nothing progressed since then
}

// checkStall reads a destination's latest status into its watchdog and
// reports whether it is stalled now, since when, and whether that
// changed.
func (s *pooledStore) checkStall(dest queue.Destination, st queue.Status, now time.Time) (stalled bool, since time.Time, changed bool) {
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
	if st.Pause == nil && s.stats[dest.Name] != nil && s.stats[dest.Name].breaker.Tripped {
		w.Hold(now) // its copies wait on purpose, for the next probe
	}
	stalled, since = w.Check(dest, st, now)
	changed = stalled != w.stalled
	w.stalled, w.since = stalled, since
	return stalled, since, changed
}

// holdStalls stops the watchdogs' clocks up to now: the queue is down,
// and says so itself.
func (s *pooledStore) holdStalls(now time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, w := range s.watch {
		w.Hold(now)
	}
}

// stall is what the watchdog last found of destination.
func (s *pooledStore) stall(destination string) (stalled bool, since time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if w := s.watch[destination]; w != nil {
		return w.stalled, w.since
	}
	return false, time.Time{}
}

// warnOrphans logs the copies queued for destinations the config no
// longer has: they are kept (a destination configured again under its
// name delivers them) and count against max_bytes. It runs with the
// gauges, not in start: a reload must not wait for a queue that does
// not answer just to say this.
func (d *appQueue) warnOrphans(ctx context.Context) {
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

// queueGaugeInterval is how often the queue gauges are read from the
// stream.
const queueGaugeInterval = 5 * time.Second

// gauges keeps the queue metrics current until ctx ends.
func (d *appQueue) gauges(ctx context.Context) {
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
		var paused []string
		for name := range d.destinations {
			qctx, cancel := context.WithTimeout(ctx, queueGaugeInterval)
			st, err := d.store().Status(qctx, name, d.destinations[name].OrderObject)
			cancel()
			if err != nil {
				if ctx.Err() == nil {
					up = 0
				}
				continue
			}
			muxMetrics.queuePending.WithLabelValues(name).Set(float64(st.Pending + st.InFlight))
			muxMetrics.queueDead.WithLabelValues(name).Set(float64(st.Dead))
			muxMetrics.queueHeld.WithLabelValues(name).Set(float64(st.Held))
			oldest := 0.0
			if !st.Oldest.IsZero() {
				oldest = time.Since(st.Oldest).Seconds()
			}
			muxMetrics.queueOldest.WithLabelValues(name).Set(oldest)
			setState(name, destinationState(st, d.handle.Load().stat(name).breaker))
			if st.Pause != nil {
				paused = append(paused, name)
			}
			d.watchStall(name, st)
		}
		if len(paused) > 0 {
			d.warnFilling(ctx, paused)
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
func (d *appQueue) watchStall(name string, st queue.Status) {
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
func (d *appQueue) dropRemovedGauges() {
	gauged.Lock()
	defer gauged.Unlock()
	for name := range gauged.names {
		if _, ok := d.destinations[name]; !ok {
			muxMetrics.queuePending.DeleteLabelValues(name)
			muxMetrics.queueDead.DeleteLabelValues(name)
			muxMetrics.queueHeld.DeleteLabelValues(name)
			muxMetrics.queueOldest.DeleteLabelValues(name)
			muxMetrics.queueStalled.DeleteLabelValues(name)
			for _, s := range destinationStates {
				muxMetrics.destState.DeleteLabelValues(name, s)
			}
			delete(gauged.names, name)
		}
	}
	for name := range d.destinations {
		gauged.names[name] = true
	}
}

func (d *appQueue) logAttempt(a queue.Attempt) {
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
	if a.Result != "" {
		d.recordAttempt(a)
	}

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

// destinationStates are the states a destination can be in (the status's
// state, the metric caddy_mux_webhook_destination_state).
var destinationStates = []string{"active", "paused", "tripped"}

// destinationState is the state a destination is in: paused (by an
// operator, from its status), tripped (its breaker in this process), or
// active.
func destinationState(st queue.Status, b queue.BreakerState) string {
	switch {
	case st.Pause != nil:
		return "paused"
	case b.Tripped:
		return "tripped"
	}
	return "active"
}

// setState sets the state metric of a destination: 1 for state, 0 for the
// others.
func setState(name, state string) {
	for _, s := range destinationStates {
		v := 0.0
		if s == state {
			v = 1
		}
		muxMetrics.destState.WithLabelValues(name, s).Set(v)
	}
}

// fillWarnEvery spaces the WARN lines of a stream filling up behind a
// paused destination.
const fillWarnEvery = time.Minute

// warnFilling says, at WARN and at most once a minute, that the stream is
// at 80 % of max_bytes or more while destinations are paused: their events
// fill the stream shared with the others, and a full stream makes
// mux_deliver answer 503.
func (d *appQueue) warnFilling(ctx context.Context, paused []string) {
	qctx, cancel := context.WithTimeout(ctx, queueGaugeInterval)
	bytes, maxBytes, err := d.store().Usage(qctx)
	cancel()
	if err != nil || maxBytes <= 0 || bytes*5 < uint64(maxBytes)*4 {
		return
	}
	if time.Since(d.lastFillWarn) < fillWarnEvery {
		return
	}
	d.lastFillWarn = time.Now()
	slices.Sort(paused)
	d.logger.Warn("mux_webhook queue: the stream is filling up while destinations are paused; when it is full, mux_deliver answers 503: resume them, or raise max_bytes",
		zap.Strings("paused", paused), zap.Uint64("bytes", bytes), zap.Int64("max_bytes", maxBytes),
		zap.Float64("used", float64(bytes)/float64(maxBytes)), zap.String("instance", d.instance))
}
