package queue

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"testing"
	"time"
)

// TestDeliverStopLeavesNoGoroutine: workers stopped while the store stays
// open (a reload that changed their destination) leave no goroutine
// behind, also when attempts hung and copies were fetched but not started.
func TestDeliverStopLeavesNoGoroutine(t *testing.T) {
	s := openTest(t, Config{Dir: t.TempDir()})
	defer s.Close()
	done := make(chan struct{})
	b := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.ReadAll(r.Body) // then the server notices the client going away
		select {
		case <-r.Context().Done():
		case <-done:
		}
	}))
	defer b.Close()
	defer close(done)
	for i := range 10 {
		put(t, s, "app", fmt.Sprint("leak-", i), []byte(`{}`))
	}
	var before int
	var beforeSites map[string]int
	for round := range 5 {
		stop, err := s.StartWorkers(context.Background(), Destination{Name: "app", URL: b.URL, Concurrency: 2, Timeout: time.Minute, StopGrace: 200 * time.Millisecond}, nil)
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(300 * time.Millisecond)
		stop()
		if round == 0 { // the durable consumer's server goroutines stay
			time.Sleep(200 * time.Millisecond)
			before, beforeSites = runtime.NumGoroutine(), goroutineSites()
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > before {
		var extra []string
		for site, k := range goroutineSites() {
			if k > beforeSites[site] {
				extra = append(extra, fmt.Sprintf("%d more: %s", k-beforeSites[site], site))
			}
		}
		t.Errorf("%d goroutines after 4 more stops, %d before:\n%s", n, before, strings.Join(extra, "\n"))
	}
}

// goroutineSites counts goroutines by their top function and creator.
func goroutineSites() map[string]int {
	buf := make([]byte, 4<<20)
	buf = buf[:runtime.Stack(buf, true)]
	out := map[string]int{}
	for _, g := range strings.Split(string(buf), "\n\n") {
		lines := strings.Split(g, "\n")
		if len(lines) < 2 {
			continue
		}
		created := ""
		for i, l := range lines {
			if strings.HasPrefix(l, "created by") && i+1 < len(lines) {
				created = l + " " + strings.TrimSpace(lines[i+1])
			}
		}
		out[created]++
	}
	return out
}
