// Prometheus metrics, on Caddy's own /metrics. Every label comes from a
// bounded set: outcomes are the gateway's fixed list, types are catalog
// types or "unknown", families a fixed list or "unknown", codes a class.

package muxwebhook

import (
	"errors"
	"strings"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

var muxMetrics = struct {
	once      sync.Once
	requests  *prometheus.CounterVec
	events    *prometheus.CounterVec
	responses *prometheus.CounterVec
	verify    prometheus.Histogram

	// The delivery queue's, labelled by configured destination names only.
	queuePending *prometheus.GaugeVec
	queueDead    *prometheus.GaugeVec
	queueHeld    *prometheus.GaugeVec
	queueOldest  *prometheus.GaugeVec
	queueStalled *prometheus.GaugeVec
	destState    *prometheus.GaugeVec
	deliveries   *prometheus.CounterVec
	deliveryTime *prometheus.HistogramVec
	enqueueFails *prometheus.CounterVec
	// deadLetterFails counts copies at their last attempt that could not
	// be kept as dead letters (<stream>_DEAD full or unavailable).
	deadLetterFails *prometheus.CounterVec
	// queueDuplicates counts events mux_deliver did not queue again: the
	// same id within the dedupe window.
	queueDuplicates *prometheus.CounterVec
	queueUp         prometheus.Gauge
	// instance says which configured instance this process is: Prometheus
	// labels each scrape with its target (instance="host:port"); joined
	// on that, deliveries_total reads by instance name.
	instance *prometheus.GaugeVec
	// historyDropped counts history records that could not be written.
	historyDropped prometheus.Counter
}{}

// registerMetrics creates the collectors once per process and registers
// them on the config's registry (a reload brings a new registry).
func registerMetrics(registry *prometheus.Registry) error {
	const ns, sub = "caddy", "mux_webhook"
	muxMetrics.once.Do(func() {
		muxMetrics.requests = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "requests_total",
			Help: "Requests the mux_webhook handler saw, by outcome: verified, duplicate, or the reason of the rejection.",
		}, []string{"outcome"})
		muxMetrics.events = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "events_total",
			Help: "Verified Mux events, by type (a known type, else unknown).",
		}, []string{"type"})
		muxMetrics.responses = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "responses_total",
			Help: "Answers of the route to verified events, by event family (e.g. video.asset) and status class.",
		}, []string{"family", "code"})
		muxMetrics.verify = prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: ns, Subsystem: sub, Name: "verify_duration_seconds",
			Help:    "Time to verify a delivery: header, MAC, timestamp and JSON, after the body was read.",
			Buckets: []float64{.00001, .000025, .00005, .0001, .00025, .0005, .001, .0025, .005, .01},
		})
		muxMetrics.queuePending = prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "queue_pending",
			Help: "Events queued for a destination and not yet delivered (waiting or being attempted).",
		}, []string{"destination"})
		muxMetrics.queueDead = prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "queue_dead",
			Help: "Dead letters of a destination.",
		}, []string{"destination"})
		muxMetrics.queueHeld = prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "queue_held",
			Help: "Events of a destination with order object that wait for an earlier event of their object to be delivered or dead (part of queue_pending; read every 5s).",
		}, []string{"destination"})
		muxMetrics.queueOldest = prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "queue_oldest_pending_seconds",
			Help: "Age of the oldest event queued for a destination and not yet delivered (0 when none).",
		}, []string{"destination"})
		muxMetrics.queueStalled = prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "queue_stalled",
			Help: "1 while a destination is stalled: events wait and nothing was attempted for longer than their retry schedule allows (the destination's stall_after, default 1m, past the next due attempt); else 0.",
		}, []string{"destination"})
		muxMetrics.destState = prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "destination_state",
			Help: "1 for a destination's current state, 0 for the others: active, paused by an operator (caddy mux-webhook queue pause), or tripped by its breaker in this instance.",
		}, []string{"destination", "state"})
		muxMetrics.deliveries = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "deliveries_total",
			Help: "Delivery attempts by this instance, by destination and result: delivered, retry, dead.",
		}, []string{"destination", "result"})
		muxMetrics.deliveryTime = prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: ns, Subsystem: sub, Name: "delivery_duration_seconds",
			Help:    "Time of one delivery attempt, by destination.",
			Buckets: prometheus.DefBuckets,
		}, []string{"destination"})
		muxMetrics.enqueueFails = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "enqueue_failures_total",
			Help: "Events mux_deliver could not queue (answered 503), by destination and reason: full (max_bytes) or unavailable (the queue did not answer within enqueue_timeout, or refused).",
		}, []string{"destination", "reason"})
		muxMetrics.deadLetterFails = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "dead_letter_failures_total",
			Help: "Copies at their last attempt (max_attempts or max_age) that could not be kept as dead letters, by destination: the dead letters' stream is full (dead_max_bytes) or unavailable. The copy stays queued and is tried again at the last retry interval.",
		}, []string{"destination"})
		muxMetrics.queueDuplicates = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "queue_duplicates_total",
			Help: "Events mux_deliver answered 202 without queuing them again, by destination: the same event id was queued for it within the dedupe window.",
		}, []string{"destination"})
		muxMetrics.queueUp = prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "queue_up",
			Help: "1 if this instance's last reading of the delivery queue (every 5s) succeeded, 0 if the queue did not answer.",
		})
		muxMetrics.instance = prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "instance",
			Help: "1, labelled with this instance's name (the queue's nats instance, else the host name): what deliveries_total counts is this instance's.",
		}, []string{"name"})
		muxMetrics.historyDropped = prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "history_dropped_total",
			Help: "History records (verified events, delivery attempts, minute summaries) that could not be written: the writer's buffer was full, or the store was unavailable or refused them. The events themselves were answered as without history.",
		})
	})
	if registry == nil {
		return nil
	}
	for _, c := range muxCollectors() {
		if err := registry.Register(c); err != nil {
			if _, dup := errors.AsType[prometheus.AlreadyRegisteredError](err); !dup {
				return err
			}
		}
	}
	return nil
}

