package tracker

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"github.com/RoaringBitmap/roaring/v2"
	"github.com/google/uuid"
	"golang.org/x/sys/unix"

	"github.com/standin/standin/internal/format"
	"github.com/standin/standin/internal/fsutil"
)

// stage is the copy-before-write state of one image while its frozen set is
// being staged into a cycle file. Guarded by Image.mu.
type stage struct {
	pending *roaring.Bitmap  // frozen blocks whose content is still only in the image
	saved   map[uint32]int64 // frozen block → offset of its content at the cut in cbw
	cbw     *os.File
	cbwOff  int64
	failed  error
	buf     []byte
	copied  uint64 // blocks saved by copy-before-write
}

// discard closes and removes the copy-before-write scratch file.
func (st *stage) discard() {
	st.cbw.Close()
	os.Remove(st.cbw.Name())
}

// newStages checks that none of imgs is being staged already (a seed export
// holds its stage for the whole export) and creates a copy-before-write
// scratch file for each. what names the operation in errors, kind the
// scratch files. Called with cutMu held.
func (s *Store) newStages(imgs []*Image, what, kind string) ([]*stage, error) {
	for _, im := range imgs {
		im.mu.Lock()
		busy := im.stage != nil
		im.mu.Unlock()
		if busy {
			return nil, fmt.Errorf("tracker: %s of %s: %w (wait for 'standin seed export' to finish)", what, im.Name(), ErrSeeding)
		}
	}
	sts := make([]*stage, 0, len(imgs))
	for _, im := range imgs {
		f, err := os.CreateTemp(s.stagingDir(), im.id.String()+"."+kind+"-*")
		if err != nil {
			for _, st := range sts {
				st.discard()
			}
			return nil, fmt.Errorf("tracker: %s: %w", what, err)
		}
		sts = append(sts, &stage{saved: map[uint32]int64{}, cbw: f})
	}
	return sts, nil
}

// lockBarriers takes the write barrier of every image (in the given order):
// in-flight mutations finish, new ones wait.
func lockBarriers(imgs []*Image) {
	for _, im := range imgs {
		im.barrier.Lock()
	}
}

func unlockBarriers(imgs []*Image) {
	for _, im := range imgs {
		im.barrier.Unlock()
	}
}

// saveOld saves the content at the cut of every pending block in [first,
// end) before a mutation overwrites it. Called with Image.mu held.
func (st *stage) saveOld(im *Image, first, end uint64) {
	if st.failed != nil || !st.pending.IntersectsWithInterval(first, end) {
		return
	}
	sub := roaring.New()
	sub.AddRange(first, end)
	sub.And(st.pending)
	for s, e := range sub.Ranges() {
		n := int(e - uint64(s))
		if cap(st.buf) < n*BlockSize {
			st.buf = make([]byte, n*BlockSize)
		}
		buf := st.buf[:n*BlockSize]
		err := readFull(im.f, buf, int64(s)*BlockSize)
		if err == nil {
			_, err = st.cbw.WriteAt(buf, st.cbwOff)
		}
		if err != nil {
			// The cut can no longer be staged exactly; abandon it (its blocks
			// go back to the dirty map) rather than ship a torn cycle.
			st.failed = fmt.Errorf("copy-before-write of blocks %d..%d: %w", s, e-1, err)
			st.pending.Clear()
			return
		}
		for b := uint64(s); b < e; b++ {
			st.saved[uint32(b)] = st.cbwOff + int64(b-uint64(s))*BlockSize
		}
		st.cbwOff += int64(len(buf))
		st.copied += uint64(n)
	}
	st.pending.AndNot(sub)
}

// CycleInfo describes one staged cycle file.
type CycleInfo struct {
	Image      string    `json:"image"`
	ID         string    `json:"id"`
	Generation uint64    `json:"generation"`
	Seq        uint64    `json:"seq"`
	Base       bool      `json:"base"`
	Path       string    `json:"path"`
	Bytes      int64     `json:"bytes"`
	Time       time.Time `json:"time"`
	Size       uint64    `json:"size"`
	DataBlocks uint64    `json:"data_blocks"`
	ZeroBlocks uint64    `json:"zero_blocks"`
	GroupCut   string    `json:"group_cut"`
	CBWBlocks  uint64    `json:"cbw_blocks"`
	StageTime  string    `json:"stage_time,omitempty"`
	// AppConsistent: cut while the applications were quiesced (FlagAppConsistent).
	AppConsistent bool `json:"app_consistent,omitempty"`
}

