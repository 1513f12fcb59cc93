package tracker

// Lock order (never take a lock on the left while holding one on the right):
//
//	Store.cutMu → Image.barrier → Image.commitMu → Image.mu → Store.mu
//
// barrier: every mutation holds it shared from before its dirty mark until its
// backing operation returned; a cut holds it exclusively for a moment, so no
// mutation straddles a cut (I2).
// commitMu: serialises write-intent commits and checkpoints (both rewrite the
// on-disk active-extent file).
// mu: guards the in-memory maps; held only for short, bounded work (a
// copy-before-write of at most one request's range, or one 1 MiB staging read).

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/RoaringBitmap/roaring/v2"
	"github.com/google/uuid"
	"github.com/zeebo/blake3"

	"github.com/standin/standin/internal/fsutil"
)

// BlockSize is the tracking granularity: one dirty bit per 4 KiB block.
const BlockSize = 4096

// maxBlocks is what a 32-bit roaring bitmap can address: 16 TiB per image.
const maxBlocks = 1 << 32

// Op says what kind of change a mutation is; it only feeds counters.
type Op int

// Mutation kinds.
const (
	OpWrite Op = iota
	OpPunch
	OpZero
	OpAllocate
	OpCopy
)

// Image is the tracking state of one image file.
type Image struct {
	s   *Store
	id  uuid.UUID
	dir string   // STORE/state/<id>
	f   *os.File // backing image, read for staging and copy-before-write

	barrier  sync.RWMutex
	commitMu sync.Mutex
	mu       sync.Mutex

	// guarded by mu
	meta        meta
	dirty       *roaring.Bitmap // changed since the last cut
	frozen      *roaring.Bitmap // cut but not yet durable as a cycle file
	stage       *stage
	active      bits   // extents whose intent mark is durable on disk
	wanted      bits   // extents waiting for the next intent commit
	touched     bits   // extents touched since the last checkpoint snapshot
	unclean     bool   // started after a crash: active extents were added
	drops       uint64 // counts removals of blocks from dirty ∪ frozen (dropFrozenLocked, clipDirtyLocked)
	syncedDrops uint64 // the drops an image fdatasync completed after
	recovered   uint64
	lastErr     error
	removed     bool
	activeFile  *os.File
	activeWords int    // words currently written in activeFile
	fenceReason string // why the image is fenced (failover.go)
	released    bool   // handed over by Release: no checkpoints any more

	fenced     atomic.Bool  // set under the exclusive barrier: Begin* refuse (ErrFenced)
	writeOpens atomic.Int64 // write handles open through the mount

	writes, punches, zeroes, allocs, copies, resizes atomic.Uint64
	metaBytes                                        atomic.Int64 // bytes written for tracking state
	intentCommits                                    atomic.Uint64
}

type meta struct {
	ID             string    `json:"id"`
	Generation     uint64    `json:"generation"`
	NextSeq        uint64    `json:"next_seq"`
	Name           string    `json:"name"`
	LastCut        time.Time `json:"last_cut,omitzero"`
	LastCycleBytes int64     `json:"last_cycle_bytes"`
}

// ID returns the image's identity.
func (im *Image) ID() uuid.UUID { return im.id }

// Generation returns the image's generation (a new one starts when its
// tracking state was lost).
func (im *Image) Generation() uint64 {
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.meta.Generation
}

// Name returns the image's current path relative to the images directory.
func (im *Image) Name() string {
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.meta.Name
}

func (im *Image) extentBlocks() uint64 { return uint64(im.s.opts.ExtentBlocks) }

