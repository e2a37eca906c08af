// Searching history: from the store's own indexes. A search's filters
// become a subject filter (outcome, object and id are subject tokens, a
// type glob's literal prefix too), its time range a range of sequences
// (JetStream finds the first record at or after a time), and records are
// read with batched direct gets, newest windows first, so that a search
// reads what matches, not every record.

package queue

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
)

// HistoryFilter narrows a search, or a replay's events.
type HistoryFilter struct {
	// Type is a mux_event pattern ("*" may span dots); Match is its
	// matcher (the caller's, so that history globs as mux_event does).
	Type  string
	Match func(typ string) bool
	// Object and ID are an object id and an event id, as sent.
	Object, ID string
	// Outcome is "verified" or "duplicate"; empty: both.
	Outcome string
	// Since and Until bound the records' times (Until excluded; zero: no
	// bound).
	Since, Until time.Time
	// Before, if set, keeps records before that sequence (paging).
	Before uint64
	// Limit bounds a search's answer.
	Limit int
}

// HistoryEvent is one event record found.
type HistoryEvent struct {
	Seq        uint64          `json:"seq"`
	Time       time.Time       `json:"time"`
	Outcome    string          `json:"outcome"`
	Type       string          `json:"type"`
	ID         string          `json:"id"`
	ObjectType string          `json:"object_type"`
	ObjectID   string          `json:"object_id"`
	Status     int             `json:"status"`
	Attempts   []AttemptRecord `json:"attempts"`
	// Body is the event, byte for byte (Get only).
	Body string `json:"body,omitempty"`
}

// ErrHistoryNotFound: no event record at that sequence.
var ErrHistoryNotFound = errors.New("no event in history at that sequence (aged out, or not an event's record)")

// subjectFilter is f as a subject filter of event records.
func (h *History) subjectFilter(f HistoryFilter) string {
	token := func(v string, tok func(string) string) string {
		if v == "" {
			return "*"
		}
		return tok(v)
	}
	outcome := "*"
	if f.Outcome != "" {
		outcome = f.Outcome
	}
	return h.name + ".e." + outcome + "." + token(f.Object, objectToken) + "." + token(f.ID, idToken) + "." + typeFilter(f.Type)
}

// typeFilter is a type pattern's subject filter: the type's tokens when
// it has no '*', else its literal leading tokens and ">".
func typeFilter(pattern string) string {
	pattern = headerSafe(pattern)
	if pattern == "" || pattern == "*" {
		return ">"
	}
	if !strings.Contains(pattern, "*") {
		return typeTokens(pattern)
	}
	var lit []string
	for t := range strings.SplitSeq(pattern, ".") {
		// A type's tokens past the 15th are hashed together (typeTokens).
		if strings.Contains(t, "*") || !typeToken.MatchString(t) || len(lit) == 15 {
			break
		}
		lit = append(lit, t)
	}
	if len(lit) == 0 {
		return ">"
	}
	return strings.Join(lit, ".") + ".>"
}

// matches checks what the subject cannot: the type glob, and the values
// behind the hashes.
func (f HistoryFilter) matches(r rawRecord) bool {
	if f.Type != "" && f.Match != nil && !f.Match(r.header.Get(hdrHistType)) {
		return false
	}
	if f.ID != "" && headerSafe(r.header.Get(hdrHistID)) != headerSafe(f.ID) {
		return false
	}
	if f.Object != "" && headerSafe(r.header.Get(hdrHistObjectID)) != headerSafe(f.Object) {
		return false
	}
	return true
}

// maxSearchWindow bounds a window of sequences read at once.
const maxSearchWindow = 1 << 20

