package main

// A destination's backend: an HTTP server on 127.0.0.1 that checks each
// delivery (its signature, computed with the destination's sign secret;
// Idempotency-Key against the body's id; the destination header) and
// records it: event id, Mux-Webhook-Attempt, time, and whether its answer
// reached the gateway. A fault makes it fail (500), hang (no answer until
// the gateway gives up) or answer slowly (it acts on arrival, then waits).

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"math/rand"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Backend modes.
const (
	modeOK = iota
	modeFail
	modeHang
	modeSlow
)

// delivery is one attempt the backend acted on.
type delivery struct {
	At       time.Time
	Attempt  int
	Answered bool // the 2xx was written before the gateway gave up
}

// backend is one destination's server.
type backend struct {
	name   string
	secret string // the destination's sign secret
	ln     net.Listener
	srv    *http.Server

	mu         sync.Mutex
	mode       int
	release    chan struct{} // closed when a hang ends
	rng        *rand.Rand
	got        map[string][]*delivery
	failed     int // answered 500 by a fault
	hung       int // held by a fault
	badSig     int // signature missing, wrong or stale
	badHeaders int // Idempotency-Key or Mux-Webhook-Destination wrong
	maxAttempt int
}

func newBackend(name, secret string, seed int64) (*backend, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	b := &backend{name: name, secret: secret, ln: ln, release: make(chan struct{}), rng: rand.New(rand.NewSource(seed)), got: map[string][]*delivery{}}
	b.srv = &http.Server{Handler: b, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = b.srv.Serve(ln) }()
	return b, nil
}

// url is what the destination line names.
func (b *backend) url() string { return "http://" + b.ln.Addr().String() + "/hook" }

func (b *backend) close() {
	b.setMode(modeOK)
	_ = b.srv.Close()
}

// setMode switches the behaviour; the end of a hang releases the held
// requests (with a 503, as a backend coming back would).
func (b *backend) setMode(m int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.mode == modeHang && m != modeHang {
		close(b.release)
		b.release = make(chan struct{})
	}
	b.mode = m
}

func (b *backend) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, 2<<20))
	if err != nil {
		return
	}
	now := time.Now()
	if !validSignature(r.Header.Get("Mux-Signature"), b.secret, body, now) {
		b.mu.Lock()
		b.badSig++
		b.mu.Unlock()
		http.Error(w, "bad signature", http.StatusUnauthorized)
		return
	}
	var ev struct {
		ID string `json:"id"`
	}
	_ = json.Unmarshal(body, &ev)
	if ev.ID == "" || r.Header.Get("Idempotency-Key") != ev.ID || r.Header.Get("Mux-Webhook-Destination") != b.name {
		b.mu.Lock()
		b.badHeaders++
		b.mu.Unlock()
		http.Error(w, "bad headers", http.StatusBadRequest)
		return
	}
	attempt, _ := strconv.Atoi(r.Header.Get("Mux-Webhook-Attempt"))
	b.mu.Lock()
	if attempt > b.maxAttempt {
		b.maxAttempt = attempt
	}
	mode, release := b.mode, b.release
	var delay time.Duration
	switch mode {
	case modeFail:
		b.failed++
		b.mu.Unlock()
		http.Error(w, "failing (chaos)", http.StatusInternalServerError)
		return
	case modeHang:
		b.hung++
		b.mu.Unlock()
		select {
		case <-r.Context().Done():
		case <-release:
		case <-time.After(2 * time.Minute):
		}
		http.Error(w, "was hanging (chaos)", http.StatusServiceUnavailable)
		return
	case modeSlow:
		delay = 500*time.Millisecond + time.Duration(b.rng.Int63n(int64(2500*time.Millisecond)))
	}
	// The backend acts on arrival: an attempt whose answer is lost (a
	// gateway killed, a timeout while it is slow) has been received.
	d := &delivery{At: now, Attempt: attempt}
	b.got[ev.ID] = append(b.got[ev.ID], d)
	b.mu.Unlock()
	if delay > 0 {
		select {
		case <-r.Context().Done():
			return // the gateway gave up: not answered
		case <-time.After(delay):
		}
	}
	if r.Context().Err() != nil {
		return
	}
	w.WriteHeader(http.StatusOK)
	b.mu.Lock()
	d.Answered = true
	b.mu.Unlock()
}

// validSignature checks a Mux-Signature ("t=<unix>,v1=<hex>") against an
// HMAC-SHA256 of "t.body" computed here, and that t is within 5 minutes.
func validSignature(header, secret string, body []byte, now time.Time) bool {
	var ts string
	var sigs []string
	for _, part := range strings.Split(header, ",") {
		k, v, ok := strings.Cut(part, "=")
		if !ok {
			continue
		}
		switch k {
		case "t":
			ts = v
		case "v1":
			sigs = append(sigs, v)
		}
	}
	t, err := strconv.ParseInt(ts, 10, 64)
	if err != nil || len(sigs) == 0 {
		return false
	}
	if age := now.Sub(time.Unix(t, 0)); age > 5*time.Minute || age < -5*time.Minute {
		return false
	}
	want := macHex(secret, ts, body)
	for _, s := range sigs {
		if hmac.Equal([]byte(s), []byte(want)) {
			return true
		}
	}
	return false
}

// macHex is the hex HMAC-SHA256 of "ts.body" with secret.
func macHex(secret, ts string, body []byte) string {
	m := hmac.New(sha256.New, []byte(secret))
	m.Write([]byte(ts))
	m.Write([]byte{'.'})
	m.Write(body)
	return hex.EncodeToString(m.Sum(nil))
}

// snapshot copies what the backend recorded.
func (b *backend) snapshot() (got map[string][]delivery, failed, hung, badSig, badHeaders, maxAttempt int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	got = make(map[string][]delivery, len(b.got))
	for id, ds := range b.got {
		for _, d := range ds {
			got[id] = append(got[id], *d)
		}
	}
	return got, b.failed, b.hung, b.badSig, b.badHeaders, b.maxAttempt
}

// has reports whether id has been delivered at least once.
func (b *backend) has(id string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.got[id]) > 0
}
