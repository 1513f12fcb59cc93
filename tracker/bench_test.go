package tracker

import (
	"context"
	"crypto/rand"
	"os"
	"path/filepath"
	"testing"
)

// BenchmarkCutStaging stages 256 MiB of dirty, half-compressible data; compare
// ns/op with the time to read the same bytes (make bench does it side by side).
func BenchmarkCutStaging(b *testing.B) {
	for _, compress := range []bool{false, true} {
		name := map[bool]string{false: "raw", true: "zstd"}[compress]
		b.Run(name, func(b *testing.B) {
			dir := b.TempDir()
			os.MkdirAll(filepath.Join(dir, "images"), 0o700)
			p := filepath.Join(dir, "images", "a.img")
			const size = 256 << 20
			f, _ := os.Create(p)
			buf := make([]byte, 1<<20)
			for off := 0; off < size; off += len(buf) {
				rand.Read(buf[:len(buf)/2])
				clear(buf[len(buf)/2:])
				for i := len(buf) / 2; i < len(buf); i += 64 {
					buf[i] = byte(i)
				}
				f.WriteAt(buf, int64(off))
			}
			f.Close()
			s, err := Open(dir, Options{})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			im, _ := s.Image("a.img")
			b.SetBytes(size)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				end, _ := im.BeginWrite(0, size)
				end()
				if _, err := s.CutWith(context.Background(), nil, CutOptions{Compress: compress}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
