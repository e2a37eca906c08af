package muxwebhook

// The admin API module (admin.go): Live Logs as JSON and as an event
// stream, resuming, reloads, and headers after handle_errors, against an
// in-process Caddy with its admin API on a free localhost port.

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"
)

const liveLogGlobal = `	mux_webhook {
		log_size 50
		log_body 64
	}`

func liveLogSite(up *upstream) string {
	return fmt.Sprintf(`
	mux_webhook %s
	@assets mux_event video.asset.*
	handle @assets {
		reverse_proxy %s
	}
	handle {
		respond 204
	}`, testSecret, up.hostPort())
}

func getJSON(t *testing.T, url string, v any) int {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusOK && v != nil {
		if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
			t.Fatal(err)
		}
	}
	return resp.StatusCode
}

// clearLiveLog empties the process's live log, which outlives configs,
// and so tests.
func clearLiveLog() {
	liveLog.mu.Lock()
	defer liveLog.mu.Unlock()
	liveLog.ring, liveLog.start, liveLog.count = nil, 0, 0
}

func TestLiveLogEndpoints(t *testing.T) {
	up := newUpstream(t, "assets")
	g := startGatewayWithAdmin(t, liveLogGlobal, liveLogSite(up))
	clearLiveLog() // the counts below are this test's entries

	verified := event("video.asset.ready", "ll-1", `{"passthrough":"`+strings.Repeat("p", 200)+`"}`)
	do(t, signedRequest(t, g.url, testSecret, verified, time.Now()))
	do(t, signedRequest(t, g.url, "forged", event("video.asset.ready", "ll-2", ""), time.Now()))
	do(t, signedRequest(t, g.url, testSecret, []byte("not json"), time.Now()))
	do(t, signedRequest(t, g.url, testSecret, event("video.upload.created", "ll-3", ""), time.Now()))

	var list []LogEntry
	if status := getJSON(t, g.admin+"/mux-webhook/events", &list); status != 200 || len(list) < 4 {
		t.Fatalf("events: %d, %d entries", status, len(list))
	}
	list = list[:4]
	wantOutcomes := []string{"verified", "bad_json", "mismatch", "verified"} // newest first
	wantStatus := []int{204, 400, 401, 200}
	for i, e := range list {
		if e.Outcome != wantOutcomes[i] || e.Status != wantStatus[i] {
			t.Errorf("entry %d: outcome %s status %d, want %s %d", i, e.Outcome, e.Status, wantOutcomes[i], wantStatus[i])
		}
		if sig := e.Headers["Mux-Signature"]; len(sig) != 1 || sig[0] != "[redacted]" {
			t.Errorf("entry %d: Mux-Signature shown as %v", i, sig)
		}
		if i > 0 && e.Seq >= list[i-1].Seq {
			t.Errorf("not newest first: %d after %d", e.Seq, list[i-1].Seq)
		}
	}
	asset := list[3]
	if asset.Type != "video.asset.ready" || asset.ID != "ll-1" || asset.ObjectType != "asset" || asset.ObjectID != "obj-ll-1" {
		t.Errorf("verified entry: %+v", asset)
	}
	if !asset.BodyTruncated || asset.Body != string(verified[:64]) {
		t.Errorf("body not cut to log_body=64: %q (truncated %v)", asset.Body, asset.BodyTruncated)
	}
	if forged := list[2]; forged.Body != "" || forged.BodyUnavailable == "" {
		t.Errorf("a forged request's body is shown: %+v", forged)
	}
	if list[1].Body != "not json" {
		t.Errorf("authentic bad JSON should be shown for debugging: %q", list[1].Body)
	}

	for _, c := range []struct {
		query string
		want  int
	}{
		{"?outcome=verified&limit=1000", 2},
		{"?type=video.upload.*", 1},
		{"?outcome=mismatch", 1},
		{"?limit=1", 1},
	} {
		var got []LogEntry
		if status := getJSON(t, g.admin+"/mux-webhook/events"+c.query, &got); status != 200 || len(got) != c.want {
			t.Errorf("%s: %d, %d entries, want %d", c.query, status, len(got), c.want)
		}
	}
	for _, bad := range []string{"?outcome=nope", "?limit=0", "?type=a%20b"} {
		if status := getJSON(t, g.admin+"/mux-webhook/events"+bad, nil); status != http.StatusBadRequest {
			t.Errorf("%s: %d, want 400", bad, status)
		}
	}

	resp, err := http.Get(g.admin + "/mux-webhook/")
	if err != nil {
		t.Fatal(err)
	}
	page, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(resp.Header.Get("Content-Type"), "text/html") ||
		!strings.Contains(string(page), "EventSource") || strings.Contains(string(page), "http://") || strings.Contains(string(page), "https://") {
		t.Errorf("page: %d %s, %d bytes; it must be self-contained", resp.StatusCode, resp.Header.Get("Content-Type"), len(page))
	}
	// Nothing but itself, never in a frame (its buttons change the queue).
	if csp := resp.Header.Get("Content-Security-Policy"); !strings.HasPrefix(csp, "default-src 'none';") ||
		!strings.Contains(csp, "connect-src 'self'") || !strings.Contains(csp, "frame-ancestors 'none'") {
		t.Errorf("page's Content-Security-Policy: %q", csp)
	}
}

