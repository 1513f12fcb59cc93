package applier

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"time"

	"github.com/standin/standin/internal/format"
	"github.com/standin/standin/internal/fsutil"
)

// Point is a recovery point of a group.
type Point struct {
	ID    string            `json:"point"`
	Time  time.Time         `json:"time"`  // cut time of the cycles it was made from
	Cycle uint64            `json:"cycle"` // seq of the first cycle of the apply that made it
	Seqs  map[string]uint64 `json:"seqs"`  // image id → seq
	Kind  string            `json:"kind"`  // "latest", "every" (one per Every-slot), "any" (AnyPointWindow), "pinned" (held by a pin only)
	// Bytes is the size of the undo logs that hold this point's content for
	// the blocks changed after it (up to the next retained point): what
	// expiring this point would let retention merge away, at most.
	Bytes int64 `json:"bytes"`
	// AppConsistent: cut while the group's applications were quiesced
	// (freeze command before the cut, thaw right after its barrier).
	AppConsistent bool `json:"app_consistent"`
}

// PointReader reads one image at one recovery point. Reads see the point
// exactly, also while cycles are applied; once retention expires the point,
// reads fail with ErrPointGone.
type PointReader interface {
	io.ReaderAt
	Size() int64
	Close() error
}

func pointID(n uint64) string { return strconv.FormatUint(n, 10) }

// rlockPoint finds the group and its point and returns with g.mu
// read-locked (the caller releases it), unless it fails.
func (r *Replica) rlockPoint(groupName, point string) (*group, pointRec, error) {
	g, err := r.group(groupName)
	if err != nil {
		return nil, pointRec{}, err
	}
	g.mu.RLock()
	p, err := g.findPoint(point)
	if err != nil {
		g.mu.RUnlock()
		return nil, pointRec{}, err
	}
	return g, p, nil
}

// findPoint resolves a point ID ("latest" or a number). Called with g.mu held.
func (g *group) findPoint(id string) (pointRec, error) {
	if g.loadErr != nil {
		return pointRec{}, fmt.Errorf("group %s: %w", g.name, g.loadErr)
	}
	ps := g.pts.Points
	if len(ps) == 0 {
		return pointRec{}, fmt.Errorf("group %s has no recovery point yet: %w", g.name, ErrNoPoint)
	}
	if id == "latest" || id == "" {
		return ps[len(ps)-1], nil
	}
	n, err := strconv.ParseUint(id, 10, 64)
	if err != nil || pointID(n) != id {
		return pointRec{}, fmt.Errorf("point %q: %w", id, ErrBadName)
	}
	for _, p := range ps {
		if p.N == n {
			return p, nil
		}
	}
	return pointRec{}, fmt.Errorf("point %s of group %s: %w", id, g.name, ErrNoPoint)
}

func (g *group) hasPoint(n uint64) bool {
	for _, p := range g.pts.Points {
		if p.N == n {
			return true
		}
	}
	return false
}

// Points lists the group's recovery points, oldest first; the last one is the
// latest (kind "latest"; OpenPoint also accepts the ID "latest").
func (r *Replica) Points(groupName string) ([]Point, error) {
	g, err := r.group(groupName)
	if err != nil {
		return nil, err
	}
	g.mu.RLock()
	defer g.mu.RUnlock()
	if g.loadErr != nil {
		return nil, fmt.Errorf("group %s: %w", g.name, g.loadErr)
	}
	out := make([]Point, len(g.pts.Points))
	for i, p := range g.pts.Points {
		out[i] = Point{ID: pointID(p.N), Time: p.Time, Cycle: p.Cycle, Seqs: p.Seqs, Kind: p.Kind, AppConsistent: p.AppConsistent}
		if i == len(out)-1 {
			out[i].Kind = "latest"
			continue
		}
		next := g.pts.Points[i+1].N
		for _, im := range g.images {
			for _, l := range im.logs {
				if l.from > p.N && l.to <= next {
					out[i].Bytes += l.size
				}
			}
		}
	}
	return out, nil
}

