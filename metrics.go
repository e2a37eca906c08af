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
	})
	if registry == nil {
		return nil
	}
	for _, c := range []prometheus.Collector{muxMetrics.requests, muxMetrics.events, muxMetrics.responses, muxMetrics.verify} {
		if err := registry.Register(c); err != nil {
			if _, dup := errors.AsType[prometheus.AlreadyRegisteredError](err); !dup {
				return err
			}
		}
	}
	return nil
}

// outcomes is the bounded set of values of the outcome label.
var outcomes = map[string]bool{
	"verified": true, "duplicate": true, "in_flight": true,
	"method": true, "too_large": true, "read_body": true, "missing": true, "malformed": true,
	"no_v1": true, "mismatch": true, "expired": true, "future": true, "bad_json": true, "no_type": true,
}

// families are the event families the responses metric names.
var families = []string{
	"video.asset", "video.live_stream", "video.upload", "video.delivery",
	"robots.job", "robots.directive_run",
}

// metricType is typ if it is a known type, else "unknown".
func metricType(typ string) string {
	if IsKnownType(typ) {
		return typ
	}
	return "unknown"
}

// metricFamily is the family of a known type, else "unknown".
func metricFamily(typ string) string {
	if !IsKnownType(typ) {
		return "unknown"
	}
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

// observeMetrics records one request.
func observeMetrics(rec *requestRecord) {
	if muxMetrics.requests == nil {
		return
	}
	outcome := rec.outcome
	if !outcomes[outcome] {
		outcome = "other"
	}
	muxMetrics.requests.WithLabelValues(outcome).Inc()
	if rec.verifySeconds > 0 {
		muxMetrics.verify.Observe(rec.verifySeconds)
	}
	if rec.event == nil {
		return
	}
	muxMetrics.events.WithLabelValues(metricType(rec.event.Type)).Inc()
	if rec.reachedNext {
		muxMetrics.responses.WithLabelValues(metricFamily(rec.event.Type), codeClass(rec.status)).Inc()
	}
}
