package tracker

// Failover primitives of the primary side: fencing (no mutation reaches an
// image any more, durably), releasing an image to another owner, and adopting
// an image whose content a peer already holds.
//
//	STORE/state/ID/fenced   present while the image is fenced; one line: the reason

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"

	"github.com/RoaringBitmap/roaring/v2"
	"github.com/google/uuid"
	"golang.org/x/sys/unix"

	"github.com/standin/standin/internal/fsutil"
)

// ErrFenced wraps syscall.EROFS so fusefs maps it to EROFS without importing tracker.
var ErrFenced = fmt.Errorf("image is fenced: its replication group failed over to another host (%w)", syscall.EROFS)

// ErrOpenForWrite: Fence without force found the image open for writing through the mount.
var ErrOpenForWrite = errors.New("image is open for writing")

const fencedFile = "fenced"

// Fenced reports whether mutations of the image are refused (ErrFenced).
func (im *Image) Fenced() bool { return im.fenced.Load() }

// FencedReason returns the reason recorded ("" when not fenced).
func (im *Image) FencedReason() string {
	im.mu.Lock()
	defer im.mu.Unlock()
	if !im.fenced.Load() {
		return ""
	}
	return im.fenceReason
}

// Opened is called by the mount after a handle of the image was opened;
// write says whether it was opened for writing.
func (im *Image) Opened(write bool) {
	if write {
		im.writeOpens.Add(1)
	}
}

// Closed is called once for every Opened, when the handle is released.
func (im *Image) Closed(write bool) {
	if write {
		im.writeOpens.Add(-1)
	}
}

// WriteOpens returns how many handles are open for writing through the mount.
func (im *Image) WriteOpens() int { return int(im.writeOpens.Load()) }

// NextSeq returns the sequence number the next cut will take.
func (im *Image) NextSeq() uint64 {
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.meta.NextSeq
}

// loadFence restores the fence recorded in the state directory (recover).
func (im *Image) loadFence() error {
	b, err := os.ReadFile(filepath.Join(im.dir, fencedFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading the fence: %w", err)
	}
	im.mu.Lock()
	im.fenceReason = strings.TrimSpace(string(b))
	im.mu.Unlock()
	im.fenced.Store(true)
	im.s.log.Warn("image is fenced; writes are refused until it is unfenced", "image", im.meta.Name, "reason", im.fenceReason)
	return nil
}

func fenceLine(reason string) string {
	reason = strings.Join(strings.Fields(reason), " ")
	if reason == "" {
		reason = "fenced"
	}
	return reason
}

// Fence stops every mutation of the named images (names relative to the
// images directory) durably: the fence file of each image is written first,
// then each image's barrier is taken exclusively (in-flight mutations finish)
// and the image is marked fenced; from then on Begin and BeginResize return
// ErrFenced. Without force, an image open for writing through the mount
// makes Fence refuse (ErrOpenForWrite) and fence nothing. Cuts stay possible
// (a final cut of a planned failover). Fencing a fenced image updates the
// reason. The fence survives restarts.
func (s *Store) Fence(names []string, reason string, force bool) error {
	if len(names) == 0 {
		return fmt.Errorf("tracker: fence: no images named: %w", ErrNoImage)
	}
	imgs, err := s.resolve(names)
	if err != nil {
		return err
	}
	sort.Slice(imgs, func(i, j int) bool { return imgs[i].id.String() < imgs[j].id.String() })
	if !force {
		var open []string
		for _, im := range imgs {
			if n := im.WriteOpens(); n > 0 {
				open = append(open, fmt.Sprintf("%s (%d write handles)", im.Name(), n))
			}
		}
		if len(open) > 0 {
			return fmt.Errorf("tracker: fence: %s: %w (stop the VM first, or force)", strings.Join(open, ", "), ErrOpenForWrite)
		}
	}
	line := fenceLine(reason)
	var done []*Image
	var ferr error
	for _, im := range imgs {
		if err := fsutil.WriteFileAtomic(filepath.Join(im.dir, fencedFile), []byte(line+"\n"), 0o600); err != nil {
			ferr = fmt.Errorf("tracker: fence %s: %w", im.Name(), err)
			break
		}
		done = append(done, im)
	}
	// Images whose fence is durable are fenced in memory as well, even if a
	// later one failed: memory never lags the disk in the unsafe direction.
	lockBarriers(done)
	for _, im := range done {
		im.mu.Lock()
		im.fenceReason = line
		im.mu.Unlock()
		im.fenced.Store(true)
	}
	unlockBarriers(done)
	for _, im := range done {
		s.log.Warn("image fenced", "image", im.Name(), "id", im.id, "reason", line, "force", force)
	}
	return ferr
}

// Unfence removes the fence of the named images (the file durably first,
// then the in-memory flag).
func (s *Store) Unfence(names []string) error {
	if len(names) == 0 {
		return fmt.Errorf("tracker: unfence: no images named: %w", ErrNoImage)
	}
	imgs, err := s.resolve(names)
	if err != nil {
		return err
	}
	for _, im := range imgs {
		err := os.Remove(filepath.Join(im.dir, fencedFile))
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("tracker: unfence %s: %w", im.Name(), err)
		}
		if err := fsutil.SyncDir(im.dir); err != nil {
			return fmt.Errorf("tracker: unfence %s: %w", im.Name(), err)
		}
		im.mu.Lock()
		im.fenceReason = ""
		im.mu.Unlock()
		if im.fenced.Swap(false) {
			s.log.Info("image unfenced", "image", im.Name(), "id", im.id)
		}
	}
	return nil
}