// imageAt resolves an image by id or name among the images of point p.
// Called with g.mu held.
func (g *group) imageAt(p pointRec, name string) (*image, error) {
	if imageIDOK(name) {
		if _, ok := p.Seqs[name]; ok && g.images[name] != nil {
			return g.images[name], nil
		}
		return nil, fmt.Errorf("image %s at point %s: %w", name, pointID(p.N), ErrNoImage)
	}
	if err := checkName("image", name); err != nil {
		return nil, err
	}
	var found *image
	for id := range p.Seqs {
		if im := g.images[id]; im != nil && im.st.Name == name {
			if found != nil {
				return nil, fmt.Errorf("image name %q is ambiguous in group %s; use the image id", name, g.name)
			}
			found = im
		}
	}
	if found == nil {
		return nil, fmt.Errorf("image %q at point %s: %w", name, pointID(p.N), ErrNoImage)
	}
	return found, nil
}

// pointImage is one image of a point, with its size there.
type pointImage struct {
	id   string
	im   *image
	size uint64
}

// imagesAt lists the images (seqs: the point's image ids) of point n that
// can be read, in id order. Called with g.mu held.
func (g *group) imagesAt(n uint64, seqs map[string]uint64) []pointImage {
	var out []pointImage
	for _, id := range slices.Sorted(maps.Keys(seqs)) {
		im := g.images[id]
		if im == nil {
			continue
		}
		if size, ok := im.sizeAt(n); ok {
			out = append(out, pointImage{id, im, size})
		}
	}
	return out
}

// sizeAt returns the image's size at point n and whether it existed.
// Called with g.mu held.
func (im *image) sizeAt(n uint64) (uint64, bool) {
	for _, l := range im.logs {
		if l.to > n {
			return l.oldSize, !l.absent
		}
	}
	return im.st.Size, im.st.Present
}

// find returns the undo entry holding block b at point n: the entry of the
// earliest undo log after n that has b. Called with g.mu held.
func (im *image) find(n, b uint64) (*undoLog, *undoEntry) {
	for _, l := range im.logs {
		if l.to <= n {
			continue
		}
		if e := l.lookup(b); e != nil {
			return l, e
		}
	}
	return nil, nil
}

// readBlocks fills buf (whole blocks) with blocks b0.. at point n, and hb
// (32 bytes per block, if not nil) with their recorded hashes. Called with
// g.mu held.
func (im *image) readBlocks(n, b0 uint64, buf, hb []byte) error {
	nb := uint64(len(buf) / format.BlockSize)
	if hb != nil {
		if err := readFullAt(im.hashes, hb[:nb*32], int64(b0)*32); err != nil {
			return err
		}
	}
	for i := uint64(0); i < nb; {
		if l, e := im.find(n, b0+i); e != nil {
			if err := l.readEntry(e, buf[i*format.BlockSize:]); err != nil {
				return err
			}
			if hb != nil {
				copy(hb[i*32:], e.hash[:])
			}
			i++
			continue
		}
		j := i + 1
		for j < nb {
			if _, e := im.find(n, b0+j); e != nil {
				break
			}
			j++
		}
		if err := readFullAt(im.img, buf[i*format.BlockSize:j*format.BlockSize], int64(b0+i)*format.BlockSize); err != nil {
			return err
		}
		i = j
	}
	return nil
}

type pointReader struct {
	g    *group
	id   string
	n    uint64
	size int64
	buf  []byte
}

// OpenPoint opens one image (by id, or by name when the name is a valid
// store name) of a recovery point ("latest" or a point ID) for reading.
func (r *Replica) OpenPoint(groupName, point, imageName string) (PointReader, error) {
	g, err := r.group(groupName)
	if err != nil {
		return nil, err
	}
	g.mu.RLock()
	defer g.mu.RUnlock()
	return g.openPoint(point, imageName)
}

func (g *group) openPoint(point, imageName string) (*pointReader, error) {
	p, err := g.findPoint(point)
	if err != nil {
		return nil, err
	}
	im, err := g.imageAt(p, imageName)
	if err != nil {
		return nil, err
	}
	size, ok := im.sizeAt(p.N)
	if !ok {
		return nil, fmt.Errorf("image %s at point %s: %w", im.id, pointID(p.N), ErrNoImage)
	}
	return &pointReader{g: g, id: im.id, n: p.N, size: int64(size)}, nil
}