// sseEvent is one Server-Sent Event.
type sseEvent struct{ id, name, data string }

// readSSE sends the stream's events to the returned channel until it ends.
func readSSE(t *testing.T, url string) (<-chan sseEvent, func()) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("stream: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	return sseEvents(resp.Body), func() { resp.Body.Close() }
}

// sseEvents sends the events read from body to the returned channel until
// body ends.
func sseEvents(body io.Reader) <-chan sseEvent {
	ch := make(chan sseEvent, 100)
	go func() {
		defer close(ch)
		sc := bufio.NewScanner(body)
		sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
		var ev sseEvent
		for sc.Scan() {
			line := sc.Text()
			switch {
			case strings.HasPrefix(line, "id: "):
				ev.id = strings.TrimPrefix(line, "id: ")
			case strings.HasPrefix(line, "event: "):
				ev.name = strings.TrimPrefix(line, "event: ")
			case strings.HasPrefix(line, "data: "):
				ev.data = strings.TrimPrefix(line, "data: ")
			case line == "" && ev.name != "":
				ch <- ev
				ev = sseEvent{}
			}
		}
	}()
	return ch
}

func nextSSE(t *testing.T, ch <-chan sseEvent) (sseEvent, bool) {
	t.Helper()
	select {
	case ev, ok := <-ch:
		return ev, ok
	case <-time.After(10 * time.Second):
		t.Fatal("no event on the stream within 10s")
		return sseEvent{}, false
	}
}

