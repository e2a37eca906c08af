package main

// The traffic: distinct Mux events at a bounded rate, each signed with the
// gateway's secret at every attempt and sent as Mux sends: a non-2xx or a
// connection error is retried (same id, growing delay) until 2xx or the
// run's end. On the cluster the attempts of one event take turns over the
// gateways, as behind a load balancer.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	mrand "math/rand"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// maxInFlight bounds the events being sent or retried at once.
const maxInFlight = 2000

// sentEvent is one event id and what its sending met.
type sentEvent struct {
	ID       string
	Type     string
	Sent     time.Time
	Accepted time.Time // first 2xx; zero if never
	Code     int       // that 2xx
	Attempts int
}

// traffic sends the events of one setup.
type traffic struct {
	secret  string
	targets []string // the gateways' webhook URLs
	rate    float64  // events a second
	client  *http.Client

	mu       sync.Mutex
	events   []*sentEvent
	codes    map[int]int // non-2xx answers
	connErrs int
	wg       sync.WaitGroup
}

func newTraffic(secret string, targets []string, rate float64) *traffic {
	return &traffic{
		secret: secret, targets: targets, rate: rate, codes: map[int]int{},
		// Mux waits 5 s for an answer.
		client: &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 64, IdleConnTimeout: 30 * time.Second}},
	}
}

// run makes new events until gen ends; each one is retried until it is
// answered 2xx or retry ends. It returns when the generator stops; wait
// waits for the retries.
func (t *traffic) run(gen, retry context.Context) {
	slots := make(chan struct{}, maxInFlight)
	tick := time.NewTicker(time.Duration(float64(time.Second) / t.rate))
	defer tick.Stop()
	rng := mrand.New(mrand.NewSource(time.Now().UnixNano()))
	for n := 0; ; n++ {
		select {
		case <-gen.Done():
			return
		case <-tick.C:
		}
		select {
		case slots <- struct{}{}:
		case <-gen.Done():
			return
		}
		ev := &sentEvent{ID: uuid(), Type: eventTypes[rng.Intn(len(eventTypes))], Sent: time.Now()}
		body := muxEvent(ev.ID, ev.Type, ev.Sent, rng)
		t.mu.Lock()
		t.events = append(t.events, ev)
		t.mu.Unlock()
		t.wg.Add(1)
		go func(first int) {
			defer t.wg.Done()
			defer func() { <-slots }()
			t.send(retry, ev, body, first)
		}(n)
	}
}

// wait waits for every event's sending to end.
func (t *traffic) wait() { t.wg.Wait() }

// send posts one event until 2xx or ctx ends, with Mux-like backoff.
func (t *traffic) send(ctx context.Context, ev *sentEvent, body []byte, first int) {
	for attempt := 0; ctx.Err() == nil; attempt++ {
		url := t.targets[(first+attempt)%len(t.targets)]
		code, err := t.post(ctx, url, body)
		t.mu.Lock()
		ev.Attempts++
		switch {
		case err != nil:
			t.connErrs++
		case code >= 200 && code < 300:
			ev.Accepted, ev.Code = time.Now(), code
			t.mu.Unlock()
			return
		default:
			t.codes[code]++
		}
		t.mu.Unlock()
		backoff := 250 * time.Millisecond << min(attempt, 5)
		if backoff > 5*time.Second {
			backoff = 5 * time.Second
		}
		select {
		case <-ctx.Done():
		case <-time.After(backoff):
		}
	}
}

// post sends body signed now with the gateway's secret.
func (t *traffic) post(ctx context.Context, url string, body []byte) (int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, strings.NewReader(string(body)))
	if err != nil {
		return 0, err
	}
	ts := strconv.FormatInt(time.Now().Unix(), 10)
	req.Header.Set("Mux-Signature", "t="+ts+",v1="+macHex(t.secret, ts, body))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "Mux Webhooks (chaos run)")
	resp, err := t.client.Do(req)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

// snapshot copies the events and counters.
func (t *traffic) snapshot() (events []sentEvent, codes map[int]int, connErrs int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, ev := range t.events {
		events = append(events, *ev)
	}
	codes = map[int]int{}
	for k, v := range t.codes {
		codes[k] = v
	}
	return events, codes, t.connErrs
}

var eventTypes = []string{
	"video.asset.created", "video.asset.ready", "video.asset.static_renditions.ready",
	"video.asset.track.ready", "video.upload.asset_created", "video.live_stream.active",
	"video.live_stream.idle", "video.asset.deleted",
}

// uuid is a random version 4 UUID, as Mux's event ids are.
func uuid() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b[:])
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// muxEvent is an event as Mux sends it (the fields of a real
// video.asset.ready, ~900 bytes).
func muxEvent(id, typ string, at time.Time, rng *mrand.Rand) []byte {
	objType := "asset"
	switch {
	case strings.HasPrefix(typ, "video.live_stream."):
		objType = "live"
	case strings.HasPrefix(typ, "video.upload."):
		objType = "upload"
	}
	// One of 50 objects: an object's events come one after another, as
	// an asset's do, and order object (on app) holds some of them.
	obj := fmt.Sprintf("chaos-%s-%02d", objType, rng.Intn(50))
	created := at.UTC().Format("2006-01-02T15:04:05.000000Z")
	return fmt.Appendf(nil, `{"type":%q,"request_id":null,"object":{"type":%q,"id":%q},"id":%q,"environment":{"name":"Production","id":"j0863n"},`+
		`"data":{"upload_id":%q,"tracks":[{"type":"video","max_width":1920,"max_height":1080,"max_frame_rate":29.97,"id":%q,"duration":%.3f},`+
		`{"type":"audio","max_channels":2,"id":%q,"duration":%.3f}],"status":"ready","playback_ids":[{"policy":"public","id":%q}],`+
		`"passthrough":"chaos-%d","mp4_support":"none","max_stored_resolution":"HD","max_stored_frame_rate":29.97,"master_access":"none",`+
		`"id":%q,"encoding_tier":"smart","duration":%.3f,"created_at":%d,"aspect_ratio":"16:9"},`+
		`"created_at":%q,"attempts":[],"accessor_source":null,"accessor":null}`,
		typ, objType, obj, id, uuid(), uuid()[:12], 10+rng.Float64()*600, uuid()[:12], 10+rng.Float64()*600, uuid()[:20],
		rng.Intn(1_000_000), obj, 10+rng.Float64()*600, at.Unix(), created)
}
