package tracker

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"testing"

	"github.com/standin/standin/internal/format"
)

// TestSeedCutFreezesWholeImage: a seed reads the whole allocated image as it
// was at the cut while writes, punches and a shrink go on; afterwards the next
// cycle is a delta on top of the seed holding exactly the changes since the cut.
func TestSeedCutFreezesWholeImage(t *testing.T) {
	s, dir := newStore(t, Options{})
	p := createImage(t, dir, "vm1.img", 64<<20)
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	im, err := s.Image("vm1.img")
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	data := make([]byte, 8<<20)
	for i := range data {
		data[i] = byte(rng.IntN(256))
	}
	write(t, im, f, data, 4<<20)          // 4..12 MiB
	write(t, im, f, data[:1<<20], 40<<20) // 40..41 MiB
	// A cycle already shipped: the seed must still hold the whole image.
	if _, err := s.Cut(context.Background(), []string{"vm1.img"}); err != nil {
		t.Fatal(err)
	}
	write(t, im, f, data[:4096], 50<<20)
	atCut, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}

	sd, err := s.SeedCut([]string{"vm1.img"})
	if err != nil {
		t.Fatal(err)
	}
	si := sd.Images[0]
	if si.Seq() != 1 || si.Size() != 64<<20 {
		t.Fatalf("seed seq %d size %d, want 1 and 64 MiB", si.Seq(), si.Size())
	}
	if _, err := s.Cut(context.Background(), []string{"vm1.img"}); !errors.Is(err, ErrSeeding) {
		t.Fatalf("cut during a seed: %v, want ErrSeeding", err)
	}
	// Changes during the export: overwrite, punch (as zero write) and a write into a hole.
	junk := bytes.Repeat([]byte{0xee}, 1<<20)
	write(t, im, f, junk, 6<<20)
	write(t, im, f, junk, 30<<20)
	write(t, im, f, junk[:8192], 40<<20+4096)

	got := make([]byte, len(atCut))
	exts, _ := si.DataExtents()
	for _, e := range exts {
		for off := e[0]; off < e[0]+e[1]; off += 1 << 20 {
			n := min(int64(1<<20), e[0]+e[1]-off)
			if _, err := si.ReadAt(got[off:off+n], off); err != nil {
				t.Fatal(err)
			}
		}
	}
	if !bytes.Equal(got, atCut) {
		t.Fatal("seed content differs from the image at the cut")
	}
	if si.CBWBlocks() == 0 {
		t.Fatal("no copy-before-write happened although frozen blocks were overwritten")
	}
	if _, err := si.ReadAt(got[4<<20:4<<20+4096], 4<<20); err == nil {
		t.Fatal("a second read of a released block returned data")
	}
	if err := sd.Commit(); err != nil {
		t.Fatal(err)
	}
	infos, err := s.Cut(context.Background(), []string{"vm1.img"})
	if err != nil {
		t.Fatal(err)
	}
	c := infos[0]
	if c.Seq != 2 || c.Base {
		t.Fatalf("cycle after the seed: seq %d base %v, want delta seq 2", c.Seq, c.Base)
	}
	cf, err := os.Open(c.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer cf.Close()
	r, err := format.Open(cf, c.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if r.Header().Parent != 1 {
		t.Fatalf("parent %d, want the seed's seq 1", r.Header().Parent)
	}
	// 256 + 256 + 2 blocks written during the seed; the earlier 50 MiB write is in the seed.
	if got := c.DataBlocks; got != 514 {
		t.Fatalf("catch-up cycle has %d blocks, want 514", got)
	}
	if cs, _ := Cycles(dir, "vm1.img"); len(cs) != 1 {
		t.Fatalf("%d staged cycles, want 1 (the seed supersedes the earlier one)", len(cs))
	}
}

// TestSeedAbortKeepsChanges: an aborted seed (export failed) leaves the
// sequence alone and returns the changes frozen at the cut to the dirty map.
func TestSeedAbortKeepsChanges(t *testing.T) {
	s, dir := newStore(t, Options{})
	p := createImage(t, dir, "a.img", 16<<20)
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	im, _ := s.Image("a.img")
	if _, err := s.Cut(context.Background(), []string{"a.img"}); err != nil {
		t.Fatal(err)
	}
	write(t, im, f, bytes.Repeat([]byte{1}, 8192), 1<<20)
	sd, err := s.SeedCut(nil)
	if err != nil {
		t.Fatal(err)
	}
	write(t, im, f, bytes.Repeat([]byte{2}, 4096), 2<<20)
	sd.Abort()
	infos, err := s.Cut(context.Background(), []string{"a.img"})
	if err != nil {
		t.Fatal(err)
	}
	if infos[0].Seq != 1 || infos[0].DataBlocks != 3 {
		t.Fatalf("after abort: seq %d blocks %d, want seq 1 with 3 blocks", infos[0].Seq, infos[0].DataBlocks)
	}
}

// TestSeedCrashKeepsChanges (I1 on the seed path): a crash while a seed
// export is open loses neither the changes frozen at the seed's cut (they
// left the dirty map at the cut) nor the writes made during the export, and
// the sequence does not advance.
func TestSeedCrashKeepsChanges(t *testing.T) {
	s, dir := newStore(t, Options{})
	p := createImage(t, dir, "a.img", 64<<20)
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	im, _ := s.Image("a.img")
	if _, err := s.Cut(context.Background(), []string{"a.img"}); err != nil {
		t.Fatal(err)
	}
	write(t, im, f, bytes.Repeat([]byte{1}, 8192), 1<<20)
	if _, err := s.SeedCut([]string{"a.img"}); err != nil {
		t.Fatal(err)
	}
	write(t, im, f, bytes.Repeat([]byte{2}, 4096), 40<<20)
	// Two checkpoints retire every write-intent extent (hysteresis): after
	// the crash only the checkpointed dirty map can hold the blocks.
	for i := 0; i < 2; i++ {
		if err := im.Checkpoint(); err != nil {
			t.Fatal(err)
		}
	}
	s.crashForTest()
	s2, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	im2, err := s2.Image("a.img")
	if err != nil {
		t.Fatal(err)
	}
	got := blocksOf(im2)
	for _, b := range []uint32{256, 257, 10240} {
		if !got.Contains(b) {
			t.Errorf("block %d missing from the dirty set after a crash during a seed export (dirty %v)", b, got.ToArray())
		}
	}
	infos, err := s2.Cut(context.Background(), []string{"a.img"})
	if err != nil {
		t.Fatal(err)
	}
	if infos[0].Seq != 1 {
		t.Errorf("cut after the crash has seq %d, want 1 (the seed never committed)", infos[0].Seq)
	}
}
