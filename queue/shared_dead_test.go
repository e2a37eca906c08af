package queue

import (
	"context"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// TestSharedDeadStreamNeverLowered: on external NATS the dead letters'
// stream, <stream>_DEAD, is shared like the main stream: a gateway
// opened (or reloaded) with a smaller dead_max_bytes or dedupe_window
// keeps the running stream's (a WARN names dead_max_bytes); a larger
// one raises it. (Without: the last gateway to open or reload wins,
// e.g. a gateway started without `replicas 3` scales the dead letters
// down to one copy.)
func TestSharedDeadStreamNeverLowered(t *testing.T) {
	url := natsOnLoopback(t)
	a := openTest(t, Config{URLs: []string{url}, DeadMaxBytes: 64 << 20, DedupeWindow: 24 * time.Hour})
	defer a.Close()
	dead := func() (int64, time.Duration) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		st, err := a.js.Stream(ctx, DeadStream(a.cfg.Stream))
		if err != nil {
			t.Fatal(err)
		}
		c := st.CachedInfo().Config
		return c.MaxBytes, c.Duplicates
	}
	core, logs := observer.New(zapcore.WarnLevel)
	b := openTest(t, Config{URLs: []string{url}, DeadMaxBytes: 8 << 20, DedupeWindow: time.Minute, Logger: zap.New(core)})
	defer b.Close()
	if mb, dw := dead(); mb != 64<<20 || dw != 24*time.Hour {
		t.Errorf("after a gateway with smaller settings opened: %s has max_bytes %d, duplicates %s; want 64MiB, 24h (kept)", DeadStream(a.cfg.Stream), mb, dw)
	}
	if logs.FilterMessageSnippet("dead_max_bytes").Len() == 0 {
		t.Errorf("the gateway with the smaller dead_max_bytes logged %v; want a WARN naming dead_max_bytes", logs.All())
	}
	// A reload of that gateway, still lower: kept too.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := b.Reconfigure(ctx, Config{URLs: []string{url}, DeadMaxBytes: 16 << 20, DedupeWindow: 2 * time.Minute}); err != nil {
		t.Fatal(err)
	}
	if mb, dw := dead(); mb != 64<<20 || dw != 24*time.Hour {
		t.Errorf("after its reload with smaller settings: max_bytes %d, duplicates %s; want 64MiB, 24h (kept)", mb, dw)
	}
	// Higher: raised.
	if err := b.Reconfigure(ctx, Config{URLs: []string{url}, DeadMaxBytes: 128 << 20, DedupeWindow: 2 * time.Minute}); err != nil {
		t.Fatal(err)
	}
	if mb, _ := dead(); mb != 128<<20 {
		t.Errorf("after a reload with a larger dead_max_bytes: %d; want 128MiB (raised)", mb)
	}
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

// TestReconfigureDeadMaxBytesGuarded: a reload's dead_max_bytes is
// written under the lock that bury's reading of the config takes (run
// with -race: without, a data race).
func TestReconfigureDeadMaxBytesGuarded(t *testing.T) {
	dir := t.TempDir()
	s := openTest(t, Config{Dir: dir})
	defer s.Close()
	done := make(chan struct{})
	read := make(chan struct{})
	go func() {
		defer close(read)
		for {
			select {
			case <-done:
				return
			default:
				_ = s.config().DeadMaxBytes // as bury does
			}
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	err := s.Reconfigure(ctx, Config{Dir: dir, DeadMaxBytes: 32 << 20})
	close(done)
	<-read
	if err != nil {
		t.Fatal(err)
	}
	if got := s.config().DeadMaxBytes; got != 32<<20 {
		t.Errorf("dead_max_bytes after the reload: %d, want 32MiB", got)
	}
}