// Release stops tracking the named image, which must be fenced, and moves its
// backing file to dst (os.Rename: an error wrapping syscall.EXDEV when dst is
// on another filesystem, and then nothing changed). Steps, crash-safe in this
// order: the rename, durable in both directories; the identity xattr removed
// from the file; the image's staged cycles (unshipped cycles are obsolete) and
// its tracking state removed; the image dropped. A crash after the rename
// leaves an orphan state directory, which the next Open removes. It returns
// the image's identity, generation and next sequence number.
func (s *Store) Release(name, dst string) (id uuid.UUID, gen, nextSeq uint64, err error) {
	if name == "" || dst == "" {
		return uuid.Nil, 0, 0, fmt.Errorf("tracker: release: image name and destination needed: %w", ErrNoImage)
	}
	s.cutMu.Lock() // no cut stages from the image while it moves
	defer s.cutMu.Unlock()
	imgs, err := s.resolve([]string{name})
	if err != nil {
		return uuid.Nil, 0, 0, err
	}
	im := imgs[0]
	src := filepath.Join(s.ImagesDir(), filepath.Clean("/"+name))
	fail := func(err error) (uuid.UUID, uint64, uint64, error) {
		return uuid.Nil, 0, 0, fmt.Errorf("tracker: release %s: %w", name, err)
	}
	if !im.Fenced() {
		return fail(errors.New("the image is not fenced (fence it first)"))
	}
	im.mu.Lock()
	seeding := im.stage != nil
	id, gen, nextSeq = im.id, im.meta.Generation, im.meta.NextSeq
	im.mu.Unlock()
	if seeding {
		return fail(ErrSeeding)
	}
	if dst, err = filepath.Abs(dst); err != nil {
		return fail(err)
	}
	if _, err := os.Lstat(dst); err == nil {
		return fail(fmt.Errorf("destination %s: %w", dst, fs.ErrExist))
	}

	im.barrier.Lock()
	defer im.barrier.Unlock()
	if err := os.Rename(src, dst); err != nil {
		return fail(err)
	}
	// Until the rename is durable a crash may bring the file back, so the
	// state (and its fence) must stay.
	if err := fsutil.SyncDir(filepath.Dir(src)); err != nil {
		return fail(err)
	}
	if err := fsutil.SyncDir(filepath.Dir(dst)); err != nil {
		return fail(err)
	}
	// im.f is the same inode, now at dst.
	if err := unix.Fremovexattr(int(im.f.Fd()), xattrID); err != nil && !errors.Is(err, unix.ENODATA) {
		return fail(fmt.Errorf("remove %s: %w", xattrID, err))
	}
	if err := im.f.Sync(); err != nil {
		return fail(err)
	}

	im.commitMu.Lock() // no checkpoint writes into the state being removed
	im.mu.Lock()
	im.released, im.removed = true, true
	im.mu.Unlock()
	var errs []error
	errs = append(errs, os.RemoveAll(s.cycleDir(id)), os.RemoveAll(im.dir))
	errs = append(errs, fsutil.SyncDir(filepath.Join(s.dir, "cycles")), fsutil.SyncDir(s.stateDir()))
	errs = append(errs, im.activeFile.Close(), im.f.Close())
	im.commitMu.Unlock()
	s.mu.Lock()
	delete(s.byID, id)
	s.mu.Unlock()
	s.log.Info("image released", "image", name, "id", id, "generation", gen, "next_seq", nextSeq, "to", dst)
	if err := errors.Join(errs...); err != nil {
		return id, gen, nextSeq, fmt.Errorf("tracker: release %s (released; cleaning up): %w", name, err)
	}
	return id, gen, nextSeq, nil
}

