package applier

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/standin/standin/internal/format"
)

// checkTestImage compares a test image with the model: the whole image, a
// few random ranges, and that every range SEEK_HOLE/SEEK_DATA call a hole
// is zero in the model.
func checkTestImage(t *testing.T, ti *TestImage, model []byte, rng *rand.Rand) {
	t.Helper()
	if ti.Size() != int64(len(model)) {
		t.Fatalf("size %d, want %d", ti.Size(), len(model))
	}
	if got := readAllAt(t, ti, ti.Size()); !bytes.Equal(got, model) {
		for i := range got {
			if got[i] != model[i] {
				t.Fatalf("test image differs from the model at byte %d (block %d)", i, i/format.BlockSize)
			}
		}
	}
	for i := 0; i < 20; i++ {
		off := rng.Int64N(int64(len(model)))
		n := 1 + rng.IntN(3*format.BlockSize)
		b := make([]byte, n)
		k, err := ti.ReadAt(b, off)
		want := model[off:min(int64(len(model)), off+int64(n))]
		if k != len(want) || (err != nil && !errors.Is(err, io.EOF)) || !bytes.Equal(b[:k], want) {
			t.Fatalf("ReadAt(%d, %d) = %d, %v: differs from the model", n, off, k, err)
		}
	}
	// Holes must read as zeros.
	var holes int64
	for off := int64(0); off < ti.Size(); {
		h, err := ti.SeekData(off, true)
		if err != nil {
			t.Fatalf("SEEK_HOLE %d: %v", off, err)
		}
		if h < off {
			t.Fatalf("SEEK_HOLE %d returned %d", off, h)
		}
		if h >= ti.Size() {
			break
		}
		d, err := ti.SeekData(h, false)
		if errors.Is(err, syscall.ENXIO) {
			d = ti.Size()
		} else if err != nil {
			t.Fatalf("SEEK_DATA %d: %v", h, err)
		}
		if d <= h {
			t.Fatalf("SEEK_DATA %d returned %d inside a hole", h, d)
		}
		if !isZero(model[h:d]) {
			t.Fatalf("range %d-%d reported as a hole is not zero", h, d)
		}
		holes += d - h
		off = d
	}
}

