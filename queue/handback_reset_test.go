package queue

import (
	"context"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// TestHandBacksDoNotOutliveTheirCounts: the ledger subtracts hand-backs
// from JetStream's delivery count; when that count starts again (the
// destination's consumer deleted and made again, or the stream deleted
// and made again by another instance, its sequences reused), what this
// Store handed back before must not lower the attempt numbers: the
// backend sees attempts 1, 2 and the copy is a dead letter after
// max_attempts 2, not after 4.
func TestHandBacksDoNotOutliveTheirCounts(t *testing.T) {
	for _, reset := range []string{"consumer", "stream"} {
		t.Run(reset, func(t *testing.T) {
			s := openTest(t, Config{Dir: t.TempDir()})
			defer s.Close()
			ctx := context.Background()
			d := Destination{Name: "app", MaxAttempts: 2, Retry: []time.Duration{10 * time.Millisecond}}
			d.defaults()
			put(t, s, "app", "first", []byte(`{}`))

			// Workers that stopped twice handed the fetched copy back.
			cons, err := s.js.CreateOrUpdateConsumer(ctx, s.cfg.Stream, s.consumerConfig(d))
			if err != nil {
				t.Fatal(err)
			}
			for range 2 {
				batch, err := cons.Fetch(1, jetstream.FetchMaxWait(5*time.Second))
				if err != nil {
					t.Fatal(err)
				}
				n := 0
				for msg := range batch.Messages() {
					s.handBack(msg)
					n++
				}
				if n != 1 {
					t.Fatalf("fetched %d copies, want 1", n)
				}
			}

			switch reset {
			case "consumer": // e.g. `nats consumer rm`, then the next workers make it again
				if err := s.js.DeleteConsumer(ctx, s.cfg.Stream, "deliver_app"); err != nil {
					t.Fatal(err)
				}
			case "stream": // deleted; another instance's Open makes it again: sequences from 1
				if err := s.js.DeleteStream(ctx, s.cfg.Stream); err != nil {
					t.Fatal(err)
				}
				if _, err := s.js.CreateOrUpdateStream(ctx, streamConfig(s.cfg)); err != nil {
					t.Fatal(err)
				}
				put(t, s, "app", "second", []byte(`{}`))
			}

			b := newBackend(t, func(int) int { return http.StatusInternalServerError })
			d.URL = b.URL
			stop, err := s.StartWorkers(ctx, d, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer stop()
			waitUntil(t, "a dead letter", func() bool {
				dead, err := s.Dead(ctx, "app")
				return err == nil && len(dead) == 1
			})
			stop()
			reqs, _ := b.requests()
			var got []int
			for _, r := range reqs {
				n, _ := strconv.Atoi(r.Header.Get(HeaderAttempt))
				got = append(got, n)
			}
			if len(got) != 2 || got[0] != 1 || got[1] != 2 {
				t.Errorf("attempt numbers the backend saw: %v, want [1 2] (max_attempts 2)", got)
			}
		})
	}
}
