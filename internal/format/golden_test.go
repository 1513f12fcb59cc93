package format

import (
	"bytes"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// Regenerate the golden files with:
//
//	go test ./internal/format -run 'TestGolden|TestDocExample' -update
//
// (or `go generate ./internal/format`). Only do that for a deliberate format
// change: the point of the golden file is that files written by older builds
// keep decoding.
var update = flag.Bool("update", false, "rewrite testdata golden files")

const goldenPath = "testdata/golden-v1.cyc"

// goldenImage is the deterministic content of the golden file: the header,
// plus for each block the expected bytes (nil = not in the cycle, zero block =
// zero extent).
func goldenImage() (Header, [][]byte) {
	h := Header{
		Flags:      0,
		ImageID:    [16]byte{0x9b, 0x2f, 0x3c, 0x10, 0x7e, 0x55, 0x4a, 0x8d, 0xb1, 0x02, 0xc3, 0xd4, 0xe5, 0xf6, 0x07, 0x18},
		Generation: 2,
		Seq:        17,
		Parent:     16,
		CutTime:    time.Date(2026, 1, 2, 3, 4, 5, 6, time.UTC),
		ImageSize:  301*BlockSize - 3996, // 301 blocks, the last holds 100 bytes
		GroupCut:   [16]byte{0xfe, 0xed, 0xfa, 0xce, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1},
		Name:       "pool/vm-7/disk-0.raw",
	}
	rng := rand.New(rand.NewPCG(2026, 1))
	blocks := make([][]byte, h.Blocks())
	blk := func() []byte { return make([]byte, BlockSize) }
	for b := 0; b < 2; b++ { // incompressible: stored raw
		blocks[b] = blk()
		fillRandom(rng, blocks[b])
	}
	for b := 2; b < 5; b++ { // zero blocks inside WriteBlocks + a WriteZero
		blocks[b] = blk()
	}
	for b := 10; b < 276; b++ { // compressible, 266 blocks: extents of 256 + 10
		blocks[b] = bytes.Repeat(fmt.Appendf(nil, "block %03d of the golden cycle file\n", b), BlockSize/32)[:BlockSize]
	}
	blocks[280] = blk() // lone zero block (WriteZero)
	blocks[300] = blk() // partial last block
	copy(blocks[300], bytes.Repeat([]byte("tail"), 25))
	return h, blocks
}

func writeGolden(t testing.TB) []byte {
	h, blocks := goldenImage()
	return mustWrite(t, h, WriterOptions{Compress: true, Workers: 2}, func(w *Writer) {
		must := func(err error) {
			if err != nil {
				t.Fatal(err)
			}
		}
		must(w.WriteBlocks(0, bytes.Join(blocks[0:4], nil)))
		must(w.WriteZero(4, 1))
		for b := 10; b < 276; b += 19 {
			must(w.WriteBlocks(uint64(b), bytes.Join(blocks[b:min(b+19, 276)], nil)))
		}
		must(w.WriteZero(280, 1))
		must(w.WriteBlocks(300, blocks[300]))
	})
}

func TestGolden(t *testing.T) {
	if *update {
		if err := os.WriteFile(goldenPath, writeGolden(t), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	file, err := os.ReadFile(goldenPath)
	if err != nil {
		t.Fatal(err)
	}
	r := mustOpen(t, file)
	if err := r.Verify(); err != nil {
		t.Fatal(err)
	}
	h, blocks := goldenImage()
	if r.Header() != h {
		t.Fatalf("header %+v, want %+v", r.Header(), h)
	}
	got := rebuild(t, r)
	for b, want := range blocks {
		if got.written[b] != (want != nil) {
			t.Fatalf("block %d: in cycle = %v, want %v", b, got.written[b], want != nil)
		}
		if want != nil && !bytes.Equal(got.data[b*BlockSize:(b+1)*BlockSize], want) {
			t.Fatalf("block %d differs", b)
		}
	}
	type ek struct {
		start uint64
		count uint32
		kind  Kind
		comp  uint8
	}
	want := []ek{{0, 2, KindData, CompNone}, {2, 3, KindZero, 0}, {10, 256, KindData, CompZstd},
		{266, 10, KindData, CompZstd}, {280, 1, KindZero, 0}, {300, 1, KindData, CompZstd}}
	ext := r.Extents()
	if len(ext) != len(want) {
		t.Fatalf("%d extents, want %d: %+v", len(ext), len(want), ext)
	}
	for i, e := range ext {
		if (ek{e.Start, e.Count, e.Kind, e.Comp}) != want[i] {
			t.Errorf("extent %d: %+v, want %+v", i, e, want[i])
		}
	}
	if f := r.Footer(); f.DataBlocks != 269 || f.ZeroBlocks != 4 {
		t.Errorf("footer %+v", f)
	}
	// The current writer still produces a file with the same structure
	// (the zstd bytes may change with the library version).
	cur := mustOpen(t, writeGolden(t))
	if len(cur.Extents()) != len(ext) || cur.Header() != h {
		t.Error("the writer no longer produces the golden structure")
	}
}

// TestDocExample checks the worked example of docs/format.md (regenerate the
// hex dump there after -update with: xxd internal/format/testdata/example-v1.cyc).
func TestDocExample(t *testing.T) {
	const path = "testdata/example-v1.cyc"
	if *update {
		if err := os.WriteFile(path, exampleFile(t), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	file, err := os.ReadFile(filepath.FromSlash(path))
	if err != nil {
		t.Fatal(err)
	}
	r := mustOpen(t, file)
	if err := r.Verify(); err != nil {
		t.Fatal(err)
	}
	got := rebuild(t, r)
	want := bytes.Repeat([]byte("standin!"), BlockSize/8)
	if !bytes.Equal(got.data[:BlockSize], want) || !got.written[1] || !got.written[2] {
		t.Fatal("example content differs")
	}
}