type cutImage struct {
	im     *Image
	hdr    format.Header
	frozen *roaring.Bitmap
	st     *stage
}

// Cut freezes the dirty sets of the named images under one write barrier and
// stages one cycle file per image. The images are consistent with each other:
// every mutation acknowledged before the barrier is in, none after it (I2).
// It returns when every cycle file is durable.
func (s *Store) Cut(ctx context.Context, names []string) ([]CycleInfo, error) {
	return s.CutWith(ctx, names, CutOptions{Compress: s.opts.Compress})
}

// CutOptions override the store's options for one cut.
type CutOptions struct {
	Compress bool // zstd-compress the staged data
	// Base stages a full base cycle that continues the chain (FlagBase,
	// parent = seq−1): every allocated block at the cut plus the dirty
	// ones, for a hash-compare resync (the shipper thins it against the
	// replica). If the cut fails, only the dirty blocks return to the
	// dirty map.
	Base bool
	// AppConsistent marks the staged cycles app-consistent
	// (format.FlagAppConsistent): the caller quiesced the applications
	// before the cut (shipper/appconsistent.go).
	AppConsistent bool
	// AfterBarrier, if set, is called once, right after the write barrier
	// of every image is released and before staging starts (also when the
	// cut failed under the barrier); it is not called when the cut fails
	// before taking the barrier. The shipper thaws the guest there.
	AfterBarrier func()
}

// CutWith is Cut with per-cut options (a replication group's compression).
func (s *Store) CutWith(ctx context.Context, names []string, o CutOptions) ([]CycleInfo, error) {
	s.cutMu.Lock()
	defer s.cutMu.Unlock()
	imgs, err := s.resolve(names)
	if err != nil {
		return nil, err
	}
	sort.Slice(imgs, func(i, j int) bool { return imgs[i].id.String() < imgs[j].id.String() })
	sts, err := s.newStages(imgs, "cut", "cbw")
	if err != nil {
		return nil, err
	}
	cuts := make([]*cutImage, len(imgs))
	for i, im := range imgs {
		cuts[i] = &cutImage{im: im, st: sts[i]}
	}
	group := uuid.New()

	// The barrier: wait for in-flight mutations of every image, swap maps.
	lockBarriers(imgs)
	now := time.Now()
	for _, c := range cuts {
		im := c.im
		size, serr := im.size()
		im.mu.Lock()
		if serr != nil && err == nil {
			err = serr
		}
		// Clip only at a size that was read: after a failed stat, size 0
		// would drop every dirty block, and the abandon below could not
		// return them (frozen is this same bitmap).
		if serr == nil {
			im.clipDirtyLocked((uint64(size) + BlockSize - 1) / BlockSize)
		}
		f := im.dirty
		im.dirty = roaring.New()
		im.frozen = f
		c.frozen = f
		if o.Base {
			// im.frozen stays the dirty set (checkpoints, abandon): the other
			// allocated blocks are not changes, only part of the base.
			all, aerr := allocatedBlocks(im.f, size)
			if aerr != nil && err == nil {
				err = aerr
			}
			all.Or(f)
			c.frozen = all
		}
		c.st.pending = c.frozen.Clone()
		im.stage = c.st
		c.hdr = format.Header{
			ImageID: im.id, Generation: im.meta.Generation, Seq: im.meta.NextSeq,
			Parent: im.meta.NextSeq - 1, CutTime: now, ImageSize: uint64(size),
			GroupCut: group, Name: im.meta.Name,
		}
		if c.hdr.Seq == 0 || o.Base {
			c.hdr.Flags |= format.FlagBase
		}
		if o.AppConsistent {
			c.hdr.Flags |= format.FlagAppConsistent
		}
		if c.hdr.Seq == 0 {
			c.hdr.Parent = format.NoParent
		}
		im.mu.Unlock()
	}
	unlockBarriers(imgs)
	if o.AfterBarrier != nil {
		o.AfterBarrier()
	}
	if err != nil {
		for _, c := range cuts {
			c.im.abandon(c, err)
		}
		return nil, fmt.Errorf("tracker: cut: %w", err)
	}
	s.log.Info("cut", "images", len(cuts), "group", group)

	var infos []CycleInfo
	var errs []error
	var staged []*cutImage
	for _, c := range cuts {
		info, err := c.im.stageCycle(ctx, c, o)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		infos = append(infos, info)
		staged = append(staged, c)
	}
	// Each checkpoint fdatasyncs its image (rule 6): the images sync in
	// parallel, not one after another, once every cycle of the group is
	// durable.
	var wg sync.WaitGroup
	for _, c := range staged {
		wg.Go(func() { c.im.afterStaged(c.hdr.Name) })
	}
	wg.Wait()
	return infos, errors.Join(errs...)
}

