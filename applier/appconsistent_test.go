package applier

import (
	"context"
	"errors"
	"math/rand/v2"
	"sync/atomic"
	"testing"
	"time"
)

// TestRetentionPrefersAppConsistent: the point kept for each Every-slot is
// the newest app-consistent point of the slot when it has one, else the
// newest point; the latest point is always kept; contents stay exact while
// undo logs are merged around the chosen points.
func TestRetentionPrefersAppConsistent(t *testing.T) {
	t.Parallel()
	start := time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)
	clock := start
	s := newTStore(t, ReplicaOptions{Now: func() time.Time { return clock }}, Retention{Points: 3, Every: time.Hour})
	rng := rand.New(rand.NewPCG(15, 16))
	a := newTImage(3, "disk.img")
	times := map[string]time.Time{}
	app := map[string]bool{}
	for i := 0; i < 36; i++ {
		clock = start.Add(time.Duration(i) * 10 * time.Minute)
		// app-consistent at minute 10 of every hour, and at minute 30 of every third hour
		isApp := i%6 == 1 || (i%18 == 3)
		p, na := a.cycle(t, s.cyc, rng, [16]byte{byte(i)}, clock, cycOpt{nOps: 12, app: isApp})
		res, err := s.rep.Apply(context.Background(), s.group, p)
		if err != nil {
			t.Fatal(err)
		}
		if res.AppConsistent != isApp {
			t.Fatalf("cycle %d: result app-consistent %v, want %v", i, res.AppConsistent, isApp)
		}
		a = na
		s.record(res.Point, a)
		times[res.Point], app[res.Point] = clock, isApp
		wantIDs := map[string]bool{res.Point: true}
		best := map[int64]string{}
		for id, tm := range times {
			slot := tm.Unix() / 3600
			if slot <= clock.Unix()/3600-3 {
				continue
			}
			cur, ok := best[slot]
			if !ok || (app[id] && !app[cur]) || (app[id] == app[cur] && times[cur].Before(tm)) {
				best[slot] = id
			}
		}
		for _, id := range best {
			wantIDs[id] = true
		}
		ps, err := s.rep.Points(s.group)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range ps {
			if !wantIDs[p.ID] {
				t.Fatalf("cycle %d: point %s (%s, app %v) kept, want only %v", i, p.ID, times[p.ID].Format("15:04"), app[p.ID], wantIDs)
			}
			if p.AppConsistent != app[p.ID] {
				t.Fatalf("point %s: app-consistent %v, want %v", p.ID, p.AppConsistent, app[p.ID])
			}
		}
		if len(ps) != len(wantIDs) {
			t.Fatalf("cycle %d: %d points, want %v", i, len(ps), wantIDs)
		}
		s.check(false, true)
	}
	// Every kept older slot whose hour had an app-consistent point keeps it.
	ps, _ := s.rep.Points(s.group)
	nApp := 0
	for _, p := range ps[:len(ps)-1] {
		if p.AppConsistent {
			nApp++
		}
	}
	if nApp < 2 {
		t.Errorf("kept %d app-consistent points of %d: %+v", nApp, len(ps), ps)
	}
}

// TestAppConsistentPointCrash: the app-consistent mark survives a crash at
// every step of the apply (the commit record carries it; a roll-forward
// records it), and a commit whose cycles are not all flagged is recorded
// crash-consistent.
func TestAppConsistentPointCrash(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	for n := 1; ; n++ {
		clock := time.Date(2026, 5, 1, 0, 0, 0, 0, time.UTC)
		var calls atomic.Int64
		var armed atomic.Bool
		o := ReplicaOptions{Now: func() time.Time { return clock }, testHook: func(string) error {
			if armed.Load() && calls.Add(1) == int64(n) {
				return errCrash
			}
			return nil
		}}
		s := newTStore(t, o, Retention{Points: 2, Every: 20 * time.Minute})
		rng := rand.New(rand.NewPCG(19, uint64(n)))
		a, b := newTImage(4, "a.img"), newTImage(5, "b.img")
		for i := 0; i < 5; i++ {
			clock = clock.Add(10 * time.Minute)
			gc := [16]byte{byte(i)}
			isApp := i == 3
			p1, na := a.cycle(t, s.cyc, rng, gc, clock, cycOpt{nOps: 8, app: isApp})
			p2, nb := b.cycle(t, s.cyc, rng, gc, clock, cycOpt{nOps: 8, app: isApp || i == 2}) // i == 2: only one image flagged
			armed.Store(isApp)
			res, err := s.rep.ApplyGroup(ctx, s.group, []string{p1, p2})
			armed.Store(false)
			if errors.Is(err, errCrash) {
				s.reopen(ReplicaOptions{Now: o.Now})
				res, err = s.rep.ApplyGroup(ctx, s.group, []string{p1, p2})
			}
			if err != nil {
				t.Fatalf("n=%d cycle %d: %v", n, i, err)
			}
			a, b = na, nb
			ps, err := s.rep.Points(s.group)
			if err != nil {
				t.Fatal(err)
			}
			last := ps[len(ps)-1]
			if last.Cycle != a.seq {
				t.Fatalf("n=%d cycle %d: latest point is of cycle %d (skipped %v)", n, i, last.Cycle, res.Skipped)
			}
			if last.AppConsistent != isApp {
				t.Fatalf("n=%d cycle %d: latest point app-consistent %v, want %v", n, i, last.AppConsistent, isApp)
			}
			s.record(last.ID, a, b)
		}
		s.check(false, true)
		s.rep.Close()
		if calls.Load() < int64(n) {
			t.Logf("crashed the app-consistent apply at each of its %d steps", n-1)
			break
		}
	}
}