// Begin records that [off, off+n) of the image is about to change. It returns
// once the change is recorded: the blocks are in the dirty map, their
// write-intent extents are durable on disk, and, while a cut is being staged,
// the blocks' content at the cut has been saved. The caller performs the
// backing operation and then calls end. Begin must be called before the data
// can reach the backing file (I1).
func (im *Image) Begin(op Op, off, n int64) (end func(), err error) {
	im.barrier.RLock()
	if im.fenced.Load() {
		im.barrier.RUnlock()
		return nil, ErrFenced
	}
	if err := im.mark(off, n); err != nil {
		im.barrier.RUnlock()
		return nil, err
	}
	switch op {
	case OpWrite:
		im.writes.Add(1)
	case OpPunch:
		im.punches.Add(1)
	case OpZero:
		im.zeroes.Add(1)
	case OpAllocate:
		im.allocs.Add(1)
	case OpCopy:
		im.copies.Add(1)
	}
	return im.barrier.RUnlock, nil
}

// BeginResize records a size change to newSize. Shrinking marks the cut-off
// blocks dirty (they must read as zeros if the image grows again before the
// next cut); growing needs no mark (the new range reads as zeros on both
// sides). The cycle header carries the size at the cut.
func (im *Image) BeginResize(newSize int64) (end func(), err error) {
	im.barrier.RLock()
	if im.fenced.Load() {
		im.barrier.RUnlock()
		return nil, ErrFenced
	}
	st, err := im.f.Stat()
	if err != nil {
		im.barrier.RUnlock()
		return nil, err
	}
	if old := st.Size(); newSize < old {
		from := newSize / BlockSize * BlockSize // the partial last block changes too
		if err := im.mark(from, old-from); err != nil {
			im.barrier.RUnlock()
			return nil, err
		}
	}
	im.resizes.Add(1)
	return im.barrier.RUnlock, nil
}

// mark sets dirty bits and makes the write intent durable.
func (im *Image) mark(off, n int64) error {
	if n <= 0 || off < 0 {
		return nil
	}
	first := uint64(off) / BlockSize
	end := (uint64(off) + uint64(n) + BlockSize - 1) / BlockSize
	if end > maxBlocks {
		return fmt.Errorf("tracker: offset %d beyond the 16 TiB per image that standin tracks: %w", off+n, ErrTooLarge)
	}
	eb := im.extentBlocks()
	e0, e1 := first/eb, (end-1)/eb
	need := false
	im.mu.Lock()
	if im.lastErr != nil {
		err := im.lastErr
		im.mu.Unlock()
		return err
	}
	im.dirty.AddRange(first, end)
	if im.stage != nil {
		im.stage.saveOld(im, first, end)
	}
	for e := e0; e <= e1; e++ {
		im.touched.set(e)
		if !im.active.has(e) {
			im.wanted.set(e)
			need = true
		}
	}
	im.mu.Unlock()
	if need {
		return im.commitIntent(e0, e1)
	}
	return nil
}

// commitIntent makes the extents [e0, e1] durable in the active-extent file.
// Concurrent callers are group-committed: whoever gets commitMu writes every
// extent wanted so far, and later callers find theirs already active.
func (im *Image) commitIntent(e0, e1 uint64) error {
	im.commitMu.Lock()
	defer im.commitMu.Unlock()
	im.mu.Lock()
	done := true
	for e := e0; e <= e1; e++ {
		if !im.active.has(e) {
			done = false
			break
		}
	}
	if done {
		im.mu.Unlock()
		return nil
	}
	batch := im.wanted
	im.wanted = nil
	next := im.active.clone()
	next.or(batch)
	im.mu.Unlock()

	err := im.writeActive(next, batch)
	im.mu.Lock()
	defer im.mu.Unlock()
	if err != nil {
		im.wanted.or(batch)
		im.setErrLocked(fmt.Errorf("tracker: write-intent for %s: %w", im.meta.Name, err))
		return im.lastErr
	}
	im.active.or(batch)
	im.intentCommits.Add(1)
	return nil
}

const activePage = 4096 // bytes of the active file rewritten per changed page

