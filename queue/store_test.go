package queue

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// TestStoreDirLock: a second Open on a store directory that is open fails
// with an error naming the directory and the holder (this process), and
// leaves the open store working; once it is closed, Open succeeds and the
// queued copy is still there.
func TestStoreDirLock(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "js")
	s := openTest(t, Config{Dir: dir})
	if _, err := enqueue(t, s, "app", "lock-1", []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	second, err := Open(ctx, Config{Dir: dir})
	if err == nil {
		second.Close()
		s.Close()
		t.Fatal("a second Open on an open store directory succeeded")
	}
	holder := fmt.Sprintf("pid %d on host ", os.Getpid())
	if !errors.Is(err, ErrDirInUse) || !strings.Contains(err.Error(), dir) || !strings.Contains(err.Error(), holder) ||
		!strings.Contains(err.Error(), "give each Caddy its own queue dir") {
		t.Errorf("second Open: %v; want ErrDirInUse naming %s and %q", err, dir, holder)
	}
	// The open store was not disturbed.
	if _, err := enqueue(t, s, "app", "lock-2", []byte(`{}`)); err != nil {
		t.Fatalf("the open store after the refused Open: %v", err)
	}
	s.Close()
	s = openTest(t, Config{Dir: dir})
	defer s.Close()
	if n := pending(t, s, "app"); n != 2 {
		t.Errorf("after reopening: %d copies, want 2", n)
	}
	b, err := os.ReadFile(filepath.Join(dir, LockFile))
	if err != nil || !strings.Contains(string(b), fmt.Sprintf(`"pid":%d`, os.Getpid())) {
		t.Errorf("lock file: %q, %v; want this process's pid", b, err)
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

// TestIdempotencyKey: an id that is a plain header value is its own key;
// any other is "pct:" and its percent-encoded bytes; distinct ids never
// share a key.
func TestIdempotencyKey(t *testing.T) {
	cases := map[string]string{
		"3f2c-uuid":  "3f2c-uuid",
		"a b":        "a b",
		"50%":        "50%",
		"é":          "é",
		"a\x01b":     "pct:a%01b",
		"a\nb":       "pct:a%0Ab",
		"a\tb":       "pct:a%09b",
		"a\x7fb":     "pct:a%7Fb",
		" x":         "pct:%20x",
		"x ":         "pct:x%20",
		"pct:x":      "pct:pct:x",
		"pct:a%01b":  "pct:pct:a%2501b",
		"é\n":        "pct:%C3%A9%0A",
		"100%\x00":   "pct:100%25%00",
		"":           "",
		"a\r\nb: c":  "pct:a%0D%0Ab:%20c",
		"tab\tinner": "pct:tab%09inner",
	}
	seen := map[string]string{}
	for id, want := range cases {
		got := IdempotencyKey(id)
		if got != want {
			t.Errorf("IdempotencyKey(%q) = %q, want %q", id, got, want)
		}
		for i := 0; i < len(got); i++ {
			if c := got[i]; c < 0x20 && c != '\t' || c == 0x7f {
				t.Errorf("IdempotencyKey(%q) = %q holds a control byte", id, got)
			}
		}
		if other, ok := seen[got]; ok {
			t.Errorf("ids %q and %q share the key %q", id, other, got)
		}
		seen[got] = id
	}
}

// TestMergeShared: a shared stream's replicas, max_bytes and
// dedupe_window are never lowered by a gateway's config, each difference
// is a WARN naming the setting, and a higher setting is applied.
func TestMergeShared(t *testing.T) {
	core, logs := observer.New(zapcore.WarnLevel)
	s := &Store{log: zap.New(core)}
	running := streamConfig(withDefaults(Config{Stream: "S", Replicas: 3, MaxBytes: 64 << 20, DedupeWindow: 24 * time.Hour}))
	lower := streamConfig(withDefaults(Config{Stream: "S", Replicas: 1, MaxBytes: 32 << 20, DedupeWindow: time.Hour}))
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
	higher := streamConfig(withDefaults(Config{Stream: "S", Replicas: 3, MaxBytes: 128 << 20, DedupeWindow: 24 * time.Hour}))
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
