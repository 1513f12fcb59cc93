package applier

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/zeebo/blake3"

	"github.com/standin/standin/internal/format"
)

// tImage is the test model of one primary image: its content after the last
// cycle written, and the identity of that cycle.
type tImage struct {
	id   [16]byte
	name string
	gen  uint64
	seq  uint64
	have bool // a cycle was written
	data []byte
}

func newTImage(b byte, name string) *tImage {
	return &tImage{id: [16]byte{b, 0x42, 7, 7, 7, 7, 0x40, 7, 0x80, 7, 7, 7, 7, 7, 7, b}, name: name, gen: 1}
}

func (ti *tImage) idString() string { return uuid.UUID(ti.id).String() }

type cycOpt struct {
	base   bool // a base cycle (of a new generation if the image exists)
	nOps   int
	resize bool
	app    bool // flagged app-consistent
}

// cycle writes the next cycle of ti with random changes and returns its
// path and the image content after it; ti itself is only advanced by commit.
func (ti *tImage) cycle(t *testing.T, dir string, rng *rand.Rand, gc [16]byte, cut time.Time, o cycOpt) (string, *tImage) {
	t.Helper()
	next := *ti
	base := o.base || !ti.have
	var size uint64
	switch {
	case base:
		next.data = nil
		if ti.have {
			next.gen++
		}
		next.seq = 0
		size = uint64(8+rng.IntN(56))*format.BlockSize - uint64(rng.IntN(2)*rng.IntN(4096))
	default:
		next.seq++
		size = uint64(len(ti.data))
		if o.resize {
			switch rng.IntN(3) {
			case 0:
				size += uint64(rng.IntN(16*format.BlockSize) + 1)
			case 1:
				size = uint64(rng.IntN(int(size)) + 1)
			}
		}
	}
	data := make([]byte, size) // grown: beyond the old end reads as zero
	if !base {
		copy(data, ti.data)
	}
	nb := blocksOf(size)
	ops := map[uint64][]byte{} // block → content (nil = zero)
	n := o.nOps
	if base {
		n = int(nb) / 2
	}
	for i := 0; i < n && nb > 0; i++ {
		b := uint64(rng.IntN(int(nb)))
		switch rng.IntN(6) {
		case 0: // zero run
			for j := b; j < min(nb, b+uint64(1+rng.IntN(8))); j++ {
				ops[j] = nil
			}
		case 1: // an all-zero data block
			ops[b] = make([]byte, format.BlockSize)
		case 2: // compressible
			ops[b] = bytes.Repeat([]byte{byte(rng.IntN(255) + 1)}, format.BlockSize)
		default:
			blk := make([]byte, format.BlockSize)
			for k := range blk {
				blk[k] = byte(rng.Uint32())
			}
			ops[b] = blk
		}
	}
	h := format.Header{ImageID: ti.id, Generation: next.gen, Seq: next.seq, Parent: next.seq - 1,
		CutTime: cut, ImageSize: size, GroupCut: gc, Name: ti.name}
	if base {
		h.Flags, h.Parent = format.FlagBase, format.NoParent
	}
	if o.app {
		h.Flags |= format.FlagAppConsistent
	}
	p := filepath.Join(dir, fmt.Sprintf("%s-g%d-s%d-%d.cyc", ti.idString(), next.gen, next.seq, rng.Uint32()))
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	w, err := format.NewWriter(f, h, format.WriterOptions{Compress: rng.IntN(2) == 0})
	if err != nil {
		t.Fatal(err)
	}
	blocks := make([]uint64, 0, len(ops))
	for b := range ops {
		blocks = append(blocks, b)
	}
	slices.Sort(blocks)
	for _, b := range blocks {
		d := ops[b]
		off := b * format.BlockSize
		if d == nil {
			if err := w.WriteZero(b, 1); err != nil {
				t.Fatal(err)
			}
			clear(data[off:min(off+format.BlockSize, size)])
			continue
		}
		if err := w.WriteBlocks(b, d); err != nil {
			t.Fatal(err)
		}
		copy(data[off:min(off+format.BlockSize, size)], d)
	}
	if _, err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	next.data, next.have = data, true
	return p, &next
}

