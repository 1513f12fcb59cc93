package applier

// Extended replication: this replica forwards a group onward to a third
// host. Forwarding works from the recovery POINTS, not from the cycle files
// received: a received base may be thinned (ref extents that mean nothing to
// the third host), and the second hop may have a longer interval, so several
// points merge into one forwarded cycle. ForwardCut turns the group's latest
// point P into one cycle file per image:
//
//   - a delta when the image existed at the last forwarded point F with the
//     same generation: the blocks some undo log after F holds (a superset of
//     what changed from F to P), read AT P, zero blocks as zero extents;
//     header seq = the image's seq at P, parent = its seq at F (a merged
//     delta: the receiver applies it on F's cycle, format.md);
//   - a base otherwise (first forward, new image, new generation — e.g.
//     after a failover and back): every non-zero block at P. The shipper
//     thins it against what the target holds, so a base of a group the
//     target already has costs little.
//
// F must stay a recovery point until the target committed P: the caller
// keeps it durably pinned (PinForward).

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/RoaringBitmap/roaring/v2"
	"github.com/google/uuid"

	"github.com/standin/standin/internal/format"
	"github.com/standin/standin/internal/fsutil"
)

// ForwardFrom is what the target of a forward holds: the point forwarded
// last and the generation of each image at that point (points do not record
// generations).
type ForwardFrom struct {
	Point string            `json:"point"`       // "" = nothing forwarded yet
	Gens  map[string]uint64 `json:"generations"` // image id → generation at Point
	// Owner, if set, durably pins the point ForwardCut reads for this owner
	// (replacing the owner's earlier pin, as PinForward) before it is read,
	// so it stays a point until the caller moves the pin.
	Owner string `json:"-"`
}

// ForwardResult describes the cut ForwardCut staged.
type ForwardResult struct {
	Point  string            `json:"point"` // the point forwarded (P)
	Time   time.Time         `json:"time"`  // its cut time
	Gens   map[string]uint64 `json:"generations"`
	Seqs   map[string]uint64 `json:"seqs"`
	Files  []string          `json:"files"`  // cycle files written (none if P is the point forwarded last, or nothing changed)
	Blocks uint64            `json:"blocks"` // data blocks in them
	Bytes  int64             `json:"bytes"`  // their size
	Base   bool              `json:"base"`   // at least one image is forwarded as a base
	// AppConsistent: P is app-consistent (the cycles carry the flag).
	AppConsistent bool `json:"app_consistent,omitempty"`
}

// ForwardCutFile is the record ForwardCut writes into dir next to the cycle
// directories (the ForwardResult, JSON), so a caller that crashed after the
// cut knows which point its staged files are.
const ForwardCutFile = "forward-cut.json"

// ErrForwardPending: the directory still holds staged cycle files of an
// earlier forward (ship them first).
var ErrForwardPending = errors.New("cycle files of an earlier forward are still staged")

// ReadForwardCut reads the record of the cut staged in dir (false if none).
func ReadForwardCut(dir string) (ForwardResult, bool, error) {
	var res ForwardResult
	err := fsutil.ReadJSON(filepath.Join(dir, ForwardCutFile), &res)
	if errors.Is(err, fs.ErrNotExist) {
		return res, false, nil
	}
	return res, err == nil, err
}