func (pr *pointReader) Size() int64  { return pr.size }
func (pr *pointReader) Close() error { return nil }

// ReadAt implements io.ReaderAt; whole aligned blocks are read straight into
// p, only a partial first or last block goes through a block-sized buffer.
// It is safe for concurrent use.
func (pr *pointReader) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, errors.New("negative offset")
	}
	if off >= pr.size {
		return 0, io.EOF
	}
	want := len(p)
	if int64(want) > pr.size-off {
		p = p[:pr.size-off]
	}
	const chunk = 256 // blocks per group lock hold
	var tmp []byte
	done := 0
	for done < len(p) {
		o := off + int64(done)
		b := uint64(o / format.BlockSize)
		skip := int(o % format.BlockSize)
		if skip != 0 || len(p)-done < format.BlockSize {
			if tmp == nil {
				tmp = make([]byte, format.BlockSize)
			}
			if err := pr.read(b, tmp, nil); err != nil {
				return done, err
			}
			done += copy(p[done:], tmp[skip:])
			continue
		}
		n := min((len(p)-done)/format.BlockSize, chunk)
		if err := pr.read(b, p[done:done+n*format.BlockSize], nil); err != nil {
			return done, err
		}
		done += n * format.BlockSize
	}
	if done < want {
		return done, io.EOF
	}
	return done, nil
}

func (pr *pointReader) read(b0 uint64, buf, hb []byte) error {
	g := pr.g
	g.mu.RLock()
	defer g.mu.RUnlock()
	im := g.images[pr.id]
	if !g.hasPoint(pr.n) || im == nil {
		return fmt.Errorf("point %s of group %s: %w", pointID(pr.n), g.name, ErrPointGone)
	}
	return im.readBlocks(pr.n, b0, buf, hb)
}

// Export writes one image at a point to dst as a sparse raw file (zero blocks
// are holes). dst is replaced atomically.
func (r *Replica) Export(ctx context.Context, groupName, point, imageName, dst string) error {
	// Pinned while it is read: retention (a cycle applied meanwhile) keeps it.
	pin, err := r.PinPoint(groupName, point)
	if err != nil {
		return err
	}
	defer pin.Release()
	pr, err := r.OpenPoint(groupName, pin.Point(), imageName)
	if err != nil {
		return err
	}
	defer pr.Close()
	return fsutil.WriteAtomicOpts(dst, fsutil.AtomicOptions{Perm: 0o600}, func(w io.Writer) error {
		f, ok := w.(sparseFile)
		if !ok {
			return fmt.Errorf("export to %s: the temporary file cannot be written sparsely", dst)
		}
		return exportSparse(ctx, pr, f)
	})
}

// sparseFile is what exportSparse writes to (the temporary *os.File).
type sparseFile interface {
	io.WriterAt
	Truncate(int64) error
}

// exportSparse copies pr to f (of pr's size) block by block, leaving zero
// blocks as holes.
func exportSparse(ctx context.Context, pr PointReader, f sparseFile) error {
	size := pr.Size()
	if err := f.Truncate(size); err != nil {
		return err
	}
	buf := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		if err := ctx.Err(); err != nil {
			return err
		}
		n, rerr := pr.ReadAt(buf, off)
		if rerr != nil && !(errors.Is(rerr, io.EOF) && off+int64(n) == size) {
			return rerr
		}
		for b := 0; b < n; b += format.BlockSize {
			blk := buf[b:min(b+format.BlockSize, n)]
			if isZero(blk) {
				continue
			}
			if _, err := f.WriteAt(blk, off+int64(b)); err != nil {
				return err
			}
		}
	}
	return nil
}

// VerifyReport is the result of VerifyPoint.
type VerifyReport struct {
	Group    string         `json:"group"`
	Point    string         `json:"point"`
	Images   int            `json:"images"`
	Blocks   uint64         `json:"blocks"` // blocks checked
	Mismatch *BlockMismatch `json:"mismatch,omitempty"`
}

