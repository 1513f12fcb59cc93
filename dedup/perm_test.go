package dedup

import (
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/standin/standin/internal/testutil"
)

// openPath makes dir and its parents up to the temp root traversable by
// everyone, so that only the modes of the files under test decide.
func openPath(t *testing.T, dir string) {
	t.Helper()
	for d := dir; d != "/" && d != os.TempDir(); d = filepath.Dir(d) {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
}

// A seed is readable by its owner only unless Mode says otherwise: an
// unprivileged user rebuilds nothing from it.
func TestSeedOwnerOnly(t *testing.T) {
	testutil.NeedRoot(t)
	base := t.TempDir()
	openPath(t, base)
	dir := filepath.Join(base, "seed")
	ims := testImages(1)
	if _, err := Export(context.Background(), []string{dir}, sources(ims), ExportOptions{Parity: 0.1, PackSize: 64 << 10}); err != nil {
		t.Fatal(err)
	}
	var files []string
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			t.Fatal(err)
		}
		st, _ := os.Lstat(p)
		want := fs.FileMode(0o600)
		if d.IsDir() {
			want = 0o700
		} else {
			files = append(files, p)
		}
		if st.Mode().Perm() != want {
			t.Errorf("%s: mode %04o, want %04o", p, st.Mode().Perm(), want)
		}
		return nil
	})
	if len(files) < 3 {
		t.Fatalf("only %d seed files", len(files))
	}
	for _, p := range []string{dir, filepath.Join(dir, "index.0"), files[len(files)-1]} {
		if out := testutil.ReadAs(t, testutil.Nobody, testutil.Nobody, p); !strings.Contains(out, "Permission denied") {
			t.Errorf("nobody reading %s: %q, want permission denied", p, out)
		}
	}

	// --mode 0640: the group (here: root's) reads, others still do not.
	dir2 := filepath.Join(base, "seed2")
	if _, err := Export(context.Background(), []string{dir2}, sources(ims), ExportOptions{PackSize: 64 << 10, Mode: 0o640}); err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(dir2); st.Mode().Perm() != 0o750 {
		t.Errorf("%s: mode %04o, want 0750", dir2, st.Mode().Perm())
	}
	idx := filepath.Join(dir2, "index.0")
	if out := testutil.ReadAs(t, testutil.Nobody, 0, idx); out != "" {
		t.Errorf("group member reading %s (mode 0640): %q", idx, out)
	}
	if out := testutil.ReadAs(t, testutil.Nobody, testutil.Nobody, idx); !strings.Contains(out, "Permission denied") {
		t.Errorf("nobody reading %s: %q, want permission denied", idx, out)
	}
}

// A symlink planted where the export creates a directory is refused, never
// written through.
func TestSeedSymlinkNotFollowed(t *testing.T) {
	base := t.TempDir()
	victim := filepath.Join(base, "victim")
	if err := os.Mkdir(victim, 0o700); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(base, "seed")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(victim, filepath.Join(dir, "packs")); err != nil {
		t.Fatal(err)
	}
	_, err := Export(context.Background(), []string{dir}, sources(testImages(1)), ExportOptions{PackSize: 64 << 10})
	if err == nil || !strings.Contains(err.Error(), "symbolic link") {
		t.Errorf("export through a planted symlink: %v, want a refusal", err)
	}
	if ents, _ := os.ReadDir(victim); len(ents) > 0 {
		t.Fatalf("the export wrote %d file(s) through the symlink into %s", len(ents), victim)
	}
}
