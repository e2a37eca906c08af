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
