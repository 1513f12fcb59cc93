package fusefs

// These tests mount in the test process and drive the mount only from child
// processes (python3, coreutils, util-linux), never from this process: go-fuse
// documents that same-process access can deadlock.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/standin/standin/tracker"
)

type call struct {
	op       string
	rel      string
	off, len int64
}

// recorder is a Tracker that records every call.
type recorder struct {
	mu    sync.Mutex
	calls []call
}

type recImage struct {
	r   *recorder
	rel string
}

func (r *recorder) add(c call) {
	r.mu.Lock()
	r.calls = append(r.calls, c)
	r.mu.Unlock()
}

func (r *recorder) take() []call {
	r.mu.Lock()
	defer r.mu.Unlock()
	c := r.calls
	r.calls = nil
	return c
}

func (r *recorder) Image(rel string) (Image, error) { return &recImage{r, rel}, nil }
func (r *recorder) Unlinking(rel string) func(bool) {
	return func(ok bool) { r.add(call{op: "unlink", rel: rel}) }
}
func (r *recorder) Renamed(o, n string) { r.add(call{op: "rename", rel: o + "->" + n}) }
func (i *recImage) begin(op string, off, n int64) (func(), error) {
	i.r.add(call{op, i.rel, off, n})
	return func() {}, nil
}
func (i *recImage) BeginWrite(off, n int64) (func(), error)    { return i.begin("write", off, n) }
func (i *recImage) BeginPunch(off, n int64) (func(), error)    { return i.begin("punch", off, n) }
func (i *recImage) BeginZero(off, n int64) (func(), error)     { return i.begin("zero", off, n) }
func (i *recImage) BeginAllocate(off, n int64) (func(), error) { return i.begin("allocate", off, n) }
func (i *recImage) BeginResize(size int64) (func(), error)     { return i.begin("resize", size, 0) }
func (i *recImage) Sync() error                                { i.r.add(call{op: "sync", rel: i.rel}); return nil }

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

func mountRecorder(t *testing.T) (backing, mnt string, r *recorder) {
	requireFUSE(t)
	base, err := os.MkdirTemp("/var/tmp", "fusefs-test-")
	if err != nil {
		t.Fatal(err)
	}
	backing, mnt = filepath.Join(base, "images"), filepath.Join(base, "mnt")
	os.MkdirAll(backing, 0o700)
	os.MkdirAll(mnt, 0o700)
	r = &recorder{}
	srv, err := Mount(backing, mnt, r, Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := srv.Unmount(); err != nil {
			t.Errorf("unmount: %v", err)
			unix.Unmount(mnt, unix.MNT_DETACH)
		}
		done := make(chan struct{})
		go func() { srv.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Errorf("server did not stop")
		}
		os.RemoveAll(base)
	})
	return backing, mnt, r
}

// py runs a python3 snippet in a child process with M bound to the mountpoint.
func py(t *testing.T, mnt, code string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	prog := "import os, sys, mmap\nM = sys.argv[1]\n" + code
	out, err := exec.CommandContext(ctx, "python3", "-c", prog, mnt).CombinedOutput()
	if err != nil {
		t.Fatalf("python: %v\n%s", err, out)
	}
	return string(out)
}

func find(calls []call, op string) []call {
	var out []call
	for _, c := range calls {
		if c.op == op {
			out = append(out, c)
		}
	}
	return out
}

// TestEveryWriteReachesTracker is the passthrough regression test: as root on
// Linux ≥ 6.9 go-fuse would register the backing file for passthrough and
// writes would bypass the server. Buffered and O_DIRECT writes must all be
// recorded with their exact ranges.
func TestEveryWriteReachesTracker(t *testing.T) {
	_, mnt, r := mountRecorder(t)
	py(t, mnt, `
fd = os.open(M + "/a.img", os.O_CREAT | os.O_RDWR, 0o600)
os.ftruncate(fd, 64 << 20)
for i in range(32):
    os.pwrite(fd, b"x" * 4096, i * 1048576 + 8192)
os.fsync(fd)
os.close(fd)
fd = os.open(M + "/a.img", os.O_RDWR | os.O_DIRECT)
buf = mmap.mmap(-1, 4096)
buf.write(b"y" * 4096)
for i in range(32):
    os.pwritev(fd, [buf], i * 1048576 + 16384)
os.fdatasync(fd)
os.close(fd)
`)
	calls := r.take()
	writes := find(calls, "write")
	seen := map[int64]bool{}
	for _, w := range writes {
		if w.len == 4096 {
			seen[w.off] = true
		}
	}
	for i := int64(0); i < 32; i++ {
		for _, off := range []int64{i<<20 + 8192, i<<20 + 16384} {
			if !seen[off] {
				t.Fatalf("write at %d did not reach the tracker (passthrough on?); got %d writes", off, len(writes))
			}
		}
	}
	if len(find(calls, "sync")) < 2 {
		t.Fatalf("fsync/fdatasync did not reach the tracker: %v", calls)
	}
}

