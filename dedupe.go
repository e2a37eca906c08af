// Duplicate suppression: Mux retries for a day and may deliver an event
// again even after a 2xx. With `dedupe`, an event id whose delivery the
// route answered 2xx is answered 200 again, without calling the next
// handler, for a window; the same id arriving while its first delivery is
// still in flight gets 409, so Mux retries later.
//
// The handler asks twice: claim (may this id go to the route?) and, once
// the request is over, finish (was it delivered?). Everything else - the
// answers, the log line - is the handler's.
//
// Ids are keyed exactly: by a hash of the id's JSON as sent, so that ids
// JSON would read alike (7 and "7", two invalid bytes that both read as
// U+FFFD) stay apart and no id, however long, is kept in full.
//
// Delivered ids live in a bounded in-memory record per Mux endpoint,
// shared across config reloads - also reloads that change the window or
// the bound, or add or drop a secret while rotating - and, with `storage`,
// in Caddy's configured storage, so that instances sharing it deliver each
// id once.

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
	"slices"
	"sync"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"

	"github.com/caddyserver/caddy/v2"
)

// Dedupe defaults and bounds, as documented in the README.
const (
	DefaultDedupeWindow     = 24 * time.Hour
	DefaultDedupeMaxEntries = 100000
	// MaxDedupeMaxEntries bounds max_entries (about 150 bytes each).
	MaxDedupeMaxEntries = 100_000_000
	// storageLockWait bounds the wait for a storage lock that does not
	// support TryLock; then the request is answered 409.
	storageLockWait = 2 * time.Second
	// maxStoredID bounds the id text kept in a storage record (for people
	// reading it; the key is a hash).
	maxStoredID = 256
)

// maxPurgePerPass bounds the storage records one purge pass visits (a
// variable for tests).
var maxPurgePerPass = 10000

// Dedupe configures duplicate suppression by event id.
type Dedupe struct {
	// Window is how long an event id stays delivered after the route
	// answered 2xx for it. Default: 24h (Mux retries for about a day).
	Window caddy.Duration `json:"window,omitempty"`

	// MaxEntries bounds the in-memory record of ids; the oldest are
	// forgotten first. Default: 100000 (about 15 MB at most).
	MaxEntries int `json:"max_entries,omitempty"`

	// Storage also records delivered ids in Caddy's configured storage
	// (the `storage` global option; the file system by default), so that
	// Caddy instances sharing it deliver each id once: an instance takes
	// the id's storage lock, checks the record, runs the route, writes the
	// record and only then releases the lock. Another instance receiving
	// the id meanwhile gets 409 (Mux retries), later 200. Expired records
	// are purged.
	Storage bool `json:"storage,omitempty"`
}

// dedupeVerdict is what the record says about an arriving event id.
type dedupeVerdict int

const (
	dedupeProceed dedupeVerdict = iota
	dedupeDuplicate
	dedupeInFlight
)

// idKey identifies an event id exactly: SHA-256 of its JSON as sent.
type idKey [sha256.Size]byte

func keyOf(ev *Event) idKey { return sha256.Sum256(ev.IDRaw) }

// dedupeEntry is one id in the in-memory record.
type dedupeEntry struct {
	key       idKey
	delivered bool
	at        time.Time // when it went in flight, or was delivered
}

// memoryRecord is the bounded in-memory record of event ids, oldest first.
// In-flight ids are kept apart from delivered ones, so that an id stuck in
// flight never holds up the expiry of the delivered ids behind it.
type memoryRecord struct {
	mu        sync.Mutex
	max       int
	window    time.Duration
	byKey     map[idKey]*list.Element
	delivered *list.List // *dedupeEntry, oldest first
	inFlight  *list.List // *dedupeEntry, oldest first

	// Owned by recordPool.mu: the bounds each config using the record
	// asked for, and the scopes it is known by.
	users  map[*deduper]recordLimits
	scopes []string
}

// recordLimits are one config's bounds of a record.
type recordLimits struct {
	max    int
	window time.Duration
}

func newMemoryRecord(max int, window time.Duration) *memoryRecord {
	return &memoryRecord{max: max, window: window, byKey: map[idKey]*list.Element{}, delivered: list.New(), inFlight: list.New()}
}

// setLimits applies bounds, dropping the oldest ids if the record is now
// too large.
func (m *memoryRecord) setLimits(max int, window time.Duration) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.max, m.window = max, window
	m.trim()
}

