// Duplicate suppression: Mux retries for a day and may deliver an event
// again even after a 2xx. With `dedupe`, an event id whose delivery the
// route answered 2xx is answered 200 again, without calling the next
// handler, for a window; the same id arriving while its first delivery is
// still in flight gets 409, so Mux retries later.
//
// Delivered ids live in a bounded in-memory record shared across config
// reloads and, with `storage`, in Caddy's configured storage, so that
// several instances sharing it suppress each other's duplicates.

package muxwebhook

import (
	"container/list"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"

	"github.com/caddyserver/caddy/v2"
)

// Dedupe defaults, as documented in the README.
const (
	DefaultDedupeWindow     = 24 * time.Hour
	DefaultDedupeMaxEntries = 100000
	// maxPurgePerPass bounds the storage records one purge pass visits.
	maxPurgePerPass = 10000
)

// Dedupe configures duplicate suppression by event id.
type Dedupe struct {
	// Window is how long an event id stays delivered after the route
	// answered 2xx for it. Default: 24h (Mux retries for about a day).
	Window caddy.Duration `json:"window,omitempty"`

	// MaxEntries bounds the in-memory record of ids; the oldest are
	// forgotten first. Default: 100000 (about 20 MB at most).
	MaxEntries int `json:"max_entries,omitempty"`

	// Storage also records delivered ids in Caddy's configured storage
	// (the `storage` global option; the file system by default), so that
	// Caddy instances sharing it suppress each other's duplicates. Expired
	// records are purged. With a storage that supports TryLock (the file
	// system does), an id in flight on another instance also gets 409.
	Storage bool `json:"storage,omitempty"`
}

// ErrInFlight is the failure of a delivery whose event id is being
// delivered right now; it is answered 409.
var ErrInFlight = errors.New("the same event id is being delivered right now")

// dedupeVerdict is what the record says about an arriving event id.
type dedupeVerdict int

const (
	dedupeProceed dedupeVerdict = iota
	dedupeDuplicate
	dedupeInFlight
)

// dedupeEntry is one id in the in-memory record.
type dedupeEntry struct {
	id        string
	delivered bool
	at        time.Time // when it went in flight, or was delivered
}

// memoryRecord is the bounded in-memory record of event ids, oldest first.
type memoryRecord struct {
	mu      sync.Mutex
	max     int
	window  time.Duration
	byID    map[string]*list.Element
	ordered *list.List
}

func newMemoryRecord(max int, window time.Duration) *memoryRecord {
	return &memoryRecord{max: max, window: window, byID: map[string]*list.Element{}, ordered: list.New()}
}

// Destruct implements caddy.Destructor for the usage pool.
func (m *memoryRecord) Destruct() error { return nil }

// begin checks id and, if it may proceed, marks it in flight.
func (m *memoryRecord) begin(id string, now time.Time) dedupeVerdict {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.expire(now)
	if el, ok := m.byID[id]; ok {
		if el.Value.(*dedupeEntry).delivered {
			return dedupeDuplicate
		}
		return dedupeInFlight
	}
	m.byID[id] = m.ordered.PushBack(&dedupeEntry{id: id, at: now})
	for m.ordered.Len() > m.max {
		m.remove(m.ordered.Front())
	}
	return dedupeProceed
}

// markDelivered records id as delivered at now (also for ids the storage
// reported delivered by another instance).
func (m *memoryRecord) markDelivered(id string, now time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if el, ok := m.byID[id]; ok {
		e := el.Value.(*dedupeEntry)
		e.delivered, e.at = true, now
		m.ordered.MoveToBack(el)
		return
	}
	m.byID[id] = m.ordered.PushBack(&dedupeEntry{id: id, delivered: true, at: now})
	for m.ordered.Len() > m.max {
		m.remove(m.ordered.Front())
	}
}

// forget drops id: its delivery did not succeed.
func (m *memoryRecord) forget(id string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if el, ok := m.byID[id]; ok {
		m.remove(el)
	}
}