// ForwardCut stages the group's latest point P as one cycle file per image in
// dir/ID/gGGGGGG-sSSSSSSSSSSSS.cyc (the tracker's layout: pass STORE/cycles
// of a directory tracker.Cycles lists), all images under one new group-cut
// UUID, with the record ForwardCutFile. The cut appears atomically: it is
// written into a temporary directory and renamed to dir, which must hold no
// staged cycle file (ErrForwardPending). If P is from.Point, nothing is
// written. P is pinned while it is read; every block read is checked against
// its recorded hash (ErrMismatch: nothing is staged).
func (r *Replica) ForwardCut(ctx context.Context, groupName string, from ForwardFrom, dir string) (res ForwardResult, err error) {
	g, err := r.group(groupName)
	if err != nil {
		return res, err
	}
	type fimage struct {
		id, name  string
		gen, seq  uint64
		size      uint64
		delta     bool
		parent    uint64
		changed   *roaring.Bitmap // delta: blocks to send
		unchanged bool
	}
	var (
		p    pointRec
		imgs []fimage
		pin  *Pin
	)
	// Snapshot P with the writer lock: no apply is half done, so every
	// image's state (its generation in particular) is the state at P.
	err = func() error {
		g.wmu.Lock()
		defer g.wmu.Unlock()
		if g.needRecover {
			return fmt.Errorf("group %s: %w (an interrupted apply; it completes with the next commit)", g.name, ErrPending)
		}
		g.mu.RLock()
		p, err = g.findPoint("latest")
		g.mu.RUnlock()
		if err != nil {
			return err
		}
		res = ForwardResult{Point: pointID(p.N), Time: p.Time, Gens: map[string]uint64{}, Seqs: maps.Clone(p.Seqs), AppConsistent: p.AppConsistent}
		if from.Point == res.Point {
			res.Gens = maps.Clone(from.Gens)
			return nil // forwarded already
		}
		if from.Owner != "" {
			if _, err := r.pinReplace(g, res.Point, from.Owner); err != nil {
				return err
			}
		}
		// In memory too, while it is read (not PinPoint: r.mu must not be
		// taken under g.wmu, see applyGroup).
		gp := r.pins.get(g)
		gp.mu.Lock()
		gp.open[p.N]++
		gp.mu.Unlock()
		pin = &Pin{gp: gp, n: p.N, group: g.name}
		g.mu.RLock()
		defer g.mu.RUnlock()
		var fp pointRec
		haveFrom := false
		if from.Point != "" {
			if fp, err = g.findPoint(from.Point); err == nil {
				haveFrom = true
			} else if !errors.Is(err, ErrNoPoint) {
				return err
			}
			// A point gone (its pin was lost): every image goes as a base.
		}
		for _, id := range slices.Sorted(maps.Keys(p.Seqs)) {
			im := g.images[id]
			if im == nil {
				continue
			}
			size, ok := im.sizeAt(p.N)
			if !ok {
				continue
			}
			if im.st.Seq != p.Seqs[id] || im.st.Applying {
				return fmt.Errorf("group %s image %s: state at cycle %d does not match the latest point (cycle %d)", g.name, id, im.st.Seq, p.Seqs[id])
			}
			fi := fimage{id: id, name: im.st.Name, gen: im.st.Generation, seq: p.Seqs[id], size: size}
			res.Gens[id] = fi.gen
			if haveFrom {
				fseq, inFrom := fp.Seqs[id]
				fsize, existed := im.sizeAt(fp.N)
				if gen, ok := from.Gens[id]; ok && inFrom && existed && gen == fi.gen && fseq <= fi.seq {
					fi.delta, fi.parent = true, fseq
					fi.unchanged = fseq == fi.seq
					if !fi.unchanged {
						if fi.changed, err = im.changedBetween(fp.N, p.N, fsize, size); err != nil {
							return err
						}
					}
				}
			}
			imgs = append(imgs, fi)
		}
		return nil
	}()
	if pin != nil {
		defer pin.Release()
	}
	if err != nil {
		return res, err
	}
	if from.Point == res.Point {
		return res, nil // forwarded already
	}
	if err := clearStaged(dir); err != nil {
		return res, err
	}
	tmp := fmt.Sprintf("%s.tmp-%s", dir, uuid.NewString()[:8])
	if err := os.MkdirAll(tmp, 0o700); err != nil {
		return res, err
	}
	defer func() {
		if err != nil {
			os.RemoveAll(tmp)
			res.Files = nil
		}
	}()
	gc := uuid.New()
	for _, fi := range imgs {
		if fi.unchanged {
			continue // the target holds this cycle already
		}
		if err = ctx.Err(); err != nil {
			return res, err
		}
		h := format.Header{ImageID: uuid.MustParse(fi.id), Generation: fi.gen, Seq: fi.seq, Parent: fi.parent,
			CutTime: p.Time, ImageSize: fi.size, GroupCut: gc, Name: fi.name}
		if !fi.delta {
			h.Flags, h.Parent = format.FlagBase, format.NoParent
			res.Base = true
		}
		if p.AppConsistent {
			h.Flags |= format.FlagAppConsistent
		}
		pr := &pointReader{g: g, id: fi.id, n: p.N, size: int64(fi.size)}
		name := fmt.Sprintf("g%06d-s%012d.cyc", fi.gen, fi.seq)
		var sum format.Summary
		if sum, err = writeForwardCycle(ctx, filepath.Join(tmp, fi.id), name, h, pr, fi.changed); err != nil {
			return res, fmt.Errorf("forwarding image %s (%s) of point %s: %w", fi.name, fi.id, res.Point, err)
		}
		res.Files = append(res.Files, filepath.Join(dir, fi.id, name))
		res.Blocks += sum.DataBlocks
		res.Bytes += sum.Bytes
	}
	if err = fsutil.WriteJSON(filepath.Join(tmp, ForwardCutFile), res); err != nil {
		return res, err
	}
	if err = fsutil.SyncDir(tmp); err != nil {
		return res, err
	}
	// The cut appears at once: dir holds no cycle file (clearStaged).
	if err = os.RemoveAll(dir); err != nil {
		return res, err
	}
	if err = os.Rename(tmp, dir); err != nil {
		return res, err
	}
	return res, fsutil.SyncDir(filepath.Dir(dir))
}

