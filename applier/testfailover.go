package applier

// Test failover, store side (docs/replica.md, "Test failover"): a writable
// copy-on-write image over a durably pinned recovery point. Nothing is copied
// at creation: reads of blocks the test never wrote fall through to the point
// (through the undo logs, like any point read), written blocks live in a
// sparse per-image delta file whose block bitmap says which blocks it holds.
//
//	RSTORE/failover-tests/ID/test.json      the record (written last at creation: its commit)
//	RSTORE/failover-tests/ID/IMAGEID.delta  sparse, image size; block b valid iff bit b is set
//	RSTORE/failover-tests/ID/IMAGEID.map    bitmap: bit b of little-endian u64 word b/64
//	RSTORE/failover-tests/ID/mnt/           default mount directory (the daemon mounts it)
//	RSTORE/groups/GROUP/pins.json           the durable pin "test:ID" of the point
//
// Ordering: creation pins the point (durable), then creates the files, then
// writes test.json; removal renames the directory to .ID.removing, deletes
// it, then drops the pin. CleanupTests (at daemon start) deletes directories
// without test.json and .removing ones, and drops pins whose test has no
// record, so a crash at any step leaves nothing behind after the next start.
//
// Durability of test writes: Sync (FSYNC on the mount) makes the delta
// durable first, then the changed pages of the bitmap. A bit is only ever
// set after the block it covers was written completely, so after a crash
// the image holds every write synced before, and each block is either its
// old or a newer whole content (like a disk).

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/bits"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/standin/standin/internal/format"
	"github.com/standin/standin/internal/fsutil"
)

const testsDir = "failover-tests"

// Errors of test failovers.
var (
	ErrNoTest    = errors.New("no such test failover")
	ErrBeyondEnd = errors.New("write beyond the end of the test image")
)

// TestFailover is the record of one test failover (test.json).
type TestFailover struct {
	ID        string          `json:"id"`
	Group     string          `json:"group"`
	Point     string          `json:"point"`
	PointTime time.Time       `json:"point_time"`
	Created   time.Time       `json:"created"`
	Mount     string          `json:"mount"`                   // directory where the images are exposed
	MountMade bool            `json:"mount_created,omitempty"` // the mount directory was created for the test (removed by stop)
	Images    []TestImageInfo `json:"images"`
	BootCheck *BootCheck      `json:"boot_check,omitempty"`
	// Who besides the daemon's user may use the mount (fusefs.Access):
	// allow_other, the files' group (0: the daemon's) and mode (0: 0600).
	AllowOther bool   `json:"allow_other,omitempty"`
	Gid        int    `json:"gid,omitempty"`
	Mode       uint32 `json:"mode,omitempty"`
}

// TestImageInfo is one image of a test failover.
type TestImageInfo struct {
	ID   string `json:"id"`
	File string `json:"file"` // file name in the mount
	Size int64  `json:"size"`
}

// BootCheck is the outcome of a test failover's boot check command.
type BootCheck struct {
	Command  string    `json:"command"`
	Started  time.Time `json:"started"`
	Seconds  float64   `json:"seconds"`
	ExitCode int       `json:"exit_code"` // -1: did not run or was killed
	TimedOut bool      `json:"timed_out,omitempty"`
	Passed   bool      `json:"passed"`
	Output   string    `json:"output"` // the last few KiB of stdout+stderr
	Error    string    `json:"error,omitempty"`
}

func (r *Replica) testsDir() string { return filepath.Join(r.dir, testsDir) }

// DefaultTestMount is where a test failover's images are mounted unless the
// caller names a directory.
func (r *Replica) DefaultTestMount(id string) string {
	return filepath.Join(r.testsDir(), id, "mnt")
}