// begin checks key and, if it may proceed, marks it in flight.
func (m *memoryRecord) begin(key idKey, now time.Time) dedupeVerdict {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.expire(now)
	if el, ok := m.byKey[key]; ok {
		if el.Value.(*dedupeEntry).delivered {
			return dedupeDuplicate
		}
		return dedupeInFlight
	}
	m.byKey[key] = m.inFlight.PushBack(&dedupeEntry{key: key, at: now})
	m.trim()
	return dedupeProceed
}

// markDelivered records key as delivered at now (also for ids the storage
// reported delivered by another instance).
func (m *memoryRecord) markDelivered(key idKey, now time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if el, ok := m.byKey[key]; ok {
		m.remove(el)
	}
	m.byKey[key] = m.delivered.PushBack(&dedupeEntry{key: key, delivered: true, at: now})
	m.trim()
}

// forget drops key: its delivery did not succeed.
func (m *memoryRecord) forget(key idKey) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if el, ok := m.byKey[key]; ok {
		m.remove(el)
	}
}

// expire drops delivered ids older than the window.
func (m *memoryRecord) expire(now time.Time) {
	for el := m.delivered.Front(); el != nil; el = m.delivered.Front() {
		if now.Sub(el.Value.(*dedupeEntry).at) <= m.window {
			return
		}
		m.remove(el)
	}
}

// trim drops the oldest delivered ids (then, only if every entry is in
// flight, the oldest in flight) beyond max.
func (m *memoryRecord) trim() {
	for len(m.byKey) > max(m.max, 1) {
		el := m.delivered.Front()
		if el == nil {
			el = m.inFlight.Front()
		}
		m.remove(el)
	}
}

func (m *memoryRecord) remove(el *list.Element) {
	e := el.Value.(*dedupeEntry)
	delete(m.byKey, e.key)
	if e.delivered {
		m.delivered.Remove(el)
	} else {
		m.inFlight.Remove(el)
	}
}

func (m *memoryRecord) len() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.byKey)
}

// recordPool holds the in-memory records across config reloads. A record
// belongs to a Mux endpoint, known by the fingerprints of its secrets: a
// new config whose secrets share any fingerprint with a record's gets that
// record, whatever its window and bound, so a reload that tunes dedupe or
// rotates a secret (A, then A and B, then B) keeps what was delivered.
// Two endpoints have different secrets, and so never share a record.
type recordPool struct {
	mu      sync.Mutex
	byScope map[string]*memoryRecord
}

var records = &recordPool{byScope: map[string]*memoryRecord{}}

// acquire returns the record of the endpoint with these scopes, created if
// none exists, for user with its bounds; release it when the config ends.
// While several configs use a record - the running one and the one being
// loaded - it keeps the largest of their bounds: a reload that fails, or
// has not yet replaced the running config, never shrinks what the running
// config remembers.
func (p *recordPool) acquire(user *deduper, scopes []string, lim recordLimits) *memoryRecord {
	p.mu.Lock()
	defer p.mu.Unlock()
	var rec *memoryRecord
	for _, s := range scopes {
		if rec = p.byScope[s]; rec != nil {
			break
		}
	}
	if rec == nil {
		rec = newMemoryRecord(lim.max, lim.window)
		rec.users = map[*deduper]recordLimits{}
	}
	for _, s := range scopes {
		if p.byScope[s] == nil {
			p.byScope[s] = rec
			rec.scopes = append(rec.scopes, s)
		}
	}
	rec.users[user] = lim
	rec.applyLimits()
	return rec
}

// applyLimits sets the largest bounds any user asked for. The caller holds
// the pool's lock.
func (m *memoryRecord) applyLimits() {
	var lim recordLimits
	for _, l := range m.users {
		lim.max, lim.window = max(lim.max, l.max), max(lim.window, l.window)
	}
	m.setLimits(lim.max, lim.window)
}

// release gives up user's use of rec; the last one drops it.
func (p *recordPool) release(user *deduper, rec *memoryRecord) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(rec.users, user)
	if len(rec.users) > 0 {
		rec.applyLimits()
		return
	}
	for _, s := range rec.scopes {
		if p.byScope[s] == rec {
			delete(p.byScope, s)
		}
	}
	rec.scopes = nil
}

