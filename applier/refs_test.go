package applier

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/zeebo/blake3"

	"github.com/standin/standin/internal/format"
	"github.com/standin/standin/internal/wire"
)

// op is one block of a test cycle: data (nil = a zero extent), or a ref
// (only the hash of data is written).
type op struct {
	data []byte
	ref  bool
}

// writeOps writes a version 2 cycle with the given blocks.
func writeOps(t *testing.T, dir string, h format.Header, ops map[uint64]op) string {
	t.Helper()
	p := filepath.Join(dir, fmt.Sprintf("%x-g%d-s%d-%d.cyc", h.ImageID[:4], h.Generation, h.Seq, rand.Uint32()))
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w, err := format.NewWriter(f, h, format.WriterOptions{Compress: true, Refs: true})
	if err != nil {
		t.Fatal(err)
	}
	var bs []uint64
	for b := range ops {
		bs = append(bs, b)
	}
	slices.Sort(bs)
	for _, b := range bs {
		o := ops[b]
		switch {
		case o.data == nil:
			err = w.WriteZero(b, 1)
		case o.ref:
			s := blake3.Sum256(o.data)
			err = w.WriteRef(b, s[:])
		default:
			err = w.WriteBlocks(b, o.data)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if _, err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return p
}

func randBlock(rng *rand.Rand) []byte {
	b := make([]byte, format.BlockSize)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

func blockOf(data []byte, b uint64) []byte {
	return data[b*format.BlockSize : (b+1)*format.BlockSize]
}

// fullImage returns nb random blocks, every 7th all zero.
func fullImage(rng *rand.Rand, nb int) []byte {
	d := make([]byte, nb*format.BlockSize)
	for b := 0; b < nb; b++ {
		if b%7 != 3 {
			copy(d[b*format.BlockSize:], randBlock(rng))
		}
	}
	return d
}

// baseOps describes data as a base cycle: zero blocks are left out (a base
// zeroes what it does not cover), blocks whose content held() says the
// replica has become refs.
func baseOps(data []byte, held func(b uint64, blk []byte) bool) map[uint64]op {
	ops := map[uint64]op{}
	for b := uint64(0); b < uint64(len(data))/format.BlockSize; b++ {
		blk := blockOf(data, b)
		if isZero(blk) {
			continue
		}
		ops[b] = op{data: blk, ref: held != nil && held(b, blk)}
	}
	return ops
}

func hdr(ti *tImage, base bool, parent uint64, size int, gc byte, cut time.Time) format.Header {
	h := format.Header{ImageID: ti.id, Generation: ti.gen, Seq: ti.seq, Parent: parent, CutTime: cut,
		ImageSize: uint64(size), GroupCut: [16]byte{gc, 0xee}, Name: ti.name}
	if base {
		h.Flags = format.FlagBase
	}
	return h
}

func contentSet(data []byte) map[[32]byte]bool {
	m := map[[32]byte]bool{}
	for b := uint64(0); b < uint64(len(data))/format.BlockSize; b++ {
		m[blake3.Sum256(blockOf(data, b))] = true
	}
	return m
}

func readImage(t *testing.T, rep *Replica, group, point, id string) []byte {
	t.Helper()
	pr, err := rep.OpenPoint(group, point, id)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, pr.Size())
	if _, err := pr.ReadAt(b, 0); err != nil && len(b) > 0 {
		t.Fatal(err)
	}
	return b
}

// TestRefsCloneAcrossGroups: a clone of an image held in another group is
// applied from a thinned base cycle; refs are only resolved from images the
// caller allows, an unresolvable ref fails the commit without changing
// anything, and stale chunk index entries are skipped and dropped.
func TestRefsCloneAcrossGroups(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir, cyc := t.TempDir(), t.TempDir()
	rep, err := OpenReplica(dir, ReplicaOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer rep.Close()
	for _, g := range []string{"tmpl", "vm2", "vm3"} {
		if err := rep.EnsureGroup(g, Retention{}); err != nil {
			t.Fatal(err)
		}
	}
	rng := rand.New(rand.NewPCG(7, 7))
	const nb = 300
	now := time.Date(2026, 2, 1, 0, 0, 0, 0, time.UTC)
	tm := newTImage(1, "t.img")
	tm.data = fullImage(rng, nb)
	if _, err := rep.Apply(ctx, "tmpl", writeOps(t, cyc, hdr(tm, true, format.NoParent, len(tm.data), 1, now), baseOps(tm.data, nil))); err != nil {
		t.Fatal(err)
	}
	held := contentSet(tm.data)
	// The clone: three blocks changed, one moved.
	c := newTImage(2, "c.img")
	c.data = append([]byte(nil), tm.data...)
	for _, b := range []uint64{10, 11, 200} {
		copy(blockOf(c.data, b), randBlock(rng))
	}
	copy(blockOf(c.data, 40), blockOf(tm.data, 5))
	ops := baseOps(c.data, func(b uint64, blk []byte) bool { return held[blake3.Sum256(blk)] })
	var refs uint64
	for _, o := range ops {
		if o.ref {
			refs++
		}
	}
	cpath := writeOps(t, cyc, hdr(c, true, format.NoParent, len(c.data), 2, now), ops)

	// Not allowed to read the template's group: every ref is missing.
	deny := func(group, name string) bool { return group != "tmpl" }
	_, err = rep.ApplyVerifiedFrom(ctx, "vm2", []string{cpath}, deny)
	var me *MissingChunksError
	if !errors.As(err, &me) || !errors.Is(err, ErrMissingChunks) || len(me.Missing) != 1 {
		t.Fatalf("denied source: %v", err)
	}
	var n uint64
	for _, r := range me.Missing[0].Runs {
		n += r[1]
	}
	if n != refs || me.Missing[0].ID != c.idString() {
		t.Fatalf("missing %d blocks of %s, want %d of %s", n, me.Missing[0].ID, refs, c.idString())
	}
	if ps, _ := rep.Points("vm2"); len(ps) != 0 {
		t.Fatalf("a refused commit recorded points %v", ps)
	}
	if ents, _ := os.ReadDir(filepath.Join(dir, "groups", "vm2", "images")); len(ents) != 0 {
		t.Fatalf("a refused commit left image directories")
	}
	if ents, _ := os.ReadDir(filepath.Join(dir, "groups", "vm2", "refs")); len(ents) != 0 {
		t.Fatalf("a refused commit left refs files")
	}

	res, err := rep.ApplyVerifiedFrom(ctx, "vm2", []string{cpath}, func(string, string) bool { return true })
	if err != nil {
		t.Fatal(err)
	}
	if res.Images[0].Refs != refs || refs < nb/2 {
		t.Fatalf("result %+v, want %d refs", res.Images[0], refs)
	}
	if got := readImage(t, rep, "vm2", "latest", c.idString()); !slices.Equal(got, c.data) {
		t.Fatal("clone differs after the apply")
	}
	if _, err := rep.VerifyPoint(ctx, "vm2", "latest"); err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(filepath.Join(dir, "groups", "vm2", "refs")); len(ents) != 0 {
		t.Fatalf("refs files left after the apply")
	}

	// The template's block 5 changes: the index still names it there (stale)
	// and at the clone's block 40, which is used.
	tm.seq++
	old5 := append([]byte(nil), blockOf(tm.data, 5)...)
	copy(blockOf(tm.data, 5), randBlock(rng))
	if _, err := rep.Apply(ctx, "tmpl", writeOps(t, cyc, hdr(tm, false, tm.seq-1, len(tm.data), 3, now), map[uint64]op{5: {data: blockOf(tm.data, 5)}})); err != nil {
		t.Fatal(err)
	}
	d := newTImage(3, "d.img")
	d.data = make([]byte, 4*format.BlockSize)
	copy(blockOf(d.data, 1), old5)
	dpath := writeOps(t, cyc, hdr(d, true, format.NoParent, len(d.data), 4, now), map[uint64]op{1: {data: old5, ref: true}})
	if _, err := rep.Apply(ctx, "vm3", dpath); err != nil {
		t.Fatalf("ref to a block held by the clone only: %v", err)
	}
	if got := readImage(t, rep, "vm3", "latest", d.idString()); !slices.Equal(got, d.data) {
		t.Fatal("vm3 differs")
	}
	// Now the clone's copy changes too: nothing holds the content any more.
	c.seq++
	copy(blockOf(c.data, 40), randBlock(rng))
	if _, err := rep.Apply(ctx, "vm2", writeOps(t, cyc, hdr(c, false, c.seq-1, len(c.data), 5, now), map[uint64]op{40: {data: blockOf(c.data, 40)}})); err != nil {
		t.Fatal(err)
	}
	d.seq++
	copy(blockOf(d.data, 1), randBlock(rng))
	if _, err := rep.Apply(ctx, "vm3", writeOps(t, cyc, hdr(d, false, d.seq-1, len(d.data), 6, now), map[uint64]op{1: {data: blockOf(d.data, 1)}})); err != nil {
		t.Fatal(err)
	}
	d.seq++
	dpath = writeOps(t, cyc, hdr(d, false, d.seq-1, len(d.data), 7, now), map[uint64]op{2: {data: old5, ref: true}})
	_, err = rep.Apply(ctx, "vm3", dpath)
	if !errors.As(err, &me) || len(me.Missing) != 1 || me.Missing[0].Runs[0] != [2]uint64{2, 1} {
		t.Fatalf("ref to content nobody holds: %v", err)
	}
	if locs, err := rep.chunks.lookup([][32]byte{blake3.Sum256(old5)}); err != nil || len(locs[0]) != 0 {
		t.Fatalf("stale locations kept: %v %v", locs, err)
	}
	if got := readImage(t, rep, "vm3", "latest", d.idString()); !slices.Equal(got, d.data) {
		t.Fatal("vm3 changed by a refused commit")
	}
}

// TestRefsResyncKeepsPoints: a full base cycle continuing the chain (a
// resync), thinned against the replica's own image, keeps the unchanged
// blocks in place (no undo for them), copies moved blocks, zeroes blocks no
// extent covers, and every earlier point still reads right.
func TestRefsResyncKeepsPoints(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	clock := time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)
	s := newTStore(t, ReplicaOptions{Now: func() time.Time { return clock }}, Retention{Points: 10, Every: time.Minute})
	rng := rand.New(rand.NewPCG(8, 8))
	const nb = 400
	a := newTImage(3, "a.img")
	a.data = fullImage(rng, nb)
	res, err := s.rep.Apply(ctx, s.group, writeOps(t, s.cyc, hdr(a, true, format.NoParent, len(a.data), 1, clock), baseOps(a.data, nil)))
	if err != nil {
		t.Fatal(err)
	}
	s.record(res.Point, a)
	for i := 0; i < 3; i++ {
		clock = clock.Add(time.Minute)
		next := *a
		next.seq++
		next.data = append([]byte(nil), a.data...)
		ops := map[uint64]op{}
		for k := 0; k < 20; k++ {
			b := uint64(rng.IntN(nb))
			copy(blockOf(next.data, b), randBlock(rng))
			ops[b] = op{data: blockOf(next.data, b)}
		}
		res, err := s.rep.Apply(ctx, s.group, writeOps(t, s.cyc, hdr(&next, false, a.seq, len(next.data), byte(2+i), clock), ops))
		if err != nil {
			t.Fatal(err)
		}
		a = &next
		s.record(res.Point, a)
	}
	// The resync: the primary's image differs in a few blocks the replica
	// never heard of, block 20's content moved to 21, blocks 30..39 are holes.
	clock = clock.Add(time.Minute)
	next := *a
	next.seq++
	next.data = append([]byte(nil), a.data...)
	changed := []uint64{1, 2, 300}
	for _, b := range changed {
		copy(blockOf(next.data, b), randBlock(rng))
	}
	copy(blockOf(next.data, 21), blockOf(a.data, 20))
	clear(next.data[30*format.BlockSize : 40*format.BlockSize])
	held := contentSet(a.data)
	ops := baseOps(next.data, func(b uint64, blk []byte) bool { return held[blake3.Sum256(blk)] })
	res, err = s.rep.Apply(ctx, s.group, writeOps(t, s.cyc, hdr(&next, true, a.seq, len(next.data), 9, clock), ops))
	if err != nil {
		t.Fatal(err)
	}
	s.record(res.Point, &next)
	s.check(true, true)
	// Undo holds only what changed: 3 changed + 1 moved + the allocated holes.
	if max := int64(20) * format.BlockSize; res.UndoBytes > max {
		t.Fatalf("resync wrote %d undo bytes, want ≤ %d (kept blocks must not be saved)", res.UndoBytes, max)
	}
	if res.Images[0].Refs < nb/2 {
		t.Fatalf("result %+v", res.Images[0])
	}
	t.Logf("resync of %d blocks: %d data, %d refs, %d undo bytes", nb, res.Images[0].Blocks, res.Images[0].Refs, res.UndoBytes)
}

// TestRefsCrashAtEveryStep crashes a commit of two images at every step: b
// overwrites block 7, whose old content a's thinned base refers to (a copy
// that must survive into the redo), reopens, checks every point and
// re-applies.
func TestRefsCrashAtEveryStep(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	stages := map[string]bool{}
	for n := 1; ; n++ {
		clock := time.Date(2026, 4, 1, 0, 0, 0, 0, time.UTC)
		var calls atomic.Int64
		var armed atomic.Bool
		var stage atomic.Value
		o := ReplicaOptions{Now: func() time.Time { return clock }, testHook: func(st string) error {
			if armed.Load() && calls.Add(1) == int64(n) {
				stage.Store(st)
				return errCrash
			}
			return nil
		}}
		s := newTStore(t, o, Retention{Points: 5, Every: time.Minute})
		rng := rand.New(rand.NewPCG(10, uint64(n)))
		a, b := newTImage(6, "a.img"), newTImage(7, "b.img")
		a.data, b.data = fullImage(rng, 60), fullImage(rng, 40)
		p1 := writeOps(t, s.cyc, hdr(a, true, format.NoParent, len(a.data), 1, clock), baseOps(a.data, nil))
		p2 := writeOps(t, s.cyc, hdr(b, true, format.NoParent, len(b.data), 1, clock), baseOps(b.data, nil))
		res, err := s.rep.ApplyGroup(ctx, s.group, []string{p1, p2})
		if err != nil {
			t.Fatal(err)
		}
		s.record(res.Point, a, b)
		clock = clock.Add(time.Minute)
		// b: a delta overwriting block 7; a: a new generation's base, thinned.
		nb := *b
		nb.seq++
		nb.data = append([]byte(nil), b.data...)
		copy(blockOf(nb.data, 7), randBlock(rng))
		na := *a
		na.gen, na.seq = 2, 0
		na.data = append([]byte(nil), a.data...)
		copy(blockOf(na.data, 3), blockOf(b.data, 7)) // b's old block 7, copied via the index
		copy(blockOf(na.data, 50), randBlock(rng))
		na.data = na.data[:55*format.BlockSize-100] // shrink
		clear(na.data[len(na.data)-(format.BlockSize-100):])
		held := contentSet(append(append([]byte(nil), a.data...), b.data...))
		q2 := writeOps(t, s.cyc, hdr(&nb, false, b.seq, len(nb.data), 2, clock), map[uint64]op{7: {data: blockOf(nb.data, 7)}})
		tail := make([]byte, format.BlockSize)
		copy(tail, na.data[54*format.BlockSize:])
		opsA := baseOps(na.data[:54*format.BlockSize], func(_ uint64, blk []byte) bool { return held[blake3.Sum256(blk)] })
		opsA[54] = op{data: tail}
		q1 := writeOps(t, s.cyc, hdr(&na, true, format.NoParent, len(na.data), 2, clock), opsA)
		paths := []string{q2, q1} // b's data is written before a's refs are applied
		armed.Store(true)
		res, err = s.rep.ApplyGroup(ctx, s.group, paths)
		armed.Store(false)
		if errors.Is(err, errCrash) {
			stages[stage.Load().(string)] = true
			s.reopen(ReplicaOptions{Now: o.Now})
			ps, _ := s.rep.Points(s.group)
			rolledForward := len(ps) == 2
			if rolledForward {
				s.record(ps[1].ID, &na, &nb)
			}
			s.check(false, true)
			res, err = s.rep.ApplyGroup(ctx, s.group, paths)
			if err != nil {
				t.Fatalf("n=%d (%v): re-apply: %v", n, stage.Load(), err)
			}
			if res.Skipped != rolledForward {
				t.Fatalf("n=%d: skipped %v, rolled forward %v", n, res.Skipped, rolledForward)
			}
		} else if err != nil {
			t.Fatal(err)
		}
		if !res.Skipped {
			s.record(res.Point, &na, &nb)
		}
		s.check(true, true)
		if ents, _ := os.ReadDir(filepath.Join(s.dir, "groups", s.group, "refs")); len(ents) != 0 {
			t.Fatalf("n=%d: refs files left: %v", n, ents)
		}
		s.rep.Close()
		if calls.Load() < int64(n) {
			break
		}
	}
	for _, st := range []string{"undo", "state-applying", "journal", "data-partial", "data", "state-applied", "point"} {
		if !stages[st] {
			t.Errorf("stage %s never crashed", st)
		}
	}
}

// TestChunkIndexSize measures the chunk index per block (reported in
// docs/replica.md) and checks IndexImage and lookups.
func TestChunkIndexSize(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	rep, err := OpenReplica(dir, ReplicaOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer rep.Close()
	const n = 1 << 18 // 1 GiB of distinct 4 KiB blocks
	id := newTImage(9, "x.img").idString()
	idir := filepath.Join(dir, "groups", "g", "images", id)
	if err := os.MkdirAll(idir, 0o700); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 1))
	hs := make([]byte, n*32)
	for i := range hs {
		hs[i] = byte(rng.Uint32())
	}
	copy(hs[5*32:6*32], make([]byte, 32)) // a zero block: not indexed
	if err := os.WriteFile(filepath.Join(idir, "hashes.bin"), hs, 0o600); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := rep.IndexImage("g", id); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	if err := rep.IndexImage("g", id); err != nil { // idempotent
		t.Fatal(err)
	}
	st, err := rep.ChunkIndexStats()
	if err != nil {
		t.Fatal(err)
	}
	per := float64(st.FileBytes) / float64(st.Entries)
	t.Logf("chunk index: %d entries, file %d bytes, %.1f bytes per block (%.2f%% of 4 KiB); pages %.1f B/block, used %.1f B/block; indexed in %v",
		st.Entries, st.FileBytes, per, per/40.96, float64(st.PageBytes)/float64(st.Entries), float64(st.UsedBytes)/float64(st.Entries), took)
	if st.Entries != n-1 || per > 120 {
		t.Fatalf("chunk index: %+v (%.1f B/block)", st, per)
	}
	locs, err := rep.chunks.lookup([][32]byte{[32]byte(hs[7*32 : 8*32]), {1, 2, 3}})
	if err != nil || len(locs[0]) != 1 || locs[0][0] != (chunkLoc{"g", id, 7}) || len(locs[1]) != 0 {
		t.Fatalf("lookup: %v %v", locs, err)
	}
	if err := rep.IndexImage("../x", id); !errors.Is(err, ErrBadName) {
		t.Fatalf("bad group name: %v", err)
	}
}

// TestApplyFilesRefusesRefs: a plain target cannot resolve refs.
func TestApplyFilesRefusesRefs(t *testing.T) {
	dir := t.TempDir()
	ti := newTImage(4, "a.img")
	p := writeOps(t, dir, hdr(ti, true, format.NoParent, 2*format.BlockSize, 1, time.Now()), map[uint64]op{1: {data: randBlock(rand.New(rand.NewPCG(1, 1))), ref: true}})
	target := filepath.Join(dir, "t.img")
	if _, err := ApplyFiles(target, []string{p}); !errors.Is(err, ErrRefs) {
		t.Fatalf("got %v", err)
	}
	if _, err := os.Stat(target); err == nil {
		t.Fatal("target created")
	}
}

// TestHeldAndRegions: the answers to the primary's chunk queries, and the
// allow-list filter on them.
func TestHeldAndRegions(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir, cyc := t.TempDir(), t.TempDir()
	rep, err := OpenReplica(dir, ReplicaOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer rep.Close()
	for _, g := range []string{"g1", "g2"} {
		if err := rep.EnsureGroup(g, Retention{}); err != nil {
			t.Fatal(err)
		}
	}
	rng := rand.New(rand.NewPCG(5, 6))
	a := newTImage(1, "a.img")
	a.data = fullImage(rng, 600) // 3 regions, the last partial
	if _, err := rep.Apply(ctx, "g1", writeOps(t, cyc, hdr(a, true, format.NoParent, len(a.data), 1, time.Now()), baseOps(a.data, nil))); err != nil {
		t.Fatal(err)
	}
	entry := func(data []byte, b uint64) []byte {
		blk := blockOf(data, b)
		if isZero(blk) {
			return make([]byte, 32)
		}
		s := blake3.Sum256(blk)
		return s[:]
	}
	// Region hashes as the primary computes them, for an image of 650 blocks.
	got, err := rep.RegionHashes("g1", a.idString(), 650, 0, 3, nil)
	if err != nil {
		t.Fatal(err)
	}
	for reg := uint64(0); reg < 3; reg++ {
		var e []byte
		for b := reg * 256; b < min((reg+1)*256, 650); b++ {
			if b < 600 {
				e = append(e, entry(a.data, b)...)
			} else {
				e = append(e, make([]byte, 32)...) // past the replica's end
			}
		}
		if w := wire.RegionHash(e); !slices.Equal(got[reg*32:(reg+1)*32], w[:]) {
			t.Fatalf("region %d differs", reg)
		}
	}
	if _, err := rep.RegionHashes("g2", a.idString(), 650, 0, 3, nil); !errors.Is(err, ErrNoImageHeld) {
		t.Fatalf("regions of an image the group does not hold: %v", err)
	}
	if _, err := rep.RegionHashes("g1", a.idString(), 650, 2, 2, nil); err == nil {
		t.Fatal("regions beyond the image answered")
	}
	if _, err := rep.RegionHashes("g1", a.idString(), 650, 0, 1, func(g, n string) bool { return false }); !errors.Is(err, ErrNoImageHeld) {
		t.Fatalf("regions of an image the primary may not send: %v", err)
	}
	// Held: same position, elsewhere (another image, another position), none.
	unknown := blake3.Sum256([]byte("nobody has this"))
	runs := []wire.HeldRun{
		{Start: 11, Hashes: append(entry(a.data, 11), entry(a.data, 13)...)}, // same, elsewhere (moved)
		{Start: 50, Hashes: unknown[:]},
	}
	for _, c := range []struct {
		group, id string
		src       SourceFunc
		want      []byte
	}{
		{"g1", a.idString(), nil, []byte{wire.HeldSame, wire.HeldElsewhere, wire.HeldNone}},
		{"g2", newTImage(2, "b.img").idString(), nil, []byte{wire.HeldElsewhere, wire.HeldElsewhere, wire.HeldNone}},
		{"g2", newTImage(2, "b.img").idString(), func(g, _ string) bool { return g != "g1" }, []byte{wire.HeldNone, wire.HeldNone, wire.HeldNone}},
	} {
		got, err := rep.Held(c.group, c.id, runs, c.src)
		if err != nil || !slices.Equal(got, c.want) {
			t.Fatalf("held in %s: %v %v, want %v", c.group, got, err, c.want)
		}
	}
}
