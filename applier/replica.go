package applier

import (
	"context"
	"errors"
	"fmt"
	"github.com/zeebo/blake3"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/google/uuid"
	"golang.org/x/sys/unix"

	"github.com/standin/standin/internal/format"
	"github.com/standin/standin/internal/fsutil"
)

// Replica is the replica-side store: per group, the latest image of every
// member as a plain sparse file, undo logs that reconstruct older recovery
// points, and the list of points. See docs/replica.md.
//
// Applies to one group are serialised; readers (OpenPoint, Export,
// VerifyPoint) run concurrently with applies and always see complete points.
type Replica struct {
	dir  string
	o    ReplicaOptions
	lock *os.File

	mu     sync.Mutex
	groups map[string]*group
	closed bool

	chunks  *chunkIndex // nil if it could not be opened (dedup off)
	idxStop chan struct{}
	idxWG   sync.WaitGroup

	pins pinTable // pins.go

	prepMu sync.Mutex // prepared promotion copies (prepare.go)

	scrub  scrubState // scrub.go
	sizeOK sizeCache  // largest image size the store's filesystem was seen to hold (validate.go)
}

// ReplicaOptions configure a Replica.
type ReplicaOptions struct {
	// Now is the clock used by retention (default time.Now).
	Now func() time.Time
	// Logger receives recovery and retention messages (default: discarded).
	Logger *slog.Logger

	// testHook, when set, is called at every step of the apply, recovery and
	// retention protocols; an error it returns aborts the operation right
	// there, like a crash (nothing is cleaned up).
	testHook func(stage string) error
}

// Retention says which recovery points a group keeps.
type Retention struct {
	Points         int           `json:"points"`           // keep the newest point of each of the last Points Every-slots (default 24)
	Every          time.Duration `json:"every"`            // slot length (default 1h)
	AnyPointWindow time.Duration `json:"any_point_window"` // keep every point younger than this (0 = off)
}

func (r Retention) withDefaults() Retention {
	if r.Points <= 0 {
		r.Points = 24
	}
	if r.Every <= 0 {
		r.Every = time.Hour
	}
	if r.AnyPointWindow < 0 {
		r.AnyPointWindow = 0
	}
	return r
}

// Errors of the replica store.
var (
	ErrNoGroup   = errors.New("no such replication group")
	ErrNoPoint   = errors.New("no such recovery point")
	ErrNoImage   = errors.New("no such image in the recovery point")
	ErrPointGone = errors.New("recovery point expired while it was open")
	ErrGroupCut  = errors.New("cycles applied together must be of distinct images and share one group cut")
	ErrPending   = errors.New("an interrupted apply could not be completed")
	ErrMismatch  = errors.New("recovery point does not match its recorded block hashes")
	ErrClosed    = errors.New("replica store closed")
)

// ApplyResult says what Apply/ApplyGroup did.
type ApplyResult struct {
	Point     string    `json:"point"` // the point recorded ("" when everything was skipped)
	Time      time.Time `json:"time"`
	Skipped   bool      `json:"skipped"` // every cycle was already applied (idempotent)
	Images    []Result  `json:"images"`
	UndoBytes int64     `json:"undo_bytes"` // undo log bytes written by this apply
	Dropped   []string  `json:"dropped,omitempty"`
	Reclaimed int64     `json:"reclaimed"` // undo bytes freed by retention
	// AppConsistent: the point was recorded app-consistent (every cycle of
	// the commit carries format.FlagAppConsistent).
	AppConsistent bool `json:"app_consistent,omitempty"`
}

// On-disk records.

type groupMeta struct {
	Name      string    `json:"name"`
	Members   []string  `json:"members"`
	Retention Retention `json:"retention"`
}

type pointRec struct {
	N     uint64            `json:"n"`
	Time  time.Time         `json:"time"`
	Cycle uint64            `json:"cycle"`
	Seqs  map[string]uint64 `json:"seqs"`
	Kind  string            `json:"kind"`
	// AppConsistent: made from cycles cut while the applications were
	// quiesced (format.FlagAppConsistent); retention prefers such points.
	AppConsistent bool `json:"app_consistent,omitempty"`
}

type pointsFile struct {
	Next   uint64     `json:"next"` // number of the next point (and of the undo logs of the apply that records it)
	Points []pointRec `json:"points"`
}

type journalItem struct {
	ID   string `json:"id"`
	Gen  uint64 `json:"generation"`
	Seq  uint64 `json:"seq"`
	Path string `json:"path"`
	Refs string `json:"refs,omitempty"` // refs file with the copied ref blocks (refs.go)
	// Prev is the image's state at the last recorded point (what a drop
	// rolls back to; repair.go).
	Prev *imageState `json:"prev,omitempty"`
}

// journal (GROUP/apply.json) is the commit record of an apply: once it is
// durable, the apply is rolled forward after a crash; before, it is rolled back.
type journal struct {
	Point uint64        `json:"point"`
	Time  time.Time     `json:"time"`
	Cycle uint64        `json:"cycle"`
	Items []journalItem `json:"items"`
	// AppConsistent is recorded in the point (also by a roll-forward).
	AppConsistent bool `json:"app_consistent,omitempty"`
	// Dropping: the apply is being rolled back to the last point
	// (DropPending); recovery finishes that instead of rolling forward.
	Dropping bool `json:"dropping,omitempty"`
}

type imageState struct {
	ID         string `json:"id"`
	Generation uint64 `json:"generation"`
	Name       string `json:"name"`
	Seq        uint64 `json:"seq"` // last applied cycle
	Size       uint64 `json:"size"`
	Present    bool   `json:"present"` // a cycle has been applied
	// While an apply is in progress:
	Applying      bool   `json:"applying"`
	ApplyingSeq   uint64 `json:"applying_seq,omitempty"`
	ApplyingGen   uint64 `json:"applying_generation,omitempty"`
	ApplyingPoint uint64 `json:"applying_point,omitempty"`
	ApplyingPath  string `json:"applying_path,omitempty"`
	// Supersedes: images of the same name this one replaced (the disk was
	// deleted and re-created on the primary; retire.go).
	Supersedes []string `json:"supersedes,omitempty"`
}

