package fusefs

// Tests of the replica's mounts (points.go, cow.go) against in-memory
// sources, driven from python3 child processes (never from this process).

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

type memPoint struct {
	id   string
	time time.Time
	data []byte // holes: all-zero 4 KiB blocks
}

type memSource struct {
	mu     sync.Mutex
	points []memPoint
	open   atomic.Int64
}

func (s *memSource) Groups() ([]string, error) { return []string{"vm1"}, nil }

func (s *memSource) Files(group string) ([]PointFile, error) {
	if group != "vm1" {
		return nil, syscall.ENOENT
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []PointFile
	for i, p := range s.points {
		out = append(out, PointFile{Name: "disk.img@" + p.time.UTC().Format(time.RFC3339), Image: "disk.img",
			Key: p.id + "/disk", Size: int64(len(p.data)), Time: p.time, Latest: i == len(s.points)-1})
	}
	return out, nil
}

type memReader struct {
	s    *memSource
	data []byte
}

func (s *memSource) Open(group string, f PointFile) (ImageReader, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range s.points {
		if p.id+"/disk" == f.Key {
			s.open.Add(1)
			return &memReader{s: s, data: p.data}, nil
		}
	}
	return nil, syscall.ENOENT
}

func (r *memReader) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(r.data)) {
		return 0, io.EOF
	}
	n := copy(p, r.data[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (r *memReader) Close() error { r.s.open.Add(-1); return nil }

// SeekData: 4 KiB blocks that are all zero are holes.
func (r *memReader) SeekData(off int64, hole bool) (int64, error) {
	size := int64(len(r.data))
	for b := off &^ 4095; b < size; b += 4096 {
		z := true
		for _, c := range r.data[b:min(b+4096, size)] {
			if c != 0 {
				z = false
				break
			}
		}
		if z == hole {
			return max(b, off), nil
		}
	}
	if hole {
		return size, nil
	}
	return 0, syscall.ENXIO
}

func pattern(n int, seed byte, holes ...int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7) ^ seed | 1
	}
	for _, h := range holes {
		clear(b[h*4096 : (h+1)*4096])
	}
	return b
}

func sha(b []byte) string { s := sha256.Sum256(b); return hex.EncodeToString(s[:]) }

