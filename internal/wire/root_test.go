package wire

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
)

// TestHashImage checks the parallel, hole-skipping hash against a plain
// block-by-block computation, for sizes that end mid-block and mid-chunk.
func TestHashImage(t *testing.T) {
	for _, size := range []int64{0, 4096, 5000, 3<<20 + 123, 9 << 20} {
		p := filepath.Join(t.TempDir(), "img")
		f, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Truncate(size); err != nil {
			t.Fatal(err)
		}
		rng := rand.New(rand.NewPCG(uint64(size), 1))
		buf := make([]byte, 64<<10)
		for off := int64(0); off < size; off += 2 << 20 { // data every other MiB; the rest holes
			for i := range buf {
				buf[i] = byte(rng.Uint32())
			}
			n := min(int64(len(buf)), size-off)
			if _, err := f.WriteAt(buf[:n], off); err != nil {
				t.Fatal(err)
			}
		}
		all, _ := os.ReadFile(p)
		want := NewRooter(size)
		var wantHashes []byte
		for off := int64(0); off < size; off += 4096 {
			h := BlockHash(all[off:min(size, off+4096)])
			wantHashes = append(wantHashes, h[:]...)
		}
		want.Add(wantHashes)
		var got bytes.Buffer
		root, err := HashImage(context.Background(), f, size, &got)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		if root != want.Sum() || !bytes.Equal(got.Bytes(), wantHashes) {
			t.Fatalf("size %d: root or hashes differ from the block-by-block computation", size)
		}
		other := NewRooter(size + 1)
		other.Add(wantHashes)
		if size > 0 && root == other.Sum() {
			t.Fatalf("size %d: the root does not depend on the size", size)
		}
	}
}
