package testwait

import (
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// fakeT records Fatalf instead of ending the test.
type fakeT struct {
	testing.TB
	failed string
}

func (f *fakeT) Helper() {}
func (f *fakeT) Fatalf(format string, args ...any) {
	f.failed = format
	if len(args) > 1 {
		f.failed = args[1].(string)
	}
}

func TestUntilReturnsOnceTheConditionHolds(t *testing.T) {
	var n atomic.Int32
	ft := &fakeT{}
	Until(ft, time.Second, func() bool { return n.Add(1) == 3 }, func() string { return "three checks" })
	if ft.failed != "" || n.Load() != 3 {
		t.Fatalf("failed=%q after %d checks", ft.failed, n.Load())
	}
}

func TestUntilFailsWithTheDescription(t *testing.T) {
	ft := &fakeT{}
	start := time.Now()
	Until(ft, 100*time.Millisecond, func() bool { return false }, func() string { return "the backend got 2 of 3" })
	if !strings.Contains(ft.failed, "the backend got 2 of 3") {
		t.Fatalf("failure says %q", ft.failed)
	}
	if time.Since(start) < 100*time.Millisecond {
		t.Fatal("gave up before its limit")
	}
}
