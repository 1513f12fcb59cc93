package integration

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// conf is what a conformance case gets: a directory (plain or mount), a
// per-case file name prefix and a recorder. Everything recorded must be equal
// between the plain directory and the standin mount.
type conf struct {
	t      *testing.T
	dir    string
	prefix string
	lines  []string
}

func (c *conf) path(name string) string { return filepath.Join(c.dir, c.prefix+"-"+name) }

func (c *conf) rec(format string, args ...any) {
	c.lines = append(c.lines, fmt.Sprintf(format, args...))
}

// recFile records size, allocation-independent content hash of a path.
func (c *conf) recFile(label, p string) {
	c.t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(p, &st); err != nil {
		c.rec("%s: stat %s", label, errName(err))
		return
	}
	data, err := os.ReadFile(p)
	if err != nil {
		c.rec("%s: read %s", label, errName(err))
		return
	}
	c.rec("%s: size=%d read=%d b3=%s", label, st.Size, len(data), b3Bytes(data)[:16])
}

func (c *conf) open(name string, flags int) int {
	c.t.Helper()
	fd, err := unix.Open(c.path(name), flags|unix.O_CLOEXEC, 0o644)
	if err != nil {
		c.t.Fatalf("open %s: %v", c.path(name), err)
	}
	c.t.Cleanup(func() { unix.Close(fd) })
	return fd
}

func (c *conf) fstat(fd int) unix.Stat_t {
	c.t.Helper()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		c.t.Fatal(err)
	}
	return st
}

func (c *conf) pwrite(fd int, b []byte, off int64) {
	c.t.Helper()
	n, err := unix.Pwrite(fd, b, off)
	c.rec("pwrite off=%d len=%d: n=%d %s", off, len(b), n, errName(err))
}

type confCase struct {
	name string
	run  func(c *conf)
}

var confCases = []confCase{
	{"odirect_4k", func(c *conf) { caseODirect(c, 4096) }},
	{"odirect_1m", func(c *conf) { caseODirect(c, 1<<20) }},
	{"buffered_unaligned", caseBuffered},
	{"fsync_fdatasync", caseFsync},
	{"fallocate", caseFallocate},
	{"truncate", caseTruncate},
	{"sparse_seek", caseSparse},
	{"concurrent_writers", caseConcurrent},
	{"ofd_locks", caseLocks},
	{"namespace", caseNamespace},
}

func caseODirect(c *conf, n int) {
	fd := c.open("f", unix.O_CREAT|unix.O_RDWR|unix.O_DIRECT)
	buf := alignedBuf(c.t, n)
	fillPattern(buf, 0, 1)
	c.pwrite(fd, buf, 0)
	fillPattern(buf, 3*int64(n), 2)
	c.pwrite(fd, buf, 3*int64(n))
	rb := alignedBuf(c.t, n)
	got, err := unix.Pread(fd, rb, 3*int64(n))
	c.rec("pread: n=%d %s equal=%v", got, errName(err), bytes.Equal(rb, buf))
	// A read that crosses EOF returns the short tail.
	got, err = unix.Pread(fd, rb, 3*int64(n)+int64(n)/2)
	c.rec("pread across EOF: n=%d %s", got, errName(err))
	// A read of the never-written middle returns zeros.
	got, err = unix.Pread(fd, rb, int64(n))
	c.rec("pread hole: n=%d %s zero=%v", got, errName(err), bytes.Count(rb[:max(got, 0)], []byte{0}) == max(got, 0))
	c.rec("fstat size=%d", c.fstat(fd).Size)
	c.recFile("file", c.path("f"))
}

