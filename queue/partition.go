// Partitions: the queue is n streams, <stream>_0 … <stream>_<n-1>, each
// with its own store and fsyncs, so that accepts run in parallel. An
// event's copies land in the partition a hash of its object id picks (its
// event id when it has none), on a subject of their own:
// <stream>_<i>.deliver.<destination>.<key>. The key is what order object
// holds on (order.go), and what keeps the dedupe window: an event always
// lands in the same partition.
//
// Every gateway drains every partition stream that exists, and the single
// stream of earlier versions (<stream>, subjects <stream>.deliver.<dest>):
// changing partitions, or upgrading, strands nothing.

package queue

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
)

// Partitions' defaults: 4 on the embedded server (its partitions fsync in
// parallel); 1 with an external NATS, where a cluster already spreads
// streams over its nodes.
const (
	DefaultPartitions         = 4
	DefaultExternalPartitions = 1
	// MaxPartitions bounds partitions: each is a stream, with a consumer
	// per destination and its own files.
	MaxPartitions = 64
)

// HeaderKey is the stored copy's key: the subject token its object (or
// event) hashes to. A dead letter keeps it, so that a redelivered copy
// lands in its object's partition.
const HeaderKey = "Mux-Webhook-Key"

// part is one stream of the queue: a configured partition; or one only
// drained, which takes nothing new: a partition beyond the configured
// ones (extra), or the single stream of earlier versions (legacy).
type part struct {
	name          string
	legacy, extra bool
	stream        jetstream.Stream
}

// drainOnly reports whether p takes no new copies: it is never made
// again once gone.
func (p *part) drainOnly() bool { return p.legacy || p.extra }

// partName is partition i's stream.
func partName(stream string, i int) string { return stream + "_" + strconv.Itoa(i) }

// subject is where a copy of the object (or event) key for destination
// is stored in p.
func (p *part) subject(destination, key string) string {
	if p.legacy {
		return p.name + ".deliver." + destination
	}
	return p.name + ".deliver." + destination + "." + key
}

// filter is every subject of destination's copies in p.
func (p *part) filter(destination string) string {
	if p.legacy {
		return p.name + ".deliver." + destination
	}
	return p.name + ".deliver." + destination + ".*"
}

// destinationOf is the destination a subject of p stores copies for.
func (p *part) destinationOf(subject string) string {
	rest := strings.TrimPrefix(subject, p.name+".deliver.")
	if i := strings.IndexByte(rest, '.'); i >= 0 {
		return rest[:i]
	}
	return rest
}

// Key is the subject token of an event's copies: "o" and a hash of its
// object id, or "e" and a hash of its event id (as sent) when it has
// none. Copies of one object share it; an event without an object has
// one of its own, so order object never holds it.
func Key(objectID string, eventID []byte) string {
	if objectID != "" {
		sum := sha256.Sum256([]byte(objectID))
		return "o" + hex.EncodeToString(sum[:8])
	}
	sum := sha256.Sum256(eventID)
	return "e" + hex.EncodeToString(sum[:8])
}

// ordered reports whether key is an object's: copies with it are held
// behind earlier ones for an ordered destination.
func ordered(key string) bool { return strings.HasPrefix(key, "o") }

// partitionOf is the partition of n that key lands in.
func partitionOf(key string, n int) int {
	if len(key) < 17 || n <= 1 {
		return 0
	}
	b, err := hex.DecodeString(key[1:17]) // after "o" or "e"
	if err != nil {
		return 0
	}
	return int(binary.BigEndian.Uint64(b) % uint64(n))
}

// partConfig is partition i's stream: max_bytes is the total, split
// evenly.
func partConfig(cfg Config, i int) jetstream.StreamConfig {
	name := partName(cfg.Stream, i)
	return jetstream.StreamConfig{
		Name:       name,
		Subjects:   []string{name + ".deliver.>"},
		Storage:    jetstream.FileStorage,
		Retention:  jetstream.LimitsPolicy,
		Discard:    jetstream.DiscardNew, // full: refuse the new, keep the stored
		MaxBytes:   cfg.MaxBytes / int64(cfg.Partitions),
		Duplicates: cfg.DedupeWindow,
		Replicas:   cfg.Replicas,
		// order object asks the stream about a copy before each attempt:
		// a direct get skips JetStream's API (JSON, base64), and with one
		// replica it is answered by the one server that holds the stream,
		// never stale. (With more, a follower could answer before it has
		// the copy: the API's answer, from the leader, is used then.)
		AllowDirect: cfg.Replicas == 1,
	}
}