// afterStaged records a staged cycle in the image's metadata and checkpoints,
// so the dirty map on disk no longer holds the cycle's blocks. A failure only
// leaves the state on disk stale, which is safe: a restart derives the
// sequence from the cycle files and sends the blocks still in the dirty map
// again.
func (im *Image) afterStaged(name string) {
	if err := im.saveMeta(); err != nil {
		im.s.log.Warn("saving image metadata", "image", name, "err", err)
	}
	if err := im.Checkpoint(); err != nil {
		im.s.log.Warn("checkpoint after cut", "image", name, "err", err)
	}
}

// abandon returns a cut's frozen blocks to the dirty map after a failure, so
// nothing is lost: the next cut carries them.
func (im *Image) abandon(c *cutImage, cause error) {
	im.mu.Lock()
	if im.frozen != nil {
		im.dirty.Or(im.frozen)
	}
	im.frozen, im.stage = nil, nil
	im.mu.Unlock()
	c.st.discard()
	im.s.log.Warn("cut abandoned; its blocks stay dirty for the next cut", "image", im.Name(), "err", cause)
}

// stageCycle reads the frozen blocks (from the image, or from the
// copy-before-write file for blocks overwritten since the cut) into a cycle
// file, makes it durable and advances the sequence.
func (im *Image) stageCycle(ctx context.Context, c *cutImage, o CutOptions) (info CycleInfo, err error) {
	start := time.Now()
	dir := im.s.cycleDir(im.id)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		im.abandon(c, err)
		return info, err
	}
	final := filepath.Join(dir, cycleFileName(c.hdr.Generation, c.hdr.Seq))
	tmp := final + ".tmp"
	defer func() {
		if err != nil {
			os.Remove(tmp)
			im.abandon(c, err)
			err = fmt.Errorf("tracker: staging cycle %d of %s: %w", c.hdr.Seq, c.hdr.Name, err)
		}
	}()
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return info, err
	}
	defer f.Close()
	bw := bufio.NewWriterSize(f, 1<<20)
	w, err := format.NewWriter(bw, c.hdr, format.WriterOptions{Compress: o.Compress})
	if err != nil {
		return info, err
	}
	defer w.Abort() // no-op after Close
	buf := make([]byte, format.MaxExtentBlocks*BlockSize)
	ra := newReadahead(im.f, c.frozen)
	for s, e := range c.frozen.Ranges() {
		for b := uint64(s); b < e; {
			ra.advance(b)
			if err := ctx.Err(); err != nil {
				return info, err
			}
			n := min(uint64(format.MaxExtentBlocks), e-b)
			p := buf[:n*BlockSize]
			if err := im.readFrozen(c.st, b, p); err != nil {
				return info, err
			}
			if err := w.WriteBlocks(b, p); err != nil {
				return info, err
			}
			if d := im.s.opts.StageDelay; d > 0 {
				time.Sleep(d * time.Duration(len(p)) / (1 << 20))
			}
			b += n
		}
	}
	sum, err := w.Close()
	if err != nil {
		return info, err
	}
	if err := bw.Flush(); err != nil {
		return info, err
	}
	if err := f.Sync(); err != nil {
		return info, err
	}
	if err := f.Close(); err != nil {
		return info, err
	}
	if err := os.Rename(tmp, final); err != nil {
		return info, err
	}
	if err := fsutil.SyncDir(dir); err != nil {
		return info, err
	}

	// The cycle is durable: advance the sequence and drop the frozen set
	// (afterStaged checkpoints).
	im.mu.Lock()
	im.meta.NextSeq = c.hdr.Seq + 1
	im.meta.LastCut = c.hdr.CutTime
	im.meta.LastCycleBytes = sum.Bytes
	cbwBlocks := c.st.copied
	im.dropFrozenLocked() // afterStaged's checkpoint syncs the image before it drops them
	im.mu.Unlock()
	c.st.discard()
	info = cycleInfo(c.hdr, final, sum.Bytes, sum.DataBlocks, sum.ZeroBlocks)
	info.CBWBlocks, info.StageTime = cbwBlocks, time.Since(start).Round(time.Millisecond).String()
	im.s.log.Info("cycle staged", "image", info.Image, "seq", info.Seq, "bytes", info.Bytes,
		"data_blocks", info.DataBlocks, "zero_blocks", info.ZeroBlocks, "cbw_blocks", cbwBlocks, "took", info.StageTime)
	return info, nil
}

