package applier

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/zeebo/blake3"

	"github.com/standin/standin/internal/format"
)

// writeSizedCycle writes the next delta of ti claiming an image of size
// bytes, with one data block at block 0 (no model: the size may be absurd).
func writeSizedCycle(t *testing.T, dir string, ti *tImage, size uint64, gc byte) string {
	t.Helper()
	h := format.Header{ImageID: ti.id, Generation: ti.gen, Seq: ti.seq + 1, Parent: ti.seq, CutTime: time.Now(),
		ImageSize: size, GroupCut: [16]byte{gc, 0x5e}, Name: ti.name}
	p := filepath.Join(dir, fmt.Sprintf("%s-g%d-s%d-size%d.cyc", ti.idString(), h.Generation, h.Seq, size))
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w, err := format.NewWriter(f, h, format.WriterOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.WriteBlocks(0, bytes.Repeat([]byte{0xab}, format.BlockSize)); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return p
}

// storeSnapshot hashes every file of the store (but the lock).
func storeSnapshot(dir string) string {
	var sb strings.Builder
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() && filepath.Base(p) != "lock" && filepath.Base(p) != "chunks.db" {
			b, _ := os.ReadFile(p)
			fmt.Fprintf(&sb, "%s %d %x\n", p, fi.Size(), blake3.Sum256(b))
		}
		return nil
	})
	return sb.String()
}

// TestHugeImageRefusedBeforeCommit: a cycle claiming an image of 2^62 bytes
// (or just over 16 TiB) is refused before the commit record: the store is
// unchanged, nothing is pending, and the group goes on replicating.
func TestHugeImageRefusedBeforeCommit(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := newTStore(t, ReplicaOptions{}, Retention{AnyPointWindow: time.Hour})
	rng := rand.New(rand.NewPCG(62, 62))
	a := newTImage(62, "a.img")
	now := time.Now()
	p0, a0 := a.cycle(t, s.cyc, rng, [16]byte{1}, now, cycOpt{})
	res, err := s.rep.Apply(ctx, s.group, p0)
	if err != nil {
		t.Fatal(err)
	}
	s.record(res.Point, a0)
	before := storeSnapshot(s.dir)
	for i, size := range []uint64{1 << 62, MaxImageSize + 1, ^uint64(0) - format.BlockSize} {
		bad := writeSizedCycle(t, s.cyc, a0, size, byte(10+i))
		for try := 0; try < 2; try++ {
			_, err := s.rep.Apply(ctx, s.group, bad)
			if !errors.Is(err, ErrUnholdable) || !strings.Contains(err.Error(), "16 TiB") {
				t.Fatalf("size %d: got %v, want a refusal naming the 16 TiB limit", size, err)
			}
			if he := classify(err); he.status != 422 || he.code != "refused" {
				t.Fatalf("size %d: classified %d %s", size, he.status, he.code)
			}
		}
		if after := storeSnapshot(s.dir); after != before {
			t.Fatalf("size %d: the refused cycle changed the store:\nbefore:\n%s\nafter:\n%s", size, before, after)
		}
		gs, _ := s.rep.Status()
		if gs[0].Pending != "" {
			t.Fatalf("size %d: pending after a refusal: %s", size, gs[0].Pending)
		}
		s.check(false, true)
	}
	// The group keeps replicating: the real cycle of that seq applies.
	for i := 0; i < 3; i++ {
		p, na := a0.cycle(t, s.cyc, rng, [16]byte{byte(20 + i)}, now, cycOpt{nOps: 10, resize: true})
		res, err := s.rep.Apply(ctx, s.group, p)
		if err != nil {
			t.Fatalf("next cycle after the refusal: %v", err)
		}
		a0 = na
		s.record(res.Point, a0)
	}
	s.check(true, true)
	// And after a restart (the refused cycle left nothing for recovery).
	s.reopen(ReplicaOptions{})
	s.check(false, true)
}

