// The mux_deliver handler: a terminal handler that answers 202 once every
// named destination's copy of the verified event is stored in the delivery
// queue (package queue), 503 if one could not be.
//
//	mux_deliver [<matcher>] <destination>...
//
// The rest of the queue's Caddy glue: its settings in deliver_config.go,
// what outlives a config reload in deliver_reload.go, its log lines,
// metrics and stall watchdog in deliver_observe.go, the admin API in
// deliver_admin.go and the CLI in command_queue.go.

package muxwebhook

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"go.uber.org/zap"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/queue"
)

func init() {
	caddy.RegisterModule(DeliverHandler{})
}

// DeliverHandler is the mux_deliver handler: a terminal handler that stores one
// copy of the event mux_webhook verified earlier in the request per named
// destination, and answers 202 once all are stored (503 if any could not
// be, within enqueue_timeout; Mux's retry is then stored once per
// destination, thanks to the dedupe window). Without a verified event it
// answers 500 and stores nothing.
type DeliverHandler struct {
	// Destinations are names configured with the mux_webhook global
	// option's destination lines.
	Destinations []string `json:"destinations,omitempty"`

	queue  *appQueue
	logger *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (DeliverHandler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.mux_deliver",
		New: func() caddy.Module { return new(DeliverHandler) },
	}
}

// Provision finds the destinations in the mux_webhook app.
func (h *DeliverHandler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	if len(h.Destinations) == 0 {
		return errors.New("mux_deliver: name at least one destination, e.g. mux_deliver app")
	}
	appVal, err := ctx.App("mux_webhook")
	if err != nil {
		return fmt.Errorf("mux_deliver: loading the mux_webhook app: %v", err)
	}
	d := appVal.(*App).queue
	for _, name := range h.Destinations {
		if d == nil || d.destinations[name].Name == "" {
			return fmt.Errorf("mux_deliver: unknown destination %q; declare it in the global options: mux_webhook { destination %s <url> }", name, name)
		}
	}
	h.queue = d
	return nil
}

// ServeHTTP stores the verified event for every destination.
func (h *DeliverHandler) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	ev := EventFromRequest(r)
	if ev == nil {
		h.logger.Error("mux_deliver: no verified event in this request; put mux_webhook before it in the route", zap.String("uri", r.RequestURI))
		return caddyhttp.Error(http.StatusInternalServerError, errors.New("mux_deliver: no verified event"))
	}
	ctx, cancel := context.WithTimeout(r.Context(), time.Duration(h.queue.cfg.EnqueueTimeout))
	defer cancel()
	store := h.queue.store()
	if store == nil {
		// Caddy starts its apps in no fixed order: a request may come in
		// before the queue is open. It waits, within enqueue_timeout.
		select {
		case <-h.queue.opened:
			store = h.queue.store()
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
			Destination: name, EventID: key, ObjectID: ev.ObjectID, Type: ev.Type, ID: ev.ID, Body: ev.Body,
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
	_ caddyhttp.MiddlewareHandler = (*DeliverHandler)(nil)
	_ caddy.Provisioner           = (*DeliverHandler)(nil)
)
