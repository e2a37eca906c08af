// Per-minute summaries beside the history, for the console's charts: each
// gateway counts its events by outcome and its attempts by destination
// and result, with a histogram of their durations, and writes one record
// per minute to <H>.m.<instance>. A chart of 24 h reads those (at most
// 1440 per gateway), never the events themselves.

package queue

import (
	"context"
	"encoding/json"
	"math"
	"sort"
	"sync"
	"time"
)

// durationBuckets are the histogram's upper bounds in milliseconds: 0.25
// ms × 1.5^i, up to about half an hour.
var durationBuckets = func() []float64 {
	b := make([]float64, 40)
	for i := range b {
		b[i] = 0.25 * math.Pow(1.5, float64(i))
	}
	return b
}()

// minuteSummary is one gateway's minute, as written.
type minuteSummary struct {
	Minute   time.Time                  `json:"minute"`
	Outcomes map[string]uint64          `json:"outcomes,omitempty"`
	Dests    map[string]*destinationMin `json:"destinations,omitempty"`
}

// destinationMin counts one destination's attempts in a minute.
type destinationMin struct {
	Delivered uint64   `json:"delivered,omitempty"`
	Retry     uint64   `json:"retry,omitempty"`
	Dead      uint64   `json:"dead,omitempty"`
	Durations []uint64 `json:"durations,omitempty"` // per durationBuckets
}

// minutes is the minute being counted, and those not yet written.
type minutes struct {
	mu      sync.Mutex
	current map[int64]*minuteSummary // by Unix minute
}

func (m *minutes) init() { m.current = map[int64]*minuteSummary{} }

func (m *minutes) at(t time.Time) *minuteSummary {
	k := t.Unix() / 60
	s := m.current[k]
	if s == nil {
		s = &minuteSummary{Minute: time.Unix(k*60, 0).UTC(), Outcomes: map[string]uint64{}, Dests: map[string]*destinationMin{}}
		m.current[k] = s
	}
	return s
}

func (m *minutes) event(t time.Time, outcome string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.current) < 16 { // bounded: writes are late only if the writer stalls
		m.at(t).Outcomes[outcome]++
	} else if s := m.current[t.Unix()/60]; s != nil {
		s.Outcomes[outcome]++
	}
}

func (m *minutes) attempt(t time.Time, a Attempt) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if len(m.current) >= 16 && m.current[t.Unix()/60] == nil {
		return
	}
	s := m.at(t)
	d := s.Dests[a.Destination]
	if d == nil {
		if len(s.Dests) >= 256 {
			return
		}
		d = &destinationMin{Durations: make([]uint64, len(durationBuckets))}
		s.Dests[a.Destination] = d
	}
	switch a.Result {
	case "delivered":
		d.Delivered++
	case "dead":
		d.Dead++
	default:
		d.Retry++
	}
	if a.NoAttempt {
		return
	}
	ms := float64(a.Duration.Microseconds()) / 1000
	i := sort.SearchFloat64s(durationBuckets, ms)
	d.Durations[min(i, len(durationBuckets)-1)]++
}

// take removes and returns the minutes before now's (all with final).
func (m *minutes) take(now time.Time, final bool) []*minuteSummary {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []*minuteSummary
	cur := now.Unix() / 60
	for k, s := range m.current {
		if k < cur || final {
			out = append(out, s)
			delete(m.current, k)
		}
	}
	return out
}

// flushMinutes writes each minute once it is over.
func (h *History) flushMinutes() {
	defer h.wg.Done()
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-h.stop:
			return
		case <-t.C:
			h.flushMinute(false)
		}
	}
}

// flushMinute writes the minutes that are over (all of them with final),
// through the same bounded writer as the records.
func (h *History) flushMinute(final bool) {
	for _, s := range h.minutes.take(time.Now(), final) {
		data, err := json.Marshal(s)
		if err != nil {
			continue
		}
		subject := h.name + ".m." + instanceToken(h.config().Instance)
		if final {
			// The writer has stopped: straight to the store.
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			if _, err := h.js.Publish(ctx, subject, data); err != nil {
				h.drop()
			}
			cancel()
			continue
		}
		msg := natsMsg(subject, data)
		h.enqueue(msg)
	}
}