type image struct {
	id, dir string
	st      imageState
	logs    []*undoLog // sorted by from; ranges never overlap
	img     *os.File   // latest.img
	hashes  *os.File   // hashes.bin
}

func (im *image) close() {
	for _, l := range im.logs {
		l.close()
	}
	im.img.Close()
	im.hashes.Close()
}

type group struct {
	name, dir string
	wmu       sync.Mutex // one apply / recovery / retention at a time

	mu     sync.RWMutex // guards everything below; readers hold it shared per read
	meta   groupMeta
	pts    pointsFile
	images map[string]*image
	// needRecover is set when an operation stopped half-way (crash hook or
	// I/O error); the next apply first runs recovery from the disk state.
	needRecover bool
	pendingErr  error // guarded by mu: why the last recovery failed
	loadErr     error // guarded by mu: the group's files could not be loaded
	// fo is GROUP/failover.json (failover.go): the group was promoted on
	// this host and takes no replication. Guarded by mu; changed with wmu held.
	fo *FailoverState
}

func (g *group) setPending(err error) {
	g.mu.Lock()
	g.pendingErr = err
	g.mu.Unlock()
}

// OpenReplica opens (creating if needed) the replica store in dir and
// recovers every group: an apply interrupted after its commit record is
// completed from its cycle files, one interrupted before is rolled back, and
// interrupted retention is finished. A group whose recovery fails stays
// readable; Apply on it retries recovery (and may supply the cycle files).
func OpenReplica(dir string, o ReplicaOptions) (*Replica, error) {
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	// The store holds every point of every group: only its owner may enter.
	if old, changed, err := fsutil.Tighten(dir); err != nil {
		return nil, fmt.Errorf("replica store %s: %w", dir, err)
	} else if changed {
		o.Logger.Warn("replica store was accessible to other users: group/other permissions removed", "store", dir, "old_mode", fmt.Sprintf("%04o", old), "new_mode", fmt.Sprintf("%04o", old&0o700))
	}
	if err := os.MkdirAll(filepath.Join(dir, "groups"), 0o700); err != nil {
		return nil, err
	}
	lf, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(lf.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lf.Close()
		return nil, fmt.Errorf("replica store %s is in use by another process: %w", dir, err)
	}
	r := &Replica{dir: dir, o: o, lock: lf, groups: map[string]*group{}, idxStop: make(chan struct{})}
	ci, fresh, err := openChunkIndex(filepath.Join(dir, "chunks.db"))
	if err != nil {
		o.Logger.Error("chunk index unavailable: dedup-aware replication off", "err", err)
	}
	r.chunks = ci
	r.loadScrub()
	ents, err := os.ReadDir(filepath.Join(dir, "groups"))
	if err != nil {
		r.Close()
		return nil, err
	}
	for _, e := range ents {
		if !e.IsDir() || !storeNameOK(e.Name()) {
			continue
		}
		g := &group{name: e.Name(), dir: filepath.Join(dir, "groups", e.Name()), images: map[string]*image{}, pts: pointsFile{Next: 1}}
		g.wmu.Lock()
		err := r.recoverGroup(g, nil)
		g.wmu.Unlock()
		if errors.Is(err, ErrNoGroup) {
			continue // EnsureGroup did not finish
		}
		if err != nil {
			o.Logger.Error("recovery of replication group failed; it stays at its last recorded point", "group", g.name, "err", err)
		}
		r.groups[g.name] = g
	}
	if fresh && len(r.groups) > 0 {
		r.idxWG.Add(1)
		go func() {
			defer r.idxWG.Done()
			r.reindexAll(r.idxStop)
		}()
	}
	return r, nil
}

// Close releases the store. It does no I/O that matters for durability, so
// a test may Close after a simulated crash and reopen.
func (r *Replica) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil
	}
	r.closed = true
	close(r.idxStop)
	r.idxWG.Wait() // the rebuild never takes r.mu
	for _, g := range r.groups {
		g.wmu.Lock() // waits for a running apply
		defer g.wmu.Unlock()
		g.mu.Lock()
		for _, im := range g.images {
			im.close()
		}
		g.images = map[string]*image{}
		g.mu.Unlock()
	}
	if r.chunks != nil {
		r.chunks.close() // no apply runs any more
	}
	return r.lock.Close()
}

func (r *Replica) hook(stage string) error {
	if r.o.testHook != nil {
		if err := r.o.testHook(stage); err != nil {
			return fmt.Errorf("at %s: %w", stage, err)
		}
	}
	return nil
}

func (r *Replica) group(name string) (*group, error) {
	if err := checkName("group", name); err != nil {
		return nil, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil, ErrClosed
	}
	g := r.groups[name]
	if g == nil {
		return nil, fmt.Errorf("group %q: %w", name, ErrNoGroup)
	}
	return g, nil
}

// recoverIfNeeded finishes an operation on g that stopped half-way (crash
// hook or I/O error) before the next one starts. Called with g.wmu held.
func (r *Replica) recoverIfNeeded(g *group) error {
	if g.needRecover {
		return r.recoverGroup(g, nil)
	}
	return nil
}

// lockForWrite takes g's writer lock (one apply, import, adopt or retention
// at a time) and recovers g first if needed.
func (r *Replica) lockForWrite(g *group) (unlock func(), err error) {
	g.wmu.Lock()
	if err := r.recoverIfNeeded(g); err != nil {
		g.wmu.Unlock()
		return nil, err
	}
	return g.wmu.Unlock, nil
}

// lockedGroup returns the named group with its writer lock taken (and
// recovered if needed).
func (r *Replica) lockedGroup(name string) (*group, func(), error) {
	g, err := r.group(name)
	if err != nil {
		return nil, nil, err
	}
	unlock, err := r.lockForWrite(g)
	if err != nil {
		return nil, nil, err
	}
	return g, unlock, nil
}