func mountTemp(t *testing.T, mount func(mnt string) (*Server, error)) string {
	requireFUSE(t)
	base, err := os.MkdirTemp("/var/tmp", "fusefs-replica-test-")
	if err != nil {
		t.Fatal(err)
	}
	mnt := filepath.Join(base, "mnt")
	os.MkdirAll(mnt, 0o755)
	srv, err := mount(mnt)
	if err != nil {
		os.RemoveAll(base)
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
	return mnt
}

// TestPointsMount: listing, reads, the latest/ alias, an open file keeps its
// point while a new one becomes latest, read-only refusals, SEEK_DATA/HOLE,
// and every open reader is closed on release.
func TestPointsMount(t *testing.T) {
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	src := &memSource{points: []memPoint{
		{"1", t0, pattern(1<<20+100, 1, 3, 4, 200)},
		{"2", t0.Add(time.Hour), pattern(2<<20, 2, 0, 100)},
	}}
	mnt := mountTemp(t, func(m string) (*Server, error) { return MountPoints(m, src, Options{}) })
	p1, p2 := src.points[0], src.points[1]
	n1 := "disk.img@" + p1.time.Format(time.RFC3339)
	n2 := "disk.img@" + p2.time.Format(time.RFC3339)
	out := py(t, mnt, fmt.Sprintf(`
import hashlib, errno
def h(p):
    with open(p, "rb") as f: return hashlib.sha256(f.read()).hexdigest()
print("root", sorted(os.listdir(M)))
print("group", sorted(os.listdir(M + "/vm1")))
print("latest", sorted(os.listdir(M + "/vm1/latest")))
print("h1", h(M + "/vm1/%[1]s"))
print("h2", h(M + "/vm1/%[2]s"))
print("hl", h(M + "/vm1/latest/disk.img"))
print("size1", os.stat(M + "/vm1/%[1]s").st_size)
print("same-inode", os.stat(M + "/vm1/%[2]s").st_ino == os.stat(M + "/vm1/latest/disk.img").st_ino)
for what, f in [("open-w", lambda: open(M + "/vm1/%[2]s", "r+b")),
                ("create", lambda: open(M + "/vm1/new", "wb")),
                ("unlink", lambda: os.unlink(M + "/vm1/%[2]s"))]:
    try:
        f(); print(what, "allowed")
    except OSError as e:
        print(what, errno.errorcode[e.errno])
fd = os.open(M + "/vm1/%[1]s", os.O_RDONLY)
segs = []
off = 0
while True:
    try:
        d = os.lseek(fd, off, os.SEEK_DATA)
    except OSError as e:
        assert e.errno == errno.ENXIO
        break
    hl = os.lseek(fd, d, os.SEEK_HOLE)
    segs.append((d, hl))
    off = hl
print("data", segs)
`, n1, n2))
	for _, want := range []string{
		"root ['vm1']",
		fmt.Sprintf("group ['%s', '%s', 'latest']", n1, n2),
		"latest ['disk.img']",
		"h1 " + sha(p1.data), "h2 " + sha(p2.data), "hl " + sha(p2.data),
		fmt.Sprintf("size1 %d", len(p1.data)),
		"same-inode True",
		"open-w EROFS", "create EROFS", "unlink EROFS",
		fmt.Sprintf("data [(0, %d), (%d, %d), (%d, %d)]", 3*4096, 5*4096, 200*4096, 201*4096, len(p1.data)),
	} {
		if !strings.Contains(out, want+"\n") {
			t.Errorf("want %q in:\n%s", want, out)
		}
	}

	// An open latest file keeps reading its point when a new point arrives;
	// a new open of latest/ gets the new one.
	p3 := memPoint{"3", t0.Add(2 * time.Hour), pattern(2<<20, 3)}
	flag := filepath.Join(filepath.Dir(mnt), "flag")
	cmd := exec.Command("python3", "-c", fmt.Sprintf(`
import hashlib, os, sys, time
M = sys.argv[1]
f = open(M + "/vm1/latest/disk.img", "rb")
a = f.read(1 << 20)
open(%[1]q, "w").close()          # the test adds point 3 and removes the flag
while os.path.exists(%[1]q): time.sleep(0.02)
b = f.read()
print("old", hashlib.sha256(a + b).hexdigest())
f.close()
time.sleep(0.1)
with open(M + "/vm1/latest/disk.img", "rb") as g:
    print("new", hashlib.sha256(g.read()).hexdigest())
print("listed", len(os.listdir(M + "/vm1")))
`, flag), mnt)
	var buf bytes.Buffer
	cmd.Stdout, cmd.Stderr = &buf, &buf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := os.Stat(flag); err == nil {
			break
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			t.Fatalf("python never opened latest: %s", buf.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	src.mu.Lock()
	src.points = append(src.points, p3)
	src.mu.Unlock()
	os.Remove(flag)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("python: %v\n%s", err, buf.String())
		}
	case <-time.After(20 * time.Second):
		cmd.Process.Kill()
		t.Fatalf("python hung: %s", buf.String())
	}
	out = buf.String()
	for _, want := range []string{"old " + sha(p2.data), "new " + sha(p3.data), "listed 4"} {
		if !strings.Contains(out, want+"\n") {
			t.Errorf("want %q in:\n%s", want, out)
		}
	}
	// Every reader was closed on release.
	if !waitUntil(5*time.Second, func() bool { return src.open.Load() == 0 }) {
		t.Errorf("%d point readers still open after every file was closed", src.open.Load())
	}
}

func waitUntil(d time.Duration, f func() bool) bool {
	end := time.Now().Add(d)
	for !f() {
		if time.Now().After(end) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
	return true
}

// memImage is an in-memory RWImage.
type memImage struct {
	mu    sync.Mutex
	data  []byte
	syncs atomic.Int64
}

func (m *memImage) ReadAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if off >= int64(len(m.data)) {
		return 0, io.EOF
	}
	n := copy(p, m.data[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func (m *memImage) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(m.data[off:], p), nil
}

func (m *memImage) Zero(off, n int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.data[off : off+n])
	return nil
}

func (m *memImage) Sync() error { m.syncs.Add(1); return nil }
func (m *memImage) Size() int64 { return int64(len(m.data)) }

// TestImagesMount: a test failover mount: buffered and O_DIRECT reads and
// writes, unaligned writes, punch hole, fsync reaches Sync, the size is
// fixed (truncate, writes past the end), the set of files is fixed, chmod
// and chown are kept.
func TestImagesMount(t *testing.T) {
	a := &memImage{data: pattern(1<<20, 5)}
	b := &memImage{data: pattern(64<<10, 6)}
	mnt := mountTemp(t, func(m string) (*Server, error) {
		return MountImages(m, []NamedImage{{"a.img", a}, {"b.img", b}}, Options{})
	})
	out := py(t, mnt, `
import errno, ctypes
libc = ctypes.CDLL(None, use_errno=True)
print("ls", sorted(os.listdir(M)))
fd = os.open(M + "/a.img", os.O_RDWR)
assert os.pwrite(fd, b"hello", 4093) == 5
assert os.pread(fd, 5, 4093) == b"hello"
assert libc.fallocate(fd, 3, ctypes.c_long(8192), ctypes.c_long(8192)) == 0
assert os.pread(fd, 8192, 8192) == bytes(8192)
os.fsync(fd)
try:
    os.pwrite(fd, b"x", 1 << 20); print("past-end allowed")
except OSError as e:
    print("past-end", errno.errorcode[e.errno])
os.close(fd)
buf = mmap.mmap(-1, 65536)
buf.write(b"D" * 65536)
fd = os.open(M + "/a.img", os.O_RDWR | os.O_DIRECT)
assert os.pwritev(fd, [buf], 65536) == 65536
rb = mmap.mmap(-1, 65536)
assert os.preadv(fd, [rb], 65536) == 65536 and rb[:] == b"D" * 65536
os.close(fd)
for what, f in [("truncate", lambda: os.truncate(M + "/a.img", 4096)),
                ("create", lambda: open(M + "/c.img", "wb")),
                ("unlink", lambda: os.unlink(M + "/b.img")),
                ("rename", lambda: os.rename(M + "/b.img", M + "/d.img"))]:
    try:
        f(); print(what, "allowed")
    except OSError as e:
        print(what, "refused")
os.chmod(M + "/b.img", 0o640)
os.chown(M + "/b.img", 107, 110)
st = os.stat(M + "/b.img")
print("attrs", oct(st.st_mode & 0o777), st.st_uid, st.st_gid, st.st_size)
`)
	for _, want := range []string{"ls ['a.img', 'b.img']", "past-end ENOSPC", "truncate refused", "create refused",
		"unlink refused", "rename refused", fmt.Sprintf("attrs 0o640 107 110 %d", 64<<10)} {
		if !strings.Contains(out, want+"\n") {
			t.Errorf("want %q in:\n%s", want, out)
		}
	}
	want := pattern(1<<20, 5)
	copy(want[4093:], "hello")
	clear(want[8192:16384])
	copy(want[65536:], bytes.Repeat([]byte("D"), 65536))
	a.mu.Lock()
	same := bytes.Equal(a.data, want)
	a.mu.Unlock()
	if !same {
		t.Error("a.img content differs from the expected writes")
	}
	if a.syncs.Load() == 0 {
		t.Error("fsync did not reach Sync")
	}
}
