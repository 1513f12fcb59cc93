package wire

import (
	"bytes"
	"encoding/binary"
	"testing"
)

func TestHeldEncoding(t *testing.T) {
	h := func(b byte) []byte { return bytes.Repeat([]byte{b}, HashSize) }
	runs := []HeldRun{{Start: 3, Hashes: append(h(1), h(2)...)}, {Start: 9, Hashes: h(3)}}
	b := EncodeHeld(runs)
	got, n, err := DecodeHeld(b, 10)
	if err != nil || n != 3 || len(got) != 2 || got[1].Start != 9 || !bytes.Equal(got[0].Hashes, runs[0].Hashes) {
		t.Fatalf("round trip: %+v %d %v", got, n, err)
	}
	bad := map[string][]byte{
		"beyond the image": EncodeHeld([]HeldRun{{Start: 9, Hashes: append(h(1), h(2)...)}}),
		"overlap":          EncodeHeld([]HeldRun{{Start: 3, Hashes: append(h(1), h(2)...)}, {Start: 4, Hashes: h(3)}}),
		"truncated hashes": b[:len(b)-1],
		"truncated header": b[:5],
		"empty run":        binary.LittleEndian.AppendUint32(binary.LittleEndian.AppendUint64(nil, 1), 0),
		"huge run":         binary.LittleEndian.AppendUint32(binary.LittleEndian.AppendUint64(nil, 1), 1<<31),
	}
	for name, b := range bad {
		if _, _, err := DecodeHeld(b, 10); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	// At most MaxHeldBlocks per query.
	big := []HeldRun{{Start: 0, Hashes: make([]byte, MaxHeldBlocks*HashSize)}, {Start: MaxHeldBlocks, Hashes: h(1)}}
	if _, _, err := DecodeHeld(EncodeHeld(big), 1<<20); err == nil {
		t.Error("more than MaxHeldBlocks accepted")
	}
	if _, _, err := DecodeHeld(EncodeHeld(big[:1]), 1<<20); err != nil {
		t.Errorf("MaxHeldBlocks refused: %v", err)
	}
}
