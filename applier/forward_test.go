package applier

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/standin/standin/internal/format"
)

// TestMergedDelta: a delta whose parent is an earlier cycle than seq-1 (what
// extended replication forwards when several points merge into one cycle)
// applies on a replica that holds its parent; anything else is still a gap or
// a replay. A later base of the same generation needs no parent.
func TestMergedDelta(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := newTStore(t, ReplicaOptions{}, Retention{AnyPointWindow: time.Hour})
	a := newTImage(0x51, "a.img")
	now := time.Now()
	var p string
	for i := 0; i < 3; i++ { // seqs 0, 1, 2
		p, a = writeExactCycle(t, s.cyc, a, false, 16*format.BlockSize, map[uint64]byte{uint64(i): byte(i + 1)}, now)
		res, err := s.rep.Apply(ctx, s.group, p)
		if err != nil {
			t.Fatal(err)
		}
		s.record(res.Point, a)
	}
	merged := func(seq, parent uint64, blocks map[uint64]byte) (string, *tImage) {
		t.Helper()
		next := *a
		next.seq = seq
		next.data = slices.Clone(a.data)
		h := format.Header{ImageID: a.id, Generation: a.gen, Seq: seq, Parent: parent, CutTime: now, ImageSize: uint64(len(a.data)),
			GroupCut: [16]byte{byte(seq), byte(parent), 0xdd}, Name: a.name}
		path := filepath.Join(s.cyc, fmt.Sprintf("merged-%d-%d.cyc", seq, parent))
		f, err := os.Create(path)
		if err != nil {
			t.Fatal(err)
		}
		w, err := format.NewWriter(f, h, format.WriterOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for _, b := range slices.Sorted(func(yield func(uint64) bool) {
			for b := range blocks {
				if !yield(b) {
					return
				}
			}
		}) {
			blk := make([]byte, format.BlockSize)
			for i := range blk {
				blk[i] = blocks[b]
			}
			if err := w.WriteBlocks(b, blk); err != nil {
				t.Fatal(err)
			}
			copy(next.data[b*format.BlockSize:], blk)
		}
		if _, err := w.Close(); err != nil {
			t.Fatal(err)
		}
		f.Close()
		return path, &next
	}
	gap, _ := merged(7, 4, map[uint64]byte{9: 9})
	if _, err := s.rep.Apply(ctx, s.group, gap); !errors.Is(err, ErrGap) {
		t.Fatalf("delta 7 on parent 4 applied on cycle 2: %v, want ErrGap", err)
	}
	m, next := merged(5, 2, map[uint64]byte{3: 0x33, 4: 0x44, 0: 0x10})
	res, err := s.rep.Apply(ctx, s.group, m)
	if err != nil {
		t.Fatalf("merged delta 5 on parent 2: %v", err)
	}
	a = next
	s.record(res.Point, a)
	s.check(true, true)
	if st, _, _ := s.rep.ImageState(s.group, a.idString()); st.Seq != 5 {
		t.Fatalf("image at cycle %d after the merged delta, want 5", st.Seq)
	}
	if res, err := s.rep.Apply(ctx, s.group, m); err != nil || !res.Skipped {
		t.Fatalf("re-apply of the merged delta: %v %+v", err, res)
	}
	old, _ := merged(4, 2, map[uint64]byte{1: 1})
	if _, err := s.rep.Apply(ctx, s.group, old); !errors.Is(err, ErrReplay) {
		t.Fatalf("cycle 4 after 5: %v, want ErrReplay", err)
	}
	// The next ordinary delta continues the chain.
	p, a = writeExactCycle(t, s.cyc, a, false, 16*format.BlockSize, map[uint64]byte{7: 7}, now)
	if res, err = s.rep.Apply(ctx, s.group, p); err != nil {
		t.Fatal(err)
	}
	s.record(res.Point, a)
	s.check(true, true)

	// The plain-file target follows the same rule.
	target := filepath.Join(t.TempDir(), "disk.img")
	b := newTImage(0x52, "b.img")
	var files []string
	for i := 0; i < 3; i++ {
		p, b = writeExactCycle(t, s.cyc, b, false, 8*format.BlockSize, map[uint64]byte{uint64(i): byte(i + 1)}, now)
		files = append(files, p)
	}
	if _, err := ApplyFiles(target, files); err != nil {
		t.Fatal(err)
	}
	a = b
	m, next = merged(6, 2, map[uint64]byte{5: 0x55})
	if _, err := ApplyFiles(target, []string{gap}); err == nil {
		t.Fatal("a foreign gap applied to the plain file")
	}
	if _, err := ApplyFiles(target, []string{m}); err != nil {
		t.Fatalf("merged delta on the plain file: %v", err)
	}
	got, err := os.ReadFile(target)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != string(next.data) {
		t.Fatal("plain file after the merged delta differs")
	}
}

// fwdTarget is a second replica store that receives forwarded cuts.
func fwdTarget(t *testing.T) *Replica {
	t.Helper()
	rep, err := OpenReplica(t.TempDir(), ReplicaOptions{Now: func() time.Time { return foStart.Add(24 * time.Hour) }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rep.Close() })
	if err := rep.EnsureGroup("vm1", Retention{AnyPointWindow: 1000 * time.Hour}); err != nil {
		t.Fatal(err)
	}
	return rep
}

// forwardTo stages the latest point of s into dir, applies the staged cut on
// the target like a commit would, deletes the files (shipped) and checks the
// target's latest point equals the source's.
func forwardTo(t *testing.T, s *tStore, dst *Replica, from ForwardFrom, dir string) ForwardResult {
	t.Helper()
	res, err := s.rep.ForwardCut(context.Background(), s.group, from, dir)
	if err != nil {
		t.Fatalf("forward cut: %v", err)
	}
	if rec, ok, err := ReadForwardCut(dir); len(res.Files) > 0 && (!ok || err != nil || rec.Point != res.Point || len(rec.Files) != len(res.Files)) {
		t.Fatalf("forward cut record: %+v %v %v, want %+v", rec, ok, err, res)
	}
	if len(res.Files) > 0 {
		if _, err := dst.ApplyGroup(context.Background(), "vm1", res.Files); err != nil {
			t.Fatalf("applying the forwarded cut of point %s: %v", res.Point, err)
		}
		for _, f := range res.Files {
			if err := os.Remove(f); err != nil {
				t.Fatal(err)
			}
		}
	}
	ps, err := s.rep.Points(s.group)
	if err != nil {
		t.Fatal(err)
	}
	for id := range ps[len(ps)-1].Seqs {
		if got, want := exportWant(t, dst, "vm1", "latest", id), exportWant(t, s.rep, s.group, "latest", id); got != want {
			t.Fatalf("image %s on the target differs from the source's latest point %s", id, res.Point)
		}
	}
	return res
}

func cycleHeaders(t *testing.T, files []string) map[string]format.Header {
	t.Helper()
	out := map[string]format.Header{}
	for _, p := range files {
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		st, _ := f.Stat()
		h, _, err := format.ReadInfo(f, st.Size())
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		out[filepath.Base(filepath.Dir(p))] = h
	}
	return out
}

// TestForwardCut forwards a group's points to a second store: first bases,
// then merged deltas over several points (grow, shrink, zero runs), nothing
// when the latest point was forwarded already, a base for an image of a new
// generation next to a delta of the other; the target equals the source's
// latest point every time.
func TestForwardCut(t *testing.T) {
	t.Parallel()
	s, a, b, rng := foStore(t, ReplicaOptions{}, 11)
	dst := fwdTarget(t)
	dir := filepath.Join(t.TempDir(), "relay", "cycles")
	const owner = "forward:c:7443"

	res := forwardTo(t, s, dst, ForwardFrom{Owner: owner + ":staged"}, dir)
	if !res.Base || len(res.Files) != 2 || res.Point != "4" {
		t.Fatalf("first forward: %+v", res)
	}
	if err := s.rep.PinForward(s.group, res.Point, owner); err != nil {
		t.Fatal(err)
	}
	if err := s.rep.UnpinForward(s.group, owner+":staged"); err != nil {
		t.Fatal(err)
	}
	from := ForwardFrom{Point: res.Point, Gens: res.Gens}

	// Three more points, forwarded as one merged delta per image.
	for i := 4; i < 7; i++ {
		a, b = foApply(t, s, rng, i, a, b, cycOpt{nOps: 20, resize: true}, cycOpt{nOps: 20, resize: true})
	}
	r2, err := s.rep.ForwardCut(context.Background(), s.group, from, dir)
	if err != nil {
		t.Fatal(err)
	}
	hs := cycleHeaders(t, r2.Files)
	for id, h := range hs {
		if h.Base() || h.Seq != r2.Seqs[id] || h.Parent != s.pointSeq(t, from.Point, id) || h.Seq-h.Parent != 3 {
			t.Fatalf("merged delta of %s: base %v seq %d parent %d, want seq %d parent %d", id, h.Base(), h.Seq, h.Parent, r2.Seqs[id], s.pointSeq(t, from.Point, id))
		}
	}
	// Not shipped yet: a second cut is refused.
	if _, err := s.rep.ForwardCut(context.Background(), s.group, from, dir); !errors.Is(err, ErrForwardPending) {
		t.Fatalf("forward over staged files: %v, want ErrForwardPending", err)
	}
	for _, f := range r2.Files {
		os.Remove(f)
	}
	r2 = forwardTo(t, s, dst, from, dir) // the same cut again, applied this time
	if r2.Base || len(r2.Files) != 2 {
		t.Fatalf("merged forward: %+v", r2)
	}
	if err := s.rep.PinForward(s.group, r2.Point, owner); err != nil {
		t.Fatal(err)
	}
	pins, err := s.rep.Pins(s.group)
	if err != nil || len(pins) != 1 || pins[0].Point != r2.Point || !slices.Equal(pins[0].Owners, []string{owner}) {
		t.Fatalf("pins after moving the forward pin: %+v %v", pins, err)
	}
	from = ForwardFrom{Point: r2.Point, Gens: r2.Gens}

	// Nothing new: nothing staged.
	if r3 := forwardTo(t, s, dst, from, dir); len(r3.Files) != 0 || r3.Point != from.Point {
		t.Fatalf("forward without a new point: %+v", r3)
	}

	// Image a starts a new generation (a base), b goes on (a delta).
	a, b = foApply(t, s, rng, 7, a, b, cycOpt{base: true}, cycOpt{nOps: 10})
	r4 := forwardTo(t, s, dst, from, dir)
	if !r4.Base || r4.Gens[a.idString()] != a.gen || r4.Gens[b.idString()] != b.gen {
		t.Fatalf("forward of a new generation: %+v", r4)
	}
	// A forward whose last point is gone (its pin was lost) sends bases,
	// which the target takes although it holds the generation already.
	a, b = foApply(t, s, rng, 8, a, b, cycOpt{nOps: 5}, cycOpt{nOps: 5})
	a, b = foApply(t, s, rng, 9, a, b, cycOpt{nOps: 5}, cycOpt{nOps: 5}) // seq held+2: no parent needed for a base
	r5 := forwardTo(t, s, dst, ForwardFrom{Point: "999", Gens: r4.Gens}, dir)
	if !r5.Base || len(r5.Files) != 2 {
		t.Fatalf("forward from a lost point: %+v", r5)
	}
	if err := s.rep.UnpinForward(s.group, owner); err != nil {
		t.Fatal(err)
	}
	if pins, _ := s.rep.Pins(s.group); len(pins) != 0 {
		t.Fatalf("pins after UnpinForward: %+v", pins)
	}
	if _, err := dst.VerifyPoint(context.Background(), "vm1", "latest"); err != nil {
		t.Fatal(err)
	}
	_, _ = a, b
}

func (s *tStore) pointSeq(t *testing.T, point, id string) uint64 {
	t.Helper()
	ps, err := s.rep.Points(s.group)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range ps {
		if p.ID == point {
			return p.Seqs[id]
		}
	}
	t.Fatalf("no point %s", point)
	return 0
}

// TestForwardCutMismatch: a damaged latest.img is not forwarded.
func TestForwardCutMismatch(t *testing.T) {
	t.Parallel()
	s, a, _, _ := foStore(t, ReplicaOptions{}, 12)
	p := filepath.Join(s.dir, "groups", s.group, "images", a.idString(), "latest.img")
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	blk := make([]byte, 1)
	f.ReadAt(blk, 0)
	blk[0] ^= 0xff
	f.WriteAt(blk, 0)
	f.Close()
	dir := filepath.Join(t.TempDir(), "cycles")
	if _, err := s.rep.ForwardCut(context.Background(), s.group, ForwardFrom{}, dir); !errors.Is(err, ErrMismatch) {
		t.Fatalf("forward of a damaged image: %v, want ErrMismatch", err)
	}
	if ms, _ := filepath.Glob(filepath.Join(dir+"*", "*", "*")); len(ms) != 0 {
		t.Fatalf("files left behind: %v", ms)
	}
}