type want struct {
	size int64
	sum  [32]byte
}

// tStore drives a Replica and remembers what every recorded point must hold.
type tStore struct {
	t      *testing.T
	dir    string
	cyc    string
	rep    *Replica
	o      ReplicaOptions
	group  string
	points map[string]map[string]want // point ID → image id → content
}

func newTStore(t *testing.T, o ReplicaOptions, ret Retention) *tStore {
	s := &tStore{t: t, dir: t.TempDir(), cyc: t.TempDir(), o: o, group: "vm1", points: map[string]map[string]want{}}
	s.open()
	if err := s.rep.EnsureGroup(s.group, ret); err != nil {
		t.Fatal(err)
	}
	if err := s.rep.EnsureGroup(s.group, ret); err != nil { // idempotent
		t.Fatal(err)
	}
	t.Cleanup(func() { s.rep.Close() })
	return s
}

func (s *tStore) open() {
	s.t.Helper()
	rep, err := OpenReplica(s.dir, s.o)
	if err != nil {
		s.t.Fatal(err)
	}
	s.rep = rep
}

func (s *tStore) reopen(o ReplicaOptions) {
	s.t.Helper()
	s.rep.Close()
	s.o = o
	s.open()
}

// record notes that point id holds the given images.
func (s *tStore) record(id string, imgs ...*tImage) {
	m := map[string]want{}
	for _, ti := range imgs {
		m[ti.idString()] = want{int64(len(ti.data)), blake3.Sum256(ti.data)}
	}
	s.points[id] = m
}

// check verifies every point the store shows against the model.
func (s *tStore) check(export, verify bool) {
	t := s.t
	t.Helper()
	ps, err := s.rep.Points(s.group)
	if err != nil {
		t.Fatal(err)
	}
	for i, p := range ps {
		w, ok := s.points[p.ID]
		if !ok {
			t.Fatalf("store shows point %s that was never recorded", p.ID)
		}
		if len(w) != len(p.Seqs) {
			t.Fatalf("point %s has %d images, want %d", p.ID, len(p.Seqs), len(w))
		}
		if (i == len(ps)-1) != (p.Kind == "latest") {
			t.Fatalf("point %s kind %q at position %d/%d", p.ID, p.Kind, i, len(ps))
		}
		for id, wi := range w {
			pr, err := s.rep.OpenPoint(s.group, p.ID, id)
			if err != nil {
				t.Fatalf("point %s image %s: %v", p.ID, id, err)
			}
			if pr.Size() != wi.size {
				t.Fatalf("point %s image %s: size %d, want %d", p.ID, id, pr.Size(), wi.size)
			}
			b, err := io.ReadAll(io.NewSectionReader(pr, 0, pr.Size()))
			if err != nil {
				t.Fatalf("point %s image %s: %v", p.ID, id, err)
			}
			if blake3.Sum256(b) != wi.sum {
				t.Fatalf("point %s image %s: content differs from the model", p.ID, id)
			}
			if export {
				dst := filepath.Join(s.cyc, "export.img")
				if err := s.rep.Export(context.Background(), s.group, p.ID, id, dst); err != nil {
					t.Fatal(err)
				}
				b, err := os.ReadFile(dst)
				if err != nil {
					t.Fatal(err)
				}
				if int64(len(b)) != wi.size || blake3.Sum256(b) != wi.sum {
					t.Fatalf("export of point %s image %s differs", p.ID, id)
				}
			}
		}
		if verify {
			rep, err := s.rep.VerifyPoint(context.Background(), s.group, p.ID)
			if err != nil {
				t.Fatalf("verify point %s: %v %+v", p.ID, err, rep.Mismatch)
			}
			var nb uint64
			for _, wi := range w {
				nb += blocksOf(uint64(wi.size))
			}
			if rep.Blocks != nb || rep.Images != len(w) {
				t.Fatalf("verify point %s: %d blocks of %d images, want %d of %d", p.ID, rep.Blocks, rep.Images, nb, len(w))
			}
		}
	}
}

func undoBytes(t *testing.T, rep *Replica) int64 {
	gs, err := rep.Status()
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, g := range gs {
		n += g.UndoBytes
	}
	return n
}

