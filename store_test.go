package muxwebhook

import (
	"bytes"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

func TestSanitizePathValue(t *testing.T) {
	tests := map[string]string{
		"video.asset.ready":      "video.asset.ready",
		"3a56ac3d-33da":          "3a56ac3d-33da",
		"../../etc/passwd":       "_.____etc_passwd",
		"..":                     "_.",
		"a..b":                   "a__b",
		".hidden":                "_hidden",
		"a/b\\c":                 "a_b_c",
		"line\nbreak\x00":        "line_break_",
		"":                       "_",
		"caf\xffe":               "caf_e",
		strings.Repeat("x", 500): strings.Repeat("x", maxPathValue),
	}
	for in, want := range tests {
		if got := sanitizePathValue(in); got != want {
			t.Errorf("sanitizePathValue(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestStoreResolveStaysUnderRoot(t *testing.T) {
	root := t.TempDir()
	s := &Store{Path: root + "/{http.mux.event.type}/{http.mux.event.id}.json"}
	var err error
	if s.root, err = storeRoot(s.Path, s.Path); err != nil || s.root != root {
		t.Fatalf("root %q, %v; want %q", s.root, err, root)
	}
	for _, id := range []string{"../../../etc/passwd", "..", "/abs", "a/../../b", "ok-id"} {
		repl := caddy.NewReplacer()
		ev := &Event{Type: "video.asset.ready", ID: id}
		repl.Map(ev.placeholder)
		path, err := s.resolve(repl)
		if err != nil {
			t.Errorf("id %q: %v", id, err)
			continue
		}
		if !strings.HasPrefix(path, root+"/video.asset.ready/") || strings.Count(path[len(root):], "/") != 2 {
			t.Errorf("id %q resolved to %q, outside %s/<type>/", id, path, root)
		}
	}
	// A template whose own literal part climbs out is refused.
	s2 := &Store{Path: root + "/x/{http.mux.event.id}/../../../outside.json", root: root + "/x"}
	repl := caddy.NewReplacer()
	repl.Map((&Event{ID: "e"}).placeholder)
	if _, err := s2.resolve(repl); err == nil {
		t.Error("a path escaping the root was accepted")
	}
}

func TestWriteOnce(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "sub", "evt.json")
	got, err := writeOnce(path, []byte("one"))
	if err != nil || got != path {
		t.Fatalf("first write: %q, %v", got, err)
	}
	// Same content: idempotent, no new file.
	if got, err := writeOnce(path, []byte("one")); err != nil || got != path {
		t.Fatalf("same content: %q, %v", got, err)
	}
	// Different content: a suffix, never an overwrite.
	got, err = writeOnce(path, []byte("two"))
	if err != nil || got != filepath.Join(dir, "sub", "evt-1.json") {
		t.Fatalf("different content: %q, %v", got, err)
	}
	if b, _ := os.ReadFile(path); string(b) != "one" {
		t.Fatalf("original overwritten: %q", b)
	}
	entries, _ := os.ReadDir(filepath.Join(dir, "sub"))
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), storeTempPrefix) {
			t.Errorf("temporary file left behind: %s", e.Name())
		}
	}
	// The parent is a regular file: the write fails (even as root).
	blocker := filepath.Join(dir, "blocker")
	if err := os.WriteFile(blocker, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := writeOnce(filepath.Join(blocker, "evt.json"), []byte("x")); err == nil {
		t.Fatal("write under a regular file succeeded")
	}
}

// storeSite proxies to up and, when it fails, stores the event in spool.
func storeSite(spool, up string) string {
	return fmt.Sprintf(`
	mux_webhook /mux %s
	handle /mux {
		reverse_proxy %s
	}
	handle /store-direct {
		mux_store %s/direct/{http.mux.event.id}.json
	}
	handle_errors 502 503 504 {
		mux_store %s/{http.mux.event.type}/{http.mux.event.id}.json
	}`, testSecret, up, spool, spool)
}

// TestStoreAndReplay: upstream down, the event is stored byte for byte and
// answered 202; upstream up, replay delivers it byte for byte with a fresh
// valid signature, and moves the file to delivered/.
func TestStoreAndReplay(t *testing.T) {
	spool := t.TempDir()
	upPort := freePort(t)
	g := startGateway(t, storeSite(spool, fmt.Sprintf("127.0.0.1:%d", upPort)))

	bodies := map[string][]byte{
		"st-2": []byte(`{"type":"video.asset.ready","id":"st-2","created_at":"2024-05-01T10:00:02Z","data":{"x":"é \u2028"}}`),
		"st-1": []byte(`{"type":"video.live_stream.active","id":"st-1","created_at":"2024-05-01T10:00:01Z","data":{}}`),
	}
	for _, id := range []string{"st-2", "st-1"} {
		status, _, _ := do(t, signedRequest(t, g.url+"/mux", testSecret, bodies[id], time.Now().Add(-time.Minute)))
		if status != http.StatusAccepted {
			t.Fatalf("%s with the upstream down: %d, want 202", id, status)
		}
	}
	stored := filepath.Join(spool, "video.asset.ready", "st-2.json")
	if b, err := os.ReadFile(stored); err != nil || !bytes.Equal(b, bodies["st-2"]) {
		t.Fatalf("stored file %q: %v", b, err)
	}
	// The same delivery again (Mux retrying) is idempotent.
	if status, _, _ := do(t, signedRequest(t, g.url+"/mux", testSecret, bodies["st-2"], time.Now())); status != http.StatusAccepted {
		t.Fatalf("repeat: %d", status)
	}
	files, _ := filepath.Glob(filepath.Join(spool, "*", "*.json"))
	if len(files) != 2 {
		t.Fatalf("spool holds %v, want 2 files", files)
	}

	// A dry run delivers nothing.
	out, err := runCommand(t, "", "replay", "--from", spool, "--to", g.url+"/mux", "--dry-run")
	if err != nil || !strings.Contains(out, "would deliver video.live_stream.active st-1") {
		t.Fatalf("dry run: %v\n%s", err, out)
	}

	// Replay while the upstream is still down: stops, non-zero, nothing moved.
	out, err = runCommand(t, "", "replay", "--from", spool, "--to", g.url+"/mux", "--secret", testSecret)
	if err == nil || !strings.Contains(err.Error(), "stopped at") {
		t.Fatalf("replay with upstream down: %v\n%s", err, out)
	}
	if _, err := os.Stat(stored); err != nil {
		t.Fatalf("a failed replay moved the file: %v", err)
	}
	if _, err := os.Stat(filepath.Join(spool, "delivered")); !os.IsNotExist(err) {
		t.Fatalf("a failed replay created delivered/: %v", err)
	}

	// The upstream comes up.
	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", upPort))
	if err != nil {
		t.Fatal(err)
	}
	var got []received
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body := new(bytes.Buffer)
		body.ReadFrom(r.Body)
		got = append(got, received{Method: r.Method, URI: r.RequestURI, Header: r.Header.Clone(), Body: body.Bytes()})
		w.WriteHeader(http.StatusOK)
	}))
	srv.Listener.Close()
	srv.Listener = ln
	srv.Start()
	t.Cleanup(srv.Close)

	out, err = runCommand(t, "", "replay", "--from", spool, "--to", g.url+"/mux", "--secret", testSecret)
	if err != nil {
		t.Fatalf("replay: %v\n%s", err, out)
	}
	if len(got) != 2 {
		t.Fatalf("upstream got %d events, want 2", len(got))
	}
	for i, id := range []string{"st-1", "st-2"} { // created_at order
		if !bytes.Equal(got[i].Body, bodies[id]) {
			t.Errorf("replayed %d: body %q, want %q", i, got[i].Body, bodies[id])
		}
		if _, err := Verify(got[i].Header.Get("Mux-Signature"), got[i].Body, [][]byte{[]byte(testSecret)}, time.Now(), time.Minute); err != nil {
			t.Errorf("replayed %s: signature %v", id, err)
		}
	}
	if _, err := os.Stat(stored); !os.IsNotExist(err) {
		t.Errorf("delivered file still in the spool: %v", err)
	}
	if b, err := os.ReadFile(filepath.Join(spool, "delivered", "video.asset.ready", "st-2.json")); err != nil || !bytes.Equal(b, bodies["st-2"]) {
		t.Errorf("delivered/ copy: %q, %v", b, err)
	}
	// Running it again finds nothing left.
	if out, err := runCommand(t, "", "replay", "--from", spool, "--to", g.url+"/mux", "--secret", testSecret); err != nil || !strings.Contains(out, "nothing to replay") {
		t.Errorf("second replay: %v\n%s", err, out)
	}
}