// muxCollectors are the plugin's metrics, once registerMetrics made them.
func muxCollectors() []prometheus.Collector {
	return []prometheus.Collector{muxMetrics.requests, muxMetrics.events, muxMetrics.responses, muxMetrics.verify,
		muxMetrics.queuePending, muxMetrics.queueDead, muxMetrics.queueHeld, muxMetrics.queueOldest, muxMetrics.queueStalled, muxMetrics.destState, muxMetrics.deliveries, muxMetrics.deliveryTime,
		muxMetrics.enqueueFails, muxMetrics.deadLetterFails, muxMetrics.queueDuplicates, muxMetrics.queueUp, muxMetrics.instance, muxMetrics.historyDropped}
}

// families are the event families the responses metric names.
var families = []string{
	"video.asset", "video.live_stream", "video.upload", "video.delivery",
	"robots.job", "robots.directive_run",
}

// metricType is the catalog's own copy of typ if it is a known type (a
// label value is kept for the life of the process: it must not share the
// request body's memory), else "unknown".
func metricType(typ string) string {
	if known, ok := knownType(typ); ok {
		return known
	}
	return "unknown"
}

// metricFamily is the family of typ - known or new, since Mux adds types
// to its families over time - else "unknown".
func metricFamily(typ string) string {
	for _, f := range families {
		if strings.HasPrefix(typ, f+".") {
			return f
		}
	}
	return "unknown"
}

// codeClass is "2xx", "3xx", "4xx" or "5xx" (or "other").
func codeClass(status int) string {
	switch {
	case status >= 200 && status < 300:
		return "2xx"
	case status >= 300 && status < 400:
		return "3xx"
	case status >= 400 && status < 500:
		return "4xx"
	case status >= 500 && status < 600:
		return "5xx"
	}
	return "other"
}

// observeMetrics records one request. Every label value is a constant
// of this package or of the catalog.
func observeMetrics(res *result) {
	if muxMetrics.requests == nil {
		return
	}
	outcome := "other"
	if outcomes[res.outcome.Name] {
		outcome = res.outcome.Name
	}
	muxMetrics.requests.WithLabelValues(outcome).Inc()
	if res.verifySeconds > 0 {
		muxMetrics.verify.Observe(res.verifySeconds)
	}
	if res.event == nil {
		return
	}
	muxMetrics.events.WithLabelValues(metricType(res.event.Type)).Inc()
	if res.route != nil {
		muxMetrics.responses.WithLabelValues(metricFamily(res.event.Type), codeClass(res.status)).Inc()
	}
}