// TestReplicaModel applies random cycles (data, zero runs, grow, shrink, a new
// generation, a member joining later) to a group of two images and checks
// every retained point of every image after each apply.
func TestReplicaModel(t *testing.T) {
	t.Parallel()
	clock := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	now := func() time.Time { return clock }
	s := newTStore(t, ReplicaOptions{Now: now}, Retention{Points: 3, Every: time.Hour, AnyPointWindow: 50 * time.Minute})
	rng := rand.New(rand.NewPCG(1, 2))
	a, b := newTImage(1, "a.img"), newTImage(2, "b.img")
	ctx := context.Background()
	var written, reclaimed int64
	for i := 0; i < 32; i++ {
		clock = clock.Add(10 * time.Minute)
		gc := [16]byte{byte(i), 1}
		var paths []string
		var next []*tImage
		switch {
		case i < 3: // only a at first
			p, na := a.cycle(t, s.cyc, rng, gc, clock, cycOpt{nOps: 10, resize: true})
			paths, next = []string{p}, []*tImage{na, b}
		case i == 20: // new generation of b
			p1, na := a.cycle(t, s.cyc, rng, gc, clock, cycOpt{nOps: 5, resize: true})
			p2, nb := b.cycle(t, s.cyc, rng, gc, clock, cycOpt{base: true})
			paths, next = []string{p1, p2}, []*tImage{na, nb}
		case i%5 == 4: // only b changes
			p, nb := b.cycle(t, s.cyc, rng, gc, clock, cycOpt{nOps: 12, resize: true})
			paths, next = []string{p}, []*tImage{a, nb}
		default:
			p1, na := a.cycle(t, s.cyc, rng, gc, clock, cycOpt{nOps: rng.IntN(20), resize: rng.IntN(3) == 0})
			p2, nb := b.cycle(t, s.cyc, rng, gc, clock, cycOpt{nOps: rng.IntN(20), resize: rng.IntN(3) == 0})
			paths, next = []string{p1, p2}, []*tImage{na, nb}
		}
		res, err := s.rep.ApplyGroup(ctx, s.group, paths)
		if err != nil {
			t.Fatalf("cycle %d: %v", i, err)
		}
		if res.Skipped || res.Point == "" {
			t.Fatalf("cycle %d: %+v", i, res)
		}
		written += res.UndoBytes
		reclaimed += res.Reclaimed
		a, b = next[0], next[1]
		var present []*tImage
		for _, ti := range next {
			if ti.have {
				present = append(present, ti)
			}
		}
		s.record(res.Point, present...)
		s.check(i%10 == 9, i%3 == 0)
		// idempotent re-apply
		res2, err := s.rep.ApplyGroup(ctx, s.group, paths)
		if err != nil || !res2.Skipped {
			t.Fatalf("cycle %d re-apply: %v %+v", i, err, res2)
		}
	}
	ps, _ := s.rep.Points(s.group)
	t.Logf("%d points kept, undo written %d bytes, reclaimed %d, held %d", len(ps), written, reclaimed, undoBytes(t, s.rep))
	if reclaimed <= 0 || undoBytes(t, s.rep) >= written {
		t.Fatalf("retention reclaimed nothing (written %d, reclaimed %d, held %d)", written, reclaimed, undoBytes(t, s.rep))
	}
	// The store reopens to the same points.
	s.reopen(s.o)
	s.check(true, true)
}

