// Package testwait is the tests' one polling helper, shared by the
// plugin's tests and the queue's: wait for a condition, bounded in time,
// and say what was awaited when it never came.
package testwait

import (
	"testing"
	"time"
)

// Limit is how long For waits.
const Limit = 10 * time.Second

// every is how often the condition is checked.
const every = 20 * time.Millisecond

// For checks cond until it holds, for at most Limit, then fails the test
// with describe()'s text.
func For(t testing.TB, cond func() bool, describe func() string) {
	t.Helper()
	Until(t, Limit, cond, describe)
}

// Until is For with a limit of the caller's.
func Until(t testing.TB, limit time.Duration, cond func() bool, describe func() string) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s; %s", limit, describe())
			return
		}
		time.Sleep(every)
	}
}
