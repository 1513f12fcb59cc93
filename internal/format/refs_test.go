package format

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"strings"
	"testing"
)

const goldenRefsPath = "testdata/golden-v2.cyc"

// refsImage is the deterministic content of the version 2 golden file: a
// base cycle whose blocks are data, zero and ref runs (ref blocks carry the
// hash of their content only).
func refsImage() (Header, [][]byte, map[int]bool) {
	h := testHeader(320*BlockSize - 100)
	h.Flags, h.Seq, h.Parent = FlagBase, 9, 8 // a resync continuing the chain
	rng := rand.New(rand.NewPCG(2026, 2))
	blocks := make([][]byte, h.Blocks())
	ref := map[int]bool{}
	for b := range blocks {
		if b%97 == 50 {
			continue // not in the cycle (a base: reads as zero)
		}
		blocks[b] = make([]byte, BlockSize)
		switch {
		case b >= 20 && b < 24: // zero run
		case b == len(blocks)-1:
			copy(blocks[b], "last partial block")
		default:
			fillText(rng, blocks[b])
		}
		if (b >= 5 && b < 20) || (b >= 30 && b < 600) { // two ref runs, the second > 2×256
			ref[b] = true
		}
	}
	return h, blocks, ref
}

func writeRefs(t testing.TB, h Header, blocks [][]byte, ref map[int]bool, o WriterOptions) []byte {
	t.Helper()
	o.Refs = true
	return mustWrite(t, h, o, func(w *Writer) {
		for b := 0; b < len(blocks); {
			if blocks[b] == nil {
				b++
				continue
			}
			e := b + 1
			for e < len(blocks) && blocks[e] != nil && ref[e] == ref[b] {
				e++
			}
			var err error
			if ref[b] {
				var hs []byte
				for k := b; k < e; k++ {
					s := hashSum(blocks[k])
					hs = append(hs, s[:]...)
				}
				err = w.WriteRef(uint64(b), hs)
			} else {
				err = w.WriteBlocks(uint64(b), bytes.Join(blocks[b:e], nil))
			}
			if err != nil {
				t.Fatal(err)
			}
			b = e
		}
	})
}

// checkRefs opens a version 2 file and checks it against the model.
func checkRefs(t *testing.T, file []byte, h Header, blocks [][]byte, ref map[int]bool) {
	t.Helper()
	r := mustOpen(t, file)
	if err := r.Verify(); err != nil {
		t.Fatal(err)
	}
	if r.Version() != VersionRefs || r.Header() != h {
		t.Fatalf("version %d header %+v", r.Version(), r.Header())
	}
	seen := make([]bool, len(blocks))
	var data, zero, refs uint64
	var buf, hb []byte
	for i, e := range r.Extents() {
		switch e.Kind {
		case KindData:
			var err error
			if buf, err = r.ReadExtent(i, buf); err != nil {
				t.Fatal(err)
			}
			for k := uint64(0); k < uint64(e.Count); k++ {
				if !bytes.Equal(buf[k*BlockSize:(k+1)*BlockSize], blocks[e.Start+k]) || ref[int(e.Start+k)] {
					t.Fatalf("data block %d wrong", e.Start+k)
				}
			}
			data += uint64(e.Count)
		case KindZero:
			for k := e.Start; k < e.End(); k++ {
				if !bytes.Equal(blocks[k], make([]byte, BlockSize)) {
					t.Fatalf("zero extent covers block %d", k)
				}
			}
			zero += uint64(e.Count)
		case KindRef:
			if e.Count > MaxExtentBlocks || e.Comp != 0 || e.Off != 0 || e.Len != 0 {
				t.Fatalf("ref extent %+v", e)
			}
			if _, err := r.ReadExtent(i, nil); err == nil {
				t.Fatal("ReadExtent of a ref extent succeeded")
			}
			var err error
			if hb, err = r.ExtentHashes(i, hb); err != nil {
				t.Fatal(err)
			}
			for k := uint64(0); k < uint64(e.Count); k++ {
				if want := hashSum(blocks[e.Start+k]); !bytes.Equal(hb[k*HashSize:(k+1)*HashSize], want[:]) || !ref[int(e.Start+k)] {
					t.Fatalf("ref block %d: wrong hash or not a ref", e.Start+k)
				}
			}
			refs += uint64(e.Count)
		}
		for k := e.Start; k < e.End(); k++ {
			seen[k] = true
		}
	}
	for b := range blocks {
		if seen[b] != (blocks[b] != nil) {
			t.Fatalf("block %d: in cycle %v, want %v", b, seen[b], blocks[b] != nil)
		}
	}
	if f := r.Footer(); f.DataBlocks != data || f.ZeroBlocks != zero || f.RefBlocks != refs || refs == 0 {
		t.Fatalf("footer %+v, counted %d/%d/%d", f, data, zero, refs)
	}
}

