// History's glue: the settings (`history`, `history_max_bytes`), the
// history's lifetime (one queue.History per open store, in the store's
// pool entry: it outlives reloads with the store), and what is recorded:
// each verified event once its request is over (observe.go) and each
// delivery attempt (deliver_observe.go). The history itself, its search
// and replay are queue/history*.go and queue/replay.go; the endpoints
// history_admin.go; the command command_history.go.

package muxwebhook

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/queue"
)

// historyAge reads the history setting: its age, and whether it is on
// (the default where a queue is configured: a destination exists).
func (a *App) historyAge() (time.Duration, bool, error) {
	switch a.History {
	case "":
		return queue.DefaultHistoryAge, len(a.Destinations) > 0, nil
	case "off":
		return 0, false, nil
	}
	d, err := caddy.ParseDuration(a.History)
	if err != nil || d < time.Minute || d > 10*365*24*time.Hour {
		return 0, false, fmt.Errorf("mux_webhook: history %q: want a duration of at least 1m, e.g. 7d, or off", a.History)
	}
	return d, true, nil
}

// historyExplicit reports whether history is turned on by its own
// setting (it then opens the store on a gateway without destinations).
func (a *App) historyExplicit() bool { return a.History != "" && a.History != "off" }

// storeHistory is the history of one open store: opened by the first
// config with history on that starts on it, in the background (a start
// or a reload never waits for it: NATS may be away), closed with the
// store.
type storeHistory struct {
	mu       sync.Mutex
	hist     atomic.Pointer[queue.History] // written under mu, read by every request without it
	opening  bool
	disabled bool                // the newest config turned history off
	gen      uint64              // bumped by each config's start: the opener applies the latest
	cfg      queue.HistoryConfig // the latest config's settings
	done     chan struct{}       // closed by close: ends the opener
	wg       sync.WaitGroup
}

// historyRetry is how often an opener tries again while the history's
// stream cannot be made (NATS away, no room on the disk).
const historyRetry = 5 * time.Second

// openHistory opens (or reconfigures) h's history for d's settings, or
// turns it off, in the background: a start or a reload never waits for
// NATS. A failure never stops Caddy: events are answered as without
// history (and counted as dropped) until it opens; the first failure is
// logged.
func (d *appQueue) openHistory(h *pooledStore) {
	if h == nil {
		return
	}
	sh := &h.history
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if sh.done == nil {
		sh.done = make(chan struct{})
	}
	select {
	case <-sh.done:
		return // the store is closing
	default:
	}
	sh.gen++ // what the opener must apply (it loops until it applied the latest)
	sh.disabled = !d.historyOn.Load()
	if !sh.disabled {
		sh.cfg = d.historyCfg
	}
	if sh.opening {
		return // the opener takes the latest settings
	}
	sh.opening = true
	logger := d.logger
	sh.wg.Go(func() {
		warned := false
		for {
			sh.mu.Lock()
			gen, disabled, cfg, hist := sh.gen, sh.disabled, sh.cfg, sh.hist.Load()
			if disabled {
				sh.hist.Store(nil)
			}
			sh.mu.Unlock()
			var err error
			if disabled {
				hist.Close() // its writer and jobs stop (nil: nothing open)
			} else {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				go func() {
					select {
					case <-sh.done:
						cancel()
					case <-ctx.Done():
					}
				}()
				if hist != nil {
					err = hist.Reconfigure(ctx, cfg)
				} else if hist, err = h.OpenHistory(ctx, cfg); err == nil {
					sh.mu.Lock()
					sh.hist.Store(hist)
					sh.mu.Unlock()
					if warned {
						logger.Info("mux_webhook history: the history's stream is open; recording")
					}
				}
				cancel()
			}
			sh.mu.Lock()
			if err == nil && sh.gen == gen {
				// Applied the latest, under the lock that a reload's
				// settings take: none is lost.
				sh.opening = false
				sh.mu.Unlock()
				return
			}
			sh.mu.Unlock()
			if err == nil {
				continue // a reload changed the settings meanwhile
			}
			if !warned {
				logger.Warn("mux_webhook history: the history's stream cannot be opened or updated yet; events are answered as without history (counted in caddy_mux_webhook_history_dropped_total), tried again every 5s", zap.Error(err))
				warned = true
			}
			select {
			case <-sh.done:
				sh.mu.Lock()
				sh.opening = false
				sh.mu.Unlock()
				return
			case <-time.After(historyRetry):
			}
		}
	})
}