func caseBuffered(c *conf) {
	fd := c.open("f", unix.O_CREAT|unix.O_RDWR)
	c.pwrite(fd, []byte("hello"), 0)
	c.pwrite(fd, []byte("ab"), 4095) // crosses a block boundary
	big := make([]byte, 5000)
	fillPattern(big, 10000, 3)
	c.pwrite(fd, big, 10000)
	small := make([]byte, 123)
	fillPattern(small, 1<<20+7, 4)
	c.pwrite(fd, small, 1<<20+7)
	c.pwrite(fd, []byte("overwrite"), 10003)
	rb := make([]byte, 20)
	n, err := unix.Pread(fd, rb, 4090)
	c.rec("pread 4090+20: n=%d %s b3=%s", n, errName(err), b3Bytes(rb[:max(n, 0)])[:16])
	// Appending through write(2) after lseek to the end.
	_, err = unix.Seek(fd, 0, 2)
	c.rec("seek end: %s", errName(err))
	n, err = unix.Write(fd, []byte("tail"))
	c.rec("write tail: n=%d %s", n, errName(err))
	c.rec("fstat size=%d", c.fstat(fd).Size)
	c.recFile("file", c.path("f"))
	// O_APPEND opens go through a different flag path in the loopback.
	afd := c.open("f", unix.O_WRONLY|unix.O_APPEND)
	n, err = unix.Write(afd, []byte("appended"))
	c.rec("append: n=%d %s", n, errName(err))
	c.recFile("after append", c.path("f"))
}

func caseFsync(c *conf) {
	fd := c.open("f", unix.O_CREAT|unix.O_RDWR)
	c.pwrite(fd, bytes.Repeat([]byte{7}, 8192), 0)
	c.rec("fsync: %s", errName(unix.Fsync(fd)))
	c.rec("fdatasync: %s", errName(unix.Fdatasync(fd)))
	dfd := c.open("f", unix.O_RDWR|unix.O_DSYNC)
	c.pwrite(dfd, []byte("dsync"), 100)
	sfd := c.open("f", unix.O_RDWR|unix.O_SYNC)
	c.pwrite(sfd, []byte("sync"), 200)
	c.rec("fsync O_SYNC fd: %s", errName(unix.Fsync(sfd)))
	ro := c.open("f", unix.O_RDONLY)
	c.rec("fsync read-only fd: %s", errName(unix.Fsync(ro)))
	c.rec("syncfs: %s", errName(unix.Syncfs(fd)))
	c.recFile("file", c.path("f"))
}

func caseFallocate(c *conf) {
	fd := c.open("f", unix.O_CREAT|unix.O_RDWR)
	data := make([]byte, 1<<20)
	fillPattern(data, 0, 5)
	c.pwrite(fd, data, 0)
	if err := unix.Fsync(fd); err != nil {
		c.t.Fatal(err)
	}
	steps := []struct {
		name      string
		mode      uint32
		off, size int64
	}{
		{"mode0 beyond EOF", 0, 1 << 20, 1 << 20},
		{"KEEP_SIZE beyond EOF", unix.FALLOC_FL_KEEP_SIZE, 2 << 20, 1 << 20},
		{"PUNCH_HOLE aligned", unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE, 64 << 10, 128 << 10},
		{"PUNCH_HOLE unaligned", unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE, 400000, 10000},
		{"ZERO_RANGE inside", unix.FALLOC_FL_ZERO_RANGE, 512 << 10, 64 << 10},
		{"ZERO_RANGE unaligned", unix.FALLOC_FL_ZERO_RANGE, 700001, 5000},
		{"ZERO_RANGE beyond EOF", unix.FALLOC_FL_ZERO_RANGE, 2 << 20, 512 << 10},
		{"ZERO_RANGE|KEEP_SIZE beyond EOF", unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE, 3 << 20, 512 << 10},
		{"mode0 inside (no change)", 0, 0, 256 << 10},
	}
	for _, s := range steps {
		before := c.fstat(fd)
		err := unix.Fallocate(fd, s.mode, s.off, s.size)
		after := c.fstat(fd)
		// Exact st_blocks depend on the backing filesystem's allocator (a
		// ZERO_RANGE may or may not add an extent-tree block, run to run);
		// record only whether the allocation went down, which is what a
		// punch must do and the others must not.
		dir := "not decreased"
		if after.Blocks < before.Blocks {
			dir = "decreased"
		}
		c.rec("%s: %s size %d->%d blocks %s", s.name, errName(err), before.Size, after.Size, dir)
		c.recFile(s.name, c.path("f"))
	}
	// The punched range reads as zeros, the rest keeps its data.
	rb := make([]byte, 128<<10)
	n, err := unix.Pread(fd, rb, 64<<10)
	c.rec("read punched: n=%d %s zero=%v", n, errName(err), bytes.Count(rb, []byte{0}) == len(rb))
	// After a punch the allocation must really go down (not just zeros written).
	before := c.fstat(fd)
	err = unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, 1<<20)
	after := c.fstat(fd)
	c.rec("punch 1MiB: %s blocks decreased=%v", errName(err), after.Blocks < before.Blocks)
	if after.Blocks >= before.Blocks {
		c.t.Logf("st_blocks %d -> %d after punching 1 MiB", before.Blocks, after.Blocks)
	}
	// Unsupported modes are refused the same way.
	err = unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE, 0, 4096) // PUNCH_HOLE needs KEEP_SIZE
	c.rec("PUNCH_HOLE without KEEP_SIZE: %s", errName(err))
}

