package main

// The invariant and the figures: per setup and destination, every id
// answered 202 is delivered at least once or is a dead letter; duplicates
// are counted, each with the cause the fault log explains.

import (
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"time"
)

// lostID is an id answered 202 and neither delivered nor a dead letter.
type lostID struct {
	ID       string  `json:"id"`
	Accepted float64 `json:"answered_202_at_s"`
}

// destResult is one destination's figures.
type destResult struct {
	Name                 string         `json:"name"`
	Delivered            int            `json:"delivered"`             // ids answered 202 and delivered
	DeliveredWithout202  int            `json:"delivered_without_202"` // stored, but the answer was not a 2xx (e.g. 503 after the enqueue timeout)
	DeadLetters          int            `json:"dead_letters"`          // ids answered 202 that are dead letters (and not delivered)
	Lost                 int            `json:"lost"`
	LostSample           []lostID       `json:"lost_sample,omitempty"`
	FaultsAroundLost     []string       `json:"faults_around_lost,omitempty"`
	Duplicates           int            `json:"duplicated_deliveries"`
	DuplicateCauses      map[string]int `json:"duplicate_causes,omitempty"`
	Answered500          int            `json:"attempts_answered_500"`
	Hung                 int            `json:"attempts_hung"`
	BadSignatures        int            `json:"bad_signatures"`
	BadHeaders           int            `json:"bad_headers"`
	MaxAttempt           int            `json:"max_attempt_seen"`
	Longest202ToDelivery float64        `json:"longest_202_to_delivery_s"`
	P99202ToDelivery     float64        `json:"p99_202_to_delivery_s"`
}

// setupResult is one setup's figures.
type setupResult struct {
	Setup             string                     `json:"setup"`
	Seed              int64                      `json:"seed"`
	ChaosSeconds      float64                    `json:"chaos_s"`
	Rate              float64                    `json:"rate_per_s"`
	Sent              int                        `json:"events_sent"`
	Accepted          int                        `json:"answered_202"`
	NeverAccepted     int                        `json:"never_answered_2xx"` // still refused when the senders' retries ended
	RetryGraceSeconds float64                    `json:"sender_retries_after_chaos_s"`
	SenderAttempts    int                        `json:"sender_attempts"`
	Answers           map[string]int             `json:"non_2xx_answers"`
	Faults            map[string]int             `json:"faults"`
	FaultLog          []*faultRec                `json:"fault_log"`
	Skipped           map[string]string          `json:"skipped_faults,omitempty"`
	SelfExits         map[string]int             `json:"exits_without_fault,omitempty"`
	Drained           bool                       `json:"drained"`
	DrainSeconds      float64                    `json:"drain_s"`
	Lost              int                        `json:"lost"`
	Destinations      []destResult               `json:"destinations"`
	QueueStatus       map[string]json.RawMessage `json:"queue_status_at_end"`
	DeadListFailure   string                     `json:"dead_list_error,omitempty"`
}

