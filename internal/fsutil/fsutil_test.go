package fsutil

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// A symlink planted at the target is replaced, never written through; with
// NoReplace it (and any existing file) is refused and left alone.
func TestWriteAtomicNeverFollowsSymlinks(t *testing.T) {
	dir := t.TempDir()
	victim := filepath.Join(dir, "victim")
	if err := os.WriteFile(victim, []byte("precious"), 0o600); err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(dir, "out")
	if err := os.Symlink(victim, target); err != nil {
		t.Fatal(err)
	}
	err := WriteFileAtomicNew(target, []byte("new"), 0o600)
	if !errors.Is(err, fs.ErrExist) {
		t.Fatalf("WriteFileAtomicNew over a symlink: %v, want ErrExist", err)
	}
	if st, _ := os.Lstat(target); st.Mode()&fs.ModeSymlink == 0 {
		t.Fatal("the refused write changed the target")
	}
	if err := WriteFileAtomic(target, []byte("new"), 0o640); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(victim); string(b) != "precious" {
		t.Fatalf("victim now holds %q: the write followed the symlink", b)
	}
	st, err := os.Lstat(target)
	if err != nil || !st.Mode().IsRegular() || st.Mode().Perm() != 0o640 {
		t.Fatalf("target: %v %v, want a regular file of mode 0640", st.Mode(), err)
	}
	// A dangling symlink is refused by NoReplace too.
	dangling := filepath.Join(dir, "dangling")
	os.Symlink(filepath.Join(dir, "nowhere"), dangling)
	if err := WriteFileAtomicNew(dangling, []byte("x"), 0o600); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("over a dangling symlink: %v", err)
	}
	if _, err := os.Lstat(filepath.Join(dir, "nowhere")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatal("the dangling symlink's target was created")
	}
	if err := WriteFileAtomicNew(filepath.Join(dir, "fresh"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if strings.Contains(e.Name(), ".tmp-") {
			t.Errorf("temporary file %s left behind", e.Name())
		}
	}
}

// The mode is set exactly, whatever the umask.
func TestWriteAtomicModeIgnoresUmask(t *testing.T) {
	old := syscall.Umask(0o077)
	defer syscall.Umask(old)
	p := filepath.Join(t.TempDir(), "f")
	if err := WriteFileAtomic(p, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(p); st.Mode().Perm() != 0o644 {
		t.Fatalf("mode %04o", st.Mode().Perm())
	}
}

func TestMkdirPrivate(t *testing.T) {
	dir := t.TempDir()
	other := filepath.Join(dir, "other")
	os.Mkdir(other, 0o755)
	link := filepath.Join(dir, "link")
	os.Symlink(other, link)
	if err := MkdirPrivate(link, 0o700); err == nil || !strings.Contains(err.Error(), "symbolic link") {
		t.Fatalf("MkdirPrivate on a symlink: %v", err)
	}
	if st, _ := os.Stat(other); st.Mode().Perm() != 0o755 {
		t.Fatal("the symlink's target was chmodded")
	}
	loose := filepath.Join(dir, "loose")
	os.Mkdir(loose, 0o777)
	os.Chmod(loose, 0o777)
	if err := MkdirPrivate(loose, 0o700); err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(loose); st.Mode().Perm() != 0o700 {
		t.Fatalf("mode %04o", st.Mode().Perm())
	}
	if err := MkdirPrivate(filepath.Join(dir, "a", "b"), 0o750); err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(filepath.Join(dir, "a", "b")); st.Mode().Perm() != 0o750 {
		t.Fatalf("mode %04o", st.Mode().Perm())
	}
}

func TestTighten(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "store")
	os.Mkdir(dir, 0o755)
	os.Chmod(dir, 0o775)
	old, changed, err := Tighten(dir)
	if err != nil || !changed || old != 0o775 {
		t.Fatalf("Tighten: %04o %v %v", old, changed, err)
	}
	if st, _ := os.Stat(dir); st.Mode().Perm() != 0o700 {
		t.Fatalf("mode %04o", st.Mode().Perm())
	}
	if _, changed, err := Tighten(dir); changed || err != nil {
		t.Fatalf("second Tighten: %v %v", changed, err)
	}
	fresh := filepath.Join(dir, "new", "store")
	if _, _, err := Tighten(fresh); err != nil {
		t.Fatal(err)
	}
	if st, _ := os.Stat(fresh); st.Mode().Perm() != 0o700 {
		t.Fatalf("new store mode %04o", st.Mode().Perm())
	}
}
