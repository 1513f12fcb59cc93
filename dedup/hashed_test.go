package dedup

import (
	"context"
	"fmt"
	"testing"

	"github.com/zeebo/blake3"
)

// hashedSink records the hashes Import hands to a HashedSink.
type hashedSink struct {
	memSink
	bad []string
}

func (s *hashedSink) WriteHashedAt(p []byte, off int64, hs [][32]byte) (int, error) {
	if want := (len(p) + chunkSize - 1) / chunkSize; len(hs) != want {
		s.bad = append(s.bad, fmt.Sprintf("%d hashes for %d chunks at %d", len(hs), want, off))
	}
	for i, h := range hs {
		blk := make([]byte, chunkSize) // a short last chunk is hashed zero-padded
		copy(blk, p[i*chunkSize:min(len(p), (i+1)*chunkSize)])
		if h != blake3.Sum256(blk) {
			s.bad = append(s.bad, fmt.Sprintf("chunk at %d: hash is not the plain BLAKE3", off+int64(i)*chunkSize))
		}
	}
	return s.WriteAt(p, off)
}

// TestHashedSink: a HashedSink gets the plain BLAKE3 of every chunk it
// stores, from plain and from encrypted (keyed-id) seeds, and the images
// are still exact.
func TestHashedSink(t *testing.T) {
	for _, key := range [][]byte{nil, testKey} {
		ims := testImages(7)
		dir := t.TempDir()
		if _, err := Export(context.Background(), []string{dir}, sources(ims), ExportOptions{Key: key, PackSize: 64 << 10}); err != nil {
			t.Fatal(err)
		}
		sinks := map[string]*memSink{}
		var hs []*hashedSink
		_, err := Import(context.Background(), []string{dir}, key, func(m Manifest) (ImageSink, error) {
			s := &hashedSink{}
			sinks[m.Name], hs = &s.memSink, append(hs, s)
			return s, nil
		}, ImportOptions{})
		if err != nil {
			t.Fatal(err)
		}
		checkEqual(t, ims, sinks)
		for _, s := range hs {
			if len(s.written) == 0 || len(s.bad) > 0 {
				t.Fatalf("encrypted %v: %d writes, %d problems, first: %v", key != nil, len(s.written), len(s.bad), s.bad[:min(3, len(s.bad))])
			}
		}
	}
}