// Search returns the newest records matching f, newest first, and the
// sequence to page on from (0: none older).
//
// A filter by object or id matches few records: one forward pass over
// the range reads only those (the server skips the blocks and records
// whose subjects do not match), keeping the newest. Other filters match
// many: the newest window of sequences is read first, widening until the
// page is full; if the first window finds few, the filter is rare, and
// one forward pass over the rest does.
func (h *History) Search(ctx context.Context, f HistoryFilter) ([]HistoryEvent, uint64, error) {
	if f.Limit <= 0 {
		f.Limit = 100
	}
	lower, upper, ok, err := h.seqRange(ctx, f)
	if err != nil || !ok {
		return []HistoryEvent{}, 0, err
	}
	filter := h.subjectFilter(f)
	var found []rawRecord // oldest first
	more := false
	// newest reads [lo, hi] and keeps its newest room matches.
	newest := func(lo, hi uint64, room int) ([]rawRecord, error) {
		var win []rawRecord
		err := h.scan(ctx, scanRequest{seq: lo, filter: filter, upTo: hi}, func(r rawRecord) bool {
			if !f.matches(r) {
				return true
			}
			r.data = nil // a list does not keep bodies
			win = append(win, r)
			if len(win) > room {
				win = win[1:]
				more = true
			}
			return true
		})
		return win, err
	}
	if f.Object != "" || f.ID != "" {
		found, err = newest(lower, upper, f.Limit)
	} else {
		window := uint64(max(4*f.Limit, 256))
		for hi := upper; ; {
			lo := lower
			if hi >= lower+window {
				lo = hi - window + 1
			}
			var win []rawRecord
			if win, err = newest(lo, hi, f.Limit-len(found)); err != nil {
				break
			}
			found = append(win, found...)
			if len(found) >= f.Limit || lo == lower {
				more = more || lo > lower
				break
			}
			hi = lo - 1
			if len(found) < f.Limit/4 {
				// Rare: the rest in one pass.
				win, err = newest(lower, hi, f.Limit-len(found))
				found = append(win, found...)
				break
			}
			window = min(window*2, maxSearchWindow)
		}
	}
	if err != nil {
		return nil, 0, err
	}
	out := make([]HistoryEvent, 0, len(found))
	for i := len(found) - 1; i >= 0; i-- {
		ev := eventOf(found[i])
		ev.Attempts, err = h.attemptsOf(ctx, ev.ID, ev.Time)
		if err != nil {
			return nil, 0, err
		}
		out = append(out, ev)
	}
	var next uint64
	if more && len(found) > 0 {
		next = found[0].seq
	}
	return out, next, nil
}

// seqRange is the range of sequences f's times and Before allow; ok is
// false when it is empty.
func (h *History) seqRange(ctx context.Context, f HistoryFilter) (lower, upper uint64, ok bool, err error) {
	st, err := h.s.js.Stream(ctx, h.name)
	if err != nil {
		return 0, 0, false, fmt.Errorf("history: %w", err)
	}
	state := st.CachedInfo().State
	if state.Msgs == 0 {
		return 0, 0, false, nil
	}
	lower, upper = state.FirstSeq, state.LastSeq
	if !f.Since.IsZero() {
		seq, found, err := h.seqAt(ctx, f.Since)
		if err != nil || !found {
			return 0, 0, false, err
		}
		lower = max(lower, seq)
	}
	if !f.Until.IsZero() {
		seq, found, err := h.seqAt(ctx, f.Until)
		if err != nil {
			return 0, 0, false, err
		}
		if found {
			if seq == 0 {
				return 0, 0, false, nil
			}
			upper = min(upper, seq-1)
		}
	}
	if f.Before > 0 {
		if f.Before <= 1 {
			return 0, 0, false, nil
		}
		upper = min(upper, f.Before-1)
	}
	return lower, upper, lower <= upper, nil
}

// seqAt is the sequence of the first record at or after t.
func (h *History) seqAt(ctx context.Context, t time.Time) (uint64, bool, error) {
	var seq uint64
	err := h.scan(ctx, scanRequest{startTime: t, filter: h.name + ".>", max: 1}, func(r rawRecord) bool {
		seq = r.seq
		return false
	})
	return seq, seq > 0, err
}

// attemptEarly: an attempt may be recorded before its event, whose
// record is written once the request is over (a fast backend answers
// before mux_deliver's 202 has gone out).
const attemptEarly = 10 * time.Second

// attemptsOf are the attempts recorded for an event id from its record's
// time on (at most 256).
func (h *History) attemptsOf(ctx context.Context, id string, at time.Time) ([]AttemptRecord, error) {
	out := []AttemptRecord{}
	err := h.scan(ctx, scanRequest{startTime: at.Add(-attemptEarly), filter: h.name + ".a." + idToken(id), max: 256}, func(r rawRecord) bool {
		var a AttemptRecord
		if json.Unmarshal(r.data, &a) == nil {
			out = append(out, a)
		}
		return true
	})
	return out, err
}

// Get returns the event record at seq, with its body and attempts.
func (h *History) Get(ctx context.Context, seq uint64) (HistoryEvent, error) {
	var rec *rawRecord
	err := h.scan(ctx, scanRequest{seq: seq, filter: h.name + ".e.>", max: 1}, func(r rawRecord) bool {
		if r.seq == seq {
			rec = &r
		}
		return false
	})
	if err != nil {
		return HistoryEvent{}, err
	}
	if rec == nil {
		return HistoryEvent{}, ErrHistoryNotFound
	}
	ev := eventOf(*rec)
	ev.Body = string(rec.data)
	ev.Attempts, err = h.attemptsOf(ctx, ev.ID, ev.Time)
	return ev, err
}