// ResolvePoint resolves a point spec: "" or "latest", a point ID, or a time
// (RFC 3339, or "2006-01-02 15:04:05" / "2006-01-02T15:04:05" in local time):
// the newest point cut at or before that time, compared at the precision
// given (a time without fractional seconds matches every point of that
// second).
func (r *Replica) ResolvePoint(groupName, spec string) (Point, error) {
	ps, err := r.Points(groupName)
	if err != nil {
		return Point{}, err
	}
	if len(ps) == 0 {
		return Point{}, fmt.Errorf("group %s has no recovery point yet: %w", groupName, ErrNoPoint)
	}
	if spec == "" || spec == "latest" {
		return ps[len(ps)-1], nil
	}
	if _, ok := parsePointNumber(spec); ok {
		for _, p := range ps {
			if p.ID == spec {
				return p, nil
			}
		}
		return Point{}, fmt.Errorf("point %s of group %s (points: %s): %w", spec, groupName, pointList(ps), ErrNoPoint)
	}
	t, frac, err := parsePointTime(spec)
	if err != nil {
		return Point{}, fmt.Errorf("point %q: not latest, a point ID or a time (RFC 3339 or 2006-01-02 15:04:05): %w", spec, ErrBadName)
	}
	var found *Point
	for i, p := range ps {
		pt := p.Time
		if !frac {
			pt = pt.Truncate(time.Second)
		}
		if !pt.After(t) {
			found = &ps[i]
		}
	}
	if found == nil {
		return Point{}, fmt.Errorf("group %s has no point at or before %s (oldest: point %s at %s): %w",
			groupName, t.Format(time.RFC3339), ps[0].ID, ps[0].Time.UTC().Format(time.RFC3339), ErrNoPoint)
	}
	return *found, nil
}

func pointList(ps []Point) string {
	var s []string
	for _, p := range ps {
		s = append(s, p.ID)
	}
	return strings.Join(s, ",")
}

func parsePointTime(s string) (t time.Time, frac bool, err error) {
	for _, l := range []string{time.RFC3339Nano, "2006-01-02 15:04:05.999999999", "2006-01-02T15:04:05.999999999"} {
		if l == time.RFC3339Nano {
			t, err = time.Parse(l, s)
		} else {
			t, err = time.ParseInLocation(l, s, time.Local)
		}
		if err == nil {
			return t, t.Nanosecond() != 0 || strings.Contains(s, "."), nil
		}
	}
	return time.Time{}, false, err
}

// PlanTest resolves what a test failover of group at point would be, without
// changing anything: the point and the images (ID and Mount are left empty).
func (r *Replica) PlanTest(groupName, point string) (TestFailover, error) {
	p, err := r.ResolvePoint(groupName, point)
	if err != nil {
		return TestFailover{}, err
	}
	g, err := r.group(groupName)
	if err != nil {
		return TestFailover{}, err
	}
	n, _ := parsePointNumber(p.ID)
	g.mu.RLock()
	defer g.mu.RUnlock()
	if !g.hasPoint(n) {
		return TestFailover{}, fmt.Errorf("point %s of group %s: %w", p.ID, groupName, ErrNoPoint)
	}
	names := g.fileNames()
	tf := TestFailover{Group: groupName, Point: p.ID, PointTime: p.Time}
	for _, x := range g.imagesAt(n, p.Seqs) {
		tf.Images = append(tf.Images, TestImageInfo{ID: x.id, File: names[x.id], Size: int64(x.size)})
	}
	if len(tf.Images) == 0 {
		return TestFailover{}, fmt.Errorf("point %s of group %s has no image: %w", p.ID, groupName, ErrNoImage)
	}
	return tf, nil
}

func newTestID(group string) string {
	var b [4]byte
	rand.Read(b[:])
	id := group + "-" + hex.EncodeToString(b[:])
	if len(id) > MaxStoreName {
		id = "t-" + hex.EncodeToString(b[:])
	}
	return id
}

// CreateTest creates a test failover from a plan (PlanTest): it pins the
// point durably, creates an empty sparse delta and bitmap per image (O(1):
// nothing is copied) and writes the record. mount "" means DefaultTestMount.
// The images are opened with OpenTest.
func (r *Replica) CreateTest(plan TestFailover, mount string, mountMade bool) (tf TestFailover, err error) {
	g, err := r.group(plan.Group)
	if err != nil {
		return tf, err
	}
	tf = plan
	tf.ID = newTestID(plan.Group)
	tf.Created = time.Now().UTC()
	tf.Mount, tf.MountMade = mount, mountMade
	if mount == "" {
		tf.Mount, tf.MountMade = r.DefaultTestMount(tf.ID), true
	}
	owner := "test:" + tf.ID
	p, err := r.pinDurable(g, plan.Point, owner)
	if err != nil {
		return tf, err
	}
	if pointID(p.N) != plan.Point {
		r.unpinDurable(g, owner)
		return tf, fmt.Errorf("point %s moved", plan.Point)
	}
	dir := filepath.Join(r.testsDir(), tf.ID)
	defer func() {
		if err != nil {
			os.RemoveAll(dir)
			r.unpinDurable(g, owner)
		}
	}()
	if err = os.MkdirAll(r.testsDir(), 0o700); err != nil {
		return tf, err
	}
	if err = os.Mkdir(dir, 0o700); err != nil {
		return tf, err
	}
	for _, im := range tf.Images {
		if err = createSparse(filepath.Join(dir, im.ID+".delta"), im.Size); err != nil {
			return tf, err
		}
		if err = createSparse(filepath.Join(dir, im.ID+".map"), bitmapBytes(im.Size)); err != nil {
			return tf, err
		}
	}
	if err = fsutil.SyncDir(dir); err != nil {
		return tf, err
	}
	if err = fsutil.SyncDir(r.testsDir()); err != nil {
		return tf, err
	}
	if err = fsutil.WriteJSON(filepath.Join(dir, "test.json"), tf); err != nil {
		return tf, err
	}
	return tf, nil
}

