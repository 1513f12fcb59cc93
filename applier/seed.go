package applier

// Seed import: images reconstructed from an out-of-band seed become the
// start of a group's replication relationship on the replica, as one
// recovery point at the seed's cut. The primary's next (catch-up) cycle is a
// delta on top of it.
//
// Staging: REPLICA/seed-staging/GROUP/ID/ holds latest.img, hashes.bin and
// progress.json while an import writes (resumable); at commit each image
// directory is completed there (state.json, an undo log "absent" for the new
// point) and renamed into GROUP/images/ under a commit record
// (GROUP/seed.json), which recovery finishes after a crash.

import (
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/zeebo/blake3"

	"github.com/standin/standin/internal/format"
	"github.com/standin/standin/internal/fsutil"
	"github.com/standin/standin/internal/wire"
)

// ErrWrongSeed: the seed does not belong to the relationship (another VM, an
// older generation or cut, or a group that already replicates).
var ErrWrongSeed = errors.New("seed does not match the replication relationship")

// SeedImage is one image of a seed to import.
type SeedImage struct {
	Group      string    `json:"group"`
	Name       string    `json:"name"` // image name within the group (as on the primary's mount)
	ID         string    `json:"id"`
	Generation uint64    `json:"generation"`
	Seq        uint64    `json:"seq"`
	Size       int64     `json:"size"`
	Allocated  int64     `json:"allocated"`
	CutTime    time.Time `json:"cut_time"`
	// Root is the root of the image's seed manifest (hex BLAKE3,
	// dedup.Manifest.Root); the import checks every chunk against it.
	Root string `json:"root,omitempty"`
}

// SplitSeedName splits a seed image name "GROUP/IMAGE" into its group and
// the image's name on the primary's mount.
func SplitSeedName(s string) (group, name string, err error) {
	group, name, ok := strings.Cut(s, "/")
	if !ok || name == "" {
		return "", "", fmt.Errorf("seed image name %q: want GROUP/IMAGE: %w", s, ErrBadName)
	}
	if err := checkName("group", group); err != nil {
		return "", "", err
	}
	return group, name, nil
}

func (r *Replica) expectPath(group string) string {
	return filepath.Join(r.dir, "expect", group+".json")
}

// ExpectSeed records the seed a primary's relationship starts from (sent by
// the primary's shipper after 'standin seed export'); a seed import is
// checked against it.
func (r *Replica) ExpectSeed(group string, e wire.SeedExpect) error {
	if err := checkName("group", group); err != nil {
		return err
	}
	for _, im := range e.Images {
		if !imageIDOK(im.ID) {
			return fmt.Errorf("image id %q: %w", im.ID, ErrBadName)
		}
	}
	for id, root := range e.Roots {
		if !slices.ContainsFunc(e.Images, func(im wire.ImageState) bool { return im.ID == id }) {
			return fmt.Errorf("seed announcement: a content root for image %q, which it does not announce: %w", id, ErrBadName)
		}
		if b, err := hex.DecodeString(root); err != nil || len(b) != 32 {
			return fmt.Errorf("seed announcement: content root of image %s is not 64 hex digits: %w", id, ErrBadName)
		}
	}
	if err := os.MkdirAll(filepath.Join(r.dir, "expect"), 0o700); err != nil {
		return err
	}
	return fsutil.WriteJSON(r.expectPath(group), e)
}

// SeedExpectation returns what the primary announced for group, if anything.
func (r *Replica) SeedExpectation(group string) (wire.SeedExpect, bool, error) {
	var e wire.SeedExpect
	if err := checkName("group", group); err != nil {
		return e, false, err
	}
	err := fsutil.ReadJSON(r.expectPath(group), &e)
	if errors.Is(err, fs.ErrNotExist) {
		return e, false, nil
	}
	return e, err == nil, err
}

// SeedCheck is the verdict on one group of a seed.
type SeedCheck struct {
	Group    string `json:"group"`
	Action   string `json:"action"` // "import", "skip" (already imported) or "refuse"
	Reason   string `json:"reason,omitempty"`
	Expected bool   `json:"expected"` // the primary announced this seed
	// Warning: imported, but a check could not be made (an announcement
	// without content roots, from an older primary).
	Warning string `json:"warning,omitempty"`
}

