package applier

import (
	"context"
	"errors"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"github.com/standin/standin/internal/format"
	"github.com/standin/standin/internal/wire"
)

// stageSeed writes ti's content as a seed image of group vm1 (non-zero
// blocks only, as a seed import does) and returns its description.
func stageSeed(t *testing.T, rep *Replica, ti *tImage, cut time.Time) SeedImage {
	t.Helper()
	si := SeedImage{Group: "vm1", Name: ti.name, ID: ti.idString(), Generation: ti.gen, Seq: ti.seq, Size: int64(len(ti.data)), CutTime: cut}
	s, err := rep.StageSeedImage(si)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.Truncate(si.Size); err != nil {
		t.Fatal(err)
	}
	for off := 0; off < len(ti.data); off += format.BlockSize {
		blk := ti.data[off:min(len(ti.data), off+format.BlockSize)]
		if isZero(blk) {
			continue
		}
		if _, err := s.WriteAt(blk, int64(off)); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Checkpoint(uint64(len(ti.data)+format.BlockSize-1) / format.BlockSize); err != nil {
		t.Fatal(err)
	}
	return si
}

func seedModel(rng *rand.Rand, b byte, name string, seq uint64) *tImage {
	ti := newTImage(b, name)
	ti.seq, ti.have = seq, true
	ti.data = make([]byte, 40*format.BlockSize+1234)
	for i := range ti.data {
		if (i/format.BlockSize)%5 != 3 { // every fifth block stays a hole
			ti.data[i] = byte(rng.Uint32())
		}
	}
	return ti
}

// TestSeedImportThenCycles: a seed imported as the group's first point,
// then the primary's catch-up cycles apply on top; every point verifies.
func TestSeedImportThenCycles(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	s := &tStore{t: t, dir: t.TempDir(), cyc: t.TempDir(), group: "vm1", points: map[string]map[string]want{}}
	s.open()
	t.Cleanup(func() { s.rep.Close() })
	a, b := seedModel(rng, 1, "a.img", 7), seedModel(rng, 2, "b.img", 7)
	cut := time.Now().Add(-time.Hour).Truncate(time.Second)
	imgs := []SeedImage{stageSeed(t, s.rep, a, cut), stageSeed(t, s.rep, b, cut)}
	res, err := s.rep.CommitSeed("vm1", imgs, Retention{})
	if err != nil {
		t.Fatal(err)
	}
	s.record(res.Point, a, b)
	s.check(true, true)
	// A second commit of the same seed does nothing.
	if res2, err := s.rep.CommitSeed("vm1", imgs, Retention{}); err != nil || !res2.Skipped {
		t.Fatalf("re-commit: %+v %v, want skipped", res2, err)
	}
	for round := 0; round < 3; round++ {
		gc := [16]byte{byte(round + 1)}
		now := cut.Add(time.Duration(round+1) * time.Minute)
		pa, na := a.cycle(t, s.cyc, rng, gc, now, cycOpt{nOps: 6, resize: round == 1})
		pb, nb := b.cycle(t, s.cyc, rng, gc, now, cycOpt{nOps: 6})
		r, err := s.rep.ApplyGroup(context.Background(), "vm1", []string{pa, pb})
		if err != nil {
			t.Fatalf("round %d: %v", round, err)
		}
		a, b = na, nb
		s.record(r.Point, a, b)
	}
	s.check(true, true)
}

// TestSeedCommitCrash: a crash after the commit record is finished by recovery.
func TestSeedCommitCrash(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	crash := errors.New("simulated crash")
	s := &tStore{t: t, dir: t.TempDir(), cyc: t.TempDir(), group: "vm1", points: map[string]map[string]want{}}
	s.o = ReplicaOptions{testHook: func(st string) error {
		if st == "seed-commit" {
			return crash
		}
		return nil
	}}
	s.open()
	t.Cleanup(func() { s.rep.Close() })
	a := seedModel(rng, 1, "a.img", 0)
	imgs := []SeedImage{stageSeed(t, s.rep, a, time.Now())}
	if _, err := s.rep.CommitSeed("vm1", imgs, Retention{}); !errors.Is(err, crash) {
		t.Fatalf("commit: %v, want the simulated crash", err)
	}
	s.reopen(ReplicaOptions{})
	ps, err := s.rep.Points("vm1")
	if err != nil || len(ps) != 1 {
		t.Fatalf("after recovery: points %v %v, want one", ps, err)
	}
	s.record(ps[0].ID, a)
	s.check(true, true)
}

// TestCheckSeed: wrong VM, older generation, older cut and a group that
// already replicates are refused with a reason; the announced seed passes.
func TestCheckSeed(t *testing.T) {
	rep, err := OpenReplica(t.TempDir(), ReplicaOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer rep.Close()
	id := "01020304-0506-4708-890a-0b0c0d0e0f10"
	other := "ffffffff-0506-4708-890a-0b0c0d0e0f10"
	e := wire.SeedExpect{Time: time.Now(), Images: []wire.ImageState{{ID: id, Name: "disk.img", Generation: 2, Seq: 5}}}
	if err := rep.ExpectSeed("vm1", e); err != nil {
		t.Fatal(err)
	}
	seed := func(id string, gen, seq uint64) []SeedImage {
		return []SeedImage{{Group: "vm1", Name: "disk.img", ID: id, Generation: gen, Seq: seq}}
	}
	for _, c := range []struct {
		imgs   []SeedImage
		action string
		reason string
	}{
		{seed(id, 2, 5), "import", ""},
		{seed(other, 2, 5), "refuse", "another VM"},
		{seed(id, 1, 9), "refuse", "older seed"},
		{seed(id, 2, 4), "refuse", "older seed"},
		{seed(id, 2, 6), "refuse", "newer seed"},
		{append(seed(id, 2, 5), SeedImage{Group: "vm1", Name: "x.img", ID: other, Generation: 1}), "refuse", "not part of group"},
	} {
		got := rep.CheckSeed(c.imgs)
		if len(got) != 1 || got[0].Action != c.action || !strings.Contains(got[0].Reason, c.reason) {
			t.Errorf("seed %+v: %+v, want %s (%q)", c.imgs, got, c.action, c.reason)
		}
	}
	// Nothing announced and nothing held: importable.
	if got := rep.CheckSeed([]SeedImage{{Group: "vm2", Name: "d", ID: id, Generation: 1}}); got[0].Action != "import" {
		t.Errorf("unannounced seed: %+v", got)
	}
}