// evaluate computes the figures of a setup after its drain; times are
// printed as seconds since clock (the run's start).
func evaluate(s *setup, clock time.Time, tr *traffic, faults []*faultRec, dead map[string]map[string]bool) ([]destResult, int) {
	events, _, _ := tr.snapshot()
	var results []destResult
	lostTotal := 0
	for _, b := range s.backends {
		got, failed, hung, badSig, badHdr, maxAttempt := b.snapshot()
		r := destResult{Name: b.name, Answered500: failed, Hung: hung, BadSignatures: badSig, BadHeaders: badHdr, MaxAttempt: maxAttempt, DuplicateCauses: map[string]int{}}
		var lags []float64
		var lost []sentEvent
		for _, ev := range events {
			ds := got[ev.ID]
			if ev.Accepted.IsZero() {
				if len(ds) > 0 {
					r.DeliveredWithout202++
				}
				continue
			}
			switch {
			case len(ds) > 0:
				r.Delivered++
				first := ds[0].At
				for _, d := range ds {
					if d.At.Before(first) {
						first = d.At
					}
				}
				lags = append(lags, max(first.Sub(ev.Accepted).Seconds(), 0))
			case dead[b.name][ev.ID]:
				r.DeadLetters++
			default:
				lost = append(lost, ev)
			}
		}
		for _, ds := range got {
			if len(ds) < 2 {
				continue
			}
			sort.Slice(ds, func(i, j int) bool { return ds[i].At.Before(ds[j].At) })
			for k := 1; k < len(ds); k++ {
				r.Duplicates++
				r.DuplicateCauses[duplicateCause(ds[k-1], ds[k], faults)]++
			}
		}
		sort.Float64s(lags)
		if n := len(lags); n > 0 {
			r.Longest202ToDelivery = round3(lags[n-1])
			r.P99202ToDelivery = round3(lags[(n*99)/100])
		}
		r.Lost = len(lost)
		lostTotal += r.Lost
		if len(lost) > 0 {
			sort.Slice(lost, func(i, j int) bool { return lost[i].Accepted.Before(lost[j].Accepted) })
			for i, ev := range lost {
				if i == 5 {
					break
				}
				r.LostSample = append(r.LostSample, lostID{ID: ev.ID, Accepted: round3(ev.Accepted.Sub(clock).Seconds())})
			}
			lo, hi := lost[0].Accepted.Add(-15*time.Second), lost[len(lost)-1].Accepted
			for _, f := range faults {
				if f.start.Before(lo) || f.start.After(hi) {
					continue
				}
				r.FaultsAroundLost = append(r.FaultsAroundLost, describeFault(f))
				if len(r.FaultsAroundLost) == 12 {
					break
				}
			}
		}
		results = append(results, r)
	}
	return results, lostTotal
}

func describeFault(f *faultRec) string {
	s := fmt.Sprintf("%.1fs %s %s", f.Start, f.Kind, f.Target)
	if f.End > f.Start+0.5 {
		s += fmt.Sprintf(" (until %.1fs)", f.End)
	}
	return s
}

// duplicateCause explains a delivery of an id the backend had already
// acted on (prev), from the faults around the two.
func duplicateCause(prev, cur delivery, faults []*faultRec) string {
	overlaps := func(lo, hi time.Time, kinds ...string) bool {
		for _, f := range faults {
			for _, k := range kinds {
				if f.Kind != k {
					continue
				}
				end := f.end
				if end.IsZero() || end.Before(f.start) {
					end = f.start
				}
				if !f.start.After(hi) && !end.Before(lo) {
					return true
				}
			}
		}
		return false
	}
	lo, hi := prev.At.Add(-time.Second), cur.At
	killWindowEnd := prev.At.Add(maxTimeout + time.Second)
	switch {
	case overlapsStart(faults, faultCaddyKill, prev.At.Add(-time.Second), killWindowEnd):
		return "a Caddy was SIGKILLed during the attempt or before its outcome was stored"
	case !prev.Answered:
		return "the attempt timed out after the backend had acted (slow backend)"
	case overlaps(lo, hi, faultNATSKill, faultNATSStop):
		return "a NATS node was killed or stopped: the ack was lost, the copy redelivered after the ack deadline"
	case overlaps(lo, hi, faultConsumerDelete):
		return "the consumer was deleted while the copy was in flight"
	case overlaps(lo, hi, faultDiskFull):
		return "the disk was full when the ack was to be stored"
	case overlaps(lo, hi, faultReload):
		return "a reload while the attempt was in flight (docs/queue.md, Guarantees and limits: reloads must not repeat events)"
	}
	return "unexplained (no fault around it)"
}

// overlapsStart reports whether a fault of kind started within [lo, hi].
func overlapsStart(faults []*faultRec, kind string, lo, hi time.Time) bool {
	for _, f := range faults {
		if f.Kind == kind && !f.start.Before(lo) && !f.start.After(hi) {
			return true
		}
	}
	return false
}

func round3(v float64) float64 { return float64(int64(v*1000+0.5)) / 1000 }