// clearStaged makes sure dir holds no staged cycle file (else
// ErrForwardPending) and removes the temporary directories of an
// interrupted ForwardCut.
func clearStaged(dir string) error {
	if olds, _ := filepath.Glob(dir + ".tmp-*"); len(olds) > 0 {
		for _, o := range olds {
			if err := os.RemoveAll(o); err != nil {
				return err
			}
		}
	}
	if err := os.MkdirAll(filepath.Dir(dir), 0o700); err != nil {
		return err
	}
	ms, err := filepath.Glob(filepath.Join(dir, "*", "*.cyc"))
	if err != nil {
		return err
	}
	if len(ms) > 0 {
		return fmt.Errorf("%s: %w (%d files)", dir, ErrForwardPending, len(ms))
	}
	return nil
}

// writeForwardCycle writes one forwarded cycle (.tmp, fsync, rename, fsync
// dir) into idir/name: the blocks of changed (a delta) or every non-zero
// block (a base, changed nil) of the image at the point pr reads, each
// checked against its recorded hash.
func writeForwardCycle(ctx context.Context, idir, name string, h format.Header, pr *pointReader, changed *roaring.Bitmap) (sum format.Summary, err error) {
	if err := os.MkdirAll(idir, 0o700); err != nil {
		return sum, err
	}
	final := filepath.Join(idir, name)
	tmp := final + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return sum, err
	}
	defer func() {
		if f != nil {
			f.Close()
		}
		if err != nil {
			os.Remove(tmp)
		}
	}()
	bw := bufio.NewWriterSize(f, 1<<20)
	w, err := format.NewWriter(bw, h, format.WriterOptions{Compress: true})
	if err != nil {
		return sum, err
	}
	defer w.Abort() // no-op after Close
	nb := blocksOf(h.ImageSize)
	const chunk = format.MaxExtentBlocks
	buf := make([]byte, chunk*format.BlockSize)
	hb := make([]byte, chunk*32)
	// emit reads blocks [lo, hi) at the point and writes them: a base only
	// its non-zero blocks, a delta all (zero blocks become zero extents).
	emit := func(lo, hi uint64) error {
		for b := lo; b < hi; {
			if err := ctx.Err(); err != nil {
				return err
			}
			n := min(chunk, hi-b)
			d := buf[:n*format.BlockSize]
			if err := pr.read(b, d, hb); err != nil {
				return err
			}
			for i := uint64(0); i < n; i++ {
				blk := d[i*format.BlockSize : (i+1)*format.BlockSize]
				if got := blockHash(blk); string(got[:]) != string(hb[i*32:(i+1)*32]) {
					return fmt.Errorf("block %d: %w", b+i, ErrMismatch)
				}
			}
			if changed != nil {
				if err := w.WriteBlocks(b, d); err != nil {
					return err
				}
			} else {
				for i := uint64(0); i < n; {
					if isZero(d[i*format.BlockSize : (i+1)*format.BlockSize]) {
						i++
						continue
					}
					j := i + 1
					for j < n && !isZero(d[j*format.BlockSize:(j+1)*format.BlockSize]) {
						j++
					}
					if err := w.WriteBlocks(b+i, d[i*format.BlockSize:j*format.BlockSize]); err != nil {
						return err
					}
					i = j
				}
			}
			b += n
		}
		return nil
	}
	if changed != nil {
		for lo, hi := range changed.Ranges() {
			if uint64(lo) >= nb {
				break
			}
			if err := emit(uint64(lo), min(hi, nb)); err != nil {
				return sum, err
			}
		}
	} else {
		// Only the ranges that may hold data (SEEK_DATA on the point).
		size := pr.size
		for off := int64(0); off < size; {
			d, err := pr.seekData(off, false)
			if errors.Is(err, syscall.ENXIO) {
				break
			}
			if err != nil {
				return sum, err
			}
			e, err := pr.seekData(d, true)
			if err != nil {
				return sum, err
			}
			lo, hi := uint64(d)/format.BlockSize, min(blocksOf(uint64(e)), nb)
			if lo >= hi {
				break
			}
			if err := emit(lo, hi); err != nil {
				return sum, err
			}
			off = int64(hi) * format.BlockSize
		}
	}
	if sum, err = w.Close(); err != nil {
		return sum, err
	}
	if err = bw.Flush(); err != nil {
		return sum, err
	}
	if err = f.Sync(); err != nil {
		return sum, err
	}
	if err = f.Close(); err != nil {
		f = nil
		return sum, err
	}
	f = nil
	if err = os.Rename(tmp, final); err != nil {
		return sum, err
	}
	return sum, fsutil.SyncDir(idir)
}