// TestRetentionKeepsExpectedPoints: Points=3 hourly over 30 cycles 20 minutes
// apart keeps exactly the latest and the newest point of each of the last
// three hour slots; every kept point verifies; undo space is reclaimed.
func TestRetentionKeepsExpectedPoints(t *testing.T) {
	t.Parallel()
	start := time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)
	clock := start
	s := newTStore(t, ReplicaOptions{Now: func() time.Time { return clock }}, Retention{Points: 3, Every: time.Hour})
	rng := rand.New(rand.NewPCG(5, 6))
	a := newTImage(3, "disk.img")
	var times = map[string]time.Time{}
	var written, reclaimed int64
	for i := 0; i < 30; i++ {
		clock = start.Add(time.Duration(i) * 20 * time.Minute)
		p, na := a.cycle(t, s.cyc, rng, [16]byte{byte(i)}, clock, cycOpt{nOps: 16})
		res, err := s.rep.Apply(context.Background(), s.group, p)
		if err != nil {
			t.Fatal(err)
		}
		written += res.UndoBytes
		reclaimed += res.Reclaimed
		a = na
		s.record(res.Point, a)
		times[res.Point] = clock
		// expected: latest + newest per hour slot among the last 3 slots
		wantIDs := map[string]bool{res.Point: true}
		newest := map[int64]string{}
		for id, tm := range times {
			slot := tm.Unix() / 3600
			if slot > clock.Unix()/3600-3 {
				if cur, ok := newest[slot]; !ok || times[cur].Before(tm) {
					newest[slot] = id
				}
			}
		}
		for _, id := range newest {
			wantIDs[id] = true
		}
		ps, err := s.rep.Points(s.group)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, p := range ps {
			got = append(got, p.ID)
			if !wantIDs[p.ID] {
				t.Fatalf("cycle %d: point %s (%s) kept, want only %v", i, p.ID, times[p.ID].Format("15:04"), wantIDs)
			}
		}
		if len(got) != len(wantIDs) {
			t.Fatalf("cycle %d: points %v, want %v", i, got, wantIDs)
		}
		s.check(false, true)
	}
	held := undoBytes(t, s.rep)
	t.Logf("undo written %d, reclaimed %d, held %d", written, reclaimed, held)
	if reclaimed <= 0 || held >= written || held+reclaimed != written {
		t.Fatalf("undo accounting: written %d, reclaimed %d, held %d", written, reclaimed, held)
	}
}

var errCrash = errors.New("simulated crash")

// TestCrashAtEveryStep crashes an apply (of two images, with retention that
// drops and merges points) at every step of the protocol, reopens, checks
// every point, and re-applies the same cycles (twice: the second is a no-op).
func TestCrashAtEveryStep(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	const before = 5 // cycles applied before the crashing one (its retention merges)
	stages := map[string]bool{}
	for n := 1; ; n++ {
		start := time.Date(2026, 5, 1, 0, 0, 0, 0, time.UTC)
		clock := start
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
		s := newTStore(t, o, Retention{Points: 2, Every: 20 * time.Minute})
		rng := rand.New(rand.NewPCG(9, uint64(n)))
		a, b := newTImage(4, "a.img"), newTImage(5, "b.img")
		var paths []string
		var na, nb *tImage
		for i := 0; i <= before+1; i++ {
			clock = start.Add(time.Duration(i) * 10 * time.Minute)
			gc := [16]byte{byte(i)}
			var p1, p2 string
			if i == before {
				// the crashing apply shrinks a and starts a new generation of b
				p1, na = a.cycle(t, s.cyc, rng, gc, clock, cycOpt{nOps: 12, resize: true})
				p2, nb = b.cycle(t, s.cyc, rng, gc, clock, cycOpt{base: true})
			} else {
				p1, na = a.cycle(t, s.cyc, rng, gc, clock, cycOpt{nOps: 12, resize: i%2 == 0})
				p2, nb = b.cycle(t, s.cyc, rng, gc, clock, cycOpt{nOps: 12})
			}
			paths = []string{p1, p2}
			if i == before {
				armed.Store(true)
			}
			res, err := s.rep.ApplyGroup(ctx, s.group, paths)
			armed.Store(false)
			if i == before && errors.Is(err, errCrash) {
				s.reopen(ReplicaOptions{Now: o.Now})
				ps, _ := s.rep.Points(s.group)
				rolledForward := ps[len(ps)-1].Cycle == na.seq
				if rolledForward {
					s.record(ps[len(ps)-1].ID, na, nb)
				}
				s.check(false, true)
				res, err = s.rep.ApplyGroup(ctx, s.group, paths)
				if err != nil {
					t.Fatalf("n=%d (%v): re-apply after crash: %v", n, stage.Load(), err)
				}
				if res.Skipped != rolledForward {
					t.Fatalf("n=%d (%v): re-apply skipped=%v, recovery rolled forward=%v", n, stage.Load(), res.Skipped, rolledForward)
				}
				stages[stage.Load().(string)] = true
			} else if err != nil {
				t.Fatalf("n=%d cycle %d: %v", n, i, err)
			}
			if !res.Skipped {
				s.record(res.Point, na, nb)
			}
			a, b = na, nb
			if i >= before {
				s.check(false, false)
			}
			if res2, err := s.rep.ApplyGroup(ctx, s.group, paths); err != nil || !res2.Skipped {
				t.Fatalf("n=%d cycle %d: second re-apply %v %+v", n, i, err, res2)
			}
		}
		s.check(true, true)
		s.rep.Close()
		if calls.Load() < int64(n) { // the hook was not reached: every step was crashed
			break
		}
	}
	var got []string
	for st := range stages {
		got = append(got, st)
	}
	slices.Sort(got)
	t.Logf("crashed at stages %v", got)
	for _, st := range []string{"undo-tmp", "undo", "state-applying", "journal", "data-partial", "data", "state-applied", "point", "retain-points", "merge-written", "undo-delete"} {
		if !stages[st] {
			t.Errorf("stage %s never crashed", st)
		}
	}
}

