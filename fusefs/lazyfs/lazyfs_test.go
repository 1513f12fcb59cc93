package lazyfs

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func requireFUSE(t *testing.T) {
	t.Helper()
	_, err := os.Stat("/dev/fuse")
	if os.Geteuid() != 0 || err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("FUSE tests need root and /dev/fuse (euid %d, %v)", os.Geteuid(), err)
		}
		t.Skip("needs root and /dev/fuse")
	}
	if _, err := exec.LookPath("python3"); err != nil {
		t.Fatalf("python3 is needed to drive the mount from a child process: %v", err)
	}
}

type env struct {
	t             *testing.T
	backing, mnt  string
	f             *FS
	base          string
	unmountedOnce bool
}

// newEnv creates a backing directory and mounts a lazyfs over it; cleanup
// unmounts whatever is mounted, also after a failure.
func newEnv(t *testing.T) *env {
	requireFUSE(t)
	base, err := os.MkdirTemp("/var/tmp", "lazyfs-test-")
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, base: base, backing: filepath.Join(base, "backing"), mnt: filepath.Join(base, "mnt")}
	os.MkdirAll(e.backing, 0o700)
	os.MkdirAll(e.mnt, 0o700)
	e.mount()
	t.Cleanup(func() {
		if e.f != nil {
			e.f.Unmount()
			e.wait()
		}
		unix.Unmount(e.mnt, unix.MNT_DETACH)
		os.RemoveAll(base)
	})
	return e
}

func (e *env) mount() {
	f, err := Mount(e.backing, e.mnt, Options{})
	if err != nil {
		e.t.Fatal(err)
	}
	e.f = f
}

func (e *env) wait() {
	done := make(chan struct{})
	go func() { e.f.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		e.t.Errorf("server did not stop")
	}
	e.f = nil
}

// cut simulates a power cut and mounts again over the same backing directory.
func (e *env) cut() CutStats {
	c := e.f.PowerCut()
	e.wait()
	e.t.Logf("power cut: %v", c)
	e.mount()
	return c
}

// py runs a python3 snippet in a child process with M bound to the mountpoint.
func (e *env) py(code string) string {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	prog := "import os, sys\nM = sys.argv[1]\n" +
		"def dsync(d):\n    fd = os.open(d, os.O_RDONLY|os.O_DIRECTORY); os.fsync(fd); os.close(fd)\n" + code
	out, err := exec.CommandContext(ctx, "python3", "-c", prog, e.mnt).CombinedOutput()
	if err != nil {
		e.t.Fatalf("python: %v\n%s", err, out)
	}
	return strings.TrimSpace(string(out))
}

func (e *env) read(rel string) (string, bool) {
	b, err := os.ReadFile(filepath.Join(e.backing, rel))
	if err != nil {
		return "", false
	}
	return string(b), true
}

// TestDataNeedsFsync: written-but-not-synced data (buffered, O_DIRECT, size
// changes) is gone after a power cut; synced data survives.
func TestDataNeedsFsync(t *testing.T) {
	e := newEnv(t)
	e.py(`
fd = os.open(M+"/a", os.O_CREAT|os.O_RDWR, 0o600)
os.pwrite(fd, b"durable-" * 1024, 0)
os.fsync(fd)
dsync(M)
os.pwrite(fd, b"LOST", 4)
os.ftruncate(fd, 16384)
assert os.pread(fd, 8, 0) == b"duraLOST", os.pread(fd, 8, 0)
assert os.fstat(fd).st_size == 16384
os.close(fd)
import mmap
fd = os.open(M+"/a", os.O_RDWR|os.O_DIRECT)
buf = mmap.mmap(-1, 4096)
buf.write(b"D" * 4096)
os.pwritev(fd, [buf], 4096)
os.close(fd)
fd = os.open(M+"/b", os.O_CREAT|os.O_RDWR, 0o600)
os.write(fd, b"synced")
os.fsync(fd)
os.write(fd, b" and not")
os.close(fd)
dsync(M)
`)
	if got, _ := e.read("a"); got != strings.Repeat("durable-", 1024) {
		t.Errorf("backing of a before the cut already holds unsynced data (%d bytes, %q...)", len(got), got[:min(16, len(got))])
	}
	c := e.cut()
	if c.Pages == 0 || c.Files != 2 {
		t.Errorf("cut stats %v: want pending pages of 2 files", c)
	}
	if got, _ := e.read("a"); got != strings.Repeat("durable-", 1024) {
		t.Errorf("a after the cut: %d bytes %q..., want the synced 8192 bytes", len(got), got[:min(16, len(got))])
	}
	if got := e.py(`print(open(M+"/b").read())`); got != "synced" {
		t.Errorf("b after the cut reads %q through the new mount, want %q", got, "synced")
	}
}

