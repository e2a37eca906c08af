package muxwebhook

// caddy mux-webhook replay (command_replay.go): each file's proof checked again,
// secrets rotated, files read again before sending, only metadata kept.

import (
	"bytes"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// storeGenuine stores body as mux_store does, with a proof signed by
// secret two days ago (replay ignores the time window).
func storeGenuine(t *testing.T, path, secret string, body []byte) {
	t.Helper()
	if _, err := writeOnce(path, body, Sign([]byte(secret), body, time.Now().Add(-48*time.Hour))); err != nil {
		t.Fatal(err)
	}
}

// TestReplaySecretRotation: the first --secret signs; every --secret is
// accepted for the stored proofs.
func TestReplaySecretRotation(t *testing.T) {
	t.Setenv(SecretEnv, "")
	spool := t.TempDir()
	body := event("video.asset.ready", "rot-1", "")
	storeGenuine(t, filepath.Join(spool, "rot-1.json"), "old-secret", body)
	up := newUpstream(t, "app")

	out, err := runCommand(t, "", "replay", "--from", spool, "--to", up.URL, "--secret", "new-secret")
	if err == nil || !strings.Contains(out, "refused rot-1.json: the signature kept beside it does not match") || len(up.requests()) != 0 {
		t.Fatalf("only the new secret: err %v, %d delivered\n%s", err, len(up.requests()), out)
	}
	out, err = runCommand(t, "", "replay", "--from", spool, "--to", up.URL, "--secret", "new-secret", "--secret", "old-secret")
	if err != nil {
		t.Fatalf("both secrets: %v\n%s", err, out)
	}
	got := up.requests()
	if len(got) != 1 || !bytes.Equal(got[0].Body, body) {
		t.Fatalf("upstream got %d requests", len(got))
	}
	if _, err := Verify(got[0].Header.Get(SignatureHeader), got[0].Body, [][]byte{[]byte("new-secret")}, time.Now(), time.Minute); err != nil {
		t.Errorf("not signed with the first secret: %v", err)
	}
	if _, err := runCommand(t, "", "replay", "--from", spool, "--to", up.URL, "--secret", ""); err == nil {
		t.Error("an empty --secret was accepted")
	}
}

// TestReplayRereadsBeforeSending: replay checks and sends the bytes it
// reads just before sending, not what it saw when it listed the spool: a
// file edited meanwhile is refused.
func TestReplayRereadsBeforeSending(t *testing.T) {
	t.Setenv(SecretEnv, testSecret)
	spool := t.TempDir()
	first, second := filepath.Join(spool, "a.json"), filepath.Join(spool, "b.json")
	firstBody := []byte(`{"type":"video.asset.ready","id":"a","created_at":"2024-05-01T10:00:00Z"}`)
	secondBody := []byte(`{"type":"video.asset.ready","id":"b","created_at":"2024-05-01T10:00:01Z"}`)
	storeGenuine(t, first, testSecret, firstBody)
	storeGenuine(t, second, testSecret, secondBody)

	var mu sync.Mutex
	var got [][]byte
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b := new(bytes.Buffer)
		b.ReadFrom(r.Body)
		mu.Lock()
		got = append(got, b.Bytes())
		n := len(got)
		mu.Unlock()
		if n == 1 { // edit the second file while the first is delivered
			os.WriteFile(second, bytes.Replace(secondBody, []byte(`"id":"b"`), []byte(`"id":"B"`), 1), 0o640)
		}
	}))
	t.Cleanup(srv.Close)

	out, err := runCommand(t, "", "replay", "--from", spool, "--to", srv.URL)
	if err == nil || !strings.Contains(out, "refused b.json") {
		t.Fatalf("err %v, want b.json refused\n%s", err, out)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(got) != 1 || !bytes.Equal(got[0], firstBody) {
		t.Fatalf("upstream got %q, want only a.json", got)
	}
}

// TestReplayKeepsOnlyMetadata: listing a spool keeps a few strings per
// file, not the bodies.
func TestReplayKeepsOnlyMetadata(t *testing.T) {
	spool := t.TempDir()
	const files, size = 16, 1 << 20
	for i := range files {
		id := fmt.Sprintf("big-%02d", i)
		body := fmt.Appendf(nil, `{"type":"video.asset.ready","id":%q,"created_at":"2024-05-01T10:00:%02dZ","data":{"pad":"%s"}}`, id, i, strings.Repeat("x", size))
		if err := os.WriteFile(filepath.Join(spool, id+".json"), body, 0o640); err != nil {
			t.Fatal(err)
		}
		sig := Sign([]byte("meta-secret"), body, time.Now())
		if err := os.WriteFile(filepath.Join(spool, id+".json"+sigSuffix), []byte(sig), 0o640); err != nil {
			t.Fatal(err)
		}
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	events, refused, err := readSpool(spool, "", NewVerifier([][]byte{[]byte("meta-secret")}))
	runtime.GC()
	runtime.ReadMemStats(&after)
	if err != nil || len(events) != files || len(refused) != 0 {
		t.Fatalf("%d events, %v refused, %v", len(events), refused, err)
	}
	if events[0].id != "big-00" || events[files-1].typ != "video.asset.ready" {
		t.Errorf("metadata: %+v", events[0])
	}
	kept := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	if kept > size { // the bodies are 16 MiB together
		t.Errorf("listing %d files of %d MiB keeps %d bytes", files, size>>20, kept)
	}
	runtime.KeepAlive(events)
}
