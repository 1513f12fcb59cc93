package tracker

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/RoaringBitmap/roaring/v2"
	"github.com/google/uuid"
	"golang.org/x/sys/unix"

	"github.com/standin/standin/internal/format"
	"github.com/standin/standin/internal/fsutil"
)

// Errors callers branch on.
var (
	ErrBusy       = errors.New("store is in use by another standin daemon")
	ErrNoImage    = errors.New("no such image")
	ErrTooLarge   = errors.New("image too large")
	ErrNotRegular = errors.New("not a regular file")
)

// Options tune a Store. The zero value means the documented defaults.
type Options struct {
	// ExtentBlocks is the write-intent extent size in 4 KiB blocks
	// (default 1024 = 4 MiB).
	ExtentBlocks int
	// CheckpointInterval bounds how long write-intent extents stay marked
	// (default 5 s); a crash re-sends at most the extents touched since.
	CheckpointInterval time.Duration
	// Compress stages cycle data zstd-compressed.
	Compress bool
	// StageDelay is a test hook: a pause per MiB staged.
	StageDelay time.Duration
	// Logger defaults to slog.Default().
	Logger *slog.Logger
}

// Store is the primary's tracking state for every image of one store
// directory:
//
//	STORE/images/   the image files served by the mount
//	STORE/state/ID/ meta.json, dirty (checkpointed dirty map), active
//	                (write-intent extents), clean (clean-shutdown flag)
//	STORE/cycles/ID/ staged cycle files
//	STORE/staging/  copy-before-write scratch files of cuts in progress
type Store struct {
	dir  string
	opts Options
	log  *slog.Logger
	lock *os.File

	cutMu sync.Mutex
	mu    sync.Mutex
	byID  map[uuid.UUID]*Image

	stop chan struct{}
	wg   sync.WaitGroup
}

const (
	xattrID = "user.standin.id" // "UUID/GENERATION" on every tracked backing file
)

// Open opens (creating if needed) the store at dir, takes its lock, recovers
// every image's tracking state and starts the periodic checkpointer.
func Open(dir string, opts Options) (*Store, error) {
	if opts.ExtentBlocks <= 0 {
		opts.ExtentBlocks = 1024
	}
	if opts.CheckpointInterval <= 0 {
		opts.CheckpointInterval = 5 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	s := &Store{dir: abs, opts: opts, log: opts.Logger, byID: map[uuid.UUID]*Image{}, stop: make(chan struct{})}
	// The store holds every image's data: only its owner may enter.
	if old, changed, err := fsutil.Tighten(abs); err != nil {
		return nil, fmt.Errorf("tracker: store %s: %w", abs, err)
	} else if changed {
		s.log.Warn("store was accessible to other users: group/other permissions removed", "store", abs, "old_mode", fmt.Sprintf("%04o", old), "new_mode", fmt.Sprintf("%04o", old&0o700))
	}
	for _, d := range []string{s.ImagesDir(), s.stateDir(), filepath.Join(abs, "cycles"), s.stagingDir()} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("tracker: store %s: %w", abs, err)
		}
	}
	s.lock, err = os.OpenFile(filepath.Join(abs, "lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(s.lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		s.lock.Close()
		return nil, fmt.Errorf("tracker: %s: %w (stop the other daemon first)", abs, ErrBusy)
	}
	// Scratch files of interrupted cuts are useless: their blocks are still
	// in the checkpointed dirty map or the active extents.
	if ents, err := os.ReadDir(s.stagingDir()); err == nil {
		for _, e := range ents {
			os.Remove(filepath.Join(s.stagingDir(), e.Name()))
		}
	}
	err = filepath.WalkDir(s.ImagesDir(), func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		rel, _ := filepath.Rel(s.ImagesDir(), p)
		_, err = s.Image(rel)
		return err
	})
	if err != nil {
		s.Close()
		return nil, err
	}
	s.removeOrphans()
	s.wg.Add(1)
	go s.checkpointer()
	return s, nil
}

