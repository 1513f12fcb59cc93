package applier

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

// TestInboxCollect: the inbox collection removes exactly the files of
// applied cycles (and of older generations), keeps every upload still
// needed, and removes files of unknown groups or images only once stale.
func TestInboxCollect(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := newTStore(t, ReplicaOptions{}, Retention{AnyPointWindow: time.Hour})
	inbox := filepath.Join(t.TempDir(), "inbox")
	srv, err := NewServer(s.rep, nil, inbox, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(5, 5))
	a := newTImage(21, "a.img")
	gdir := filepath.Join(inbox, s.group)
	os.MkdirAll(gdir, 0o700)
	name := func(ti *tImage, gen, seq uint64) string {
		return filepath.Join(gdir, fmt.Sprintf("%s-g%d-s%d.cyc", ti.idString(), gen, seq))
	}
	put := func(p string, size int, age time.Duration) {
		t.Helper()
		if err := os.WriteFile(p, make([]byte, size), 0o600); err != nil {
			t.Fatal(err)
		}
		mt := time.Now().Add(-age)
		os.Chtimes(p, mt, mt)
	}
	// Apply seq 0..2 of a from inbox files.
	now := time.Now()
	for i := 0; i < 3; i++ {
		p, na := a.cycle(t, s.cyc, rng, [16]byte{byte(i)}, now, cycOpt{nOps: 3})
		dst := name(na, na.gen, na.seq)
		copyFile(t, p, dst)
		if _, err := s.rep.Apply(ctx, s.group, dst); err != nil {
			t.Fatal(err)
		}
		a = na
	}
	stale := InboxStaleAge + time.Hour
	other := newTImage(22, "b.img")
	removed := []string{
		name(a, 1, 0), name(a, 1, 1), name(a, 1, 2), // applied (kept by the server until commit returns)
		name(a, 1, 2) + ".part", name(a, 1, 2) + ".part.hash", // a stale partial re-upload of an applied cycle
		name(a, 0, 7), // an older generation
		name(other, 1, 0) + ".part",
		filepath.Join(inbox, "gone", fmt.Sprintf("%s-g1-s3.cyc", other.idString())),
	}
	kept := []string{
		name(a, 1, 3), name(a, 1, 4) + ".part", name(a, 1, 4) + ".part.hash", // not applied yet
		name(a, 2, 0),     // a new generation's base, not committed yet
		name(other, 1, 1), // a new image's upload (fresh)
		filepath.Join(inbox, "newgroup", fmt.Sprintf("%s-g1-s0.cyc", other.idString())), // a new group's first upload
		filepath.Join(gdir, "notes.txt"),                                                // not an inbox file
	}
	os.MkdirAll(filepath.Join(inbox, "gone"), 0o700)
	os.MkdirAll(filepath.Join(inbox, "newgroup"), 0o700)
	for _, p := range removed {
		age := time.Duration(0)
		if filepath.Base(filepath.Dir(p)) == "gone" || slices.Contains([]string{name(other, 1, 0) + ".part"}, p) {
			age = stale
		}
		if _, err := os.Stat(p); err != nil {
			put(p, 1000, age)
		}
	}
	for _, p := range kept {
		put(p, 1000, 0)
	}
	got, err := srv.CollectInbox("")
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range removed {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("%s kept", p)
		}
	}
	for _, p := range kept {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("%s removed: %v", p, err)
		}
	}
	if got.Files != len(removed) {
		t.Errorf("collected %+v, want %d files", got, len(removed))
	}
	// The cycle of a pending apply stays, whatever the state says.
	p3 := name(a, 1, 3)
	c, na := a.cycle(t, s.cyc, rng, [16]byte{9}, now, cycOpt{nOps: 3})
	copyFile(t, c, p3)
	s.reopen(ReplicaOptions{testHook: func(st string) error {
		if st == "state-applied" {
			return errCrash
		}
		return nil
	}})
	srv.rep = s.rep
	if _, err := s.rep.Apply(ctx, s.group, p3); err == nil {
		t.Fatal("no crash")
	}
	if st, _, _ := s.rep.ImageState(s.group, a.idString()); st.Seq != na.seq {
		t.Fatalf("image state %+v", st)
	}
	if _, err := srv.CollectInbox(s.group); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(p3); err != nil {
		t.Fatalf("the cycle of the pending apply was removed: %v", err)
	}
}

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	out.Close()
}
