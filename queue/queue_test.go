package queue

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

func openTest(t *testing.T, cfg Config) *Store {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s, err := Open(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func enqueue(t *testing.T, s *Store, dest, id string, body []byte) (bool, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return s.Enqueue(ctx, Message{Destination: dest, EventID: []byte(`"` + id + `"`), Body: body, Header: map[string]string{"Mux-Event-Type": "video.asset.ready"}})
}

func pending(t *testing.T, s *Store, dest string) uint64 {
	t.Helper()
	n, err := s.Pending(context.Background(), dest)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestEnqueueOncePerDestination: Mux's retries of one event are stored
// once per destination within the dedupe window; each destination gets its
// own copy.
func TestEnqueueOncePerDestination(t *testing.T) {
	s := openTest(t, Config{Dir: t.TempDir()})
	defer s.Close()
	body := []byte(`{"type":"video.asset.ready","id":"e-1"}`)
	for i, want := range []bool{false, true, true} {
		dup, err := enqueue(t, s, "assets", "e-1", body)
		if err != nil || dup != want {
			t.Fatalf("enqueue %d: duplicate %v, err %v; want duplicate %v", i, dup, err, want)
		}
	}
	if dup, err := enqueue(t, s, "analytics", "e-1", body); err != nil || dup {
		t.Fatalf("another destination: duplicate %v, err %v", dup, err)
	}
	if dup, err := enqueue(t, s, "assets", "e-2", body); err != nil || dup {
		t.Fatalf("another id: duplicate %v, err %v", dup, err)
	}
	if a, b := pending(t, s, "assets"), pending(t, s, "analytics"); a != 2 || b != 1 {
		t.Fatalf("stored: assets %d, analytics %d; want 2 and 1", a, b)
	}
	if _, err := enqueue(t, s, "no.dots", "e-1", body); err == nil {
		t.Fatal("a destination name with a dot was accepted (it would be two subject tokens)")
	}
}

// TestStoredAcrossRestart: what Enqueue acknowledged is there after the
// embedded server restarts on the same directory, and the dedupe window
// still holds.
func TestStoredAcrossRestart(t *testing.T) {
	dir := t.TempDir()
	s := openTest(t, Config{Dir: dir})
	for i := range 10 {
		if _, err := enqueue(t, s, "assets", fmt.Sprint("r-", i), []byte(`{"type":"x"}`)); err != nil {
			t.Fatal(err)
		}
	}
	s.Close()
	s = openTest(t, Config{Dir: dir})
	defer s.Close()
	if n := pending(t, s, "assets"); n != 10 {
		t.Fatalf("%d copies after a restart, want 10", n)
	}
	if dup, err := enqueue(t, s, "assets", "r-3", []byte(`{"type":"x"}`)); err != nil || !dup {
		t.Fatalf("a retry after the restart: duplicate %v, err %v; want a duplicate", dup, err)
	}
}

// TestFullQueueRefuses: a full stream refuses new copies (ErrFull) and
// keeps every stored one.
func TestFullQueueRefuses(t *testing.T) {
	s := openTest(t, Config{Dir: t.TempDir(), MaxBytes: 64 << 10})
	defer s.Close()
	body := []byte(`{"type":"video.asset.ready","pad":"` + strings.Repeat("p", 4<<10) + `"}`)
	var err error
	stored := 0
	for i := range 100 { // bounded: 100 × 4 KiB is far over 64 KiB
		if _, err = enqueue(t, s, "assets", fmt.Sprint("f-", i), body); err != nil {
			break
		}
		stored++
	}
	if !errors.Is(err, ErrFull) {
		t.Fatalf("after %d copies: err %v, want ErrFull", stored, err)
	}
	if n := pending(t, s, "assets"); n != uint64(stored) || stored == 0 {
		t.Fatalf("%d copies kept, want the %d stored", n, stored)
	}
}

func TestOpenErrors(t *testing.T) {
	if _, err := Open(context.Background(), Config{}); err == nil {
		t.Error("embedded server without a directory")
	}
	if _, err := Open(context.Background(), Config{Dir: t.TempDir(), Stream: "a.b"}); err == nil {
		t.Error("stream name with a dot")
	}
	if _, err := Open(context.Background(), Config{Dir: t.TempDir(), Stream: "MUX_WEBHOOK_DEAD"}); err == nil || !strings.Contains(err.Error(), "dead letters' stream of MUX_WEBHOOK") {
		t.Errorf("a stream named like another's dead letters: %v", err)
	}
	if _, err := Open(context.Background(), Config{Dir: t.TempDir(), Stream: "MUX_2"}); err == nil || !strings.Contains(err.Error(), "partition of the stream MUX") {
		t.Errorf("a stream named like another's partition: %v", err)
	}
	if _, err := Open(context.Background(), Config{Dir: t.TempDir(), Partitions: MaxPartitions + 1}); err == nil || !strings.Contains(err.Error(), "partitions") {
		t.Errorf("too many partitions: %v", err)
	}
}

// TestTransient: what Open and StartWorkers try again while a cluster elects a
// leader, and what fails at once.
func TestTransient(t *testing.T) {
	for _, c := range []struct {
		err  error
		want bool
	}{
		{context.DeadlineExceeded, true},
		{errNoLeader, true},
		{fmt.Errorf("wrapped: %w", nats.ErrTimeout), true},
		{&jetstream.APIError{Code: 503, ErrorCode: 10008, Description: "JetStream system temporarily unavailable"}, true},
		{jetstream.ErrJetStreamNotEnabled, false},
		{&jetstream.APIError{Code: 503, ErrorCode: jetstream.JSErrCodeJetStreamNotEnabledForAccount}, false},
		{&jetstream.APIError{Code: 400, ErrorCode: 10058, Description: "stream name already in use"}, false},
		{errors.New("nats: authorization violation"), false},
	} {
		if got := transient(c.err); got != c.want {
			t.Errorf("transient(%v) = %v, want %v", c.err, got, c.want)
		}
	}
}

// natsOnLoopback runs a NATS server with JetStream on a random port of
// 127.0.0.1 for the test, as an external server to connect to.
func natsOnLoopback(t *testing.T) string {
	t.Helper()
	ns, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: t.TempDir(), NoSigs: true, NoLog: true, MaxPayload: 2 << 20})
	if err != nil {
		t.Fatal(err)
	}
	ns.Start()
	if !ns.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats server did not start")
	}
	t.Cleanup(func() { ns.Shutdown(); ns.WaitForShutdown() })
	return ns.ClientURL()
}