func TestStoreRefusesAndFails(t *testing.T) {
	spool := t.TempDir()
	blocker := filepath.Join(spool, "blocked")
	if err := os.WriteFile(blocker, []byte("not a directory"), 0o600); err != nil {
		t.Fatal(err)
	}
	g := startGateway(t, fmt.Sprintf(`
	mux_webhook /mux %s
	handle /mux {
		mux_store %s/blocked/{http.mux.event.id}.json
	}
	handle /unverified {
		mux_store %s/{http.request.header.X-Id}.json
	}`, testSecret, spool, spool))

	// A write failure answers 503, so that Mux retries.
	if status, _, _ := do(t, signedRequest(t, g.url+"/mux", testSecret, event("video.asset.ready", "w-1", ""), time.Now())); status != http.StatusServiceUnavailable {
		t.Errorf("write failure: %d, want 503", status)
	}
	// Without a verified event: 500, and nothing written.
	req, _ := http.NewRequest(http.MethodPost, g.url+"/unverified", strings.NewReader(`{"type":"x"}`))
	req.Header.Set("X-Id", "sneaky")
	if status, _, _ := do(t, req); status != http.StatusInternalServerError {
		t.Errorf("unverified: %d, want 500", status)
	}
	if entries, _ := os.ReadDir(spool); len(entries) != 1 {
		t.Errorf("spool holds %d entries, want only the blocker", len(entries))
	}
}

