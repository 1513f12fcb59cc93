package tracker

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/RoaringBitmap/roaring/v2"
)

// syncLog records, in order, which files were fdatasynced.
type syncLog struct {
	mu    sync.Mutex
	names []string
}

func recordSyncs(t *testing.T) *syncLog {
	l := &syncLog{}
	orig := fdatasync
	fdatasync = func(f *os.File) error {
		l.mu.Lock()
		l.names = append(l.names, filepath.Base(f.Name()))
		l.mu.Unlock()
		return orig(f)
	}
	t.Cleanup(func() { fdatasync = orig })
	return l
}

func (l *syncLog) take() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := l.names
	l.names = nil
	return out
}

// openTracked makes a store with one image of size bytes, opens its backing
// file for writes through write(), and, with base, cuts its base cycle.
func openTracked(t *testing.T, size int64, base bool) (*Store, *Image, *os.File) {
	t.Helper()
	s, dir := newStore(t, Options{CheckpointInterval: time.Hour})
	p := createImage(t, dir, "a.img", size)
	im, err := s.Image("a.img")
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if base {
		if _, err := s.Cut(context.Background(), nil); err != nil { // base cycle
			t.Fatal(err)
		}
	}
	return s, im, f
}

func indexOf(s []string, v string) int {
	for i, x := range s {
		if x == v {
			return i
		}
	}
	return -1
}