// writeActive writes the pages of the active file that hold a set bit of
// changed (or every page that differs, when changed is nil) from next, then
// fdatasyncs. Called with commitMu held.
func (im *Image) writeActive(next, changed bits) error {
	const wordsPerPage = activePage / 8
	words := max(len(next), im.activeWords)
	for p := 0; p*wordsPerPage < words; p++ {
		w0, w1 := p*wordsPerPage, min((p+1)*wordsPerPage, words)
		dirty := false
		for w := w0; w < w1; w++ {
			if changed.word(w) != 0 {
				dirty = true
				break
			}
		}
		if !dirty {
			continue
		}
		buf := next.bytesOf(w0, w1)
		if _, err := im.activeFile.WriteAt(buf, int64(w0*8)); err != nil {
			return err
		}
		im.metaBytes.Add(int64(len(buf)))
	}
	im.activeWords = words
	return fdatasync(im.activeFile)
}

// Sync is called on FSYNC after the backing file was synced. Write intents are
// durable before every write (so the tracking state never lags the data); a
// sticky tracking error is reported here as well, so the guest sees EIO.
func (im *Image) Sync() error {
	im.mu.Lock()
	defer im.mu.Unlock()
	return im.lastErr
}

func (im *Image) setErrLocked(err error) {
	if im.lastErr == nil {
		im.lastErr = err
		im.s.log.Error("tracking failed; image refuses writes until restart", "image", im.meta.Name, "err", err)
	}
}

// Checkpoint persists the dirty map (dirty ∪ frozen) and then clears the
// write-intent marks of extents not touched since the snapshot. After a crash,
// dirty = checkpoint ∪ active extents, which covers every block written since
// the last durable cycle (I1).
func (im *Image) Checkpoint() error {
	// The image's writeback (rule 6) runs before commitMu is taken, so
	// writes that need an intent commit meanwhile do not wait for it;
	// checkpointLocked syncs again only if blocks were dropped since.
	if err := im.syncIfDropped(); err != nil {
		return err
	}
	im.commitMu.Lock()
	defer im.commitMu.Unlock()
	return im.checkpointLocked()
}

// dropFrozenLocked ends a stage whose frozen blocks are now durable elsewhere
// (a staged cycle file, a committed seed): they leave dirty ∪ frozen.
// dropFrozenLocked and clipDirtyLocked are the only ways blocks leave
// dirty ∪ frozen: each counts the drop, so the next checkpoint fdatasyncs the
// image before the dirty map on disk loses them (ordering rule 6). Called
// with mu held.
func (im *Image) dropFrozenLocked() {
	if im.frozen != nil && !im.frozen.IsEmpty() {
		im.drops++
	}
	im.frozen, im.stage = nil, nil
}

// clipDirtyLocked drops the dirty blocks from nblocks on (past a shrunken
// end of the image); see dropFrozenLocked. Called with mu held.
func (im *Image) clipDirtyLocked(nblocks uint64) {
	if nblocks < maxBlocks && im.dirty.IntersectsWithInterval(nblocks, maxBlocks) {
		im.dirty.RemoveRange(nblocks, maxBlocks)
		im.drops++
	}
}

// syncIfDropped fdatasyncs the image if blocks left dirty ∪ frozen since its
// last sync.
func (im *Image) syncIfDropped() error {
	im.mu.Lock()
	g, done, failed := im.drops, im.syncedDrops, im.lastErr
	im.mu.Unlock()
	if failed != nil {
		return failed // checkpointLocked writes nothing either
	}
	if g == done {
		return nil
	}
	return im.syncImage(g)
}

