package format

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"
)

// image is the model of what a cycle should contain.
type image struct {
	data    []byte
	written []bool
}

// rebuild reads every extent of r back into an image model.
func rebuild(t testing.TB, r *Reader) image {
	t.Helper()
	n := r.Header().Blocks()
	im := image{data: make([]byte, n*BlockSize), written: make([]bool, n)}
	var buf []byte
	for i, e := range r.Extents() {
		for b := e.Start; b < e.End(); b++ {
			if im.written[b] {
				t.Fatalf("block %d covered twice", b)
			}
			im.written[b] = true
		}
		if e.Kind == KindZero {
			if _, err := r.ReadExtent(i, nil); err == nil {
				t.Fatal("ReadExtent of zero extent succeeded")
			}
			continue
		}
		var err error
		buf, err = r.ReadExtent(i, buf)
		if err != nil {
			t.Fatal(err)
		}
		for b := 0; b < int(e.Count); b++ {
			if bytes.Equal(buf[b*BlockSize:(b+1)*BlockSize], zeroBlock[:]) {
				t.Fatalf("extent %d stores all-zero block %d", i, e.Start+uint64(b))
			}
		}
		copy(im.data[e.Start*BlockSize:], buf)
	}
	return im
}

func TestRoundTrip(t *testing.T) {
	cases := []struct {
		name     string
		size     uint64
		base     bool
		compress bool
		workers  int
		fill     func(*rand.Rand, []byte)
	}{
		{"random-raw", 3000*BlockSize + 123, false, false, 0, fillRandom},
		{"random-compress", 3000*BlockSize + 1, true, true, 0, fillRandom},
		{"text-compress", 2500 * BlockSize, false, true, 3, fillText},
		{"text-raw", 2500*BlockSize - 7, true, false, 1, fillText},
		{"semi-compress-1worker", 4000*BlockSize + 4095, false, true, 1, fillSemi},
		{"semi-compress-8workers", 4000*BlockSize + 4095, true, true, 8, fillSemi},
	}
	for ci, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(uint64(ci), 7))
			h := testHeader(c.size)
			if c.base {
				h.Flags, h.Seq, h.Parent = FlagBase, 0, NoParent
			}
			nb := h.Blocks()
			want := image{data: make([]byte, nb*BlockSize), written: make([]bool, nb)}
			scratch := make([]byte, 700*BlockSize)
			file := mustWrite(t, h, WriterOptions{Compress: c.compress, Workers: c.workers}, func(w *Writer) {
				for b := uint64(0); b < nb; {
					n := min(uint64(1+rng.IntN(600)), nb-b)
					switch rng.IntN(5) {
					case 0: // gap
					case 1: // explicit zero run
						if err := w.WriteZero(b, n); err != nil {
							t.Fatal(err)
						}
						for i := b; i < b+n; i++ {
							want.written[i] = true
						}
					default: // data with some all-zero blocks
						d := scratch[:n*BlockSize]
						c.fill(rng, d)
						zeroes := rng.IntN(2) == 0
						for i := uint64(0); i < n; i++ {
							if zeroes && rng.IntN(10) == 0 {
								clear(d[i*BlockSize : (i+1)*BlockSize])
							}
							if b+i == nb-1 && rng.IntN(2) == 0 {
								// junk past the image end must be dropped
								fillRandom(rng, d[i*BlockSize:(i+1)*BlockSize])
							}
						}
						if err := w.WriteBlocks(b, d); err != nil {
							t.Fatal(err)
						}
						copy(want.data[b*BlockSize:], d)
						for i := b; i < b+n; i++ {
							want.written[i] = true
						}
						fillRandom(rng, d) // the writer must have copied what it keeps
					}
					b += n
				}
			})
			if tail := c.size % BlockSize; tail != 0 {
				clear(want.data[c.size:])
			}
			r := mustOpen(t, file)
			if err := r.Verify(); err != nil {
				t.Fatal(err)
			}
			if r.Header() != h {
				t.Fatalf("header: got %+v, want %+v", r.Header(), h)
			}
			got := rebuild(t, r)
			for b := range nb {
				if got.written[b] != want.written[b] {
					t.Fatalf("block %d: written=%v, want %v", b, got.written[b], want.written[b])
				}
			}
			if !bytes.Equal(got.data, want.data) {
				t.Fatal("content differs")
			}
			f := r.Footer()
			var comp, maxData int
			for _, e := range r.Extents() {
				if e.Comp == CompZstd && e.End() != nb { // the partial last block compresses
					comp++
				}
				if e.Kind == KindData {
					maxData = max(maxData, int(e.Count))
				}
			}
			t.Logf("%d bytes, %d extents (%d compressed, largest data extent %d blocks), %d data + %d zero blocks",
				len(file), f.Extents, comp, maxData, f.DataBlocks, f.ZeroBlocks)
			if maxData != MaxExtentBlocks {
				t.Errorf("largest data extent has %d blocks, want %d", maxData, MaxExtentBlocks)
			}
			if c.compress && c.name != "random-compress" && comp == 0 {
				t.Error("no extent compressed")
			}
			if (!c.compress || c.name == "random-compress") && comp != 0 {
				t.Errorf("%d extents compressed", comp)
			}
		})
	}
}