// TestImageDurableBeforeDropped: ordering rule 6. A block written without
// fsync leaves the durable dirty map once its cycle is staged, and its
// write-intent extent retires at a later checkpoint; the image must be
// fdatasynced before the first of these, or a power cut leaves the primary
// with the old block, the replica with the new one and nothing dirty.
func TestImageDurableBeforeDropped(t *testing.T) {
	log := recordSyncs(t)
	s, im, f := openTracked(t, 64<<20, true)
	write(t, im, f, make([]byte, 8192), 20<<20)
	log.take()

	// The cut stages the block; its checkpoint drops it from the dirty map.
	if _, err := s.Cut(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	if got := log.take(); indexOf(got, "a.img") < 0 {
		t.Errorf("cut dropped the staged blocks from the durable dirty map without syncing the image (syncs: %v)", got)
	}
	if d, err := readDirty(filepath.Join(im.dir, "dirty")); err != nil || !d.IsEmpty() {
		t.Fatalf("dirty map after the cut: %v, %v; want empty", d, err)
	}

	// The cut's checkpoint kept the extent (touched in the last interval);
	// the next one retires it. The staged blocks are durable already, so it
	// needs no image sync of its own.
	if err := im.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	if got := log.take(); indexOf(got, "active") < 0 || indexOf(got, "a.img") >= 0 {
		t.Errorf("retiring checkpoint synced %v, want only the active file", got)
	}
	// Nothing dropped, nothing retiring: no sync at all.
	if err := im.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	if got := log.take(); len(got) != 0 {
		t.Errorf("idle checkpoint synced %v, want nothing", got)
	}
	if n := im.Status(false).ActiveExtents; n != 0 {
		t.Errorf("%d active extents after the cut's and an idle checkpoint, want 0", n)
	}
	// A shrink: the cut clips the blocks past the end out of the dirty
	// set; the image (its new size) is synced before they leave it.
	end, err := im.BeginResize(16 << 20)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(16 << 20); err != nil {
		t.Fatal(err)
	}
	end()
	log.take()
	if _, err := s.Cut(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	if got := log.take(); indexOf(got, "a.img") < 0 {
		t.Errorf("cut after a shrink dropped the blocks past the end without syncing the image (syncs: %v)", got)
	}
}

// TestSeedCommitSyncsImage: a committed seed drops the frozen blocks from the
// durable dirty map; the image is synced first.
func TestSeedCommitSyncsImage(t *testing.T) {
	log := recordSyncs(t)
	s, im, f := openTracked(t, 16<<20, false)
	write(t, im, f, make([]byte, 4096), 1<<20)
	sd, err := s.SeedCut(nil)
	if err != nil {
		t.Fatal(err)
	}
	log.take()
	if err := sd.Commit(); err != nil {
		t.Fatal(err)
	}
	if got := log.take(); indexOf(got, "a.img") < 0 {
		t.Errorf("seed commit dropped blocks from the durable dirty map without syncing the image (syncs: %v)", got)
	}
}

// TestConcurrentCheckpointWaitsForImageSync: while one checkpoint is still
// syncing the image for dropped blocks, another (the periodic one) must not
// write the dirty map without those blocks before an image sync completed.
func TestConcurrentCheckpointWaitsForImageSync(t *testing.T) {
	s, im, f := openTracked(t, 16<<20, true)
	write(t, im, f, make([]byte, 4096), 1<<20)

	var mu sync.Mutex
	completed := 0 // image syncs that returned
	first := true
	release := make(chan struct{})
	blocked := make(chan struct{})
	orig := fdatasync
	fdatasync = func(fl *os.File) error {
		if filepath.Base(fl.Name()) != "a.img" {
			return orig(fl)
		}
		mu.Lock()
		hold := first
		first = false
		mu.Unlock()
		if hold {
			close(blocked)
			<-release
		}
		err := orig(fl)
		mu.Lock()
		completed++
		mu.Unlock()
		return err
	}
	t.Cleanup(func() { fdatasync = orig })

	// The cut drops the block; its checkpoint's image sync hangs.
	cutDone := make(chan error, 1)
	go func() { _, err := s.Cut(context.Background(), nil); cutDone <- err }()
	<-blocked
	// A concurrent checkpoint must sync the image itself before it writes.
	if err := im.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	n := completed
	mu.Unlock()
	if n == 0 {
		t.Errorf("a checkpoint wrote the dirty map without the staged block while the image sync was still running")
	}
	if d, err := readDirty(filepath.Join(im.dir, "dirty")); err != nil || !d.IsEmpty() {
		t.Errorf("dirty map after the concurrent checkpoint: %v, %v; want empty", d, err)
	}
	close(release)
	if err := <-cutDone; err != nil {
		t.Fatal(err)
	}
}

// TestCutStatFailureKeepsDirty: when the cut cannot read an image's size, it
// fails and every dirty block stays dirty (a size read as 0 must not clip
// them away).
func TestCutStatFailureKeepsDirty(t *testing.T) {
	s, im, f := openTracked(t, 16<<20, true)
	write(t, im, f, make([]byte, 8192), 1<<20)
	want := blocksOf(im)

	orig := statImage
	statImage = func(fl *os.File) (os.FileInfo, error) {
		if filepath.Base(fl.Name()) == "a.img" {
			return nil, syscall.EIO
		}
		return orig(fl)
	}
	_, err := s.Cut(context.Background(), nil)
	statImage = orig
	if err == nil {
		t.Fatal("cut succeeded although the image's size could not be read")
	}
	if got := blocksOf(im); !got.Equals(want) {
		t.Fatalf("dirty after the failed cut: %v, want %v", got, want)
	}
	infos, err := s.Cut(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(infos) != 1 || infos[0].DataBlocks+infos[0].ZeroBlocks != 2 {
		t.Fatalf("next cut: %+v, want the 2 written blocks", infos)
	}
}

// TestImageSyncFailureSticky: a failed image fdatasync before a checkpoint is
// sticky. The kernel may have dropped the unwritten pages, so a later sync
// that succeeds proves nothing: writes are refused, and no checkpoint drops
// the blocks from the dirty map on disk, from which a restart recovers.
func TestImageSyncFailureSticky(t *testing.T) {
	s, im, f := openTracked(t, 16<<20, true)
	write(t, im, f, make([]byte, 8192), 1<<20)
	if err := im.Checkpoint(); err != nil { // the blocks reach the dirty map on disk
		t.Fatal(err)
	}
	want := blocksOf(im)
	onDisk := func(when string) {
		t.Helper()
		d, err := readDirty(filepath.Join(im.dir, "dirty"))
		if err != nil {
			t.Fatal(err)
		}
		if missing := roaring.AndNot(want, d); !missing.IsEmpty() {
			t.Errorf("%s: the dirty map on disk lost blocks %v", when, missing)
		}
	}

	orig := fdatasync
	fdatasync = func(fl *os.File) error {
		if filepath.Base(fl.Name()) == "a.img" {
			return syscall.EIO
		}
		return orig(fl)
	}
	t.Cleanup(func() { fdatasync = orig })
	// The cut stages the blocks; its checkpoint's image sync fails.
	if _, err := s.Cut(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	onDisk("after the failed sync")
	if _, err := im.BeginWrite(0, 4096); !errors.Is(err, syscall.EIO) {
		t.Errorf("write after the failed image sync: %v, want EIO", err)
	}
	if err := im.Sync(); !errors.Is(err, syscall.EIO) {
		t.Errorf("fsync after the failed image sync: %v, want EIO", err)
	}

	// A later sync succeeds: the error stays, the dirty map on disk too.
	fdatasync = orig
	if err := im.Checkpoint(); !errors.Is(err, syscall.EIO) {
		t.Errorf("checkpoint after the failed image sync: %v, want EIO", err)
	}
	onDisk("after a later checkpoint")
	if _, err := im.BeginWrite(0, 4096); !errors.Is(err, syscall.EIO) {
		t.Errorf("write after a later checkpoint: %v, want EIO", err)
	}
}

// TestCutSyncsImagesInParallel: the image fdatasyncs of a multi-image cut's
// checkpoints overlap instead of running one after another.
func TestCutSyncsImagesInParallel(t *testing.T) {
	s, dir := newStore(t, Options{CheckpointInterval: time.Hour})
	var ims []*Image
	var fs []*os.File
	for _, n := range []string{"a.img", "b.img"} {
		p := createImage(t, dir, n, 16<<20)
		im, err := s.Image(n)
		if err != nil {
			t.Fatal(err)
		}
		f, err := os.OpenFile(p, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		ims, fs = append(ims, im), append(fs, f)
	}
	if _, err := s.Cut(context.Background(), nil); err != nil { // base cycles
		t.Fatal(err)
	}
	for i, im := range ims {
		write(t, im, fs[i], make([]byte, 4096), 1<<20)
	}

	var wg sync.WaitGroup
	wg.Add(2)
	overlapped := make(chan struct{})
	go func() { wg.Wait(); close(overlapped) }()
	var mu sync.Mutex
	seen := map[string]bool{}
	orig := fdatasync
	fdatasync = func(fl *os.File) error {
		if n := filepath.Base(fl.Name()); n == "a.img" || n == "b.img" {
			mu.Lock()
			first := !seen[n]
			seen[n] = true
			mu.Unlock()
			if first {
				wg.Done()
				select {
				case <-overlapped:
				case <-time.After(5 * time.Second):
					t.Errorf("the sync of %s waited alone: the images sync one after another", n)
				}
			}
		}
		return orig(fl)
	}
	t.Cleanup(func() { fdatasync = orig })
	if _, err := s.Cut(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
}