func bitmapBytes(size int64) int64 {
	return int64((blocksOf(uint64(size)) + 63) / 64 * 8)
}

func createSparse(path string, size int64) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// Tests lists the test failovers (by creation time).
func (r *Replica) Tests() ([]TestFailover, error) {
	ents, err := os.ReadDir(r.testsDir())
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []TestFailover
	for _, e := range ents {
		if !e.IsDir() || !storeNameOK(e.Name()) {
			continue
		}
		var tf TestFailover
		if err := fsutil.ReadJSON(filepath.Join(r.testsDir(), e.Name(), "test.json"), &tf); err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				continue // being created or half-created (CleanupTests)
			}
			return nil, err
		}
		out = append(out, tf)
	}
	slices.SortFunc(out, func(a, b TestFailover) int { return a.Created.Compare(b.Created) })
	return out, nil
}

// Test returns one test failover's record.
func (r *Replica) Test(id string) (TestFailover, error) {
	var tf TestFailover
	if !storeNameOK(id) {
		return tf, fmt.Errorf("test failover %q: %w", id, ErrNoTest)
	}
	err := fsutil.ReadJSON(filepath.Join(r.testsDir(), id, "test.json"), &tf)
	if errors.Is(err, fs.ErrNotExist) {
		return tf, fmt.Errorf("test failover %q: %w", id, ErrNoTest)
	}
	return tf, err
}

// UpdateTest changes a test failover's record (durably).
func (r *Replica) UpdateTest(id string, f func(*TestFailover)) error {
	tf, err := r.Test(id)
	if err != nil {
		return err
	}
	f(&tf)
	tf.ID = id
	return fsutil.WriteJSON(filepath.Join(r.testsDir(), id, "test.json"), tf)
}

// RemoveTest deletes a test failover: its files, then its pin. The caller
// has unmounted it and closed its session. A mount directory below the test
// directory that is still a mount point makes it fail (nothing is deleted
// through a mount).
func (r *Replica) RemoveTest(id string) error {
	tf, err := r.Test(id)
	if err != nil {
		return err
	}
	dir := filepath.Join(r.testsDir(), id)
	if err := refuseMountsBelow(dir); err != nil {
		return err
	}
	gone := filepath.Join(r.testsDir(), "."+id+".removing")
	if err := os.Rename(dir, gone); err != nil {
		return err
	}
	if err := fsutil.SyncDir(r.testsDir()); err != nil {
		return err
	}
	if err := os.RemoveAll(gone); err != nil {
		return err
	}
	if g, err := r.group(tf.Group); err == nil {
		if err := r.unpinDurable(g, "test:"+id); err != nil {
			return err
		}
	}
	return nil
}

// refuseMountsBelow fails if a directory directly below dir is on another
// device than dir (a mount point).
func refuseMountsBelow(dir string) error {
	var st unix.Stat_t
	if err := unix.Lstat(dir, &st); err != nil {
		return err
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		var cst unix.Stat_t
		p := filepath.Join(dir, e.Name())
		if err := unix.Lstat(p, &cst); err != nil {
			return fmt.Errorf("%s: %w", p, err) // e.g. ENOTCONN of a dead FUSE mount
		}
		if cst.Dev != st.Dev {
			return fmt.Errorf("%s is still a mount point", p)
		}
	}
	return nil
}

