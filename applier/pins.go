package applier

// Pins hold recovery points against retention (docs/replica.md, "Pins").
//
// A pinned point is a kept point: retention gives it the kind "pinned" when
// no rule keeps it, so it is neither dropped from points.json nor are the undo
// logs around it merged across it. Merging therefore still only ever joins
// the logs between two consecutive kept points, and every crash case of the
// retention protocol stays as it was.
//
// Two kinds of pins:
//   - open pins (in memory): a point file held open through the points mount;
//     they die with the process, and so do the open files;
//   - durable pins (GROUP/pins.json, written atomically before the pin is
//     reported): a test failover's point. Retention at OpenReplica already
//     sees them.
//
// Pin and retention are serialised by the group's pin lock: retention holds
// it from its decision until points.json and the in-memory list are updated,
// and a pin checks, under the same lock, that its point is still listed. So
// either retention saw the pin, or the point was already gone and the pin is
// refused (ErrNoPoint); a pin never lands on a point being expired. The lock
// is never held across an apply, so opening a point file does not wait for
// one.

import (
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/standin/standin/internal/format"
	"github.com/standin/standin/internal/fsutil"
)

// pinTable holds the pins of every group. Its zero value is ready to use.
type pinTable struct {
	mu     sync.Mutex
	groups map[string]*groupPins
}

type groupPins struct {
	mu      sync.Mutex // see the package comment above
	path    string     // GROUP/pins.json
	loaded  bool
	open    map[uint64]int // point → open pins
	durable []PinRecord
}

// PinRecord is one durable pin (GROUP/pins.json).
type PinRecord struct {
	Owner string    `json:"owner"` // e.g. "test:ID"
	Point uint64    `json:"point"`
	Time  time.Time `json:"time"`
}

type pinsFile struct {
	Pins []PinRecord `json:"pins"`
}

// PinInfo describes the pins on one point (Pins).
type PinInfo struct {
	Group  string   `json:"group"`
	Point  string   `json:"point"`
	Open   int      `json:"open_files"`       // point files held open through the points mount
	Owners []string `json:"owners,omitempty"` // durable pins (test failovers)
}

func (t *pinTable) get(g *group) *groupPins {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.groups == nil {
		t.groups = map[string]*groupPins{}
	}
	gp := t.groups[g.name]
	if gp == nil {
		gp = &groupPins{path: filepath.Join(g.dir, "pins.json"), open: map[uint64]int{}}
		t.groups[g.name] = gp
	}
	return gp
}

// load reads pins.json once. Called with gp.mu held.
func (gp *groupPins) load() error {
	if gp.loaded {
		return nil
	}
	var f pinsFile
	if err := fsutil.ReadJSON(gp.path, &f); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("pins: %w", err)
	}
	gp.durable, gp.loaded = f.Pins, true
	return nil
}

// lockPins takes g's pin lock for retention and returns whether a point is
// pinned and the (idempotent) unlock. If the durable pins cannot be read,
// every point counts as pinned: retention then expires nothing rather than a
// point a test failover uses.
func (r *Replica) lockPins(g *group) (pinned func(uint64) bool, unlock func()) {
	gp := r.pins.get(g)
	gp.mu.Lock()
	var once sync.Once
	unlock = func() { once.Do(gp.mu.Unlock) }
	if err := gp.load(); err != nil {
		r.o.Logger.Error("durable pins unreadable: retention keeps every point", "group", g.name, "err", err)
		return func(uint64) bool { return true }, unlock
	}
	set := map[uint64]bool{}
	for n, c := range gp.open {
		if c > 0 {
			set[n] = true
		}
	}
	for _, p := range gp.durable {
		set[p.Point] = true
	}
	return func(n uint64) bool { return set[n] }, unlock
}

// Pin holds one recovery point against retention until Release.
type Pin struct {
	gp    *groupPins
	n     uint64
	group string
	once  sync.Once
}

// Point returns the pinned point's ID.
func (p *Pin) Point() string { return pointID(p.n) }

// Release drops the pin; retention may expire the point from its next run
// (the next apply). Idempotent.
func (p *Pin) Release() {
	p.once.Do(func() {
		p.gp.mu.Lock()
		if p.gp.open[p.n]--; p.gp.open[p.n] <= 0 {
			delete(p.gp.open, p.n)
		}
		p.gp.mu.Unlock()
	})
}