func (im *Image) checkpointLocked() error {
	im.mu.Lock()
	if im.released {
		im.mu.Unlock()
		return nil
	}
	if err := im.lastErr; err != nil {
		// Sticky: after a failed image fdatasync a later one may succeed
		// although the kernel dropped the unwritten pages, so the sets on
		// disk stay as they are until a restart recovers from them.
		im.mu.Unlock()
		return err
	}
	snap := im.dirty.Clone()
	if im.frozen != nil {
		snap.Or(im.frozen)
	}
	// Extents touched in the interval before this snapshot stay active one
	// more interval (hysteresis): a workload that keeps rewriting the same
	// extents, e.g. a sequential writer wrapping around, pays no intent
	// fdatasync after its first pass. An extent is cleared once it was not
	// touched for a whole interval.
	recent := im.touched
	im.touched = nil
	drops, synced := im.drops, im.syncedDrops
	im.mu.Unlock()

	// Ordering rule 6 (docs/design.md): a block leaves the durable recovery
	// sets only after its data is durable in the image. A block whose data
	// may not be durable is in dirty ∪ frozen, or it was dropped from there
	// (a staged cut, a committed seed, a cut clipping blocks past the end),
	// which counted in drops; syncedDrops says which drops an image sync
	// completed after (a concurrent Checkpoint may still be syncing). So if
	// they are equal, every block outside snap is durable, and so is every
	// block of an extent that retires below; if not, one fdatasync here
	// covers the dropped blocks, whose writes finished before the cut that
	// dropped them, before this snapshot.
	if drops != synced {
		if err := im.syncImage(drops); err != nil {
			return err
		}
	}
	if err := im.writeDirty(snap); err != nil {
		return fmt.Errorf("tracker: checkpoint of %s: %w", im.Name(), err)
	}

	im.mu.Lock()
	keep := im.touched.clone()
	keep.or(recent)
	next := keep.and(im.active)
	if sameBits(next, im.active) {
		im.mu.Unlock()
		return nil // nothing retires: the active file on disk holds exactly im.active
	}
	changed := im.active.clone() // every word that may change
	im.active = next
	im.mu.Unlock()
	return im.writeActive(next, changed)
}

// syncImage makes the image's data durable (fdatasync) before a checkpoint
// drops blocks from the recovery sets. A failure is sticky: after a failed
// fdatasync the kernel may have dropped the unwritten pages, so the image
// refuses writes and checkpoints until a restart recovers from the unchanged
// sets on disk.
func (im *Image) syncImage(drops uint64) error {
	err := fdatasync(im.f)
	im.mu.Lock()
	defer im.mu.Unlock()
	if err != nil {
		im.setErrLocked(fmt.Errorf("tracker: syncing image %s before a checkpoint: %w", im.meta.Name, err))
		return im.lastErr
	}
	im.syncedDrops = max(im.syncedDrops, drops)
	return nil
}

// sameBits reports whether a and b have the same set bits.
func sameBits(a, b bits) bool {
	for i := 0; i < max(len(a), len(b)); i++ {
		if a.word(i) != b.word(i) {
			return false
		}
	}
	return true
}

// dirty file: magic, u64 length, roaring bytes, BLAKE3-256 of what precedes.
var dirtyMagic = []byte("STDIRTY1")

func (im *Image) writeDirty(b *roaring.Bitmap) error {
	b.RunOptimize()
	var buf bytes.Buffer
	buf.Write(dirtyMagic)
	var n [8]byte
	binary.LittleEndian.PutUint64(n[:], b.GetSerializedSizeInBytes())
	buf.Write(n[:])
	if _, err := b.WriteTo(&buf); err != nil {
		return err
	}
	sum := blake3.Sum256(buf.Bytes())
	buf.Write(sum[:])
	im.metaBytes.Add(int64(buf.Len()))
	return fsutil.WriteFileAtomic(filepath.Join(im.dir, "dirty"), buf.Bytes(), 0o600)
}

func readDirty(path string) (*roaring.Bitmap, error) {
	p, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	if len(p) < len(dirtyMagic)+8+32 || !bytes.Equal(p[:8], dirtyMagic) {
		return nil, fmt.Errorf("%s: not a standin dirty map", path)
	}
	body, sum := p[:len(p)-32], p[len(p)-32:]
	if got := blake3.Sum256(body); !bytes.Equal(got[:], sum) {
		return nil, fmt.Errorf("%s: checksum mismatch", path)
	}
	n := binary.LittleEndian.Uint64(body[8:16])
	if n != uint64(len(body)-16) {
		return nil, fmt.Errorf("%s: length field %d, have %d bytes", path, n, len(body)-16)
	}
	b, err := DecodeBlocks(body[16:])
	if err != nil {
		return nil, fmt.Errorf("%s: dirty map: %w", path, err)
	}
	return b, nil
}