func TestEmptyAndZeroOnly(t *testing.T) {
	h := testHeader(0)
	file := mustWrite(t, h, WriterOptions{}, func(w *Writer) {})
	r := mustOpen(t, file)
	if err := r.Verify(); err != nil {
		t.Fatal(err)
	}
	if len(r.Extents()) != 0 || len(file) != HeaderFixedSize+len(h.Name)+HashSize+FooterSize {
		t.Fatalf("unexpected empty file: %d bytes, %d extents", len(file), len(r.Extents()))
	}

	// A huge sparse image: zero runs longer than 2^32-1 blocks are split,
	// adjacent WriteZero/zero-block runs are merged.
	h = testHeader(1 << 50)
	nb := h.Blocks()
	file = mustWrite(t, h, WriterOptions{}, func(w *Writer) {
		if err := w.WriteZero(0, 10); err != nil {
			t.Fatal(err)
		}
		if err := w.WriteBlocks(10, make([]byte, 3*BlockSize)); err != nil {
			t.Fatal(err)
		}
		if err := w.WriteZero(13, nb-13); err != nil {
			t.Fatal(err)
		}
	})
	r = mustOpen(t, file)
	if err := r.Verify(); err != nil {
		t.Fatal(err)
	}
	ext := r.Extents()
	wantN := int((nb + MaxZeroExtentBlocks - 1) / MaxZeroExtentBlocks)
	if len(ext) != wantN || r.Footer().ZeroBlocks != nb {
		t.Fatalf("%d extents, %d zero blocks; want %d, %d", len(ext), r.Footer().ZeroBlocks, wantN, nb)
	}
	for _, e := range ext[:len(ext)-1] {
		if e.Count != MaxZeroExtentBlocks {
			t.Fatalf("zero extent %+v not full", e)
		}
	}
}

func TestWriterErrors(t *testing.T) {
	h := testHeader(100 * BlockSize)
	blk := make([]byte, BlockSize)
	blk[0] = 1
	w, err := NewWriter(io.Discard, h, WriterOptions{Compress: true})
	if err != nil {
		t.Fatal(err)
	}
	check := func(err error, want error) {
		t.Helper()
		if !errors.Is(err, want) {
			t.Fatalf("got %v, want %v", err, want)
		}
	}
	check(w.WriteBlocks(10, append(blk, blk...)), nil)
	check(w.WriteBlocks(11, blk), ErrOrder)  // overlap
	check(w.WriteBlocks(5, blk), ErrOrder)   // backwards
	check(w.WriteZero(11, 1), ErrOrder)      // overlap
	check(w.WriteBlocks(12, blk), nil)       // adjacent is fine
	check(w.WriteZero(20, 5), nil)           // gap is fine
	check(w.WriteBlocks(24, blk), ErrOrder)  // inside the zero run
	check(w.WriteBlocks(100, blk), ErrRange) // past the end
	check(w.WriteZero(99, 2), ErrRange)      // crosses the end
	check(w.WriteZero(99, ^uint64(0)), ErrRange)
	if err := w.WriteBlocks(30, blk[:100]); err == nil {
		t.Fatal("partial block accepted")
	}
	if err := w.WriteBlocks(30, nil); err == nil {
		t.Fatal("empty write accepted")
	}
	if err := w.WriteZero(30, 0); err == nil {
		t.Fatal("empty zero run accepted")
	}
	check(w.WriteBlocks(99, blk), nil)
	if _, err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Close(); err == nil {
		t.Fatal("second Close succeeded")
	}
	if err := w.WriteBlocks(99, blk); err == nil {
		t.Fatal("write after Close succeeded")
	}
}