// BlockMismatch is the first block whose content does not match its hash.
type BlockMismatch struct {
	Image string `json:"image"`
	Block uint64 `json:"block"`
	Want  string `json:"want"` // recorded hash (all zero = zero block)
	Got   string `json:"got"`
}

// VerifyPoint re-reads every block of every image of a point and compares it
// with the block hash recorded when the data arrived. A mismatch is reported
// in the report and as ErrMismatch.
func (r *Replica) VerifyPoint(ctx context.Context, groupName, point string) (VerifyReport, error) {
	return r.verifyPoint(ctx, groupName, point, nil)
}

// verifyPoint is VerifyPoint; pace (if not nil) is called with the bytes
// about to be read (the scrub's throttle).
func (r *Replica) verifyPoint(ctx context.Context, groupName, point string, pace func(context.Context, int64) error) (VerifyReport, error) {
	rep := VerifyReport{Group: groupName, Point: point}
	g, err := r.group(groupName)
	if err != nil {
		return rep, err
	}
	// Pinned while it is read: retention (a cycle applied meanwhile) keeps it.
	pin, err := r.PinPoint(groupName, point)
	if err != nil {
		return rep, err
	}
	defer pin.Release()
	point = pin.Point()
	g.mu.RLock()
	p, err := g.findPoint(point)
	var prs []*pointReader
	if err == nil {
		rep.Point = pointID(p.N)
		for _, id := range slices.Sorted(maps.Keys(p.Seqs)) {
			pr, e := g.openPoint(rep.Point, id)
			if e != nil {
				err = e
				break
			}
			prs = append(prs, pr)
		}
	}
	g.mu.RUnlock()
	if err != nil {
		return rep, err
	}
	const chunk = 256
	buf := make([]byte, chunk*format.BlockSize)
	hb := make([]byte, chunk*32)
	for _, pr := range prs {
		rep.Images++
		nb := blocksOf(uint64(pr.size))
		for b := uint64(0); b < nb; b += chunk {
			if err := ctx.Err(); err != nil {
				return rep, err
			}
			n := min(chunk, nb-b)
			if pace != nil {
				if err := pace(ctx, int64(n)*format.BlockSize); err != nil {
					return rep, err
				}
			}
			if err := pr.read(b, buf[:n*format.BlockSize], hb); err != nil {
				return rep, err
			}
			for i := uint64(0); i < n; i++ {
				got := blockHash(buf[i*format.BlockSize : (i+1)*format.BlockSize])
				rep.Blocks++
				if string(got[:]) != string(hb[i*32:(i+1)*32]) {
					rep.Mismatch = &BlockMismatch{Image: pr.id, Block: b + i, Want: hex.EncodeToString(hb[i*32 : (i+1)*32]), Got: hex.EncodeToString(got[:])}
					return rep, fmt.Errorf("group %s point %s image %s block %d: %w", groupName, rep.Point, pr.id, b+i, ErrMismatch)
				}
			}
		}
	}
	return rep, nil
}