// off reports whether the newest config turned history off: events and
// attempts are then not counted as dropped.
func (sh *storeHistory) off() bool {
	sh.mu.Lock()
	defer sh.mu.Unlock()
	return sh.disabled
}

// close stops the opener and closes the history.
func (sh *storeHistory) close() {
	sh.mu.Lock()
	if sh.done == nil {
		sh.done = make(chan struct{})
	}
	select {
	case <-sh.done:
	default:
		close(sh.done)
	}
	sh.mu.Unlock()
	sh.wg.Wait()
	sh.mu.Lock()
	hist := sh.hist.Load()
	sh.mu.Unlock()
	hist.Close()
}

// history is the history d records to, or nil: off, or not open.
func (d *appQueue) history() *queue.History {
	if d == nil || !d.historyOn.Load() {
		return nil
	}
	h := d.handle.Load()
	if h == nil {
		return nil
	}
	return h.history.hist.Load() // every request: no lock
}

// historyConfig is the queue's history settings for a.
func (a *App) historyConfig(instance string) (queue.HistoryConfig, bool) {
	age, on, _ := a.historyAge()
	return queue.HistoryConfig{MaxAge: age, MaxBytes: a.HistoryMaxBytes, Instance: instance,
		TypeMatcher: func(pattern string) func(string) bool {
			return func(typ string) bool { return globMatch(pattern, typ) }
		},
		OnDrop: func() {
			if muxMetrics.historyDropped != nil {
				muxMetrics.historyDropped.Inc()
			}
		},
	}, on
}

// recordEvent keeps a verified event (or a duplicate of one) in history,
// once its request is over; rejected requests are never kept.
func (a *App) recordEvent(res *result) {
	if a == nil || a.queue == nil || res.event == nil || res.body == nil || res.outcome == nil {
		return
	}
	if res.outcome != OutcomeVerified && res.outcome != OutcomeDuplicate {
		return
	}
	if !a.queue.historyOn.Load() {
		return
	}
	hist := a.queue.history()
	if hist == nil {
		// On, but not open (the store is not open yet, or could not
		// make the stream): not recorded, and counted.
		a.queue.notRecorded()
		return
	}
	ev := res.event
	hist.RecordEvent(queue.EventRecord{Time: res.start, Outcome: res.outcome.Name, Type: ev.Type, ID: ev.ID,
		ObjectType: ev.ObjectType, ObjectID: ev.ObjectID, Status: res.status, Body: res.body})
}

// recordAttempt keeps a delivery attempt in history; while history is on
// but not open, it is counted as dropped.
func (d *appQueue) recordAttempt(a queue.Attempt) {
	if !d.historyOn.Load() {
		return
	}
	if hist := d.history(); hist != nil {
		hist.RecordAttempt(a)
	} else {
		d.notRecorded()
	}
}

// notRecorded counts a record history could not take while it is on but
// not open; not while a newer config turned it off (a reload).
func (d *appQueue) notRecorded() {
	if h := d.handle.Load(); h != nil && h.history.off() {
		return
	}
	if muxMetrics.historyDropped != nil {
		muxMetrics.historyDropped.Inc()
	}
}

// replayable says whether a replay job may queue for destination in
// this config: it exists, and signs (a replayed event carries no valid
// signature of Mux's). Jobs check it when they start, and when a gateway
// takes one up.
func (d *appQueue) replayable(destination string) error {
	dest, ok := d.destinations[destination]
	if !ok {
		return fmt.Errorf("replay: unknown destination %q: name a configured destination", destination)
	}
	if dest.Sign == nil {
		return fmt.Errorf("replay: destination %q has no sign: a replayed event would carry Mux's stale signature; give it `sign {env.…}`", destination)
	}
	return nil
}

// errHistoryOff answers the history's endpoints when it is off, saying
// why: the config's setting, or a store another process holds.
func errHistoryOff(app *App) error {
	switch {
	case app != nil && app.History == "off":
		return errors.New("history is off (`history off` in the mux_webhook global option): remove it, or set `history 7d`, to keep history")
	case app != nil && app.History != "":
		return errors.New("history is off: the queue's store could not be opened (another process may hold its directory; see the WARN in Caddy's log): give this Caddy its own `queue { dir }`")
	}
	return errors.New("history is off: set `history 7d` in the mux_webhook global option, or configure a destination")
}
