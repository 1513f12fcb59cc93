package applier

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// flipFirstData flips one bit of the first non-zero byte of path and returns
// its offset.
func flipFirstData(t *testing.T, path string) int64 {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	i := bytes.IndexFunc(b, func(r rune) bool { return r != 0 })
	if i < 0 {
		t.Fatalf("%s has no data", path)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt([]byte{b[i] ^ 0x10}, int64(i)); err != nil {
		t.Fatal(err)
	}
	return int64(i)
}

func scrubFindings(t *testing.T, rep *Replica, dir string) []ScrubFinding {
	t.Helper()
	sr, err := rep.Scrub(context.Background(), ScrubOptions{PreparedDir: func(string) string { return dir }})
	if err != nil {
		t.Fatal(err)
	}
	if sr.Groups != 1 || sr.Bytes == 0 {
		t.Fatalf("scrub report %+v", sr)
	}
	return sr.Findings
}

// TestScrubPreparedCopy: a warm-standby promotion copy (prepared, then
// brought forward) takes a bit flip. The scrub finds it (Critical, health
// reason), drops the copy, and the promotion copies the point from the store:
// the promoted image is the point's content, not the damaged copy.
func TestScrubPreparedCopy(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s, a, b, rng := foStore(t, ReplicaOptions{}, 21)
	dst := t.TempDir()
	if _, _, err := s.rep.PreparePromote(ctx, s.group, dst); err != nil {
		t.Fatal(err)
	}
	a, b = foApply(t, s, rng, 4, a, b, cycOpt{nOps: 8}, cycOpt{nOps: 8})
	if _, refreshed, err := s.rep.PreparePromote(ctx, s.group, dst); err != nil || !refreshed {
		t.Fatalf("refresh: %v %v", refreshed, err)
	}
	if fs := scrubFindings(t, s.rep, dst); len(fs) != 0 {
		t.Fatalf("clean store: findings %+v", fs)
	}
	if h, rs, _ := s.rep.ScrubHealth(s.group); h != "Normal" || len(rs) != 0 {
		t.Fatalf("clean store: health %s %v", h, rs)
	}
	if rep, err := s.rep.VerifyPrepared(ctx, s.group, dst, nil, false); err != nil || rep.Blocks == 0 || rep.Images != 2 {
		t.Fatalf("verify prepared: %+v %v", rep, err)
	}

	flipFirstData(t, filepath.Join(dst, b.idString()+".img.pre"))
	if rep, err := s.rep.VerifyPrepared(ctx, s.group, dst, nil, false); !errors.Is(err, ErrMismatch) || rep.Mismatch == nil || rep.Mismatch.Image != b.idString() {
		t.Fatalf("verify prepared after the flip: %+v %v", rep, err)
	}
	fs := scrubFindings(t, s.rep, dst)
	if len(fs) != 1 || fs[0].Severity != "Critical" || fs[0].What != "prepared" {
		t.Fatalf("findings %+v, want one Critical prepared", fs)
	}
	h, rs, _ := s.rep.ScrubHealth(s.group)
	if h != "Critical" || len(rs) != 1 || !strings.Contains(rs[0], "damaged") {
		t.Fatalf("health %s %v", h, rs)
	}
	if _, err := os.Stat(filepath.Join(dst, preparedFile)); !os.IsNotExist(err) {
		t.Fatalf("damaged prepared copy kept: %v", err)
	}
	if pins, _ := s.rep.Pins(s.group); len(pins) != 0 {
		t.Fatalf("pin of the dropped copy kept: %+v", pins)
	}
	want := exports(t, s.rep, s.group)
	ps, _ := s.rep.Points(s.group)
	latest := ps[len(ps)-1].ID
	out, err := s.rep.Promote(ctx, s.group, "", "unplanned", "", dst)
	if err != nil {
		t.Fatal(err)
	}
	for _, pi := range out {
		checkPromoted(t, pi, want[latest][pi.ID])
		if pi.Prepared {
			t.Errorf("image %s promoted from the damaged prepared copy", pi.ID)
		}
	}
}

// TestPreparePromoteCheckedRecopies: a planned failover's preparation re-reads
// the copy it brought forward; a damaged block makes it copy the point anew,
// and the promotion then promotes the right content.
func TestPreparePromoteCheckedRecopies(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s, a, b, rng := foStore(t, ReplicaOptions{}, 22)
	dst := t.TempDir()
	if _, _, err := s.rep.PreparePromote(ctx, s.group, dst); err != nil { // the warm standby
		t.Fatal(err)
	}
	_, _ = foApply(t, s, rng, 4, a, b, cycOpt{nOps: 8}, cycOpt{nOps: 8})
	flipFirstData(t, filepath.Join(dst, a.idString()+".img.pre"))
	pt, _, blocks, err := s.rep.PreparePromoteChecked(ctx, s.group, dst)
	if err != nil || blocks == 0 {
		t.Fatalf("prepare checked: %v (%d blocks)", err, blocks)
	}
	want := exports(t, s.rep, s.group)
	out, err := s.rep.Promote(ctx, s.group, pt, "planned", "hostA", dst)
	if err != nil {
		t.Fatal(err)
	}
	for _, pi := range out {
		checkPromoted(t, pi, want[pt][pi.ID])
	}
}

// TestScrubStoreDamage: a flipped bit in latest.img is Critical, in an undo
// log (older points) a Warning; a clean group stays Normal.
func TestScrubStoreDamage(t *testing.T) {
	t.Parallel()
	s, a, _, _ := foStore(t, ReplicaOptions{}, 23)
	idir := filepath.Join(s.dir, "groups", s.group, "images", a.idString())
	undos, _ := filepath.Glob(filepath.Join(idir, "undo", "*.undo"))
	var undo string
	for _, u := range undos {
		if st, _ := os.Stat(u); st.Size() > 8192 {
			undo = u
		}
	}
	if undo == "" {
		t.Fatalf("no undo log with data in %v", undos)
	}
	f, _ := os.OpenFile(undo, os.O_RDWR, 0)
	var c [1]byte
	f.ReadAt(c[:], 36+100) // inside the first data entry
	f.WriteAt([]byte{c[0] ^ 0x10}, 36+100)
	f.Close()
	fs := scrubFindings(t, s.rep, "")
	if len(fs) != 1 || fs[0].Severity != "Warning" || fs[0].What != "undo" {
		t.Fatalf("undo damage: findings %+v", fs)
	}
	flipFirstData(t, filepath.Join(idir, "latest.img"))
	fs = scrubFindings(t, s.rep, "")
	var crit bool
	for _, f := range fs {
		crit = crit || (f.Severity == "Critical" && f.What == "latest")
	}
	if !crit {
		t.Fatalf("latest damage: findings %+v", fs)
	}
	if h, _, _ := s.rep.ScrubHealth(s.group); h != "Critical" {
		t.Fatalf("health %s", h)
	}
}

// TestPromotionInterruptsPreparedVerify: a slow (throttled) verification of
// the prepared copy does not delay a promotion: the promotion interrupts it
// and uses the copy; the verification gives no verdict.
func TestPromotionInterruptsPreparedVerify(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s, _, _, _ := foStore(t, ReplicaOptions{}, 24)
	dst := t.TempDir()
	if _, _, err := s.rep.PreparePromote(ctx, s.group, dst); err != nil {
		t.Fatal(err)
	}
	done := stallVerify(ctx, s, dst, 5*time.Second)
	t0 := time.Now()
	out, err := s.rep.Promote(ctx, s.group, "", "unplanned", "", dst)
	if err != nil {
		t.Fatal(err)
	}
	if d := time.Since(t0); d > 3*time.Second {
		t.Errorf("promotion waited %s for the verification", d)
	}
	for _, pi := range out {
		if !pi.Prepared {
			t.Errorf("image %s not promoted from the prepared copy", pi.ID)
		}
	}
	if err := <-done; !errors.Is(err, errPreparedChanged) {
		t.Errorf("interrupted verification: %v", err)
	}
}

// TestScrubFindingsSurviveRestart: a Critical finding stays in the group's
// health after a reopen (scrub.json) until a later scrub finds the group
// clean; the schedule counts from the last complete scrub, also across a
// reopen.
func TestScrubFindingsSurviveRestart(t *testing.T) {
	t.Parallel()
	s, a, _, _ := foStore(t, ReplicaOptions{}, 25)
	due0, err := s.rep.ScrubDue(time.Hour)
	if err != nil || time.Until(due0) < 59*time.Minute {
		t.Fatalf("never-scrubbed store due %v (%v), want an interval from now", due0, err)
	}
	img := filepath.Join(s.dir, "groups", s.group, "images", a.idString(), "latest.img")
	off := flipFirstData(t, img)
	if fs := scrubFindings(t, s.rep, ""); len(fs) == 0 {
		t.Fatal("no finding")
	}
	last := s.rep.LastScrub()
	s.reopen(s.o)
	if h, rs, at := s.rep.ScrubHealth(s.group); h != "Critical" || len(rs) == 0 || at.IsZero() {
		t.Fatalf("after reopen: health %s %v at %v, want the Critical finding", h, rs, at)
	}
	if len(s.rep.ScrubFindings()) == 0 {
		t.Fatal("after reopen: ScrubFindings empty")
	}
	if due, _ := s.rep.ScrubDue(time.Hour); !s.rep.LastScrub().Equal(last) || !due.Equal(last.Add(time.Hour)) {
		t.Fatalf("after reopen: last scrub %v (was %v), due %v", s.rep.LastScrub(), last, due)
	}
	if gs, _ := s.rep.Status(); gs[0].Scrubbed.IsZero() {
		t.Fatal("status shows no scrub time")
	}
	// Repaired (flipped back): the next scrub clears it, also after a reopen.
	f, _ := os.OpenFile(img, os.O_RDWR, 0)
	var c [1]byte
	f.ReadAt(c[:], off)
	f.WriteAt([]byte{c[0] ^ 0x10}, off)
	f.Close()
	if fs := scrubFindings(t, s.rep, ""); len(fs) != 0 {
		t.Fatalf("findings after repair: %+v", fs)
	}
	s.reopen(s.o)
	if h, _, _ := s.rep.ScrubHealth(s.group); h != "Normal" {
		t.Fatalf("after a clean scrub and reopen: health %s", h)
	}
}

// TestPrepareNotBlockedByPreparedVerify: a warm standby refresh (a
// preparation after a new point) does not wait for a slow verification of
// the prepared copy; the verification ends with a verdict or none, never a
// false finding, and the refreshed copy stays.
func TestPrepareNotBlockedByPreparedVerify(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s, a, b, rng := foStore(t, ReplicaOptions{}, 26)
	dst := t.TempDir()
	if _, _, err := s.rep.PreparePromote(ctx, s.group, dst); err != nil {
		t.Fatal(err)
	}
	foApply(t, s, rng, 4, a, b, cycOpt{nOps: 24}, cycOpt{nOps: 24})
	done := stallVerify(ctx, s, dst, 4*time.Second)
	t0 := time.Now()
	pt, refreshed, err := s.rep.PreparePromote(ctx, s.group, dst)
	if err != nil || !refreshed {
		t.Fatalf("refresh: %s %v %v", pt, refreshed, err)
	}
	if d := time.Since(t0); d > 2*time.Second {
		t.Errorf("the refresh waited %s for the verification", d)
	}
	if err := <-done; err != nil && !errors.Is(err, errPreparedChanged) {
		t.Errorf("verification during a refresh: %v", err)
	}
	if _, err := s.rep.VerifyPrepared(ctx, s.group, dst, nil, false); err != nil {
		t.Errorf("the refreshed copy: %v", err)
	}
}

// TestCheckUndoFilePaced: the scrub's undo log check reads the file once,
// paced per chunk (never more than 1 MiB charged at once), and finds a
// flipped bit by the file hash.
func TestCheckUndoFilePaced(t *testing.T) {
	t.Parallel()
	s, a, _, _ := foStore(t, ReplicaOptions{}, 27)
	undos, _ := filepath.Glob(filepath.Join(s.dir, "groups", s.group, "images", a.idString(), "undo", "*.undo"))
	if len(undos) == 0 {
		t.Fatal("no undo log")
	}
	u := undos[len(undos)-1]
	st, _ := os.Stat(u)
	var paced int64
	pace := func(_ context.Context, n int64) error {
		if n > 1<<20 {
			t.Errorf("paced %d bytes at once", n)
		}
		paced += n
		return nil
	}
	if err := checkUndoFile(context.Background(), u, pace); err != nil {
		t.Fatal(err)
	}
	if paced != st.Size()-undoFooterSize {
		t.Errorf("paced %d bytes, read %d", paced, st.Size()-undoFooterSize)
	}
	f, _ := os.OpenFile(u, os.O_RDWR, 0)
	var c [1]byte
	f.ReadAt(c[:], 40)
	f.WriteAt([]byte{c[0] ^ 1}, 40)
	f.Close()
	if err := checkUndoFile(context.Background(), u, pace); !errors.Is(err, errUndoCorrupt) {
		t.Errorf("flipped bit: %v", err)
	}
}

// stallVerify starts a verification of the prepared copy in dst whose pacer
// stalls for up to stall at its first call (a slow, throttled scrub), and
// returns once it is stalled; done gets its result.
func stallVerify(ctx context.Context, s *tStore, dst string, stall time.Duration) (done chan error) {
	started := make(chan struct{})
	done = make(chan error, 1)
	var calls int
	go func() {
		_, err := s.rep.VerifyPrepared(ctx, s.group, dst, func(ctx context.Context, _ int64) error {
			if calls++; calls == 1 {
				close(started)
				select {
				case <-time.After(stall):
				case <-ctx.Done():
				}
			}
			return ctx.Err()
		}, true)
		done <- err
	}()
	<-started
	return done
}
