package applier

// Failover (docs/replica.md, "Failover").
//
// Promote: the replica's copy of a group becomes the primary on this host.
// GROUP/failover.json is written durably first; from then on the group takes
// no replication from a primary (applies, seed commits and the server's
// replication endpoints are refused with ErrFailedOver) while its points stay
// readable. Then every image of the promoted point is materialised into a
// plain sparse file, checked block by block against the recorded hashes.
//
// Adopt: this host becomes a replica again. The adopted files (the primary's
// images at a known cut) become the group's newest point, keeping the
// history: for an image the group already holds, undo log N saves the old
// content of every block whose hash differs, then latest.img and hashes.bin
// are replaced by renames under a commit record (GROUP/adopt.json) that
// recovery rolls forward; without the record it rolls back.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/standin/standin/internal/format"
	"github.com/standin/standin/internal/fsutil"
	"github.com/standin/standin/internal/wire"
)

// ErrFailedOver: the group's copy on this host was promoted to be the
// primary; it takes no replication until it is adopted again (Adopt) or the
// promotion is abandoned (Unpromote). Errors wrapping it are *FailedOverError.
var ErrFailedOver = errors.New("replication group failed over")

// FailoverState is GROUP/failover.json: the group was promoted on this host.
type FailoverState struct {
	Kind   string          `json:"kind"`  // "planned" or "unplanned"
	Time   time.Time       `json:"time"`  // when it was promoted
	Point  string          `json:"point"` // the point promoted (point ID)
	Images []FailoverImage `json:"images"`
	Peer   string          `json:"peer,omitempty"` // name of the old primary (informational)
}

// FailoverImage is one image of a promoted point.
type FailoverImage struct {
	ID             string `json:"id"`
	Name           string `json:"name"`
	FromGeneration uint64 `json:"from_generation"` // generation the replica held (the newest it has of the image)
	Seq            uint64 `json:"seq"`             // cut of the promoted point
	Generation     uint64 `json:"generation"`      // generation of the new primary = FromGeneration+1
}

func (st FailoverState) clone() *FailoverState {
	st.Images = slices.Clone(st.Images)
	return &st
}

// FailedOverError refuses replication into a failed-over group; its message
// says what each side has.
type FailedOverError struct {
	Group string
	State FailoverState
}

func (e *FailedOverError) Unwrap() error { return ErrFailedOver }

func (e *FailedOverError) Error() string {
	st := e.State
	var what string
	same := len(st.Images) > 0
	for _, im := range st.Images {
		if im.Seq != st.Images[0].Seq || im.FromGeneration != st.Images[0].FromGeneration || im.Generation != st.Images[0].Generation {
			same = false
		}
	}
	if same {
		im := st.Images[0]
		what = fmt.Sprintf("cycle %d, generation %d→%d", im.Seq, im.FromGeneration, im.Generation)
	} else {
		var parts []string
		for _, im := range st.Images {
			parts = append(parts, fmt.Sprintf("%s cycle %d, generation %d→%d", im.Name, im.Seq, im.FromGeneration, im.Generation))
		}
		what = strings.Join(parts, "; ")
	}
	return fmt.Sprintf("group %s failed over to this host at point %s (%s) on %s (%s failover); this primary is stale: its writes after that point are not here. "+
		"To make it the replica of the new primary run 'standin failover reverse --group %s' on it",
		e.Group, st.Point, what, st.Time.UTC().Format(time.RFC3339), st.Kind, e.Group)
}

func failoverPath(g *group) string { return filepath.Join(g.dir, "failover.json") }

// readFailover reads GROUP/failover.json (nil if there is none).
func readFailover(dir string) (*FailoverState, error) {
	var st FailoverState
	if err := fsutil.ReadJSON(filepath.Join(dir, "failover.json"), &st); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, nil
		}
		return nil, fmt.Errorf("failover.json: %w", err)
	}
	return &st, nil
}

// failedOver returns the refusal for a failed-over group, else nil. Called
// with g.mu held.
func (g *group) failedOver() error {
	if g.fo == nil {
		return nil
	}
	return &FailedOverError{Group: g.name, State: *g.fo.clone()}
}

// Failover returns the group's failover state; ok is false when the group
// was not failed over to this host (or does not exist).
func (r *Replica) Failover(groupName string) (FailoverState, bool, error) {
	if err := checkName("group", groupName); err != nil {
		return FailoverState{}, false, err
	}
	r.mu.Lock()
	g := r.groups[groupName]
	r.mu.Unlock()
	if g == nil {
		return FailoverState{}, false, nil
	}
	g.mu.RLock()
	defer g.mu.RUnlock()
	if g.fo == nil {
		return FailoverState{}, false, nil
	}
	return *g.fo.clone(), true, nil
}

