package tracker

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"testing"
	"time"

	"github.com/standin/standin/internal/format"
)

// rebuildBase applies a base cycle to an empty image and returns the content.
func rebuildBase(t *testing.T, path string) ([]byte, format.Header) {
	t.Helper()
	f, err := os.Open(path)
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
	h := r.Header()
	out := make([]byte, h.ImageSize)
	for i, e := range r.Extents() {
		if e.Kind != format.KindData {
			continue
		}
		d, err := r.ReadExtent(i, nil)
		if err != nil {
			t.Fatal(err)
		}
		copy(out[e.Start*BlockSize:], d)
	}
	return out, h
}

// TestBaseCutContinuesChain: CutOptions.Base stages every allocated block
// (plus the dirty ones) as a base cycle with parent seq−1, exactly as the
// image was at the cut although allocated, clean blocks are overwritten
// while it is staged; afterwards only real changes are dirty, and a failed
// base cut returns only the dirty blocks.
func TestBaseCutContinuesChain(t *testing.T) {
	s, dir := newStore(t, Options{StageDelay: 40 * time.Millisecond})
	p := createImage(t, dir, "a.img", 16<<20)
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	im, err := s.Image("a.img")
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(3, 3))
	data := make([]byte, 2<<20)
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	write(t, im, f, data, 4<<20)
	ctx := context.Background()
	if _, err := s.Cut(ctx, []string{"a.img"}); err != nil {
		t.Fatal(err)
	}
	write(t, im, f, data[:4096], 8<<20) // the only dirty block
	atCut, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}

	// A failed base cut gives back only the dirty block.
	cd := s.cycleDir(im.ID())
	if err := os.Rename(cd, cd+".x"); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(cd, nil, 0o600)
	if _, err := s.CutWith(ctx, []string{"a.img"}, CutOptions{Base: true}); err == nil {
		t.Fatal("base cut succeeded without a cycle directory")
	}
	if got := blocksOf(im).GetCardinality(); got != 1 {
		t.Fatalf("after a failed base cut %d blocks dirty, want 1", got)
	}
	os.Remove(cd)
	os.Rename(cd+".x", cd)

	done := make(chan error, 1)
	var infos []CycleInfo
	go func() {
		var err error
		infos, err = s.CutWith(ctx, []string{"a.img"}, CutOptions{Base: true, Compress: true})
		done <- err
	}()
	for {
		im.mu.Lock()
		staging := im.stage != nil
		im.mu.Unlock()
		if staging {
			break
		}
		time.Sleep(time.Millisecond)
	}
	junk := bytes.Repeat([]byte{0xee}, 64<<10)
	write(t, im, f, junk, 5<<20)  // allocated, clean: copy-before-write must save it
	write(t, im, f, junk, 12<<20) // a hole
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	c := infos[0]
	got, h := rebuildBase(t, c.Path)
	if !c.Base || c.Seq != 1 || h.Parent != 0 || !h.Base() {
		t.Fatalf("base cut: %+v parent %d", c, h.Parent)
	}
	if !bytes.Equal(got, atCut) {
		t.Fatal("base cycle differs from the image at the cut")
	}
	if c.DataBlocks != 512+1 || c.CBWBlocks == 0 {
		t.Fatalf("base cycle has %d data blocks (want 513), %d copied before write", c.DataBlocks, c.CBWBlocks)
	}
	if got := blocksOf(im).GetCardinality(); got != 32 {
		t.Fatalf("after the base cut %d blocks dirty, want the 32 written during it", got)
	}
	// The next cut is an ordinary delta on top of it.
	infos, err = s.Cut(ctx, []string{"a.img"})
	if err != nil || infos[0].Base || infos[0].Seq != 2 || infos[0].DataBlocks != 32 {
		t.Fatalf("cut after the base: %+v %v", infos, err)
	}
}