func TestMutationsAreTracked(t *testing.T) {
	backing, mnt, r := mountRecorder(t)
	py(t, mnt, `
with open(M + "/a.img", "wb") as f:
    f.truncate(16 << 20)
`)
	r.take()
	cases := []struct {
		name, code string
		want       call
	}{
		{"punch", `fd = os.open(M + "/a.img", os.O_RDWR); os.posix_fallocate(fd, 0, 1)
import ctypes; libc = ctypes.CDLL(None, use_errno=True)
assert libc.fallocate(fd, 3, ctypes.c_long(1 << 20), ctypes.c_long(1 << 20)) == 0`, call{"punch", "a.img", 1 << 20, 1 << 20}},
		{"zero-range", `fd = os.open(M + "/a.img", os.O_RDWR)
import ctypes; libc = ctypes.CDLL(None, use_errno=True)
assert libc.fallocate(fd, 0x10, ctypes.c_long(2 << 20), ctypes.c_long(4096)) == 0`, call{"zero", "a.img", 2 << 20, 4096}},
		{"truncate-by-path", `os.truncate(M + "/a.img", 8 << 20)`, call{"resize", "a.img", 8 << 20, 0}},
		{"ftruncate", `fd = os.open(M + "/a.img", os.O_RDWR); os.ftruncate(fd, 12 << 20)`, call{"resize", "a.img", 12 << 20, 0}},
		{"o-trunc", `open(M + "/a.img", "r+b").close(); fd = os.open(M + "/a.img", os.O_WRONLY | os.O_TRUNC)`, call{"resize", "a.img", 0, 0}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			py(t, mnt, c.code)
			calls := r.take()
			found := false
			for _, got := range calls {
				if got == c.want {
					found = true
				}
			}
			if !found {
				t.Fatalf("want %+v among %+v", c.want, calls)
			}
		})
	}
	t.Run("copy_file_range", func(t *testing.T) {
		py(t, mnt, `
with open(M + "/src.img", "wb") as f: f.write(b"s" * 65536)
with open(M + "/dst.img", "wb") as f: f.truncate(65536)
i = os.open(M + "/src.img", os.O_RDONLY); o = os.open(M + "/dst.img", os.O_WRONLY)
n = 0
while n < 65536:
    k = os.copy_file_range(i, o, 65536 - n, n, n)
    assert k > 0
    n += k
`)
		var covered int64
		for _, c := range find(r.take(), "write") {
			if c.rel == "dst.img" {
				covered += c.len
			}
		}
		if covered < 65536 {
			t.Fatalf("copy_file_range: %d bytes of the destination tracked, want 65536", covered)
		}
		got, _ := os.ReadFile(filepath.Join(backing, "dst.img"))
		if !bytes.Equal(got, bytes.Repeat([]byte("s"), 65536)) {
			t.Fatal("copy_file_range: destination content wrong")
		}
	})
	t.Run("refused", func(t *testing.T) {
		out := py(t, mnt, `
import errno
for what, f in [("link", lambda: os.link(M + "/a.img", M + "/b.img")),
                ("symlink", lambda: os.symlink("/etc/passwd", M + "/c.img")),
                ("tmpfile", lambda: os.open(M, os.O_TMPFILE | os.O_RDWR, 0o600))]:
    try:
        f(); print(what, "allowed")
    except OSError as e:
        print(what, errno.errorcode[e.errno])
try:
    os.getxattr(M + "/a.img", "user.standin.id"); print("xattr visible")
except OSError as e:
    print("xattr", errno.errorcode[e.errno])
`)
		for _, bad := range []string{"link allowed", "symlink allowed", "tmpfile allowed", "xattr visible"} {
			if strings.Contains(out, bad) {
				t.Fatalf("%s:\n%s", bad, out)
			}
		}
	})
	t.Run("rename-unlink", func(t *testing.T) {
		py(t, mnt, `os.rename(M + "/src.img", M + "/moved.img"); os.unlink(M + "/moved.img")`)
		calls := fmt.Sprint(r.take())
		if !strings.Contains(calls, "src.img->moved.img") || !strings.Contains(calls, "unlink moved.img") {
			t.Fatalf("rename/unlink not reported: %s", calls)
		}
	})
}

