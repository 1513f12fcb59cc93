package applier

// Prepared promotion: the copy a planned failover promotes is made while the
// VM still runs on the primary. PreparePromote materialises the latest point
// into the primary store's failover directory (ID.img.pre, with its block
// hashes in ID.hashes.pre, every block checked against its recorded hash) and
// pins that point. When the failover comes, Promote finds the prepared copy
// and only brings it forward: the blocks changed after the prepared point
// (undo logs of the later applies, ChangedAfter) are read at the promoted
// point, checked and written, their hashes updated; the root is computed from
// the hash file. So the VM is down for the final cycle and that delta, not
// for a copy of the whole image. Anything that does not fit (another point
// set, images, a generation change, a missing file) falls back to the full
// copy; the prepared files are a cache and never trusted beyond the hashes
// recorded when they were written.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/RoaringBitmap/roaring/v2"
	"golang.org/x/sys/unix"

	"github.com/standin/standin/internal/format"
	"github.com/standin/standin/internal/fsutil"
	"github.com/standin/standin/internal/wire"
)

const (
	prepareOwner = "promote-prepare" // durable pin of the prepared point
	preparedFile = "prepared.json"
)

type preparedRec struct {
	Group  string          `json:"group"`
	Point  uint64          `json:"point"`
	Time   time.Time       `json:"time"`
	Images []preparedImage `json:"images"`
}

type preparedImage struct {
	ID         string `json:"id"`
	Generation uint64 `json:"generation"`
	Seq        uint64 `json:"seq"`
	Size       int64  `json:"size"`
}

// PreparePromote copies the group's latest point into dstDir for a coming
// planned failover (see the file comment) and returns the point prepared;
// refreshed: an existing prepared copy was brought forward.
//
// If dstDir holds a prepared copy of the group already (an earlier
// preparation, or a warm standby kept after every apply), it is brought
// forward to the latest point instead: only the blocks changed since are
// copied.
func (r *Replica) PreparePromote(ctx context.Context, groupName, dstDir string) (point string, refreshed bool, err error) {
	point, err = r.preparePromote(ctx, groupName, dstDir, &refreshed)
	return point, refreshed, err
}

func (r *Replica) preparePromote(ctx context.Context, groupName, dstDir string, refreshed *bool) (string, error) {
	g, err := r.group(groupName)
	if err != nil {
		return "", err
	}
	if err := g.failedOver(); err != nil {
		return "", err
	}
	r.prepMu.Lock()
	defer r.prepMu.Unlock()
	r.preparedChanging(dstDir, false)
	if err := os.MkdirAll(dstDir, 0o700); err != nil {
		return "", err
	}
	if pt, err := r.refreshPrepared(ctx, g, dstDir); err == nil {
		*refreshed = true
		return pt, nil
	} else if !errors.Is(err, errNotPrepared) {
		r.o.Logger.Info("prepared copy not refreshable; copying the whole point", "group", g.name, "err", err)
	}
	os.Remove(filepath.Join(dstDir, preparedFile))
	p, err := r.pinWith(g, "latest", prepareOwner, true)
	if err != nil {
		return "", err
	}
	rec := preparedRec{Group: groupName, Point: p.N, Time: time.Now().UTC()}
	var prs []*pointReader
	g.mu.RLock()
	for _, id := range slices.Sorted(maps.Keys(p.Seqs)) {
		pr, e := g.openPoint(pointID(p.N), id)
		if e != nil {
			err = e
			break
		}
		prs = append(prs, pr)
		rec.Images = append(rec.Images, preparedImage{ID: id, Generation: g.images[id].st.Generation, Seq: p.Seqs[id], Size: pr.size})
	}
	g.mu.RUnlock()
	if err == nil && len(prs) == 0 {
		err = fmt.Errorf("group %s: point %s has no image", groupName, pointID(p.N))
	}
	if err != nil {
		r.unpinDurable(g, prepareOwner)
		return "", err
	}
	for _, pr := range prs {
		if err := writePrepared(ctx, g.name, pointID(p.N), pr, dstDir); err != nil {
			r.unpinDurable(g, prepareOwner)
			return "", err
		}
	}
	if err := fsutil.WriteJSON(filepath.Join(dstDir, preparedFile), rec); err != nil {
		r.unpinDurable(g, prepareOwner)
		return "", err
	}
	return pointID(p.N), nil
}

