package applier

import (
	"fmt"

	"github.com/RoaringBitmap/roaring/v2"
)

// ChangedAfter returns, per image id, the blocks that differ between the
// group's point and its latest state: every block an undo log after the
// point holds (the old content of blocks later applies changed), plus the
// blocks gained or lost by a size change. A failback after an unplanned
// failover to an older point must re-send them: the old primary had
// shipped those changes after the point that was promoted.
func (r *Replica) ChangedAfter(groupName, point string) (map[string]*roaring.Bitmap, error) {
	g, p, err := r.rlockPoint(groupName, point)
	if err != nil {
		return nil, err
	}
	defer g.mu.RUnlock()
	out := map[string]*roaring.Bitmap{}
	for id, im := range g.images {
		b := roaring.New()
		for _, l := range im.logs {
			if l.to <= p.N {
				continue
			}
			for _, e := range l.ents {
				b.Add(uint32(e.block))
			}
		}
		if size, ok := im.sizeAt(p.N); ok && size != im.st.Size {
			lo, hi := blocksOf(min(size, im.st.Size)), blocksOf(max(size, im.st.Size))
			if hi > 1<<32 {
				return nil, fmt.Errorf("image %s: too many blocks", id)
			}
			if lo > 0 {
				lo-- // the partial last block changes too
			}
			b.AddRange(lo, hi)
		}
		out[id] = b
	}
	return out, nil
}