// retain applies the group's retention policy: it decides the points kept,
// writes points.json, then per image deletes undo logs older than the oldest
// kept point and merges the logs between two kept points into one. Every
// step is idempotent and leaves a readable store (docs/replica.md). Called
// with g.wmu held.
func (r *Replica) retain(g *group) (dropped []string, reclaimed int64, err error) {
	ps := g.pts.Points
	if len(ps) == 0 {
		return nil, 0, nil
	}
	// Pinned points are kept; the pin lock is held until points.json and
	// g.pts say what is kept (pins.go).
	pinned, unlockPins := r.lockPins(g)
	defer unlockPins()
	ret := g.meta.Retention.withDefaults()
	now := r.o.Now()
	kinds := make([]string, len(ps))
	kinds[len(ps)-1] = "latest"
	every := int64(ret.Every)
	nowSlot := floorDiv(now.UnixNano(), every)
	best := map[int64]int{}
	for i, p := range ps {
		s := floorDiv(p.Time.UnixNano(), every)
		if s <= nowSlot-int64(ret.Points) {
			continue
		}
		if j, ok := best[s]; !ok || preferPoint(p, ps[j]) {
			best[s] = i
		}
	}
	for _, i := range best {
		if kinds[i] == "" {
			kinds[i] = "every"
		}
	}
	if ret.AnyPointWindow > 0 {
		for i, p := range ps {
			if kinds[i] == "" && now.Sub(p.Time) < ret.AnyPointWindow {
				kinds[i] = "any"
			}
		}
	}
	for i, p := range ps {
		if kinds[i] == "" && pinned(p.N) {
			kinds[i] = "pinned"
		}
	}
	var kept []pointRec
	changed := false
	for i, p := range ps {
		if kinds[i] == "" {
			dropped = append(dropped, pointID(p.N))
			changed = true
			continue
		}
		if p.Kind != kinds[i] {
			changed = true
		}
		p.Kind = kinds[i]
		kept = append(kept, p)
	}
	if changed {
		pf := pointsFile{Next: g.pts.Next, Points: kept}
		if err := fsutil.WriteJSON(filepath.Join(g.dir, "points.json"), pf); err != nil {
			return nil, 0, err
		}
		g.mu.Lock()
		g.pts = pf
		g.mu.Unlock()
		if err := r.hook("retain-points"); err != nil {
			return dropped, 0, err
		}
	}
	unlockPins()
	K := make([]uint64, len(kept))
	for i, p := range kept {
		K[i] = p.N
	}
	ids := make([]string, 0, len(g.images))
	for id := range g.images {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	for _, id := range ids {
		n, err := r.compact(g, g.images[id], K)
		reclaimed += n
		if err != nil {
			return dropped, reclaimed, err
		}
	}
	n, err := r.dropRetired(g, kept)
	return dropped, reclaimed + n, err
}

func floorDiv(a, b int64) int64 {
	q := a / b
	if a%b != 0 && a < 0 {
		q--
	}
	return q
}

// compact deletes im's undo logs that only serve points older than K[0] and
// merges the logs between consecutive kept points K[i-1] < K[i] into one.
func (r *Replica) compact(g *group, im *image, K []uint64) (reclaimed int64, err error) {
	var old []*undoLog
	buckets := map[int][]*undoLog{}
	for _, l := range im.logs {
		if l.to <= K[0] {
			old = append(old, l)
			continue
		}
		i, _ := slices.BinarySearch(K, l.to) // first K[i] >= l.to
		if i == len(K) {
			continue // beyond the latest point: an apply in progress
		}
		buckets[i] = append(buckets[i], l)
	}
	if len(old) > 0 {
		if err := r.dropLogs(g, im, old, nil); err != nil {
			return reclaimed, err
		}
		for _, l := range old {
			reclaimed += l.size
		}
	}
	keys := make([]int, 0, len(buckets))
	for k, ls := range buckets {
		if len(ls) > 1 {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	for _, k := range keys {
		ls := buckets[k]
		merged, err := mergeUndo(filepath.Join(im.dir, "undo"), ls, r.hook)
		if err != nil {
			return reclaimed, err
		}
		if err := r.hook("merge-written"); err != nil {
			merged.close()
			return reclaimed, err
		}
		if err := r.dropLogs(g, im, ls, merged); err != nil {
			return reclaimed, err
		}
		for _, l := range ls {
			reclaimed += l.size
		}
		reclaimed -= merged.size
	}
	return reclaimed, nil
}

// dropLogs removes logs from im (replacing them by merged, if not nil) in
// memory, then deletes their files and syncs the directory.
func (r *Replica) dropLogs(g *group, im *image, logs []*undoLog, merged *undoLog) error {
	g.mu.Lock()
	keep := im.logs[:0:0]
	for _, l := range im.logs {
		if !slices.Contains(logs, l) {
			keep = append(keep, l)
		}
	}
	if merged != nil {
		keep = append(keep, merged)
		slices.SortFunc(keep, func(a, b *undoLog) int { return cmpU64(a.from, b.from) })
	}
	im.logs = keep
	g.mu.Unlock()
	for i, l := range logs {
		l.close()
		if err := os.Remove(l.path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		if i == 0 {
			if err := r.hook("undo-delete"); err != nil {
				return err
			}
		}
	}
	return fsutil.SyncDir(filepath.Join(im.dir, "undo"))
}
