package tracker

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/RoaringBitmap/roaring/v2"
	"github.com/google/uuid"
	"golang.org/x/sys/unix"

	"github.com/standin/standin/internal/format"
)

func mustImage(t *testing.T, s *Store, name string) *Image {
	t.Helper()
	im, err := s.Image(name)
	if err != nil {
		t.Fatal(err)
	}
	return im
}

func reopen(t *testing.T, s *Store, dir string) *Store {
	t.Helper()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s2, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s2.Close() })
	return s2
}

func wantFenced(t *testing.T, im *Image) {
	t.Helper()
	if _, err := im.BeginWrite(0, 4096); !errors.Is(err, ErrFenced) || !errors.Is(err, syscall.EROFS) {
		t.Fatalf("BeginWrite on a fenced image: %v, want ErrFenced (EROFS)", err)
	}
	if _, err := im.BeginPunch(0, 4096); !errors.Is(err, ErrFenced) {
		t.Fatalf("BeginPunch on a fenced image: %v", err)
	}
	if _, err := im.BeginResize(0); !errors.Is(err, ErrFenced) {
		t.Fatalf("BeginResize on a fenced image: %v", err)
	}
}

func TestFenceSurvivesRestartAndUnfence(t *testing.T) {
	s, dir := newStore(t, Options{})
	createImage(t, dir, "a.img", 1<<20)
	createImage(t, dir, "b.img", 1<<20)
	im := mustImage(t, s, "a.img")
	if err := s.Fence([]string{"a.img"}, "failover to\nhost2", false); err != nil {
		t.Fatal(err)
	}
	if err := s.Fence([]string{"a.img"}, "failover to host2", false); err != nil { // idempotent
		t.Fatalf("second fence: %v", err)
	}
	wantFenced(t, im)
	if im.FencedReason() != "failover to host2" {
		t.Fatalf("reason %q", im.FencedReason())
	}
	// b.img is not named: untouched.
	end, err := mustImage(t, s, "b.img").BeginWrite(0, 4096)
	if err != nil {
		t.Fatalf("unfenced image refused: %v", err)
	}
	end()
	// A cut (the final cut of a planned failover) still works.
	if _, err := s.Cut(context.Background(), []string{"a.img"}); err != nil {
		t.Fatalf("cut of a fenced image: %v", err)
	}

	s = reopen(t, s, dir)
	im = mustImage(t, s, "a.img")
	if !im.Fenced() {
		t.Fatal("fence lost across a restart")
	}
	wantFenced(t, im)
	var st Status
	for _, x := range s.Status(false) {
		if x.Name == "a.img" {
			st = x
		} else if x.Fenced {
			t.Fatalf("%s reported fenced", x.Name)
		}
	}
	if !st.Fenced || st.FencedReason != "failover to host2" {
		t.Fatalf("status: fenced %v reason %q", st.Fenced, st.FencedReason)
	}

	if err := s.Unfence([]string{"a.img"}); err != nil {
		t.Fatal(err)
	}
	if im.Fenced() || im.FencedReason() != "" {
		t.Fatal("still fenced after Unfence")
	}
	end, err = im.BeginWrite(0, 4096)
	if err != nil {
		t.Fatalf("write after Unfence: %v", err)
	}
	end()
	s = reopen(t, s, dir)
	if mustImage(t, s, "a.img").Fenced() {
		t.Fatal("unfence lost across a restart")
	}
}

// TestFenceWaitsForInFlightMutations: Fence takes the barrier, so it returns
// only after a mutation in flight ended, and none starts after it.
func TestFenceWaitsForInFlightMutations(t *testing.T) {
	s, dir := newStore(t, Options{})
	createImage(t, dir, "a.img", 1<<20)
	im := mustImage(t, s, "a.img")
	end, err := im.BeginWrite(0, 4096)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Fence([]string{"a.img"}, "x", true) }()
	// The fence file is written before the barrier is taken.
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := os.Stat(filepath.Join(im.dir, fencedFile)); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("fence file not written while a mutation is in flight")
		}
		time.Sleep(5 * time.Millisecond)
	}
	select {
	case err := <-done:
		t.Fatalf("Fence returned (%v) while a mutation was in flight", err)
	case <-time.After(200 * time.Millisecond):
	}
	end()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	wantFenced(t, im)
}