// CleanupTests removes what an interrupted creation or removal left: test
// directories without a record, directories being removed, and durable pins
// of tests that have no record. It returns what it removed.
func (r *Replica) CleanupTests() ([]string, error) {
	var removed []string
	have := map[string]bool{}
	ents, err := os.ReadDir(r.testsDir())
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	for _, e := range ents {
		p := filepath.Join(r.testsDir(), e.Name())
		switch {
		case strings.HasPrefix(e.Name(), ".") && strings.HasSuffix(e.Name(), ".removing"):
		case e.IsDir() && storeNameOK(e.Name()):
			if fileExists(filepath.Join(p, "test.json")) {
				have[e.Name()] = true
				continue
			}
		default:
			continue
		}
		if err := refuseMountsBelow(p); err != nil {
			return removed, err
		}
		if err := os.RemoveAll(p); err != nil {
			return removed, err
		}
		removed = append(removed, "directory "+p)
	}
	for _, name := range r.Groups() {
		g, err := r.group(name)
		if err != nil {
			continue
		}
		owners, err := r.durableOwners(g)
		if err != nil {
			return removed, err
		}
		for _, o := range owners {
			id, ok := strings.CutPrefix(o, "test:")
			if ok && !have[id] {
				if err := r.unpinDurable(g, o); err != nil {
					return removed, err
				}
				removed = append(removed, "pin "+o+" of group "+name)
			}
		}
	}
	return removed, nil
}

// TestSession is an open test failover: its images, ready to be served.
type TestSession struct {
	Record TestFailover
	Images []*TestImage // in Record.Images order
}

// OpenTest opens a test failover's images.
func (r *Replica) OpenTest(id string) (*TestSession, error) {
	tf, err := r.Test(id)
	if err != nil {
		return nil, err
	}
	g, err := r.group(tf.Group)
	if err != nil {
		return nil, err
	}
	s := &TestSession{Record: tf}
	dir := filepath.Join(r.testsDir(), id)
	for _, info := range tf.Images {
		g.mu.RLock()
		pr, err := g.openPoint(tf.Point, info.ID)
		g.mu.RUnlock()
		if err == nil && pr.size != info.Size {
			err = fmt.Errorf("image %s is %d bytes at point %s, the test recorded %d", info.ID, pr.size, tf.Point, info.Size)
		}
		var ti *TestImage
		if err == nil {
			ti, err = openTestImage(pr, filepath.Join(dir, info.ID), info)
		}
		if err != nil {
			s.Close()
			return nil, fmt.Errorf("test failover %s: %w", id, err)
		}
		s.Images = append(s.Images, ti)
	}
	return s, nil
}

// Close syncs and closes every image.
func (s *TestSession) Close() error {
	var first error
	for _, ti := range s.Images {
		if err := ti.Close(); err != nil && first == nil {
			first = err
		}
	}
	s.Images = nil
	return first
}

// Written is the number of bytes the test has written (blocks in the deltas).
func (s *TestSession) Written() int64 {
	var n int64
	for _, ti := range s.Images {
		n += ti.Written()
	}
	return n
}

const (
	bs          = format.BlockSize
	bitmapPage  = 4096           // bytes of the bitmap file written at once
	wordsInPage = bitmapPage / 8 // u64 words per page
	readRun     = 256 * format.BlockSize
)

// TestImage is one writable copy-on-write image of a test failover.
type TestImage struct {
	Info  TestImageInfo
	src   *pointReader
	size  int64
	nb    uint64
	delta *os.File
	bm    *os.File

	words []uint64 // the bitmap; read with atomic loads, set under mu

	mu     sync.Mutex // writers and Sync
	dirty  map[int]bool
	closed bool
	tmp    []byte
}

func openTestImage(src *pointReader, base string, info TestImageInfo) (*TestImage, error) {
	ti := &TestImage{Info: info, src: src, size: src.size, nb: blocksOf(uint64(src.size)), dirty: map[int]bool{}, tmp: make([]byte, bs)}
	var err error
	if ti.delta, err = os.OpenFile(base+".delta", os.O_RDWR, 0); err != nil {
		return nil, err
	}
	if ti.bm, err = os.OpenFile(base+".map", os.O_RDWR, 0); err != nil {
		ti.delta.Close()
		return nil, err
	}
	raw := make([]byte, bitmapBytes(ti.size))
	if err := readFullAt(ti.bm, raw, 0); err != nil {
		ti.delta.Close()
		ti.bm.Close()
		return nil, err
	}
	ti.words = make([]uint64, len(raw)/8)
	for i := range ti.words {
		ti.words[i] = binary.LittleEndian.Uint64(raw[i*8:])
	}
	return ti, nil
}

