package format

import (
	"bytes"
	"io"
	"math/rand/v2"
	"testing"
)

// benchData is 64 MiB of semi-compressible data (about half random, half
// text, in 512-byte pieces) with ~3% all-zero blocks.
func benchData(fill func(*rand.Rand, []byte)) []byte {
	rng := rand.New(rand.NewPCG(64, 64))
	d := make([]byte, 64<<20)
	fill(rng, d)
	for b := 0; b < len(d)/BlockSize; b++ {
		if rng.IntN(32) == 0 {
			clear(d[b*BlockSize : (b+1)*BlockSize])
		}
	}
	return d
}

func benchWrite(b *testing.B, data []byte, o WriterOptions) {
	const chunk = 1 << 20 // the caller writes 1 MiB at a time, like a dirty-bitmap reader
	h := testHeader(uint64(len(data)))
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	var out int64
	for b.Loop() {
		w, err := NewWriter(io.Discard, h, o)
		if err != nil {
			b.Fatal(err)
		}
		for off := 0; off < len(data); off += chunk {
			if err := w.WriteBlocks(uint64(off/BlockSize), data[off:off+chunk]); err != nil {
				b.Fatal(err)
			}
		}
		s, err := w.Close()
		if err != nil {
			b.Fatal(err)
		}
		out = s.Bytes
	}
	b.ReportMetric(float64(out)/float64(len(data)), "ratio")
}

func BenchmarkWrite(b *testing.B) {
	semi := benchData(fillSemi)
	random := benchData(fillRandom)
	text := benchData(fillText)
	b.Run("semi/compress", func(b *testing.B) { benchWrite(b, semi, WriterOptions{Compress: true}) })
	b.Run("semi/compress-w1", func(b *testing.B) { benchWrite(b, semi, WriterOptions{Compress: true, Workers: 1}) })
	b.Run("semi/raw", func(b *testing.B) { benchWrite(b, semi, WriterOptions{}) })
	b.Run("random/compress", func(b *testing.B) { benchWrite(b, random, WriterOptions{Compress: true}) })
	b.Run("text/compress", func(b *testing.B) { benchWrite(b, text, WriterOptions{Compress: true}) })
}

func BenchmarkVerify(b *testing.B) {
	data := benchData(fillSemi)
	var buf bytes.Buffer
	w, _ := NewWriter(&buf, testHeader(uint64(len(data))), WriterOptions{Compress: true})
	if err := w.WriteBlocks(0, data); err != nil {
		b.Fatal(err)
	}
	if _, err := w.Close(); err != nil {
		b.Fatal(err)
	}
	file := buf.Bytes()
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for b.Loop() {
		r, err := Open(bytes.NewReader(file), int64(len(file)))
		if err != nil {
			b.Fatal(err)
		}
		if err := r.Verify(); err != nil {
			b.Fatal(err)
		}
	}
}