func TestFenceRefusesOpenForWrite(t *testing.T) {
	s, dir := newStore(t, Options{})
	createImage(t, dir, "a.img", 1<<20)
	createImage(t, dir, "b.img", 1<<20)
	a, b := mustImage(t, s, "a.img"), mustImage(t, s, "b.img")
	a.Opened(false) // a reader does not count
	b.Opened(true)
	b.Opened(true)
	if a.WriteOpens() != 0 || b.WriteOpens() != 2 {
		t.Fatalf("write opens %d/%d, want 0/2", a.WriteOpens(), b.WriteOpens())
	}
	err := s.Fence([]string{"a.img", "b.img"}, "x", false)
	if !errors.Is(err, ErrOpenForWrite) || !strings.Contains(err.Error(), "b.img (2 write handles)") {
		t.Fatalf("fence with b.img open for writing: %v", err)
	}
	for _, im := range []*Image{a, b} {
		if im.Fenced() {
			t.Fatalf("%s fenced although Fence refused", im.Name())
		}
		if _, err := os.Stat(filepath.Join(im.dir, fencedFile)); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("%s: fence file written although Fence refused: %v", im.Name(), err)
		}
		end, err := im.BeginWrite(0, 4096)
		if err != nil {
			t.Fatal(err)
		}
		end()
	}
	if err := s.Fence([]string{"a.img", "b.img"}, "x", true); err != nil {
		t.Fatalf("forced fence: %v", err)
	}
	wantFenced(t, a)
	wantFenced(t, b)
	b.Closed(true)
	b.Closed(true)
	a.Closed(false)
	if b.WriteOpens() != 0 {
		t.Fatalf("write opens %d after close", b.WriteOpens())
	}
}

func TestRelease(t *testing.T) {
	s, dir := newStore(t, Options{})
	p := createImage(t, dir, "a.img", 1<<20)
	createImage(t, dir, "b.img", 1<<20)
	im := mustImage(t, s, "a.img")
	mustImage(t, s, "b.img")
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	write(t, im, f, bytes.Repeat([]byte{1}, 8192), 0)
	if _, err := s.Cut(context.Background(), []string{"a.img"}); err != nil {
		t.Fatal(err)
	}
	write(t, im, f, bytes.Repeat([]byte{2}, 4096), 65536)
	want, _ := os.ReadFile(p)
	id, gen, next := im.ID(), im.Generation(), im.NextSeq()
	dst := filepath.Join(dir, "released.img")

	if _, _, _, err := s.Release("a.img", dst); err == nil {
		t.Fatal("Release of an unfenced image succeeded")
	}
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("refused Release moved the image: %v", err)
	}
	if err := s.Fence([]string{"a.img"}, "x", false); err != nil {
		t.Fatal(err)
	}
	if _, _, _, err := s.Release("a.img", filepath.Join(dir, "images", "b.img")); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("Release onto an existing file: %v", err)
	}
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() && !sameFS(t, "/dev/shm", dir) {
		_, _, _, err := s.Release("a.img", filepath.Join("/dev/shm", "standin-test-"+uuid.NewString()))
		if !errors.Is(err, syscall.EXDEV) {
			t.Fatalf("Release to another filesystem: %v, want EXDEV", err)
		}
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("Release with EXDEV moved the image: %v", err)
		}
	}

	gid, ggen, gnext, err := s.Release("a.img", dst)
	if err != nil {
		t.Fatal(err)
	}
	if gid != id || ggen != gen || gnext != next || next != 1 {
		t.Fatalf("Release returned %v/%d/%d, want %v/%d/%d (next 1)", gid, ggen, gnext, id, gen, next)
	}
	if _, err := os.Stat(p); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("image still in the images dir: %v", err)
	}
	if got, err := os.ReadFile(dst); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("released file: %v (content equal %v)", err, bytes.Equal(got, want))
	}
	if _, err := unix.Getxattr(dst, xattrID, make([]byte, 64)); !errors.Is(err, unix.ENODATA) {
		t.Fatalf("xattr on the released file: %v, want ENODATA", err)
	}
	for _, d := range []string{filepath.Join(dir, "state", id.String()), filepath.Join(dir, "cycles", id.String())} {
		if _, err := os.Stat(d); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("%s still there after Release: %v", d, err)
		}
	}
	for _, st := range s.Status(false) {
		if st.ID == id.String() || st.Name == "a.img" {
			t.Fatalf("released image in status: %+v", st)
		}
	}
	if len(s.Status(false)) != 1 {
		t.Fatalf("status: %+v", s.Status(false))
	}
	// The stale handle keeps refusing mutations; a checkpoint is a no-op.
	wantFenced(t, im)
	if err := im.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	s = reopen(t, s, dir)
	if _, err := os.Stat(filepath.Join(dir, "state", id.String())); !errors.Is(err, fs.ErrNotExist) {
		t.Fatal("state of the released image recreated")
	}
}

