package wire

import (
	"bytes"
	"testing"
)

// FuzzDecodeHeld decodes held query bodies (sent by a primary to the
// replica). An accepted body is canonical: it re-encodes to itself.
func FuzzDecodeHeld(f *testing.F) {
	h := bytes.Repeat([]byte{3}, 3*HashSize)
	f.Add(EncodeHeld([]HeldRun{{Start: 0, Hashes: h[:HashSize]}, {Start: 2, Hashes: h}}), uint64(12))
	f.Add(EncodeHeld([]HeldRun{{Start: 1<<40 - 1, Hashes: h[:HashSize]}}), uint64(1<<40))
	f.Add([]byte{}, uint64(1))
	f.Fuzz(func(t *testing.T, data []byte, maxBlocks uint64) {
		runs, total, err := DecodeHeld(data, maxBlocks)
		if err != nil {
			return
		}
		n := 0
		var next uint64
		for i, r := range runs {
			if r.Blocks() == 0 || r.Start < next || r.Start+uint64(r.Blocks()) > maxBlocks {
				t.Fatalf("run %d (%d+%d) accepted (image of %d blocks)", i, r.Start, r.Blocks(), maxBlocks)
			}
			next = r.Start + uint64(r.Blocks())
			n += r.Blocks()
		}
		if n != total || total > MaxHeldBlocks {
			t.Fatalf("total %d, runs hold %d", total, n)
		}
		if enc := EncodeHeld(runs); !bytes.Equal(enc, data) {
			t.Fatalf("re-encoded body differs")
		}
	})
}

// FuzzParseRoot parses image roots of failover requests.
func FuzzParseRoot(f *testing.F) {
	f.Add(RootHex([32]byte{1, 2, 3}))
	f.Add("")
	f.Fuzz(func(t *testing.T, s string) {
		r, err := ParseRoot(s)
		if err != nil {
			return
		}
		if r2, err := ParseRoot(RootHex(r)); err != nil || r2 != r {
			t.Fatalf("root round trip: %v", err)
		}
	})
}