// TestFsyncAppliesEverything: fsync makes writes, a shrink and a regrow
// durable exactly as read before the cut.
func TestFsyncAppliesEverything(t *testing.T) {
	e := newEnv(t)
	e.py(`
fd = os.open(M+"/a", os.O_CREAT|os.O_RDWR, 0o600)
os.pwrite(fd, b"x" * 10000, 0)
os.fsync(fd)
dsync(M)
os.ftruncate(fd, 100)
os.ftruncate(fd, 9000)
os.pwrite(fd, b"y", 8000)
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
assert libc.fallocate(fd, 0x02|0x01, ctypes.c_long(0), ctypes.c_long(50)) == 0, ctypes.get_errno()
os.fdatasync(fd)
os.close(fd)
`)
	want := make([]byte, 9000)
	copy(want[50:100], bytes.Repeat([]byte("x"), 50))
	want[8000] = 'y'
	if got, _ := e.read("a"); got != string(want) {
		t.Errorf("backing after fdatasync differs from what was written (%d bytes)", len(got))
	}
	e.cut()
	if got, _ := e.read("a"); got != string(want) {
		t.Errorf("a after the cut differs from what was synced (%d bytes)", len(got))
	}
}

// TestEntriesNeedDirFsync: a new name, a rename and an unlink survive a power
// cut only when their directory was fsynced.
func TestEntriesNeedDirFsync(t *testing.T) {
	e := newEnv(t)
	e.py(`
os.mkdir(M+"/d")
dsync(M)
for n in ("keep", "gone", "old"):
    fd = os.open(M+"/d/"+n, os.O_CREAT|os.O_WRONLY, 0o600)
    os.write(fd, n.encode()); os.fsync(fd); os.close(fd)
dsync(M+"/d")
# atomic replace made durable by the directory fsync
fd = os.open(M+"/d/tmp1", os.O_CREAT|os.O_WRONLY, 0o600)
os.write(fd, b"new"); os.fsync(fd); os.close(fd)
os.rename(M+"/d/tmp1", M+"/d/keep")
os.unlink(M+"/d/gone")
dsync(M+"/d")
# not made durable: rename, unlink and create
os.rename(M+"/d/old", M+"/d/renamed")
fd = os.open(M+"/d/tmp2", os.O_CREAT|os.O_WRONLY, 0o600)
os.write(fd, b"never"); os.fsync(fd); os.close(fd)
os.unlink(M+"/d/keep") if False else None
os.mkdir(M+"/e")
`)
	e.cut()
	ents, _ := os.ReadDir(filepath.Join(e.backing, "d"))
	var names []string
	for _, en := range ents {
		names = append(names, en.Name())
	}
	if got := strings.Join(names, ","); got != "keep,old" {
		t.Errorf("d after the cut holds %q, want keep,old (rename into keep and unlink of gone durable; rename to renamed and tmp2 undone)", got)
	}
	if got, _ := e.read("d/keep"); got != "new" {
		t.Errorf("d/keep = %q, want the renamed-over content %q", got, "new")
	}
	if got, _ := e.read("d/old"); got != "old" {
		t.Errorf("d/old = %q after the rename was undone", got)
	}
	if _, err := os.Stat(filepath.Join(e.backing, "e")); err == nil {
		t.Errorf("directory e survived although its parent was never fsynced")
	}
	if got := e.py(`print(sorted(os.listdir(M+"/d")))`); got != "['keep', 'old']" {
		t.Errorf("new mount lists d as %s", got)
	}
}

// TestSyncAll: Sync (the sync(2) FUSE never sees) makes everything durable.
func TestSyncAll(t *testing.T) {
	e := newEnv(t)
	e.py(`
fd = os.open(M+"/a", os.O_CREAT|os.O_WRONLY, 0o600)
os.write(fd, b"all"); os.close(fd)
`)
	if err := e.f.Sync(); err != nil {
		t.Fatal(err)
	}
	if c := e.cut(); c.Pages != 0 || c.EntryUndos != 0 {
		t.Errorf("cut after Sync dropped something: %v", c)
	}
	if got, _ := e.read("a"); got != "all" {
		t.Errorf("a = %q after Sync and a cut", got)
	}
}

// TestTrashOnlyItsOwn: a -trash directory that holds files lazyfs did not put
// there is refused, never emptied; an empty one or one lazyfs left behind is
// taken (the leftovers of a killed lazyfs removed).
func TestTrashOnlyItsOwn(t *testing.T) {
	base := t.TempDir()
	backing, trash := filepath.Join(base, "backing"), filepath.Join(base, "trash")
	for _, d := range []string{backing, trash} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	user := filepath.Join(trash, "precious")
	if err := os.WriteFile(user, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Mount(backing, filepath.Join(base, "mnt"), Options{Trash: trash}); err == nil || !strings.Contains(err.Error(), "not a lazyfs trash") {
		t.Fatalf("mount with a foreign non-empty trash: %v, want refused", err)
	}
	if _, err := os.Stat(user); err != nil {
		t.Fatalf("the user's file in the trash: %v", err)
	}

	os.Remove(user)
	if err := openTrash(trash); err != nil { // empty: taken and marked
		t.Fatal(err)
	}
	left := filepath.Join(trash, "1")
	if err := os.WriteFile(left, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := openTrash(trash); err != nil { // lazyfs's own: emptied
		t.Fatal(err)
	}
	if _, err := os.Stat(left); !os.IsNotExist(err) {
		t.Errorf("leftover of a killed lazyfs: %v, want removed", err)
	}
	if _, err := os.Stat(filepath.Join(trash, trashMark)); err != nil {
		t.Errorf("trash mark: %v", err)
	}
}
