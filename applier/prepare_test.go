package applier

import (
	"context"
	"os"
	"path/filepath"
	"testing"
)

// TestPreparedPromote: a copy prepared at point 2, then two more points
// (with size changes), then the promotion brings the copy forward to point 4
// — equal to the export of point 4, same root as a full copy — and drops the
// prepared files and the pin. A prepared copy newer than the promoted point
// is not used.
func TestPreparedPromote(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s, a, b, rng := foStore(t, ReplicaOptions{}, 5)
	dst := t.TempDir()
	pt, refreshed, err := s.rep.PreparePromote(ctx, s.group, dst)
	if err != nil || pt != "4" || refreshed {
		t.Fatalf("prepare: %q %v", pt, err)
	}
	if pins, _ := s.rep.Pins(s.group); len(pins) != 1 {
		t.Fatalf("prepared point not pinned: %+v", pins)
	}
	for i := 4; i < 6; i++ {
		a, b = foApply(t, s, rng, i, a, b, cycOpt{nOps: 24, resize: true}, cycOpt{nOps: 24, resize: true})
	}
	before := exports(t, s.rep, s.group)
	ps, err := s.rep.Points(s.group)
	if err != nil {
		t.Fatal(err)
	}
	latest := ps[len(ps)-1].ID
	out, err := s.rep.Promote(ctx, s.group, "", "planned", "hostA", dst)
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != 2 {
		t.Fatalf("%d images", len(out))
	}
	for _, pi := range out {
		checkPromoted(t, pi, before[latest][pi.ID]) // content and root of the bytes
		if !pi.Prepared {
			t.Errorf("image %s was copied in full, not brought forward from the prepared copy", pi.ID)
		}
	}
	for _, f := range []string{preparedFile, a.idString() + ".img.pre", a.idString() + ".hashes.pre"} {
		if _, err := os.Stat(filepath.Join(dst, f)); !os.IsNotExist(err) {
			t.Errorf("%s left after the promotion: %v", f, err)
		}
	}
	if pins, _ := s.rep.Pins(s.group); len(pins) != 0 {
		t.Fatalf("pins left: %+v", pins)
	}
	s.check(true, true)

	// Prepared at the latest point, promoted at an older one: a full copy.
	s2, _, _, _ := foStore(t, ReplicaOptions{}, 6)
	dst2 := t.TempDir()
	if _, _, err := s2.rep.PreparePromote(ctx, s2.group, dst2); err != nil {
		t.Fatal(err)
	}
	out, err = s2.rep.Promote(ctx, s2.group, "2", "unplanned", "", dst2)
	if err != nil {
		t.Fatal(err)
	}
	for _, pi := range out {
		checkPromoted(t, pi, s2.points["2"][pi.ID])
		if pi.Prepared {
			t.Errorf("image %s brought forward from a copy prepared at a newer point", pi.ID)
		}
	}
}

// TestPreparedRefresh: preparing again brings the prepared copy forward (a
// warm standby kept after every apply) instead of copying it anew; the copy
// equals the latest point each time and the promotion uses it.
func TestPreparedRefresh(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s, a, b, rng := foStore(t, ReplicaOptions{}, 7)
	dst := t.TempDir()
	if _, _, err := s.rep.PreparePromote(ctx, s.group, dst); err != nil {
		t.Fatal(err)
	}
	for i := 4; i < 7; i++ {
		a, b = foApply(t, s, rng, i, a, b, cycOpt{nOps: 24, resize: true}, cycOpt{nOps: 24, resize: true})
		before := exports(t, s.rep, s.group)
		ps, _ := s.rep.Points(s.group)
		latest := ps[len(ps)-1].ID
		pt, refreshed, err := s.rep.PreparePromote(ctx, s.group, dst)
		if err != nil || pt != latest {
			t.Fatalf("refresh %d: %q %v", i, pt, err)
		}
		if !refreshed {
			t.Fatalf("refresh %d copied the image anew instead of bringing it forward", i)
		}
		for _, id := range []string{a.idString(), b.idString()} {
			if got := fileWant(t, filepath.Join(dst, id+".img.pre")); got != before[latest][id] {
				t.Fatalf("refresh %d: prepared copy of %s differs from point %s", i, id, latest)
			}
		}
		if pins, _ := s.rep.Pins(s.group); len(pins) != 1 || pins[0].Point != latest {
			t.Fatalf("refresh %d: pins %+v, want one on %s", i, pins, latest)
		}
	}
	a, b = foApply(t, s, rng, 7, a, b, cycOpt{nOps: 24}, cycOpt{nOps: 24})
	before := exports(t, s.rep, s.group)
	ps, _ := s.rep.Points(s.group)
	out, err := s.rep.Promote(ctx, s.group, "", "unplanned", "", dst)
	if err != nil {
		t.Fatal(err)
	}
	for _, pi := range out {
		checkPromoted(t, pi, before[ps[len(ps)-1].ID][pi.ID])
		if !pi.Prepared {
			t.Errorf("image %s copied in full", pi.ID)
		}
	}
}