// eventOf reads an event record.
func eventOf(r rawRecord) HistoryEvent {
	status, _ := strconv.Atoi(r.header.Get(hdrHistStatus))
	return HistoryEvent{Seq: r.seq, Time: r.time, Outcome: r.header.Get(hdrHistOutcome), Type: r.header.Get(hdrHistType),
		ID: r.header.Get(hdrHistID), ObjectType: r.header.Get(hdrHistObjectType), ObjectID: r.header.Get(hdrHistObjectID),
		Status: status, Attempts: []AttemptRecord{}}
}

// rawRecord is a record as a direct get returns it.
type rawRecord struct {
	seq     uint64
	time    time.Time
	subject string
	header  nats.Header
	data    []byte
}

// scanRequest is a batched direct get: from seq (or the first record at
// startTime), on filter, until upTo (0: the end) or max records.
type scanRequest struct {
	seq       uint64
	startTime time.Time
	filter    string
	upTo      uint64
	max       int
}

// scanBatch is how many records one direct get asks for.
const scanBatch = 256

// scan calls fn for each record req names, in order, until fn returns
// false.
func (h *History) scan(ctx context.Context, req scanRequest, fn func(rawRecord) bool) error {
	seen := 0
	for {
		batch := scanBatch
		if req.max > 0 {
			batch = min(batch, req.max-seen)
		}
		body := map[string]any{"next_by_subj": req.filter, "batch": batch}
		if !req.startTime.IsZero() {
			body["start_time"] = req.startTime.UTC()
		} else {
			body["seq"] = max(req.seq, 1)
		}
		data, _ := json.Marshal(body)
		last, pending, stop, err := h.directBatch(ctx, data, func(r rawRecord) bool {
			if req.upTo > 0 && r.seq > req.upTo {
				return false
			}
			seen++
			return fn(r) && (req.max == 0 || seen < req.max)
		})
		if err != nil || stop || last == 0 || pending == 0 || (req.upTo > 0 && last >= req.upTo) {
			return err
		}
		req.seq, req.startTime = last+1, time.Time{}
	}
}

// directBatch sends one batched direct get and reads its answers: the
// last sequence read, how many more match, and whether fn stopped.
func (h *History) directBatch(ctx context.Context, req []byte, fn func(rawRecord) bool) (last, pending uint64, stop bool, err error) {
	inbox := nats.NewInbox()
	sub, err := h.s.conn.SubscribeSync(inbox)
	if err != nil {
		return 0, 0, false, fmt.Errorf("history: %w", err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := h.s.conn.PublishRequest("$JS.API.DIRECT.GET."+h.name, inbox, req); err != nil {
		return 0, 0, false, fmt.Errorf("history: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	for {
		m, err := sub.NextMsgWithContext(ctx)
		if err != nil {
			if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) {
				return last, 0, false, fmt.Errorf("history: the store did not answer in time: %w", err)
			}
			return last, 0, false, fmt.Errorf("history: %w", err)
		}
		switch m.Header.Get("Status") {
		case "":
		case "404":
			return last, 0, false, nil // nothing (more) matches
		case "204": // end of the batch
			n, _ := strconv.ParseUint(m.Header.Get("Nats-Num-Pending"), 10, 64)
			return last, n, false, nil
		case "503":
			return last, 0, false, errors.New("history: the store is unavailable (no responders)")
		default:
			return last, 0, false, fmt.Errorf("history: the store answered %s %s", m.Header.Get("Status"), m.Header.Get("Description"))
		}
		seq, _ := strconv.ParseUint(m.Header.Get("Nats-Sequence"), 10, 64)
		ts, _ := time.Parse(time.RFC3339Nano, m.Header.Get("Nats-Time-Stamp"))
		r := rawRecord{seq: seq, time: ts, subject: m.Header.Get("Nats-Subject"), header: m.Header, data: m.Data}
		last = seq
		if !fn(r) {
			return last, 0, true, nil
		}
	}
}

// natsMsg is a message on subject with data.
func natsMsg(subject string, data []byte) *nats.Msg {
	return &nats.Msg{Subject: subject, Data: data, Header: nats.Header{}}
}
