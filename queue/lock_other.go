//go:build !(linux || darwin || freebsd || netbsd || openbsd || dragonfly)

package queue

import "os"

// flock: on this system the store directory is not locked (no flock);
// the lock file still names the latest process that opened the store.
func flock(*os.File) (held bool, err error) { return false, nil }