// TestCrashDuringRecovery: a crash while recovery rolls an apply forward is
// recovered by the next open.
func TestCrashDuringRecovery(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	for n := 1; n < 8; n++ {
		clock := time.Date(2026, 5, 1, 0, 0, 0, 0, time.UTC)
		crashAt := func(stage string, k int) func(string) error {
			c := 0
			return func(st string) error {
				if st == stage || stage == "" {
					c++
					if c == k {
						return errCrash
					}
				}
				return nil
			}
		}
		s := newTStore(t, ReplicaOptions{Now: func() time.Time { return clock }}, Retention{Points: 2, Every: 30 * time.Minute})
		rng := rand.New(rand.NewPCG(11, uint64(n)))
		a := newTImage(6, "a.img")
		for i := 0; i < 5; i++ {
			clock = clock.Add(10 * time.Minute)
			p, na := a.cycle(t, s.cyc, rng, [16]byte{byte(i)}, clock, cycOpt{nOps: 10, resize: true})
			if i == 4 {
				s.reopen(ReplicaOptions{Now: s.o.Now, testHook: crashAt("data-partial", 1)})
			}
			res, err := s.rep.Apply(ctx, s.group, p)
			if i == 4 {
				if !errors.Is(err, errCrash) {
					t.Fatal(err)
				}
				// recovery itself crashes at its n-th step, then a clean open completes
				s.rep.Close()
				if rep, err := OpenReplica(s.dir, ReplicaOptions{Now: s.o.Now, testHook: crashAt("", n)}); err == nil {
					rep.Close()
				}
				s.open()
				ps, _ := s.rep.Points(s.group)
				last := ps[len(ps)-1]
				if last.Cycle != na.seq {
					t.Fatalf("n=%d: committed apply not rolled forward: latest %+v", n, last)
				}
				s.record(last.ID, na)
				s.check(true, true)
				if res, err := s.rep.Apply(ctx, s.group, p); err != nil || !res.Skipped {
					t.Fatalf("re-apply: %v %+v", err, res)
				}
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			a = na
			s.record(res.Point, a)
		}
		s.rep.Close()
	}
}

// TestPendingApplyWithMovedCycle: the cycle file of a committed apply is gone
// at recovery; the group stays readable at its last point, and applying the
// same cycle from another path completes it.
func TestPendingApplyWithMovedCycle(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := newTStore(t, ReplicaOptions{}, Retention{AnyPointWindow: time.Hour})
	rng := rand.New(rand.NewPCG(3, 3))
	a := newTImage(7, "a.img")
	now := time.Now()
	p0, a0 := a.cycle(t, s.cyc, rng, [16]byte{}, now, cycOpt{})
	res, err := s.rep.Apply(ctx, s.group, p0)
	if err != nil {
		t.Fatal(err)
	}
	s.record(res.Point, a0)
	p1, a1 := a0.cycle(t, s.cyc, rng, [16]byte{1}, now, cycOpt{nOps: 20, resize: true})
	s.reopen(ReplicaOptions{testHook: func(st string) error {
		if st == "data-partial" {
			return errCrash
		}
		return nil
	}})
	if _, err := s.rep.Apply(ctx, s.group, p1); !errors.Is(err, errCrash) {
		t.Fatal(err)
	}
	moved := p1 + ".moved"
	if err := os.Rename(p1, moved); err != nil {
		t.Fatal(err)
	}
	s.reopen(ReplicaOptions{})
	s.check(true, true) // still at point 1, complete
	gs, _ := s.rep.Status()
	if gs[0].Pending == "" {
		t.Fatal("status does not show the pending apply")
	}
	res, err = s.rep.Apply(ctx, s.group, moved)
	if err != nil || !res.Skipped {
		t.Fatalf("apply from the new path: %v %+v", err, res)
	}
	ps, _ := s.rep.Points(s.group)
	s.record(ps[len(ps)-1].ID, a1)
	s.check(true, true)
	if len(ps) != 2 {
		t.Fatalf("points %+v", ps)
	}
}

// TestConcurrentReaders: readers of the previous point (by ID and as
// "latest") see exactly that point while the next cycle is applied.
func TestConcurrentReaders(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	var slow atomic.Bool
	s := newTStore(t, ReplicaOptions{testHook: func(st string) error {
		if slow.Load() && (st == "data-partial" || st == "data" || st == "undo") {
			time.Sleep(20 * time.Millisecond)
		}
		return nil
	}}, Retention{AnyPointWindow: 24 * time.Hour})
	rng := rand.New(rand.NewPCG(8, 8))
	a := newTImage(9, "a.img")
	now := time.Now()
	for i := 0; i < 8; i++ {
		p, na := a.cycle(t, s.cyc, rng, [16]byte{byte(i)}, now, cycOpt{nOps: 40, resize: true, base: i == 5})
		var prev string
		if ps, _ := s.rep.Points(s.group); len(ps) > 0 {
			prev = ps[len(ps)-1].ID
		}
		stop := make(chan struct{})
		var wg sync.WaitGroup
		var reads atomic.Int64
		errc := make(chan error, 4)
		reader := func(point string) {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				pr, err := s.rep.OpenPoint(s.group, point, a.idString())
				if err != nil {
					errc <- err
					return
				}
				id := pointID(pr.(*pointReader).n)
				b, err := io.ReadAll(io.NewSectionReader(pr, 0, pr.Size()))
				if err != nil {
					errc <- err
					return
				}
				w := s.points[id][a.idString()]
				if int64(len(b)) != w.size || blake3.Sum256(b) != w.sum {
					errc <- fmt.Errorf("cycle %d: reader of %s (point %s) saw a torn image", i, point, id)
					return
				}
				reads.Add(1)
			}
		}
		nextID := "1"
		if prev != "" {
			n, _ := strconv.ParseUint(prev, 10, 64)
			nextID = pointID(n + 1)
		}
		s.record(nextID, na) // "latest" may resolve to it as soon as it is recorded
		if prev != "" {
			wg.Add(2)
			go reader(prev)
			go reader("latest")
		}
		slow.Store(true)
		res, err := s.rep.Apply(ctx, s.group, p)
		slow.Store(false)
		close(stop)
		wg.Wait()
		if err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-errc:
			t.Fatal(err)
		default:
		}
		if prev != "" && reads.Load() < 2 {
			t.Fatalf("cycle %d: readers made only %d reads", i, reads.Load())
		}
		if res.Point != nextID {
			t.Fatalf("cycle %d: point %s, want %s", i, res.Point, nextID)
		}
		a = na
	}
	s.check(true, true)
}