// expire drops delivered ids older than the window from the front.
func (m *memoryRecord) expire(now time.Time) {
	for el := m.ordered.Front(); el != nil; el = m.ordered.Front() {
		e := el.Value.(*dedupeEntry)
		if !e.delivered || now.Sub(e.at) <= m.window {
			return
		}
		m.remove(el)
	}
}

func (m *memoryRecord) remove(el *list.Element) {
	delete(m.byID, el.Value.(*dedupeEntry).id)
	m.ordered.Remove(el)
}

func (m *memoryRecord) len() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.ordered.Len()
}

// records holds the in-memory records across config reloads, keyed by
// scope (which secrets) and bounds.
var records = caddy.NewUsagePool()

// deduper is the provisioned form of Dedupe for one handler.
type deduper struct {
	cfg      Dedupe
	scope    string // hex; identifies the endpoint (its secrets), never reveals them
	poolKey  string
	memory   *memoryRecord
	storage  certmagic.Storage // nil without `storage`
	logger   *zap.Logger
	now      func() time.Time
	stopOnce sync.Once
}

func (d *Dedupe) provision(ctx caddy.Context, secrets [][]byte, logger *zap.Logger, now func() time.Time) (*deduper, error) {
	cfg := *d
	if cfg.Window == 0 {
		cfg.Window = caddy.Duration(DefaultDedupeWindow)
	}
	if cfg.MaxEntries == 0 {
		cfg.MaxEntries = DefaultDedupeMaxEntries
	}
	// Each Mux endpoint (secret) gets every event, with the same ids: two
	// endpoints must not suppress each other, so the scope is the secrets.
	h := sha256.New()
	for _, s := range secrets {
		h.Write([]byte(strconv.Itoa(len(s))))
		h.Write(s)
	}
	scope := hex.EncodeToString(h.Sum(nil))[:16]
	dd := &deduper{cfg: cfg, scope: scope, logger: logger, now: now}
	dd.poolKey = fmt.Sprintf("mux_webhook.dedupe.%s.%d.%d", scope, cfg.MaxEntries, time.Duration(cfg.Window))
	val, _, err := records.LoadOrNew(dd.poolKey, func() (caddy.Destructor, error) {
		return newMemoryRecord(cfg.MaxEntries, time.Duration(cfg.Window)), nil
	})
	if err != nil {
		return nil, err
	}
	dd.memory = val.(*memoryRecord)
	if cfg.Storage {
		dd.storage = ctx.Storage()
		go dd.purgeLoop(ctx)
	}
	return dd, nil
}

func (d *Dedupe) validate() error {
	if d.Window < 0 {
		return fmt.Errorf("mux_webhook: dedupe window must be greater than 0")
	}
	if d.MaxEntries < 0 {
		return fmt.Errorf("mux_webhook: dedupe max_entries must be greater than 0")
	}
	return nil
}

func (dd *deduper) cleanup() {
	dd.stopOnce.Do(func() { _, _ = records.Delete(dd.poolKey) })
}

// storageKey is where the delivered record of id lives; the id is hashed,
// so any id makes a safe, fixed-length key.
func (dd *deduper) storageKey(id string) string {
	sum := sha256.Sum256([]byte(id))
	return "mux_webhook/dedupe/" + dd.scope + "/" + hex.EncodeToString(sum[:])
}

func (dd *deduper) lockName(id string) string {
	return strings.ReplaceAll(dd.storageKey(id), "/", "_")
}

// storedRecord is what the storage holds for a delivered id.
type storedRecord struct {
	ID          string `json:"id"`
	DeliveredAt int64  `json:"delivered_at"`
	Expires     int64  `json:"expires"`
}