func TestLiveLogStreamAndReload(t *testing.T) {
	up := newUpstream(t, "assets")
	g := startGatewayWithAdmin(t, liveLogGlobal, liveLogSite(up))
	ch, closeStream := readSSE(t, g.admin+"/mux-webhook/events/stream")
	defer closeStream()
	time.Sleep(100 * time.Millisecond) // let the stream subscribe

	do(t, signedRequest(t, g.url, testSecret, event("video.asset.ready", "s-1", ""), time.Now()))
	do(t, signedRequest(t, g.url, "forged", event("video.live_stream.active", "s-2", ""), time.Now()))
	for _, want := range []struct{ outcome, typ string }{{"verified", "video.asset.ready"}, {"mismatch", ""}} {
		ev, ok := nextSSE(t, ch)
		if !ok || ev.name != "request" {
			t.Fatalf("stream: %+v, %v", ev, ok)
		}
		var e LogEntry
		if err := json.Unmarshal([]byte(ev.data), &e); err != nil {
			t.Fatal(err)
		}
		if e.Outcome != want.outcome || e.Type != want.typ || e.Headers["Mux-Signature"][0] != "[redacted]" {
			t.Errorf("streamed %+v, want %s %q with a redacted signature", e, want.outcome, want.typ)
		}
	}

	// A filtered stream only gets what matches.
	fch, closeFiltered := readSSE(t, g.admin+"/mux-webhook/events/stream?outcome=verified&type=video.upload.*")
	defer closeFiltered()
	time.Sleep(100 * time.Millisecond)
	do(t, signedRequest(t, g.url, testSecret, event("video.asset.ready", "s-3", ""), time.Now()))
	do(t, signedRequest(t, g.url, testSecret, event("video.upload.created", "s-4", ""), time.Now()))
	if ev, _ := nextSSE(t, fch); !strings.Contains(ev.data, `"id":"s-4"`) {
		t.Errorf("filtered stream got %s", ev.data)
	}

	// A config reload ends the stream with a reload event; the entries
	// survive into the new config.
	cfg, _ := gatewayConfigWith(t, strings.TrimPrefix(g.admin, "http://"), liveLogGlobal, liveLogSite(up))
	if err := loadCaddyfile(cfg); err != nil {
		t.Fatal(err)
	}
	for {
		ev, ok := nextSSE(t, ch)
		if !ok {
			t.Fatal("stream ended without a reload event")
		}
		if ev.name == "reload" {
			break
		}
	}
	if _, ok := nextSSE(t, ch); ok {
		t.Fatal("stream goes on after the reload event")
	}
	var list []LogEntry
	getJSON(t, g.admin+"/mux-webhook/events?limit=1000", &list)
	found := false
	for _, e := range list {
		found = found || e.ID == "s-1"
	}
	if !found {
		t.Error("entries from before the reload are gone")
	}
}

// TestLiveLogStreamResumes: every streamed entry carries its sequence
// number as the SSE id; a client that reconnects with Last-Event-ID (or
// ?lastEventId=) first gets the entries after it that the ring still
// holds, then live ones, on the admin API and on mux_webhook_ui alike;
// an id older than the ring gets what is there and a "missed" event.
func TestLiveLogStreamResumes(t *testing.T) {
	g := startGatewayWithAdmin(t, "\tmux_webhook {\n\t\tlog_size 4\n\t}", fmt.Sprintf(`
	mux_webhook /mux %s
	handle /mux {
		respond 204
	}
	handle_path /mux-webhook/* {
		mux_webhook_ui
	}`, testSecret))
	send := func(id string) {
		t.Helper()
		if status, _, _ := do(t, signedRequest(t, g.url+"/mux", testSecret, event("video.asset.ready", id, ""), time.Now())); status != http.StatusNoContent {
			t.Fatalf("%s: %d", id, status)
		}
	}
	// next reads the stream's next request event: its id must be its seq.
	next := func(ch <-chan sseEvent) LogEntry {
		t.Helper()
		for {
			ev, ok := nextSSE(t, ch)
			if !ok {
				t.Fatal("the stream ended")
			}
			if ev.name != "request" {
				continue
			}
			var e LogEntry
			if err := json.Unmarshal([]byte(ev.data), &e); err != nil {
				t.Fatal(err)
			}
			if ev.id != strconv.FormatUint(e.Seq, 10) {
				t.Fatalf("event id %q for the entry with seq %d", ev.id, e.Seq)
			}
			return e
		}
	}
	// A first client sees r-1 and remembers its id, as EventSource does.
	ch, closeStream := readSSE(t, g.admin+"/mux-webhook/events/stream")
	time.Sleep(100 * time.Millisecond) // let the stream subscribe
	send("r-1")
	last := next(ch).Seq
	closeStream()
	send("r-2") // while it is away
	send("r-3")

	// Each client resumes after r-1: it gets all that came since.
	since := []string{"r-2", "r-3"}
	for _, c := range []struct{ name, url, header string }{
		{"admin API, Last-Event-ID", g.admin + "/mux-webhook/events/stream", strconv.FormatUint(last, 10)},
		{"mux_webhook_ui, ?lastEventId", g.url + "/mux-webhook/events/stream?lastEventId=" + strconv.FormatUint(last, 10), ""},
		{"the header wins over the query", g.url + "/mux-webhook/events/stream?lastEventId=1", strconv.FormatUint(last, 10)},
	} {
		req, _ := http.NewRequest(http.MethodGet, c.url, nil)
		if c.header != "" {
			req.Header.Set("Last-Event-ID", c.header)
		}
		resp, err := streamClient.Do(req)
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("%s: %v %v", c.name, err, resp)
		}
		ch := sseEvents(resp.Body)
		var got []string
		for range since {
			got = append(got, next(ch).ID)
		}
		since = append(since, "live-"+c.name)
		send("live-" + c.name)
		got = append(got, next(ch).ID)
		resp.Body.Close()
		if fmt.Sprint(got) != fmt.Sprint(since) {
			t.Errorf("%s: resumed with %q, want %q", c.name, got, since)
		}
	}

	// Older than the ring (log_size 4, 7 more entries since r-1): a
	// "missed" event for the 3 it dropped, then the 4 entries it holds.
	req, _ := http.NewRequest(http.MethodGet, g.admin+"/mux-webhook/events/stream", nil)
	req.Header.Set("Last-Event-ID", strconv.FormatUint(last, 10))
	send("r-4")
	send("r-5")
	resp, err := streamClient.Do(req)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("resuming from an old id: %v %v", err, resp)
	}
	defer resp.Body.Close()
	ch = sseEvents(resp.Body)
	if ev, _ := nextSSE(t, ch); ev.name != "missed" || ev.data != `{"missed":3}` || ev.id != "" {
		t.Errorf("resuming from an old id: first event %+v, want missed 3 with no id", ev)
	}
	var got []string
	for range 4 {
		got = append(got, next(ch).ID)
	}
	if want := append(since[len(since)-2:], "r-4", "r-5"); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("resuming from an old id: %q, want %q", got, want)
	}

	for _, bad := range []string{"abc", "-1"} {
		req, _ := http.NewRequest(http.MethodGet, g.admin+"/mux-webhook/events/stream", nil)
		req.Header.Set("Last-Event-ID", bad)
		if status, _, _ := do(t, req); status != http.StatusBadRequest {
			t.Errorf("Last-Event-ID %q: %d, want 400", bad, status)
		}
	}
}

