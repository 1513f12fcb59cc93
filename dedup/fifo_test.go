package dedup

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestNonRegularSeedFiles: a FIFO (or a symlink to one, or a device node) in
// place of a seed file gives an error naming the file at once, for Verify and
// Import; before, opening the FIFO blocked forever.
func TestNonRegularSeedFiles(t *testing.T) {
	ims := testImages(5)
	dir := t.TempDir()
	if _, err := Export(context.Background(), []string{dir}, sources(ims), ExportOptions{Parity: 0.10, PackSize: 32 << 10}); err != nil {
		t.Fatal(err)
	}
	ix := loadIndex(t, dir)
	shard := filepath.Join(dir, ix.Groups[0].Shards[1].Name())
	within := func(t *testing.T, what string, d time.Duration, f func()) {
		t.Helper()
		done := make(chan struct{})
		go func() { defer close(done); f() }()
		select {
		case <-done:
		case <-time.After(d):
			t.Fatalf("%s: still running after %s (blocked on a non-regular seed file)", what, d)
		}
	}
	for _, c := range []struct {
		name string
		make func(p string) error
	}{
		{"fifo", func(p string) error { return syscall.Mkfifo(p, 0o600) }},
		{"symlink to a fifo", func(p string) error {
			f := filepath.Join(t.TempDir(), "fifo")
			if err := syscall.Mkfifo(f, 0o600); err != nil {
				return err
			}
			return os.Symlink(f, p)
		}},
		{"character device", func(p string) error { return syscall.Mknod(p, syscall.S_IFCHR|0o600, 1<<8|3) }}, // like /dev/null
	} {
		t.Run(c.name, func(t *testing.T) {
			saved, err := os.ReadFile(shard)
			if err != nil {
				t.Fatal(err)
			}
			os.Remove(shard)
			if err := c.make(shard); err != nil {
				t.Fatal(err)
			}
			defer func() {
				os.Remove(shard)
				os.WriteFile(shard, saved, 0o644)
			}()
			within(t, "verify", 20*time.Second, func() {
				rep, err := Verify(context.Background(), []string{dir}, nil)
				if err != nil {
					t.Error(err)
					return
				}
				if rep.OK() || rep.DamagedShards != 1 || !rep.Repairable {
					t.Errorf("verify: %+v", rep)
					return
				}
				p := rep.Groups[0].Damaged[0].Problem
				if !strings.Contains(p, shard) || !strings.Contains(p, "not a regular file") {
					t.Errorf("verify problem %q does not name the file and its kind", p)
				}
			})
			within(t, "import", 20*time.Second, func() {
				sinks, _, err := importAll(t, dir, nil, ImportOptions{})
				if err != nil {
					t.Error(err)
					return
				}
				checkEqual(t, ims, sinks) // repaired from parity
			})
		})
	}
	// Both index copies replaced: the error names them.
	for _, n := range indexNames {
		p := filepath.Join(dir, n)
		os.Remove(p)
		if err := syscall.Mkfifo(p, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	within(t, "verify without index", 20*time.Second, func() {
		_, err := Verify(context.Background(), []string{dir}, nil)
		if err == nil || !strings.Contains(err.Error(), "FIFO") || !strings.Contains(err.Error(), filepath.Join(dir, indexNames[0])) {
			t.Errorf("verify with FIFO index copies: %v", err)
		}
	})
	within(t, "import without index", 20*time.Second, func() {
		_, _, err := importAll(t, dir, nil, ImportOptions{})
		if err == nil || !strings.Contains(err.Error(), "FIFO") {
			t.Errorf("import with FIFO index copies: %v", err)
		}
	})
}