// TestUnalignedDirectIO: FUSE accepts unaligned O_DIRECT requests; the backing
// file (opened O_DIRECT) would refuse them, so the handle falls back.
func TestUnalignedDirectIO(t *testing.T) {
	backing, mnt, _ := mountRecorder(t)
	py(t, mnt, `
fd = os.open(M + "/u.img", os.O_CREAT | os.O_RDWR, 0o600); os.ftruncate(fd, 1 << 20); os.close(fd)
fd = os.open(M + "/u.img", os.O_RDWR | os.O_DIRECT)
assert os.pwrite(fd, b"z" * 1000, 100) == 1000
assert os.pread(fd, 1000, 100) == b"z" * 1000
`)
	got, _ := os.ReadFile(filepath.Join(backing, "u.img"))
	if !bytes.Equal(got[100:1100], bytes.Repeat([]byte("z"), 1000)) {
		t.Fatal("unaligned direct write lost")
	}
}

// storeTracker makes a real *tracker.Store a Tracker (as the daemon's adapter does).
type storeTracker struct{ s *tracker.Store }

func (a storeTracker) Image(rel string) (Image, error) {
	im, err := a.s.Image(rel)
	if err != nil {
		return nil, err
	}
	return im, nil
}
func (a storeTracker) Unlinking(rel string) func(bool) { return a.s.Unlinking(rel) }
func (a storeTracker) Renamed(o, n string)             { a.s.Renamed(o, n) }

// mountStore mounts a real tracker store; the cleanups unmount first, then
// close the store.
func mountStore(t *testing.T) (s *tracker.Store, mnt string) {
	requireFUSE(t)
	base, err := os.MkdirTemp("/var/tmp", "fusefs-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	s, err = tracker.Open(filepath.Join(base, "store"), tracker.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	mnt = filepath.Join(base, "mnt")
	os.MkdirAll(mnt, 0o700)
	srv, err := Mount(s.ImagesDir(), mnt, storeTracker{s}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := srv.Unmount(); err != nil {
			t.Errorf("unmount: %v", err)
			unix.Unmount(mnt, unix.MNT_DETACH)
		}
		done := make(chan struct{})
		go func() { srv.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Errorf("server did not stop")
		}
	})
	return s, mnt
}

func TestFencedErrnoIsEROFS(t *testing.T) {
	if got := toErrno(tracker.ErrFenced); got != syscall.EROFS {
		t.Fatalf("toErrno(ErrFenced) = %v, want EROFS", got)
	}
	if got := toErrno(fmt.Errorf("wrapped: %w", tracker.ErrFenced)); got != syscall.EROFS {
		t.Fatalf("toErrno(wrapped ErrFenced) = %v, want EROFS", got)
	}
}