// EnsureGroup creates the group or updates its retention policy (idempotent).
// A changed policy applies from the next apply.
func (r *Replica) EnsureGroup(name string, ret Retention) error {
	if err := checkName("group", name); err != nil {
		return err
	}
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return ErrClosed
	}
	g := r.groups[name]
	if g == nil {
		g = &group{name: name, dir: filepath.Join(r.dir, "groups", name), images: map[string]*image{},
			meta: groupMeta{Name: name}, pts: pointsFile{Next: 1}}
		r.groups[name] = g
	}
	r.mu.Unlock()
	g.wmu.Lock()
	defer g.wmu.Unlock()
	if g.meta.Retention == ret && fileExists(filepath.Join(g.dir, "group.json")) {
		return nil
	}
	if err := os.MkdirAll(filepath.Join(g.dir, "images"), 0o700); err != nil {
		return err
	}
	if err := fsutil.SyncDir(filepath.Join(r.dir, "groups")); err != nil {
		return err
	}
	m := g.meta
	m.Retention = ret
	if err := fsutil.WriteJSON(filepath.Join(g.dir, "group.json"), m); err != nil {
		return err
	}
	g.mu.Lock()
	g.meta = m
	g.mu.Unlock()
	return nil
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// loadGroup reads a group's files into g (used at open and to recover after
// an interrupted operation). Image directories without state (an apply of a
// new image that crashed before its state was written) are removed, partial
// undo logs (*.tmp) are deleted, and an undo log contained in another one's
// range (a merge that crashed before deleting its inputs) is deleted.
func (r *Replica) loadGroup(g *group) error {
	var meta groupMeta
	if err := fsutil.ReadJSON(filepath.Join(g.dir, "group.json"), &meta); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return ErrNoGroup
		}
		return err
	}
	removeStaleTemps(g.dir)
	pts := pointsFile{Next: 1}
	if err := fsutil.ReadJSON(filepath.Join(g.dir, "points.json"), &pts); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if pts.Next == 0 {
		return fmt.Errorf("points.json: next point number is 0")
	}
	fo, err := readFailover(g.dir)
	if err != nil {
		return err
	}
	images := map[string]*image{}
	fail := func(err error) error {
		for _, im := range images {
			im.close()
		}
		return err
	}
	ents, err := os.ReadDir(filepath.Join(g.dir, "images"))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	for _, e := range ents {
		if !e.IsDir() || !imageIDOK(e.Name()) {
			continue
		}
		idir := filepath.Join(g.dir, "images", e.Name())
		var st imageState
		if err := fsutil.ReadJSON(filepath.Join(idir, "state.json"), &st); err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				r.o.Logger.Info("removing image directory of an apply that never committed", "group", g.name, "image", e.Name())
				if err := os.RemoveAll(idir); err != nil {
					return fail(err)
				}
				continue
			}
			return fail(err)
		}
		removeStaleTemps(idir)
		if st.ID != e.Name() {
			return fail(fmt.Errorf("%s: state is for image %q", idir, st.ID))
		}
		im, err := r.loadImage(idir, st)
		if err != nil {
			return fail(err)
		}
		images[st.ID] = im
	}
	g.mu.Lock()
	old := g.images
	g.meta, g.pts, g.images, g.fo = meta, pts, images, fo
	g.mu.Unlock()
	for _, im := range old {
		im.close()
	}
	return nil
}

func (r *Replica) loadImage(idir string, st imageState) (*image, error) {
	im := &image{id: st.ID, dir: idir, st: st}
	udir := filepath.Join(idir, "undo")
	if err := os.MkdirAll(udir, 0o700); err != nil {
		return nil, err
	}
	ents, err := os.ReadDir(udir)
	if err != nil {
		return nil, err
	}
	removed := false
	for _, e := range ents {
		p := filepath.Join(udir, e.Name())
		if filepath.Ext(e.Name()) == ".tmp" {
			if err := os.Remove(p); err != nil {
				return nil, err
			}
			removed = true
			continue
		}
		if _, _, ok := parseUndoName(e.Name()); !ok {
			continue
		}
		l, err := loadUndo(p)
		if err != nil {
			im.close()
			return nil, err
		}
		im.logs = append(im.logs, l)
	}
	// Drop logs contained in a merged log (merge interrupted before it deleted its inputs).
	slices.SortFunc(im.logs, func(a, b *undoLog) int {
		if a.from != b.from {
			return cmpU64(a.from, b.from)
		}
		return cmpU64(b.to, a.to) // wider first
	})
	kept := im.logs[:0]
	for _, l := range im.logs {
		if n := len(kept); n > 0 && l.to <= kept[n-1].to {
			l.close()
			if err := os.Remove(l.path); err != nil {
				return nil, err
			}
			removed = true
			continue
		}
		if n := len(kept); n > 0 && l.from <= kept[n-1].to {
			im.close()
			return nil, fmt.Errorf("%s: undo logs %d-%d and %d-%d overlap", udir, kept[n-1].from, kept[n-1].to, l.from, l.to)
		}
		kept = append(kept, l)
	}
	im.logs = kept
	if removed {
		if err := fsutil.SyncDir(udir); err != nil {
			im.close()
			return nil, err
		}
	}
	if im.img, err = os.OpenFile(filepath.Join(idir, "latest.img"), os.O_RDWR|os.O_CREATE, 0o600); err != nil {
		im.close()
		return nil, err
	}
	if im.hashes, err = os.OpenFile(filepath.Join(idir, "hashes.bin"), os.O_RDWR|os.O_CREATE, 0o600); err != nil {
		im.close()
		return nil, err
	}
	return im, nil
}