// TestStoreConfigPlaceholders: {env.*} and {file.*} in the path are
// configuration, resolved when the config loads, not request data to
// sanitise: the files land in the directory they name, not under the
// working directory.
func TestStoreConfigPlaceholders(t *testing.T) {
	spool := t.TempDir()
	t.Setenv("MUX_TEST_SPOOL", spool)
	dirFile := filepath.Join(t.TempDir(), "spool-dir")
	if err := os.WriteFile(dirFile, []byte(spool+"/from-file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cwd := t.TempDir()
	t.Chdir(cwd) // where the old code wrote
	g := startGateway(t, fmt.Sprintf(`
	mux_webhook %s
	handle /env {
		mux_store {env.MUX_TEST_SPOOL}/{http.mux.event.id}.json
	}
	handle /file {
		mux_store {file.%s}/{http.mux.event.type}/{http.mux.event.id}.json
	}`, testSecret, dirFile))

	cases := []struct{ path, id, want string }{
		{"/env", "cfg-1", filepath.Join(spool, "cfg-1.json")},
		{"/file", "cfg-2", filepath.Join(spool, "from-file", "video.asset.ready", "cfg-2.json")},
	}
	for _, c := range cases {
		body := event("video.asset.ready", c.id, "")
		if status, _, _ := do(t, signedRequest(t, g.url+c.path, testSecret, body, time.Now())); status != http.StatusAccepted {
			t.Errorf("%s: %d, want 202", c.path, status)
		}
		if b, err := os.ReadFile(c.want); err != nil || !bytes.Equal(b, body) {
			t.Errorf("%s: not stored at %s: %v", c.path, c.want, err)
		}
	}
	if entries, _ := os.ReadDir(cwd); len(entries) != 0 {
		t.Errorf("files written under the working directory: %v", entries)
	}
}

// TestStoreConfigErrors: a path that would not land in an absolute
// directory, or whose config placeholder is empty, is a load error that
// says what to write instead.
func TestStoreConfigErrors(t *testing.T) {
	t.Setenv("MUX_TEST_UNSET", "")
	t.Setenv("MUX_TEST_REL", "relative/spool")
	t.Setenv("MUX_TEST_BRACE", "/spool/{http.request.uri}")
	tests := []struct{ path, want string }{
		{"spool/{http.mux.event.id}.json", "does not start with an absolute directory"},
		{"{http.mux.event.id}.json", "write the full path, e.g. /var/spool/mux/"},
		{"{env.MUX_TEST_UNSET}/{http.mux.event.id}.json", "{env.MUX_TEST_UNSET} is unset or empty"},
		{"{env.MUX_TEST_REL}/{http.mux.event.id}.json", `it resolves to "relative/spool/{http.mux.event.id}.json"`},
		{"{env.MUX_TEST_BRACE}/{http.mux.event.id}.json", "{env.MUX_TEST_BRACE} contains a brace"},
		{"{file./nonexistent/mux-spool-dir}/{http.mux.event.id}.json", "{file./nonexistent/mux-spool-dir} is empty or cannot be read"},
	}
	for _, tt := range tests {
		cfg, _ := gatewayConfig(t, fmt.Sprintf("mux_webhook %s\n\tmux_store %s", testSecret, tt.path))
		err := loadCaddyfile(cfg)
		if err == nil {
			stopCaddy()
			t.Errorf("%s: loaded, want an error containing %q", tt.path, tt.want)
			continue
		}
		if !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: %v\nwant it to contain %q", tt.path, err, tt.want)
		}
	}
}

// TestStoreSyncsNewDirectories: every directory mux_store creates has its
// parent fsynced, up to the first one that existed, and the file's own
// directory after the link.
func TestStoreSyncsNewDirectories(t *testing.T) {
	root := t.TempDir()
	var synced []string
	orig := syncDirFunc
	syncDirFunc = func(dir string) error {
		synced = append(synced, dir)
		return orig(dir)
	}
	t.Cleanup(func() { syncDirFunc = orig })

	deep := filepath.Join(root, "a", "b", "c")
	if _, err := writeOnce(filepath.Join(deep, "evt.json"), []byte("x")); err != nil {
		t.Fatal(err)
	}
	want := []string{root, filepath.Join(root, "a"), filepath.Join(root, "a", "b"), deep}
	if fmt.Sprint(synced) != fmt.Sprint(want) {
		t.Errorf("fsynced %v\nwant %v", synced, want)
	}
	synced = nil
	if _, err := writeOnce(filepath.Join(deep, "evt2.json"), []byte("y")); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(synced) != fmt.Sprint([]string{deep}) {
		t.Errorf("existing directories: fsynced %v, want only %s", synced, deep)
	}
}