// openParts makes sure the configured partitions exist (with cfg's
// limits), and finds the single stream of earlier versions: drained if
// it holds copies, deleted if it is empty and the store is this
// process's alone.
func (s *Store) openParts(ctx context.Context, cfg Config) error {
	parts := make([]*part, cfg.Partitions)
	for i := range parts {
		var st jetstream.Stream
		err := retrySetup(ctx, func(ctx context.Context) (err error) {
			st, err = s.makePart(ctx, partConfig(cfg, i))
			return err
		})
		if err != nil {
			return fmt.Errorf("queue: creating stream %s: %v%s", partName(cfg.Stream, i), err, roomHint(err))
		}
		parts[i] = &part{name: partName(cfg.Stream, i), stream: st}
	}
	s.parts.Store(&parts)
	var legacy jetstream.Stream
	err := retrySetup(ctx, func(ctx context.Context) (err error) {
		legacy, err = s.js.Stream(ctx, cfg.Stream)
		if errors.Is(err, jetstream.ErrStreamNotFound) {
			legacy, err = nil, nil
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("queue: looking for the stream %s of earlier versions: %v", cfg.Stream, err)
	}
	if legacy == nil || !slices.Contains(legacy.CachedInfo().Config.Subjects, cfg.Stream+".deliver.>") {
		return nil // none, or not the queue of an earlier version
	}
	if st := legacy.CachedInfo().State; st.Msgs == 0 && !s.shared() {
		// Drained: its reserved bytes go back to the store.
		if err := s.js.DeleteStream(ctx, cfg.Stream); err == nil {
			s.log.Info("mux_webhook queue: the single stream of an earlier version is empty; deleted it", zap.String("stream", cfg.Stream))
			return nil
		}
	} else if st.Msgs > 0 {
		s.log.Info("mux_webhook queue: the single stream of an earlier version holds copies; they are delivered from it, new copies go to the partitions",
			zap.String("stream", cfg.Stream), zap.Uint64("copies", st.Msgs), zap.Int("partitions", cfg.Partitions))
	}
	s.legacy = &part{name: cfg.Stream, legacy: true, stream: legacy}
	return nil
}

// makePart creates or updates a partition's stream; on external NATS,
// where other gateways share it, without lowering what they set
// (applySharedStream).
func (s *Store) makePart(ctx context.Context, want jetstream.StreamConfig) (jetstream.Stream, error) {
	if s.shared() {
		return s.applySharedStream(ctx, want)
	}
	return s.js.CreateOrUpdateStream(ctx, want)
}

// configured is the partitions new copies go to.
func (s *Store) configured() []*part { return *s.parts.Load() }

// partScanInterval is how often the streams to drain are listed again: a
// gateway with more partitions (or an earlier config's) may have made
// some.
const partScanInterval = 10 * time.Second

// partsCache is the streams to drain, as last listed.
type partsCache struct {
	mu      sync.Mutex
	at      time.Time
	listing bool    // a listing is under way (not under mu: callers do not wait for it)
	extra   []*part // partitions beyond the configured ones
	warned  map[string]bool
}

// partitionName matches a partition's stream of stream base b.
func partitionName(b string) *regexp.Regexp {
	return regexp.MustCompile(`^` + regexp.QuoteMeta(b) + `_([0-9]+)$`)
}

// drained is every stream of the queue that holds (or may hold) copies:
// the configured partitions, others that exist (a larger partitions of
// another gateway or an earlier config), and the single stream of
// earlier versions. It lists the streams at most every partScanInterval.
func (s *Store) drained(ctx context.Context) []*part {
	out := slices.Clone(s.configured())
	if s.legacy != nil {
		out = append(out, s.legacy)
	}
	// One caller lists, the others take the last listing meanwhile: a
	// listing waits for NATS (up to 5s), which a stop must not. NATS
	// away: nobody lists (it would wait out its timeout for nothing).
	s.partsCache.mu.Lock()
	extra := s.partsCache.extra
	due := time.Since(s.partsCache.at) >= partScanInterval && !s.partsCache.listing && s.conn.IsConnected()
	s.partsCache.listing = s.partsCache.listing || due
	s.partsCache.mu.Unlock()
	if due {
		listed, err := s.listExtra(ctx)
		s.partsCache.mu.Lock()
		s.partsCache.listing = false
		if err == nil {
			s.partsCache.extra, s.partsCache.at = listed, time.Now()
			extra = listed
		}
		s.partsCache.mu.Unlock()
	}
	return append(out, extra...)
}

// listExtra lists the partition streams beyond the configured ones, and
// warns once of each: the gateways' partitions should agree.
func (s *Store) listExtra(ctx context.Context) ([]*part, error) {
	lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	re := partitionName(s.cfg.Stream)
	n := len(s.configured())
	names := s.js.StreamNames(lctx)
	var found []string
	for name := range names.Name() {
		if m := re.FindStringSubmatch(name); m != nil {
			if i, err := strconv.Atoi(m[1]); err == nil && i >= n && strconv.Itoa(i) == m[1] {
				found = append(found, name)
			}
		}
	}
	if err := names.Err(); err != nil {
		return nil, err
	}
	sort.Strings(found)
	var extra []*part
	for _, name := range found {
		st, err := s.js.Stream(lctx, name)
		if err != nil || !slices.Equal(st.CachedInfo().Config.Subjects, []string{name + ".deliver.>"}) {
			continue // not one of ours (another deployment's stream)
		}
		extra = append(extra, &part{name: name, extra: true, stream: st})
		s.partsCache.mu.Lock()
		if s.partsCache.warned == nil {
			s.partsCache.warned = map[string]bool{}
		}
		warn := !s.partsCache.warned[name]
		s.partsCache.warned[name] = true
		s.partsCache.mu.Unlock()
		if warn {
			s.log.Warn("mux_webhook queue: a partition stream beyond this config's partitions exists (another gateway's partitions, or an earlier config's): its copies are delivered, new ones go to this config's partitions; give every gateway the same partitions",
				zap.String("stream", name), zap.Int("partitions", n))
		}
	}
	return extra, nil
}

// ensurePart makes a configured partition's stream again if it is gone
// (deleted by hand, or to restore a backup); one that exists is left as
// it is.
func (s *Store) ensurePart(ctx context.Context, p *part) error {
	if p.drainOnly() {
		return jetstream.ErrStreamNotFound // never made again: nothing new goes there
	}
	_, err := s.js.Stream(ctx, p.name)
	if !errors.Is(err, jetstream.ErrStreamNotFound) {
		return err
	}
	cfg := s.config()
	i, _ := strconv.Atoi(strings.TrimPrefix(p.name, cfg.Stream+"_"))
	want := partConfig(cfg, i)
	if s.shared() {
		// Another gateway may make it at the same moment, with settings
		// of its own: the larger of each is kept, as at Open.
		_, err = s.applySharedStream(ctx, want)
	} else if _, err = s.js.CreateStream(ctx, want); errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
		err = nil
	}
	if err != nil {
		s.log.Error("mux_webhook queue: the stream is gone and could not be made again", zap.String("stream", p.name), zap.Error(err))
		return err
	}
	s.log.Warn("mux_webhook queue: the stream was gone (deleted by hand?); made it again", zap.String("stream", p.name))
	return nil
}

// subjectTotal sums the copies p holds on the subjects filter matches.
func subjectTotal(ctx context.Context, p *part, filter string) (uint64, map[string]uint64, error) {
	info, err := p.stream.Info(ctx, jetstream.WithSubjectFilter(filter))
	if err != nil {
		return 0, nil, err
	}
	var n uint64
	for _, c := range info.State.Subjects {
		n += c
	}
	return n, info.State.Subjects, nil
}