func cmpU64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// recoverGroup brings g to a clean state from what is on disk. Called with
// g.wmu held. override maps "id/gen/seq" to a cycle file to use instead of
// the path recorded in the journal.
func (r *Replica) recoverGroup(g *group, override map[string]string) error {
	if err := r.loadGroup(g); err != nil {
		g.needRecover = true
		g.mu.Lock()
		g.pendingErr, g.loadErr = err, err
		g.mu.Unlock()
		return err
	}
	g.needRecover = true
	g.mu.Lock()
	g.pendingErr, g.loadErr = nil, nil
	g.mu.Unlock()
	if err := r.finishSeed(g); err != nil {
		err = fmt.Errorf("%w: completing the seed import: %v", ErrPending, err)
		g.setPending(err)
		return err
	}
	if err := r.finishAdopt(g); err != nil {
		err = fmt.Errorf("%w: completing the adopt: %v", ErrPending, err)
		g.setPending(err)
		return err
	}
	jpath := filepath.Join(g.dir, "apply.json")
	var j journal
	err := fsutil.ReadJSON(jpath, &j)
	switch {
	case err != nil && !errors.Is(err, fs.ErrNotExist):
		g.setPending(err)
		return err
	case err == nil && j.Point >= g.pts.Next && j.Dropping:
		// A drop of an apply that could not finish was decided: finish it.
		if err := r.finishDrop(g, &j); err != nil {
			err = fmt.Errorf("%w: dropping point %d: %v", ErrPending, j.Point, err)
			g.setPending(err)
			return err
		}
	case err == nil && j.Point >= g.pts.Next:
		// Committed but not recorded: roll forward.
		r.o.Logger.Info("completing interrupted apply", "group", g.name, "point", j.Point)
		for _, it := range j.Items {
			im := g.images[it.ID]
			if im == nil {
				err := fmt.Errorf("%w: image %s of point %d has no state", ErrPending, it.ID, j.Point)
				g.setPending(err)
				return err
			}
			if !im.st.Applying {
				if im.st.Present && im.st.Generation == it.Gen && im.st.Seq == it.Seq {
					continue // this image finished before the crash
				}
				err := fmt.Errorf("%w: image %s is at generation %d seq %d, journal says %d/%d", ErrPending, it.ID, im.st.Generation, im.st.Seq, it.Gen, it.Seq)
				g.setPending(err)
				return err
			}
			path := it.Path
			if p, ok := override[fmt.Sprintf("%s/%d/%d", it.ID, it.Gen, it.Seq)]; ok {
				path = p
			}
			c, err := openCycle(path)
			if err == nil {
				h := c.r.Header()
				if uuid.UUID(h.ImageID).String() != it.ID || h.Generation != it.Gen || h.Seq != it.Seq {
					err = fmt.Errorf("%s is not cycle %s/%d/%d", path, it.ID, it.Gen, it.Seq)
				} else {
					err = r.applyData(im, c.r, it.Refs)
				}
				if err == nil {
					r.indexCycle(g.name, it.ID, c.r)
				}
				c.f.Close()
			}
			if err == nil {
				err = r.markApplied(g, im, c.r.Header())
			}
			if err != nil {
				err = fmt.Errorf("%w: point %d, image %s: %w", ErrPending, j.Point, it.ID, err)
				g.setPending(err)
				return err
			}
		}
		if err := r.recordPoint(g, &j); err != nil {
			g.setPending(err)
			return err
		}
		fallthrough
	case err == nil:
		if err := os.Remove(jpath); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		if err := fsutil.SyncDir(g.dir); err != nil {
			return err
		}
	default:
		// No commit record: roll back whatever an apply prepared.
		for id, im := range g.images {
			if im.st.Applying {
				r.o.Logger.Info("rolling back uncommitted apply", "group", g.name, "image", id, "seq", im.st.ApplyingSeq)
				if !im.st.Present {
					g.mu.Lock()
					delete(g.images, id)
					g.mu.Unlock()
					im.close()
					if err := os.RemoveAll(im.dir); err != nil {
						return err
					}
					continue
				}
				st := im.st
				st.Applying, st.ApplyingSeq, st.ApplyingGen, st.ApplyingPoint, st.ApplyingPath = false, 0, 0, 0, ""
				if err := fsutil.WriteJSON(filepath.Join(im.dir, "state.json"), st); err != nil {
					return err
				}
				g.mu.Lock()
				im.st = st
				g.mu.Unlock()
			}
		}
	}
	// Undo logs beyond the last recorded point belong to no committed apply.
	if err := removeLogsBeyondPoints(g); err != nil {
		return err
	}
	// No apply is pending any more: refs files of earlier applies are done.
	os.RemoveAll(filepath.Join(g.dir, "refs"))
	if _, _, err := r.retain(g); err != nil {
		return err
	}
	g.needRecover = false
	return nil
}

// removeStaleTemps deletes the temporary files fsutil.WriteAtomic leaves
// behind when it is interrupted (".NAME.tmp-*"); they are never read.
func removeStaleTemps(dir string) {
	ms, _ := filepath.Glob(filepath.Join(dir, ".*.tmp-*"))
	for _, m := range ms {
		os.Remove(m)
	}
}

// removeLogsBeyondPoints removes the undo logs of g's images that reach
// beyond its last recorded point (they belong to no committed apply).
func removeLogsBeyondPoints(g *group) error {
	for _, im := range g.images {
		var drop []*undoLog
		g.mu.Lock()
		keep := im.logs[:0:0]
		for _, l := range im.logs {
			if l.to >= g.pts.Next {
				drop = append(drop, l)
			} else {
				keep = append(keep, l)
			}
		}
		im.logs = keep
		g.mu.Unlock()
		if err := removeLogs(drop); err != nil {
			return err
		}
	}
	return nil
}