// DecodeBlocks decodes a serialized roaring bitmap of blocks from untrusted
// bytes (a dirty map, a failover's candidate blocks). The bitmap is copied
// out of p and checked for consistency: ReadFrom takes inconsistent
// containers (e.g. unsorted) that would panic when used later.
func DecodeBlocks(p []byte) (*roaring.Bitmap, error) {
	b := roaring.New()
	if _, err := b.ReadFrom(bytes.NewReader(p)); err != nil {
		return nil, err
	}
	if err := b.Validate(); err != nil {
		return nil, fmt.Errorf("inconsistent bitmap: %w", err)
	}
	return b, nil
}

func (im *Image) saveMeta() error {
	im.mu.Lock()
	m := im.meta
	im.mu.Unlock()
	return fsutil.WriteJSON(filepath.Join(im.dir, "meta.json"), m)
}

// size returns the backing file's size.
func (im *Image) size() (int64, error) {
	st, err := statImage(im.f)
	if err != nil {
		return 0, err
	}
	return st.Size(), nil
}

// close shuts the image down cleanly: a final checkpoint, then the clean flag.
func (im *Image) close() error {
	var errs []error
	im.commitMu.Lock()
	if err := im.checkpointLocked(); err != nil {
		errs = append(errs, err)
	}
	im.commitMu.Unlock()
	im.mu.Lock()
	removed, failed := im.removed, im.lastErr != nil
	drops, synced := im.drops, im.syncedDrops
	im.mu.Unlock()
	if !removed && len(errs) == 0 && !failed && drops != synced {
		// The clean flag makes recovery ignore the active extents: every
		// block dropped from dirty ∪ frozen must be durable first (rule
		// 6). The checkpoint above synced for the drops it saw; this
		// covers one that came since. Every other block is in the dirty
		// map the checkpoint wrote.
		if err := im.syncImage(drops); err != nil {
			errs = append(errs, err)
		}
	}
	switch {
	case removed:
		errs = append(errs, os.RemoveAll(im.dir))
	case len(errs) == 0 && !failed:
		if err := fsutil.WriteFileAtomic(filepath.Join(im.dir, "clean"), []byte("clean shutdown\n"), 0o600); err != nil {
			errs = append(errs, err)
		}
	}
	errs = append(errs, im.activeFile.Close(), im.f.Close())
	return errors.Join(errs...)
}

// Status is the daemon's view of one image.
type Status struct {
	Name            string      `json:"name"`
	ID              string      `json:"id"`
	Generation      uint64      `json:"generation"`
	Size            int64       `json:"size"`
	DirtyBlocks     uint64      `json:"dirty_blocks"`
	DirtyBytes      uint64      `json:"dirty_bytes"`
	StagingBlocks   uint64      `json:"staging_blocks"`
	NextSeq         uint64      `json:"next_seq"`
	LastCut         *time.Time  `json:"last_cut,omitempty"`
	LastCycleBytes  int64       `json:"last_cycle_bytes"`
	Writes          uint64      `json:"writes"`
	Punches         uint64      `json:"punches"`
	Zeroes          uint64      `json:"zeroes"`
	Allocates       uint64      `json:"allocates"`
	Resizes         uint64      `json:"resizes"`
	ActiveExtents   int         `json:"active_extents"`
	IntentCommits   uint64      `json:"intent_commits"`
	TrackingBytes   int64       `json:"tracking_bytes_written"`
	MemoryBytes     uint64      `json:"memory_bytes"`
	UncleanRecovery bool        `json:"unclean_recovery"`
	RecoveredBlocks uint64      `json:"recovered_blocks"`
	Removed         bool        `json:"removed,omitempty"`
	Fenced          bool        `json:"fenced"`
	FencedReason    string      `json:"fenced_reason,omitempty"`
	Health          string      `json:"health"`
	Reasons         []string    `json:"reasons,omitempty"`
	DirtyRanges     [][2]uint64 `json:"dirty_ranges,omitempty"`
}

