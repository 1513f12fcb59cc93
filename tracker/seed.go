package tracker

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"time"

	"github.com/RoaringBitmap/roaring/v2"
	"github.com/google/uuid"
)

// ErrSeeding: the image is being exported to a seed; it cannot be cut until
// the export ends.
var ErrSeeding = errors.New("image is being exported to a seed")

// Seed is a crash-consistent cut of a group of images frozen for a seed
// export: the whole allocated content of every image at the cut stays
// readable through SeedImage.ReadAt while the images keep changing
// (copy-before-write, as for a cycle). The seed's cut takes the sequence
// number a cycle would have taken; after Commit the next cycle of each image
// is a delta on top of the seed (parent = the seed's seq), so the replica
// continues from an imported seed with a catch-up cycle.
type Seed struct {
	s        *Store
	Images   []*SeedImage
	GroupCut uuid.UUID
	Time     time.Time
	done     bool
}

// SeedImage is one image of a Seed. It implements dedup.ImageSource.
type SeedImage struct {
	im    *Image
	name  string
	gen   uint64
	seq   uint64
	size  int64
	exts  [][2]int64
	st    *stage
	old   *roaring.Bitmap // the dirty set swapped out at the cut (returned on Abort)
	group uuid.UUID
	t     time.Time
}

// Name returns the image's path relative to the mount.
func (si *SeedImage) Name() string { return si.name }

// ID returns the image identity.
func (si *SeedImage) ID() [16]byte { return si.im.id }

// Generation returns the image generation.
func (si *SeedImage) Generation() uint64 { return si.gen }

// Seq returns the seed's cut sequence number.
func (si *SeedImage) Seq() uint64 { return si.seq }

// Size returns the image size at the cut.
func (si *SeedImage) Size() int64 { return si.size }

// CutTime returns the time of the cut.
func (si *SeedImage) CutTime() time.Time { return si.t }

// GroupCut returns the id shared by all images of the cut.
func (si *SeedImage) GroupCut() [16]byte { return si.group }

// Allocated returns the bytes in the image's data extents at the cut (the
// last block may extend past the size; it counts up to the size).
func (si *SeedImage) Allocated() int64 {
	var n int64
	for _, e := range si.exts {
		n += min(e[1], si.size-e[0])
	}
	return n
}

// DataExtents returns the allocated ranges at the cut (block aligned).
func (si *SeedImage) DataExtents() ([][2]int64, error) { return si.exts, nil }

// CBWBlocks returns how many blocks were saved by copy-before-write so far.
func (si *SeedImage) CBWBlocks() uint64 {
	si.im.mu.Lock()
	defer si.im.mu.Unlock()
	return si.st.copied
}

// ReadAt reads the image content at the cut. Every block is handed out once:
// its saved copy is released after the read, so a seed export reads each
// block exactly once (a second read of the same block is an error, not stale
// data). Bytes outside the data extents at the cut read as zeros.
func (si *SeedImage) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("tracker: seed read at negative offset %d", off)
	}
	if off >= si.size {
		return 0, fmt.Errorf("tracker: seed read at %d beyond the size %d at the cut", off, si.size)
	}
	n := len(p)
	if off+int64(n) > si.size {
		n = int(si.size - off)
	}
	first := uint64(off) / BlockSize
	end := (uint64(off) + uint64(n) + BlockSize - 1) / BlockSize
	aligned := off%BlockSize == 0 && n%BlockSize == 0
	var buf []byte
	if aligned {
		buf = p[:n]
	} else {
		buf = make([]byte, (end-first)*BlockSize)
	}
	if err := si.readBlocks(first, buf); err != nil {
		return 0, err
	}
	if !aligned {
		copy(p[:n], buf[uint64(off)-first*BlockSize:])
	}
	if n < len(p) {
		return n, fmt.Errorf("tracker: seed read past the end of %s", si.name)
	}
	return n, nil
}

// readBlocks fills buf (whole blocks from block b) with the content at the cut.
func (si *SeedImage) readBlocks(b uint64, buf []byte) error {
	im, st := si.im, si.st
	n := uint64(len(buf) / BlockSize)
	im.mu.Lock()
	defer im.mu.Unlock()
	if st.failed != nil {
		return st.failed
	}
	for i := uint64(0); i < n; {
		blk := b + i
		p := buf[i*BlockSize : (i+1)*BlockSize]
		if st.pending.Contains(uint32(blk)) {
			j := i + 1
			for j < n && st.pending.Contains(uint32(b+j)) {
				j++
			}
			if err := readFull(im.f, buf[i*BlockSize:j*BlockSize], int64(blk)*BlockSize); err != nil {
				return err
			}
			st.pending.RemoveRange(blk, b+j)
			i = j
			continue
		}
		if off, ok := st.saved[uint32(blk)]; ok {
			if err := readFull(st.cbw, p, off); err != nil {
				return err
			}
			delete(st.saved, uint32(blk))
			i++
			continue
		}
		if si.inExtents(blk) {
			return fmt.Errorf("tracker: block %d of %s was already read for this seed", blk, si.name)
		}
		clear(p) // a hole at the cut
		i++
	}
	return nil
}

