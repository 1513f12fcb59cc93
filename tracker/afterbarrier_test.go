package tracker

import (
	"bytes"
	"context"
	"os"
	"testing"
	"time"

	"github.com/standin/standin/internal/format"
)

// TestCutAfterBarrier: AfterBarrier runs once, after every image's write
// barrier is released and before staging: a tracked write from inside it
// does not block and is not part of the cut (it lands in the next one), and
// the cycles of an AppConsistent cut carry FlagAppConsistent.
func TestCutAfterBarrier(t *testing.T) {
	s, dir := newStore(t, Options{StageDelay: 50 * time.Millisecond})
	p := createImage(t, dir, "a.img", 4<<20)
	createImage(t, dir, "b.img", 4<<20)
	im, err := s.Image("a.img")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Image("b.img"); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	old := bytes.Repeat([]byte{1}, 4096)
	write(t, im, f, old, 0)
	calls := 0
	var wrote time.Time
	infos, err := s.CutWith(context.Background(), []string{"a.img", "b.img"}, CutOptions{AppConsistent: true, AfterBarrier: func() {
		calls++
		done := make(chan struct{})
		go func() {
			write(t, im, f, bytes.Repeat([]byte{2}, 4096), 0) // after the cut: copy-before-write keeps the old block
			close(done)
		}()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Error("a write from AfterBarrier blocked: the barrier is still held")
		}
		wrote = time.Now()
	}})
	if err != nil {
		t.Fatal(err)
	}
	if calls != 1 {
		t.Fatalf("AfterBarrier called %d times", calls)
	}
	for _, ci := range infos {
		if !ci.AppConsistent {
			t.Errorf("%s: not app-consistent", ci.Image)
		}
		if !wrote.After(ci.Time) {
			t.Errorf("AfterBarrier ran at %s, before the cut %s", wrote, ci.Time)
		}
		g, err := os.Open(ci.Path)
		if err != nil {
			t.Fatal(err)
		}
		st, _ := g.Stat()
		r, err := format.Open(g, st.Size())
		if err != nil {
			t.Fatal(err)
		}
		if r.Header().Flags&format.FlagAppConsistent == 0 {
			t.Errorf("%s: header flags %#x", ci.Path, r.Header().Flags)
		}
		if ci.Image == "a.img" {
			exts := r.Extents()
			if len(exts) == 0 || exts[0].Start != 0 || exts[0].Kind != format.KindData {
				t.Fatalf("extents %+v, want block 0 as data", exts)
			}
			blk, err := r.ReadExtent(0, nil)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(blk[:4096], old) {
				t.Error("the write made from AfterBarrier is in the cut")
			}
		}
		g.Close()
	}
	if !blocksOf(im).Contains(0) {
		t.Error("the write made from AfterBarrier is not dirty for the next cut")
	}
	// A plain cut is not flagged; AfterBarrier is optional.
	infos, err = s.CutWith(context.Background(), []string{"a.img"}, CutOptions{})
	if err != nil || infos[0].AppConsistent {
		t.Fatalf("plain cut: %v %+v", err, infos)
	}
}
