// The live log: a bounded ring of the latest requests the mux_webhook
// handlers saw, with subscribers for the admin API's event stream.
//
// There is one per process (liveLog below), owned by no config: it keeps
// its entries across config reloads, while each config's mux_webhook app
// sets its size and body cap.

package muxwebhook

import (
	"net/http"
	"strings"
	"sync"
	"time"
	"unicode/utf8"
)

// Live log defaults and bounds, as documented in docs/observability.md.
const (
	DefaultLogSize = 500
	DefaultLogBody = 16 << 10
	// maxSubscribers bounds concurrent event streams.
	maxSubscribers = 32
	// subscriberBuffer is how many entries a slow stream may lag behind
	// before it misses some.
	subscriberBuffer = 256
	// Header bounds for an entry: count, and bytes per name and per value.
	maxLoggedHeaders     = 64
	maxLoggedHeaderBytes = 512
	// maxLoggedFieldBytes bounds each of an entry's other text fields
	// (type, id, object, environment, method, URI, remote address).
	maxLoggedFieldBytes = 1 << 10
)

// cutMark ends a text that the live log cut short.
const cutMark = "…"

// redactedHeaders never appear in the live log as they were sent.
var redactedHeaders = map[string]bool{
	"Mux-Signature":       true,
	"Authorization":       true,
	"Proxy-Authorization": true,
	"Cookie":              true,
}

// LogEntry is one request as the live log shows it.
type LogEntry struct {
	Seq             uint64              `json:"seq"`
	Time            time.Time           `json:"time"`
	Outcome         string              `json:"outcome"`
	Status          int                 `json:"status"`
	DurationMS      float64             `json:"duration_ms"`
	Type            string              `json:"type,omitempty"`
	ID              string              `json:"id,omitempty"`
	ObjectType      string              `json:"object_type,omitempty"`
	ObjectID        string              `json:"object_id,omitempty"`
	EnvironmentID   string              `json:"environment_id,omitempty"`
	Attempts        int                 `json:"attempts"`
	Method          string              `json:"method"`
	URI             string              `json:"uri"`
	RemoteIP        string              `json:"remote_ip"`
	Headers         map[string][]string `json:"headers"`
	Body            string              `json:"body,omitempty"`
	BodyTruncated   bool                `json:"body_truncated,omitempty"`
	BodyUnavailable string              `json:"body_unavailable,omitempty"`
	// For a delivery attempt of mux_deliver (outcome delivered, retry or
	// dead): the destination, the attempt's number, its error and the
	// instance that made it.
	Destination string `json:"destination,omitempty"`
	Attempt     int    `json:"attempt,omitempty"`
	Error       string `json:"error,omitempty"`
	Instance    string `json:"instance,omitempty"`
}

// liveLogState is the ring and its subscribers.
type liveLogState struct {
	mu      sync.Mutex
	size    int
	bodyMax int
	ring    []LogEntry // ring[(start+i)%len] is the i-th oldest
	start   int
	count   int
	seq     uint64
	subs    map[chan LogEntry]struct{}
}

// liveLog is the process's live log.
var liveLog = &liveLogState{size: DefaultLogSize, bodyMax: DefaultLogBody, subs: map[chan LogEntry]struct{}{}}

// configure sets the size and body cap, keeping the newest entries.
func (l *liveLogState) configure(size, bodyMax int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if size == l.size && bodyMax == l.bodyMax && l.ring != nil {
		return
	}
	keep := l.snapshotLocked()
	if len(keep) > size {
		keep = keep[len(keep)-size:]
	}
	l.size, l.bodyMax = size, bodyMax
	l.ring = make([]LogEntry, size)
	l.start, l.count = 0, 0
	for _, e := range keep {
		e.cutBody(bodyMax)
		l.ring[l.count] = e
		l.count++
	}
}

// bodyCap returns how many body bytes an entry keeps, or -1 when the
// live log is off.
func (l *liveLogState) bodyCap() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.size == 0 {
		return -1
	}
	return l.bodyMax
}

// add appends e (assigning its sequence number) and hands it to every
// subscriber that has room; a subscriber without room misses it. Every
// entry passes here, so here it is detached from its request.
func (l *liveLogState) add(e LogEntry) {
	e.detach()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.size == 0 {
		return
	}
	e.cutBody(l.bodyMax) // the cap may have shrunk since e was made
	if l.ring == nil || len(l.ring) != l.size {
		l.ring = make([]LogEntry, l.size)
		l.start, l.count = 0, 0
	}
	l.seq++
	e.Seq = l.seq
	if l.count < l.size {
		l.ring[(l.start+l.count)%l.size] = e
		l.count++
	} else {
		l.ring[l.start] = e
		l.start = (l.start + 1) % l.size
	}
	for ch := range l.subs {
		select {
		case ch <- e:
		default:
		}
	}
}

// detach makes e hold its own copies of its text fields, each cut to
// maxLoggedFieldBytes, so that a kept entry costs a bounded amount of
// memory: the decoded event's strings point into the whole request body,
// which a sub-slice would keep alive for as long as the entry lives.
// Headers are copied when the entry is made (loggedHeaders). The body is
// left as it is: either the whole verified body, at most log_body bytes
// and never modified, or already a copy of its first log_body bytes.
func (e *LogEntry) detach() {
	fields := [...]*string{&e.Type, &e.ID, &e.ObjectType, &e.ObjectID, &e.EnvironmentID, &e.Method, &e.URI, &e.RemoteIP, &e.Destination, &e.Error, &e.Instance}
	total := 0
	for _, f := range fields {
		if len(*f) > maxLoggedFieldBytes || !utf8.ValidString(*f) {
			*f = boundedString(*f, maxLoggedFieldBytes) // rare: a copy of its own
			continue
		}
		total += len(*f)
	}
	// The common case: every field short and valid, copied into one
	// allocation that they then share.
	var b strings.Builder
	b.Grow(total)
	for _, f := range fields {
		if len(*f) <= maxLoggedFieldBytes {
			b.WriteString(*f)
		}
	}
	arena, at := b.String(), 0
	for _, f := range fields {
		if len(*f) <= maxLoggedFieldBytes {
			*f, at = arena[at:at+len(*f)], at+len(*f)
		}
	}
}