func writePrepared(ctx context.Context, group, point string, pr *pointReader, dstDir string) error {
	img := filepath.Join(dstDir, pr.id+".img.pre")
	f, err := os.OpenFile(img, os.O_CREATE|os.O_TRUNC|os.O_RDWR, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	hf, err := os.OpenFile(filepath.Join(dstDir, pr.id+".hashes.pre"), os.O_CREATE|os.O_TRUNC|os.O_RDWR, 0o600)
	if err != nil {
		return err
	}
	defer hf.Close()
	bw := bufio.NewWriterSize(hf, 1<<20)
	if _, err := writePoint(ctx, group, point, pr, f, bw); err != nil {
		return err
	}
	if err := bw.Flush(); err != nil {
		return err
	}
	return errors.Join(f.Sync(), hf.Sync())
}

var errNotPrepared = errors.New("no prepared copy")

// refreshPrepared brings an existing prepared copy in dstDir forward to the
// group's latest point (called with r.prepMu held). The blocks it rewrites
// are all in ChangedAfter(the recorded point), so a refresh interrupted
// before the new record is written is repaired by the next one (or the
// promotion), which copies at least those blocks again.
func (r *Replica) refreshPrepared(ctx context.Context, g *group, dstDir string) (string, error) {
	var rec preparedRec
	if err := fsutil.ReadJSON(filepath.Join(dstDir, preparedFile), &rec); err != nil {
		return "", errNotPrepared
	}
	pin, err := r.PinPoint(g.name, "latest")
	if err != nil {
		return "", err
	}
	defer pin.Release()
	n, _ := parsePointNumber(pin.Point())
	if n == rec.Point {
		return pin.Point(), nil
	}
	if rec.Group != g.name || n < rec.Point {
		return "", errors.New("another group, or a newer point")
	}
	changed, err := r.ChangedAfter(g.name, pointID(rec.Point))
	if err != nil {
		return "", err
	}
	next := preparedRec{Group: g.name, Point: n, Time: time.Now().UTC()}
	var prs []*pointReader
	g.mu.RLock()
	p, err := g.findPoint(pin.Point())
	if err == nil {
		for _, id := range slices.Sorted(maps.Keys(p.Seqs)) {
			pr, e := g.openPoint(pin.Point(), id)
			if e != nil {
				err = e
				break
			}
			prs = append(prs, pr)
			next.Images = append(next.Images, preparedImage{ID: id, Generation: g.images[id].st.Generation, Seq: p.Seqs[id], Size: pr.size})
		}
	}
	g.mu.RUnlock()
	if err != nil {
		return "", err
	}
	if len(next.Images) != len(rec.Images) {
		return "", errors.New("the group's images changed")
	}
	for i, im := range next.Images {
		if rec.Images[i].ID != im.ID || rec.Images[i].Generation != im.Generation {
			return "", fmt.Errorf("image %s: another image or generation", im.ID)
		}
	}
	for _, pr := range prs {
		if _, err := bringImage(ctx, g.name, pin.Point(), pr, dstDir, changed[pr.id]); err != nil {
			return "", err
		}
	}
	if _, err := r.pinWith(g, pin.Point(), prepareOwner, true); err != nil {
		return "", err
	}
	if err := fsutil.WriteJSON(filepath.Join(dstDir, preparedFile), next); err != nil {
		return "", err
	}
	return pin.Point(), nil
}

// CancelPrepared drops a prepared copy of group in dstDir and its pin.
func (r *Replica) CancelPrepared(groupName, dstDir string) error {
	g, err := r.group(groupName)
	if err != nil {
		return err
	}
	r.prepMu.Lock()
	defer r.prepMu.Unlock()
	r.preparedChanging(dstDir, true)
	r.dropPrepared(g, dstDir)
	return nil
}

func (r *Replica) dropPrepared(g *group, dstDir string) {
	var rec preparedRec
	if fsutil.ReadJSON(filepath.Join(dstDir, preparedFile), &rec) == nil {
		for _, im := range rec.Images {
			os.Remove(filepath.Join(dstDir, im.ID+".img.pre"))
			os.Remove(filepath.Join(dstDir, im.ID+".hashes.pre"))
		}
	}
	os.Remove(filepath.Join(dstDir, preparedFile))
	if err := r.unpinDurable(g, prepareOwner); err != nil {
		r.o.Logger.Warn("releasing the prepared point's pin", "group", g.name, "err", err)
	}
}

// fromPrepared promotes st's point from a prepared copy in dstDir; false:
// there is none that fits (the caller copies the whole point). prs are the
// point's readers in st.Images order.
func (r *Replica) fromPrepared(ctx context.Context, g *group, st FailoverState, prs []*pointReader, dstDir string) ([]PromotedImage, bool) {
	r.prepMu.Lock() // a scrub's verification of the copy holds no lock while it reads
	defer r.prepMu.Unlock()
	r.preparedChanging(dstDir, true)
	var rec preparedRec
	if err := fsutil.ReadJSON(filepath.Join(dstDir, preparedFile), &rec); err != nil {
		return nil, false
	}
	defer r.dropPrepared(g, dstDir)
	out, err := r.bringForward(ctx, g, st, prs, dstDir, rec)
	if err != nil {
		r.o.Logger.Warn("prepared copy not usable; copying the whole point", "group", g.name, "prepared_point", rec.Point, "err", err)
		return nil, false
	}
	r.o.Logger.Info("promoted from the prepared copy", "group", g.name, "prepared_point", rec.Point, "point", st.Point)
	return out, true
}

func (r *Replica) bringForward(ctx context.Context, g *group, st FailoverState, prs []*pointReader, dstDir string, rec preparedRec) ([]PromotedImage, error) {
	if rec.Group != g.name || len(rec.Images) != len(st.Images) {
		return nil, errors.New("another group or image set")
	}
	// The delta is "changed after the prepared point", read at the promoted
	// one: the promoted point must not be older.
	if n, ok := parsePointNumber(st.Point); !ok || n < rec.Point {
		return nil, fmt.Errorf("prepared point %d is newer than the promoted point %s", rec.Point, st.Point)
	}
	byID := map[string]preparedImage{}
	for _, im := range rec.Images {
		byID[im.ID] = im
	}
	for _, im := range st.Images {
		p, ok := byID[im.ID]
		if !ok || p.Generation != im.FromGeneration {
			return nil, fmt.Errorf("image %s: not prepared, or of another generation", im.ID)
		}
	}
	changed, err := r.ChangedAfter(g.name, pointID(rec.Point))
	if err != nil {
		return nil, err
	}
	var out []PromotedImage
	for i, im := range st.Images {
		root, err := bringImage(ctx, g.name, st.Point, prs[i], dstDir, changed[im.ID])
		if err != nil {
			return nil, fmt.Errorf("image %s: %w", im.ID, err)
		}
		out = append(out, PromotedImage{ID: im.ID, Name: im.Name, Generation: im.Generation, Seq: im.Seq, Size: prs[i].size,
			Path: filepath.Join(dstDir, im.ID+".img"), Root: root, Prepared: true})
	}
	for _, p := range out {
		if err := os.Rename(filepath.Join(dstDir, p.ID+".img.pre"), p.Path); err != nil {
			return nil, err
		}
	}
	return out, fsutil.SyncDir(dstDir)
}

// bringImage applies the changed blocks (read at the point, checked) to the
// prepared copy and its hash file and returns the root.
func bringImage(ctx context.Context, group, point string, pr *pointReader, dstDir string, changed *roaring.Bitmap) ([32]byte, error) {
	f, err := os.OpenFile(filepath.Join(dstDir, pr.id+".img.pre"), os.O_RDWR, 0)
	if err != nil {
		return [32]byte{}, err
	}
	defer f.Close()
	hf, err := os.OpenFile(filepath.Join(dstDir, pr.id+".hashes.pre"), os.O_RDWR, 0)
	if err != nil {
		return [32]byte{}, err
	}
	defer hf.Close()
	size := pr.size
	nb := blocksOf(uint64(size))
	if err := f.Truncate(size); err != nil {
		return [32]byte{}, err
	}
	if err := hf.Truncate(int64(nb) * 32); err != nil {
		return [32]byte{}, err
	}
	var blocks []uint32
	if changed != nil {
		blocks = changed.ToArray()
	}
	buf := make([]byte, promoteRun*format.BlockSize)
	rec := make([]byte, promoteRun*32)
	for i := 0; i < len(blocks); {
		if err := ctx.Err(); err != nil {
			return [32]byte{}, err
		}
		b0 := uint64(blocks[i])
		if b0 >= nb {
			break
		}
		j := i + 1
		for j < len(blocks) && uint64(blocks[j]) == b0+uint64(j-i) && j-i < promoteRun && uint64(blocks[j]) < nb {
			j++
		}
		n := uint64(j - i)
		if err := pr.read(b0, buf[:n*format.BlockSize], rec[:n*32]); err != nil {
			return [32]byte{}, err
		}
		base := int64(b0) * format.BlockSize
		valid := min(int64(n)*format.BlockSize, size-base)
		for k := uint64(0); k < n; k++ {
			lo := int64(k) * format.BlockSize
			blk := buf[lo:min(lo+format.BlockSize, valid)]
			h := wire.BlockHash(blk)
			if string(h[:]) != string(rec[k*32:(k+1)*32]) {
				return [32]byte{}, fmt.Errorf("group %s point %s image %s block %d: read %x, recorded %x: %w",
					group, point, pr.id, b0+k, h[:8], rec[k*32:k*32+8], ErrMismatch)
			}
			if h == ([32]byte{}) {
				if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, base+lo, format.BlockSize); err != nil {
					if _, err := f.WriteAt(blk, base+lo); err != nil { // no hole punching: write the zeros
						return [32]byte{}, err
					}
				}
			} else if _, err := f.WriteAt(blk, base+lo); err != nil {
				return [32]byte{}, err
			}
		}
		if _, err := hf.WriteAt(rec[:n*32], int64(b0)*32); err != nil {
			return [32]byte{}, err
		}
		i = j
	}
	if err := f.Sync(); err != nil {
		return [32]byte{}, err
	}
	if err := hf.Sync(); err != nil {
		return [32]byte{}, err
	}
	rt := wire.NewRooter(size)
	if _, err := hf.Seek(0, io.SeekStart); err != nil {
		return [32]byte{}, err
	}
	if _, err := io.Copy(rt, bufio.NewReaderSize(hf, 1<<20)); err != nil {
		return [32]byte{}, err
	}
	return rt.Sum(), nil
}
