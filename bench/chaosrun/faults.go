package main

// The seeded schedule of faults and its execution: each fault starts at its
// time, lasts its duration (or until the chaos phase ends) and is then
// undone; each is logged with its time and kind.

import (
	"context"
	"math/rand"
	"sync"
	"time"
)

// Fault kinds.
const (
	faultCaddyKill      = "caddy_sigkill"
	faultNATSKill       = "nats_sigkill"
	faultNATSStop       = "nats_sigstop"
	faultConsumerDelete = "consumer_delete"
	faultReload         = "reload"
	faultBackend500     = "backend_500"
	faultBackendHang    = "backend_hang"
	faultBackendSlow    = "backend_slow"
	faultDiskFull       = "disk_full"
)

// kindSpec is a kind of fault a setup can suffer: how often (weight), on
// what (targets) and for how long (instant kinds have max 0).
type kindSpec struct {
	kind     string
	weight   int
	targets  []string
	min, max time.Duration
}

// plannedFault is one entry of the schedule.
type plannedFault struct {
	At     time.Duration `json:"at_s"`
	For    time.Duration `json:"for_s"`
	Kind   string        `json:"kind"`
	Target string        `json:"target"`
}

// resource is what a fault holds: two faults never hold one at once (one
// NATS node down at a time keeps the cluster's quorum; a backend has one
// mode at a time).
func resource(kind, target string) string {
	switch kind {
	case faultNATSKill, faultNATSStop:
		return "nats"
	case faultBackend500, faultBackendHang, faultBackendSlow:
		return "backend:" + target
	case faultCaddyKill:
		return "caddy:" + target
	}
	return kind + ":" + target
}

// planFaults draws the schedule over span: a fault (sometimes two at
// once, with pairProb) every gapMin..gapMax, none in the last 3 s. Kinds
// are dealt from a shuffled deck: every kind once first (a short run still
// meets each), then by weight.
func planFaults(rng *rand.Rand, specs []kindSpec, span, gapMin, gapMax time.Duration, pairProb float64) []plannedFault {
	var deck []kindSpec
	rounds := 0
	deal := func() kindSpec {
		if len(deck) == 0 {
			for _, s := range specs {
				copies := 1
				if rounds > 0 {
					copies = s.weight
				}
				for c := 0; c < copies; c++ {
					deck = append(deck, s)
				}
			}
			rounds++
			rng.Shuffle(len(deck), func(i, j int) { deck[i], deck[j] = deck[j], deck[i] })
		}
		s := deck[0]
		deck = deck[1:]
		return s
	}
	var plan []plannedFault
	busy := map[string]time.Duration{}
	between := func(lo, hi time.Duration) time.Duration {
		if hi <= lo {
			return lo
		}
		return lo + time.Duration(rng.Int63n(int64(hi-lo)))
	}
	for at := between(gapMin/2, gapMin); at < span-3*time.Second; at += between(gapMin, gapMax) {
		n := 1
		if rng.Float64() < pairProb {
			n = 2
		}
		for i := 0; i < n; i++ {
			var skipped []kindSpec
			for try := 0; try < 2*len(specs); try++ {
				s := deal()
				target := s.targets[rng.Intn(len(s.targets))]
				res := resource(s.kind, target)
				if busy[res] > at {
					skipped = append(skipped, s)
					continue
				}
				d := time.Duration(0)
				if s.max > 0 {
					d = between(s.min, s.max).Round(100 * time.Millisecond)
					if at+d > span {
						d = max(span-at, time.Second).Round(100 * time.Millisecond)
					}
				}
				busy[res] = at + d + time.Second
				plan = append(plan, plannedFault{At: at, For: d, Kind: s.kind, Target: target})
				break
			}
			// A kind passed over because its target was busy comes
			// back first.
			deck = append(skipped, deck...)
		}
	}
	return plan
}

// faultRec is a fault as it happened.
type faultRec struct {
	Kind   string  `json:"kind"`
	Target string  `json:"target"`
	Start  float64 `json:"start_s"` // seconds on the run's clock
	End    float64 `json:"end_s"`
	Note   string  `json:"note,omitempty"`
	start  time.Time
	end    time.Time
}

// injector injects f, waits f.For (or until ctx ends), undoes it, and
// notes what happened in rec.
type injector func(ctx context.Context, f plannedFault, rec *faultRec)

// runFaults executes the plan from start until chaos ends; it returns
// once every fault has been undone. The records' times are seconds on the
// run's clock (lg's, as the printed lines).
func runFaults(chaos context.Context, start time.Time, plan []plannedFault, inject injector, lg *eventLog) []*faultRec {
	var (
		mu   sync.Mutex
		recs []*faultRec
		wg   sync.WaitGroup
	)
	for _, f := range plan {
		select {
		case <-chaos.Done():
		case <-time.After(time.Until(start.Add(f.At))):
		}
		if chaos.Err() != nil {
			break
		}
		rec := &faultRec{Kind: f.Kind, Target: f.Target, start: time.Now()}
		rec.Start = round3(rec.start.Sub(lg.start).Seconds())
		if f.For > 0 {
			lg.logf("fault %s %s for %s", f.Kind, f.Target, f.For)
		} else {
			lg.logf("fault %s %s", f.Kind, f.Target)
		}
		mu.Lock()
		recs = append(recs, rec)
		mu.Unlock()
		wg.Add(1)
		go func(f plannedFault) {
			defer wg.Done()
			inject(chaos, f, rec)
			mu.Lock()
			rec.end = time.Now()
			rec.End = round3(rec.end.Sub(lg.start).Seconds())
			mu.Unlock()
			if f.For > 0 || rec.Note != "" {
				lg.logf("  end of %s %s%s", f.Kind, f.Target, noteSuffix(rec.Note))
			}
		}(f)
	}
	wg.Wait()
	return recs
}

func noteSuffix(note string) string {
	if note == "" {
		return ""
	}
	return ": " + note
}

// hold waits d or until ctx ends.
func hold(ctx context.Context, d time.Duration) {
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}