func sameFS(t *testing.T, a, b string) bool {
	var sa, sb unix.Stat_t
	if unix.Stat(a, &sa) != nil || unix.Stat(b, &sb) != nil {
		t.Fatal("stat")
	}
	return sa.Dev == sb.Dev
}

// TestReleaseCrashAfterRename: a crash after the rename leaves the state of
// a fenced image without its image; the next Open removes it.
func TestReleaseCrashAfterRename(t *testing.T) {
	s, dir := newStore(t, Options{})
	p := createImage(t, dir, "a.img", 1<<20)
	im := mustImage(t, s, "a.img")
	if err := s.Fence([]string{"a.img"}, "x", true); err != nil {
		t.Fatal(err)
	}
	state := im.dir
	s.crashForTest()
	if err := os.Rename(p, filepath.Join(dir, "moved.img")); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(state, fencedFile)); err != nil {
		t.Fatal(err)
	}
	s2, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if _, err := os.Stat(state); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("orphan state of a fenced, released image not removed: %v", err)
	}
}

// cycleBlocks returns the header of the cycle file at p and every block it carries.
func cycleBlocks(t *testing.T, p string) (format.Header, *roaring.Bitmap) {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, _ := f.Stat()
	r, err := format.Open(f, st.Size())
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Verify(); err != nil {
		t.Fatal(err)
	}
	b := roaring.New()
	for _, e := range r.Extents() {
		b.AddRange(e.Start, e.End())
	}
	return r.Header(), b
}

func TestAdopt(t *testing.T) {
	s, dir := newStore(t, Options{})
	src := filepath.Join(dir, "incoming.img")
	content := bytes.Repeat([]byte("standin!"), (4<<20)/8)
	if err := os.WriteFile(src, content, 0o600); err != nil {
		t.Fatal(err)
	}
	id := uuid.New()
	const gen, next = 3, 17
	// Stale staged cycles of the id (a release interrupted by a crash) must
	// neither advance the sequence nor stay to be shipped.
	stale := filepath.Join(dir, "cycles", id.String())
	os.MkdirAll(stale, 0o700)
	os.WriteFile(filepath.Join(stale, cycleFileName(gen, 99)), []byte("stale"), 0o600)

	im, err := s.Adopt("vm/a.img", src, id, gen, next, false)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "images", "vm", "a.img")
	if _, err := os.Stat(src); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("source still there: %v", err)
	}
	if got, _ := os.ReadFile(p); !bytes.Equal(got, content) {
		t.Fatal("adopted content differs")
	}
	gotID, gotGen, ok := readID(p)
	if !ok || gotID != id || gotGen != gen {
		t.Fatalf("xattr: %v %v/%d", ok, gotID, gotGen)
	}
	check := func(s *Store, im *Image, nextSeq uint64) {
		t.Helper()
		st := im.Status(false)
		if st.ID != id.String() || st.Generation != gen || st.NextSeq != nextSeq || im.NextSeq() != nextSeq ||
			st.DirtyBlocks != 0 || st.UncleanRecovery || st.Fenced || st.Name != "vm/a.img" {
			t.Fatalf("status after adopt: %+v", st)
		}
		if same, _ := s.Image("vm/a.img"); same != im {
			t.Fatal("Image(name) does not return the adopted image")
		}
	}
	check(s, im, next)
	if _, err := os.Stat(stale); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("stale cycles kept: %v", err)
	}

	// A restart keeps the identity and the sequence, and is clean.
	s = reopen(t, s, dir)
	im = mustImage(t, s, "vm/a.img")
	check(s, im, next)

	// The next cut is a delta continuing at next-1 with exactly the blocks
	// written since the adoption.
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	write(t, im, f, bytes.Repeat([]byte{7}, 4096), 5*BlockSize)
	write(t, im, f, bytes.Repeat([]byte{8}, 100), 300*BlockSize+10)
	cs, err := s.Cut(context.Background(), []string{"vm/a.img"})
	if err != nil {
		t.Fatal(err)
	}
	if len(cs) != 1 || cs[0].Base || cs[0].Seq != next || cs[0].Generation != gen || cs[0].ID != id.String() {
		t.Fatalf("cut after adopt: %+v", cs)
	}
	h, blocks := cycleBlocks(t, cs[0].Path)
	if h.Flags&format.FlagBase != 0 || h.Seq != next || h.Parent != next-1 || h.Generation != gen || uuid.UUID(h.ImageID) != id {
		t.Fatalf("cycle header: %+v", h)
	}
	if want := roaring.BitmapOf(5, 300); !blocks.Equals(want) {
		t.Fatalf("cycle carries blocks %v, want %v", blocks.ToArray(), want.ToArray())
	}
	s = reopen(t, s, dir)
	im = mustImage(t, s, "vm/a.img")
	if st := im.Status(false); st.NextSeq != next+1 || st.Generation != gen || st.ID != id.String() || st.UncleanRecovery {
		t.Fatalf("after cut and restart: %+v", st)
	}
}