// Adopt starts tracking the file src (outside the images directory, on its
// filesystem) as images/name with the given identity: generation gen, next
// sequence nextSeq (≥ 1), an empty dirty map and no active extents. The
// caller guarantees that src holds exactly what the peer holds at seq
// nextSeq−1, so the next cut is a delta with parent nextSeq−1. The tracking
// state (with a clean marker, and the fence if fenced) is created first, then
// the identity xattr is set on src, then src is renamed into place: a crash
// before the rename leaves an orphan state directory (removed by the next
// Open), a crash after it an image that recovers cleanly. Adopt refuses
// (nothing changed) if images/name exists or the id is tracked already.
func (s *Store) Adopt(name, src string, id uuid.UUID, gen, nextSeq uint64, fenced bool) (*Image, error) {
	rel := filepath.Clean(name)
	if rel == "." || strings.HasPrefix(rel, "..") || filepath.IsAbs(rel) {
		return nil, fmt.Errorf("tracker: adopt: image name %q: %w", name, ErrNoImage)
	}
	fail := func(err error) (*Image, error) {
		return nil, fmt.Errorf("tracker: adopt %s: %w", rel, err)
	}
	switch {
	case id == uuid.Nil:
		return fail(errors.New("no image id"))
	case gen < 1:
		return fail(errors.New("generation must be at least 1"))
	case nextSeq < 1:
		return fail(errors.New("next sequence must be at least 1 (the replica holds seq next-1)"))
	}
	src, err := filepath.Abs(src)
	if err != nil {
		return fail(err)
	}
	if r, err := filepath.Rel(s.ImagesDir(), src); err == nil && r != ".." && !strings.HasPrefix(r, "../") {
		return fail(fmt.Errorf("%s is inside the images directory", src))
	}
	var sst, ist unix.Stat_t
	if err := unix.Stat(src, &sst); err != nil {
		return fail(err)
	}
	if sst.Mode&unix.S_IFMT != unix.S_IFREG {
		return fail(ErrNotRegular)
	}
	if err := unix.Stat(s.ImagesDir(), &ist); err != nil {
		return fail(err)
	}
	if sst.Dev != ist.Dev {
		return fail(fmt.Errorf("%s is on another filesystem than the store: %w", src, syscall.EXDEV))
	}
	p := filepath.Join(s.ImagesDir(), rel)

	s.mu.Lock()
	defer s.mu.Unlock()
	if _, err := os.Lstat(p); err == nil || !errors.Is(err, fs.ErrNotExist) {
		return fail(fmt.Errorf("%s: %w", p, fs.ErrExist))
	}
	if s.byID[id] != nil {
		return fail(fmt.Errorf("image id %s is tracked already", id))
	}

	// Untracked id: any state or staged cycles left under it (a release
	// interrupted by a crash) are stale and must not advance the sequence
	// or be shipped.
	tmp := &Image{s: s, id: id, dir: filepath.Join(s.stateDir(), id.String()),
		meta: meta{ID: id.String(), Generation: gen, NextSeq: nextSeq, Name: rel}}
	undo := func() {
		os.RemoveAll(tmp.dir)
		fsutil.SyncDir(s.stateDir())
		unix.Removexattr(src, xattrID)
	}
	if err := os.RemoveAll(s.cycleDir(id)); err != nil {
		return fail(err)
	}
	if err := os.RemoveAll(tmp.dir); err != nil {
		return fail(err)
	}
	if err := os.MkdirAll(tmp.dir, 0o700); err != nil {
		return fail(err)
	}
	err = func() error {
		if err := tmp.saveMeta(); err != nil {
			return err
		}
		if err := tmp.writeDirty(roaring.New()); err != nil {
			return err
		}
		af, err := os.OpenFile(filepath.Join(tmp.dir, "active"), os.O_CREATE|os.O_TRUNC|os.O_RDWR, 0o600)
		if err != nil {
			return err
		}
		if err := errors.Join(af.Sync(), af.Close()); err != nil {
			return err
		}
		if err := fsutil.WriteFileAtomic(filepath.Join(tmp.dir, "clean"), []byte("adopted\n"), 0o600); err != nil {
			return err
		}
		if fenced {
			if err := fsutil.WriteFileAtomic(filepath.Join(tmp.dir, fencedFile), []byte("adopted fenced\n"), 0o600); err != nil {
				return err
			}
		}
		if err := fsutil.SyncDir(s.stateDir()); err != nil {
			return err
		}
		f, err := os.OpenFile(src, os.O_RDWR, 0)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := unix.Fsetxattr(int(f.Fd()), xattrID, []byte(fmt.Sprintf("%s/%d", id, gen)), 0); err != nil {
			return fmt.Errorf("set %s (the backing filesystem must support user xattrs): %w", xattrID, err)
		}
		if err := f.Sync(); err != nil {
			return err
		}
		if err := mkdirsDurable(s.ImagesDir(), filepath.Dir(rel)); err != nil {
			return err
		}
		return os.Rename(src, p)
	}()
	if err != nil {
		undo()
		return fail(err)
	}
	if err := errors.Join(fsutil.SyncDir(filepath.Dir(p)), fsutil.SyncDir(filepath.Dir(src))); err != nil {
		return fail(err) // in place; the next Open recovers it
	}
	im, err := s.register(rel, p, id, gen, true)
	if err != nil {
		return fail(err)
	}
	s.log.Info("image adopted", "image", rel, "id", id, "generation", gen, "next_seq", nextSeq, "fenced", fenced)
	return im, nil
}