func TestHeaderValidation(t *testing.T) {
	bad := map[string]func(h *Header){
		"non-base without parent": func(h *Header) { h.Parent = NoParent },
		"parent = seq":            func(h *Header) { h.Parent = h.Seq },
		"parent after seq":        func(h *Header) { h.Parent = h.Seq + 1 },
		"seq 0 non-base":          func(h *Header) { h.Seq, h.Parent = 0, NoParent },
		"unknown flag":            func(h *Header) { h.Flags = 4 },
		"long name":               func(h *Header) { h.Name = strings.Repeat("x", MaxNameLen+1) },
		"bad utf8":                func(h *Header) { h.Name = "a\xffb" },
		"zero time":               func(h *Header) { h.CutTime = time.Time{} },
		"base wrong parent":       func(h *Header) { h.Flags, h.Parent = FlagBase, 3 },
	}
	for name, f := range bad {
		h := testHeader(BlockSize)
		f(&h)
		if _, err := NewWriter(io.Discard, h, WriterOptions{}); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	good := map[string]func(h *Header){
		"base no parent":    func(h *Header) { h.Flags, h.Parent = FlagBase, NoParent },
		"base with parent":  func(h *Header) { h.Flags = FlagBase },
		"base seq 0":        func(h *Header) { h.Flags, h.Seq, h.Parent = FlagBase, 0, NoParent },
		"max name":          func(h *Header) { h.Name = strings.Repeat("é", MaxNameLen/2) },
		"empty name":        func(h *Header) { h.Name = "" },
		"pre-epoch time":    func(h *Header) { h.CutTime = time.Date(1900, 1, 1, 0, 0, 0, 0, time.UTC) },
		"zero size image":   func(h *Header) { h.ImageSize = 0 },
		"max uint64 parent": func(h *Header) { h.Seq, h.Parent = NoParent, NoParent-1 },
		"merged delta":      func(h *Header) { h.Parent = 7 },
	}
	for name, f := range good {
		h := testHeader(BlockSize)
		f(&h)
		file := mustWrite(t, h, WriterOptions{}, func(*Writer) {})
		r := mustOpen(t, file)
		if r.Header() != h {
			t.Errorf("%s: header %+v, want %+v", name, r.Header(), h)
		}
	}
}

type failWriter struct{ n int }

func (f *failWriter) Write(p []byte) (int, error) {
	if f.n < len(p) {
		n := f.n
		f.n = 0
		return n, errors.New("disk full")
	}
	f.n -= len(p)
	return len(p), nil
}

func TestWriteErrorSticky(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	data := make([]byte, 300*BlockSize)
	fillRandom(rng, data)
	for _, limit := range []int{0, 10, 200, 5000, 300 * BlockSize} {
		w, err := NewWriter(&failWriter{n: limit}, testHeader(1000*BlockSize), WriterOptions{Compress: true})
		if err != nil {
			if limit > 200 {
				t.Fatal(err)
			}
			continue
		}
		var werr error
		for b := uint64(0); b < 900 && werr == nil; b += 300 {
			werr = w.WriteBlocks(b, data)
		}
		_, cerr := w.Close()
		if cerr == nil || !strings.Contains(cerr.Error(), "disk full") {
			t.Fatalf("limit %d: Close error %v", limit, cerr)
		}
	}
}

func TestErrors(t *testing.T) {
	file := exampleFile(t)
	open := func(b []byte) error {
		_, err := Open(bytes.NewReader(b), int64(len(b)))
		return err
	}
	if err := open([]byte("hello world, this is not a cycle file at all")); err != ErrNotCycle {
		t.Fatalf("got %v", err)
	}
	if err := open(nil); err == nil || !errors.Is(err, ErrTruncated) {
		t.Fatalf("empty: got %v", err)
	}
	v3 := bytes.Clone(file)
	v3[hoVersion] = 3
	err := open(v3)
	if !errors.Is(err, ErrVersion) || !strings.Contains(err.Error(), "version 3") {
		t.Fatalf("got %v", err)
	}
	trunc := file[:len(file)-1]
	err = open(trunc)
	var ce *CorruptError
	if !errors.Is(err, ErrTruncated) || !errors.Is(err, ErrCorrupt) || !errors.As(err, &ce) {
		t.Fatalf("truncated: got %v", err)
	}
	// A block hash mismatch names the extent and blocks.
	bad := bytes.Clone(file)
	r := mustOpen(t, bad)
	bad[r.Footer().HashesOff] ^= 1
	r = mustOpen(t, bad)
	_, err = r.ReadExtent(0, nil)
	if !errors.As(err, &ce) || !errors.Is(err, ErrCorrupt) || ce.Offset != int64(r.Extents()[0].Off) {
		t.Fatalf("got %v", err)
	}
	want := fmt.Sprintf("cycle file corrupt at byte %d: block hash mismatch in extent 0 (blocks 0..0), block 0", ce.Offset)
	if err.Error() != want {
		t.Fatalf("got %q, want %q", err, want)
	}
	if err := r.VerifyFile(); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("VerifyFile: %v", err)
	}
}

