package queue

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
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
