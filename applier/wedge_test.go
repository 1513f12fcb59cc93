package applier

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/zeebo/blake3"

	"github.com/standin/standin/internal/format"
)

// writeSizedCycle writes the next delta of ti claiming an image of size
// bytes, with one data block at block 0 (no model: the size may be absurd).
func writeSizedCycle(t *testing.T, dir string, ti *tImage, size uint64, gc byte) string {
	t.Helper()
	h := format.Header{ImageID: ti.id, Generation: ti.gen, Seq: ti.seq + 1, Parent: ti.seq, CutTime: time.Now(),
		ImageSize: size, GroupCut: [16]byte{gc, 0x5e}, Name: ti.name}
	p := filepath.Join(dir, fmt.Sprintf("%s-g%d-s%d-size%d.cyc", ti.idString(), h.Generation, h.Seq, size))
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w, err := format.NewWriter(f, h, format.WriterOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.WriteBlocks(0, bytes.Repeat([]byte{0xab}, format.BlockSize)); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return p
}

// storeSnapshot hashes every file of the store (but the lock).
func storeSnapshot(dir string) string {
	var sb strings.Builder
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() && filepath.Base(p) != "lock" && filepath.Base(p) != "chunks.db" {
			b, _ := os.ReadFile(p)
			fmt.Fprintf(&sb, "%s %d %x\n", p, fi.Size(), blake3.Sum256(b))
		}
		return nil
	})
	return sb.String()
}

// TestHugeImageRefusedBeforeCommit: a cycle claiming an image of 2^62 bytes
// (or just over 16 TiB) is refused before the commit record: the store is
// unchanged, nothing is pending, and the group goes on replicating.
func TestHugeImageRefusedBeforeCommit(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := newTStore(t, ReplicaOptions{}, Retention{AnyPointWindow: time.Hour})
	rng := rand.New(rand.NewPCG(62, 62))
	a := newTImage(62, "a.img")
	now := time.Now()
	p0, a0 := a.cycle(t, s.cyc, rng, [16]byte{1}, now, cycOpt{})
	res, err := s.rep.Apply(ctx, s.group, p0)
	if err != nil {
		t.Fatal(err)
	}
	s.record(res.Point, a0)
	before := storeSnapshot(s.dir)
	for i, size := range []uint64{1 << 62, MaxImageSize + 1, ^uint64(0) - format.BlockSize} {
		bad := writeSizedCycle(t, s.cyc, a0, size, byte(10+i))
		for try := 0; try < 2; try++ {
			_, err := s.rep.Apply(ctx, s.group, bad)
			if !errors.Is(err, ErrUnholdable) || !strings.Contains(err.Error(), "16 TiB") {
				t.Fatalf("size %d: got %v, want a refusal naming the 16 TiB limit", size, err)
			}
			if he := classify(err); he.status != 422 || he.code != "refused" {
				t.Fatalf("size %d: classified %d %s", size, he.status, he.code)
			}
		}
		if after := storeSnapshot(s.dir); after != before {
			t.Fatalf("size %d: the refused cycle changed the store:\nbefore:\n%s\nafter:\n%s", size, before, after)
		}
		gs, _ := s.rep.Status()
		if gs[0].Pending != "" {
			t.Fatalf("size %d: pending after a refusal: %s", size, gs[0].Pending)
		}
		s.check(false, true)
	}
	// The group keeps replicating: the real cycle of that seq applies.
	for i := 0; i < 3; i++ {
		p, na := a0.cycle(t, s.cyc, rng, [16]byte{byte(20 + i)}, now, cycOpt{nOps: 10, resize: true})
		res, err := s.rep.Apply(ctx, s.group, p)
		if err != nil {
			t.Fatalf("next cycle after the refusal: %v", err)
		}
		a0 = na
		s.record(res.Point, a0)
	}
	s.check(true, true)
	// And after a restart (the refused cycle left nothing for recovery).
	s.reopen(ReplicaOptions{})
	s.check(false, true)
}

func TestCheckImageName(t *testing.T) {
	for _, n := range []string{"a.img", "dir/disk.img", "disk 1.raw", "ü.img"} {
		if err := checkImageName(n); err != nil {
			t.Errorf("%q: %v", n, err)
		}
	}
	for _, n := range []string{"", "/etc/passwd", "../x", "a/../b", "a//b", "./a", "a/", "a\x00b"} {
		if err := checkImageName(n); err == nil {
			t.Errorf("%q accepted", n)
		}
	}
}
