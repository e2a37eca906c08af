// Package testorder is a destination for tests of order object: a real
// HTTP server on 127.0.0.1 that records, per Mux object, the events it
// answered 2xx in the order they arrived, every POST's attempt header, and
// each object that had two POSTs in flight at once.
package testorder

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync"
	"testing"
	"time"
)

// Backend is the recording destination.
type Backend struct {
	*httptest.Server
	mu        sync.Mutex
	delivered map[string][]string // object: event ids answered 2xx, in order
	posts     map[string][]string // event id: Mux-Webhook-Attempt of each POST
	inFlight  map[string]int
	overlaps  map[string]int
	at        map[string]time.Time // event id: when it was answered 2xx
}

// New starts a Backend that waits hold, then answers the n-th POST of
// event id with answer's status (nil: 204); answer may block. It stops
// when the test ends.
func New(t testing.TB, hold time.Duration, answer func(r *http.Request, id string, n int) int) *Backend {
	b := &Backend{delivered: map[string][]string{}, posts: map[string][]string{}, inFlight: map[string]int{},
		overlaps: map[string]int{}, at: map[string]time.Time{}}
	b.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		var ev struct {
			ID     string `json:"id"`
			Object struct {
				ID string `json:"id"`
			} `json:"object"`
		}
		_ = json.Unmarshal(body, &ev)
		obj := ev.Object.ID
		b.mu.Lock()
		b.inFlight[obj]++
		if b.inFlight[obj] > 1 {
			b.overlaps[obj]++
		}
		b.posts[ev.ID] = append(b.posts[ev.ID], r.Header.Get("Mux-Webhook-Attempt"))
		n := len(b.posts[ev.ID])
		b.mu.Unlock()
		time.Sleep(hold)
		status := http.StatusNoContent
		if answer != nil {
			status = answer(r, ev.ID, n)
		}
		b.mu.Lock()
		b.inFlight[obj]--
		if status < 300 && r.Context().Err() == nil {
			b.delivered[obj] = append(b.delivered[obj], ev.ID)
			b.at[ev.ID] = time.Now()
		}
		b.mu.Unlock()
		w.WriteHeader(status)
	}))
	t.Cleanup(b.Close)
	return b
}

// Of is the events of object answered 2xx, in the order they arrived.
func (b *Backend) Of(object string) []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.delivered[object])
}

// Attempts is the Mux-Webhook-Attempt of each POST of event id.
func (b *Backend) Attempts(id string) []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.posts[id])
}

// At is when event id was answered 2xx (zero: never).
func (b *Backend) At(id string) time.Time {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.at[id]
}

// CheckOrder fails t unless every object of want got exactly its events,
// in order, and no object had two POSTs at once.
func (b *Backend) CheckOrder(t testing.TB, want map[string][]string) {
	t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	for obj, ids := range want {
		if got := b.delivered[obj]; !slices.Equal(got, ids) {
			t.Errorf("%s: delivered %v, want %v", obj, got, ids)
		}
	}
	for obj, n := range b.overlaps {
		t.Errorf("%s: %d POSTs while another of its events was in flight", obj, n)
	}
}