// TestDropPendingApply: an apply whose cycle file disappears after its commit
// record (crashed at several steps) wedges the group: recovery cannot finish,
// new cycles are refused, health is Critical and names the repair command.
// DropPending (also crashed at each of its steps and finished by the next
// open) rolls it back to the last point: every point stays verifiable, and
// the same cut then applies.
func TestDropPendingApply(t *testing.T) {
	t.Parallel()
	for _, applyStage := range []string{"journal", "data-partial", "state-applied"} {
		for _, dropStage := range []string{"", "drop-journal", "drop-data", "drop-state"} {
			t.Run(applyStage+"/"+dropStage, func(t *testing.T) {
				t.Parallel()
				testDropPending(t, applyStage, dropStage)
			})
		}
	}
}

func testDropPending(t *testing.T, applyStage, dropStage string) {
	ctx := context.Background()
	var armed atomic.Value // the stage to crash at ("" = none)
	armed.Store("")
	hook := func(st string) error {
		if armed.Load().(string) == st {
			armed.Store("")
			return errCrash
		}
		return nil
	}
	clock := time.Date(2026, 7, 1, 0, 0, 0, 0, time.UTC)
	o := ReplicaOptions{Now: func() time.Time { return clock }, testHook: hook}
	s := newTStore(t, o, Retention{Points: 10, Every: time.Minute})
	rng := rand.New(rand.NewPCG(77, uint64(len(applyStage)*10+len(dropStage))))
	a, b, c := newTImage(1, "a.img"), newTImage(2, "dir/b.img"), newTImage(3, "c.img")
	for i := 0; i < 3; i++ {
		clock = clock.Add(5 * time.Minute)
		pa, na := a.cycle(t, s.cyc, rng, [16]byte{byte(i)}, clock, cycOpt{nOps: 12, resize: true})
		pb, nb := b.cycle(t, s.cyc, rng, [16]byte{byte(i)}, clock, cycOpt{nOps: 12})
		res, err := s.rep.ApplyGroup(ctx, s.group, []string{pa, pb})
		if err != nil {
			t.Fatal(err)
		}
		a, b = na, nb
		s.record(res.Point, a, b)
	}
	last, _ := s.rep.Points(s.group)
	lastID := last[len(last)-1].ID
	// The cut that wedges: a resized, a new generation of b, a new member c.
	clock = clock.Add(5 * time.Minute)
	pa, na := a.cycle(t, s.cyc, rng, [16]byte{9}, clock, cycOpt{nOps: 20, resize: true})
	pb, nb := b.cycle(t, s.cyc, rng, [16]byte{9}, clock, cycOpt{base: true})
	pc, nc := c.cycle(t, s.cyc, rng, [16]byte{9}, clock, cycOpt{})
	cut := []string{pa, pb, pc}
	armed.Store(applyStage)
	if _, err := s.rep.ApplyGroup(ctx, s.group, cut); !errors.Is(err, errCrash) {
		t.Fatalf("apply: %v", err)
	}
	// The cycle file of b is lost after the commit record.
	if err := os.Rename(pb, pb+".saved"); err != nil {
		t.Fatal(err)
	}
	s.reopen(o)
	s.check(false, true) // still at the last point, complete
	gs, _ := s.rep.Status()
	if gs[0].Pending == "" {
		t.Fatal("status does not show the pending apply")
	}
	srv, err := NewServer(s.rep, nil, t.TempDir(), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	hs, err := srv.Health()
	if err != nil {
		t.Fatal(err)
	}
	if hs[0].Health != "Critical" || !strings.Contains(strings.Join(hs[0].Reasons, ";"), "standin replicate repair --store "+s.dir+" --group "+s.group) {
		t.Fatalf("health %s %q", hs[0].Health, hs[0].Reasons)
	}
	rep, err := s.rep.Pending(s.group)
	if err != nil {
		t.Fatal(err)
	}
	if !rep.Pending || rep.Kind != "apply" || !rep.Droppable || rep.LastPoint != lastID || len(rep.Items) != 3 || rep.Items[1].Cycle != "missing" || rep.Items[2].Cycle != "ok" || (rep.Items[0].Cycle != "ok") == !rep.Items[0].Done {
		t.Fatalf("pending report %+v", rep)
	}
	if applyStage == "state-applied" && !rep.Items[0].Done {
		t.Fatalf("image a finished before the crash, report says %+v", rep.Items[0])
	}
	// Wedged: the next cycles are refused.
	clock = clock.Add(5 * time.Minute)
	if _, err := s.rep.ApplyGroup(ctx, s.group, []string{pa, pc}); !errors.Is(err, ErrPending) {
		t.Fatalf("apply while wedged: %v", err)
	}
	if he := classify(fmt.Errorf("x: %w", ErrPending)); he.status != 409 || he.code != "pending" {
		t.Fatalf("pending classified %+v", he)
	}
	// Drop it (crashing at dropStage first, finished by the next open).
	if dropStage != "" {
		armed.Store(dropStage)
		if _, err := s.rep.DropPending(s.group); !errors.Is(err, errCrash) {
			t.Fatalf("drop with a crash at %s: %v", dropStage, err)
		}
		s.check(false, true)
		s.reopen(o)
	} else {
		rep, err := s.rep.DropPending(s.group)
		if err != nil || !rep.Dropped || rep.Pending {
			t.Fatalf("drop: %v %+v", err, rep)
		}
	}
	gs, _ = s.rep.Status()
	if gs[0].Pending != "" {
		t.Fatalf("still pending after the drop: %s", gs[0].Pending)
	}
	if rep, _ := s.rep.Pending(s.group); rep.Pending {
		t.Fatalf("pending report after the drop: %+v", rep)
	}
	if fileExists(filepath.Join(s.dir, "groups", s.group, "apply.json")) {
		t.Fatal("commit record left behind")
	}
	ps, _ := s.rep.Points(s.group)
	if ps[len(ps)-1].ID != lastID {
		t.Fatalf("latest point %s, want %s", ps[len(ps)-1].ID, lastID)
	}
	s.check(true, true)
	st, ok, _ := s.rep.ImageState(s.group, a.idString())
	if !ok || st.Seq != a.seq || st.Applying {
		t.Fatalf("image a after the drop: %+v, want seq %d", st, a.seq)
	}
	if _, ok, _ := s.rep.ImageState(s.group, c.idString()); ok {
		t.Fatal("the new image c survived the drop")
	}
	// The primary sends the cut again: it applies.
	if err := os.Rename(pb+".saved", pb); err != nil {
		t.Fatal(err)
	}
	res, err := s.rep.ApplyGroup(ctx, s.group, cut)
	if err != nil || res.Skipped {
		t.Fatalf("the cut after the drop: %v %+v", err, res)
	}
	s.record(res.Point, na, nb, nc)
	s.check(true, true)
	s.reopen(ReplicaOptions{Now: o.Now})
	s.check(false, true)
}

// TestApplyFilesRefusesHugeImage: 'cycle apply' to a plain file refuses a
// 2^62-byte image before the target's state says "applying", so the target
// keeps taking cycles.
func TestApplyFilesRefusesHugeImage(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "disk.img")
	ti := newTImage(63, "disk.img")
	rng := rand.New(rand.NewPCG(63, 1))
	p0, t0 := ti.cycle(t, dir, rng, [16]byte{1}, time.Now(), cycOpt{})
	if _, err := ApplyFiles(target, []string{p0}); err != nil {
		t.Fatal(err)
	}
	bad := writeSizedCycle(t, dir, t0, 1<<62, 2)
	if _, err := ApplyFiles(target, []string{bad}); !errors.Is(err, ErrUnholdable) {
		t.Fatalf("got %v, want ErrUnholdable", err)
	}
	p1, _ := t0.cycle(t, dir, rng, [16]byte{3}, time.Now(), cycOpt{nOps: 5})
	if _, err := ApplyFiles(target, []string{p1}); err != nil {
		t.Fatalf("the next cycle after the refusal: %v", err)
	}
}
