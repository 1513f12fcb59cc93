package format

import (
	"bytes"
	"math/rand/v2"
	"testing"
	"time"
)

// testHeader returns a valid non-base header for an image of size bytes.
func testHeader(size uint64) Header {
	return Header{
		ImageID:    [16]byte{0x5d, 0x1a, 0x9e, 0x44, 0x0b, 0x7f, 0x4c, 0x21, 0x8a, 0x33, 0x6e, 0x90, 0x12, 0xfe, 0x07, 0xc4},
		Generation: 3,
		Seq:        42,
		Parent:     41,
		CutTime:    time.Date(2025, 3, 14, 15, 9, 26, 535897932, time.UTC),
		ImageSize:  size,
		GroupCut:   [16]byte{0xc0, 0xff, 0xee, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13},
		Name:       "vms/web-01/disk0.qcow2",
	}
}

// fillRandom fills b with incompressible bytes.
func fillRandom(rng *rand.Rand, b []byte) {
	for i := 0; i+8 <= len(b); i += 8 {
		le.PutUint64(b[i:], rng.Uint64())
	}
}

var words = []string{"standin ", "replica ", "cycle ", "block ", "extent ", "zstd ", "blake3 ", "disk ", "image ", "cut ", "\n", "0x1f2e ", "{\"k\":1} "}

// fillText fills b with compressible text-like bytes.
func fillText(rng *rand.Rand, b []byte) {
	i := 0
	for i < len(b) {
		i += copy(b[i:], words[rng.IntN(len(words))])
	}
	if bytes.Equal(b, make([]byte, len(b))) {
		b[0] = 1
	}
}

// fillSemi fills b with roughly half random, half text data, in 512-byte pieces.
func fillSemi(rng *rand.Rand, b []byte) {
	for i := 0; i < len(b); i += 512 {
		p := b[i:min(i+512, len(b))]
		if rng.IntN(2) == 0 {
			fillRandom(rng, p)
		} else {
			fillText(rng, p)
		}
	}
}

// memWriter collects written bytes.
type memWriter struct{ bytes.Buffer }

func mustWrite(t testing.TB, h Header, o WriterOptions, f func(w *Writer)) []byte {
	t.Helper()
	var buf bytes.Buffer
	w, err := NewWriter(&buf, h, o)
	if err != nil {
		t.Fatal(err)
	}
	f(w)
	s, err := w.Close()
	if err != nil {
		t.Fatal(err)
	}
	if s.Bytes != int64(buf.Len()) {
		t.Fatalf("summary says %d bytes, wrote %d", s.Bytes, buf.Len())
	}
	return buf.Bytes()
}

func mustOpen(t testing.TB, b []byte) *Reader {
	t.Helper()
	r, err := Open(bytes.NewReader(b), int64(len(b)))
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// exampleFile builds the small file of the docs: a 3-block image (last block
// partial) with one data block (block 0) and a zero run (blocks 1..2).
func exampleFile(t testing.TB) []byte {
	h := Header{
		Flags:      FlagBase,
		ImageID:    [16]byte{0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef},
		Generation: 1,
		Seq:        0,
		Parent:     NoParent,
		CutTime:    time.Unix(1700000000, 0),
		ImageSize:  3*BlockSize - 512,
		GroupCut:   [16]byte{0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9},
		Name:       "vm1.img",
	}
	blk := bytes.Repeat([]byte("standin!"), BlockSize/8)
	return mustWrite(t, h, WriterOptions{Compress: true}, func(w *Writer) {
		if err := w.WriteBlocks(0, blk); err != nil {
			t.Fatal(err)
		}
		if err := w.WriteZero(1, 2); err != nil {
			t.Fatal(err)
		}
	})
}