// printSetup prints a setup's figures.
func printSetup(r *setupResult) {
	fmt.Printf("\n== %s (seed %d): %d events sent (%.0f/s for %.0fs), %d answered 202, %d never answered 2xx; %d sender attempts",
		r.Setup, r.Seed, r.Sent, r.Rate, r.ChaosSeconds, r.Accepted, r.NeverAccepted, r.SenderAttempts)
	if len(r.Answers) > 0 {
		var parts []string
		for _, k := range sortedKeys(r.Answers) {
			parts = append(parts, fmt.Sprintf("%s×%d", k, r.Answers[k]))
		}
		fmt.Printf(" (retried after: %s)", strings.Join(parts, ", "))
	}
	fmt.Println()
	var fk []string
	total := 0
	for _, k := range sortedKeys(r.Faults) {
		fk = append(fk, fmt.Sprintf("%s %d", k, r.Faults[k]))
		total += r.Faults[k]
	}
	fmt.Printf("   faults injected: %d (%s)\n", total, strings.Join(fk, ", "))
	for _, k := range sortedKeys(r.Skipped) {
		fmt.Printf("   skipped %s: %s\n", k, r.Skipped[k])
	}
	for _, k := range sortedKeys(r.SelfExits) {
		fmt.Printf("   %s exited by itself %d times (restarted)\n", k, r.SelfExits[k])
	}
	if r.NeverAccepted > 0 {
		fmt.Printf("   NOT HEALED: %d events were still answered non-2xx (or not at all) %s after the faults ended, where Mux would go on retrying: a gateway did not accept again\n",
			r.NeverAccepted, fmt.Sprintf("%.0fs", r.RetryGraceSeconds))
	}
	if r.Drained {
		fmt.Printf("   drained in %.1fs\n", r.DrainSeconds)
	} else {
		fmt.Printf("   NOT drained after %.1fs\n", r.DrainSeconds)
	}
	if r.DeadListFailure != "" {
		fmt.Printf("   dead letters could not be listed: %s\n", r.DeadListFailure)
	}
	fmt.Printf("   %-10s %9s %6s %6s %10s %11s %9s %8s %14s %10s\n", "dest", "delivered", "dead", "LOST", "duplicated", "w/o 202", "500s", "hung", "max attempt", "202→1st s")
	for _, d := range r.Destinations {
		fmt.Printf("   %-10s %9d %6d %6d %10d %11d %9d %8d %14d %10.1f\n", d.Name, d.Delivered, d.DeadLetters, d.Lost, d.Duplicates,
			d.DeliveredWithout202, d.Answered500, d.Hung, d.MaxAttempt, d.Longest202ToDelivery)
	}
	for _, d := range r.Destinations {
		if d.BadSignatures+d.BadHeaders > 0 {
			fmt.Printf("   %s: %d deliveries with a bad signature, %d with wrong headers\n", d.Name, d.BadSignatures, d.BadHeaders)
		}
		for _, c := range sortedKeys(d.DuplicateCauses) {
			fmt.Printf("   %s duplicated %d×: %s\n", d.Name, d.DuplicateCauses[c], c)
		}
		if d.Lost > 0 {
			fmt.Printf("   LOST %s: %d ids answered 202, neither delivered nor dead letters; first: ", d.Name, d.Lost)
			for _, l := range d.LostSample {
				fmt.Printf("%s (202 at %.1fs) ", l.ID, l.Accepted)
			}
			fmt.Println()
			fmt.Printf("   faults from 15s before the first lost id's 202 to the last's: %s\n", strings.Join(d.FaultsAroundLost, "; "))
		}
	}
	for _, g := range sortedKeys(r.QueueStatus) {
		fmt.Printf("   queue status at the end (%s): %s\n", g, compactStatus(r.QueueStatus[g]))
	}
}

// compactStatus shortens a GET /mux-webhook/queue answer to its figures.
func compactStatus(raw json.RawMessage) string {
	var rows []struct {
		Name      string `json:"name"`
		Pending   uint64 `json:"pending"`
		InFlight  uint64 `json:"in_flight"`
		Delivered uint64 `json:"delivered"`
		Dead      uint64 `json:"dead"`
		LastError string `json:"last_error"`
	}
	if json.Unmarshal(raw, &rows) != nil {
		return string(raw)
	}
	var parts []string
	for _, r := range rows {
		p := fmt.Sprintf("%s pending %d in_flight %d delivered %d dead %d", r.Name, r.Pending, r.InFlight, r.Delivered, r.Dead)
		if r.LastError != "" {
			p += fmt.Sprintf(" last_error %q", r.LastError)
		}
		parts = append(parts, p)
	}
	return strings.Join(parts, "; ")
}