// Dir returns the store directory.
func (s *Store) Dir() string { return s.dir }

// ImagesDir returns the directory whose tree the mount serves.
func (s *Store) ImagesDir() string { return filepath.Join(s.dir, "images") }

func (s *Store) stateDir() string             { return filepath.Join(s.dir, "state") }
func (s *Store) stagingDir() string           { return filepath.Join(s.dir, "staging") }
func (s *Store) cycleDir(id uuid.UUID) string { return filepath.Join(s.dir, "cycles", id.String()) }

// Image returns the tracking state of the image at rel (relative to the
// images directory), registering it if it is not tracked yet. An image
// registered with content gets a dirty map of all its allocated blocks, so its
// first cycle (seq 0, a base cycle) carries the whole image.
func (s *Store) Image(rel string) (*Image, error) {
	rel = filepath.Clean(rel)
	if rel == "." || strings.HasPrefix(rel, "..") || filepath.IsAbs(rel) {
		return nil, fmt.Errorf("tracker: image name %q: %w", rel, ErrNoImage)
	}
	p := filepath.Join(s.ImagesDir(), rel)
	s.mu.Lock()
	defer s.mu.Unlock()
	id, gen, hasID := readID(p)
	if hasID {
		if im := s.byID[id]; im != nil {
			im.mu.Lock()
			im.meta.Name = rel
			im.mu.Unlock()
			return im, nil
		}
	}
	return s.register(rel, p, id, gen, hasID)
}

func readID(p string) (uuid.UUID, uint64, bool) {
	buf := make([]byte, 64)
	n, err := unix.Getxattr(p, xattrID, buf)
	if err != nil {
		return uuid.Nil, 0, false
	}
	idStr, genStr, _ := strings.Cut(string(buf[:n]), "/")
	id, err := uuid.Parse(idStr)
	if err != nil {
		return uuid.Nil, 0, false
	}
	gen, _ := strconv.ParseUint(genStr, 10, 64)
	return id, gen, true
}

// register starts tracking the file at p. Called with s.mu held.
func (s *Store) register(rel, p string, id uuid.UUID, gen uint64, hasID bool) (*Image, error) {
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("tracker: open image %s: %w", rel, err)
	}
	st, err := f.Stat()
	if err != nil || !st.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("tracker: %s: %w", rel, ErrNotRegular)
	}
	im := &Image{s: s, f: f, dirty: roaring.New()}
	fail := func(err error) (*Image, error) {
		f.Close()
		if im.activeFile != nil {
			im.activeFile.Close()
		}
		return nil, fmt.Errorf("tracker: image %s: %w", rel, err)
	}
	if !hasID {
		id, gen = uuid.New(), 1
	}
	im.id = id
	im.dir = filepath.Join(s.stateDir(), id.String())
	_, statErr := os.Stat(filepath.Join(im.dir, "meta.json"))
	fresh := !hasID || errors.Is(statErr, fs.ErrNotExist)
	if fresh {
		if hasID {
			// Tracked before, but its tracking state is gone: nothing says
			// what the replica holds, so start a new generation whose base
			// cycle carries the whole image.
			gen++
			s.log.Warn("tracking state missing; starting a new generation with a full base cycle", "image", rel, "generation", gen)
		}
		im.meta = meta{ID: id.String(), Generation: gen, Name: rel}
		if im.dirty, err = allocatedBlocks(f, st.Size()); err != nil {
			return fail(err)
		}
		os.RemoveAll(im.dir)
		if err := os.MkdirAll(im.dir, 0o700); err != nil {
			return fail(err)
		}
		if err := im.saveMeta(); err != nil {
			return fail(err)
		}
		if im.activeFile, err = os.OpenFile(filepath.Join(im.dir, "active"), os.O_CREATE|os.O_RDWR, 0o600); err != nil {
			return fail(err)
		}
		if err := im.writeDirty(im.dirty.Clone()); err != nil {
			return fail(err)
		}
		// The identity goes on the image last: a crash before this leaves
		// an orphan state directory and the image is registered afresh.
		val := fmt.Sprintf("%s/%d", id, gen)
		if err := unix.Fsetxattr(int(f.Fd()), xattrID, []byte(val), 0); err != nil {
			return fail(fmt.Errorf("set %s (the backing filesystem must support user xattrs): %w", xattrID, err))
		}
		if err := f.Sync(); err != nil {
			return fail(err)
		}
	} else if err := im.recover(rel, st.Size()); err != nil {
		return fail(err)
	}
	s.byID[id] = im
	s.log.Info("tracking image", "image", rel, "id", id, "generation", im.meta.Generation,
		"dirty_blocks", im.dirty.GetCardinality(), "unclean", im.unclean)
	return im, nil
}