// TestRefusals: foreign, gap, replay, corrupt, no-base and mixed-cut input is
// refused and leaves state, image and points unchanged.
func TestRefusals(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := newTStore(t, ReplicaOptions{}, Retention{AnyPointWindow: time.Hour})
	rng := rand.New(rand.NewPCG(4, 4))
	a := newTImage(10, "a.img")
	now := time.Now()
	var paths []string
	for i := 0; i < 3; i++ {
		p, na := a.cycle(t, s.cyc, rng, [16]byte{byte(i)}, now, cycOpt{nOps: 5})
		res, err := s.rep.Apply(ctx, s.group, p)
		if err != nil {
			t.Fatal(err)
		}
		paths = append(paths, p)
		a = na
		s.record(res.Point, a)
	}
	snapshot := func() string {
		var sb strings.Builder
		filepath.Walk(s.dir, func(p string, fi os.FileInfo, err error) error {
			if err == nil && !fi.IsDir() && filepath.Base(p) != "lock" {
				b, _ := os.ReadFile(p)
				fmt.Fprintf(&sb, "%s %x\n", p, blake3.Sum256(b))
			}
			return nil
		})
		return sb.String()
	}
	before := snapshot()
	next, _ := a.cycle(t, s.cyc, rng, [16]byte{9}, now, cycOpt{nOps: 5})
	gapT := *a
	gapT.seq++
	gap, _ := gapT.cycle(t, s.cyc, rng, [16]byte{9}, now, cycOpt{nOps: 5})
	oldGen := *a
	oldGen.gen = 0
	foreign, _ := oldGen.cycle(t, s.cyc, rng, [16]byte{9}, now, cycOpt{nOps: 5})
	newGenDelta := *a
	newGenDelta.gen = 2
	foreign2, _ := newGenDelta.cycle(t, s.cyc, rng, [16]byte{9}, now, cycOpt{nOps: 5})
	stranger := newTImage(11, "x.img")
	stranger.have, stranger.seq, stranger.data = true, 4, make([]byte, 8192)
	noBase, _ := stranger.cycle(t, s.cyc, rng, [16]byte{9}, now, cycOpt{nOps: 1})
	b := newTImage(12, "b.img")
	otherCut, _ := b.cycle(t, s.cyc, rng, [16]byte{8}, now, cycOpt{})
	raw, _ := os.ReadFile(next)
	bad := filepath.Join(s.cyc, "bad.cyc")
	raw[len(raw)/2] ^= 0x10
	os.WriteFile(bad, raw, 0o600)
	trunc := filepath.Join(s.cyc, "trunc.cyc")
	os.WriteFile(trunc, raw[:len(raw)-10], 0o600)
	for _, c := range []struct {
		name  string
		paths []string
		want  error
	}{
		{"replay", paths[:1], ErrReplay},
		{"gap", []string{gap}, ErrGap},
		{"old generation", []string{foreign}, ErrForeign},
		{"new generation without base", []string{foreign2}, ErrForeign},
		{"no base", []string{noBase}, ErrNoBase},
		{"corrupt", []string{bad}, format.ErrCorrupt},
		{"truncated", []string{trunc}, format.ErrTruncated},
		{"mixed group cut", []string{next, otherCut}, ErrGroupCut},
		{"same image twice", []string{next, next}, ErrGroupCut},
		{"valid then gap", []string{next, gap}, ErrGroupCut},
		{"missing file", []string{filepath.Join(s.cyc, "nope.cyc")}, os.ErrNotExist},
	} {
		if _, err := s.rep.ApplyGroup(ctx, s.group, c.paths); !errors.Is(err, c.want) {
			t.Errorf("%s: got %v, want %v", c.name, err, c.want)
		}
		if snapshot() != before {
			t.Fatalf("%s: the store changed", c.name)
		}
		s.check(false, true)
	}
	if _, err := s.rep.Apply(ctx, "nogroup", next); !errors.Is(err, ErrNoGroup) {
		t.Errorf("unknown group: %v", err)
	}
	if res, err := s.rep.Apply(ctx, s.group, paths[2]); err != nil || !res.Skipped {
		t.Fatalf("idempotent: %v %+v", err, res)
	}
	if snapshot() != before {
		t.Fatal("idempotent re-apply changed the store")
	}
	if _, err := s.rep.Apply(ctx, s.group, next); err != nil {
		t.Fatal(err)
	}
}