func caseTruncate(c *conf) {
	fd := c.open("f", unix.O_CREAT|unix.O_RDWR)
	data := make([]byte, 100000)
	fillPattern(data, 0, 6)
	c.pwrite(fd, data, 0)
	c.rec("ftruncate grow: %s", errName(unix.Ftruncate(fd, 1<<20)))
	c.recFile("after ftruncate grow", c.path("f"))
	c.rec("ftruncate shrink: %s", errName(unix.Ftruncate(fd, 5000)))
	c.recFile("after ftruncate shrink", c.path("f"))
	c.rec("truncate(2) grow: %s", errName(unix.Truncate(c.path("f"), 300000)))
	c.recFile("after truncate grow", c.path("f"))
	c.pwrite(fd, []byte("data-after-grow"), 200000)
	c.rec("truncate(2) shrink: %s", errName(unix.Truncate(c.path("f"), 4097)))
	c.recFile("after truncate shrink", c.path("f"))
	c.rec("fstat via old fd size=%d", c.fstat(fd).Size)
	// open(O_TRUNC) on an existing file: arrives as SETATTR with no handle.
	tfd, err := unix.Open(c.path("f"), unix.O_WRONLY|unix.O_TRUNC|unix.O_CLOEXEC, 0)
	c.rec("open O_TRUNC: %s", errName(err))
	if err == nil {
		c.recFile("after O_TRUNC", c.path("f"))
		n, err := unix.Write(tfd, []byte("new content"))
		c.rec("write after O_TRUNC: n=%d %s", n, errName(err))
		unix.Close(tfd)
	}
	c.recFile("final", c.path("f"))
	c.rec("truncate missing: %s", errName(unix.Truncate(c.path("missing"), 10)))
}

// seekMap walks SEEK_DATA/SEEK_HOLE from 0 to EOF.
func seekMap(fd int) string {
	var parts []string
	off := int64(0)
	for i := 0; i < 64; i++ {
		d, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if err != nil {
			parts = append(parts, "data:"+errName(err))
			break
		}
		h, err := unix.Seek(fd, d, unix.SEEK_HOLE)
		if err != nil {
			parts = append(parts, "hole:"+errName(err))
			break
		}
		parts = append(parts, fmt.Sprintf("[%d,%d)", d, h))
		off = h
	}
	return strings.Join(parts, " ")
}