// recover loads an image's tracking state. After an unclean stop every block
// of every write-intent extent is added to the dirty map.
func (im *Image) recover(rel string, size int64) error {
	if err := fsutil.ReadJSON(filepath.Join(im.dir, "meta.json"), &im.meta); err != nil {
		return err
	}
	im.meta.Name = rel
	if err := im.loadFence(); err != nil {
		return err
	}
	var err error
	im.activeFile, err = os.OpenFile(filepath.Join(im.dir, "active"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return err
	}
	raw, err := os.ReadFile(im.activeFile.Name())
	if err != nil {
		return err
	}
	raw = raw[:len(raw)/8*8]
	onDisk := bitsFromBytes(raw)
	im.active = onDisk
	im.activeWords = len(onDisk)

	d, derr := readDirty(filepath.Join(im.dir, "dirty"))
	nblocks := (uint64(size) + BlockSize - 1) / BlockSize
	if derr != nil {
		// An unreadable checkpoint means the dirty map is unknown: every
		// allocated block may differ. (Hash-compare resync will shrink this.)
		im.s.log.Error("dirty map unreadable; marking the whole image dirty", "image", rel, "err", derr)
		d = roaring.New()
		d.AddRange(0, nblocks)
		im.unclean = true
		im.recovered = nblocks
	}
	im.dirty = d

	cleanPath := filepath.Join(im.dir, "clean")
	if _, err := os.Stat(cleanPath); err != nil {
		im.unclean = true
		eb := im.extentBlocks()
		before := im.dirty.GetCardinality()
		onDisk.each(func(e uint64) {
			if s := e * eb; s < nblocks {
				im.dirty.AddRange(s, min((e+1)*eb, nblocks))
			}
		})
		im.recovered += im.dirty.GetCardinality() - before
	}
	// From here on the store is live: the clean flag must be gone before the
	// first write can land.
	if err := os.Remove(cleanPath); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if err := fsutil.SyncDir(im.dir); err != nil {
		return err
	}
	// A cycle file may be durable although meta.json was not updated.
	if last, ok := lastCycle(im.s.cycleDir(im.id), im.meta.Generation); ok && last+1 > im.meta.NextSeq {
		im.meta.NextSeq = last + 1
	}
	// Remove partial cycle files of an interrupted staging.
	if tmps, _ := filepath.Glob(filepath.Join(im.s.cycleDir(im.id), "*.tmp")); len(tmps) > 0 {
		for _, t := range tmps {
			os.Remove(t)
		}
	}
	if err := im.saveMeta(); err != nil {
		return err
	}
	// Persist the recovered union and clear the intent marks (touched is
	// empty, so the checkpoint clears every extent).
	im.commitMu.Lock()
	defer im.commitMu.Unlock()
	return im.checkpointLocked()
}

func lastCycle(dir string, gen uint64) (uint64, bool) {
	matches, _ := filepath.Glob(filepath.Join(dir, fmt.Sprintf("g%06d-s*.cyc", gen)))
	var best uint64
	found := false
	for _, m := range matches {
		var g, seq uint64
		if _, err := fmt.Sscanf(filepath.Base(m), "g%06d-s%012d.cyc", &g, &seq); err == nil && g == gen {
			if !found || seq > best {
				best, found = seq, true
			}
		}
	}
	return best, found
}

// removeOrphans deletes the state of images that no longer exist (deleted
// through the mount before a crash, or before the identity xattr was set).
func (s *Store) removeOrphans() {
	ents, err := os.ReadDir(s.stateDir())
	if err != nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, e := range ents {
		id, err := uuid.Parse(e.Name())
		if err != nil || s.byID[id] != nil {
			continue
		}
		s.log.Info("removing tracking state of an image that no longer exists", "id", id)
		os.RemoveAll(filepath.Join(s.stateDir(), e.Name()))
	}
}

// resolve maps image names to images; nil or empty names mean every image.
func (s *Store) resolve(names []string) ([]*Image, error) {
	if len(names) == 0 {
		s.mu.Lock()
		defer s.mu.Unlock()
		var out []*Image
		for _, im := range s.byID {
			im.mu.Lock()
			rm := im.removed
			im.mu.Unlock()
			if !rm {
				out = append(out, im)
			}
		}
		if len(out) == 0 {
			return nil, fmt.Errorf("tracker: the store has no images: %w", ErrNoImage)
		}
		return out, nil
	}
	seen := map[*Image]bool{}
	var out []*Image
	for _, n := range names {
		p := filepath.Join(s.ImagesDir(), filepath.Clean("/"+n))
		if st, err := os.Stat(p); err != nil || !st.Mode().IsRegular() {
			return nil, fmt.Errorf("tracker: image %q: %w (names are paths relative to the mount)", n, ErrNoImage)
		}
		im, err := s.Image(strings.TrimPrefix(filepath.Clean("/"+n), "/"))
		if err != nil {
			return nil, err
		}
		if !seen[im] {
			seen[im] = true
			out = append(out, im)
		}
	}
	return out, nil
}

// Unlinking is called before rel is unlinked through the mount; done reports
// whether the unlink succeeded. The image stops being tracked once its last
// name is gone; its state is removed at the next clean shutdown.
func (s *Store) Unlinking(rel string) (done func(ok bool)) {
	p := filepath.Join(s.ImagesDir(), rel)
	id, _, ok := readID(p)
	if !ok {
		return func(bool) {}
	}
	return func(unlinked bool) {
		if !unlinked {
			return
		}
		var st unix.Stat_t
		s.mu.Lock()
		im := s.byID[id]
		s.mu.Unlock()
		if im == nil || (unix.Fstat(int(im.f.Fd()), &st) == nil && st.Nlink > 0) {
			return
		}
		im.mu.Lock()
		im.removed = true
		im.mu.Unlock()
		s.log.Info("image removed", "image", rel, "id", id)
	}
}

// Renamed updates the names of images at or under oldRel.
func (s *Store) Renamed(oldRel, newRel string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, im := range s.byID {
		im.mu.Lock()
		switch n := im.meta.Name; {
		case n == oldRel:
			im.meta.Name = newRel
		case strings.HasPrefix(n, oldRel+"/"):
			im.meta.Name = newRel + n[len(oldRel):]
		}
		im.mu.Unlock()
	}
}

// Status reports every image, sorted by name.
func (s *Store) Status(ranges bool) []Status {
	s.mu.Lock()
	imgs := make([]*Image, 0, len(s.byID))
	for _, im := range s.byID {
		imgs = append(imgs, im)
	}
	s.mu.Unlock()
	out := make([]Status, 0, len(imgs))
	for _, im := range imgs {
		if st := im.Status(ranges); !st.Removed {
			out = append(out, st)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

func (s *Store) checkpointer() {
	defer s.wg.Done()
	t := time.NewTicker(s.opts.CheckpointInterval)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
		}
		s.mu.Lock()
		imgs := make([]*Image, 0, len(s.byID))
		for _, im := range s.byID {
			imgs = append(imgs, im)
		}
		s.mu.Unlock()
		for _, im := range imgs {
			im.mu.Lock()
			idle := im.active.empty() // nothing written since the last checkpoint
			im.mu.Unlock()
			if idle {
				continue
			}
			if err := im.Checkpoint(); err != nil {
				s.log.Warn("periodic checkpoint", "image", im.Name(), "err", err)
			}
		}
	}
}

// Close shuts the store down cleanly: waits for a cut in progress, writes a
// final checkpoint and the clean flag of every image, releases the lock.
func (s *Store) Close() error {
	select {
	case <-s.stop:
	default:
		close(s.stop)
	}
	s.wg.Wait()
	s.cutMu.Lock()
	defer s.cutMu.Unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	var errs []error
	for id, im := range s.byID {
		errs = append(errs, im.close())
		delete(s.byID, id)
	}
	if s.lock != nil {
		errs = append(errs, s.lock.Close())
		s.lock = nil
	}
	return errors.Join(errs...)
}

// Cycles lists the staged cycle files of the store (of one image when name
// is not empty), reading their headers.
func Cycles(storeDir, name string) ([]CycleInfo, error) {
	files, err := filepath.Glob(filepath.Join(storeDir, "cycles", "*", "*.cyc"))
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat(filepath.Join(storeDir, "cycles")); err != nil {
		return nil, fmt.Errorf("%s is not a standin store (no cycles directory): %w", storeDir, err)
	}
	out := []CycleInfo{}
	for _, p := range files {
		info, err := ReadCycleInfo(p)
		if err != nil {
			return nil, err
		}
		if name != "" && info.Image != filepath.Clean(name) {
			continue
		}
		out = append(out, info)
	}
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if a.Image != b.Image {
			return a.Image < b.Image
		}
		if a.Generation != b.Generation {
			return a.Generation < b.Generation
		}
		return a.Seq < b.Seq
	})
	return out, nil
}