// deduper is the provisioned form of Dedupe for one handler.
type deduper struct {
	cfg         Dedupe
	scopes      []string // sorted fingerprints of the secrets; never reveal them
	memory      *memoryRecord
	storage     certmagic.Storage // nil without `storage`
	logger      *zap.Logger
	now         func() time.Time
	releaseOnce sync.Once
	// purgeAfter is, per scope, the last storage key a purge pass
	// visited: the next pass goes on from there, so that with more than
	// maxPurgePerPass records every one is visited in turn.
	purgeAfter map[string]string
}

// scopeOf fingerprints one secret: it names the endpoint in the pool and
// in storage keys without revealing the secret.
func scopeOf(secret []byte) string {
	h := sha256.New()
	h.Write([]byte("mux_webhook dedupe scope\x00"))
	h.Write(secret)
	return hex.EncodeToString(h.Sum(nil))[:16]
}

func (d *Dedupe) provision(ctx caddy.Context, secrets [][]byte, logger *zap.Logger, now func() time.Time) (*deduper, error) {
	cfg := *d
	if cfg.Window == 0 {
		cfg.Window = caddy.Duration(DefaultDedupeWindow)
	}
	if cfg.MaxEntries == 0 {
		cfg.MaxEntries = DefaultDedupeMaxEntries
	}
	dd := &deduper{cfg: cfg, logger: logger, now: now}
	for _, s := range secrets {
		dd.scopes = append(dd.scopes, scopeOf(s))
	}
	slices.Sort(dd.scopes)
	dd.scopes = slices.Compact(dd.scopes)
	dd.memory = records.acquire(dd, dd.scopes, recordLimits{cfg.MaxEntries, time.Duration(cfg.Window)})
	if cfg.Storage {
		dd.storage = ctx.Storage()
		go dd.purgeLoop(ctx)
	}
	return dd, nil
}

func (d *Dedupe) validate() error {
	if d.Window < 0 {
		return fmt.Errorf("mux_webhook: dedupe window must be greater than 0 (or unset for the default 24h), got %s", time.Duration(d.Window))
	}
	if d.MaxEntries < 0 || d.MaxEntries > MaxDedupeMaxEntries {
		return fmt.Errorf("mux_webhook: dedupe max_entries must be between 1 and %d (or unset for the default 100000), got %d", MaxDedupeMaxEntries, d.MaxEntries)
	}
	return nil
}

func (dd *deduper) cleanup() {
	dd.releaseOnce.Do(func() { records.release(dd, dd.memory) })
}

// storageKey is where the delivered record of an id lives under one scope.
func storageKey(scope string, key idKey) string {
	return "mux_webhook/dedupe/" + scope + "/" + hex.EncodeToString(key[:])
}

func lockName(scope string, key idKey) string {
	return "mux_webhook_dedupe_" + scope + "_" + hex.EncodeToString(key[:])
}

// storedRecord is what the storage holds for a delivered id.
type storedRecord struct {
	ID          string `json:"id"`
	DeliveredAt int64  `json:"delivered_at"`
	Expires     int64  `json:"expires"`
}

// dedupeClaim is an id a request may deliver; finish it exactly once.
type dedupeClaim struct {
	dd     *deduper
	ctx    context.Context
	key    idKey
	id     string
	locked []string // storage lock names held
}

// claim decides whether a verified event may go to the route. With
// dedupeProceed it returns a claim that the caller must finish.
func (dd *deduper) claim(ctx context.Context, ev *Event) (*dedupeClaim, dedupeVerdict) {
	if len(ev.IDRaw) == 0 || ev.ID == "" {
		return nil, dedupeProceed // no id to know it by
	}
	c := &dedupeClaim{dd: dd, ctx: context.WithoutCancel(ctx), key: keyOf(ev), id: ev.ID}
	switch v := dd.memory.begin(c.key, dd.now()); v {
	case dedupeDuplicate, dedupeInFlight:
		return nil, v
	}
	if dd.storage == nil {
		return c, dedupeProceed
	}
	// A storage module that panics must not leave the id in flight, or
	// its locks held, for ever.
	defer func() {
		if p := recover(); p != nil {
			dd.memory.forget(c.key)
			c.unlock()
			panic(p)
		}
	}()
	// Lock first, then read: a record written by the instance that held
	// the lock before us is seen; without the lock nobody writes one.
	if !c.lock(ctx) {
		dd.memory.forget(c.key)
		c.unlock()
		return nil, dedupeInFlight
	}
	if at, ok := dd.storedDelivered(ctx, c.key); ok {
		dd.memory.markDelivered(c.key, at)
		c.unlock()
		return nil, dedupeDuplicate
	}
	return c, dedupeProceed
}