// cutBody cuts the body to max bytes, as a copy that does not keep the
// rest alive.
func (e *LogEntry) cutBody(max int) {
	if len(e.Body) > max {
		e.Body, e.BodyTruncated = strings.Clone(e.Body[:max]), true
	}
}

// boundedString returns a copy of s, valid UTF-8, of at most max bytes
// plus cutMark when it had to be cut (at a character boundary).
func boundedString(s string, max int) string {
	if len(s) <= max && utf8.ValidString(s) {
		return strings.Clone(s)
	}
	cut := len(s) > max
	if cut {
		i := max
		for i > 0 && !utf8.RuneStart(s[i]) {
			i--
		}
		s = s[:i]
	}
	s = strings.ToValidUTF8(s, "\uFFFD")
	if cut {
		return s + cutMark // a new string
	}
	return strings.Clone(s) // ToValidUTF8 copies only when it replaces something
}

// snapshotLocked returns the entries, oldest first.
func (l *liveLogState) snapshotLocked() []LogEntry {
	out := make([]LogEntry, 0, l.count)
	for i := range l.count {
		out = append(out, l.ring[(l.start+i)%len(l.ring)])
	}
	return out
}

// logFilter selects entries: by type pattern (a mux_event glob), outcome,
// event id and object id, each "" for all.
type logFilter struct {
	Type, Outcome, ID, ObjectID string
}

func (f logFilter) matches(e LogEntry) bool {
	return (f.Outcome == "" || e.Outcome == f.Outcome) &&
		(f.ID == "" || e.ID == f.ID) &&
		(f.ObjectID == "" || e.ObjectID == f.ObjectID) &&
		(f.Type == "" || globMatch(f.Type, e.Type))
}

// query returns up to limit entries, newest first, that match f.
func (l *liveLogState) query(f logFilter, limit int) []LogEntry {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := []LogEntry{}
	for i := l.count - 1; i >= 0 && len(out) < limit; i-- {
		e := l.ring[(l.start+i)%len(l.ring)]
		if f.matches(e) {
			out = append(out, e)
		}
	}
	return out
}

// subscribe returns a channel of new entries, or false when there are
// too many subscribers.
func (l *liveLogState) subscribe() (chan LogEntry, bool) {
	ch, _, _, ok := l.subscribeAfter(nil)
	return ch, ok
}

// subscribeAfter is subscribe for a client that resumes: with after set
// (its Last-Event-ID), it also returns the entries after that sequence
// number that the ring still holds, oldest first, and how many it has
// missed because the ring no longer holds them. Taken under one lock, the
// two never overlap and leave no gap: every later entry goes to the
// channel. A sequence number the log has not reached yet comes from
// before a restart (the numbers start again at 1 with the process): such
// a client gets everything the ring holds.
func (l *liveLogState) subscribeAfter(after *uint64) (ch chan LogEntry, backlog []LogEntry, missed uint64, ok bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.subs) >= maxSubscribers {
		return nil, nil, 0, false
	}
	ch = make(chan LogEntry, subscriberBuffer)
	l.subs[ch] = struct{}{}
	if after == nil {
		return ch, nil, 0, true
	}
	from := *after
	if from > l.seq {
		from = 0
	}
	// The ring holds the sequence numbers oldest..l.seq.
	oldest := l.seq + 1 - uint64(l.count)
	if from+1 < oldest {
		missed = oldest - from - 1
	}
	for i := range l.count {
		if e := l.ring[(l.start+i)%len(l.ring)]; e.Seq > from {
			backlog = append(backlog, e)
		}
	}
	return ch, backlog, missed, true
}

func (l *liveLogState) unsubscribe(ch chan LogEntry) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.subs, ch)
}

// loggedHeaders copies h for the live log: bounded, with secrets redacted.
// It always copies, names, slices and values: handlers that run after the
// entry is made (request_header in handle_errors) edit the request's
// header slices in place.
func loggedHeaders(h http.Header) map[string][]string {
	out := make(map[string][]string, min(len(h), maxLoggedHeaders))
	for name, values := range h {
		if len(out) >= maxLoggedHeaders {
			break
		}
		logged := sharedOrBounded(name, maxLoggedHeaderBytes)
		if redactedHeaders[http.CanonicalHeaderKey(name)] {
			out[logged] = []string{"[redacted]"}
			continue
		}
		out[logged] = boundedValues(values)
	}
	return out
}

// boundedValues returns a copy of the slice values (handlers such as
// request_header edit it in place): at most maxLoggedHeaders of them, each
// valid UTF-8 and cut to maxLoggedHeaderBytes.
func boundedValues(values []string) []string {
	vs := make([]string, 0, min(len(values), maxLoggedHeaders))
	for _, v := range values[:min(len(values), maxLoggedHeaders)] {
		vs = append(vs, sharedOrBounded(v, maxLoggedHeaderBytes))
	}
	return vs
}

// sharedOrBounded returns s itself when it is short and valid UTF-8 (a
// header's strings are immutable and hold no request body), else a
// bounded copy.
func sharedOrBounded(s string, max int) string {
	if len(s) <= max && utf8.ValidString(s) {
		return s
	}
	return boundedString(s, max)
}