// PromotedImage is one materialised image of a promoted point.
type PromotedImage struct {
	ID         string   `json:"id"`
	Name       string   `json:"name"`
	Generation uint64   `json:"generation"` // new generation (held + 1)
	Seq        uint64   `json:"seq"`        // cut of the promoted point
	Size       int64    `json:"size"`       // bytes
	Path       string   `json:"path"`       // the materialised file
	Root       [32]byte `json:"root"`       // wire root of the bytes written (wire.Rooter)
	// Prepared: brought forward from a copy made by PreparePromote (only
	// the blocks changed since were copied).
	Prepared bool `json:"prepared,omitempty"`
}

// Promote marks the group failed over (failover.json, durable, before
// anything else) and materialises every image of point ("" or "latest" =
// the latest point; a point ID or a time as for ResolvePoint) into
// dstDir/ID.img: sparse (holes and all-zero blocks are not written),
// truncated to the image size, fsynced, renamed into place, dstDir fsynced.
// Every block read is hashed and compared with its recorded hash; a
// difference fails with ErrMismatch. The point is pinned while it is read.
//
// If failover.json exists for the same point and kind, Promote only
// re-materialises (idempotent); for another point or kind it is refused.
// When a Promote that wrote failover.json fails (a mismatch, an I/O error, ctx
// cancelled), it removes failover.json again: nothing was promoted.
func (r *Replica) Promote(ctx context.Context, groupName, point, kind, peer, dstDir string) ([]PromotedImage, error) {
	if kind != "planned" && kind != "unplanned" {
		return nil, fmt.Errorf("failover kind %q: want planned or unplanned", kind)
	}
	if dstDir == "" {
		return nil, errors.New("promote: no destination directory")
	}
	if point != "" && point != "latest" {
		if _, ok := parsePointNumber(point); !ok {
			// A time: resolve it now (r.mu may not be taken under g.wmu).
			p, err := r.ResolvePoint(groupName, point)
			if err != nil {
				return nil, err
			}
			point = p.ID
		}
	}
	g, err := r.group(groupName)
	if err != nil {
		return nil, err
	}
	g.wmu.Lock()
	st, pin, created, err := r.markPromoted(g, point, kind, peer)
	g.wmu.Unlock()
	if err != nil {
		return nil, err
	}
	defer pin.Release()
	out, err := r.materialise(ctx, g, st, dstDir)
	if err != nil && created {
		g.wmu.Lock()
		if g.fo != nil && g.fo.Time.Equal(st.Time) && g.fo.Point == st.Point {
			if cerr := r.clearFailover(g); cerr != nil {
				err = fmt.Errorf("%w (and removing failover.json failed: %v)", err, cerr)
			}
		}
		g.wmu.Unlock()
	}
	return out, err
}

// markPromoted writes failover.json for point (unless it exists for the same
// point and kind) and pins the point. Called with g.wmu held.
func (r *Replica) markPromoted(g *group, point, kind, peer string) (st FailoverState, pin *Pin, created bool, err error) {
	if err := r.recoverIfNeeded(g); err != nil {
		return st, nil, false, err
	}
	g.mu.RLock()
	p, err := g.findPoint(point)
	cur := g.fo
	var imgs []FailoverImage
	if err == nil {
		for _, x := range g.imagesAt(p.N, p.Seqs) {
			imgs = append(imgs, FailoverImage{ID: x.id, Name: x.im.st.Name, FromGeneration: x.im.st.Generation,
				Seq: p.Seqs[x.id], Generation: x.im.st.Generation + 1})
		}
	}
	if cur != nil {
		cur = cur.clone()
	}
	g.mu.RUnlock()
	if err != nil {
		return st, nil, false, err
	}
	if len(imgs) == 0 {
		return st, nil, false, fmt.Errorf("point %s of group %s has no image: %w", pointID(p.N), g.name, ErrNoImage)
	}
	if cur != nil && (cur.Point != pointID(p.N) || cur.Kind != kind) {
		return st, nil, false, fmt.Errorf("promoting point %s (%s) refused: %w", pointID(p.N), kind, &FailedOverError{Group: g.name, State: *cur})
	}
	if pin, err = r.pinNumber(g, p.N); err != nil {
		return st, nil, false, err
	}
	if cur != nil {
		return *cur, pin, false, nil
	}
	st = FailoverState{Kind: kind, Time: r.o.Now().UTC(), Point: pointID(p.N), Images: imgs, Peer: peer}
	if err := fsutil.WriteJSON(failoverPath(g), st); err != nil {
		pin.Release()
		return st, nil, false, err
	}
	g.mu.Lock()
	g.fo = st.clone()
	g.mu.Unlock()
	r.o.Logger.Info("replication group failed over to this host", "group", g.name, "point", st.Point, "kind", kind, "peer", peer)
	if err := r.hook("promote-marker"); err != nil {
		pin.Release()
		return st, nil, false, err
	}
	return st, pin, true, nil
}

