package daemon

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/standin/standin/applier"
	"github.com/standin/standin/internal/format"
)

// writeCycle writes a cycle of image id (name) with n random blocks.
func writeCycle(t *testing.T, dir string, rng *rand.Rand, id [16]byte, name string, seq uint64, gc [16]byte, cut time.Time, size uint64) string {
	t.Helper()
	h := format.Header{ImageID: id, Generation: 1, Seq: seq, Parent: seq - 1, CutTime: cut, ImageSize: size, GroupCut: gc, Name: name}
	if seq == 0 {
		h.Flags, h.Parent = format.FlagBase, format.NoParent
	}
	p := filepath.Join(dir, fmt.Sprintf("%x-%d.cyc", id[:4], seq))
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	w, err := format.NewWriter(f, h, format.WriterOptions{})
	if err != nil {
		t.Fatal(err)
	}
	nb := size / format.BlockSize
	used := map[uint64]bool{}
	var blocks []uint64
	for i := 0; i < 16; i++ {
		b := uint64(rng.IntN(int(nb)))
		if !used[b] {
			used[b] = true
			blocks = append(blocks, b)
		}
	}
	for b := uint64(0); b < nb; b++ {
		if used[b] {
			blk := make([]byte, format.BlockSize)
			for k := range blk {
				blk[k] = byte(rng.Uint32())
			}
			if err := w.WriteBlocks(b, blk); err != nil {
				t.Fatal(err)
			}
		}
	}
	if _, err := w.Close(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	return p
}

// TestExportPointDuringApplies: exporting the latest point of a group while
// cycles are applied always succeeds.
func TestExportPointDuringApplies(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	rep := openGroupVM1(t, dir)
	rng := rand.New(rand.NewPCG(3, 4))
	ida, idb := [16]byte{1}, [16]byte{2}
	ida[6], idb[6], ida[8], idb[8] = 0x40, 0x40, 0x80, 0x80
	cyc := t.TempDir()
	apply := func(seq uint64) {
		gc := [16]byte{byte(seq), 9}
		cut := time.Now()
		pa := writeCycle(t, cyc, rng, ida, "a.img", seq, gc, cut, 1<<20)
		pb := writeCycle(t, cyc, rng, idb, "b.img", seq, gc, cut, 512<<10)
		if _, err := rep.ApplyGroup(ctx, "vm1", []string{pa, pb}); err != nil {
			t.Error(err)
		}
		os.Remove(pa)
		os.Remove(pb)
	}
	apply(0)
	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for seq := uint64(1); ; seq++ {
			select {
			case <-stop:
				return
			default:
			}
			apply(seq)
		}
	}()
	for i := 0; i < 40; i++ {
		to := filepath.Join(dir, fmt.Sprintf("out%d", i))
		if _, err := ExportPoint(ctx, rep, ExportRequest{Group: "vm1", Point: "latest", To: to}); err != nil {
			t.Errorf("export %d: %v", i, err)
			break
		}
		os.RemoveAll(to)
	}
	close(stop)
	wg.Wait()
}

// openGroupVM1 opens a replica store under dir with an empty group vm1.
func openGroupVM1(t *testing.T, dir string) *applier.Replica {
	t.Helper()
	rep, err := applier.OpenReplica(filepath.Join(dir, "r"), applier.ReplicaOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rep.Close() })
	if err := rep.EnsureGroup("vm1", applier.Retention{}); err != nil {
		t.Fatal(err)
	}
	return rep
}