func caseSparse(c *conf) {
	fd := c.open("f", unix.O_CREAT|unix.O_RDWR)
	if err := unix.Ftruncate(fd, 16<<20); err != nil {
		c.t.Fatal(err)
	}
	buf := make([]byte, 64<<10)
	for _, off := range []int64{1 << 20, 8 << 20, 16<<20 - 4096} {
		fillPattern(buf, off, 7)
		c.pwrite(fd, buf, off)
	}
	if err := unix.Fsync(fd); err != nil {
		c.t.Fatal(err)
	}
	c.rec("seek map: %s", seekMap(fd))
	_, err := unix.Seek(fd, 20<<20, unix.SEEK_DATA)
	c.rec("SEEK_DATA past EOF: %s", errName(err))
	h, err := unix.Seek(fd, 0, unix.SEEK_HOLE)
	c.rec("SEEK_HOLE at 0: %d %s", h, errName(err))
	st := c.fstat(fd)
	c.rec("sparse: size=%d allocated<size/4=%v", st.Size, st.Blocks*512 < st.Size/4)
	c.recFile("file", c.path("f"))
	// Punch one data extent: the map must follow.
	c.rec("punch: %s", errName(unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 8<<20, 64<<10)))
	c.rec("seek map after punch: %s", seekMap(fd))
}

func caseConcurrent(c *conf) {
	const writers = 8
	// Disjoint: each writer owns 256 KiB, written as 4 KiB blocks in random
	// order; writers 0-3 use O_DIRECT fds, 4-7 buffered fds.
	c.open("disjoint", unix.O_CREAT|unix.O_RDWR)
	var wg sync.WaitGroup
	errs := make([]error, 2*writers)
	for g := 0; g < writers; g++ {
		flags := unix.O_RDWR
		if g < 4 {
			flags |= unix.O_DIRECT
		}
		fd := c.open("disjoint", flags)
		buf := alignedBuf(c.t, blockSize)
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 1))
			for _, i := range rng.Perm(64) {
				off := int64(g)*(256<<10) + int64(i)*blockSize
				fillPattern(buf, off, 8)
				if _, err := unix.Pwrite(fd, buf, off); err != nil {
					errs[g] = err
					return
				}
			}
		}()
	}
	// Overlapping: random windows over the same 1 MiB; the content depends
	// only on the offset, so every interleaving yields the same file.
	c.open("overlap", unix.O_CREAT|unix.O_RDWR)
	for g := 0; g < writers; g++ {
		fd := c.open("overlap", unix.O_RDWR)
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 2))
			buf := make([]byte, 64<<10)
			for i := 0; i < 100; i++ {
				n := 1 + rng.IntN(len(buf))
				off := rng.Int64N(1<<20 - int64(n))
				fillPattern(buf[:n], off, 9)
				if _, err := unix.Pwrite(fd, buf[:n], off); err != nil {
					errs[writers+g] = err
					return
				}
			}
		}()
	}
	wg.Wait()
	for i, err := range errs {
		c.rec("writer %d: %s", i, errName(err))
	}
	c.recFile("disjoint", c.path("disjoint"))
	c.recFile("overlap", c.path("overlap"))
}

func ofdLock(fd int, typ int16, start int64) error {
	lk := unix.Flock_t{Type: typ, Whence: 0, Start: start, Len: 1}
	return unix.FcntlFlock(uintptr(fd), unix.F_OFD_SETLK, &lk)
}