// PinPoint pins a recovery point ("latest" resolves to the latest point now)
// in memory. It fails with ErrNoPoint if the point is not (or no longer)
// listed.
func (r *Replica) PinPoint(groupName, point string) (*Pin, error) {
	g, err := r.group(groupName)
	if err != nil {
		return nil, err
	}
	gp := r.pins.get(g)
	gp.mu.Lock()
	defer gp.mu.Unlock()
	g.mu.RLock()
	p, err := g.findPoint(point)
	g.mu.RUnlock()
	if err != nil {
		return nil, err
	}
	gp.open[p.N]++
	return &Pin{gp: gp, n: p.N, group: g.name}, nil
}

// pinDurable records a durable pin of point for owner (pins.json is durable
// when it returns) and returns the point.
func (r *Replica) pinDurable(g *group, point, owner string) (pointRec, error) {
	return r.pinWith(g, point, owner, false)
}

// pinWith records a durable pin of point for owner; with replace, the
// owner's other pins go in the same write.
func (r *Replica) pinWith(g *group, point, owner string, replace bool) (pointRec, error) {
	gp := r.pins.get(g)
	gp.mu.Lock()
	defer gp.mu.Unlock()
	if err := gp.load(); err != nil {
		return pointRec{}, err
	}
	g.mu.RLock()
	p, err := g.findPoint(point)
	g.mu.RUnlock()
	if err != nil {
		return pointRec{}, err
	}
	pins := slices.Clone(gp.durable)
	if replace {
		pins = slices.DeleteFunc(pins, func(x PinRecord) bool { return x.Owner == owner })
	}
	pins = append(pins, PinRecord{Owner: owner, Point: p.N, Time: time.Now().UTC()})
	if err := fsutil.WriteJSON(gp.path, pinsFile{Pins: pins}); err != nil {
		return pointRec{}, err
	}
	gp.durable = pins
	return p, nil
}

// unpinDurable removes every durable pin of owner in g (durably).
func (r *Replica) unpinDurable(g *group, owner string) error {
	gp := r.pins.get(g)
	gp.mu.Lock()
	defer gp.mu.Unlock()
	if err := gp.load(); err != nil {
		return err
	}
	keep := slices.DeleteFunc(slices.Clone(gp.durable), func(p PinRecord) bool { return p.Owner == owner })
	if len(keep) == len(gp.durable) {
		return nil
	}
	if err := fsutil.WriteJSON(gp.path, pinsFile{Pins: keep}); err != nil {
		return err
	}
	gp.durable = keep
	return nil
}

// durableOwners returns the owners of every durable pin of g.
func (r *Replica) durableOwners(g *group) ([]string, error) {
	gp := r.pins.get(g)
	gp.mu.Lock()
	defer gp.mu.Unlock()
	if err := gp.load(); err != nil {
		return nil, err
	}
	var out []string
	for _, p := range gp.durable {
		out = append(out, p.Owner)
	}
	return out, nil
}

// Pins lists the pinned points of a group ("" = every group).
func (r *Replica) Pins(groupName string) ([]PinInfo, error) {
	names := []string{groupName}
	if groupName == "" {
		names = r.Groups()
	}
	var out []PinInfo
	for _, name := range names {
		g, err := r.group(name)
		if err != nil {
			return nil, err
		}
		gp := r.pins.get(g)
		gp.mu.Lock()
		if err := gp.load(); err != nil {
			gp.mu.Unlock()
			return nil, fmt.Errorf("group %s: %w", name, err)
		}
		byPoint := map[uint64]*PinInfo{}
		at := func(n uint64) *PinInfo {
			if byPoint[n] == nil {
				byPoint[n] = &PinInfo{Group: name, Point: pointID(n)}
			}
			return byPoint[n]
		}
		for n, c := range gp.open {
			at(n).Open += c
		}
		for _, p := range gp.durable {
			pi := at(p.Point)
			pi.Owners = append(pi.Owners, p.Owner)
		}
		gp.mu.Unlock()
		ns := make([]uint64, 0, len(byPoint))
		for n := range byPoint {
			ns = append(ns, n)
		}
		slices.Sort(ns)
		for _, n := range ns {
			out = append(out, *byPoint[n])
		}
	}
	return out, nil
}

