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
	"sync"
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
	s := &FileStore{Path: root + "/{http.mux.event.type}/{http.mux.event.id}.json"}
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
	s2 := &FileStore{Path: root + "/x/{http.mux.event.id}/../../../outside.json", root: root + "/x"}
	repl := caddy.NewReplacer()
	repl.Map((&Event{ID: "e"}).placeholder)
	if _, err := s2.resolve(repl); err == nil {
		t.Error("a path escaping the root was accepted")
	}
}

func TestWriteOnce(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "sub", "evt.json")
	got, err := writeOnce(path, []byte("one"), "t=1,v1=aa")
	if err != nil || got != path {
		t.Fatalf("first write: %q, %v", got, err)
	}
	if b, err := os.ReadFile(path + ".sig"); err != nil || string(b) != "t=1,v1=aa" {
		t.Fatalf("sidecar: %q, %v", b, err)
	}
	// Same content: idempotent, no new file, the first proof is kept.
	if got, err := writeOnce(path, []byte("one"), "t=2,v1=bb"); err != nil || got != path {
		t.Fatalf("same content: %q, %v", got, err)
	}
	if b, _ := os.ReadFile(path + ".sig"); string(b) != "t=1,v1=aa" {
		t.Fatalf("sidecar replaced on the same-content path: %q", b)
	}
	// Same content, sidecar missing (stored by an older version, or lost
	// to a failure after the link): it is written.
	if err := os.Remove(path + ".sig"); err != nil {
		t.Fatal(err)
	}
	if got, err := writeOnce(path, []byte("one"), "t=3,v1=cc"); err != nil || got != path {
		t.Fatalf("same content without sidecar: %q, %v", got, err)
	}
	if b, _ := os.ReadFile(path + ".sig"); string(b) != "t=3,v1=cc" {
		t.Fatalf("missing sidecar not written: %q", b)
	}
	// Different content: a suffix, never an overwrite.
	got, err = writeOnce(path, []byte("two"), "t=4,v1=dd")
	if err != nil || got != filepath.Join(dir, "sub", "evt-1.json") {
		t.Fatalf("different content: %q, %v", got, err)
	}
	if b, _ := os.ReadFile(got + ".sig"); string(b) != "t=4,v1=dd" {
		t.Fatalf("sidecar of the suffixed file: %q", b)
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
	if _, err := writeOnce(filepath.Join(blocker, "evt.json"), []byte("x"), "t=1,v1=aa"); err == nil {
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

// TestStoreAndReplay: upstream down, the event is stored byte for byte
// with the signature that verified it beside it, and answered 202;
// upstream up, replay delivers it byte for byte with a fresh valid
// signature, and moves it to delivered/. A file planted in the spool, one
// with a forged proof, and a stored event edited on disk are refused,
// named, never delivered, and make the exit non-zero.
func TestStoreAndReplay(t *testing.T) {
	spool := t.TempDir()
	upPort := freePort(t)
	g := startGateway(t, storeSite(spool, fmt.Sprintf("127.0.0.1:%d", upPort)))

	bodies := map[string][]byte{
		"st-2": []byte(`{"type":"video.asset.ready","id":"st-2","created_at":"2024-05-01T10:00:02Z","data":{"x":"é \u2028"}}`),
		"st-1": []byte(`{"type":"video.live_stream.active","id":"st-1","created_at":"2024-05-01T10:00:01Z","data":{}}`),
		"st-3": []byte(`{"type":"video.asset.ready","id":"st-3","created_at":"2024-05-01T10:00:00Z","data":{"amount":1}}`),
	}
	headers := map[string]string{}
	for _, id := range []string{"st-2", "st-1", "st-3"} {
		req := signedRequest(t, g.url+"/mux", testSecret, bodies[id], time.Now().Add(-time.Minute))
		headers[id] = req.Header.Get("Mux-Signature")
		status, _, _ := do(t, req)
		if status != http.StatusAccepted {
			t.Fatalf("%s with the upstream down: %d, want 202", id, status)
		}
	}
	stored := filepath.Join(spool, "video.asset.ready", "st-2.json")
	if b, err := os.ReadFile(stored); err != nil || !bytes.Equal(b, bodies["st-2"]) {
		t.Fatalf("stored file %q: %v", b, err)
	}
	if b, err := os.ReadFile(stored + ".sig"); err != nil || string(b) != headers["st-2"] {
		t.Fatalf("stored proof %q, %v; want the verified header %q", b, err, headers["st-2"])
	}
	// The same delivery again (Mux retrying) is idempotent.
	if status, _, _ := do(t, signedRequest(t, g.url+"/mux", testSecret, bodies["st-2"], time.Now())); status != http.StatusAccepted {
		t.Fatalf("repeat: %d", status)
	}
	files, _ := filepath.Glob(filepath.Join(spool, "*", "*.json"))
	if len(files) != 3 {
		t.Fatalf("spool holds %v, want 3 files", files)
	}

	// st-3 is edited on disk after it was stored (its proof stays).
	edited := filepath.Join(spool, "video.asset.ready", "st-3.json")
	if err := os.WriteFile(edited, bytes.Replace(bodies["st-3"], []byte(`"amount":1`), []byte(`"amount":9`), 1), 0o640); err != nil {
		t.Fatal(err)
	}
	// Files dropped into the spool: a JSON event without a proof (even
	// named .txt), one with a proof signed under another secret, and
	// something that is not an event at all.
	planted := filepath.Join(spool, "planted.txt")
	plantedBody := event("video.asset.ready", "planted-1", "")
	forged := filepath.Join(spool, "video.asset.ready", "forged.json")
	forgedBody := event("video.asset.ready", "forged-1", "")
	for path, data := range map[string]string{
		planted:                            string(plantedBody),
		forged:                             string(forgedBody),
		forged + ".sig":                    Sign([]byte("not-the-secret"), forgedBody, time.Now()),
		filepath.Join(spool, "notes.md"):   "# not an event\n",
		filepath.Join(spool, "orphan.sig"): "t=1,v1=00",
	} {
		if err := os.WriteFile(path, []byte(data), 0o640); err != nil {
			t.Fatal(err)
		}
	}
	refusedFiles := []string{"planted.txt", "video.asset.ready/forged.json", "video.asset.ready/st-3.json", "notes.md"}

	// A dry run delivers nothing; without a secret it checks no proof,
	// and so parses nothing: it lists the files.
	t.Setenv(SecretEnv, "")
	out, err := runCommand(t, "", "replay", "--from", spool, "--to", g.url+"/mux", "--dry-run")
	if !strings.Contains(out, "st-1.json (signature not checked") || strings.Contains(out, "video.live_stream.active st-1") {
		t.Fatalf("dry run: %v\n%s", err, out)
	}
	// With a secret, it says what it would refuse.
	out, err = runCommand(t, "", "replay", "--from", spool, "--to", g.url+"/mux", "--dry-run", "--secret", testSecret)
	if err == nil || !strings.Contains(out, "would refuse planted.txt") || strings.Contains(out, "would deliver video.asset.ready planted-1") {
		t.Fatalf("dry run with a secret: %v\n%s", err, out)
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
	var mu sync.Mutex
	var got []received
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body := new(bytes.Buffer)
		body.ReadFrom(r.Body)
		mu.Lock()
		got = append(got, received{Method: r.Method, URI: r.RequestURI, Header: r.Header.Clone(), Body: body.Bytes()})
		mu.Unlock()
		w.WriteHeader(http.StatusOK)
	}))
	srv.Listener.Close()
	srv.Listener = ln
	srv.Start()
	t.Cleanup(srv.Close)

	out, err = runCommand(t, "", "replay", "--from", spool, "--to", g.url+"/mux", "--secret", testSecret)
	if err == nil || !strings.Contains(err.Error(), "refused 4 file(s)") {
		t.Fatalf("replay with refused files: err %v, want non-zero naming 4 refused\n%s", err, out)
	}
	for _, rel := range refusedFiles {
		if !strings.Contains(out, "refused "+rel+": ") {
			t.Errorf("replay did not name the refused %s:\n%s", rel, out)
		}
		if _, err := os.Stat(filepath.Join(spool, rel)); err != nil {
			t.Errorf("refused %s left the spool: %v", rel, err)
		}
	}
	mu.Lock()
	delivered := append([]received(nil), got...)
	mu.Unlock()
	if len(delivered) != 2 {
		t.Fatalf("upstream got %d events, want the 2 genuine ones:\n%s", len(delivered), out)
	}
	for i, id := range []string{"st-1", "st-2"} { // created_at order
		if !bytes.Equal(delivered[i].Body, bodies[id]) {
			t.Errorf("replayed %d: body %q, want %q", i, delivered[i].Body, bodies[id])
		}
		if _, err := Verify(delivered[i].Header.Get("Mux-Signature"), delivered[i].Body, [][]byte{[]byte(testSecret)}, time.Now(), time.Minute); err != nil {
			t.Errorf("replayed %s: signature %v", id, err)
		}
	}
	if _, err := os.Stat(stored); !os.IsNotExist(err) {
		t.Errorf("delivered file still in the spool: %v", err)
	}
	moved := filepath.Join(spool, "delivered", "video.asset.ready", "st-2.json")
	if b, err := os.ReadFile(moved); err != nil || !bytes.Equal(b, bodies["st-2"]) {
		t.Errorf("delivered/ copy: %q, %v", b, err)
	}
	if _, err := os.Stat(moved + ".sig"); err != nil {
		t.Errorf("the proof did not move with the delivered file: %v", err)
	}
	// Running it again refuses the same files, and delivers nothing more.
	if out, err := runCommand(t, "", "replay", "--from", spool, "--to", g.url+"/mux", "--secret", testSecret); err == nil || !strings.Contains(out, "refused planted.txt") {
		t.Errorf("second replay: %v\n%s", err, out)
	}
	// Once the operator removed them, nothing is left.
	for _, rel := range refusedFiles {
		os.Remove(filepath.Join(spool, rel))
		os.Remove(filepath.Join(spool, rel) + ".sig")
	}
	if out, err := runCommand(t, "", "replay", "--from", spool, "--to", g.url+"/mux", "--secret", testSecret); err != nil || !strings.Contains(out, "nothing to replay") {
		t.Errorf("replay of an empty spool: %v\n%s", err, out)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(got) != 2 {
		t.Errorf("upstream got %d events in all, want 2", len(got))
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
		{"/var/spool/mux/{http.mux.event.id}.sig", "end it in .json"},
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
	if _, err := writeOnce(filepath.Join(deep, "evt.json"), []byte("x"), "t=1,v1=aa"); err != nil {
		t.Fatal(err)
	}
	want := []string{root, filepath.Join(root, "a"), filepath.Join(root, "a", "b"), deep}
	if fmt.Sprint(synced) != fmt.Sprint(want) {
		t.Errorf("fsynced %v\nwant %v", synced, want)
	}
	synced = nil
	if _, err := writeOnce(filepath.Join(deep, "evt2.json"), []byte("y"), "t=1,v1=aa"); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(synced) != fmt.Sprint([]string{deep}) {
		t.Errorf("existing directories: fsynced %v, want only %s", synced, deep)
	}
}