// checkBad asserts that b is rejected by Open or Verify with a format error.
func checkBad(t *testing.T, b []byte, what string) {
	t.Helper()
	r, err := Open(bytes.NewReader(b), int64(len(b)))
	if err == nil {
		err = r.Verify()
	}
	if err == nil {
		t.Fatalf("%s: accepted", what)
	}
	if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrNotCycle) && !errors.Is(err, ErrVersion) {
		t.Fatalf("%s: unexpected error type: %v", what, err)
	}
	if testing.Verbose() && !strings.Contains(what, "byte") && !strings.Contains(what, "truncated") {
		t.Logf("%s: %v", what, err)
	}
}

func smallFiles(t *testing.T) map[string][]byte {
	rng := rand.New(rand.NewPCG(9, 9))
	mixed := make([]byte, 6*BlockSize)
	fillText(rng, mixed[:2*BlockSize])
	fillRandom(rng, mixed[3*BlockSize:5*BlockSize])
	h := testHeader(10*BlockSize - 100)
	return map[string][]byte{
		"example": exampleFile(t),
		"mixed": mustWrite(t, h, WriterOptions{Compress: true}, func(w *Writer) {
			if err := w.WriteBlocks(1, mixed); err != nil {
				t.Fatal(err)
			}
			if err := w.WriteZero(8, 1); err != nil {
				t.Fatal(err)
			}
			if err := w.WriteBlocks(9, mixed[:BlockSize]); err != nil {
				t.Fatal(err)
			}
		}),
	}
}

func TestFlipEveryByte(t *testing.T) {
	for name, file := range smallFiles(t) {
		if err := mustOpen(t, file).Verify(); err != nil {
			t.Fatal(err)
		}
		for i := range file {
			for _, x := range []byte{0x01, 0x80, 0xff} {
				b := bytes.Clone(file)
				b[i] ^= x
				checkBad(t, b, fmt.Sprintf("%s: byte %d ^ %#x", name, i, x))
			}
		}
	}
}

func TestTruncateEveryLength(t *testing.T) {
	for name, file := range smallFiles(t) {
		for n := range len(file) {
			checkBad(t, file[:n], fmt.Sprintf("%s: truncated to %d", name, n))
			// Also a ReaderAt that is shorter than the size claimed.
			_, err := Open(bytes.NewReader(file[:n]), int64(len(file)))
			if err == nil || !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrNotCycle) && !errors.Is(err, ErrVersion) {
				t.Fatalf("%s: short reader %d: %v", name, n, err)
			}
		}
		// Appended garbage is rejected too.
		checkBad(t, append(bytes.Clone(file), 0), name+": extra byte")
	}
}

