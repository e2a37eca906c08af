// Package testfs gives tests a full disk: a small filesystem of their own,
// and a file that fills it. Shared by the plugin's tests and the queue's.
package testfs

import (
	"os"
	"os/exec"
	"testing"
)

// Small mounts a tmpfs of size (as mount's size= option: "24m") under a
// temporary directory, unmounted when the test ends (after everything the
// test started afterwards has stopped); it skips, saying why, where it
// cannot (not root, no mount).
func Small(t testing.TB, size string) string {
	t.Helper()
	dir := t.TempDir()
	if os.Geteuid() != 0 {
		t.Skip("a full disk needs a small filesystem of its own: mounting a tmpfs needs root")
	}
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size, "tmpfs", dir).CombinedOutput(); err != nil {
		t.Skipf("a full disk needs a small filesystem of its own: mount -t tmpfs failed: %v: %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", "-l", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
		}
	})
	return dir
}

// Fill writes path until its filesystem is full; it fails the test if
// 256 MiB did not fill it (not the small filesystem it was meant for).
func Fill(t testing.TB, path string) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	chunk := make([]byte, 1<<20)
	for range 256 {
		if _, err := f.Write(chunk); err != nil {
			return
		}
	}
	t.Fatalf("%s: 256 MiB written and the filesystem is not full", path)
}
