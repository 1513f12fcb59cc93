package dedup

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"github.com/standin/standin/internal/fsutil"
	"github.com/zeebo/blake3"
)

// layout places shards on volumes. Volumes come in sets of len(vols) written
// at once (one set in sequential mode: a single volume). The shards of a
// group are striped over the set (data shard i on set[i mod V], parity shard
// j on set[(n+j) mod V] for a group planned with n data shards), so with V volumes a group loses at most
// ceil((10+p)/V) shards with one volume. Parity is accumulated as data
// shards are written (no read-back), and a group never spans two sets: when a
// shard does not fit, the group is closed early and the set is closed (each
// volume gets a partial index) before NextVolume is asked for the next set.
// Every volume keeps room for its group's parity and for two copies of the
// final index (an upper bound computed from the input size).
type layout struct {
	e       *exporter
	V       int
	size    int64 // VolumeSize, 0 = unlimited
	all     []*volState
	set     []*volState // the open set; nil when a new one is needed
	groups  []groupEntry
	cur     *curGroup
	idxRes  int64 // bytes kept free on every volume for the two index copies
	packMax int64
	pPacks  int
	seq     bool       // sequential volumes surviving the loss of one (seqsurvive.go)
	sg      []seqGroup // seq: groups by position on a data volume
}

type volState struct {
	n      int
	dir    string
	used   int64
	count  int // seq: data shards on it
	closed bool
}

type curGroup struct {
	p, n   int // parity, data shards at most
	shards []shardEntry
	acc    *parityAcc
	maxLen int64
}

func newLayout(e *exporter, allocated int64) *layout {
	l := &layout{e: e, V: len(e.vols), size: e.o.VolumeSize, packMax: maxPackLen(e.o.PackSize, frameLen(e.o.PackSize))}
	l.seq = l.V == 1 && e.o.SurviveVolumeLoss
	l.pPacks = parityCount(groupData, e.o.Parity)
	if e.o.SurviveVolumeLoss {
		l.pPacks = surviveParity(groupData, l.V, l.pPacks)
	}
	// Index bound: a pack (but the last) and the frame after it exceed
	// PackSize together, so packs < 2*stored/PackSize + 1; stored bytes are
	// at most the allocated bytes plus zstd and id overhead.
	upper := allocated + allocated/64 + 1<<20
	packs := 2*upper/int64(e.o.PackSize) + 2
	nimg := int64(len(e.images))
	vols := int64(l.V)
	if l.size > 0 {
		vols += 2*upper/l.size + 1
	}
	groups := packs/groupData + 1 + nimg/groupData + 1 + vols
	others := nimg + groups*int64(max(l.pPacks, parityCount(groupData, e.o.Parity), surviveParity(groupData, l.V, 0)))
	if l.seq {
		groups = packs + nimg
		others = nimg + groups
	}
	l.idxRes = 2 * indexSizeBound(groups, packs, others)
	return l
}

// check refuses a volume size that cannot hold a group's worth of shards.
func (l *layout) check() error {
	if l.size == 0 {
		return nil
	}
	need := l.idxRes + l.packMax*int64(1+l.pPacks)
	if l.seq {
		need = l.idxRes + l.packMax
	}
	if l.size < need {
		return fmt.Errorf("dedup: volume size %d too small: a volume must hold at least %d bytes (index reserve %d, a pack and its group's parity)", l.size, need, l.idxRes)
	}
	return nil
}

func (l *layout) volErr(v *volState, what string, err error) error {
	if errors.Is(err, syscall.ENOSPC) {
		return fmt.Errorf("%w: volume %d (%s) ran out of space writing %s with %d bytes of the seed on it; free space there (or give a larger medium for volume %d, or a volume size below the medium's capacity on a fresh export) and rerun the export to resume: %w",
			ErrVolumeFull, v.n, v.dir, what, v.used, v.n, err)
	}
	return fmt.Errorf("dedup: volume %d (%s): %s: %w", v.n, v.dir, what, err)
}