func TestBadNames(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	rep, err := OpenReplica(dir, ReplicaOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer rep.Close()
	bad := []string{"", ".", "..", "../x", "a/b", "/abs", "a\x00b", "a..b", ".hidden", "-x", "a b", "é", strings.Repeat("x", 129)}
	for _, n := range bad {
		if err := rep.EnsureGroup(n, Retention{}); !errors.Is(err, ErrBadName) {
			t.Errorf("EnsureGroup(%q): %v", n, err)
		}
		if _, err := rep.Apply(context.Background(), n, "x"); !errors.Is(err, ErrBadName) {
			t.Errorf("Apply(%q): %v", n, err)
		}
		if _, err := rep.Points(n); !errors.Is(err, ErrBadName) {
			t.Errorf("Points(%q): %v", n, err)
		}
	}
	if err := rep.EnsureGroup(strings.Repeat("x", 128), Retention{}); err != nil {
		t.Fatal(err)
	}
	if err := rep.EnsureGroup("g1", Retention{}); err != nil {
		t.Fatal(err)
	}
	// a group with a point, then image and point names
	cyc := t.TempDir()
	a := newTImage(13, "a.img")
	p, _ := a.cycle(t, cyc, rand.New(rand.NewPCG(1, 1)), [16]byte{}, time.Now(), cycOpt{})
	if _, err := rep.Apply(context.Background(), "g1", p); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"../../etc/passwd", "a/b", "..", "x\x00"} {
		if _, err := rep.OpenPoint("g1", "latest", n); !errors.Is(err, ErrBadName) {
			t.Errorf("OpenPoint image %q: %v", n, err)
		}
		if err := rep.Export(context.Background(), "g1", "latest", n, filepath.Join(cyc, "out")); !errors.Is(err, ErrBadName) {
			t.Errorf("Export image %q: %v", n, err)
		}
		if _, err := rep.OpenPoint("g1", n, "a.img"); !errors.Is(err, ErrBadName) {
			t.Errorf("OpenPoint point %q: %v", n, err)
		}
	}
	if _, err := rep.OpenPoint("g1", "latest", "a.img"); err != nil {
		t.Fatalf("by name: %v", err)
	}
	if _, err := rep.OpenPoint("g1", "1", a.idString()); err != nil {
		t.Fatalf("by id: %v", err)
	}
	if _, err := rep.OpenPoint("g1", "2", a.idString()); !errors.Is(err, ErrNoPoint) {
		t.Fatalf("missing point: %v", err)
	}
	// nothing was created outside the store
	ents, _ := os.ReadDir(filepath.Join(dir, "groups"))
	if len(ents) != 2 {
		t.Fatalf("groups dir has %d entries", len(ents))
	}
	if _, ok, err := rep.ImageState("g1", "../x"); ok || !errors.Is(err, ErrBadName) {
		t.Fatalf("ImageState bad id: %v", err)
	}
}