// TestFencedImageThroughMount: write handles are counted; a fence refuses
// writes, truncation and opens for writing with EROFS, while reads go on.
func TestFencedImageThroughMount(t *testing.T) {
	s, mnt := mountStore(t)
	content := bytes.Repeat([]byte("fence me"), 4096/8)
	if err := os.WriteFile(filepath.Join(s.ImagesDir(), "a.img"), content, 0o600); err != nil {
		t.Fatal(err)
	}
	im, err := s.Image("a.img")
	if err != nil {
		t.Fatal(err)
	}
	waitOpens := func(want int) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for im.WriteOpens() != want {
			if time.Now().After(deadline) {
				t.Fatalf("WriteOpens = %d, want %d", im.WriteOpens(), want)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}

	// A child holds a.img open O_RDWR (and one O_RDONLY) until told to go on.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "python3", "-c", `
import os, sys, errno
M = sys.argv[1]
fd = os.open(M + "/a.img", os.O_RDWR)
ro = os.open(M + "/a.img", os.O_RDONLY)
assert os.pwrite(fd, b"before", 0) == 6
print("opened", flush=True)
sys.stdin.readline()
def attempt(what, f):
    try:
        f(); print(what, "ok", flush=True)
    except OSError as e:
        print(what, errno.errorcode[e.errno], flush=True)
attempt("write", lambda: os.pwrite(fd, b"after", 0))
attempt("ftruncate", lambda: os.ftruncate(fd, 0))
attempt("truncate", lambda: os.truncate(M + "/a.img", 0))
attempt("open-rdwr", lambda: os.open(M + "/a.img", os.O_RDWR))
attempt("open-wronly", lambda: os.open(M + "/a.img", os.O_WRONLY))
attempt("open-trunc", lambda: os.open(M + "/a.img", os.O_WRONLY | os.O_TRUNC))
r = os.open(M + "/a.img", os.O_RDONLY)
print("read", os.pread(r, 16, 0).decode(), flush=True)
os.close(r)
os.close(ro)
os.close(fd)
`, mnt)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = pw, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	exited := false
	defer func() {
		if !exited {
			stdin.Close()
			cmd.Process.Kill()
			cmd.Wait()
		}
	}()
	first := make([]byte, len("opened\n"))
	if _, err := io.ReadFull(pr, first); err != nil || string(first) != "opened\n" {
		t.Fatalf("child: %q %v; stderr: %s", first, err, out.String())
	}
	waitOpens(1)
	if err := s.Fence([]string{"a.img"}, "test", false); !errors.Is(err, tracker.ErrOpenForWrite) {
		t.Fatalf("fence while open for writing: %v", err)
	}
	if im.Fenced() {
		t.Fatal("refused fence fenced the image")
	}
	if err := s.Fence([]string{"a.img"}, "test", true); err != nil {
		t.Fatal(err)
	}
	stdin.Close()
	rest, _ := io.ReadAll(pr)
	err = cmd.Wait()
	exited = true
	if err != nil {
		t.Fatalf("child: %v\n%s%s", err, rest, out.String())
	}
	got := string(rest)
	for _, want := range []string{
		"write EROFS", "ftruncate EROFS", "truncate EROFS",
		"open-rdwr EROFS", "open-wronly EROFS", "open-trunc EROFS",
		"read beforemefence me",
	} {
		if !strings.Contains(got, want+"\n") {
			t.Errorf("want %q in the child's output:\n%s", want, got)
		}
	}
	waitOpens(0)
	b, _ := os.ReadFile(filepath.Join(s.ImagesDir(), "a.img"))
	if !bytes.Equal(b[6:], content[6:]) || string(b[:6]) != "before" {
		t.Fatal("the fenced image changed")
	}

	// A fenced image cannot be unlinked, renamed or replaced.
	for _, code := range []string{
		`os.unlink(M + "/a.img")`,
		`os.rename(M + "/a.img", M + "/b.img")`,
		`open(M + "/c.img", "w").close(); os.rename(M + "/c.img", M + "/a.img")`,
	} {
		got := py(t, mnt, "import errno\ntry:\n    "+code+"\n    print('ok')\nexcept OSError as e:\n    print(errno.errorcode[e.errno])")
		if strings.TrimSpace(got) != "EROFS" {
			t.Errorf("%s on a fenced image: %s, want EROFS", code, got)
		}
	}
	if _, err := os.Stat(filepath.Join(s.ImagesDir(), "a.img")); err != nil {
		t.Fatalf("fenced image gone: %v", err)
	}

	// Create reopens through open: the counts stay balanced.
	py(t, mnt, `fd = os.open(M + "/new.img", os.O_CREAT | os.O_RDWR, 0o600); os.write(fd, b"x"); os.close(fd)`)
	im, err = s.Image("new.img")
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond) // release is asynchronous
	waitOpens(0)
}