// pinNumber pins point n of g in memory (PinPoint without r.mu, which must
// not be taken under g.wmu).
func (r *Replica) pinNumber(g *group, n uint64) (*Pin, error) {
	gp := r.pins.get(g)
	gp.mu.Lock()
	defer gp.mu.Unlock()
	g.mu.RLock()
	ok := g.hasPoint(n)
	g.mu.RUnlock()
	if !ok {
		return nil, fmt.Errorf("point %s of group %s: %w", pointID(n), g.name, ErrNoPoint)
	}
	gp.open[n]++
	return &Pin{gp: gp, n: n, group: g.name}, nil
}

// clearFailover removes failover.json durably. Called with g.wmu held.
func (r *Replica) clearFailover(g *group) error {
	if err := os.Remove(failoverPath(g)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if err := fsutil.SyncDir(g.dir); err != nil {
		return err
	}
	g.mu.Lock()
	g.fo = nil
	g.mu.Unlock()
	return nil
}

// Unpromote removes failover.json: the promotion is abandoned before anything
// used the materialised files; replication into the group resumes.
func (r *Replica) Unpromote(groupName string) error {
	g, err := r.group(groupName)
	if err != nil {
		return err
	}
	g.wmu.Lock()
	defer g.wmu.Unlock()
	if g.fo != nil {
		r.o.Logger.Info("failover of replication group abandoned", "group", g.name, "point", g.fo.Point)
	}
	return r.clearFailover(g)
}

// materialise writes every image of st's point into dstDir (see Promote).
func (r *Replica) materialise(ctx context.Context, g *group, st FailoverState, dstDir string) (out []PromotedImage, err error) {
	if err := os.MkdirAll(dstDir, 0o700); err != nil {
		return nil, err
	}
	var prs []*pointReader
	g.mu.RLock()
	for _, im := range st.Images {
		pr, e := g.openPoint(st.Point, im.ID)
		if e != nil {
			err = e
			break
		}
		prs = append(prs, pr)
	}
	g.mu.RUnlock()
	if err != nil {
		return nil, err
	}
	var tmps []string
	defer func() {
		if err != nil {
			for _, t := range tmps {
				os.Remove(t)
			}
		}
	}()
	if out, ok := r.fromPrepared(ctx, g, st, prs, dstDir); ok {
		return out, nil
	}
	for i, im := range st.Images {
		pr := prs[i]
		f, err := os.CreateTemp(dstDir, "."+im.ID+".img.tmp-*")
		if err != nil {
			return nil, err
		}
		tmps = append(tmps, f.Name())
		root, err := writePoint(ctx, g.name, st.Point, pr, f, nil)
		if err == nil {
			err = f.Chmod(0o600)
		}
		if err == nil {
			err = f.Sync()
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return nil, err
		}
		out = append(out, PromotedImage{ID: im.ID, Name: im.Name, Generation: im.Generation, Seq: im.Seq, Size: pr.size,
			Path: filepath.Join(dstDir, im.ID+".img"), Root: root})
	}
	for i, p := range out {
		if err := os.Rename(tmps[i], p.Path); err != nil {
			return nil, err
		}
	}
	if err := fsutil.SyncDir(dstDir); err != nil {
		return nil, err
	}
	return out, nil
}

const promoteRun = 256 // blocks per read

// writePoint copies one image of a point into f (already empty), sparsely,
// checking every block against its recorded hash, and returns the root of
// what it wrote.
func writePoint(ctx context.Context, group, point string, pr *pointReader, f *os.File, hw io.Writer) ([32]byte, error) {
	size := pr.size
	if err := f.Truncate(size); err != nil {
		return [32]byte{}, err
	}
	rt := wire.NewRooter(size)
	nb := blocksOf(uint64(size))
	buf := make([]byte, promoteRun*format.BlockSize)
	rec := make([]byte, promoteRun*32)
	got := make([]byte, promoteRun*32)
	zeros := make([]byte, promoteRun*32)
	for b := uint64(0); b < nb; {
		if err := ctx.Err(); err != nil {
			return [32]byte{}, err
		}
		// Skip holes: blocks before the next data (SEEK_DATA of the point,
		// a superset of its non-zero blocks) read as zeros, hash as zero
		// and are not written.
		d, err := pr.seekData(int64(b)*format.BlockSize, false)
		if errors.Is(err, syscall.ENXIO) {
			d = size
		} else if err != nil {
			return [32]byte{}, err
		}
		if skip := min(uint64(d/format.BlockSize), nb) - b; d > int64(b)*format.BlockSize && skip > 0 {
			for k := uint64(0); k < skip; k += promoteRun {
				rt.Add(zeros[:min(promoteRun, skip-k)*32])
				if hw != nil {
					if _, err := hw.Write(zeros[:min(promoteRun, skip-k)*32]); err != nil {
						return [32]byte{}, err
					}
				}
			}
			b += skip
			continue
		}
		n := min(promoteRun, nb-b)
		if err := pr.read(b, buf[:n*format.BlockSize], rec[:n*32]); err != nil {
			return [32]byte{}, err
		}
		base := int64(b) * format.BlockSize
		valid := min(int64(n)*format.BlockSize, size-base) // bytes of the run inside the image
		for i := uint64(0); i < n; i++ {
			lo := int64(i) * format.BlockSize
			h := wire.BlockHash(buf[lo:min(lo+format.BlockSize, valid)])
			if string(h[:]) != string(rec[i*32:(i+1)*32]) {
				return [32]byte{}, fmt.Errorf("group %s point %s image %s block %d: read %x, recorded %x: %w",
					group, point, pr.id, b+i, h[:8], rec[i*32:i*32+8], ErrMismatch)
			}
			copy(got[i*32:], h[:])
		}
		for i := uint64(0); i < n; {
			if isZero(got[i*32 : (i+1)*32]) {
				i++
				continue
			}
			j := i + 1
			for j < n && !isZero(got[j*32:(j+1)*32]) {
				j++
			}
			lo, hi := int64(i)*format.BlockSize, min(int64(j)*format.BlockSize, valid)
			if _, err := f.WriteAt(buf[lo:hi], base+lo); err != nil {
				return [32]byte{}, err
			}
			i = j
		}
		rt.Add(got[:n*32])
		if hw != nil {
			if _, err := hw.Write(got[:n*32]); err != nil {
				return [32]byte{}, err
			}
		}
		b += n
	}
	return rt.Sum(), nil
}

// AdoptImage is one file Adopt makes part of the group.
type AdoptImage struct {
	ID         string `json:"id"`
	Name       string `json:"name"`
	Generation uint64 `json:"generation"` // generation the primary continues with
	Seq        uint64 `json:"seq"`        // the file equals the primary's image at this cut
	Size       int64  `json:"size"`
	// Path is the file to move in. It is hard-linked into the store (or,
	// across filesystems, copied sparsely) before the commit record and
	// removed after it. Nothing may write it during Adopt.
	Path string `json:"path"`
	// Hashes optionally names a file with the hashes.bin content of Path
	// (32 bytes per 4 KiB block, zero for an all-zero block; it is trusted
	// and copied, not moved). "" = computed (wire.HashImage).
	Hashes  string    `json:"hashes,omitempty"`
	CutTime time.Time `json:"cut_time"`
}

// adoptRecord is GROUP/adopt.json, the commit record of an Adopt.
type adoptRecord struct {
	Point  uint64      `json:"point"`
	Time   time.Time   `json:"time"`
	Cycle  uint64      `json:"cycle"`
	Images []adoptItem `json:"images"`
}

type adoptItem struct {
	ID         string `json:"id"`
	Name       string `json:"name"`
	Generation uint64 `json:"generation"`
	Seq        uint64 `json:"seq"`
	Size       int64  `json:"size"`
	// New: the group did not hold the image; its staged directory is moved
	// to GROUP/images/ID. Otherwise the staged latest.img and hashes.bin
	// replace the image's.
	New bool `json:"new"`
	// Source is the caller's file, removed once adopted if it is still the
	// same file (device and inode).
	Source string `json:"source"`
	Dev    uint64 `json:"dev"`
	Ino    uint64 `json:"ino"`
}

func adoptStaging(g *group) string { return filepath.Join(g.dir, "adopt") }

// linkFile is os.Link (tests replace it to take the copy path).
var linkFile = os.Link

// Adopt makes the files the group's newest recovery point (at the first
// image's CutTime) and removes failover.json; see docs/replica.md
// ("Failover"). The group is created if needed (ret: its retention; a zero
// ret keeps an existing group's policy). An image the group does not hold
// starts with an "absent" undo log, like a seed; an image it holds keeps its
// history: undo log N holds the old content of every block whose recorded
// hash differs from the new file's. Unless the group is failed over, an
// image held at a newer generation, or the same generation and a later
// cut, is refused (ErrReplay) and nothing changes. The next cycle the group
// accepts is the adopted generation's seq+1, or a base of a newer generation.
func (r *Replica) Adopt(groupName string, imgs []AdoptImage, ret Retention) (res ApplyResult, err error) {
	if len(imgs) == 0 {
		return res, errors.New("adopt: no images")
	}
	srcs := make([]unix.Stat_t, len(imgs))
	seen := map[string]bool{}
	for i, im := range imgs {
		if !imageIDOK(im.ID) {
			return res, fmt.Errorf("adopt: image id %q: %w", im.ID, ErrBadName)
		}
		if seen[im.ID] {
			return res, fmt.Errorf("adopt: image %s given twice", im.ID)
		}
		seen[im.ID] = true
		if err := unix.Stat(im.Path, &srcs[i]); err != nil {
			return res, fmt.Errorf("adopt: image %s: %s: %w", im.ID, im.Path, err)
		}
		if srcs[i].Mode&unix.S_IFMT != unix.S_IFREG || srcs[i].Size != im.Size || im.Size < 0 {
			return res, fmt.Errorf("adopt: image %s: %s is not a regular file of %d bytes", im.ID, im.Path, im.Size)
		}
		if im.Hashes != "" {
			fi, err := os.Stat(im.Hashes)
			if err != nil {
				return res, fmt.Errorf("adopt: image %s: %w", im.ID, err)
			}
			if !fi.Mode().IsRegular() || fi.Size() > int64(blocksOf(uint64(im.Size)))*32 {
				return res, fmt.Errorf("adopt: image %s: %s is not the block hashes of a %d-byte image", im.ID, im.Hashes, im.Size)
			}
		}
	}
	if _, err := r.group(groupName); errors.Is(err, ErrNoGroup) || (err == nil && ret != (Retention{})) {
		if err := r.EnsureGroup(groupName, ret); err != nil {
			return res, err
		}
	} else if err != nil {
		return res, err
	}
	g, unlock, err := r.lockedGroup(groupName)
	if err != nil {
		return res, err
	}
	defer unlock()
	// Refusals, before anything is written.
	existing := make([]*image, len(imgs))
	g.mu.RLock()
	fo := g.fo
	for i, in := range imgs {
		im := g.images[in.ID]
		if im == nil || !im.st.Present {
			continue
		}
		existing[i] = im
		if fo == nil && (im.st.Generation > in.Generation || (im.st.Generation == in.Generation && im.st.Seq > in.Seq)) {
			g.mu.RUnlock()
			return res, fmt.Errorf("adopt: group %s holds image %s at generation %d cut %d, newer than the adopted generation %d cut %d: %w",
				g.name, in.ID, im.st.Generation, im.st.Seq, in.Generation, in.Seq, ErrReplay)
		}
	}
	g.mu.RUnlock()

	// From here on, a failure leaves work for recovery (it rolls back
	// without the commit record).
	g.needRecover = true
	N := g.pts.Next
	rec := adoptRecord{Point: N, Time: imgs[0].CutTime, Cycle: imgs[0].Seq}
	sdir := adoptStaging(g)
	if err := os.RemoveAll(sdir); err != nil {
		return res, err
	}
	if err := os.MkdirAll(sdir, 0o700); err != nil {
		return res, err
	}
	for i, in := range imgs {
		idir := filepath.Join(sdir, in.ID)
		if err := os.MkdirAll(idir, 0o700); err != nil {
			return res, err
		}
		if err := stageAdoptFiles(idir, in); err != nil {
			return res, fmt.Errorf("adopt: staging image %s: %w", in.ID, err)
		}
		it := adoptItem{ID: in.ID, Name: in.Name, Generation: in.Generation, Seq: in.Seq, Size: in.Size,
			New: existing[i] == nil, Source: in.Path, Dev: uint64(srcs[i].Dev), Ino: srcs[i].Ino}
		if it.New {
			st := imageState{ID: in.ID, Generation: in.Generation, Name: in.Name, Seq: in.Seq, Size: uint64(in.Size), Present: true}
			if err := r.initImageDir(idir, N, st); err != nil {
				return res, err
			}
		} else {
			im := existing[i]
			l, err := r.adoptUndo(im, N, filepath.Join(idir, "hashes.bin"), uint64(in.Size))
			if err != nil {
				return res, fmt.Errorf("adopt: undo log for image %s: %w", in.ID, err)
			}
			res.UndoBytes += l.size
			g.mu.Lock()
			im.logs = append(im.logs, l)
			g.mu.Unlock()
		}
		if err := fsutil.SyncDir(idir); err != nil {
			return res, err
		}
		if err := r.hook("adopt-undo"); err != nil {
			return res, err
		}
		rec.Images = append(rec.Images, it)
		res.Images = append(res.Images, Result{Path: in.Path, Seq: in.Seq})
	}
	if err := fsutil.SyncDir(sdir); err != nil {
		return res, err
	}
	// The commit record: from here a crash rolls forward.
	if err := fsutil.WriteJSON(filepath.Join(g.dir, "adopt.json"), rec); err != nil {
		return res, err
	}
	if err := r.hook("adopt-commit"); err != nil {
		return res, err
	}
	if err := r.finishAdopt(g); err != nil {
		return res, err
	}
	for _, in := range imgs {
		if r.chunks != nil {
			if err := r.indexHashesFile(g.name, in.ID, filepath.Join(g.dir, "images", in.ID, "hashes.bin")); err != nil {
				r.o.Logger.Warn("adopt: adding the image to the chunk index failed (dedup only)", "group", g.name, "image", in.ID, "err", err)
			}
		}
	}
	res.Point, res.Time = pointID(N), rec.Time
	res.Dropped, res.Reclaimed, err = r.retain(g)
	if err != nil {
		return res, fmt.Errorf("retention after point %d: %w", N, err)
	}
	g.needRecover = false
	return res, nil
}

// stageAdoptFiles puts the new latest.img (a hard link to in.Path, else a
// sparse copy) and hashes.bin into idir, durably.
func stageAdoptFiles(idir string, in AdoptImage) error {
	dst := filepath.Join(idir, "latest.img")
	if err := linkFile(in.Path, dst); err != nil {
		if err := copySparse(in.Path, dst, in.Size); err != nil {
			return err
		}
	}
	f, err := os.Open(dst)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Sync(); err != nil { // the caller's writes, if they were not synced
		return err
	}
	hf, err := os.OpenFile(filepath.Join(idir, "hashes.bin"), os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	defer hf.Close()
	sw := &sparseWriter{f: hf}
	if in.Hashes != "" {
		src, err := os.Open(in.Hashes)
		if err != nil {
			return err
		}
		_, err = io.CopyBuffer(sw, src, make([]byte, 1<<20))
		src.Close()
		if err != nil {
			return err
		}
	} else if _, err := wire.HashImage(context.Background(), f, in.Size, sw); err != nil {
		return err
	}
	if err := hf.Truncate(int64(blocksOf(uint64(in.Size))) * 32); err != nil {
		return err
	}
	return hf.Sync()
}

// sparseWriter writes sequentially, skipping all-zero pieces (holes).
type sparseWriter struct {
	f   *os.File
	off int64
}

func (w *sparseWriter) Write(p []byte) (int, error) {
	for done := 0; done < len(p); {
		n := min(len(p)-done, format.BlockSize)
		if piece := p[done : done+n]; !isZero(piece) {
			if _, err := w.f.WriteAt(piece, w.off); err != nil {
				return done, err
			}
		}
		done += n
		w.off += int64(n)
	}
	return len(p), nil
}

// copySparse copies the first size bytes of src to a new file dst, writing
// only the blocks that are not zero, and syncs it.
func copySparse(src, dst string, size int64) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	exts, err := fsutil.DataExtents(in, size)
	if err != nil {
		return err
	}
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	defer out.Close()
	if err := out.Truncate(size); err != nil {
		return err
	}
	buf := make([]byte, 1<<20)
	for _, e := range exts {
		for off := e.Off; off < e.Off+e.Len; {
			n := min(int64(len(buf)), e.Off+e.Len-off)
			if err := readFullAt(in, buf[:n], off); err != nil {
				return err
			}
			w := &sparseWriter{f: out, off: off}
			if _, err := w.Write(buf[:n]); err != nil {
				return err
			}
			off += n
		}
	}
	return out.Sync()
}

// adoptUndo writes undo log N of im for replacing its latest.img by a file
// of newSize bytes whose block hashes are in newHashes: every block whose
// recorded hash differs (past either end a block reads as zero), with its
// current content and hash.
func (r *Replica) adoptUndo(im *image, N uint64, newHashes string, newSize uint64) (*undoLog, error) {
	nh, err := os.Open(newHashes)
	if err != nil {
		return nil, err
	}
	defer nh.Close()
	var oldSize uint64
	if im.st.Present {
		oldSize = im.st.Size
	}
	oldBlocks, newBlocks := blocksOf(oldSize), blocksOf(newSize)
	total := max(oldBlocks, newBlocks)
	w, err := createUndo(filepath.Join(im.dir, "undo"), N, N, !im.st.Present, oldSize)
	if err != nil {
		return nil, err
	}
	const chunk = 256
	oh := make([]byte, chunk*32)
	nhb := make([]byte, chunk*32)
	buf := make([]byte, chunk*format.BlockSize)
	for b := uint64(0); b < total; b += chunk {
		n := min(chunk, total-b)
		clear(oh)
		clear(nhb)
		if b < oldBlocks {
			if err := readFullAt(im.hashes, oh[:min(n, oldBlocks-b)*32], int64(b)*32); err != nil {
				w.abort()
				return nil, err
			}
		}
		if b < newBlocks {
			if err := readFullAt(nh, nhb[:min(n, newBlocks-b)*32], int64(b)*32); err != nil {
				w.abort()
				return nil, err
			}
		}
		readTo := uint64(0) // blocks [.., readTo) of this chunk are in buf
		for i := uint64(0); i < n; i++ {
			o, x := oh[i*32:(i+1)*32], nhb[i*32:(i+1)*32]
			if string(o) == string(x) {
				continue
			}
			if b+i >= oldBlocks { // past the old end: it read as zero
				if err := w.add(b+i, zeroHash, nil); err != nil {
					w.abort()
					return nil, err
				}
				continue
			}
			if i >= readTo {
				// Read the run of differing blocks starting here (only
				// what changed: the changes are usually small and sparse).
				j := i + 1
				for j < min(n, oldBlocks-b) && string(oh[j*32:(j+1)*32]) != string(nhb[j*32:(j+1)*32]) {
					j++
				}
				if err := readFullAt(im.img, buf[i*format.BlockSize:j*format.BlockSize], int64(b+i)*format.BlockSize); err != nil {
					w.abort()
					return nil, err
				}
				readTo = j
			}
			blk := buf[i*format.BlockSize : (i+1)*format.BlockSize]
			var data []byte
			if !isZero(blk) {
				data = blk
			}
			if err := w.add(b+i, [32]byte(o), data); err != nil {
				w.abort()
				return nil, err
			}
		}
	}
	return w.finish(r.hook)
}

// finishAdopt completes a committed Adopt (GROUP/adopt.json): moves the
// staged files in, updates the states, records the point, removes
// failover.json, the sources and the record. Without a record it deletes
// what an uncommitted Adopt staged (its undo logs are beyond the last point
// and deleted by recovery). Every step is idempotent. Called with g.wmu
// held, at commit and by recovery.
func (r *Replica) finishAdopt(g *group) error {
	jpath := filepath.Join(g.dir, "adopt.json")
	sdir := adoptStaging(g)
	var rec adoptRecord
	if err := fsutil.ReadJSON(jpath, &rec); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			if _, err := os.Stat(sdir); err == nil {
				r.o.Logger.Info("rolling back uncommitted adopt", "group", g.name)
				return os.RemoveAll(sdir)
			}
			return nil
		}
		return err
	}
	r.o.Logger.Info("completing adopt", "group", g.name, "point", rec.Point)
	idir := filepath.Join(g.dir, "images")
	if err := os.MkdirAll(idir, 0o700); err != nil {
		return err
	}
	for _, it := range rec.Images {
		src, dst := filepath.Join(sdir, it.ID), filepath.Join(idir, it.ID)
		if it.New {
			if _, err := os.Stat(src); err == nil {
				g.mu.Lock()
				old := g.images[it.ID]
				delete(g.images, it.ID)
				g.mu.Unlock()
				if old != nil {
					old.close()
				}
				if err := os.RemoveAll(dst); err != nil {
					return err
				}
				if err := os.Rename(src, dst); err != nil {
					return err
				}
			} else if _, err := os.Stat(filepath.Join(dst, "state.json")); err != nil {
				return fmt.Errorf("adopt of %s: staged image %s is gone: %w", g.name, it.ID, err)
			}
		} else {
			for _, name := range []string{"latest.img", "hashes.bin"} {
				if _, err := os.Stat(filepath.Join(src, name)); err == nil {
					if err := os.Rename(filepath.Join(src, name), filepath.Join(dst, name)); err != nil {
						return err
					}
				}
			}
			if err := fsutil.SyncDir(dst); err != nil {
				return err
			}
		}
		if err := r.hook("adopt-rename"); err != nil {
			return err
		}
	}
	if err := fsutil.SyncDir(idir); err != nil {
		return err
	}
	// The sources: adopted (linked or copied) durably, no longer needed.
	for _, it := range rec.Images {
		if err := r.removeAdoptSource(it); err != nil {
			return err
		}
	}
	// States, and the open files of readers.
	for _, it := range rec.Images {
		dst := filepath.Join(idir, it.ID)
		if it.New {
			g.mu.RLock()
			have := g.images[it.ID] != nil
			g.mu.RUnlock()
			if have {
				continue // loaded by recovery
			}
			var st imageState
			if err := fsutil.ReadJSON(filepath.Join(dst, "state.json"), &st); err != nil {
				return err
			}
			im, err := r.loadImage(dst, st)
			if err != nil {
				return err
			}
			g.mu.Lock()
			g.images[it.ID] = im
			g.mu.Unlock()
			continue
		}
		g.mu.RLock()
		im := g.images[it.ID]
		g.mu.RUnlock()
		if im == nil {
			return fmt.Errorf("adopt of %s: image %s has no state", g.name, it.ID)
		}
		st := im.st
		st.Generation, st.Name, st.Seq, st.Size, st.Present = it.Generation, it.Name, it.Seq, uint64(it.Size), true
		st.Applying, st.ApplyingSeq, st.ApplyingGen, st.ApplyingPoint, st.ApplyingPath = false, 0, 0, 0, ""
		if err := fsutil.WriteJSON(filepath.Join(dst, "state.json"), st); err != nil {
			return err
		}
		img, err := os.OpenFile(filepath.Join(dst, "latest.img"), os.O_RDWR, 0)
		if err != nil {
			return err
		}
		hf, err := os.OpenFile(filepath.Join(dst, "hashes.bin"), os.O_RDWR, 0)
		if err != nil {
			img.Close()
			return err
		}
		g.mu.Lock()
		oldImg, oldH := im.img, im.hashes
		im.img, im.hashes, im.st = img, hf, st
		g.mu.Unlock()
		oldImg.Close()
		oldH.Close()
	}
	if err := r.hook("adopt-state"); err != nil {
		return err
	}
	m := g.meta
	for _, it := range rec.Images {
		if !slices.Contains(m.Members, it.ID) {
			m.Members = append(slices.Clone(m.Members), it.ID)
		}
	}
	if len(m.Members) != len(g.meta.Members) {
		if err := fsutil.WriteJSON(filepath.Join(g.dir, "group.json"), m); err != nil {
			return err
		}
		g.mu.Lock()
		g.meta = m
		g.mu.Unlock()
	}
	if g.pts.Next <= rec.Point {
		j := journal{Point: rec.Point, Time: rec.Time, Cycle: rec.Cycle}
		if err := r.recordPoint(g, &j); err != nil {
			return err
		}
	}
	if err := r.hook("adopt-point"); err != nil {
		return err
	}
	if err := r.clearFailover(g); err != nil {
		return err
	}
	if err := os.Remove(jpath); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if err := os.RemoveAll(sdir); err != nil {
		return err
	}
	return fsutil.SyncDir(g.dir)
}

// removeAdoptSource deletes an adopted file from where the caller had it,
// if it is still the file adopted.
func (r *Replica) removeAdoptSource(it adoptItem) error {
	var st unix.Stat_t
	if err := unix.Lstat(it.Source, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil
		}
		return fmt.Errorf("adopted file %s: %w", it.Source, err)
	}
	if uint64(st.Dev) != it.Dev || st.Ino != it.Ino {
		r.o.Logger.Warn("adopt: the adopted file was replaced by another one; leaving it", "path", it.Source)
		return nil
	}
	if err := os.Remove(it.Source); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if err := fsutil.SyncDir(filepath.Dir(it.Source)); err != nil {
		r.o.Logger.Warn("adopt: syncing the directory of the adopted file", "path", it.Source, "err", err)
	}
	return r.hook("adopt-source")
}