// changedBetween returns the blocks that may differ between points from < to
// of the image: every block of an undo log written by an apply in (from, to],
// plus the blocks gained or lost by a size change. Called with g.mu held.
func (im *image) changedBetween(from, to, sizeFrom, sizeTo uint64) (*roaring.Bitmap, error) {
	b := roaring.New()
	for _, l := range im.logs {
		if l.to <= from || l.from > to {
			continue
		}
		for _, e := range l.ents {
			if e.block >= 1<<32 {
				return nil, fmt.Errorf("image %s: block %d beyond the 16 TiB a forward supports", im.id, e.block)
			}
			b.Add(uint32(e.block))
		}
	}
	if sizeFrom != sizeTo {
		lo, hi := blocksOf(min(sizeFrom, sizeTo)), blocksOf(max(sizeFrom, sizeTo))
		if hi > 1<<32 {
			return nil, fmt.Errorf("image %s: too many blocks", im.id)
		}
		if lo > 0 {
			lo-- // the partial last block changes too
		}
		b.AddRange(lo, hi)
	}
	return b, nil
}

// PinForward durably pins point (an ID or "latest") of the group for owner
// (e.g. "forward:HOST:PORT"), replacing the owner's earlier pin in the same
// durable write: the new point is pinned before the old one is released.
// Retention keeps the point until UnpinForward.
func (r *Replica) PinForward(groupName, point, owner string) error {
	if owner == "" || strings.HasPrefix(owner, "test:") {
		return fmt.Errorf("pin owner %q: %w", owner, ErrBadName)
	}
	g, err := r.group(groupName)
	if err != nil {
		return err
	}
	_, err = r.pinReplace(g, point, owner)
	return err
}

// UnpinForward removes the durable pin of owner (idempotent).
func (r *Replica) UnpinForward(groupName, owner string) error {
	g, err := r.group(groupName)
	if err != nil {
		return err
	}
	return r.unpinDurable(g, owner)
}

// pinReplace is pinDurable that also drops every other pin of owner, in one
// durable write of pins.json.
func (r *Replica) pinReplace(g *group, point, owner string) (pointRec, error) {
	return r.pinWith(g, point, owner, true)
}
