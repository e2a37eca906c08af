// The mux_webhook app: the server-wide settings of the plugin, set with
// the Caddyfile global option
//
//	{
//		mux_webhook {
//			log_size 500
//			log_body 16KiB
//			queue { ... }
//			destination <name> <url> { ... }
//		}
//	}
//
// the live log's size and body cap, and the delivery queue's settings
// (deliver_config.go) and lifecycle: Provision opens nothing, Start opens
// the store and starts the workers, Stop stops them, Cleanup closes what
// this config alone used (deliver_reload.go says what outlives a reload).
// The app owns no entries: the live log (livelog.go) outlives config
// reloads; each config's app sets its size and body cap when it loads.

package muxwebhook

import (
	"fmt"
	"slices"
	"sync"

	"github.com/caddyserver/caddy/v2"
)

func init() {
	caddy.RegisterModule(App{})
}

// App holds the server-wide settings of the mux_webhook handlers.
type App struct {
	// LogSize is how many of the latest requests the live log keeps (the
	// admin API's /mux-webhook/ page and endpoints). 0 turns the live log
	// off. Default: 500.
	LogSize *int `json:"log_size,omitempty"`

	// LogBody is how many bytes of each verified body the live log keeps.
	// Default: 16 KiB.
	LogBody *int `json:"log_body,omitempty"`

	// Queue configures the delivery queue of mux_deliver (deliver_config.go): an
	// embedded NATS JetStream server by default.
	Queue *QueueConfig `json:"queue,omitempty"`

	// Destinations are where mux_deliver delivers, by name.
	Destinations map[string]*DestinationConfig `json:"destinations,omitempty"`

	// History keeps every verified event and delivery attempt for this
	// long, searchable and replayable (history.go): a duration such as
	// "7d", or "off". Default: 7d where a queue is configured (a
	// destination exists), else off. On a gateway without destinations,
	// turning it on opens the queue's store (if another process holds
	// it, history stays off, with a WARN).
	History string `json:"history,omitempty"`

	// HistoryMaxBytes bounds the history's stream; the oldest records go
	// first. Default: 1 GiB.
	HistoryMaxBytes int64 `json:"history_max_bytes,omitempty"`

	queue *appQueue

	// maxBody is the largest max_body of the config's mux_webhook
	// handlers (they tell the app when they are provisioned, before it
	// starts): the queue's messages must hold such an event.
	maxBody int64
}

// takesBody records that a mux_webhook handler of this config accepts
// bodies of up to n bytes.
func (a *App) takesBody(n int64) {
	a.maxBody = max(a.maxBody, n)
}

// CaddyModule returns the Caddy module information.
func (App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "mux_webhook",
		New: func() caddy.Module { return new(App) },
	}
}

// Provision checks the settings and applies them to the live log. It
// checks them itself: Caddy validates a module only after provisioning
// it, and a negative size must never reach the live log.
func (a *App) Provision(ctx caddy.Context) error {
	if err := a.Validate(); err != nil {
		return err
	}
	size, body := DefaultLogSize, DefaultLogBody
	if a.LogSize != nil {
		size = *a.LogSize
	}
	if a.LogBody != nil {
		body = *a.LogBody
	}
	liveLog.configure(size, body)
	if err := registerMetrics(ctx.GetMetricsRegistry()); err != nil {
		return fmt.Errorf("mux_webhook: registering metrics: %v", err)
	}
	var err error
	a.queue, err = a.provisionQueue(ctx)
	return err
}

// Validate checks the bounds.
func (a *App) Validate() error {
	if a.LogSize != nil && (*a.LogSize < 0 || *a.LogSize > 100000) {
		return fmt.Errorf("mux_webhook: log_size must be between 0 (off) and 100000, got %d", *a.LogSize)
	}
	if a.LogBody != nil && (*a.LogBody < 0 || *a.LogBody > 1<<20) {
		return fmt.Errorf("mux_webhook: log_body must be between 0 and 1MiB, got %d", *a.LogBody)
	}
	if _, _, err := a.historyAge(); err != nil {
		return err
	}
	if a.HistoryMaxBytes < 0 || a.HistoryMaxBytes > 1<<50 {
		return fmt.Errorf("mux_webhook: history_max_bytes must be a positive size, e.g. 1GiB; got %d", a.HistoryMaxBytes)
	}
	return nil
}

// running are the started apps, oldest first: the newest serves the
// admin API's queue endpoints. They must not ask the config's context for
// the app: the admin API serves while a config loads, and would provision
// a second app alongside the loader's (a data race, and a half-provisioned
// app for the handlers). A reload starts the new config's app before it
// stops the old one; a reload that Caddy rolls back stops the new app
// and the old one, still running, serves again.
var running struct {
	sync.Mutex
	apps []*App
}

// runningApp is the newest started app, or nil.
func runningApp() *App {
	running.Lock()
	defer running.Unlock()
	if n := len(running.apps); n > 0 {
		return running.apps[n-1]
	}
	return nil
}

// Start starts the delivery workers, if destinations are configured.
func (a *App) Start() error {
	if a.queue != nil {
		a.queue.qc.MaxBody = a.maxBody
		if err := a.queue.start(); err != nil {
			return err
		}
	}
	running.Lock()
	running.apps = append(running.apps, a)
	running.Unlock()
	return nil
}

// Stop stops the delivery workers; what they had not delivered stays
// queued. The live log's entries stay for the next config.
func (a *App) Stop() error {
	running.Lock()
	if i := slices.Index(running.apps, a); i >= 0 {
		running.apps = slices.Delete(running.apps, i, i+1)
	}
	running.Unlock()
	if a.queue != nil {
		a.queue.stop()
	}
	return nil
}

// Cleanup releases the queue's store; it is closed when no config uses it.
func (a *App) Cleanup() error {
	if a.queue != nil {
		a.queue.cleanup()
	}
	return nil
}

// Interface guards
var (
	_ caddy.App          = (*App)(nil)
	_ caddy.Provisioner  = (*App)(nil)
	_ caddy.Validator    = (*App)(nil)
	_ caddy.CleanerUpper = (*App)(nil)
)
