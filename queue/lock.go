package queue

// One store, one owner: the embedded server's store directory is held with
// an exclusive lock on a file inside it for as long as the store is open.
// Two embedded servers on one directory would write the same block files
// at their own offsets and lose each other's events; a second one is
// refused before it starts, and touches nothing of the store.

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// LockFile is the lock's file in the store directory: it names the
// process holding the store.
const LockFile = "mux_webhook.lock"

// lockHolder is what the lock file records of the process holding it.
type lockHolder struct {
	PID   int       `json:"pid"`
	Host  string    `json:"host"`
	Since time.Time `json:"since"`
}

func (h lockHolder) String() string {
	return fmt.Sprintf("pid %d on host %s, since %s", h.PID, h.Host, h.Since.Format(time.RFC3339))
}

// ErrDirInUse is wrapped by Open's error when another process (or another
// open store of this one) holds the store directory.
var ErrDirInUse = errors.New("in use by another process")

// dirLock is a held store directory; release lets it go.
type dirLock struct {
	f *os.File
}

// lockDir takes dir's lock, creating dir (0700) and the lock file if
// need be. It does not wait: a held lock is an error naming dir and the
// holder. The lock dies with its holder (a killed process holds nothing).
func lockDir(dir string) (*dirLock, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("queue: the store directory %s: %v", dir, err)
	}
	path := filepath.Join(dir, LockFile)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("queue: the store directory's lock file %s: %v", path, err)
	}
	held, err := flock(f)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("queue: locking the store directory %s: %v", dir, err)
	}
	if held {
		holder := "holder unknown"
		var h lockHolder
		if b, err := os.ReadFile(path); err == nil && json.Unmarshal(b, &h) == nil && h.PID != 0 {
			holder = h.String()
		}
		f.Close()
		return nil, fmt.Errorf("queue: the store directory %s is %w (%s): give each Caddy its own queue dir, or share one NATS cluster (queue { nats … })",
			dir, ErrDirInUse, holder)
	}
	host, _ := os.Hostname()
	b, _ := json.Marshal(lockHolder{PID: os.Getpid(), Host: strings.TrimSpace(host), Since: time.Now().UTC()})
	if err := f.Truncate(0); err == nil {
		_, _ = f.WriteAt(append(b, '\n'), 0)
	}
	return &dirLock{f: f}, nil
}

// release lets the directory go (closing the file drops the lock).
func (l *dirLock) release() {
	if l != nil && l.f != nil {
		l.f.Close()
		l.f = nil
	}
}