// CheckSeed decides, per group, whether the seed's images may be imported:
// a seed starts a relationship, so the group must not hold other data, and
// when the primary announced the seed it continues from, the images must be
// exactly those (identity, generation and cut).
func (r *Replica) CheckSeed(imgs []SeedImage) []SeedCheck {
	byGroup := map[string][]SeedImage{}
	var order []string
	for _, im := range imgs {
		if _, ok := byGroup[im.Group]; !ok {
			order = append(order, im.Group)
		}
		byGroup[im.Group] = append(byGroup[im.Group], im)
	}
	var out []SeedCheck
	for _, gname := range order {
		out = append(out, r.checkSeedGroup(gname, byGroup[gname]))
	}
	return out
}

func (r *Replica) checkSeedGroup(gname string, imgs []SeedImage) SeedCheck {
	c := SeedCheck{Group: gname, Action: "import"}
	refuse := func(f string, a ...any) SeedCheck {
		c.Action, c.Reason = "refuse", fmt.Sprintf(f, a...)
		return c
	}
	present, err := r.GroupImages(gname)
	if err != nil {
		return refuse("%v", err)
	}
	byName := map[string]wire.ImageState{}
	byID := map[string]wire.ImageState{}
	for _, p := range present {
		byName[p.Name], byID[p.ID] = p, p
	}
	if len(present) > 0 {
		same := len(present) == len(imgs)
		for _, im := range imgs {
			p, ok := byID[im.ID]
			switch {
			case !ok:
				same = false
				if q, ok := byName[im.Name]; ok {
					return refuse("image %s: the replica holds another VM's image under this name (id %s, seed has %s): wrong seed", im.Name, q.ID, im.ID)
				}
			case im.Generation < p.Generation:
				return refuse("image %s: seed is of generation %d, the replica already holds generation %d: an older seed of this VM", im.Name, im.Generation, p.Generation)
			case im.Generation == p.Generation && im.Seq < p.Seq:
				return refuse("image %s: seed is at cut %d, the replica already holds cut %d: an older seed of this VM", im.Name, im.Seq, p.Seq)
			case im.Generation != p.Generation || im.Seq != p.Seq:
				same = false
			}
		}
		if same {
			c.Action, c.Reason = "skip", "already imported (the replica holds exactly this seed's cut)"
			return c
		}
		return refuse("the replica already replicates group %s (%d images); a seed only starts a relationship — to re-synchronise run 'standin replicate resync --group %s' on the primary", gname, len(present), gname)
	}
	e, ok, err := r.SeedExpectation(gname)
	if err != nil {
		return refuse("reading the primary's announcement: %v", err)
	}
	if !ok {
		return c // nothing announced: the first cycle's checks (identity, generation, parent) still protect the chain
	}
	c.Expected = true
	want := map[string]wire.ImageState{}
	for _, w := range e.Images {
		want[w.ID] = w
	}
	for _, im := range imgs {
		w, ok := want[im.ID]
		if !ok {
			for _, x := range e.Images {
				if x.Name == im.Name {
					return refuse("image %s: the primary replicates image id %s under this name, the seed has id %s: wrong seed (another VM's disk)", im.Name, x.ID, im.ID)
				}
			}
			return refuse("image %s (id %s) is not part of group %s on the primary", im.Name, im.ID, gname)
		}
		switch {
		case im.Generation < w.Generation:
			return refuse("image %s: seed is of generation %d, the primary continues from generation %d: an older seed", im.Name, im.Generation, w.Generation)
		case im.Generation > w.Generation:
			return refuse("image %s: seed is of generation %d, the primary announced generation %d: the primary has not announced this seed yet (is its daemon running and replication enabled?)", im.Name, im.Generation, w.Generation)
		case im.Seq < w.Seq:
			return refuse("image %s: seed is at cut %d (%s), the primary continues from cut %d (%s): an older seed — import the latest seed exported for this group", im.Name, im.Seq, im.CutTime.Format(time.RFC3339), w.Seq, e.Time.Format(time.RFC3339))
		case im.Seq > w.Seq:
			return refuse("image %s: seed is at cut %d, the primary announced cut %d: a newer seed than announced (is the primary's daemon running?)", im.Name, im.Seq, w.Seq)
		}
		if e.Roots != nil {
			switch root, ok := e.Roots[im.ID]; {
			case !ok:
				return refuse("image %s: the primary's announcement has no content root for id %s: export the seed again", im.Name, im.ID)
			case im.Root == "":
				return refuse("image %s: the seed's content root is unknown", im.Name)
			case !strings.EqualFold(root, im.Root):
				return refuse("image %s: the seed's content (manifest root %.16s…) is not what the primary exported (root %.16s…) although identity, generation and cut match: a forged, swapped or re-exported seed — import the seed the primary exported %s", im.Name, im.Root, root, e.Time.Format(time.RFC3339))
			}
		}
		delete(want, im.ID)
	}
	for _, w := range want {
		return refuse("the seed lacks image %s (id %s) of group %s", w.Name, w.ID, gname)
	}
	if e.Roots == nil {
		c.Warning = "the primary announced no content roots (a standin version without that check): the seed's identity, generation and cut match, but its content is only checked against its own manifests — upgrade the primary and export the seed again to have it checked"
	}
	return c
}