func caseLocks(c *conf) {
	fd1 := c.open("f", unix.O_CREAT|unix.O_RDWR)
	c.pwrite(fd1, make([]byte, 4096), 0)
	fd2 := c.open("f", unix.O_RDWR)
	c.rec("fd1 wrlck 100: %s", errName(ofdLock(fd1, unix.F_WRLCK, 100)))
	c.rec("fd2 wrlck 100: %s", errName(ofdLock(fd2, unix.F_WRLCK, 100)))
	c.rec("fd2 rdlck 100: %s", errName(ofdLock(fd2, unix.F_RDLCK, 100)))
	lk := unix.Flock_t{Type: unix.F_WRLCK, Start: 100, Len: 1}
	err := unix.FcntlFlock(uintptr(fd2), unix.F_OFD_GETLK, &lk)
	c.rec("fd2 getlk 100: %s type=%d start=%d len=%d", errName(err), lk.Type, lk.Start, lk.Len)
	c.rec("fd2 wrlck 200: %s", errName(ofdLock(fd2, unix.F_WRLCK, 200)))
	c.rec("fd1 unlock 100: %s", errName(ofdLock(fd1, unix.F_UNLCK, 100)))
	c.rec("fd2 wrlck 100 after release: %s", errName(ofdLock(fd2, unix.F_WRLCK, 100)))
	c.rec("fd1 rdlck 300: %s", errName(ofdLock(fd1, unix.F_RDLCK, 300)))
	c.rec("fd2 rdlck 300 (shared): %s", errName(ofdLock(fd2, unix.F_RDLCK, 300)))
	c.rec("fd1 wrlck 200 (held by fd2): %s", errName(ofdLock(fd1, unix.F_WRLCK, 200)))
	// Closing fd2 releases its locks.
	unix.Close(fd2)
	c.rec("fd1 wrlck 200 after close: %s", errName(ofdLock(fd1, unix.F_WRLCK, 200)))
}

func caseNamespace(c *conf) {
	statLine := func(p string) string {
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return errName(err)
		}
		return fmt.Sprintf("type=%o perm=%o nlink=%d size=%d", st.Mode&unix.S_IFMT, st.Mode&0o7777, st.Nlink, st.Size)
	}
	old := unix.Umask(0o022)
	defer unix.Umask(old)
	if err := os.WriteFile(c.path("a"), []byte("aaaa"), 0o640); err != nil {
		c.t.Fatal(err)
	}
	if err := os.WriteFile(c.path("c"), []byte("cc"), 0o644); err != nil {
		c.t.Fatal(err)
	}
	c.rec("stat a: %s", statLine(c.path("a")))
	c.rec("rename a->b: %s", errName(unix.Rename(c.path("a"), c.path("b"))))
	c.rec("stat a: %s", statLine(c.path("a")))
	c.rec("stat b: %s", statLine(c.path("b")))
	c.recFile("b", c.path("b"))
	c.rec("rename b->c (replace): %s", errName(unix.Rename(c.path("b"), c.path("c"))))
	c.recFile("c", c.path("c"))
	c.rec("stat b: %s", statLine(c.path("b")))
	c.rec("chmod c 0600: %s", errName(unix.Chmod(c.path("c"), 0o600)))
	c.rec("stat c: %s", statLine(c.path("c")))
	c.rec("unlink c: %s", errName(unix.Unlink(c.path("c"))))
	c.rec("stat c: %s", statLine(c.path("c")))
	c.rec("unlink c again: %s", errName(unix.Unlink(c.path("c"))))
	sub := c.path("sub")
	c.rec("mkdir: %s", errName(unix.Mkdir(sub, 0o755)))
	c.rec("stat sub: %s", statLine(sub))
	c.rec("mkdir again: %s", errName(unix.Mkdir(sub, 0o755)))
	inner := filepath.Join(sub, "x.img")
	if err := os.WriteFile(inner, bytes.Repeat([]byte("x"), 10000), 0o644); err != nil {
		c.t.Fatal(err)
	}
	c.recFile("sub/x.img", inner)
	c.rec("stat sub/x.img: %s", statLine(inner))
	ents, err := os.ReadDir(sub)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	sort.Strings(names)
	c.rec("readdir sub: %v %s", names, errName(err))
	c.rec("rmdir non-empty: %s", errName(unix.Rmdir(sub)))
	c.rec("rename sub/x.img -> root: %s", errName(unix.Rename(inner, c.path("moved"))))
	c.recFile("moved", c.path("moved"))
	c.rec("rmdir empty: %s", errName(unix.Rmdir(sub)))
	c.rec("stat sub: %s", statLine(sub))
}

