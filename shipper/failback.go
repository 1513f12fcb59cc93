package shipper

// Failback after an unplanned failover: the old primary's images became its
// replica store's copy as they were, declared at the promoted point's cut.
// They differ from this (new) primary's images only in blocks the old
// primary changed after that point (its tracker state and cycles it never
// got applied) and blocks changed here since the promotion. The first round
// hash-checks exactly those candidates against the replica (held query: 36
// bytes per candidate block), marks the blocks that differ dirty, and the
// ordinary delta cycle that follows carries them: nothing else travels.

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/RoaringBitmap/roaring/v2"

	"github.com/standin/standin/internal/fsutil"
	"github.com/standin/standin/internal/wire"
	"github.com/standin/standin/tracker"
)

// Reconcile is a pending failback hash check of candidate blocks.
type Reconcile struct {
	Requested time.Time `json:"requested"`
	// Candidates: image name → file holding a roaring bitmap of the blocks
	// that may differ on the replica.
	Candidates map[string]string `json:"candidates"`
}

// WriteCandidates stores a candidate set for Reconcile.Candidates.
func WriteCandidates(path string, b *roaring.Bitmap) error {
	data, err := b.ToBytes()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	return fsutil.WriteFileAtomic(path, data, 0o600)
}

func readCandidates(path string) (*roaring.Bitmap, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	b, err := ParseCandidates(data)
	if err != nil {
		return nil, fmt.Errorf("candidate blocks %s: %w", path, err)
	}
	return b, nil
}

// ParseCandidates decodes a serialized roaring bitmap of candidate blocks
// (a file of WriteCandidates, or a failover request's candidates). The
// bitmap is checked for consistency (tracker.DecodeBlocks): a damaged one is
// an error here rather than a panic when it is used.
func ParseCandidates(data []byte) (*roaring.Bitmap, error) {
	return tracker.DecodeBlocks(data)
}

// reconcile runs a pending failback hash check; the blocks that differ
// become dirty (durably) before the request is dropped from the group.
func (s *Shipper) reconcile(ctx context.Context, r *run, c *client) error {
	g := r.g
	if g.Reconcile == nil {
		return nil
	}
	var candidates, differ uint64
	for name, path := range g.Reconcile.Candidates {
		im, err := s.store.Image(name)
		if err != nil {
			return err
		}
		cand, err := readCandidates(path)
		if err != nil {
			return err
		}
		f, err := os.Open(filepath.Join(s.store.ImagesDir(), name))
		if err != nil {
			return err
		}
		fi, err := f.Stat()
		if err != nil {
			f.Close()
			return err
		}
		nblocks := uint64((fi.Size() + 4095) / 4096)
		d, sent, err := s.heldDiff(ctx, c, g.Name, name, im.ID().String(), f, nblocks, cand)
		f.Close()
		r.addSent(sent, 0)
		if err != nil {
			return fmt.Errorf("failback hash check of %s: %w", name, err)
		}
		if err := im.MarkDirty(d); err != nil {
			return err
		}
		candidates += cand.GetCardinality()
		differ += d.GetCardinality()
	}
	err := s.persist(g.Name, func(x *Group) bool {
		if x.Reconcile == nil || !x.Reconcile.Requested.Equal(g.Reconcile.Requested) {
			return false
		}
		x.Reconcile = nil
		return true
	})
	if err != nil {
		return err
	}
	for _, path := range g.Reconcile.Candidates {
		os.Remove(path)
	}
	r.g.Reconcile = nil
	s.log.Info("failback hash check done: only differing blocks will be sent", "group", g.Name, "candidate_blocks", candidates, "differing_blocks", differ)
	return nil
}

// heldDiff asks the replica which candidate blocks it holds in place with
// this image's content and returns the others (and the query bytes sent).
// Blocks beyond the image's end are not queried: the size in the next
// cycle's header truncates them.
func (s *Shipper) heldDiff(ctx context.Context, c *client, group, name, id string, f *os.File, nblocks uint64, cand *roaring.Bitmap) (*roaring.Bitmap, int64, error) {
	out := roaring.New()
	var sent int64
	buf := make([]byte, 4096)
	var runs []wire.HeldRun
	var pending uint64
	flush := func() error {
		if len(runs) == 0 {
			return nil
		}
		ans, n, err := c.held(ctx, group, name, id, nblocks, runs)
		sent += n
		if err != nil {
			return err
		}
		i := 0
		for _, r := range runs {
			for k := 0; k < r.Blocks(); k++ {
				if ans[i] != wire.HeldSame {
					out.Add(uint32(r.Start + uint64(k)))
				}
				i++
			}
		}
		runs, pending = runs[:0], 0
		return nil
	}
	it := cand.Iterator()
	for it.HasNext() {
		b := uint64(it.Next())
		if b >= nblocks {
			break
		}
		n, err := f.ReadAt(buf, int64(b)*4096)
		if err != nil && n == 0 {
			return nil, sent, err
		}
		clear(buf[n:])
		h := wire.BlockHash(buf)
		if k := len(runs); k > 0 && runs[k-1].Start+uint64(runs[k-1].Blocks()) == b {
			runs[k-1].Hashes = append(runs[k-1].Hashes, h[:]...)
		} else {
			runs = append(runs, wire.HeldRun{Start: b, Hashes: bytes.Clone(h[:])})
		}
		if pending++; pending >= wire.MaxHeldBlocks {
			if err := flush(); err != nil {
				return nil, sent, err
			}
		}
	}
	return out, sent, flush()
}
