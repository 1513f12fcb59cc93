package applier

import (
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

// TestRecreatedImageRetires: b.img is deleted on the primary and created
// again (a new image id, same name). From the point of the new image's base
// on, the old image is no member any more: the point lists only a.img and the
// new b.img (so exports, test failovers and promotions use those), the
// primary sees only the current images, the points mount shows the old one
// under a distinct retired name, older points still hold the old b.img, a
// late cycle of the old image is refused, and all of it survives a reopen.
func TestRecreatedImageRetires(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s, a, b, rng := foStore(t, ReplicaOptions{}, 11)
	old := b
	nb := newTImage(0x52, "b.img") // re-created: new id, same name
	a, nb = foApply(t, s, rng, 4, a, nb, cycOpt{nOps: 8}, cycOpt{})
	ps, err := s.rep.Points(s.group)
	if err != nil {
		t.Fatal(err)
	}
	latest := ps[len(ps)-1]
	if _, ok := latest.Seqs[old.idString()]; ok || len(latest.Seqs) != 2 {
		t.Fatalf("latest point %s lists %v: the deleted b.img (%s) is still a member", latest.ID, latest.Seqs, old.idString())
	}
	s.check(true, true) // every point: exactly the model (old b.img at points 1..4, new at 5)

	pis, err := s.rep.PointImages(s.group, "latest")
	if err != nil {
		t.Fatal(err)
	}
	var files []string
	for _, pi := range pis {
		files = append(files, pi.File)
		if pi.File == "b.img" && pi.ID != nb.idString() {
			t.Errorf("latest b.img is image %s, want the re-created %s", pi.ID, nb.idString())
		}
	}
	slices.Sort(files)
	if !slices.Equal(files, []string{"a.img", "b.img"}) {
		t.Errorf("latest point images %v, want a.img b.img", files)
	}
	pis, err = s.rep.PointImages(s.group, "4")
	if err != nil {
		t.Fatal(err)
	}
	for _, pi := range pis {
		if pi.File == "b.img" && pi.ID != old.idString() {
			t.Errorf("point 4 b.img is image %s, want the old %s", pi.ID, old.idString())
		}
	}
	// An export of point 4 restores the disks under the names they had then.
	for _, pi := range pis {
		if pi.ID == old.idString() && pi.File != "b.img" {
			t.Errorf("point 4: the old b.img is exported as %q, want b.img", pi.File)
		}
	}
	gi, err := s.rep.GroupImages(s.group)
	if err != nil {
		t.Fatal(err)
	}
	for _, im := range gi {
		if im.ID == old.idString() {
			t.Errorf("GroupImages still lists the retired image: %+v", gi)
		}
	}
	pfs, err := s.rep.PointFiles(s.group)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]string{} // point/file → id
	for _, pf := range pfs {
		k := pf.Point + "/" + pf.File
		if seen[k] != "" {
			t.Errorf("points mount: two images named %s", k)
		}
		seen[k] = pf.ImageID
		if pf.ImageID == old.idString() && pf.File != "b.img.retired-"+old.idString()[:8] {
			t.Errorf("retired image shown as %q", pf.File)
		}
		if pf.ImageID == nb.idString() && pf.File != "b.img" {
			t.Errorf("current b.img shown as %q", pf.File)
		}
	}
	// A late cycle of the old image is refused, nothing changes.
	p, _ := old.cycle(t, s.cyc, rng, [16]byte{9, 0xf0}, foStart.Add(time.Hour), cycOpt{nOps: 4})
	if _, err := s.rep.ApplyGroup(ctx, s.group, []string{p}); !errors.Is(err, ErrForeign) {
		t.Fatalf("cycle of the retired image: %v, want ErrForeign", err)
	}
	s.reopen(s.o)
	a, nb = foApply(t, s, rng, 5, a, nb, cycOpt{nOps: 8}, cycOpt{nOps: 8})
	ps, _ = s.rep.Points(s.group)
	if _, ok := ps[len(ps)-1].Seqs[old.idString()]; ok {
		t.Fatalf("after reopen the retired image is a member again: %v", ps[len(ps)-1].Seqs)
	}
	s.check(true, true)
	// A failover promotes the current members only.
	out, err := s.rep.Promote(ctx, s.group, "", "unplanned", "", t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, pi := range out {
		ids = append(ids, pi.ID)
	}
	slices.Sort(ids)
	if want := []string{a.idString(), nb.idString()}; !slices.Equal(ids, want) {
		t.Fatalf("promoted %v, want %v", ids, want)
	}
}

// TestRetiredImageDeleted: once retention keeps no point that lists a
// retired image, its directory is deleted (it no longer counts anywhere),
// and a late cycle of it is still refused — also after a reopen and after
// the image that replaced it is itself replaced and deleted.
func TestRetiredImageDeleted(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	clock := foStart.Add(time.Hour)
	o := ReplicaOptions{Now: func() time.Time { return clock }}
	s := newTStore(t, o, Retention{AnyPointWindow: 2 * time.Hour, Points: 1, Every: time.Minute})
	rng := rand.New(rand.NewPCG(5, 77))
	a, b := newTImage(0x31, "a.img"), newTImage(0x32, "b.img")
	for i := 0; i < 3; i++ {
		a, b = foApply(t, s, rng, i, a, b, cycOpt{nOps: 8}, cycOpt{nOps: 8})
	}
	old := b
	nb := newTImage(0x52, "b.img")
	a, nb = foApply(t, s, rng, 3, a, nb, cycOpt{nOps: 8}, cycOpt{})
	idir := func(ti *tImage) string { return filepath.Join(s.dir, "groups", s.group, "images", ti.idString()) }
	if _, err := os.Stat(idir(old)); err != nil {
		t.Fatalf("retired image deleted while older points list it: %v", err)
	}
	refused := func(ti *tImage, i int) {
		t.Helper()
		p, _ := ti.cycle(t, s.cyc, rng, [16]byte{byte(i), 0xf0}, foStart.Add(time.Duration(i)*10*time.Minute), cycOpt{base: true, nOps: 4})
		if _, err := s.rep.ApplyGroup(ctx, s.group, []string{p}); !errors.Is(err, ErrForeign) {
			t.Fatalf("base cycle of retired image %s: %v, want ErrForeign", ti.idString(), err)
		}
	}
	clock = foStart.Add(10 * time.Hour) // only the latest point is kept from now on
	a, nb = foApply(t, s, rng, 4, a, nb, cycOpt{nOps: 8}, cycOpt{nOps: 8})
	if _, err := os.Stat(idir(old)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("retired image listed by no kept point still on disk: %v", err)
	}
	s.check(false, true)
	refused(old, 5)
	s.reopen(o)
	refused(old, 6)
	// The re-created image is re-created again: it retires and goes too, and
	// both earlier ids stay refused.
	nb2 := newTImage(0x62, "b.img")
	a, nb2 = foApply(t, s, rng, 7, a, nb2, cycOpt{nOps: 8}, cycOpt{})
	a, nb2 = foApply(t, s, rng, 8, a, nb2, cycOpt{nOps: 8}, cycOpt{nOps: 8})
	if _, err := os.Stat(idir(nb)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("second retired image still on disk: %v", err)
	}
	s.reopen(o)
	refused(old, 9)
	refused(nb, 10)
	s.check(true, true)
}

// TestRetiredImageDeleteCrash: a crash after a retired image's state.json
// is gone (its directory still there) leaves a store whose open removes the
// directory; the points and the refusal of the old id are unchanged.
func TestRetiredImageDeleteCrash(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	clock := foStart.Add(time.Hour)
	crash := errors.New("crash")
	armed := false
	o := ReplicaOptions{Now: func() time.Time { return clock }, testHook: func(st string) error {
		if armed && st == "retired-state-removed" {
			return crash
		}
		return nil
	}}
	s := newTStore(t, o, Retention{AnyPointWindow: 2 * time.Hour, Points: 1, Every: time.Minute})
	rng := rand.New(rand.NewPCG(6, 77))
	a, b := newTImage(0x31, "a.img"), newTImage(0x32, "b.img")
	a, b = foApply(t, s, rng, 0, a, b, cycOpt{nOps: 8}, cycOpt{nOps: 8})
	old := b
	nb := newTImage(0x52, "b.img")
	a, nb = foApply(t, s, rng, 1, a, nb, cycOpt{nOps: 8}, cycOpt{})
	clock = foStart.Add(10 * time.Hour)
	armed = true
	pa, na := a.cycle(t, s.cyc, rng, [16]byte{2, 0xf0}, foStart.Add(20*time.Minute), cycOpt{nOps: 8})
	pb, nnb := nb.cycle(t, s.cyc, rng, [16]byte{2, 0xf0}, foStart.Add(20*time.Minute), cycOpt{nOps: 8})
	res, err := s.rep.ApplyGroup(ctx, s.group, []string{pa, pb})
	if !errors.Is(err, crash) {
		t.Fatalf("apply with a crash in retention: %v", err)
	}
	s.record(res.Point, na, nnb)
	idir := filepath.Join(s.dir, "groups", s.group, "images", old.idString())
	if _, err := os.Stat(filepath.Join(idir, "latest.img")); err != nil {
		t.Fatalf("crash point not reached: %v", err)
	}
	armed = false
	s.reopen(o)
	if _, err := os.Stat(idir); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("after the reopen the retired image's directory is still there: %v", err)
	}
	for id := range s.points {
		if id != res.Point {
			delete(s.points, id) // expired
		}
	}
	s.check(true, true)
	p, _ := old.cycle(t, s.cyc, rng, [16]byte{3, 0xf0}, foStart.Add(30*time.Minute), cycOpt{base: true, nOps: 4})
	if _, err := s.rep.ApplyGroup(ctx, s.group, []string{p}); !errors.Is(err, ErrForeign) {
		t.Fatalf("base cycle of the deleted retired image: %v, want ErrForeign", err)
	}
}