// TestVerifyPointDetectsDamage: flipping a byte of latest.img or of an undo
// log's data is found by VerifyPoint.
func TestVerifyPointDetectsDamage(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := newTStore(t, ReplicaOptions{}, Retention{AnyPointWindow: time.Hour})
	rng := rand.New(rand.NewPCG(2, 9))
	a := newTImage(14, "a.img")
	now := time.Now()
	for i := 0; i < 3; i++ {
		p, na := a.cycle(t, s.cyc, rng, [16]byte{byte(i)}, now, cycOpt{nOps: 30})
		res, err := s.rep.Apply(ctx, s.group, p)
		if err != nil {
			t.Fatal(err)
		}
		a = na
		s.record(res.Point, a)
	}
	s.check(false, true)
	idir := filepath.Join(s.dir, "groups", s.group, "images", a.idString())
	// damage latest.img at its first non-zero byte
	img := filepath.Join(idir, "latest.img")
	b, _ := os.ReadFile(img)
	i := bytes.IndexFunc(b, func(r rune) bool { return r != 0 })
	f, _ := os.OpenFile(img, os.O_RDWR, 0)
	f.WriteAt([]byte{b[i] ^ 1}, int64(i))
	f.Close()
	rep, err := s.rep.VerifyPoint(ctx, s.group, "latest")
	if !errors.Is(err, ErrMismatch) || rep.Mismatch == nil || rep.Mismatch.Block != uint64(i/format.BlockSize) {
		t.Fatalf("damage not found: %v %+v", err, rep)
	}
}