// TestHostile builds structurally consistent files (correct hashes) with
// semantic violations, which byte flips cannot reach.
func TestHostile(t *testing.T) {
	base := exampleFile(t)
	r := mustOpen(t, base)
	hl := int(r.Footer().TableOff) - int(r.Extents()[0].Len)
	rebuildFile := func(hdr []byte, data []byte, ext []Extent, hashes []byte, f Footer) []byte {
		var b []byte
		b = append(b, hdr...)
		b = append(b, data...)
		f.TableOff = uint64(len(b))
		f.Extents = uint64(len(ext))
		for _, e := range ext {
			var eb [ExtentEntrySize]byte
			encodeExtent(eb[:], &e)
			b = append(b, eb[:]...)
		}
		f.HashesOff = uint64(len(b))
		b = append(b, hashes...)
		f.FileHash = hashSum(b)
		return append(b, encodeFooter(&f, Version)...)
	}
	hdr := base[:hl]
	data := base[hl:r.Footer().TableOff]
	hashes := base[r.Footer().HashesOff : len(base)-FooterSize]
	ext0 := r.Extents()
	foot := r.Footer()
	if b := rebuildFile(hdr, data, ext0, hashes, foot); !bytes.Equal(b, base) {
		t.Fatal("rebuild does not reproduce the file")
	}
	mod := func(name string, f func(ext []Extent, foot *Footer) ([]byte, []byte)) {
		ext := append([]Extent(nil), ext0...)
		ft := foot
		d, hs := f(ext, &ft)
		if d == nil {
			d = data
		}
		if hs == nil {
			hs = hashes
		}
		checkBad(t, rebuildFile(hdr, d, ext, hs, ft), name)
	}
	mod("overlap", func(e []Extent, _ *Footer) ([]byte, []byte) { e[1].Start = 0; return nil, nil })
	mod("unsorted", func(e []Extent, _ *Footer) ([]byte, []byte) { e[0], e[1] = e[1], e[0]; return nil, nil })
	mod("beyond image", func(e []Extent, f *Footer) ([]byte, []byte) { e[1].Count = 3; f.ZeroBlocks = 3; return nil, nil })
	{
		ext := append([]Extent(nil), ext0...)
		ext[1].Count = 1
		ext = append(ext, Extent{Start: 2, Count: 1, Kind: KindZero})
		checkBad(t, rebuildFile(hdr, data, ext, hashes, foot), "unmerged zero")
		// The same file with the runs merged is fine.
		ext = append(ext[:1], Extent{Start: 1, Count: 2, Kind: KindZero})
		b := rebuildFile(hdr, data, ext, hashes, foot)
		if err := mustOpen(t, b).Verify(); err != nil {
			t.Fatal(err)
		}
	}
	mod("zero count", func(e []Extent, f *Footer) ([]byte, []byte) { e[1].Count = 0; f.ZeroBlocks = 0; return nil, nil })
	mod("raw not raw size", func(e []Extent, _ *Footer) ([]byte, []byte) { e[0].Comp = CompNone; return nil, nil })
	mod("compressed as big as raw", func(e []Extent, _ *Footer) ([]byte, []byte) {
		e[0].Len = BlockSize
		return append(bytes.Clone(data), make([]byte, BlockSize-len(data))...), nil
	})
	mod("bad zstd", func(e []Extent, _ *Footer) ([]byte, []byte) {
		d := bytes.Clone(data)
		d[len(d)-3] ^= 0x55
		return d, nil
	})
	mod("zstd too short", func(e []Extent, _ *Footer) ([]byte, []byte) {
		d := bytes.Clone(data)
		le.PutUint16(d[5:], 100) // frame content size (2-byte FCS field, +256)
		return d, nil
	})
	mod("bad hash", func(e []Extent, _ *Footer) ([]byte, []byte) {
		hs := bytes.Clone(hashes)
		hs[0] ^= 1
		return nil, hs
	})
	mod("data extent too long", func(e []Extent, _ *Footer) ([]byte, []byte) { e[0].Count = MaxExtentBlocks + 1; return nil, nil })
	mod("reserved", func(e []Extent, _ *Footer) ([]byte, []byte) { e[1].Kind = 3; return nil, nil })
	mod("counts", func(e []Extent, f *Footer) ([]byte, []byte) { f.ZeroBlocks++; return nil, nil })

	// Non-zero bytes past the image end in the last block.
	h := testHeader(BlockSize + 10)
	junk := bytes.Repeat([]byte{7}, BlockSize)
	file := mustWrite(t, h, WriterOptions{}, func(w *Writer) {
		if err := w.WriteBlocks(1, junk); err != nil {
			t.Fatal(err)
		}
	})
	r = mustOpen(t, file)
	e := r.Extents()[0]
	copy(file[e.Off:], junk)
	sum := hashSum(junk)
	copy(file[r.Footer().HashesOff:], sum[:])
	fs := hashSum(file[:len(file)-FooterSize])
	copy(file[len(file)-FooterSize+foFileHash:], fs[:])
	checkBad(t, file, "tail junk")

	// A 40-byte file claiming huge structures must not allocate much.
	tiny := make([]byte, 40)
	copy(tiny, magic)
	le.PutUint16(tiny[hoVersion:], Version)
	le.PutUint16(tiny[hoHdrLen:], 0xffff)
	checkBad(t, tiny, "tiny")
}

func TestConcurrentReadExtent(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 5))
	data := make([]byte, 1000*BlockSize)
	fillSemi(rng, data)
	file := mustWrite(t, testHeader(uint64(len(data))), WriterOptions{Compress: true}, func(w *Writer) {
		if err := w.WriteBlocks(0, data); err != nil {
			t.Fatal(err)
		}
	})
	r := mustOpen(t, file)
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var buf []byte
			for i, e := range r.Extents() {
				b, err := r.ReadExtent(i, buf)
				if err != nil {
					t.Error(err)
					return
				}
				if !bytes.Equal(b, data[e.Start*BlockSize:e.End()*BlockSize]) {
					t.Error("content differs")
				}
				buf = b
			}
		}()
	}
	wg.Wait()
}