// SeedSink receives one image of a seed import in the staging area. It keeps
// hashes.bin in step with latest.img.
type SeedSink struct {
	dir    string
	img    *os.File
	hashes *os.File
	info   SeedImage
	hb     []byte
	pad    []byte
}

type seedProgress struct {
	Image SeedImage `json:"image"`
	Next  uint64    `json:"next_chunk"`
}

func (r *Replica) stagingDir(group, id string) string {
	return filepath.Join(r.dir, "seed-staging", group, id)
}

// StageSeedImage opens (or resumes) the staging of one image. ResumeAt says
// from which 4 KiB chunk of the image an interrupted import continues.
func (r *Replica) StageSeedImage(info SeedImage) (*SeedSink, error) {
	if err := checkName("group", info.Group); err != nil {
		return nil, err
	}
	if !imageIDOK(info.ID) {
		return nil, fmt.Errorf("image id %q: %w", info.ID, ErrBadName)
	}
	dir := r.stagingDir(info.Group, info.ID)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	s := &SeedSink{dir: dir, info: info}
	var err error
	if s.img, err = os.OpenFile(filepath.Join(dir, "latest.img"), os.O_CREATE|os.O_RDWR, 0o600); err != nil {
		return nil, err
	}
	if s.hashes, err = os.OpenFile(filepath.Join(dir, "hashes.bin"), os.O_CREATE|os.O_RDWR, 0o600); err != nil {
		s.img.Close()
		return nil, err
	}
	return s, nil
}

// ResumeAt returns the chunk an earlier, interrupted import of the same
// image (identity, generation, cut, size) reached; 0 otherwise.
func (s *SeedSink) ResumeAt() uint64 {
	var p seedProgress
	if err := fsutil.ReadJSON(filepath.Join(s.dir, "progress.json"), &p); err != nil {
		return 0
	}
	a, b := p.Image, s.info
	if a.ID != b.ID || a.Generation != b.Generation || a.Seq != b.Seq || a.Size != b.Size || !a.CutTime.Equal(b.CutTime) {
		return 0
	}
	return p.Next
}

// Truncate sets the size of the staged image (and of its hash file).
func (s *SeedSink) Truncate(size int64) error {
	if err := s.img.Truncate(size); err != nil {
		return err
	}
	return s.hashes.Truncate(int64(blocksOf(uint64(size))) * 32)
}

