package muxwebhook

// Benchmarks of the hot path, each next to its floor: a bare HMAC-SHA256 of
// the same bytes. Run: go test -run '^$' -bench . -benchmem
// BENCHMARKS.md has the figures; CI only smoke-runs these (-benchtime=1x).

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

var benchSizes = []int{1 << 10, 4 << 10, 64 << 10}

// benchPayload returns a realistic video.asset.ready event of exactly size
// bytes: the sample event, more tracks for bulk, passthrough for the rest.
func benchPayload(size int) []byte {
	tracks := []string{}
	build := func(pad int) string {
		return `{"type":"video.asset.ready","request_id":null,"object":{"type":"asset","id":"Hb01ZkKzL6sH02b8GXq4dV7J00vzW3g8Q1"},` +
			`"id":"3a56ac3d-33da-4366-855b-f592d898409d","environment":{"name":"Production","id":"j0863n"},` +
			`"data":{"upload_id":"Gr01bSQt5aj8","tracks":[` + strings.Join(tracks, ",") + `],` +
			`"status":"ready","playback_ids":[{"policy":"public","id":"v1pYxzCg8pp02bgKeSwjYfSCm01LJwsg00"}],` +
			`"passthrough":"` + strings.Repeat("p", pad) + `","mp4_support":"none","max_stored_resolution":"HD",` +
			`"max_stored_frame_rate":29.97,"master_access":"none","id":"Hb01ZkKzL6sH02b8GXq4dV7J00vzW3g8Q1",` +
			`"duration":23.857167,"created_at":1609869152,"aspect_ratio":"16:9"},` +
			`"created_at":"2021-01-05T17:52:37.000000Z","attempts":[],"accessor_source":null,"accessor":null}`
	}
	for len(build(0)) < size-200 {
		tracks = append(tracks, fmt.Sprintf(`{"type":"audio","max_channels":2,"duration":23.823333,"id":"FXoMB3v6bPl1ZQ%04d","language_code":"en","status":"ready"}`, len(tracks)))
	}
	pad := size - len(build(0))
	if pad < 0 {
		tracks = tracks[:len(tracks)-1]
		pad = size - len(build(0))
	}
	return []byte(build(pad))
}

func TestBenchPayloadIsValid(t *testing.T) {
	for _, size := range append(benchSizes, 2<<10, 16<<10) {
		p := benchPayload(size)
		if len(p) != size {
			t.Errorf("payload of %d bytes, want %d", len(p), size)
		}
		if _, err := DecodeEvent(p); err != nil {
			t.Errorf("payload of %d bytes: %v", size, err)
		}
	}
}

func sizeName(n int) string { return fmt.Sprintf("%dKiB", n>>10) }

// forEachSize runs f as a sub-benchmark per payload size, reporting
// throughput and allocations.
func forEachSize(b *testing.B, f func(b *testing.B, body []byte)) {
	for _, size := range benchSizes {
		body := benchPayload(size)
		b.Run(sizeName(size), func(b *testing.B) {
			b.SetBytes(int64(size))
			b.ReportAllocs()
			f(b, body)
		})
	}
}

// BenchmarkHMACFloor is the floor: HMAC-SHA256 of "t." + body with a fresh
// hmac.New, as any verifier must compute.
func BenchmarkHMACFloor(b *testing.B) {
	secret := []byte("bench-secret")
	forEachSize(b, func(b *testing.B, body []byte) {
		var sum [sha256.Size]byte
		for b.Loop() {
			m := hmac.New(sha256.New, secret)
			m.Write([]byte("1700000000."))
			m.Write(body)
			m.Sum(sum[:0])
		}
	})
}

// BenchmarkVerifyDecode is what the gateway does per request before calling
// the next handler: parse the header, check the MAC and the timestamp, and
// decode the event.
func BenchmarkVerifyDecode(b *testing.B) {
	secret := []byte("bench-secret")
	v := NewVerifier([][]byte{secret})
	now := time.Unix(1_700_000_000, 0)
	forEachSize(b, func(b *testing.B, body []byte) {
		header := Sign(secret, body, now)
		for b.Loop() {
			sig, err := v.Verify(header, body, now, 5*time.Minute)
			if err != nil {
				b.Fatal(err)
			}
			ev, err := DecodeEvent(body)
			if err != nil || ev.Type == "" || sig.Timestamp == "" {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkDecode is the JSON part alone.
func BenchmarkDecode(b *testing.B) {
	forEachSize(b, func(b *testing.B, body []byte) {
		for b.Loop() {
			if _, err := DecodeEvent(body); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkHandler runs the whole ServeHTTP, with a next handler that reads
// the restored body, the way a proxy would.
func BenchmarkHandler(b *testing.B) {
	secret := "bench-secret"
	h := provisionedHandler(b, &Handler{Secrets: []string{secret}})
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		_, err := io.Copy(io.Discard, r.Body)
		return err
	})
	forEachSize(b, func(b *testing.B, body []byte) {
		header := Sign([]byte(secret), body, time.Now())
		w := newRecorder()
		for b.Loop() {
			r := benchRequest(body, header)
			if err := h.ServeHTTP(w, r, next); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkHandlerHarness is BenchmarkHandler without the handler: what
// building each request costs. Subtract it to get the handler's own share.
func BenchmarkHandlerHarness(b *testing.B) {
	forEachSize(b, func(b *testing.B, body []byte) {
		for b.Loop() {
			r := benchRequest(body, "t=1,v1=00")
			if _, err := io.Copy(io.Discard, r.Body); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// benchRequest builds a request the way Caddy's server hands it to a
// handler: with a replacer and a vars map in its context.
func benchRequest(body []byte, header string) *http.Request {
	ctx := context.WithValue(context.Background(), caddy.ReplacerCtxKey, caddy.NewReplacer())
	ctx = context.WithValue(ctx, caddyhttp.VarsCtxKey, map[string]any{})
	r := &http.Request{
		Method:        http.MethodPost,
		URL:           &url.URL{Path: "/mux"},
		Header:        http.Header{SignatureHeader: {header}},
		Body:          io.NopCloser(bytes.NewReader(body)),
		ContentLength: int64(len(body)),
		RemoteAddr:    "127.0.0.1:40000",
		RequestURI:    "/mux",
	}
	return r.WithContext(ctx)
}

// deadlineRecorder is an httptest.ResponseRecorder that accepts read
// deadlines, as Caddy's response writers do, so that tests and benchmarks
// take the handler's usual path.
type deadlineRecorder struct {
	*httptest.ResponseRecorder
}

func newRecorder() deadlineRecorder { return deadlineRecorder{httptest.NewRecorder()} }

func (deadlineRecorder) SetReadDeadline(time.Time) error { return nil }