func TestAdoptFenced(t *testing.T) {
	s, dir := newStore(t, Options{})
	src := filepath.Join(dir, "in.img")
	os.WriteFile(src, []byte("x"), 0o600)
	im, err := s.Adopt("a.img", src, uuid.New(), 1, 1, true)
	if err != nil {
		t.Fatal(err)
	}
	wantFenced(t, im)
	s = reopen(t, s, dir)
	wantFenced(t, mustImage(t, s, "a.img"))
}

func TestAdoptRefuses(t *testing.T) {
	s, dir := newStore(t, Options{})
	createImage(t, dir, "a.img", 1<<20)
	tracked := mustImage(t, s, "a.img")
	src := filepath.Join(dir, "in.img")
	if err := os.WriteFile(src, []byte("data"), 0o600); err != nil {
		t.Fatal(err)
	}
	id := uuid.New()
	for _, c := range []struct {
		what, name, src string
		id              uuid.UUID
		next            uint64
	}{
		{"name exists", "a.img", src, id, 5},
		{"id tracked", "b.img", src, tracked.ID(), 5},
		{"next seq 0", "b.img", src, id, 0},
		{"source in images", "b.img", filepath.Join(dir, "images", "a.img"), id, 5},
		{"bad name", "../b.img", src, id, 5},
		{"no source", "b.img", src + ".missing", id, 5},
	} {
		if _, err := s.Adopt(c.name, c.src, c.id, 1, c.next, false); err == nil {
			t.Fatalf("%s: Adopt succeeded", c.what)
		}
		if got, err := os.ReadFile(src); err != nil || string(got) != "data" {
			t.Fatalf("%s: source changed: %v", c.what, err)
		}
		if _, err := unix.Getxattr(src, xattrID, make([]byte, 64)); !errors.Is(err, unix.ENODATA) {
			t.Fatalf("%s: xattr set on the source: %v", c.what, err)
		}
		if _, err := os.Stat(filepath.Join(dir, "state", id.String())); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("%s: state created", c.what)
		}
		if _, err := os.Stat(filepath.Join(dir, "images", "b.img")); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("%s: image created", c.what)
		}
	}
	if st := tracked.Status(false); st.Generation != 1 || st.Fenced {
		t.Fatalf("tracked image changed: %+v", st)
	}
	if n := len(s.Status(false)); n != 1 {
		t.Fatal(fmt.Sprint("status has ", n, " images"))
	}
}

// TestMarkDirty: blocks a failback found different are durably dirty (they
// survive a crash before the next cut) and the next cut carries them;
// Changed reports the dirty map.
func TestMarkDirty(t *testing.T) {
	s, dir := newStore(t, Options{})
	p := filepath.Join(dir, "images", "a.img")
	if err := os.WriteFile(p, bytes.Repeat([]byte{1}, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	im := mustImage(t, s, "a.img")
	if _, err := s.Cut(context.Background(), []string{"a.img"}); err != nil {
		t.Fatal(err)
	}
	if c := im.Changed(); !c.IsEmpty() {
		t.Fatalf("changed after a cut: %v", c.ToArray())
	}
	want := roaring.BitmapOf(3, 4, 200)
	if err := im.MarkDirty(want); err != nil {
		t.Fatal(err)
	}
	if c := im.Changed(); !c.Equals(want) {
		t.Fatalf("changed %v, want %v", c.ToArray(), want.ToArray())
	}
	s.crashForTest()
	s = reopen(t, s, dir)
	im = mustImage(t, s, "a.img")
	if c := im.Changed(); !c.Contains(3) || !c.Contains(4) || !c.Contains(200) {
		t.Fatalf("marked blocks lost by a crash: %v", c.ToArray())
	}
	infos, err := s.Cut(context.Background(), []string{"a.img"})
	if err != nil {
		t.Fatal(err)
	}
	if infos[0].DataBlocks < 3 {
		t.Fatalf("the cut after MarkDirty carries %d data blocks, want the 3 marked", infos[0].DataBlocks)
	}
}