// Status reports the image; with ranges, the dirty block ranges (dirty ∪
// frozen) as [start, count] pairs.
func (im *Image) Status(ranges bool) Status {
	size, _ := im.size()
	im.mu.Lock()
	defer im.mu.Unlock()
	all := im.dirty
	var staging uint64
	if im.frozen != nil {
		all = roaring.Or(im.dirty, im.frozen)
		staging = im.frozen.GetCardinality()
	}
	st := Status{
		Name: im.meta.Name, ID: im.id.String(), Generation: im.meta.Generation, Size: size,
		DirtyBlocks: all.GetCardinality(), StagingBlocks: staging, NextSeq: im.meta.NextSeq,
		LastCycleBytes: im.meta.LastCycleBytes,
		Writes:         im.writes.Load(), Punches: im.punches.Load(), Zeroes: im.zeroes.Load(),
		Allocates: im.allocs.Load(), Resizes: im.resizes.Load(),
		ActiveExtents: im.active.count(), IntentCommits: im.intentCommits.Load(),
		TrackingBytes: im.metaBytes.Load(), MemoryBytes: im.dirty.GetSizeInBytes(),
		UncleanRecovery: im.unclean, RecoveredBlocks: im.recovered, Removed: im.removed,
		Fenced: im.fenced.Load(), FencedReason: im.fenceReason,
		Health: "ok",
	}
	st.DirtyBytes = st.DirtyBlocks * BlockSize
	if !im.meta.LastCut.IsZero() {
		t := im.meta.LastCut
		st.LastCut = &t
	}
	if im.unclean {
		st.Health = "warning"
		st.Reasons = append(st.Reasons, fmt.Sprintf("recovered after an unclean stop: %d blocks of write-intent extents marked dirty", im.recovered))
	}
	if st.Fenced {
		if st.Health == "ok" {
			st.Health = "fenced"
		}
		st.Reasons = append(st.Reasons, "read-only: "+st.FencedReason+" (finish or repeat the failover command)")
	}
	if im.lastErr != nil {
		st.Health = "critical"
		st.Reasons = append(st.Reasons, im.lastErr.Error())
	}
	if ranges {
		st.DirtyRanges = [][2]uint64{}
		for s, e := range all.Ranges() {
			st.DirtyRanges = append(st.DirtyRanges, [2]uint64{uint64(s), e - uint64(s)})
		}
	}
	return st
}

// readFull reads len(p) bytes at off, padding with zeros past EOF.
func readFull(f *os.File, p []byte, off int64) error {
	n, err := f.ReadAt(p, off)
	if err == io.EOF {
		err = nil
	}
	clear(p[n:])
	return err
}

// BeginWrite is Begin(OpWrite, ...); the Begin* methods make *Image satisfy
// the interface the FUSE layer declares.
func (im *Image) BeginWrite(off, n int64) (func(), error) { return im.Begin(OpWrite, off, n) }

// BeginPunch records a hole punch.
func (im *Image) BeginPunch(off, n int64) (func(), error) { return im.Begin(OpPunch, off, n) }

// BeginZero records a zero-range.
func (im *Image) BeginZero(off, n int64) (func(), error) { return im.Begin(OpZero, off, n) }

// BeginAllocate records an allocating fallocate (conservatively: content may
// only change beyond the old end of file).
func (im *Image) BeginAllocate(off, n int64) (func(), error) { return im.Begin(OpAllocate, off, n) }