// readFrozen fills p with the content at the cut of blocks [b, b+len(p)/BlockSize).
func (im *Image) readFrozen(st *stage, b uint64, p []byte) error {
	n := uint64(len(p) / BlockSize)
	im.mu.Lock()
	defer im.mu.Unlock()
	if st.failed != nil {
		return st.failed
	}
	for i := uint64(0); i < n; {
		blk := b + i
		if st.pending.Contains(uint32(blk)) {
			// a run of still-pending blocks: read it from the image in one go
			j := i + 1
			for j < n && st.pending.Contains(uint32(b+j)) {
				j++
			}
			if err := readFull(im.f, p[i*BlockSize:j*BlockSize], int64(blk)*BlockSize); err != nil {
				return err
			}
			i = j
			continue
		}
		off, ok := st.saved[uint32(blk)]
		if !ok {
			return fmt.Errorf("block %d of the cut was neither pending nor saved (internal error)", blk)
		}
		if err := readFull(st.cbw, p[i*BlockSize:(i+1)*BlockSize], off); err != nil {
			return err
		}
		delete(st.saved, uint32(blk))
		i++
	}
	st.pending.RemoveRange(b, b+n)
	return nil
}

// allocatedBlocks returns the blocks of f's data extents below size.
func allocatedBlocks(f *os.File, size int64) (*roaring.Bitmap, error) {
	all := roaring.New()
	exts, err := fsutil.DataExtents(f, size)
	if err != nil {
		return all, err
	}
	for _, e := range exts {
		b1 := (uint64(e.Off+e.Len) + BlockSize - 1) / BlockSize
		if b1 > maxBlocks {
			return all, ErrTooLarge
		}
		all.AddRange(uint64(e.Off)/BlockSize, b1)
	}
	return all, nil
}

func cycleFileName(gen, seq uint64) string {
	return fmt.Sprintf("g%06d-s%012d.cyc", gen, seq)
}

// readahead asks the kernel to read the frozen ranges ahead of the stager
// (POSIX_FADV_WILLNEED), so disk reads overlap hashing and compression.
type readahead struct {
	f      *os.File
	ranges [][2]uint64 // [start, end) blocks
	next   int         // first range not yet (fully) advised
	upTo   uint64      // advised up to this block
}

const readaheadBlocks = 8192 // 32 MiB

func newReadahead(f *os.File, b *roaring.Bitmap) *readahead {
	ra := &readahead{f: f}
	for s, e := range b.Ranges() {
		ra.ranges = append(ra.ranges, [2]uint64{uint64(s), e})
	}
	return ra
}

// advance advises the ranges up to readaheadBlocks past block b.
func (ra *readahead) advance(b uint64) {
	limit := b + readaheadBlocks
	if ra.upTo >= b+readaheadBlocks/2 {
		return // still far enough ahead
	}
	for ra.next < len(ra.ranges) {
		r := ra.ranges[ra.next]
		from := max(r[0], ra.upTo, b)
		if from >= limit {
			break
		}
		to := min(r[1], limit)
		if to > from {
			unix.Fadvise(int(ra.f.Fd()), int64(from)*BlockSize, int64(to-from)*BlockSize, unix.FADV_WILLNEED)
			ra.upTo = to
		}
		if to < r[1] {
			break
		}
		ra.next++
	}
}