// lock takes the id's storage lock under every scope (several only while
// a secret is being rotated), in a fixed order. A storage that fails to
// lock is logged and passed: delivering a possible duplicate is safer than
// losing an event.
func (c *dedupeClaim) lock(ctx context.Context) bool {
	for _, scope := range c.dd.scopes {
		name := lockName(scope, c.key)
		var got bool
		var err error
		if tl, ok := c.dd.storage.(certmagic.TryLocker); ok {
			got, err = tl.TryLock(ctx, name)
		} else {
			lctx, cancel := context.WithTimeout(ctx, storageLockWait)
			err = c.dd.storage.Lock(lctx, name)
			cancel()
			got = err == nil
			if errors.Is(err, context.DeadlineExceeded) {
				err = nil
			}
		}
		switch {
		case err != nil:
			c.dd.logger.Warn("dedupe: could not take the storage lock; delivering anyway",
				zap.String("id", c.id), zap.Error(err))
		case !got:
			return false
		default:
			c.locked = append(c.locked, name)
		}
	}
	return true
}

func (c *dedupeClaim) unlock() {
	for _, name := range c.locked {
		if err := c.dd.storage.Unlock(c.ctx, name); err != nil {
			c.dd.logger.Warn("dedupe: could not release the storage lock", zap.String("id", c.id), zap.Error(err))
		}
	}
	c.locked = nil
}

// finish ends the claim: a delivered id is remembered (in memory and in
// storage, before the lock is released); any other outcome - a non-2xx
// answer, a panic in the route - releases it so that Mux's retry is
// delivered. A nil claim is a no-op.
func (c *dedupeClaim) finish(delivered bool) {
	if c == nil {
		return
	}
	dd := c.dd
	defer c.unlock()
	if !delivered {
		dd.memory.forget(c.key)
		return
	}
	now := dd.now()
	dd.memory.markDelivered(c.key, now)
	if dd.storage == nil {
		return
	}
	id := c.id
	if len(id) > maxStoredID {
		id = id[:maxStoredID]
	}
	b, _ := json.Marshal(storedRecord{ID: id, DeliveredAt: now.Unix(), Expires: now.Add(time.Duration(dd.cfg.Window)).Unix()})
	for _, scope := range dd.scopes {
		if err := dd.storage.Store(c.ctx, storageKey(scope, c.key), b); err != nil {
			dd.logger.Warn("dedupe: could not record the delivery in storage", zap.String("id", c.id), zap.Error(err))
		}
	}
}

// storedDelivered reports whether storage holds an unexpired record of
// key under any scope, and when it was delivered. Storage errors count as
// "not delivered": forwarding a possible duplicate is safer than dropping
// an event.
func (dd *deduper) storedDelivered(ctx context.Context, key idKey) (time.Time, bool) {
	for _, scope := range dd.scopes {
		b, err := dd.storage.Load(ctx, storageKey(scope, key))
		if err != nil {
			if !errors.Is(err, fs.ErrNotExist) {
				dd.logger.Warn("dedupe: could not read storage; delivering", zap.Error(err))
			}
			continue
		}
		var rec storedRecord
		if json.Unmarshal(b, &rec) == nil && dd.now().Unix() <= rec.Expires {
			return time.Unix(rec.DeliveredAt, 0), true
		}
	}
	return time.Time{}, false
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

// purge deletes up to maxPurgePerPass expired records of this endpoint.
func (dd *deduper) purge(ctx context.Context) int {
	now := dd.now().Unix()
	purged, visited := 0, 0
	if dd.purgeAfter == nil {
		dd.purgeAfter = map[string]string{}
	}
	for _, scope := range dd.scopes {
		keys, err := dd.storage.List(ctx, "mux_webhook/dedupe/"+scope, false)
		if err != nil {
			if !errors.Is(err, fs.ErrNotExist) {
				dd.logger.Warn("dedupe: could not list storage for purging", zap.Error(err))
			}
			continue
		}
		slices.Sort(keys)
		// Go on after the last key the previous pass visited, wrapping.
		from, _ := slices.BinarySearch(keys, dd.purgeAfter[scope]+"\x00")
		keys = append(keys[from:], keys[:from]...)
		for _, key := range keys {
			if visited >= maxPurgePerPass || ctx.Err() != nil {
				break
			}
			visited++
			dd.purgeAfter[scope] = key
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
	}
	if purged > 0 {
		dd.logger.Debug("dedupe: purged expired records", zap.Int("count", purged))
	}
	return purged
}