// TestConformance runs every case against a plain directory on /var/tmp and
// against a standin mount and requires identical observations.
func TestConformance(t *testing.T) {
	requireRoot(t)
	base := testDir(t)
	plain := filepath.Join(base, "plain")
	if err := os.MkdirAll(plain, 0o755); err != nil {
		t.Fatal(err)
	}
	store, mnt := filepath.Join(base, "store"), filepath.Join(base, "mnt")
	startDaemon(t, store, mnt)

	for _, cc := range confCases {
		t.Run(cc.name, func(t *testing.T) {
			var results [2][]string
			for i, dir := range []string{plain, mnt} {
				t.Run([]string{"plain", "standin"}[i], func(t *testing.T) {
					c := &conf{t: t, dir: dir, prefix: cc.name}
					cc.run(c)
					results[i] = c.lines
				})
			}
			if t.Failed() {
				return
			}
			if len(results[0]) == 0 {
				t.Fatal("case recorded nothing")
			}
			n := max(len(results[0]), len(results[1]))
			for i := 0; i < n; i++ {
				var p, m string
				if i < len(results[0]) {
					p = results[0][i]
				}
				if i < len(results[1]) {
					m = results[1][i]
				}
				if p != m {
					t.Errorf("differs:\n  plain:   %s\n  standin: %s", p, m)
				}
			}
		})
	}

	t.Run("status_after_cases", func(t *testing.T) {
		st := getStatus(t, store, false)
		if st.Mountpoint != mnt {
			t.Errorf("status mountpoint %q, want %q", st.Mountpoint, mnt)
		}
		var writes int64
		for _, im := range st.Images {
			writes += im.Writes
		}
		if writes == 0 {
			t.Errorf("status shows no writes after the conformance cases: %+v", st.Images)
		}
		for _, name := range []string{"odirect_1m-f", "fallocate-f", "concurrent_writers-overlap", "namespace-moved"} {
			im := mustImage(t, st, name)
			if im.ID == "" {
				t.Errorf("image %s has no id", name)
			}
			if im.Writes == 0 {
				t.Errorf("image %s: writes=0", name)
			}
			// The mount view, the backing file and the plain twin agree.
			hm := b3File(t, filepath.Join(mnt, name))
			if hb := b3File(t, filepath.Join(store, "images", name)); hb != hm {
				t.Errorf("%s: backing file b3 %s != mount view %s", name, hb, hm)
			}
			if hp := b3File(t, filepath.Join(plain, name)); hp != hm {
				t.Errorf("%s: plain b3 %s != mount %s", name, hp, hm)
			}
		}
		for _, gone := range []string{"namespace-a", "namespace-c"} {
			if _, ok := st.image(gone); ok {
				t.Errorf("status still lists removed image %s", gone)
			}
		}
	})

	t.Run("copy_file_range", func(t *testing.T) { testCopyFileRange(t, store, mnt) })
}

