package applier

// Answers to the primary's chunk queries (internal/wire chunks.go): which
// blocks the replica holds (held) and the region hashes of an image
// (regions). Both read hashes.bin without stopping applies: the answers are
// hints for building a thinned cycle; the commit resolves every ref again
// and fails with MissingChunksError if one no longer resolves.

import (
	"errors"
	"fmt"

	"github.com/standin/standin/internal/wire"
)

// ErrNoImageHeld: the group does not hold the image (no region hashes).
var ErrNoImageHeld = errors.New("the replica does not hold the image")

// lockedImage returns the image of group (present, loaded) or nil.
func (r *Replica) lockedImage(group, id string) (*group, *image) {
	r.mu.Lock()
	g := r.groups[group]
	r.mu.Unlock()
	if g == nil {
		return nil, nil
	}
	g.mu.RLock()
	im := g.images[id]
	g.mu.RUnlock()
	return g, im
}

// Held answers a held query for image id of group: per block of runs (in
// order) wire.HeldSame if this image holds the hash at that block,
// wire.HeldElsewhere if the chunk index names a location whose recorded hash
// matches in an image sources allows (nil: any), else wire.HeldNone.
func (r *Replica) Held(group, id string, runs []wire.HeldRun, sources SourceFunc) ([]byte, error) {
	if err := checkName("group", group); err != nil {
		return nil, err
	}
	if !imageIDOK(id) {
		return nil, fmt.Errorf("image id %q: %w", id, ErrBadName)
	}
	total := 0
	for _, run := range runs {
		total += run.Blocks()
	}
	out := make([]byte, 0, total)
	g, im := r.lockedImage(group, id)
	var need []int
	var needHash [][32]byte
	var cur []byte
	for _, run := range runs {
		n := uint64(run.Blocks())
		var have uint64 // blocks of the run within the image's recorded hashes
		if im != nil {
			g.mu.RLock()
			if im.st.Present && g.images[id] == im && (sources == nil || sources(group, im.st.Name)) {
				if nb := blocksOf(im.st.Size); run.Start < nb {
					have = min(n, nb-run.Start)
					if cap(cur) < int(have)*32 {
						cur = make([]byte, have*32)
					}
					cur = cur[:have*32]
					if err := readFullAt(im.hashes, cur, int64(run.Start)*32); err != nil {
						have = 0
					}
				}
			}
			g.mu.RUnlock()
		}
		for k := uint64(0); k < n; k++ {
			h := [32]byte(run.Hashes[k*32 : (k+1)*32])
			switch {
			case k < have && [32]byte(cur[k*32:(k+1)*32]) == h:
				out = append(out, wire.HeldSame)
			case h == zeroBlockBLAKE3:
				out = append(out, wire.HeldElsewhere) // an all-zero block needs no data
			default:
				need = append(need, len(out))
				needHash = append(needHash, h)
				out = append(out, wire.HeldNone)
			}
		}
	}
	if len(need) == 0 || r.chunks == nil {
		return out, nil
	}
	locs, err := r.chunks.lookup(needHash)
	if err != nil {
		return nil, err
	}
	srcs := map[string]srcImage{}
	for j, i := range need {
		for _, l := range locs[j] {
			if r.recordedAt(srcs, l, needHash[j], sources) {
				out[i] = wire.HeldElsewhere
				break
			}
		}
	}
	return out, nil
}

// recordedAt reports whether hashes.bin of the image at l records want at
// its block (without reading the data: a hint, resolveRefs checks the bytes).
func (r *Replica) recordedAt(srcs map[string]srcImage, l chunkLoc, want [32]byte, ok SourceFunc) bool {
	key := l.group + "/" + l.id
	s, have := srcs[key]
	if !have {
		if storeNameOK(l.group) && imageIDOK(l.id) {
			s.g, s.im = r.lockedImage(l.group, l.id)
		}
		srcs[key] = s
	}
	if s.g == nil || s.im == nil {
		return false
	}
	s.g.mu.RLock()
	defer s.g.mu.RUnlock()
	if s.g.images[l.id] != s.im || !s.im.st.Present || l.block >= blocksOf(s.im.st.Size) {
		return false
	}
	if ok != nil && !ok(l.group, s.im.st.Name) {
		return false
	}
	var rec [32]byte
	return readFullAt(s.im.hashes, rec[:], int64(l.block)*32) == nil && rec == want
}

// RegionHashes returns the hashes of regions [from, from+count) of image id
// of group as the primary computes them for an image of nblocks blocks (see
// internal/wire): 32 bytes per region. ErrNoImageHeld if the group does
// not hold the image (or sources does not allow it).
func (r *Replica) RegionHashes(group, id string, nblocks, from, count uint64, sources SourceFunc) ([]byte, error) {
	if err := checkName("group", group); err != nil {
		return nil, err
	}
	if !imageIDOK(id) {
		return nil, fmt.Errorf("image id %q: %w", id, ErrBadName)
	}
	regions := (nblocks + wire.RegionBlocks - 1) / wire.RegionBlocks
	if count > wire.MaxRegions || from > regions || count > regions-from {
		return nil, fmt.Errorf("regions %d+%d of an image of %d regions: out of range", from, count, regions)
	}
	g, im := r.lockedImage(group, id)
	if im == nil {
		return nil, fmt.Errorf("image %s of group %s: %w", id, group, ErrNoImageHeld)
	}
	out := make([]byte, 0, count*32)
	ent := make([]byte, wire.RegionBlocks*32)
	for reg := from; reg < from+count; reg++ {
		b0 := reg * wire.RegionBlocks
		n := min(uint64(wire.RegionBlocks), nblocks-b0)
		e := ent[:n*32]
		clear(e)
		g.mu.RLock()
		if !im.st.Present || g.images[id] != im || (sources != nil && !sources(group, im.st.Name)) {
			g.mu.RUnlock()
			return nil, fmt.Errorf("image %s of group %s: %w", id, group, ErrNoImageHeld)
		}
		if have := blocksOf(im.st.Size); b0 < have {
			k := min(n, have-b0)
			if err := readFullAt(im.hashes, e[:k*32], int64(b0)*32); err != nil {
				g.mu.RUnlock()
				return nil, err
			}
		}
		g.mu.RUnlock()
		s := wire.RegionHash(e)
		out = append(out, s[:]...)
	}
	return out, nil
}