// WriteAt writes reconstructed chunks and records their block hashes.
func (s *SeedSink) WriteAt(p []byte, off int64) (int, error) {
	nb := (len(p) + format.BlockSize - 1) / format.BlockSize
	hs := make([][32]byte, nb)
	for i := range hs {
		blk := p[i*format.BlockSize : min(len(p), (i+1)*format.BlockSize)]
		if len(blk) < format.BlockSize { // the image's last, short block: hashed zero-padded
			s.pad = append(append(s.pad[:0], blk...), make([]byte, format.BlockSize-len(blk))...)
			blk = s.pad
		}
		hs[i] = blake3.Sum256(blk)
	}
	return s.WriteHashedAt(p, off, hs)
}

// WriteHashedAt writes reconstructed chunks whose BLAKE3 the importer has
// computed already (dedup.HashedSink): one hash per block of p.
func (s *SeedSink) WriteHashedAt(p []byte, off int64, hashes [][32]byte) (int, error) {
	if off%format.BlockSize != 0 {
		return 0, fmt.Errorf("seed import: unaligned write at %d", off)
	}
	nb := (len(p) + format.BlockSize - 1) / format.BlockSize
	if len(hashes) != nb {
		return 0, fmt.Errorf("seed import: %d hashes for %d blocks at %d", len(hashes), nb, off)
	}
	if _, err := s.img.WriteAt(p, off); err != nil {
		return 0, err
	}
	if cap(s.hb) < nb*32 {
		s.hb = make([]byte, nb*32)
	}
	hb := s.hb[:nb*32]
	for i, h := range hashes {
		if h == zeroBlockBLAKE3 { // recorded as 32 zero bytes, like blockHash
			h = zeroHash
		}
		copy(hb[i*32:], h[:])
	}
	if _, err := s.hashes.WriteAt(hb, off/format.BlockSize*32); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Sync makes what was written durable.
func (s *SeedSink) Sync() error {
	return errors.Join(s.img.Sync(), s.hashes.Sync())
}

// Checkpoint records (durably, after Sync) that chunks before next are written.
func (s *SeedSink) Checkpoint(next uint64) error {
	if err := s.Sync(); err != nil {
		return err
	}
	return fsutil.WriteJSON(filepath.Join(s.dir, "progress.json"), seedProgress{Image: s.info, Next: next})
}

// Close releases the files (the staging stays until CommitSeed or DiscardSeed).
func (s *SeedSink) Close() error {
	return errors.Join(s.img.Close(), s.hashes.Close())
}

// DiscardSeed removes the staging of a group's seed import.
func (r *Replica) DiscardSeed(group string) error {
	if err := checkName("group", group); err != nil {
		return err
	}
	return os.RemoveAll(filepath.Join(r.dir, "seed-staging", group))
}

type seedCommit struct {
	Point  uint64      `json:"point"`
	Time   time.Time   `json:"time"`
	Cycle  uint64      `json:"cycle"`
	Images []SeedImage `json:"images"`
}

// CommitSeed makes the staged images of one group the group's first
// recovery point (at the seed's cut time). All images must have been staged
// completely. It is idempotent and crash-safe (see the package comment).
func (r *Replica) CommitSeed(group string, imgs []SeedImage, ret Retention) (ApplyResult, error) {
	var res ApplyResult
	if len(imgs) == 0 {
		return res, errors.New("seed commit: no images")
	}
	if st, ok, err := r.Failover(group); err != nil {
		return res, err
	} else if ok {
		return res, &FailedOverError{Group: group, State: st}
	}
	for _, c := range r.CheckSeed(imgs) {
		switch c.Action {
		case "skip":
			res.Skipped = true
			return res, nil
		case "refuse":
			return res, fmt.Errorf("group %s: %w: %s", c.Group, ErrWrongSeed, c.Reason)
		}
	}
	if err := r.EnsureGroup(group, ret); err != nil {
		return res, err
	}
	g, unlock, err := r.lockedGroup(group)
	if err != nil {
		return res, err
	}
	defer unlock()
	g.mu.RLock()
	foErr := g.failedOver()
	g.mu.RUnlock()
	if foErr != nil {
		return res, foErr
	}
	N := g.pts.Next
	t := imgs[0].CutTime
	// Complete every staged image directory.
	for _, im := range imgs {
		dir := r.stagingDir(group, im.ID)
		if _, err := os.Stat(filepath.Join(dir, "latest.img")); err != nil {
			return res, fmt.Errorf("seed commit: image %s was not staged: %w", im.Name, err)
		}
		os.RemoveAll(filepath.Join(dir, "undo"))
		st := imageState{ID: im.ID, Generation: im.Generation, Name: im.Name, Seq: im.Seq, Size: uint64(im.Size), Present: true}
		if err := r.initImageDir(dir, N, st); err != nil {
			return res, err
		}
		os.Remove(filepath.Join(dir, "progress.json"))
		if err := fsutil.SyncDir(dir); err != nil {
			return res, err
		}
		res.Images = append(res.Images, Result{Seq: im.Seq})
	}
	rec := seedCommit{Point: N, Time: t, Cycle: imgs[0].Seq, Images: imgs}
	if err := fsutil.WriteJSON(filepath.Join(g.dir, "seed.json"), rec); err != nil {
		return res, err
	}
	if err := r.hook("seed-commit"); err != nil {
		g.needRecover = true
		return res, err
	}
	if err := r.finishSeed(g); err != nil {
		g.needRecover = true
		return res, err
	}
	res.Point, res.Time = pointID(N), t
	return res, nil
}

// initImageDir makes dir (holding latest.img and hashes.bin) the directory of
// an image that first appears at point N: an "absent" undo log for N (the
// image did not exist before) and its state.
func (r *Replica) initImageDir(dir string, N uint64, st imageState) error {
	udir := filepath.Join(dir, "undo")
	if err := os.MkdirAll(udir, 0o700); err != nil {
		return err
	}
	w, err := createUndo(udir, N, N, true, 0)
	if err != nil {
		return err
	}
	if _, err := w.finish(r.hook); err != nil {
		return err
	}
	return fsutil.WriteJSON(filepath.Join(dir, "state.json"), st)
}

// finishSeed completes a committed seed import (GROUP/seed.json): moves the
// staged image directories in, records the point, drops the record. Called
// with g.wmu held, at commit and by recovery.
func (r *Replica) finishSeed(g *group) error {
	jpath := filepath.Join(g.dir, "seed.json")
	var rec seedCommit
	if err := fsutil.ReadJSON(jpath, &rec); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return err
	}
	r.o.Logger.Info("completing seed import", "group", g.name, "point", rec.Point)
	idir := filepath.Join(g.dir, "images")
	if err := os.MkdirAll(idir, 0o700); err != nil {
		return err
	}
	for _, im := range rec.Images {
		src := r.stagingDir(g.name, im.ID)
		dst := filepath.Join(idir, im.ID)
		if _, err := os.Stat(src); err == nil {
			if err := os.RemoveAll(dst); err != nil {
				return err
			}
			if err := os.Rename(src, dst); err != nil {
				return err
			}
		} else if _, err := os.Stat(filepath.Join(dst, "state.json")); err != nil {
			return fmt.Errorf("seed import of %s: staged image %s is gone: %w", g.name, im.ID, err)
		}
	}
	if err := fsutil.SyncDir(idir); err != nil {
		return err
	}
	if err := r.loadGroup(g); err != nil {
		return err
	}
	m := g.meta
	for _, im := range rec.Images {
		if !slices.Contains(m.Members, im.ID) {
			m.Members = append(slices.Clone(m.Members), im.ID)
		}
	}
	if err := fsutil.WriteJSON(filepath.Join(g.dir, "group.json"), m); err != nil {
		return err
	}
	g.mu.Lock()
	g.meta = m
	g.mu.Unlock()
	if g.pts.Next <= rec.Point {
		j := journal{Point: rec.Point, Time: rec.Time, Cycle: rec.Cycle}
		if err := r.recordPoint(g, &j); err != nil {
			return err
		}
	}
	if err := os.Remove(jpath); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	os.Remove(filepath.Join(r.dir, "seed-staging", g.name))
	os.Remove(r.expectPath(g.name))
	return fsutil.SyncDir(g.dir)
}

// SeedImageID spells a seed manifest's image identity as the store does.
func SeedImageID(id [16]byte) string { return uuid.UUID(id).String() }