// Groups lists the replication groups of the store, sorted.
func (r *Replica) Groups() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]string, 0, len(r.groups))
	for n := range r.groups {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

// PointsVersion changes whenever the group's list of points changes (an
// apply records one, retention drops some): the next point number and the
// count of points. Cheap (no I/O), for caching PointFiles.
func (r *Replica) PointsVersion(groupName string) (next uint64, count int, err error) {
	g, err := r.group(groupName)
	if err != nil {
		return 0, 0, err
	}
	g.mu.RLock()
	defer g.mu.RUnlock()
	return g.pts.Next, len(g.pts.Points), nil
}

// PointFile is one image at one recovery point, as the points mount shows it.
type PointFile struct {
	Point   string    `json:"point"`
	Time    time.Time `json:"time"`
	Latest  bool      `json:"latest"`
	ImageID string    `json:"image_id"`
	File    string    `json:"file"` // file name of the image (stable per image; see fileNames)
	Size    int64     `json:"size"`
	// Allocated estimates the bytes that are not holes (an upper bound:
	// latest.img's allocation plus the undo entries serving the point), for
	// st_blocks, so that sparse-aware copiers use SEEK_DATA.
	Allocated int64 `json:"allocated"`
}

// PointFiles lists every image of every recovery point of a group, oldest
// point first.
func (r *Replica) PointFiles(groupName string) ([]PointFile, error) {
	g, err := r.group(groupName)
	if err != nil {
		return nil, err
	}
	g.mu.RLock()
	defer g.mu.RUnlock()
	if g.loadErr != nil {
		return nil, fmt.Errorf("group %s: %w", g.name, g.loadErr)
	}
	names := g.fileNames()
	latestAlloc := map[string]int64{} // bytes allocated in latest.img, per image
	for id, im := range g.images {
		var st unix.Stat_t
		if unix.Fstat(int(im.img.Fd()), &st) == nil {
			latestAlloc[id] = st.Blocks * 512
		} else {
			latestAlloc[id] = 1 << 62
		}
	}
	var out []PointFile
	for i, p := range g.pts.Points {
		for _, x := range g.imagesAt(p.N, p.Seqs) {
			out = append(out, PointFile{Point: pointID(p.N), Time: p.Time, Latest: i == len(g.pts.Points)-1,
				ImageID: x.id, File: names[x.id], Size: int64(x.size), Allocated: x.im.undoAllocated(p.N, latestAlloc[x.id], int64(x.size))})
		}
	}
	return out, nil
}

// fileNames gives every image of the group a file name, unique in the
// group: the base name of its image name when that is a valid store name
// and no current image shares it; for a retired image whose base name a
// current image (or another retired one) uses, NAME.retired-ID8; else its
// id. A base name that could be taken for one of those ("latest", an id, a
// name with ".retired-") is never used as it is. Called with g.mu held.
func (g *group) fileNames() map[string]string {
	retired := g.retiredBy()
	base := make(map[string]string, len(g.images))
	cur, ret := map[string]int{}, map[string]int{}
	for id, im := range g.images {
		b := filepath.Base(im.st.Name)
		if !storeNameOK(b) || b == "latest" || imageIDOK(b) || strings.Contains(b, ".retired-") {
			b = id
		}
		base[id] = b
		switch {
		case b == id:
		case retired[id] == "":
			cur[b]++
		default:
			ret[b]++
		}
	}
	for id, b := range base {
		switch {
		case b == id:
		case retired[id] == "" && cur[b] > 1:
			base[id] = id
		case retired[id] != "" && (cur[b] > 0 || ret[b] > 1):
			base[id] = retiredName(b, id)
		}
	}
	return base
}

// PinnedReader reads one image of a recovery point that it holds pinned
// until Close: the point stays readable whatever retention decides.
type PinnedReader struct {
	pr  *pointReader
	pin *Pin
}

// OpenPinned pins a point ("latest" = the latest point now) and opens one
// of its images (by id or name).
func (r *Replica) OpenPinned(groupName, point, imageName string) (*PinnedReader, error) {
	pin, err := r.PinPoint(groupName, point)
	if err != nil {
		return nil, err
	}
	g, err := r.group(groupName)
	if err != nil {
		pin.Release()
		return nil, err
	}
	g.mu.RLock()
	pr, err := g.openPoint(pin.Point(), imageName)
	g.mu.RUnlock()
	if err != nil {
		pin.Release()
		return nil, err
	}
	return &PinnedReader{pr: pr, pin: pin}, nil
}

// Point is the ID of the point read.
func (p *PinnedReader) Point() string { return pointID(p.pr.n) }

// Size is the image size at the point.
func (p *PinnedReader) Size() int64 { return p.pr.size }

// ReadAt implements io.ReaderAt (pointReader.ReadAt). Safe for concurrent use.
func (p *PinnedReader) ReadAt(b []byte, off int64) (int, error) { return p.pr.ReadAt(b, off) }

// SeekData answers lseek(SEEK_DATA) (hole false) or lseek(SEEK_HOLE).
func (p *PinnedReader) SeekData(off int64, hole bool) (int64, error) {
	return p.pr.seekData(off, hole)
}

// Close releases the pin.
func (p *PinnedReader) Close() error {
	p.pin.Release()
	return nil
}

// seekData implements SEEK_DATA/SEEK_HOLE on a point. "Data" is a superset of
// the blocks that are not zero (which lseek allows): blocks allocated in
// latest.img, and blocks with an entry in an undo log that serves the point.
func (pr *pointReader) seekData(off int64, hole bool) (int64, error) {
	if off < 0 {
		return 0, syscall.EINVAL
	}
	if off >= pr.size {
		return 0, syscall.ENXIO
	}
	g := pr.g
	g.mu.RLock()
	defer g.mu.RUnlock()
	im := g.images[pr.id]
	if !g.hasPoint(pr.n) || im == nil {
		return 0, fmt.Errorf("point %s of group %s: %w", pointID(pr.n), g.name, ErrPointGone)
	}
	var logs []*undoLog
	for _, l := range im.logs {
		if l.to > pr.n {
			logs = append(logs, l)
		}
	}
	fd := int(im.img.Fd())
	inUndo := func(b uint64) bool {
		for _, l := range logs {
			if l.lookup(b) != nil {
				return true
			}
		}
		return false
	}
	if !hole {
		best := pr.size
		if d, err := unix.Seek(fd, off, unix.SEEK_DATA); err == nil {
			best = min(best, max(d, off))
		} else if !errors.Is(err, syscall.ENXIO) {
			return 0, err
		}
		b0 := uint64(off / format.BlockSize)
		for _, l := range logs {
			i, _ := slices.BinarySearchFunc(l.ents, b0, func(e undoEntry, b uint64) int { return cmpU64(e.block, b) })
			if i < len(l.ents) {
				best = min(best, max(int64(l.ents[i].block)*format.BlockSize, off))
			}
		}
		if best >= pr.size {
			return 0, syscall.ENXIO
		}
		return best, nil
	}
	pos := off
	for pos < pr.size {
		h, err := unix.Seek(fd, pos, unix.SEEK_HOLE)
		if errors.Is(err, syscall.ENXIO) {
			h = pos // at or past the end of latest.img: a hole there
		} else if err != nil {
			return 0, err
		}
		h = max(h, pos)
		if h >= pr.size {
			return pr.size, nil
		}
		b := uint64(h / format.BlockSize)
		if !inUndo(b) {
			return h, nil
		}
		for b++; int64(b)*format.BlockSize < pr.size && inUndo(b); b++ {
		}
		pos = int64(b) * format.BlockSize
	}
	return pr.size, nil
}

// allocatedAt estimates the non-hole bytes of the image at point n (size
// bytes): latest.img's allocated bytes plus a block per undo entry serving
// the point, at most size. Called with g.mu held.
func (im *image) allocatedAt(n uint64, size int64) int64 {
	var st unix.Stat_t
	if err := unix.Fstat(int(im.img.Fd()), &st); err != nil {
		return size
	}
	return im.undoAllocated(n, st.Blocks*512, size)
}

// undoAllocated is allocatedAt given latest.img's allocated bytes.
func (im *image) undoAllocated(n uint64, a, size int64) int64 {
	for _, l := range im.logs {
		if l.to > n {
			a += int64(len(l.ents)) * format.BlockSize
		}
	}
	return min(a, size)
}

// allocated is allocatedAt for the reader's point.
func (pr *pointReader) allocated() int64 {
	pr.g.mu.RLock()
	defer pr.g.mu.RUnlock()
	im := pr.g.images[pr.id]
	if im == nil {
		return pr.size
	}
	return im.allocatedAt(pr.n, pr.size)
}

// parsePointNumber is the inverse of pointID.
func parsePointNumber(s string) (uint64, bool) {
	n, err := strconv.ParseUint(s, 10, 64)
	return n, err == nil && pointID(n) == s
}