// TestSharedAckDeadlineNeverShortened: two gateways share a destination's
// consumer on external NATS with different timeouts. The one with the
// shorter timeout keeps the longer ack deadline (else the other's long
// attempts would be handed out again mid-attempt) and says so at WARN;
// the one with the longer timeout raises it.
func TestSharedAckDeadlineNeverShortened(t *testing.T) {
	url := natsOnLoopback(t)
	b := newBackend(t, func(int) int { return http.StatusNoContent })
	coreA, logsA := observer.New(zapcore.WarnLevel)
	a := openTest(t, Config{URLs: []string{url}, Logger: zap.New(coreA)})
	defer a.Close()
	stopA, err := a.StartWorkers(context.Background(), Destination{Name: "app", URL: b.URL, Timeout: 30 * time.Second}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer stopA()
	coreB, logsB := observer.New(zapcore.WarnLevel)
	bs := openTest(t, Config{URLs: []string{url}, Logger: zap.New(coreB)})
	defer bs.Close()
	stopB, err := bs.StartWorkers(context.Background(), Destination{Name: "app", URL: b.URL, Timeout: 5 * time.Second}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer stopB()
	ackWait := func() time.Duration {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c, err := a.js.Consumer(ctx, firstPart(a).name, "deliver_app")
		if err != nil {
			t.Fatal(err)
		}
		return c.CachedInfo().Config.AckWait
	}
	if got := ackWait(); got != 35*time.Second {
		t.Errorf("after the gateway with timeout 5s started: ack wait %s, want 35s (kept)", got)
	}
	if logsB.FilterMessageSnippet("shorter than the shared consumer's").Len() != 1 {
		t.Errorf("the gateway with the shorter timeout logged %v; want one WARN", logsB.All())
	}
	if logsA.FilterMessageSnippet("ack deadline").Len() != 0 {
		t.Errorf("the first gateway logged %v; want nothing", logsA.All())
	}
	put(t, bs, "app", "shared-1", []byte(`{"id":"shared-1"}`))
	waitUntil(t, "a delivery through either", func() bool { return deliveredIDs(b)["shared-1"] == 1 })
}

// TestOpenNeverShowsANATSURLsPassword: a NATS URL with a password that
// is not a valid URL (a % not followed by two hex digits) is an Open
// error that does not quote the URL (nats.go's *url.Error does).
func TestOpenNeverShowsANATSURLsPassword(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := Open(ctx, Config{URLs: []string{"nats://gw:s3cret%zz@127.0.0.1:1"}})
	if err == nil {
		s.Close()
		t.Fatal("Open succeeded")
	}
	if strings.Contains(err.Error(), "s3cret") || strings.Contains(err.Error(), "%zz") {
		t.Errorf("Open: %q; the password must not appear", err)
	}
}

// TestEnqueueLargestEvent: the embedded server takes an event of the
// largest max_body (16 MiB) with room for its headers.
func TestEnqueueLargestEvent(t *testing.T) {
	s := openTest(t, Config{Dir: t.TempDir(), MaxBody: MaxEvent})
	defer s.Close()
	body := make([]byte, MaxEvent)
	if _, err := enqueue(t, s, "app", "big", body); err != nil {
		t.Fatalf("a 16 MiB event: %v", err)
	}
}

// TestInProcessClassification: only JetStream's 10158 ("duplicate message
// id is in process") makes Enqueue publish again.
func TestInProcessClassification(t *testing.T) {
	inProc := &jetstream.APIError{Code: 409, ErrorCode: duplicateInProcess, Description: "duplicate message id is in process"}
	cases := []struct {
		err  error
		want bool
	}{
		{inProc, true},
		{fmt.Errorf("publish: %w", inProc), true},
		{&jetstream.APIError{Code: 503, ErrorCode: 10077, Description: "maximum bytes exceeded"}, false},
		{&jetstream.APIError{Code: 400, ErrorCode: 10058}, false},
		{context.DeadlineExceeded, false},
		{errors.New("duplicate message id is in process"), false}, // the code decides, not the text
	}
	for _, c := range cases {
		if got := inProcess(c.err); got != c.want {
			t.Errorf("inProcess(%v) = %v, want %v", c.err, got, c.want)
		}
	}
}

// TestMergeShared: a shared stream's replicas, max_bytes and
// dedupe_window are never lowered by a gateway's config, each difference
// is a WARN naming the setting, and a higher setting is applied.
func TestMergeShared(t *testing.T) {
	core, logs := observer.New(zapcore.WarnLevel)
	s := &Store{log: zap.New(core)}
	running := partConfig(withDefaults(Config{Stream: "S", Partitions: 1, Replicas: 3, MaxBytes: 64 << 20, DedupeWindow: 24 * time.Hour}), 0)
	lower := partConfig(withDefaults(Config{Stream: "S", Partitions: 1, Replicas: 1, MaxBytes: 32 << 20, DedupeWindow: time.Hour}), 0)
	merged, changed := s.mergeShared(running, lower)
	if changed || merged.Replicas != 3 || merged.MaxBytes != 64<<20 || merged.Duplicates != 24*time.Hour {
		t.Errorf("lower config: merged %d replicas, %d max_bytes, %s dedupe_window, changed %v; want the running stream's, unchanged",
			merged.Replicas, merged.MaxBytes, merged.Duplicates, changed)
	}
	warned := map[string]map[string]any{}
	for _, e := range logs.TakeAll() {
		warned[e.ContextMap()["setting"].(string)] = e.ContextMap()
	}
	for setting, want := range map[string][2]string{"replicas": {"1", "3"}, "max_bytes": {"33554432", "67108864"}, "dedupe_window": {"1h0m0s", "24h0m0s"}} {
		f := warned[setting]
		if f == nil || f["configured"] != want[0] || f["running"] != want[1] {
			t.Errorf("WARN for %s: %v; want configured %s, running %s", setting, f, want[0], want[1])
		}
	}
	higher := partConfig(withDefaults(Config{Stream: "S", Partitions: 1, Replicas: 3, MaxBytes: 128 << 20, DedupeWindow: 24 * time.Hour}), 0)
	merged, changed = s.mergeShared(running, higher)
	if !changed || merged.MaxBytes != 128<<20 || merged.Replicas != 3 {
		t.Errorf("higher max_bytes: merged %d, changed %v; want raised", merged.MaxBytes, changed)
	}
	if l := logs.TakeAll(); len(l) != 1 || l[0].ContextMap()["setting"] != "max_bytes" {
		t.Errorf("higher max_bytes: logged %v; want one WARN naming max_bytes", l)
	}
	if _, changed = s.mergeShared(running, running); changed || logs.Len() != 0 {
		t.Errorf("the same settings: changed %v, %d log lines; want neither", changed, logs.Len())
	}
}

// firstPart is the store's first partition: open the store with
// Partitions 1 for a test that reads its stream as the only one.
func firstPart(s *Store) *part { return s.configured()[0] }

// makeLegacyStream makes the single stream of the versions before
// partitions, as they made it: <stream>.deliver.<destination>, and their
// dead letters on <stream>.dead.<destination>.
func makeLegacyStream(t *testing.T, s *Store) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	cfg := s.config()
	if _, err := s.js.CreateStream(ctx, jetstream.StreamConfig{
		Name:       cfg.Stream,
		Subjects:   []string{cfg.Stream + ".deliver.>", cfg.Stream + ".dead.>"},
		Storage:    jetstream.FileStorage,
		Retention:  jetstream.LimitsPolicy,
		Discard:    jetstream.DiscardNew,
		MaxBytes:   cfg.MaxBytes,
		Duplicates: cfg.DedupeWindow,
	}); err != nil {
		t.Fatal(err)
	}
}
