// Command chaosrun is the chaos run of bench/chaos: distinct Mux events
// through an embedded and a clustered mux_deliver setup (the built Caddy
// binary, real nats-server processes, all on 127.0.0.1) while a seeded
// schedule injects faults; then it lets the queue drain and checks the
// invariant: every id answered 202 is delivered to each destination at
// least once, or is a dead letter there. It exits 1 if any is lost.
//
//	chaosrun -caddy ./caddy -nats nats-server [-d 10m] [-seed N] [-short] [-keep] [-out summary.json]
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math/rand"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// eventLog prints timed lines to stdout and the run dir's chaos.log.
type eventLog struct {
	start time.Time
	mu    sync.Mutex
	f     *os.File
}

func (l *eventLog) logf(format string, args ...any) {
	line := fmt.Sprintf("[%6.1fs] %s\n", time.Since(l.start).Seconds(), fmt.Sprintf(format, args...))
	l.mu.Lock()
	defer l.mu.Unlock()
	os.Stdout.WriteString(line)
	if l.f != nil {
		l.f.WriteString(line)
	}
}

// options are the run's flags.
type options struct {
	duration time.Duration
	seed     int64
	short    bool
	keep     bool
	out      string
	caddy    string
	nats     string
	natsConf string
	rate     float64
	drain    time.Duration
	setups   string
}

func main() {
	var o options
	flag.DurationVar(&o.duration, "d", 10*time.Minute, "chaos time in all, shared by the setups (traffic and faults; the drain comes after)")
	flag.Int64Var(&o.seed, "seed", 0, "seed of the fault schedule (0: from the clock; printed)")
	flag.BoolVar(&o.short, "short", false, "CI form: about 25 s of chaos per setup, shorter faults")
	flag.BoolVar(&o.keep, "keep", false, "keep the run dir (logs, stores) even when the run passes")
	flag.StringVar(&o.out, "out", "", "write the summary as JSON to this file")
	flag.StringVar(&o.caddy, "caddy", "./caddy", "the Caddy binary built with the plugin")
	flag.StringVar(&o.nats, "nats", "nats-server", "the nats-server binary (v2.15.2)")
	flag.StringVar(&o.natsConf, "nats-conf", "examples/cluster/nats.conf", "the cluster nodes' config")
	flag.Float64Var(&o.rate, "rate", 0, "events a second (default 30, 20 with -short; at most 50)")
	flag.DurationVar(&o.drain, "drain", 0, "bound of the drain after the chaos (default 3m, 45s with -short)")
	flag.StringVar(&o.setups, "setups", "embedded,cluster", "which setups to run")
	flag.Parse()
	os.Exit(run(o))
}