func TestRefsRoundTrip(t *testing.T) {
	h, blocks, ref := refsImage()
	for _, o := range []WriterOptions{{}, {Compress: true, Workers: 3}} {
		checkRefs(t, writeRefs(t, h, blocks, ref, o), h, blocks, ref)
	}
	// The info-only path reads the version 2 footer too.
	file := writeRefs(t, h, blocks, ref, WriterOptions{Compress: true})
	_, f, err := ReadInfo(bytes.NewReader(file), int64(len(file)))
	if err != nil || f.RefBlocks != uint64(len(ref)) {
		t.Fatalf("ReadInfo: %+v %v, want %d ref blocks", f, err, len(ref))
	}
}

func TestRefsGolden(t *testing.T) {
	h, blocks, ref := refsImage()
	if *update {
		if err := os.WriteFile(goldenRefsPath, writeRefs(t, h, blocks, ref, WriterOptions{Compress: true, Workers: 2}), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	file, err := os.ReadFile(goldenRefsPath)
	if err != nil {
		t.Fatal(err)
	}
	checkRefs(t, file, h, blocks, ref)
}

func TestRefsWriterRules(t *testing.T) {
	h := testHeader(10 * BlockSize)
	var buf bytes.Buffer
	w, err := NewWriter(&buf, h, WriterOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.WriteRef(0, make([]byte, HashSize)); err == nil || !strings.Contains(err.Error(), "Refs") {
		t.Fatalf("WriteRef on a version 1 writer: %v", err)
	}
	w.Abort()
	w, _ = NewWriter(&buf, h, WriterOptions{Refs: true})
	defer w.Abort()
	one := hashSum([]byte("x"))
	if err := w.WriteRef(0, one[:5]); err == nil {
		t.Fatal("partial hash accepted")
	}
	zh := hashSum(make([]byte, BlockSize))
	if err := w.WriteRef(0, zh[:]); err == nil {
		t.Fatal("ref to the zero block accepted")
	}
	if err := w.WriteRef(9, append(one[:], one[:]...)); !errors.Is(err, ErrRange) {
		t.Fatalf("ref beyond the image: %v", err)
	}
	if err := w.WriteRef(3, one[:]); err != nil {
		t.Fatal(err)
	}
	if err := w.WriteRef(3, one[:]); !errors.Is(err, ErrOrder) {
		t.Fatalf("overlapping ref: %v", err)
	}
	if err := w.WriteBlocks(2, make([]byte, BlockSize)); !errors.Is(err, ErrOrder) {
		t.Fatalf("data before a ref: %v", err)
	}
}

// TestRefsCorrupt: structural damage of version 2 files is refused, and a
// version 1 file may not carry ref extents.
func TestRefsCorrupt(t *testing.T) {
	h, blocks, ref := refsImage()
	file := writeRefs(t, h, blocks, ref, WriterOptions{Compress: true})
	r := mustOpen(t, file)
	fo := len(file) - FooterSizeRefs
	// Re-seal a modified file (recompute the file hash) so that only the
	// structural check can catch it.
	reseal := func(b []byte) []byte {
		sum := hashSum(b[:len(b)-FooterSizeRefs])
		copy(b[len(b)-FooterSizeRefs+foFileHash+8:], sum[:])
		return b
	}
	var firstRef int
	for i, e := range r.Extents() {
		if e.Kind == KindRef {
			firstRef = i
			break
		}
	}
	at := int(r.Footer().TableOff) + firstRef*ExtentEntrySize
	cases := map[string]func(b []byte){
		"ref count":        func(b []byte) { le.PutUint64(b[fo+foRefBlocks:], r.Footer().RefBlocks+1) },
		"ref comp":         func(b []byte) { b[at+13] = 1 },
		"ref offset":       func(b []byte) { le.PutUint64(b[at+16:], 5) },
		"ref too long":     func(b []byte) { le.PutUint32(b[at+8:], MaxExtentBlocks+1) },
		"data as ref":      func(b []byte) { b[int(r.Footer().TableOff)+12] = byte(KindRef) },
		"unknown kind":     func(b []byte) { b[at+12] = 4 },
		"hashes misplaced": func(b []byte) { le.PutUint64(b[fo+foDataBlocks:], r.Footer().DataBlocks+1) },
	}
	for name, f := range cases {
		b := reseal(func() []byte { b := bytes.Clone(file); f(b); return b }())
		checkBad(t, b, name)
	}
	// A ref hash changed: the file hash catches it.
	b := bytes.Clone(file)
	b[int(r.Footer().HashesOff)+int(r.hashIdx[firstRef])*HashSize] ^= 1
	if err := mustOpen(t, b).Verify(); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("changed ref hash: %v", err)
	}
	// Every truncation is refused.
	for n := 0; n < len(file); n += 1 + n/50 {
		if _, err := Open(bytes.NewReader(file[:n]), int64(n)); err == nil {
			t.Fatalf("truncated to %d bytes: opened", n)
		}
	}
	// The same bytes labelled version 1 (header re-hashed) are refused.
	v1 := bytes.Clone(file)
	le.PutUint16(v1[hoVersion:], Version)
	hl := int(le.Uint16(v1[hoHdrLen:]))
	sum := hashSum(v1[:hl-HashSize])
	copy(v1[hl-HashSize:], sum[:])
	if _, err := Open(bytes.NewReader(v1), int64(len(v1))); err == nil {
		t.Fatal("version 2 content labelled version 1 opened")
	}
}