// Size is the image size (fixed: a test image cannot be resized).
func (ti *TestImage) Size() int64 { return ti.size }

func (ti *TestImage) bit(b uint64) bool {
	return atomic.LoadUint64(&ti.words[b/64])&(1<<(b%64)) != 0
}

// setBits marks blocks [lo, hi) as held by the delta. Called with mu held,
// after their content was written.
func (ti *TestImage) setBits(lo, hi uint64) {
	for b := lo; b < hi; {
		w := b / 64
		end := min(hi, (w+1)*64)
		var mask uint64
		if end-b == 64 {
			mask = ^uint64(0)
		} else {
			mask = ((uint64(1) << (end - b)) - 1) << (b % 64)
		}
		if atomic.LoadUint64(&ti.words[w])&mask != mask {
			atomic.OrUint64(&ti.words[w], mask)
			ti.dirty[int(w/wordsInPage)] = true
		}
		b = end
	}
}

// Allocated estimates the image's non-hole bytes (for st_blocks): the
// point's estimate plus the blocks written by the test.
func (ti *TestImage) Allocated() int64 { return min(ti.size, ti.src.allocated()+ti.Written()) }

// Written is the number of bytes held in the delta.
func (ti *TestImage) Written() int64 {
	var n int
	for i := range ti.words {
		n += bits.OnesCount64(atomic.LoadUint64(&ti.words[i]))
	}
	return int64(n) * bs
}

// ReadAt reads the test image: written blocks from the delta, the others
// from the pinned point.
func (ti *TestImage) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, syscall.EINVAL
	}
	if off >= ti.size {
		return 0, io.EOF
	}
	want := len(p)
	if int64(want) > ti.size-off {
		p = p[:ti.size-off]
	}
	end := off + int64(len(p))
	lastBlock := uint64((end - 1) / bs)
	for pos := off; pos < end; {
		b := uint64(pos / bs)
		set := ti.bit(b)
		e := b + 1
		for e <= lastBlock && ti.bit(e) == set && int64(e-b)*bs < readRun {
			e++
		}
		runEnd := min(end, int64(e)*bs)
		seg := p[pos-off : runEnd-off]
		var err error
		if set {
			err = readFullAt(ti.delta, seg, pos)
		} else {
			_, err = ti.src.ReadAt(seg, pos)
		}
		if err != nil && !errors.Is(err, io.EOF) {
			return int(pos - off), err
		}
		pos = runEnd
	}
	if len(p) < want {
		return len(p), io.EOF
	}
	return len(p), nil
}

// WriteAt writes to the delta. A block written for the first time and only
// partly is completed with its content at the point first (read-modify-write).
func (ti *TestImage) WriteAt(p []byte, off int64) (int, error) {
	return ti.modify(off, int64(len(p)), p)
}

// Zero makes [off, off+n) read as zeros: whole blocks are punched out of the
// delta (it stays sparse), partial ones are written with zeros.
func (ti *TestImage) Zero(off, n int64) error {
	_, err := ti.modify(off, n, nil)
	return err
}