// scrape returns the value of each caddy_mux_webhook sample on /metrics.
func scrape(t *testing.T, admin string) map[string]float64 {
	t.Helper()
	resp, err := http.Get(admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 64*1024), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "caddy_mux_webhook_") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("metric line %q: %v", line, err)
		}
		out[line[:i]] = v
	}
	return out
}

// TestLiveLogHeadersAfterHandleErrors: handle_errors runs after the live
// log entry of a rejected request is made, and request_header there edits
// the request's header values in place. The entry keeps what was sent, and
// a stream marshalling it meanwhile does not race (run with -race).
func TestLiveLogHeadersAfterHandleErrors(t *testing.T) {
	g := startGatewayWithAdmin(t, liveLogGlobal, fmt.Sprintf(`
	mux_webhook %s
	respond 204
	handle_errors {
		request_header X-Probe sent edited
		respond "rejected: {http.request.header.X-Probe}" {err.status_code}
	}`, testSecret))
	ch, closeStream := readSSE(t, g.admin+"/mux-webhook/events/stream")
	defer closeStream()
	time.Sleep(100 * time.Millisecond) // let the stream subscribe

	req := signedRequest(t, g.url, "forged", event("video.asset.ready", "he-1", ""), time.Now())
	req.Header.Set("X-Probe", "sent")
	if status, _, body := do(t, req); status != http.StatusUnauthorized || body != "rejected: edited" {
		t.Fatalf("forged request: %d %q; want handle_errors to have edited the header", status, body)
	}
	if ev, ok := nextSSE(t, ch); !ok || !strings.Contains(ev.data, `"X-Probe":["sent"]`) {
		t.Errorf("streamed entry: %s", ev.data)
	}
	var list []LogEntry
	getJSON(t, g.admin+"/mux-webhook/events?limit=1", &list)
	if len(list) != 1 || len(list[0].Headers["X-Probe"]) != 1 || list[0].Headers["X-Probe"][0] != "sent" {
		t.Errorf("live log entry's X-Probe: %+v, want what was sent", list)
	}
}