func removeLogs(logs []*undoLog) error {
	dirs := map[string]bool{}
	for _, l := range logs {
		l.close()
		if err := os.Remove(l.path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		dirs[filepath.Dir(l.path)] = true
	}
	for d := range dirs {
		if err := fsutil.SyncDir(d); err != nil {
			return err
		}
	}
	return nil
}

type openedCycle struct {
	path string
	f    *os.File
	r    *format.Reader
}

// openCycles opens and verifies every cycle file (completely, or only its
// whole-file hash when the caller verified it before); on error the ones
// already opened are returned for closeCycles.
func openCycles(paths []string, full bool) ([]*openedCycle, error) {
	var cs []*openedCycle
	for _, p := range paths {
		c, err := openCycleWith(p, full)
		if err != nil {
			return cs, err
		}
		cs = append(cs, c)
	}
	return cs, nil
}

func closeCycles(cs []*openedCycle) {
	for _, c := range cs {
		c.f.Close()
	}
}

// openCycle opens and completely verifies a cycle file.
func openCycle(path string) (*openedCycle, error) { return openCycleWith(path, true) }

func openCycleWith(path string, full bool) (*openedCycle, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	r, err := format.Open(f, st.Size())
	if err == nil {
		if full {
			err = r.Verify()
		} else {
			err = r.VerifyFile()
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &openedCycle{path: path, f: f, r: r}, nil
}

// Apply verifies and applies one cycle file and records a recovery point.
func (r *Replica) Apply(ctx context.Context, group, path string) (ApplyResult, error) {
	return r.ApplyGroup(ctx, group, []string{path})
}

// ApplyGroup verifies every cycle file completely, checks each against its
// image's state (see ApplyFiles for the rules), applies them with the
// undo/journal protocol of docs/replica.md and records ONE recovery point
// after all are applied. Cycles already applied are skipped (idempotent);
// when all are, no point is recorded and Skipped is set. Refused input
// changes nothing.
func (r *Replica) ApplyGroup(ctx context.Context, groupName string, paths []string) (ApplyResult, error) {
	return r.applyGroup(ctx, groupName, paths, true, nil, nil)
}

// ApplyVerified is ApplyGroup for cycle files the caller has already
// verified completely (the server verifies every upload before it enters the
// inbox): before the apply only the whole-file hash is checked again, which
// catches any change since; every block hash is still checked while the data
// is applied.
func (r *Replica) ApplyVerified(ctx context.Context, groupName string, paths []string) (ApplyResult, error) {
	return r.applyGroup(ctx, groupName, paths, false, nil, nil)
}

// ApplyVerifiedFrom is ApplyVerified whose ref blocks may only be resolved
// from images that sources allows (the committing primary's allow-list).
func (r *Replica) ApplyVerifiedFrom(ctx context.Context, groupName string, paths []string, sources SourceFunc) (ApplyResult, error) {
	return r.applyGroup(ctx, groupName, paths, false, sources, nil)
}

func (r *Replica) applyGroup(ctx context.Context, groupName string, paths []string, full bool, sources SourceFunc, admit AdmitFunc) (res ApplyResult, err error) {
	g, err := r.group(groupName)
	if err != nil {
		return res, err
	}
	if len(paths) == 0 {
		return res, errors.New("no cycle files")
	}
	cs, err := openCycles(paths, full)
	defer closeCycles(cs)
	if err != nil {
		return res, err
	}
	ids := map[string]bool{}
	for _, c := range cs {
		h := c.r.Header()
		id := uuid.UUID(h.ImageID).String()
		if ids[id] || h.GroupCut != cs[0].r.Header().GroupCut {
			return res, fmt.Errorf("%s: %w", c.path, ErrGroupCut)
		}
		ids[id] = true
	}
	// Ref blocks may be resolved from any group: look them up now, since
	// r.mu must not be taken while g.wmu is held (Close holds r.mu while it
	// waits for every group's wmu).
	var groups map[string]*group
	for _, c := range cs {
		if c.r.Footer().RefBlocks > 0 {
			groups = r.groupsSnapshot()
			break
		}
	}
	g.wmu.Lock()
	defer g.wmu.Unlock()
	if g.needRecover {
		override := map[string]string{}
		for _, c := range cs {
			h := c.r.Header()
			override[fmt.Sprintf("%s/%d/%d", uuid.UUID(h.ImageID), h.Generation, h.Seq)] = c.path
		}
		if err := r.recoverGroup(g, override); err != nil {
			return res, err
		}
	}
	// A group promoted on this host takes no replication (failover.go).
	g.mu.RLock()
	foErr := g.failedOver()
	g.mu.RUnlock()
	if foErr != nil {
		return res, foErr
	}
	// Authorization against what is held now (server_authz.go).
	if err := admitCycles(g, cs, admit); err != nil {
		return res, err
	}

	// Plan.
	type item struct {
		c    *openedCycle
		im   *image // nil for a new image
		id   string
		new  bool
		refs *refSet // resolved ref blocks (nil: the cycle has none)
	}
	var plan []item
	for _, c := range cs {
		h := c.r.Header()
		id := uuid.UUID(h.ImageID).String()
		im := g.images[id]
		rr := Result{Path: c.path, Seq: h.Seq, Blocks: c.r.Footer().DataBlocks, Zeroes: c.r.Footer().ZeroBlocks, Refs: c.r.Footer().RefBlocks}
		switch {
		case im == nil || !im.st.Present:
			if !h.Base() {
				return res, fmt.Errorf("%s (image %s seq %d): %w; apply the image's base cycle first", c.path, id, h.Seq, ErrNoBase)
			}
		case h.Generation != im.st.Generation:
			if !(h.Base() && h.Generation > im.st.Generation) {
				return res, fmt.Errorf("%s: %w: cycle generation %d, replica holds generation %d of image %s", c.path, ErrForeign, h.Generation, im.st.Generation, id)
			}
		case h.Seq == im.st.Seq:
			rr.Skipped = true
		case h.Seq < im.st.Seq:
			return res, fmt.Errorf("%s: %w: cycle %d, replica of image %s is at cycle %d", c.path, ErrReplay, h.Seq, id, im.st.Seq)
		case h.Base():
			// A later base of the held generation defines the whole image:
			// it needs no parent (a forwarded base after the forward state
			// was lost).
		case h.Parent != im.st.Seq:
			// A delta applies on its parent: normally seq-1; a merged
			// delta forwarded by extended replication names an earlier one.
			return res, fmt.Errorf("%s: %w: cycle %d applies on cycle %d, replica of image %s is at cycle %d (missing %d..%d)", c.path, ErrGap, h.Seq, h.Parent, id, im.st.Seq, im.st.Seq+1, h.Parent)
		}
		if err := g.checkNotRetired(c.path, id); err != nil && !rr.Skipped {
			return res, err
		}
		res.Images = append(res.Images, rr)
		if !rr.Skipped {
			plan = append(plan, item{c: c, im: im, id: id, new: im == nil})
		}
	}
	if len(plan) == 0 {
		res.Skipped = true
		return res, nil
	}
	if err := ctx.Err(); err != nil {
		return res, err
	}
	// Everything that could fail after the commit record is checked now.
	var planned []*openedCycle
	for _, it := range plan {
		planned = append(planned, it.c)
	}
	if err := r.checkHoldable(g, planned); err != nil {
		return res, err
	}
	// Resolve every ref block before anything changes (refs.go).
	missing := map[string][][2]uint64{}
	hdrs := map[string]format.Header{}
	removeRefs := func() {
		for _, it := range plan {
			if it.refs != nil && it.refs.path != "" {
				os.Remove(it.refs.path)
			}
		}
	}
	for i, it := range plan {
		if it.c.r.Footer().RefBlocks == 0 {
			continue
		}
		rs, miss, err := r.resolveRefs(groups, g, it.im, it.id, it.c.r, sources)
		if err != nil {
			removeRefs()
			return res, fmt.Errorf("resolving the ref blocks of %s: %w", it.c.path, err)
		}
		if len(miss) > 0 {
			missing[it.id], hdrs[it.id] = miss, it.c.r.Header()
			continue
		}
		plan[i].refs = rs
	}
	if len(missing) > 0 {
		removeRefs()
		return res, missingError(missing, hdrs)
	}
	// From here on, any failure leaves work for recovery.
	g.needRecover = true
	N := g.pts.Next
	h0 := cs[0].r.Header()
	j := journal{Point: N, Time: h0.CutTime, Cycle: h0.Seq, AppConsistent: appConsistent(cs)}

	// New members: group.json, then the image directory.
	var added []string
	for _, it := range plan {
		if !slices.Contains(g.meta.Members, it.id) {
			added = append(added, it.id)
		}
	}
	if len(added) > 0 {
		m := g.meta
		m.Members = append(slices.Clone(m.Members), added...)
		if err := fsutil.WriteJSON(filepath.Join(g.dir, "group.json"), m); err != nil {
			return res, err
		}
		g.mu.Lock()
		g.meta = m
		g.mu.Unlock()
	}
	for i, it := range plan {
		if it.im != nil {
			continue
		}
		idir := filepath.Join(g.dir, "images", it.id)
		if err := os.RemoveAll(idir); err != nil { // leftovers of a rolled-back apply
			return res, err
		}
		if err := os.MkdirAll(filepath.Join(idir, "undo"), 0o700); err != nil {
			return res, err
		}
		if err := fsutil.SyncDir(filepath.Join(g.dir, "images")); err != nil {
			return res, err
		}
		im, err := r.loadImage(idir, imageState{ID: it.id})
		if err != nil {
			return res, err
		}
		plan[i].im = im
		// Not yet in g.images: no point refers to it until N is recorded.
	}
	// Step 2: undo logs, durable and published to readers before anything changes.
	for _, it := range plan {
		l, err := r.buildUndo(it.im, N, it.c.r, it.refs)
		if err != nil {
			return res, fmt.Errorf("undo log for image %s: %w", it.id, err)
		}
		res.UndoBytes += l.size
		g.mu.Lock()
		it.im.logs = append(it.im.logs, l)
		g.mu.Unlock()
		if err := r.hook("undo"); err != nil {
			return res, err
		}
	}
	// Step 3: state "applying" (with the cycle path).
	for _, it := range plan {
		h := it.c.r.Header()
		st := it.im.st
		prev := st
		st.Applying, st.ApplyingSeq, st.ApplyingGen, st.ApplyingPoint, st.ApplyingPath = true, h.Seq, h.Generation, N, it.c.path
		if it.new {
			st.Supersedes = g.supersededBy(h.Name, func(id string) bool { return slices.ContainsFunc(plan, func(x item) bool { return x.id == id }) })
		}
		if err := fsutil.WriteJSON(filepath.Join(it.im.dir, "state.json"), st); err != nil {
			return res, err
		}
		g.mu.Lock()
		it.im.st = st
		if it.new {
			g.images[it.id] = it.im
		}
		g.mu.Unlock()
		if err := r.hook("state-applying"); err != nil {
			return res, err
		}
		h = it.c.r.Header()
		ji := journalItem{ID: it.id, Gen: h.Generation, Seq: h.Seq, Path: it.c.path, Prev: &prev}
		if it.refs != nil {
			ji.Refs = it.refs.path
		}
		j.Items = append(j.Items, ji)
	}
	// Commit record.
	if err := fsutil.WriteJSON(filepath.Join(g.dir, "apply.json"), j); err != nil {
		return res, err
	}
	committed := true
	defer func() {
		if committed && err != nil {
			// Recovery retries with the next commit; until it succeeds (or
			// the apply is dropped, see Repair) the group shows it pending.
			g.setPending(fmt.Errorf("%w: point %d: %v", ErrPending, N, err))
		}
	}()
	if err := r.hook("journal"); err != nil {
		return res, err
	}
	// Step 4: the data.
	for _, it := range plan {
		refs := ""
		if it.refs != nil {
			refs = it.refs.path
		}
		if err := r.applyData(it.im, it.c.r, refs); err != nil {
			return res, fmt.Errorf("applying %s: %w", it.c.path, err)
		}
		r.indexCycle(g.name, it.id, it.c.r)
		if err := r.hook("data"); err != nil {
			return res, err
		}
		if err := r.markApplied(g, it.im, it.c.r.Header()); err != nil {
			return res, err
		}
		if err := r.hook("state-applied"); err != nil {
			return res, err
		}
	}
	// Step 5: the point, then the journal goes, then retention.
	if err := r.recordPoint(g, &j); err != nil {
		return res, err
	}
	if err := r.hook("point"); err != nil {
		return res, err
	}
	if err := os.Remove(filepath.Join(g.dir, "apply.json")); err != nil {
		return res, err
	}
	if err := fsutil.SyncDir(g.dir); err != nil {
		return res, err
	}
	committed = false
	removeRefs()
	res.Point, res.Time, res.AppConsistent = pointID(N), j.Time, j.AppConsistent
	res.Dropped, res.Reclaimed, err = r.retain(g)
	if err != nil {
		return res, fmt.Errorf("retention after point %d: %w", N, err)
	}
	g.needRecover = false
	return res, nil
}

// markApplied makes "cycle h applied" durable in the image state.
func (r *Replica) markApplied(g *group, im *image, h format.Header) error {
	st := im.st
	st.Generation, st.Seq, st.Name, st.Size, st.Present = h.Generation, h.Seq, h.Name, h.ImageSize, true
	st.Applying, st.ApplyingSeq, st.ApplyingGen, st.ApplyingPoint, st.ApplyingPath = false, 0, 0, 0, ""
	if err := fsutil.WriteJSON(filepath.Join(im.dir, "state.json"), st); err != nil {
		return err
	}
	g.mu.Lock()
	im.st = st
	g.mu.Unlock()
	return nil
}

// recordPoint appends point j.Point (with the current seq of every present
// image) to points.json durably.
func (r *Replica) recordPoint(g *group, j *journal) error {
	p := pointRec{N: j.Point, Time: j.Time, Cycle: j.Cycle, Seqs: map[string]uint64{}, Kind: "latest", AppConsistent: j.AppConsistent}
	retired := g.retiredBy()
	for id, im := range g.images {
		if im.st.Present && retired[id] == "" {
			p.Seqs[id] = im.st.Seq
		}
	}
	pf := pointsFile{Next: j.Point + 1, Points: append(slices.Clone(g.pts.Points), p)}
	for i := range pf.Points[:len(pf.Points)-1] {
		if pf.Points[i].Kind == "latest" {
			pf.Points[i].Kind = "any"
		}
	}
	if err := fsutil.WriteJSON(filepath.Join(g.dir, "points.json"), pf); err != nil {
		return err
	}
	g.mu.Lock()
	g.pts = pf
	g.mu.Unlock()
	return nil
}

type brange struct{ lo, hi uint64 } // blocks [lo, hi)

// normalize sorts and merges ranges.
func normalize(rs []brange) []brange {
	sort.Slice(rs, func(i, j int) bool { return rs[i].lo < rs[j].lo })
	out := rs[:0]
	for _, x := range rs {
		if x.lo >= x.hi {
			continue
		}
		if n := len(out); n > 0 && x.lo <= out[n-1].hi {
			out[n-1].hi = max(out[n-1].hi, x.hi)
			continue
		}
		out = append(out, x)
	}
	return out
}

// intersect appends alloc ∩ [lo, hi) to out (alloc sorted, disjoint).
func intersect(out, alloc []brange, lo, hi uint64) []brange {
	i := sort.Search(len(alloc), func(i int) bool { return alloc[i].hi > lo })
	for ; i < len(alloc) && alloc[i].lo < hi; i++ {
		out = append(out, brange{max(lo, alloc[i].lo), min(hi, alloc[i].hi)})
	}
	return out
}

func blocksOf(size uint64) uint64 { return (size + format.BlockSize - 1) / format.BlockSize }

// buildUndo writes undo log N of im for cycle r: every block whose content
// the cycle may change, with its current content and recorded hash.
func (r *Replica) buildUndo(im *image, N uint64, cr *format.Reader, refs *refSet) (*undoLog, error) {
	h := cr.Header()
	var oldSize uint64
	if im.st.Present {
		oldSize = im.st.Size
	}
	oldBlocks := blocksOf(oldSize)
	var alloc []brange
	if oldSize > 0 {
		exts, err := fsutil.DataExtents(im.img, int64(oldSize))
		if err != nil {
			return nil, err
		}
		for _, e := range exts {
			alloc = append(alloc, brange{uint64(e.Off) / format.BlockSize, blocksOf(uint64(e.Off + e.Len))})
		}
	}
	var rs []brange
	for _, e := range cr.Extents() {
		switch e.Kind {
		case format.KindData:
			rs = append(rs, brange{e.Start, e.End()})
		case format.KindZero:
			rs = intersect(rs, alloc, e.Start, min(e.End(), oldBlocks))
		}
	}
	if refs != nil {
		rs = append(rs, refs.runs...) // copied ref blocks change like data
	}
	if h.Base() {
		rs = append(rs, alloc...)
	}
	if h.ImageSize < oldSize {
		rs = intersect(rs, alloc, h.ImageSize/format.BlockSize, oldBlocks)
	}
	rs = normalize(rs)
	if refs != nil {
		// Kept ref blocks do not change: the apply does not write them.
		rs = subtract(rs, refs.keep)
	}

	w, err := createUndo(filepath.Join(im.dir, "undo"), N, N, !im.st.Present, oldSize)
	if err != nil {
		return nil, err
	}
	const chunk = 256
	buf := make([]byte, chunk*format.BlockSize)
	hb := make([]byte, chunk*32)
	for _, x := range rs {
		for b := x.lo; b < x.hi; {
			n := min(x.hi-b, chunk)
			if b >= oldBlocks { // beyond the old end: it read as zero
				for i := uint64(0); i < n; i++ {
					if err := w.add(b+i, zeroHash, nil); err != nil {
						w.abort()
						return nil, err
					}
				}
				b += n
				continue
			}
			n = min(n, oldBlocks-b)
			d := buf[:n*format.BlockSize]
			if err := readFullAt(im.img, d, int64(b)*format.BlockSize); err != nil {
				w.abort()
				return nil, err
			}
			if err := readFullAt(im.hashes, hb[:n*32], int64(b)*32); err != nil {
				w.abort()
				return nil, err
			}
			for i := uint64(0); i < n; i++ {
				blk := d[i*format.BlockSize : (i+1)*format.BlockSize]
				var hash [32]byte
				copy(hash[:], hb[i*32:])
				var data []byte
				if !isZero(blk) {
					data = blk
				}
				if err := w.add(b+i, hash, data); err != nil {
					w.abort()
					return nil, err
				}
			}
			b += n
		}
	}
	return w.finish(r.hook)
}

// readFullAt reads len(b) bytes at off; bytes past the end of the file read as zero.
func readFullAt(f *os.File, b []byte, off int64) error {
	n, err := f.ReadAt(b, off)
	if n == len(b) {
		return nil
	}
	if err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	clear(b[n:])
	return nil
}

// applyData writes a verified cycle into latest.img and hashes.bin and syncs
// both. It may be repeated after a crash (it does not depend on what a
// previous, interrupted run left).
func (r *Replica) applyData(im *image, cr *format.Reader, refsPath string) error {
	h := cr.Header()
	f, hf := im.img, im.hashes
	withRefs := cr.Footer().RefBlocks > 0
	if h.Base() && !withRefs {
		if err := f.Truncate(0); err != nil {
			return err
		}
		if err := hf.Truncate(0); err != nil {
			return err
		}
	}
	st, err := f.Stat()
	if err != nil {
		return err
	}
	if int64(h.ImageSize) > st.Size() {
		if err := f.Truncate(int64(h.ImageSize)); err != nil {
			return err
		}
	}
	var src *refSource
	if withRefs {
		if src, err = newRefSource(refsPath); err != nil {
			return err
		}
		defer src.close()
		if h.Base() {
			// A base with refs keeps the blocks it refers to in place: zero
			// only the blocks no extent covers (a truncation would lose them).
			nb := blocksOf(h.ImageSize)
			for _, gap := range subtract([]brange{{0, nb}}, covered(cr)) {
				if err := punch(f, int64(gap.lo)*format.BlockSize, int64(gap.hi-gap.lo)*format.BlockSize); err != nil {
					return err
				}
				if err := punch(hf, int64(gap.lo)*32, int64(gap.hi-gap.lo)*32); err != nil {
					return err
				}
			}
		}
	}
	var refHashes, refBlk []byte
	exts := cr.Extents()
	dec := newDecoder(cr, exts)
	defer dec.stop()
	for i, e := range exts {
		off := int64(e.Start) * format.BlockSize
		switch e.Kind {
		case format.KindData:
			buf, hb, err := dec.get(i)
			if err != nil {
				return err
			}
			if _, err := f.WriteAt(buf, off); err != nil {
				return err
			}
			// The cycle's block hashes were verified against the data; only
			// the all-zero convention of hashes.bin differs.
			for b := 0; b < int(e.Count); b++ {
				if [32]byte(hb[b*32:(b+1)*32]) == zeroBlockBLAKE3 {
					copy(hb[b*32:(b+1)*32], zeroHash[:])
				}
			}
			if _, err := hf.WriteAt(hb, int64(e.Start)*32); err != nil {
				return err
			}
		case format.KindZero:
			if err := punch(f, off, int64(e.Count)*format.BlockSize); err != nil {
				return err
			}
			if err := punch(hf, int64(e.Start)*32, int64(e.Count)*32); err != nil {
				return err
			}
		case format.KindRef:
			if refBlk == nil {
				refBlk = make([]byte, format.BlockSize)
			}
			if refHashes, err = applyRefExtent(f, hf, cr, i, src, refHashes, refBlk); err != nil {
				return err
			}
		}
		if i == len(exts)/2 {
			if err := r.hook("data-partial"); err != nil {
				return err
			}
		}
	}
	if err := f.Truncate(int64(h.ImageSize)); err != nil {
		return err
	}
	nb := blocksOf(h.ImageSize)
	if hs, err := hf.Stat(); err != nil {
		return err
	} else if hs.Size() > int64(nb*32) {
		if err := hf.Truncate(int64(nb * 32)); err != nil {
			return err
		}
	}
	if h.ImageSize%format.BlockSize != 0 {
		// A shrink may have cut the last block: record its hash as it is now.
		blk := make([]byte, format.BlockSize)
		if err := readFullAt(f, blk, int64(nb-1)*format.BlockSize); err != nil {
			return err
		}
		s := blockHash(blk)
		var cur [32]byte
		if err := readFullAt(hf, cur[:], int64(nb-1)*32); err != nil {
			return err
		}
		if cur != s {
			if _, err := hf.WriteAt(s[:], int64(nb-1)*32); err != nil {
				return err
			}
		}
	}
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		return err
	}
	return unix.Fdatasync(int(hf.Fd()))
}

var zeroBlockBLAKE3 = blake3.Sum256(make([]byte, format.BlockSize))

// decoder reads, decompresses and verifies the data extents of a cycle ahead
// of the writer, on several goroutines, handing them out in file order.
type decoder struct {
	cr    *format.Reader
	exts  []format.Extent
	slots map[int]chan decoded
	next  int // next extent to start
	sem   chan struct{}
	quit  chan struct{}
}

type decoded struct {
	buf, hashes []byte
	err         error
}

const decodeAhead = 8

func newDecoder(cr *format.Reader, exts []format.Extent) *decoder {
	d := &decoder{cr: cr, exts: exts, slots: map[int]chan decoded{}, sem: make(chan struct{}, 4), quit: make(chan struct{})}
	return d
}

// start launches decoding of data extents up to index limit (exclusive).
func (d *decoder) start(limit int) {
	for ; d.next < len(d.exts) && d.next < limit; d.next++ {
		i := d.next
		if d.exts[i].Kind != format.KindData {
			continue
		}
		ch := make(chan decoded, 1)
		d.slots[i] = ch
		go func() {
			select {
			case d.sem <- struct{}{}:
			case <-d.quit:
				ch <- decoded{err: ErrClosed}
				return
			}
			buf, hb, err := d.cr.ReadExtentHashes(i, nil)
			<-d.sem
			ch <- decoded{buf, hb, err}
		}()
	}
}

// get returns extent i (a data extent), keeping decodeAhead extents in flight.
func (d *decoder) get(i int) ([]byte, []byte, error) {
	d.start(i + decodeAhead)
	ch, ok := d.slots[i]
	if !ok {
		d.start(i + 1)
		ch = d.slots[i]
	}
	r := <-ch
	delete(d.slots, i)
	return r.buf, r.hashes, r.err
}

func (d *decoder) stop() { close(d.quit) }