// mkdirsDurable creates the directories of rel under root, each durable in
// its parent.
func mkdirsDurable(root, rel string) error {
	if rel == "." || rel == "" {
		return nil
	}
	dir := root
	for _, part := range strings.Split(rel, string(filepath.Separator)) {
		next := filepath.Join(dir, part)
		err := os.Mkdir(next, 0o700)
		if err != nil && !errors.Is(err, fs.ErrExist) {
			return err
		}
		if err == nil {
			if err := fsutil.SyncDir(dir); err != nil {
				return err
			}
		}
		dir = next
	}
	return nil
}

// Changed returns a copy of the blocks changed since the last durable cycle
// (the dirty map and the blocks of a cut still being staged).
func (im *Image) Changed() *roaring.Bitmap {
	im.mu.Lock()
	defer im.mu.Unlock()
	b := im.dirty.Clone()
	if im.frozen != nil {
		b.Or(im.frozen)
	}
	return b
}

// MarkDirty adds blocks to the dirty map and checkpoints it, so the next cut
// carries them (a failback: blocks whose content differs on the replica).
// It returns once the checkpoint is durable.
func (im *Image) MarkDirty(blocks *roaring.Bitmap) error {
	if blocks.IsEmpty() {
		return nil
	}
	im.mu.Lock()
	im.dirty.Or(blocks)
	im.mu.Unlock()
	return im.Checkpoint()
}