func testCopyFileRange(t *testing.T, store, mnt string) {
	src := make([]byte, 4<<20)
	fillPattern(src, 0, 10)
	if err := os.WriteFile(filepath.Join(mnt, "cfr-src"), src, 0o644); err != nil {
		t.Fatal(err)
	}
	in, err := os.Open(filepath.Join(mnt, "cfr-src"))
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(filepath.Join(mnt, "cfr-dst"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	const dstOff, length = 1 << 20, 2 << 20
	roff, woff := int64(0), int64(dstOff)
	copied := 0
	var cfrErr error
	for copied < length {
		n, err := unix.CopyFileRange(int(in.Fd()), &roff, int(out.Fd()), &woff, length-copied, 0)
		if err != nil {
			cfrErr = err
			break
		}
		if n == 0 {
			break
		}
		copied += n
	}
	if cfrErr != nil {
		// EXDEV/ENOSYS/EOPNOTSUPP: do what cp does, a read/write fallback.
		t.Logf("copy_file_range after %d bytes: %v; falling back to read+write", copied, cfrErr)
		if _, err := out.WriteAt(src[copied:length], int64(dstOff+copied)); err != nil {
			t.Fatal(err)
		}
	} else {
		t.Logf("copy_file_range copied %d bytes", copied)
	}
	got, err := os.ReadFile(filepath.Join(mnt, "cfr-dst"))
	if err != nil {
		t.Fatal(err)
	}
	want := append(make([]byte, dstOff), src[:length]...)
	if !bytes.Equal(got, want) {
		t.Fatalf("copy_file_range destination content wrong (len %d, want %d)", len(got), len(want))
	}
	if hb := b3File(t, filepath.Join(store, "images", "cfr-dst")); hb != b3Bytes(want) {
		t.Errorf("backing file of cfr-dst differs from what was copied")
	}
	im := mustImage(t, getStatus(t, store, true), "cfr-dst")
	dirty := dirtySet(t, im)
	var missing []int64
	for b := int64(dstOff / blockSize); b < (dstOff+length)/blockSize; b++ {
		if !dirty[b] {
			missing = append(missing, b)
		}
	}
	if len(missing) > 0 {
		t.Errorf("copy_file_range destination not tracked: %d of %d blocks missing from dirty_ranges (first %d)",
			len(missing), length/blockSize, missing[0])
	}
}

// TestPassthroughTracked writes 64 scattered blocks with pwrite through
// buffered and O_DIRECT fds and requires the tracker to have seen each one.
// With FUSE passthrough on, writes would bypass the daemon and this fails.
func TestPassthroughTracked(t *testing.T) {
	requireRoot(t)
	base := testDir(t)
	store, mnt := filepath.Join(base, "store"), filepath.Join(base, "mnt")
	startDaemon(t, store, mnt)

	const name, size, n = "pt.img", 256 << 20, 64
	p := filepath.Join(mnt, name)
	f, err := os.OpenFile(p, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	dfd, err := unix.Open(p, unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(dfd)
	before := mustImage(t, getStatus(t, store, false), name)

	buf := alignedBuf(t, blockSize)
	blocks := make([]int64, n)
	for i := range blocks {
		blocks[i] = int64(i)*(size/blockSize/n) + int64(i*37%211)
		fillPattern(buf, blocks[i]*blockSize, 11)
		fd := int(f.Fd())
		if i%2 == 1 {
			fd = dfd
		}
		if _, err := unix.Pwrite(fd, buf, blocks[i]*blockSize); err != nil {
			t.Fatalf("pwrite block %d: %v", blocks[i], err)
		}
	}
	im := mustImage(t, getStatus(t, store, true), name)
	dirty := dirtySet(t, im)
	var missing []int64
	for _, b := range blocks {
		if !dirty[b] {
			missing = append(missing, b)
		}
	}
	t.Logf("writes %d -> %d, dirty_blocks %d", before.Writes, im.Writes, im.DirtyBlocks)
	if len(missing) > 0 {
		t.Errorf("%d of %d written blocks not in dirty_ranges: %v (passthrough on, or writes untracked)", len(missing), n, missing)
	}
	if im.Writes-before.Writes < n {
		t.Errorf("tracker saw %d WRITE requests for %d pwrites (passthrough on?)", im.Writes-before.Writes, n)
	}
	// The data reached the backing file.
	back, err := os.Open(filepath.Join(store, "images", name))
	if err != nil {
		t.Fatal(err)
	}
	defer back.Close()
	rb := make([]byte, blockSize)
	for _, b := range blocks {
		if _, err := back.ReadAt(rb, b*blockSize); err != nil {
			t.Fatal(err)
		}
		fillPattern(buf, b*blockSize, 11)
		if !bytes.Equal(rb, buf) {
			t.Errorf("backing block %d does not hold the written data", b)
		}
	}
}
