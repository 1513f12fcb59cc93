package wire

import (
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/zeebo/blake3"
)

// Chunk queries: before a base cycle (the first of a relationship, a new
// generation, a resync) is uploaded, the primary asks which of its 4 KiB
// blocks the replica already holds, by BLAKE3-256 block hash, and ships a
// thinned cycle whose held blocks are ref extents (internal/format KindRef).
//
// Region hashes make a resync cheap: a region is RegionBlocks consecutive
// blocks; its hash is the BLAKE3-256 of the concatenated 32-byte block
// entries, where an entry is the block's BLAKE3-256 — or 32 zero bytes for an
// all-zero block, a hole, or a block past the image end (the convention of
// the replica's hashes.bin). Only blocks of regions whose hashes differ are
// queried.

// Block status in a held reply.
const (
	HeldNone      byte = 0 // the replica does not hold the content
	HeldSame      byte = 1 // this image holds it at the same block (the replica keeps it)
	HeldElsewhere byte = 2 // the replica holds it elsewhere (another image or position)
)

// Limits of one request.
const (
	RegionBlocks  = 256     // blocks per region (1 MiB)
	MaxHeldBlocks = 1 << 16 // blocks per held query (256 MiB of data, 2 MiB of hashes)
	MaxRegions    = 1 << 16 // regions per regions query (64 GiB of image)
	HashSize      = 32
	heldRunHeader = 12 // start u64 + count u32
)

// HeldRun is a run of consecutive blocks with their hashes (32 bytes each).
type HeldRun struct {
	Start  uint64
	Hashes []byte
}

// Blocks returns the number of blocks of the run.
func (r HeldRun) Blocks() int { return len(r.Hashes) / HashSize }

// EncodeHeld encodes a held query body: per run, start u64 | count u32 |
// count × 32-byte hashes, little endian; runs ascending, not overlapping.
func EncodeHeld(runs []HeldRun) []byte {
	n := 0
	for _, r := range runs {
		n += heldRunHeader + len(r.Hashes)
	}
	b := make([]byte, 0, n)
	for _, r := range runs {
		b = binary.LittleEndian.AppendUint64(b, r.Start)
		b = binary.LittleEndian.AppendUint32(b, uint32(r.Blocks()))
		b = append(b, r.Hashes...)
	}
	return b
}

// DecodeHeld decodes a held query body, checking that runs are ascending,
// non-empty, within maxBlocks blocks of image and MaxHeldBlocks in total.
// The hashes alias b.
func DecodeHeld(b []byte, maxBlocks uint64) ([]HeldRun, int, error) {
	var runs []HeldRun
	total := 0
	var next uint64
	for len(b) > 0 {
		if len(b) < heldRunHeader {
			return nil, 0, errors.New("held query: truncated run header")
		}
		start := binary.LittleEndian.Uint64(b)
		count := int(binary.LittleEndian.Uint32(b[8:]))
		b = b[heldRunHeader:]
		if count == 0 || count > MaxHeldBlocks-total {
			return nil, 0, fmt.Errorf("held query: run of %d blocks (at most %d blocks per query)", count, MaxHeldBlocks)
		}
		if count*HashSize > len(b) {
			return nil, 0, errors.New("held query: truncated hashes")
		}
		if (len(runs) > 0 && start < next) || start >= maxBlocks || uint64(count) > maxBlocks-start {
			return nil, 0, fmt.Errorf("held query: blocks %d..%d out of order or beyond the image (%d blocks)", start, start+uint64(count)-1, maxBlocks)
		}
		runs = append(runs, HeldRun{Start: start, Hashes: b[:count*HashSize]})
		b = b[count*HashSize:]
		next = start + uint64(count)
		total += count
	}
	return runs, total, nil
}

// RegionHash returns the hash of one region from its block entries (32
// bytes per block; see the package comment for the zero convention).
func RegionHash(entries []byte) [32]byte { return blake3.Sum256(entries) }

// ZeroBlockHash is the BLAKE3-256 of an all-zero 4 KiB block; its entry in
// a region is 32 zero bytes instead.
var ZeroBlockHash = blake3.Sum256(make([]byte, 4096))