// startVolume prepares directory dir as volume n of the seed.
func (l *layout) startVolume(n int, dir string) error {
	e := l.e
	v := &volState{n: n, dir: dir}
	if err := fsutil.MkdirNew(dir, DirMode(e.mode())); err != nil {
		return l.volErr(v, "directories", err)
	}
	for _, d := range []string{filepath.Join(dir, "packs"), filepath.Join(dir, "parity"), filepath.Join(dir, "manifests")} {
		if err := fsutil.MkdirPrivate(d, DirMode(e.mode())); err != nil {
			return l.volErr(v, "directories", err)
		}
	}
	if s, vn, ok := identifyVolume(dir); ok && s == e.seed && vn != n {
		return fmt.Errorf("dedup: %s already holds volume %d of this seed; volume %d needs another medium", dir, vn, n)
	}
	if err := cleanSeedDir(dir); err != nil {
		return l.volErr(v, "removing an old seed", err)
	}
	if err := writeLabel(dir, e.seed, n, e.mode()); err != nil {
		return l.volErr(v, "label", err)
	}
	syncDir(dir)
	if err := e.jf.add(jEntry{kind: 'v', vol: n}); err != nil {
		return err
	}
	l.all = append(l.all, v)
	l.set = append(l.set, v)
	return nil
}

// parityVol is the set member that holds parity shard j of group c: the
// positions after the group's planned data shards, so no volume holds more
// than ceil((n+p)/V) shards of it even when it ends early.
func (l *layout) parityVol(c *curGroup, j int) *volState { return l.set[(c.n+j)%l.V] }

// fits reports whether a data shard of length n (the group's remaining
// shards being at most bound) fits at the group's next position, leaving room
// for the group's parity and the index on every volume of the set.
func (l *layout) fits(n, bound int64) bool {
	if l.size == 0 {
		return true
	}
	c := l.cur
	v := l.set[len(c.shards)%l.V]
	plen := max(c.maxLen, n, bound)
	for _, u := range l.set {
		need := u.used + l.idxRes
		for j := 0; j < c.p; j++ {
			if l.parityVol(c, j) == u {
				need += plen
			}
		}
		if u == v {
			need += n
		}
		if need > l.size {
			return false
		}
	}
	return true
}

func (l *layout) placePack(data []byte, jp jPack) error {
	mk := func() *curGroup { return &curGroup{p: l.pPacks, n: groupData, acc: newParityAcc(l.pPacks)} }
	return l.place(kindPack, jp.num, data, l.packMax, &jp, mk)
}

// place writes one data shard.
func (l *layout) place(kind byte, num uint64, data []byte, bound int64, jp *jPack, mk func() *curGroup) error {
	if l.seq {
		return l.placeSeq(kind, num, data, jp)
	}
	n := int64(len(data))
	for {
		if l.set == nil {
			if err := l.newSet(); err != nil {
				return err
			}
		}
		if l.cur == nil {
			l.cur = mk()
		}
		if l.fits(n, bound) {
			break
		}
		if len(l.cur.shards) == 0 && len(l.set) > 0 && l.set[0].used == 0 {
			return fmt.Errorf("dedup: a %d-byte shard does not fit on an empty volume of %d bytes", n, l.size)
		}
		// Close the group here and the set with it.
		if err := l.closeGroup(); err != nil {
			return err
		}
		if l.e.o.NextVolume == nil {
			var ns []int
			for _, v := range l.set {
				ns = append(ns, v.n)
			}
			return fmt.Errorf("%w: volume(s) %v reached the volume size of %d bytes and no next volume can be asked for; rerun with a way to get the next volume to resume", ErrVolumeFull, ns, l.size)
		}
		if err := l.closeSet(); err != nil {
			return err
		}
	}
	c := l.cur
	v := l.set[len(c.shards)%l.V]
	s := shardEntry{Kind: kind, Vol: v.n, Num: num, Len: n, Hash: blake3.Sum256(data)}
	if jp != nil {
		s.First, s.Count = jp.first, jp.count
	}
	if err := writeFileAtomic(filepath.Join(v.dir, s.Name()), data, l.e.mode()); err != nil {
		return l.volErr(v, s.Name(), err)
	}
	if err := c.acc.add(data); err != nil {
		return err
	}
	v.used += n
	l.e.seedBytes.Add(n)
	c.shards = append(c.shards, s)
	c.maxLen = max(c.maxLen, n)
	if jp != nil {
		jp.vol, jp.group = v.n, len(l.groups)
		if err := l.e.jf.add(jEntry{kind: 'p', pack: *jp}); err != nil {
			return err
		}
	}
	if len(c.shards) == c.n {
		return l.closeGroup()
	}
	return nil
}