// modify writes data (nil: zeros) to [off, off+n).
func (ti *TestImage) modify(off, n int64, data []byte) (int, error) {
	if off < 0 || n < 0 {
		return 0, syscall.EINVAL
	}
	if n == 0 {
		return 0, nil
	}
	if off+n > ti.size {
		return 0, fmt.Errorf("%w (%d bytes at %d, image size %d)", ErrBeyondEnd, n, off, ti.size)
	}
	ti.mu.Lock()
	defer ti.mu.Unlock()
	if ti.closed {
		return 0, os.ErrClosed
	}
	end := off + n
	for pos := off; pos < end; {
		b := uint64(pos / bs)
		bStart := int64(b) * bs
		bEnd := min(bStart+bs, ti.size)
		// whole blocks from pos: up to end rounded down (or the image end)
		runEnd := end &^ (bs - 1)
		if end == ti.size {
			runEnd = end
		}
		if pos == bStart && runEnd > pos {
			var err error
			if data != nil {
				_, err = ti.delta.WriteAt(data[pos-off:runEnd-off], pos)
			} else {
				err = unix.Fallocate(int(ti.delta.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, pos, runEnd-pos)
			}
			if err != nil {
				return int(pos - off), err
			}
			ti.setBits(b, blocksOf(uint64(runEnd)))
			pos = runEnd
			continue
		}
		// a partial block
		k := min(bEnd, end) - pos
		var part []byte
		if data != nil {
			part = data[pos-off : pos-off+k]
		} else {
			part = make([]byte, k)
		}
		if ti.bit(b) {
			if _, err := ti.delta.WriteAt(part, pos); err != nil {
				return int(pos - off), err
			}
		} else {
			blk := ti.tmp[:bEnd-bStart]
			if _, err := ti.src.ReadAt(blk, bStart); err != nil && !errors.Is(err, io.EOF) {
				return int(pos - off), err
			}
			copy(blk[pos-bStart:], part)
			if _, err := ti.delta.WriteAt(blk, bStart); err != nil {
				return int(pos - off), err
			}
			ti.setBits(b, b+1)
		}
		pos += k
	}
	return int(n), nil
}

// Sync makes every write so far durable: the delta first, then the bitmap
// pages that changed.
func (ti *TestImage) Sync() error {
	ti.mu.Lock()
	defer ti.mu.Unlock()
	if ti.closed {
		return os.ErrClosed
	}
	return ti.sync()
}

func (ti *TestImage) sync() error {
	if err := unix.Fdatasync(int(ti.delta.Fd())); err != nil {
		return err
	}
	if len(ti.dirty) == 0 {
		return nil
	}
	pages := make([]int, 0, len(ti.dirty))
	for p := range ti.dirty {
		pages = append(pages, p)
	}
	slices.Sort(pages)
	buf := make([]byte, bitmapPage)
	for _, pg := range pages {
		w0 := pg * wordsInPage
		w1 := min(len(ti.words), w0+wordsInPage)
		for i := w0; i < w1; i++ {
			binary.LittleEndian.PutUint64(buf[(i-w0)*8:], atomic.LoadUint64(&ti.words[i]))
		}
		if _, err := ti.bm.WriteAt(buf[:(w1-w0)*8], int64(w0)*8); err != nil {
			return err
		}
	}
	if err := unix.Fdatasync(int(ti.bm.Fd())); err != nil {
		return err
	}
	clear(ti.dirty)
	return nil
}

// SeekData answers lseek(SEEK_DATA) (hole false) or lseek(SEEK_HOLE): blocks
// held by the delta and the data of the point are data (a superset of the
// non-zero blocks, which lseek allows).
func (ti *TestImage) SeekData(off int64, hole bool) (int64, error) {
	if off < 0 {
		return 0, syscall.EINVAL
	}
	if off >= ti.size {
		return 0, syscall.ENXIO
	}
	if !hole {
		best := ti.size
		if b, ok := ti.nextBit(uint64(off/bs), true); ok {
			best = max(int64(b)*bs, off)
		}
		if d, err := ti.src.seekData(off, false); err == nil {
			best = min(best, d)
		} else if !errors.Is(err, syscall.ENXIO) {
			return 0, err
		}
		if best >= ti.size {
			return 0, syscall.ENXIO
		}
		return best, nil
	}
	for pos := off; pos < ti.size; {
		h, err := ti.src.seekData(pos, true)
		if err != nil {
			return 0, err
		}
		if h >= ti.size {
			return ti.size, nil
		}
		b := uint64(h / bs)
		if !ti.bit(b) {
			return h, nil
		}
		nb, ok := ti.nextBit(b, false)
		if !ok {
			return ti.size, nil
		}
		pos = int64(nb) * bs
	}
	return ti.size, nil
}

// nextBit returns the first block ≥ b whose bit equals want.
func (ti *TestImage) nextBit(b uint64, want bool) (uint64, bool) {
	for b < ti.nb {
		w := atomic.LoadUint64(&ti.words[b/64])
		if !want {
			w = ^w
		}
		w >>= b % 64
		if w != 0 {
			r := b + uint64(bits.TrailingZeros64(w))
			return r, r < ti.nb
		}
		b = (b/64 + 1) * 64
	}
	return 0, false
}

// Close syncs and closes the image's files.
func (ti *TestImage) Close() error {
	ti.mu.Lock()
	defer ti.mu.Unlock()
	if ti.closed {
		return nil
	}
	err := ti.sync()
	ti.closed = true
	ti.delta.Close()
	ti.bm.Close()
	return err
}