// instanceToken is an instance name as one subject token.
func instanceToken(instance string) string {
	if typeToken.MatchString(instance) {
		return instance
	}
	return "x" + hash16(instance)
}

// MinuteStats is one minute of the charts: every gateway's summaries
// summed.
type MinuteStats struct {
	Time     time.Time         `json:"time"`
	Outcomes map[string]uint64 `json:"outcomes"`
}

// DestinationMinute is one destination's minute of the charts.
type DestinationMinute struct {
	Time      time.Time `json:"time"`
	Delivered uint64    `json:"delivered"`
	Retry     uint64    `json:"retry"`
	Dead      uint64    `json:"dead"`
	P50MS     float64   `json:"p50_ms"`
	P99MS     float64   `json:"p99_ms"`
}

// Stats are the charts' data since a time, minute by minute (only minutes
// with something in them).
type Stats struct {
	Since        time.Time                      `json:"since"`
	Minutes      []MinuteStats                  `json:"minutes"`
	Destinations map[string][]DestinationMinute `json:"destinations"`
}

// maxStatsRecords bounds a Stats read: 24 h of 64 gateways.
const maxStatsRecords = 1440 * 64

// Stats reads the minute summaries written since since, and the minutes
// of this gateway not yet written.
func (h *History) Stats(ctx context.Context, since time.Time) (Stats, error) {
	byMinute := map[int64]*minuteSummary{}
	merge := func(s *minuteSummary) {
		k := s.Minute.Unix() / 60
		if s.Minute.Before(since.Truncate(time.Minute)) {
			return
		}
		t := byMinute[k]
		if t == nil {
			t = &minuteSummary{Minute: s.Minute, Outcomes: map[string]uint64{}, Dests: map[string]*destinationMin{}}
			byMinute[k] = t
		}
		for o, n := range s.Outcomes {
			t.Outcomes[o] += n
		}
		for name, d := range s.Dests {
			td := t.Dests[name]
			if td == nil {
				td = &destinationMin{Durations: make([]uint64, len(durationBuckets))}
				t.Dests[name] = td
			}
			td.Delivered += d.Delivered
			td.Retry += d.Retry
			td.Dead += d.Dead
			for i, n := range d.Durations {
				if i < len(td.Durations) {
					td.Durations[i] += n
				}
			}
		}
	}
	read := 0
	err := h.scan(ctx, scanRequest{startTime: since, filter: h.name + ".m.>"}, func(r rawRecord) bool {
		var s minuteSummary
		if json.Unmarshal(r.data, &s) == nil {
			merge(&s)
		}
		read++
		return read < maxStatsRecords
	})
	if err != nil {
		return Stats{}, err
	}
	h.minutes.mu.Lock()
	for _, s := range h.minutes.current {
		merge(s)
	}
	h.minutes.mu.Unlock()
	keys := make([]int64, 0, len(byMinute))
	for k := range byMinute {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return keys[i] < keys[j] })
	out := Stats{Since: since.UTC(), Minutes: []MinuteStats{}, Destinations: map[string][]DestinationMinute{}}
	for _, k := range keys {
		s := byMinute[k]
		if len(s.Outcomes) > 0 {
			out.Minutes = append(out.Minutes, MinuteStats{Time: s.Minute, Outcomes: s.Outcomes})
		}
		for name, d := range s.Dests {
			out.Destinations[name] = append(out.Destinations[name], DestinationMinute{Time: s.Minute,
				Delivered: d.Delivered, Retry: d.Retry, Dead: d.Dead,
				P50MS: quantile(d.Durations, 0.50), P99MS: quantile(d.Durations, 0.99)})
		}
	}
	return out, nil
}

// quantile estimates the q-quantile of a duration histogram: the upper
// bound of the bucket it falls in (0 with no samples).
func quantile(counts []uint64, q float64) float64 {
	var total uint64
	for _, n := range counts {
		total += n
	}
	if total == 0 {
		return 0
	}
	rank := uint64(math.Ceil(q * float64(total)))
	var seen uint64
	for i, n := range counts {
		seen += n
		if seen >= rank && i < len(durationBuckets) {
			return math.Round(durationBuckets[i]*100) / 100
		}
	}
	return durationBuckets[len(durationBuckets)-1]
}
