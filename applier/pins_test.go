package applier

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

// pointIDs lists the IDs and kinds of a group's points.
func (s *tStore) pointKinds() map[string]string {
	s.t.Helper()
	ps, err := s.rep.Points(s.group)
	if err != nil {
		s.t.Fatal(err)
	}
	out := map[string]string{}
	for _, p := range ps {
		out[p.ID] = p.Kind
	}
	return out
}

func readAllAt(t *testing.T, r io.ReaderAt, size int64) []byte {
	t.Helper()
	b := make([]byte, size)
	n, err := r.ReadAt(b, 0)
	if err != nil && !(errors.Is(err, io.EOF) && int64(n) == size) {
		t.Fatalf("read %d of %d bytes: %v", n, size, err)
	}
	return b
}

// TestPinKeepsPoint: retention keeps only the latest point, so every apply
// expires the one before, except a pinned one: an open pin keeps point 1
// (readable, exact) through later applies; released, it expires on the next
// apply. A durable pin survives reopening the store (retention at open sees
// it) and, removed, lets the point expire.
func TestPinKeepsPoint(t *testing.T) {
	t.Parallel()
	clock := time.Date(2026, 6, 1, 0, 0, 0, 0, time.UTC)
	o := ReplicaOptions{Now: func() time.Time { return clock }}
	s := newTStore(t, o, Retention{Points: 1, Every: time.Hour})
	rng := rand.New(rand.NewPCG(11, 12))
	a := newTImage(7, "disk.img")
	ctx := context.Background()
	apply := func() string {
		t.Helper()
		clock = clock.Add(time.Minute)
		p, na := a.cycle(t, s.cyc, rng, [16]byte{byte(rng.Uint32())}, clock, cycOpt{nOps: 20, resize: true})
		res, err := s.rep.Apply(ctx, s.group, p)
		if err != nil {
			t.Fatal(err)
		}
		a = na
		s.record(res.Point, a)
		return res.Point
	}
	p1 := apply()
	data1 := slices.Clone(a.data)
	r1, err := s.rep.OpenPinned(s.group, "latest", "disk.img")
	if err != nil {
		t.Fatal(err)
	}
	if r1.Point() != p1 {
		t.Fatalf("latest resolved to %s, want %s", r1.Point(), p1)
	}
	for i := 0; i < 4; i++ {
		latest := apply()
		k := s.pointKinds()
		if k[p1] != "pinned" || k[latest] != "latest" || len(k) != 2 {
			t.Fatalf("after apply %d: points %v, want %s pinned and %s latest only", i, k, p1, latest)
		}
		if got := readAllAt(t, r1, r1.Size()); int64(len(data1)) != r1.Size() || !bytes.Equal(got, data1) {
			t.Fatalf("pinned point %s reads differently after apply %d", p1, i)
		}
		s.check(false, true)
	}
	pins, err := s.rep.Pins(s.group)
	if err != nil || len(pins) != 1 || pins[0].Point != p1 || pins[0].Open != 1 {
		t.Fatalf("pins %+v %v, want one open pin of %s", pins, err, p1)
	}
	// A second pin of the same point, released first, does not release it.
	pin2, err := s.rep.PinPoint(s.group, p1)
	if err != nil {
		t.Fatal(err)
	}
	pin2.Release()
	pin2.Release() // idempotent
	apply()
	if k := s.pointKinds(); k[p1] != "pinned" {
		t.Fatalf("point %s lost after releasing a second pin: %v", p1, k)
	}
	r1.Close()
	if k := s.pointKinds(); k[p1] != "pinned" {
		t.Fatalf("point %s expired before the next apply: %v", p1, k)
	}
	latest := apply()
	if k := s.pointKinds(); len(k) != 1 || k[latest] != "latest" {
		t.Fatalf("after release and an apply: points %v, want only %s", k, latest)
	}
	if _, err := r1.ReadAt(make([]byte, 4096), 0); !errors.Is(err, ErrPointGone) {
		t.Fatalf("read of the expired point: %v, want ErrPointGone", err)
	}
	if _, err := s.rep.PinPoint(s.group, p1); !errors.Is(err, ErrNoPoint) {
		t.Fatalf("pin of an expired point: %v, want ErrNoPoint", err)
	}

	// Durable pin across a reopen.
	g, _ := s.rep.group(s.group)
	if _, err := s.rep.pinDurable(g, latest, "test:x"); err != nil {
		t.Fatal(err)
	}
	s.reopen(o)
	apply()
	if k := s.pointKinds(); k[latest] != "pinned" {
		t.Fatalf("durable pin lost across reopen: %v", k)
	}
	s.check(true, true)
	g, _ = s.rep.group(s.group)
	if err := s.rep.unpinDurable(g, "test:x"); err != nil {
		t.Fatal(err)
	}
	last := apply()
	if k := s.pointKinds(); len(k) != 1 || k[last] != "latest" {
		t.Fatalf("after unpin and an apply: %v, want only %s", k, last)
	}
}

// TestPinRetentionCrash: with a durably pinned point between expiring ones,
// retention merges the undo logs between the pin and the latest point; a
// crash at each retention step leaves every shown point (the pinned one
// included) exact after reopening.
func TestPinRetentionCrash(t *testing.T) {
	t.Parallel()
	for _, stage := range []string{"retain-points", "merge-written", "undo-delete"} {
		t.Run(stage, func(t *testing.T) {
			clock := time.Date(2026, 6, 2, 0, 0, 0, 0, time.UTC)
			armed := false
			o := ReplicaOptions{Now: func() time.Time { return clock }, testHook: func(st string) error {
				if armed && st == stage {
					armed = false
					return errCrash
				}
				return nil
			}}
			s := newTStore(t, o, Retention{Points: 1, Every: time.Hour})
			rng := rand.New(rand.NewPCG(13, 14))
			a, b := newTImage(8, "a.img"), newTImage(9, "b.img")
			ctx := context.Background()
			apply := func(crash bool) (string, error) {
				clock = clock.Add(time.Minute)
				gc := [16]byte{byte(rng.Uint32())}
				p1, na := a.cycle(t, s.cyc, rng, gc, clock, cycOpt{nOps: 30, resize: true})
				p2, nb := b.cycle(t, s.cyc, rng, gc, clock, cycOpt{nOps: 30})
				armed = crash
				res, err := s.rep.ApplyGroup(ctx, s.group, []string{p1, p2})
				armed = false
				if err == nil || errors.Is(err, errCrash) {
					a, b = na, nb
					if res.Point != "" {
						s.record(res.Point, a, b)
					}
				}
				return res.Point, err
			}
			apply(false)
			pinned, _ := apply(false)
			g, _ := s.rep.group(s.group)
			if _, err := s.rep.pinDurable(g, pinned, "test:crash"); err != nil {
				t.Fatal(err)
			}
			apply(false)
			_, err := apply(true) // retention merges 3-3 and 4-4 here
			if !errors.Is(err, errCrash) {
				t.Fatalf("apply with crash at %s: %v", stage, err)
			}
			s.reopen(ReplicaOptions{Now: o.Now})
			k := s.pointKinds()
			if k[pinned] != "pinned" || len(k) != 2 {
				t.Fatalf("after the crash: points %v, want %s pinned + latest", k, pinned)
			}
			s.check(true, true)
			if _, err := apply(false); err != nil {
				t.Fatal(err)
			}
			s.check(false, true)
		})
	}
}