func run(o options) int {
	if o.seed == 0 {
		o.seed = time.Now().UnixNano() % 1_000_000_000
	}
	if o.rate == 0 {
		o.rate = 30
		if o.short {
			o.rate = 20
		}
	}
	if o.drain == 0 {
		o.drain = 3 * time.Minute
		if o.short {
			o.drain = 45 * time.Second
		}
	}
	if o.rate < 1 || o.rate > 50 {
		fmt.Fprintln(os.Stderr, "-rate must be between 1 and 50 events a second (the machine is shared)")
		return 2
	}
	if o.drain < 10*time.Second || o.drain > 10*time.Minute {
		fmt.Fprintln(os.Stderr, "-drain must be between 10s and 10m")
		return 2
	}
	setups := strings.Split(o.setups, ",")
	for _, s := range setups {
		if s != "embedded" && s != "cluster" {
			fmt.Fprintln(os.Stderr, "-setups: embedded and/or cluster")
			return 2
		}
	}
	per := o.duration / time.Duration(len(setups))
	if o.short {
		per = 25 * time.Second
	}
	if per < 10*time.Second || per > 2*time.Hour {
		fmt.Fprintln(os.Stderr, "-d must give each setup between 10s and 2h of chaos")
		return 2
	}
	for _, p := range []*string{&o.caddy, &o.natsConf} {
		abs, err := filepath.Abs(*p)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
		*p = abs
	}
	dir, err := os.MkdirTemp("", "mux-chaos-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	lg := &eventLog{start: time.Now()}
	if lg.f, err = os.Create(filepath.Join(dir, "chaos.log")); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	fmt.Printf("== chaos run: seed %d (-seed %d repeats the schedule), %s of chaos per setup at %.0f events/s, drain up to %s; run dir %s\n",
		o.seed, o.seed, per, o.rate, o.drain, dir)
	var results []*setupResult
	failed := false
	for i, kind := range setups {
		if ctx.Err() != nil {
			break
		}
		sdir := filepath.Join(dir, kind)
		if err := os.MkdirAll(sdir, 0o700); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
		r, err := runSetup(ctx, o, kind, sdir, o.seed+int64(i), per, lg)
		if err != nil {
			lg.logf("%s: %v", kind, err)
			failed = true
		}
		if r != nil {
			results = append(results, r)
		}
	}
	lost := 0
	for _, r := range results {
		printSetup(r)
		lost += r.Lost
		if !r.Drained || r.NeverAccepted > 0 {
			failed = true
		}
		for _, d := range r.Destinations {
			if d.BadSignatures+d.BadHeaders > 0 {
				failed = true
			}
		}
	}
	interrupted := ctx.Err() != nil
	pass := lost == 0 && !failed && !interrupted && len(results) == len(setups)
	if o.out != "" {
		summary := map[string]any{
			"seed": o.seed, "short": o.short, "chaos_per_setup_s": per.Seconds(), "rate_per_s": o.rate,
			"setups": results, "lost": lost, "pass": pass, "interrupted": interrupted, "at": time.Now().UTC().Format(time.RFC3339),
		}
		b, _ := json.MarshalIndent(summary, "", "  ")
		if err := os.WriteFile(o.out, append(b, '\n'), 0o644); err != nil {
			fmt.Fprintln(os.Stderr, err)
		} else {
			fmt.Printf("\nsummary written to %s\n", o.out)
		}
	}
	fmt.Println()
	switch {
	case pass:
		fmt.Printf("PASS: lost 0 (seed %d)\n", o.seed)
	case interrupted:
		fmt.Printf("INTERRUPTED (seed %d), lost so far: %d\n", o.seed, lost)
	default:
		if lost > 0 {
			fmt.Printf("FAIL: lost %d (must be 0) (seed %d)\n", lost, o.seed)
		} else {
			fmt.Printf("FAIL: nothing lost, but see above: not drained, NOT HEALED, a setup that failed, or mis-signed deliveries (seed %d)\n", o.seed)
		}
	}
	lg.f.Close()
	if pass && !o.keep {
		os.RemoveAll(dir)
		fmt.Printf("run dir removed (-keep keeps it)\n")
	} else {
		fmt.Printf("logs of Caddy and nats-server, the fault log (chaos.log): %s\n", dir)
	}
	if pass {
		return 0
	}
	return 1
}

// runSetup runs one setup: start, traffic with faults, drain, check.
func runSetup(ctx context.Context, o options, kind, dir string, seed int64, span time.Duration, lg *eventLog) (*setupResult, error) {
	s, err := newSetup(kind, dir, lg, o.caddy, o.nats, o.natsConf, seed)
	if err != nil {
		return nil, err
	}
	defer s.teardown()
	lg.logf("%s: starting", kind)
	if err := s.start(); err != nil {
		return nil, err
	}
	gapMin, gapMax := 8*time.Second, 16*time.Second
	if o.short {
		gapMin, gapMax = 2500*time.Millisecond, 4*time.Second
	}
	plan := planFaults(rand.New(rand.NewSource(seed)), s.faultSpecs(o.short), span, gapMin, gapMax, 0.25)
	for _, k := range sortedKeys(s.skipped) {
		lg.logf("%s: no %s fault: %s", kind, k, s.skipped[k])
	}
	lg.logf("%s: ready; %s of traffic at %.0f/s with %d faults (seed %d)", kind, span, o.rate, len(plan), seed)

	var targets []string
	for _, g := range s.gateways {
		targets = append(targets, fmt.Sprintf("http://127.0.0.1:%d/mux", g.port))
	}
	start := time.Now()
	chaos, endChaos := context.WithTimeout(ctx, span)
	defer endChaos()
	retry, endRetry := context.WithCancel(ctx)
	defer endRetry()
	tr := newTraffic(s.secret, targets, o.rate)
	genDone := make(chan struct{})
	go func() { tr.run(chaos, retry); close(genDone) }()
	faults := runFaults(chaos, start, plan, s.inject, lg)
	<-chaos.Done()
	<-genDone

	// The drain: faults undone, no new events; Mux's retries of the
	// events not yet answered 2xx go on for a while (20 s, 10 s with
	// -short), then the queue gets until o.drain to deliver.
	lg.logf("%s: chaos over, every fault undone; draining (up to %s)", kind, o.drain)
	drainStart := time.Now()
	grace := 20 * time.Second
	if o.short {
		grace = 10 * time.Second
	}
	graceTimer := time.AfterFunc(grace, endRetry)
	defer graceTimer.Stop()
	sendersDone := make(chan struct{})
	go func() { tr.wait(); close(sendersDone) }()
	deadline := time.Now().Add(o.drain)
	var dead map[string]map[string]bool
	var deadErr error
	drained := false
	lastDead := time.Time{}
	for !drained && time.Now().Before(deadline) && ctx.Err() == nil {
		select {
		case <-sendersDone:
		default:
			time.Sleep(500 * time.Millisecond)
			continue
		}
		missing := outstanding(s, tr, dead)
		if missing > 0 && time.Since(lastDead) > 3*time.Second {
			dead, deadErr = s.deadLetters()
			lastDead = time.Now()
			missing = outstanding(s, tr, dead)
		}
		if missing == 0 {
			drained = true
			break
		}
		time.Sleep(time.Second)
	}
	endRetry()
	tr.wait()
	if d, err := s.deadLetters(); err == nil {
		dead, deadErr = d, nil
	} else {
		deadErr = err
	}
	drainTime := time.Since(drainStart)
	if drained {
		lg.logf("%s: drained in %.1fs", kind, drainTime.Seconds())
	} else {
		lg.logf("%s: not drained after %.1fs", kind, drainTime.Seconds())
	}

	events, codes, connErrs := tr.snapshot()
	r := &setupResult{Setup: kind, Seed: seed, ChaosSeconds: span.Seconds(), Rate: o.rate, Answers: map[string]int{}, Faults: map[string]int{},
		RetryGraceSeconds: grace.Seconds(), FaultLog: faults, Skipped: s.skipped, SelfExits: s.selfExits(), Drained: drained, DrainSeconds: round3(drainTime.Seconds()),
		QueueStatus: s.queueStatus()}
	for _, ev := range events {
		r.Sent++
		r.SenderAttempts += ev.Attempts
		if ev.Accepted.IsZero() {
			r.NeverAccepted++
		} else {
			r.Accepted++
		}
	}
	for code, n := range codes {
		r.Answers[fmt.Sprint(code)] = n
	}
	if connErrs > 0 {
		r.Answers["connection error"] = connErrs
	}
	for _, f := range faults {
		r.Faults[f.Kind]++
	}
	if deadErr != nil {
		r.DeadListFailure = deadErr.Error()
	}
	r.Destinations, r.Lost = evaluate(s, lg.start, tr, faults, dead)
	return r, nil
}

// outstanding counts the (id, destination) pairs answered 202 and neither
// delivered nor known as dead letters.
func outstanding(s *setup, tr *traffic, dead map[string]map[string]bool) int {
	events, _, _ := tr.snapshot()
	n := 0
	for _, ev := range events {
		if ev.Accepted.IsZero() {
			continue
		}
		for _, b := range s.backends {
			if !b.has(ev.ID) && !dead[b.name][ev.ID] {
				n++
			}
		}
	}
	return n
}