// ReadCycleInfo reads the header and footer of a cycle file (not its table
// or hashes; nothing is verified).
func ReadCycleInfo(p string) (CycleInfo, error) {
	f, err := os.Open(p)
	if err != nil {
		return CycleInfo{}, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return CycleInfo{}, err
	}
	h, ft, err := format.ReadInfo(f, st.Size())
	if err != nil {
		return CycleInfo{}, fmt.Errorf("%s: %w", p, err)
	}
	return cycleInfo(h, p, st.Size(), ft.DataBlocks, ft.ZeroBlocks), nil
}

// cycleInfo describes the cycle file at path with header h.
func cycleInfo(h format.Header, path string, bytes int64, data, zero uint64) CycleInfo {
	return CycleInfo{
		Image: h.Name, ID: uuid.UUID(h.ImageID).String(), Generation: h.Generation, Seq: h.Seq,
		Base: h.Base(), Path: path, Bytes: bytes, Time: h.CutTime, Size: h.ImageSize,
		DataBlocks: data, ZeroBlocks: zero, GroupCut: uuid.UUID(h.GroupCut).String(),
		AppConsistent: h.AppConsistent(),
	}
}

// fdatasync is a variable so a test can record the order of syncs.
var fdatasync = func(f *os.File) error { return unix.Fdatasync(int(f.Fd())) }

// statImage is a variable so a test can make the cut's stat of an image fail.
var statImage = (*os.File).Stat

// crashForTest drops the store as a kill -9 would: no checkpoint, no clean
// flag, descriptors closed, lock released.
func (s *Store) crashForTest() {
	select {
	case <-s.stop:
	default:
		close(s.stop)
	}
	s.wg.Wait()
	s.mu.Lock()
	defer s.mu.Unlock()
	for id, im := range s.byID {
		im.activeFile.Close()
		im.f.Close()
		delete(s.byID, id)
	}
	s.lock.Close()
	s.lock = nil
}
