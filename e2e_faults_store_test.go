//go:build e2e

package muxwebhook

// Fault tests of mux_store against the real xcaddy-built binary: the row
// "the disk fills or the directory vanishes under mux_store" of the
// README's "When things fail" table.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-mux-webhook/caddy-mux-webhook/internal/testwait"
)

// nobodyID is the uid and gid of the user nobody, which the binary runs as
// when the tests run as root: root ignores permission bits, so a read-only
// directory would not be read-only to it.
const nobodyID = 65534

// TestFaultStoreDiskFails: a spool directory that is read-only, or that
// vanishes (replaced by a regular file) under mux_store: 503 so that Mux
// retries, no partial file under the final name, no 202 for anything not
// on disk, and an ERROR log line for the operator. A directory removed
// while Caddy runs is created again, and the event stored.
func TestFaultStoreDiskFails(t *testing.T) {
	t.Parallel() // its own processes and ports
	bin := caddyBinary(t)
	asNobody := os.Geteuid() == 0
	base := faultDir(t, asNobody)
	spool := filepath.Join(base, "spool")
	readOnly := filepath.Join(spool, "ro")
	vanishing := filepath.Join(spool, "gone")
	for _, dir := range []string{spool, readOnly, vanishing} {
		mkdirFor(t, dir, asNobody)
	}
	if err := os.Chmod(readOnly, 0o555); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Chmod(readOnly, 0o755) })

	port := freePort(t)
	cfg := fmt.Sprintf(`%s

http://127.0.0.1:%d {
	mux_webhook %s
	handle /ro {
		mux_store %s/{http.mux.event.id}.json
	}
	handle /gone {
		mux_store %s/{http.mux.event.type}/{http.mux.event.id}.json
	}
}
`, testGlobals{storage: filepath.Join(base, "home", "storage"), logLevel: "INFO"}, port, testSecret, readOnly, vanishing)
	out := runCaddyBinaryAs(t, bin, cfg, base, asNobody)
	url := fmt.Sprintf("http://127.0.0.1:%d", port)
	waitForHTTP(t, url, out)

	post := func(path, id string) (int, []byte) {
		t.Helper()
		body := event("video.asset.ready", id, "")
		status, _, _ := do(t, signedRequest(t, url+path, testSecret, body, time.Now()))
		return status, body
	}
	// stored checks a 202: the file and its proof are on disk.
	stored := func(file string, body []byte) {
		t.Helper()
		if b, err := os.ReadFile(file); err != nil || !bytes.Equal(b, body) {
			t.Errorf("answered 202, but %s holds %q, %v", file, b, err)
		}
		if _, err := os.Stat(file + sigSuffix); err != nil {
			t.Errorf("answered 202, but the proof is missing: %v", err)
		}
	}
	// refused checks a 503: nothing under the final name, no temporary
	// file left behind, and an ERROR line naming the event.
	refused := func(id string) {
		t.Helper()
		filepath.WalkDir(base, func(path string, d fs.DirEntry, err error) error {
			if err == nil && (strings.Contains(d.Name(), id) || strings.HasPrefix(d.Name(), storeTempPrefix)) {
				t.Errorf("after a 503: %s is on disk", path)
			}
			return nil
		})
		testwait.For(t, func() bool { return hasStoreError(out.String(), id) }, func() string {
			return "no ERROR log line from mux_store for " + id + ":\n" + out.String()
		})
	}

	// The setup works: the Caddy process can write where it should.
	status, body := post("/gone", "ok-1")
	if status != http.StatusAccepted {
		t.Fatalf("writable spool: %d, want 202\n%s", status, out.String())
	}
	stored(filepath.Join(vanishing, "video.asset.ready", "ok-1.json"), body)

	// A read-only directory.
	if status, _ := post("/ro", "ro-1"); status != http.StatusServiceUnavailable {
		t.Errorf("read-only directory: %d, want 503", status)
	}
	refused("ro-1")
	if entries, _ := os.ReadDir(readOnly); len(entries) != 0 {
		t.Errorf("read-only directory holds %v", entries)
	}

	// The event type's directory is removed: it is created again.
	if err := os.RemoveAll(filepath.Join(vanishing, "video.asset.ready")); err != nil {
		t.Fatal(err)
	}
	status, body = post("/gone", "again-1")
	if status != http.StatusAccepted {
		t.Errorf("removed directory: %d, want 202 (created again)", status)
	} else {
		stored(filepath.Join(vanishing, "video.asset.ready", "again-1.json"), body)
	}

	// The directory vanishes: a regular file takes its place.
	if err := os.RemoveAll(vanishing); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(vanishing, []byte("not a directory"), 0o644); err != nil {
		t.Fatal(err)
	}
	if status, _ := post("/gone", "gone-1"); status != http.StatusServiceUnavailable {
		t.Errorf("vanished directory: %d, want 503", status)
	}
	refused("gone-1")
	if b, err := os.ReadFile(vanishing); err != nil || string(b) != "not a directory" {
		t.Errorf("the file in the directory's place changed: %q, %v", b, err)
	}
}

// hasStoreError reports whether the JSON log holds an ERROR line of
// mux_store about the event id.
func hasStoreError(log, id string) bool {
	for line := range strings.Lines(log) {
		var entry struct {
			Level, Logger, ID string
		}
		if json.Unmarshal([]byte(line), &entry) == nil &&
			entry.Level == "error" && entry.Logger == "http.handlers.mux_store" && entry.ID == id {
			return true
		}
	}
	return false
}

// faultDir returns a new directory, removed when the test ends, that the
// binary's user can traverse (t.TempDir's parent is private to us).
func faultDir(t *testing.T, asNobody bool) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "mux-fault-store-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	mkdirFor(t, filepath.Join(dir, "home"), asNobody)
	return dir
}

// mkdirFor creates dir, owned by nobody when the binary runs as nobody.
func mkdirFor(t *testing.T, dir string, asNobody bool) {
	t.Helper()
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if asNobody {
		if err := os.Chown(dir, nobodyID, nobodyID); err != nil {
			t.Fatal(err)
		}
	}
}

// runCaddyBinaryAs is runCaddyBinary in dir (from faultDir), as the user
// nobody when asNobody is set: the binary is copied into dir so that
// nobody can run it, and HOME is dir/home.
func runCaddyBinaryAs(t *testing.T, bin, cfg, dir string, asNobody bool) *syncBuffer {
	t.Helper()
	var cred *syscall.Credential
	if asNobody {
		bin = copyExecutable(t, bin, filepath.Join(dir, "caddy"))
		cred = &syscall.Credential{Uid: nobodyID, Gid: nobodyID}
	}
	out, _ := runCaddyIn(t, bin, cfg, dir, filepath.Join(dir, "home"), cred)
	return out
}

// copyExecutable copies the file src to dst, mode 0755.
func copyExecutable(t *testing.T, src, dst string) string {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
	return dst
}