// closeGroup writes the open group's parity shards.
func (l *layout) closeGroup() error {
	c := l.cur
	l.cur = nil
	if c == nil || len(c.shards) == 0 {
		return nil
	}
	gi := len(l.groups)
	g := groupEntry{Data: len(c.shards), Parity: c.p, ShardSize: c.maxLen, Shards: c.shards}
	je := jEntry{kind: 'g', group: jGroup{g: gi, data: g.Data, parity: g.Parity}}
	for j := 0; j < c.p; j++ {
		b := c.acc.acc[j]
		if int64(len(b)) != c.maxLen {
			return fmt.Errorf("dedup: internal: parity length %d, shard size %d", len(b), c.maxLen)
		}
		v := l.parityVol(c, j)
		s := shardEntry{Kind: kindParity, Vol: v.n, Num: uint64(gi)<<8 | uint64(j), Len: int64(len(b)), Hash: blake3.Sum256(b)}
		if err := writeFileAtomic(filepath.Join(v.dir, s.Name()), b, l.e.mode()); err != nil {
			return l.volErr(v, s.Name(), err)
		}
		v.used += s.Len
		l.e.seedBytes.Add(s.Len)
		g.Shards = append(g.Shards, s)
		je.group.par = append(je.group.par, s)
	}
	l.groups = append(l.groups, g)
	return l.e.jf.add(je)
}

// index returns the seed index as far as it is known.
func (l *layout) index(partial bool) *seedIndex {
	e := l.e
	ix := &seedIndex{SeedID: e.seed, Partial: partial, Encrypted: e.k != nil, Salt: e.salt, Groups: l.groups}
	if e.k != nil {
		ix.Check = e.k.check
	}
	if !partial {
		ix.Volumes = len(l.all)
	}
	for _, g := range l.groups {
		for _, s := range g.Shards[:g.Data] {
			if s.Kind == kindPack {
				ix.TotalChunks += uint64(s.Count)
			}
		}
	}
	return ix
}

func (l *layout) writeIndex(v *volState, ix *seedIndex) error {
	cp := *ix
	cp.Volume = v.n
	b := cp.encode(l.e.k)
	if l.size > 0 && v.used+2*int64(len(b)) > l.size {
		return fmt.Errorf("dedup: internal: index of %d bytes does not fit on volume %d (reserve %d)", len(b), v.n, l.idxRes)
	}
	for _, n := range indexNames {
		if err := writeFileAtomic(filepath.Join(v.dir, n), b, l.e.mode()); err != nil {
			return l.volErr(v, n, err)
		}
	}
	l.e.seedBytes.Add(2 * int64(len(b)))
	return nil
}

// seal finishes volume v: its index copies, then the label goes (the
// volume no longer counts as being written), stale shard files with prune,
// and the directory is synced.
func (l *layout) seal(v *volState, ix *seedIndex, prune bool) error {
	if err := l.writeIndex(v, ix); err != nil {
		return err
	}
	os.Remove(filepath.Join(v.dir, labelName))
	if prune {
		removeStale(v, ix)
	}
	syncDir(v.dir)
	v.closed = true
	return nil
}

// closeSet writes a partial index on every volume of the set and marks them
// closed.
func (l *layout) closeSet() error {
	ix := l.index(true)
	for _, v := range l.set {
		if v.closed {
			continue
		}
		if err := l.seal(v, ix, false); err != nil {
			return err
		}
		if err := l.e.jf.add(jEntry{kind: 'c', vol: v.n}); err != nil {
			return err
		}
	}
	l.set = nil
	return nil
}

// newSet asks NextVolume for the next len(vols) volumes.
func (l *layout) newSet() error {
	if l.e.o.NextVolume == nil {
		return fmt.Errorf("%w: all volumes are closed and no next volume can be asked for", ErrVolumeFull)
	}
	for i := 0; i < l.V; i++ {
		n := len(l.all) + 1
		d, err := l.e.o.NextVolume(n)
		if err != nil {
			return fmt.Errorf("dedup: next volume %d: %w", n, err)
		}
		if err := l.startVolume(n, d); err != nil {
			return err
		}
	}
	return nil
}