// TestTestFailoverCOW: a test failover over an older point reads exactly the
// point, takes random writes (unaligned, across blocks, the partial last
// block) and zero/punch ranges, keeps them while new cycles are applied and
// retention would expire the point (it is pinned), persists them across
// close and reopen, and leaves nothing behind when removed.
func TestTestFailoverCOW(t *testing.T) {
	t.Parallel()
	clock := time.Date(2026, 6, 3, 0, 0, 0, 0, time.UTC)
	o := ReplicaOptions{Now: func() time.Time { return clock }}
	s := newTStore(t, o, Retention{Points: 1, Every: time.Hour})
	rng := rand.New(rand.NewPCG(21, 22))
	a := newTImage(10, "dir/disk.img")
	ctx := context.Background()
	apply := func() string {
		t.Helper()
		clock = clock.Add(time.Minute)
		p, na := a.cycle(t, s.cyc, rng, [16]byte{byte(rng.Uint32())}, clock, cycOpt{nOps: 25})
		res, err := s.rep.Apply(ctx, s.group, p)
		if err != nil {
			t.Fatal(err)
		}
		a = na
		s.record(res.Point, a)
		return res.Point
	}
	apply()
	target := apply()
	targetTime := clock
	model := slices.Clone(a.data)

	plan, err := s.rep.PlanTest(s.group, target)
	if err != nil {
		t.Fatal(err)
	}
	if len(plan.Images) != 1 || plan.Images[0].File != "disk.img" || plan.Images[0].Size != int64(len(model)) {
		t.Fatalf("plan %+v", plan)
	}
	t0 := time.Now()
	tf, err := s.rep.CreateTest(plan, "", false)
	if err != nil {
		t.Fatal(err)
	}
	sess, err := s.rep.OpenTest(tf.ID)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("test failover created and opened in %v", time.Since(t0))
	apply() // the test's point is older now; retention would expire it

	// Resolve by ID, time (second precision and exact), latest.
	for _, spec := range []string{target, targetTime.Format(time.RFC3339), targetTime.Add(30 * time.Second).Format(time.RFC3339Nano)} {
		p, err := s.rep.ResolvePoint(s.group, spec)
		if err != nil || p.ID != target {
			t.Fatalf("ResolvePoint(%q) = %s, %v; want %s", spec, p.ID, err, target)
		}
	}
	if _, err := s.rep.ResolvePoint(s.group, "2000-01-01T00:00:00Z"); !errors.Is(err, ErrNoPoint) {
		t.Fatalf("point before the oldest: %v", err)
	}
	if _, err := s.rep.ResolvePoint(s.group, "99"); !errors.Is(err, ErrNoPoint) {
		t.Fatalf("unknown point ID: %v", err)
	}
	if _, err := s.rep.PlanTest("nope", "latest"); !errors.Is(err, ErrNoGroup) {
		t.Fatalf("unknown group: %v", err)
	}

	ti := sess.Images[0]
	checkTestImage(t, ti, model, rng)

	size := int64(len(model))
	for round := 0; round < 6; round++ {
		for i := 0; i < 40; i++ {
			off := rng.Int64N(size)
			n := min(size-off, 1+rng.Int64N(3*format.BlockSize))
			if i%10 == 9 {
				off = size - n // the (partial) last block
			}
			switch rng.IntN(4) {
			case 0:
				if err := ti.Zero(off, n); err != nil {
					t.Fatal(err)
				}
				clear(model[off : off+n])
			case 1: // whole aligned blocks
				off = off &^ (format.BlockSize - 1)
				n = min(size-off, int64(1+rng.IntN(4))*format.BlockSize)
				fallthrough
			default:
				b := make([]byte, n)
				for k := range b {
					b[k] = byte(rng.Uint32())
				}
				if k, err := ti.WriteAt(b, off); err != nil || int64(k) != n {
					t.Fatalf("WriteAt(%d, %d) = %d, %v", n, off, k, err)
				}
				copy(model[off:], b)
			}
		}
		if _, err := ti.WriteAt([]byte{1}, size); !errors.Is(err, ErrBeyondEnd) {
			t.Fatalf("write past the end: %v", err)
		}
		checkTestImage(t, ti, model, rng)
		// Replication goes on; the point stays (pinned), the test image too.
		latest := apply()
		k := s.pointKinds()
		if k[target] != "pinned" || k[latest] != "latest" {
			t.Fatalf("round %d: points %v, want %s pinned", round, k, target)
		}
		s.check(false, round%2 == 0)
		checkTestImage(t, ti, model, rng)
		if round == 2 {
			if err := ti.Sync(); err != nil {
				t.Fatal(err)
			}
			if err := sess.Close(); err != nil {
				t.Fatal(err)
			}
			s.reopen(o) // durable pin and delta survive a restart
			if sess, err = s.rep.OpenTest(tf.ID); err != nil {
				t.Fatal(err)
			}
			ti = sess.Images[0]
			checkTestImage(t, ti, model, rng)
		}
	}
	if w := sess.Written(); w <= 0 || w > size+format.BlockSize {
		t.Fatalf("written %d bytes", w)
	}
	tests, err := s.rep.Tests()
	if err != nil || len(tests) != 1 || tests[0].ID != tf.ID || tests[0].Point != target {
		t.Fatalf("Tests() = %+v, %v", tests, err)
	}
	if err := s.rep.UpdateTest(tf.ID, func(x *TestFailover) { x.BootCheck = &BootCheck{Command: "true", Passed: true} }); err != nil {
		t.Fatal(err)
	}
	if got, _ := s.rep.Test(tf.ID); got.BootCheck == nil || !got.BootCheck.Passed {
		t.Fatalf("boot check not recorded: %+v", got)
	}

	// A second test failover of the latest point at the same time.
	plan2, err := s.rep.PlanTest(s.group, "latest")
	if err != nil {
		t.Fatal(err)
	}
	tf2, err := s.rep.CreateTest(plan2, "", false)
	if err != nil {
		t.Fatal(err)
	}
	sess2, err := s.rep.OpenTest(tf2.ID)
	if err != nil {
		t.Fatal(err)
	}
	checkTestImage(t, sess2.Images[0], a.data, rng)
	sess2.Close()

	// Stop: files, pin, and after the next apply the point, are gone.
	sess.Close()
	for _, id := range []string{tf.ID, tf2.ID} {
		if err := s.rep.RemoveTest(id); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.rep.RemoveTest(tf.ID); !errors.Is(err, ErrNoTest) {
		t.Fatalf("second remove: %v, want ErrNoTest", err)
	}
	if ents, _ := os.ReadDir(filepath.Join(s.dir, testsDir)); len(ents) != 0 {
		t.Fatalf("left in failover-tests: %v", ents)
	}
	if pins, _ := s.rep.Pins(""); len(pins) != 0 {
		t.Fatalf("pins left: %+v", pins)
	}
	last := apply()
	if k := s.pointKinds(); len(k) != 1 || k[last] != "latest" {
		t.Fatalf("after stop and an apply: %v", k)
	}
}

// TestCleanupTests: a test directory without record (creation interrupted),
// a directory being removed, and a durable pin whose test has no record are
// removed at start; a complete test is kept.
func TestCleanupTests(t *testing.T) {
	t.Parallel()
	clock := time.Date(2026, 6, 4, 0, 0, 0, 0, time.UTC)
	s := newTStore(t, ReplicaOptions{Now: func() time.Time { return clock }}, Retention{})
	rng := rand.New(rand.NewPCG(31, 32))
	a := newTImage(11, "disk.img")
	p, _ := a.cycle(t, s.cyc, rng, [16]byte{1}, clock, cycOpt{})
	if _, err := s.rep.Apply(context.Background(), s.group, p); err != nil {
		t.Fatal(err)
	}
	plan, err := s.rep.PlanTest(s.group, "latest")
	if err != nil {
		t.Fatal(err)
	}
	keep, err := s.rep.CreateTest(plan, "", false)
	if err != nil {
		t.Fatal(err)
	}
	td := filepath.Join(s.dir, testsDir)
	os.MkdirAll(filepath.Join(td, "vm1-half"), 0o700)
	os.WriteFile(filepath.Join(td, "vm1-half", "x.delta"), []byte("x"), 0o600)
	os.MkdirAll(filepath.Join(td, ".vm1-old.removing"), 0o700)
	g, _ := s.rep.group(s.group)
	if _, err := s.rep.pinDurable(g, "latest", "test:vm1-half"); err != nil {
		t.Fatal(err)
	}
	removed, err := s.rep.CleanupTests()
	if err != nil {
		t.Fatal(err)
	}
	if len(removed) != 3 {
		t.Fatalf("removed %v, want 2 directories and 1 pin", removed)
	}
	ents, _ := os.ReadDir(td)
	if len(ents) != 1 || ents[0].Name() != keep.ID {
		t.Fatalf("left %v, want only %s", ents, keep.ID)
	}
	pins, _ := s.rep.Pins(s.group)
	if len(pins) != 1 || !slices.Equal(pins[0].Owners, []string{"test:" + keep.ID}) {
		t.Fatalf("pins %+v", pins)
	}
}