func (si *SeedImage) inExtents(blk uint64) bool {
	off := int64(blk) * BlockSize
	i := sort.Search(len(si.exts), func(i int) bool { return si.exts[i][0]+si.exts[i][1] > off })
	return i < len(si.exts) && si.exts[i][0] <= off
}

// SeedCut freezes the named images under one write barrier for a seed
// export. The caller reads every image through its SeedImage and then calls
// Commit (the seed is durable and the relationship continues from it) or
// Abort. While a seed is open its images cannot be cut (ErrSeeding).
func (s *Store) SeedCut(names []string) (*Seed, error) {
	s.cutMu.Lock()
	defer s.cutMu.Unlock()
	imgs, err := s.resolve(names)
	if err != nil {
		return nil, err
	}
	sort.Slice(imgs, func(i, j int) bool { return imgs[i].id.String() < imgs[j].id.String() })
	sts, err := s.newStages(imgs, "seed", "seed")
	if err != nil {
		return nil, err
	}
	sd := &Seed{s: s, GroupCut: uuid.New()}
	for i, im := range imgs {
		sd.Images = append(sd.Images, &SeedImage{im: im, st: sts[i], group: sd.GroupCut})
	}
	lockBarriers(imgs)
	sd.Time = time.Now()
	for _, si := range sd.Images {
		if err == nil {
			err = si.freeze(sd.Time)
		}
	}
	unlockBarriers(imgs)
	if err != nil {
		sd.Abort()
		return nil, fmt.Errorf("tracker: seed cut: %w", err)
	}
	s.log.Info("seed cut", "images", len(sd.Images), "group", sd.GroupCut)
	return sd, nil
}

// freeze sets up one image's seed stage. Called with the image's barrier held.
func (si *SeedImage) freeze(t time.Time) error {
	im := si.im
	st, err := im.f.Stat()
	if err != nil {
		return err
	}
	size := st.Size()
	pending, err := allocatedBlocks(im.f, size)
	if err != nil {
		return err
	}
	for b0, b1 := range pending.Ranges() {
		si.exts = append(si.exts, [2]int64{int64(b0) * BlockSize, int64(b1-uint64(b0)) * BlockSize})
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	si.name, si.gen, si.seq, si.size, si.t = im.meta.Name, im.meta.Generation, im.meta.NextSeq, size, t
	si.old = im.dirty
	im.dirty = roaring.New()
	im.frozen = si.old // kept in checkpoints until Commit: a crash loses nothing
	si.st.pending = pending
	im.stage = si.st
	return nil
}

// Abort ends the seed without effect on replication: the changes frozen at
// the cut go back to the dirty maps.
func (sd *Seed) Abort() {
	if sd.done {
		return
	}
	sd.done = true
	for _, si := range sd.Images {
		im := si.im
		im.mu.Lock()
		if im.stage == si.st {
			if si.old != nil {
				im.dirty.Or(si.old)
			}
			im.frozen, im.stage = nil, nil
		}
		im.mu.Unlock()
		si.st.discard()
	}
}

// Commit makes the seed the base the relationship continues from: each
// image's sequence advances past the seed's seq, and staged cycles it
// supersedes (older or equal seq of the generation) are removed, since the
// replica will hold the image at the seed's cut after the import. Call it
// only once the seed is completely written and durable.
func (sd *Seed) Commit() error {
	if sd.done {
		return errors.New("tracker: seed already ended")
	}
	for _, si := range sd.Images {
		si.im.mu.Lock()
		if f := si.st.failed; f != nil {
			si.im.mu.Unlock()
			sd.Abort()
			return fmt.Errorf("tracker: seed of %s: %w", si.name, f)
		}
		si.im.mu.Unlock()
	}
	sd.done = true
	var errs []error
	for _, si := range sd.Images {
		im := si.im
		im.mu.Lock()
		if im.meta.Generation == si.gen && im.meta.NextSeq <= si.seq {
			im.meta.NextSeq = si.seq + 1
		}
		im.meta.LastCut = si.t
		im.dropFrozenLocked() // the checkpoint below syncs the image before it drops them
		im.mu.Unlock()
		si.st.discard()
		dir := im.s.cycleDir(im.id)
		matches, _ := filepath.Glob(filepath.Join(dir, fmt.Sprintf("g%06d-s*.cyc", si.gen)))
		for _, m := range matches {
			var g, seq uint64
			if _, err := fmt.Sscanf(filepath.Base(m), "g%06d-s%012d.cyc", &g, &seq); err == nil && g == si.gen && seq <= si.seq {
				if err := os.Remove(m); err != nil {
					errs = append(errs, err)
				}
			}
		}
		if err := im.saveMeta(); err != nil {
			errs = append(errs, err)
		}
		if err := im.Checkpoint(); err != nil {
			errs = append(errs, err)
		}
		im.s.log.Info("seed committed", "image", si.name, "generation", si.gen, "seq", si.seq, "cbw_blocks", si.st.copied)
	}
	return errors.Join(errs...)
}
