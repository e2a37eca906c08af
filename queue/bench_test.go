package queue

// Where mux_deliver's time goes: storing one 2 KiB event, next to its
// floor, a bare write and fsync of the same bytes on the same disk, with 1
// to 64 publishers at once (what concurrent requests do); the two levers
// JetStream offers, more streams and atomic batches; and the memory the
// dedupe window keeps per event id. Run:
//
//	go test ./queue -run '^$' -bench 'DeliverEnqueue|EnqueueLevers' -benchmem
//	go test ./queue -run '^$' -bench DedupeWindowMemory -benchtime 200000x
//
// BENCHMARKS.md has the figures; CI only smoke-runs these (-benchtime=1x).

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// benchEvent is a 2 KiB event body; the store does not look inside.
var benchEvent = []byte(`{"type":"video.asset.ready","id":"3a56ac3d-33da-4366-855b-f592d898409d","data":{"passthrough":"` +
	strings.Repeat("p", 2048-100) + `"}}`)

// publishers runs op b.N times in all, from n goroutines at once.
func publishers(b *testing.B, n int, op func(i int) error) {
	b.Helper()
	var next atomic.Int64
	var wg sync.WaitGroup
	var failed atomic.Value
	b.SetBytes(int64(len(benchEvent)))
	b.ReportAllocs()
	b.ResetTimer()
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1)
				if i > int64(b.N) {
					return
				}
				if err := op(int(i)); err != nil {
					failed.CompareAndSwap(nil, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	b.StopTimer()
	if err, _ := failed.Load().(error); err != nil {
		b.Fatal(err)
	}
}

func BenchmarkDeliverEnqueue(b *testing.B) {
	for _, n := range []int{1, 4, 16, 64} {
		// The floor: append the event to a file and fsync it, as a
		// durable log must at least do before it acknowledges.
		b.Run(fmt.Sprintf("fsync-file/publishers-%d", n), func(b *testing.B) {
			f, err := os.OpenFile(filepath.Join(b.TempDir(), "log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
			if err != nil {
				b.Fatal(err)
			}
			defer f.Close()
			publishers(b, n, func(int) error {
				if _, err := f.Write(benchEvent); err != nil {
					return err
				}
				return f.Sync()
			})
		})
	}
	for _, n := range []int{1, 4, 16, 64} {
		// What mux_deliver does per destination: Enqueue through the
		// embedded JetStream server (SyncAlways, the default 4
		// partitions), distinct event ids.
		b.Run(fmt.Sprintf("queue/publishers-%d", n), func(b *testing.B) {
			s := openBench(b, true)
			publishers(b, n, func(i int) error { return benchEnqueue(s, i) })
		})
	}
	for _, n := range []int{16, 64} {
		// The same on one stream (partitions 1), as before #21.
		b.Run(fmt.Sprintf("queue-partitions-1/publishers-%d", n), func(b *testing.B) {
			s := openBenchWith(b, true, Config{Partitions: 1})
			publishers(b, n, func(i int) error { return benchEnqueue(s, i) })
		})
	}
	for _, n := range []int{1, 16} {
		// The same without the fsync: what JetStream itself costs.
		b.Run(fmt.Sprintf("queue-no-fsync/publishers-%d", n), func(b *testing.B) {
			s := openBench(b, false)
			publishers(b, n, func(i int) error { return benchEnqueue(s, i) })
		})
	}
	// Enqueue while the destination's workers deliver what is stored to a
	// fast backend on 127.0.0.1 (each delivered copy is acknowledged and
	// deleted from the stream): the store's writes are shared.
	// With order object, every 4 events another object (as bench/run's
	// pool): the hold's question to the stream and the delete before the
	// ack are what it adds.
	for _, order := range []bool{false, true} {
		name := "queue+delivering/publishers-16"
		if order {
			name = "queue+delivering-order-object/publishers-16"
		}
		b.Run(name, func(b *testing.B) {
			backend := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
			defer backend.Close()
			s := openBench(b, true)
			var delivered atomic.Int64
			stop, err := s.StartWorkers(context.Background(), Destination{Name: "bench", URL: backend.URL, OrderObject: order}, func(a Attempt) {
				if a.Result == "delivered" {
					delivered.Add(1)
				}
			})
			if err != nil {
				b.Fatal(err)
			}
			defer stop()
			start := time.Now()
			publishers(b, 16, func(i int) error { return benchEnqueueObject(s, i, strconv.Itoa(i/4)) })
			b.ReportMetric(float64(delivered.Load())/time.Since(start).Seconds(), "delivered/s")
		})
	}
}

func openBench(b *testing.B, syncAlways bool) *Store {
	b.Helper()
	return openBenchWith(b, syncAlways, Config{})
}

// openBenchWith is openBench with cfg (its Dir is the benchmark's).
func openBenchWith(b *testing.B, syncAlways bool, cfg Config) *Store {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cfg.Dir = b.TempDir()
	s, err := open(ctx, cfg, syncAlways)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(s.Close)
	return s
}

func benchEnqueue(s *Store, i int) error { return benchEnqueueObject(s, i, "") }

// benchEnqueueObject is benchEnqueue of an event of object (none: "").
func benchEnqueueObject(s *Store, i int, object string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	id := strconv.Itoa(i)
	dup, err := s.Enqueue(ctx, Message{
		Destination: "bench", EventID: []byte(`"` + id + `"`), ObjectID: object, ID: id, Type: "video.asset.ready", Body: benchEvent,
		Header: map[string]string{HeaderSignature: "t=1700000000,v1=00"},
	})
	if err == nil && dup {
		err = fmt.Errorf("event %s: a duplicate", id)
	}
	return err
}

// BenchmarkEnqueueLevers measures what JetStream could do beyond one
// stream storing one message per fsync, with raw publishes (not Enqueue):
//
//   - streams-K: the same publishers spread over K streams, each with its
//     own store, whose fsyncs then overlap;
//   - atomic-batch-N: one publisher sending atomic batches of N messages
//     (JetStream 2.12+, allow_atomic), which a single-server stream stores
//     with one fsync per batch, but stages each batch in a store of its own
//     first.
func BenchmarkEnqueueLevers(b *testing.B) {
	ctx := context.Background()
	stream := func(b *testing.B, s *Store, name string, atomic bool) {
		b.Helper()
		_, err := s.js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
			Name: name, Subjects: []string{name + ".>"}, Storage: jetstream.FileStorage, Discard: jetstream.DiscardNew,
			MaxBytes: DefaultMaxBytes, Duplicates: DefaultDedupeWindow, AllowAtomicPublish: atomic,
		})
		if err != nil {
			b.Fatal(err)
		}
	}
	for _, k := range []int{1, 2, 4, 8} {
		b.Run(fmt.Sprintf("streams-%d/publishers-64", k), func(b *testing.B) {
			s := openBench(b, true)
			for j := range k {
				stream(b, s, fmt.Sprint("S", j), false)
			}
			publishers(b, 64, func(i int) error {
				m := nats.NewMsg(fmt.Sprintf("S%d.deliver.bench", i%k))
				m.Data = benchEvent
				m.Header.Set(jetstream.MsgIDHeader, strconv.Itoa(i))
				_, err := s.js.PublishMsg(ctx, m)
				return err
			})
		})
	}
	for _, n := range []int{1, 4, 16, 64} {
		b.Run(fmt.Sprintf("atomic-batch-%d", n), func(b *testing.B) {
			s := openBench(b, true)
			stream(b, s, "A", true)
			b.SetBytes(int64(len(benchEvent)))
			b.ReportAllocs()
			for i := 0; i < b.N; i += n {
				if err := publishAtomic(ctx, s, i, n); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// publishAtomic stores messages first..first+n-1 as one atomic batch: all
// but the last are published without waiting, the last commits and is
// acknowledged for all.
func publishAtomic(ctx context.Context, s *Store, first, n int) error {
	id := fmt.Sprint("bench-", first)
	for j := range n {
		m := nats.NewMsg("A.deliver.bench")
		m.Data = benchEvent
		m.Header.Set(jetstream.MsgIDHeader, strconv.Itoa(first+j))
		if n > 1 {
			m.Header.Set("Nats-Batch-Id", id)
			m.Header.Set("Nats-Batch-Sequence", strconv.Itoa(j+1))
		}
		if j < n-1 {
			if err := s.conn.PublishMsg(m); err != nil {
				return err
			}
			continue
		}
		if n > 1 {
			m.Header.Set("Nats-Batch-Commit", "1")
		}
		resp, err := s.conn.RequestMsgWithContext(ctx, m)
		if err != nil {
			return err
		}
		var ack struct {
			Error *struct {
				Description string `json:"description"`
			} `json:"error"`
		}
		if err := json.Unmarshal(resp.Data, &ack); err != nil {
			return err
		}
		if ack.Error != nil {
			return fmt.Errorf("batch refused: %s", ack.Error.Description)
		}
	}
	return nil
}

// BenchmarkDedupeWindowMemory reports the live heap each enqueued event
// leaves behind (heap-B/id): JetStream keeps every message id of the
// dedupe window in memory, so with the default 24h window each id stays,
// while with a 1s window they expire. The difference is the window's cost
// per id. (No fsync: the same memory, sooner.)
func BenchmarkDedupeWindowMemory(b *testing.B) {
	for _, w := range []time.Duration{time.Second, DefaultDedupeWindow} {
		b.Run("window-"+w.String(), func(b *testing.B) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			s, err := open(ctx, Config{Dir: b.TempDir(), DedupeWindow: w}, false)
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			before := liveHeap()
			publishers(b, 16, func(i int) error { return benchEnqueue(s, i) })
			if w < time.Minute {
				time.Sleep(w + time.Second) // the window's ids expire
			}
			b.ReportMetric(float64(int64(liveHeap())-int64(before))/float64(b.N), "heap-B/id")
		})
	}
}

func liveHeap() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}