// serve calls forward for a verified event unless its id was delivered or
// is in flight.
func (dd *deduper) serve(ctx context.Context, w http.ResponseWriter, ev *Event, rec *requestRecord, forward func() (int, error)) error {
	if ev.ID == "" {
		_, err := forward()
		return err
	}
	switch dd.memory.begin(ev.ID, dd.now()) {
	case dedupeDuplicate:
		return dd.answerDuplicate(w, rec)
	case dedupeInFlight:
		return rec.reject(http.StatusConflict, ErrInFlight)
	}
	unlock := func() {}
	if dd.storage != nil {
		if delivered := dd.storedDelivered(ctx, ev.ID); delivered {
			dd.memory.markDelivered(ev.ID, dd.now())
			return dd.answerDuplicate(w, rec)
		}
		if locker, ok := dd.storage.(certmagic.TryLocker); ok {
			name := dd.lockName(ev.ID)
			got, err := locker.TryLock(ctx, name)
			switch {
			case err != nil:
				dd.logger.Warn("dedupe: could not take the storage lock; delivering anyway", zap.String("id", ev.ID), zap.Error(err))
			case !got:
				dd.memory.forget(ev.ID)
				return rec.reject(http.StatusConflict, ErrInFlight)
			default:
				unlock = func() {
					if err := dd.storage.Unlock(context.WithoutCancel(ctx), name); err != nil {
						dd.logger.Warn("dedupe: could not release the storage lock", zap.String("id", ev.ID), zap.Error(err))
					}
				}
			}
		}
	}
	defer unlock()

	status, err := forward()
	if status < 200 || status > 299 {
		dd.memory.forget(ev.ID)
		return err
	}
	now := dd.now()
	dd.memory.markDelivered(ev.ID, now)
	if dd.storage != nil {
		sr := storedRecord{ID: ev.ID, DeliveredAt: now.Unix(), Expires: now.Add(time.Duration(dd.cfg.Window)).Unix()}
		b, _ := json.Marshal(sr)
		if serr := dd.storage.Store(context.WithoutCancel(ctx), dd.storageKey(ev.ID), b); serr != nil {
			dd.logger.Warn("dedupe: could not record the delivery in storage", zap.String("id", ev.ID), zap.Error(serr))
		}
	}
	return err
}

// storedDelivered reports whether storage holds an unexpired record of id.
// Storage errors count as "not delivered": forwarding a possible duplicate
// is safer than dropping an event.
func (dd *deduper) storedDelivered(ctx context.Context, id string) bool {
	b, err := dd.storage.Load(ctx, dd.storageKey(id))
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			dd.logger.Warn("dedupe: could not read storage; delivering", zap.String("id", id), zap.Error(err))
		}
		return false
	}
	var rec storedRecord
	if json.Unmarshal(b, &rec) != nil {
		return false
	}
	return dd.now().Unix() <= rec.Expires
}

// answerDuplicate answers 200 for an id already delivered.
func (dd *deduper) answerDuplicate(w http.ResponseWriter, rec *requestRecord) error {
	rec.outcome, rec.status = "duplicate", http.StatusOK
	w.WriteHeader(http.StatusOK)
	return nil
}

// purgeLoop deletes expired records from storage until ctx is done.
func (dd *deduper) purgeLoop(ctx caddy.Context) {
	interval := min(max(time.Duration(dd.cfg.Window)/4, time.Second), time.Hour)
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			dd.purge(ctx)
		}
	}
}

// purge deletes up to maxPurgePerPass expired records of this scope.
func (dd *deduper) purge(ctx context.Context) int {
	prefix := "mux_webhook/dedupe/" + dd.scope
	keys, err := dd.storage.List(ctx, prefix, false)
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			dd.logger.Warn("dedupe: could not list storage for purging", zap.Error(err))
		}
		return 0
	}
	now := dd.now().Unix()
	purged := 0
	for i, key := range keys {
		if i >= maxPurgePerPass || ctx.Err() != nil {
			break
		}
		b, err := dd.storage.Load(ctx, key)
		if err != nil {
			continue
		}
		var rec storedRecord
		if json.Unmarshal(b, &rec) == nil && now <= rec.Expires {
			continue
		}
		if dd.storage.Delete(ctx, key) == nil {
			purged++
		}
	}
	if purged > 0 {
		dd.logger.Debug("dedupe: purged expired records", zap.Int("count", purged))
	}
	return purged
}
