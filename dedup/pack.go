package dedup

import (
	"bytes"
	"errors"
	"fmt"

	"github.com/klauspost/compress/zstd"
)

const (
	packMagic      = "SDPACK02"
	idLen          = 16        // bytes of a chunk id kept in pack tables and the root
	frameChunks    = 512       // chunks per zstd frame written (2 MiB raw)
	maxFrameChunks = 1024      // largest frame accepted
	maxPackChunks  = 1 << 16   // 256 MiB raw: refuse larger packs
	maxManifestRaw = 256 << 20 // decoded run list limit
	packHeaderLen  = len(packMagic) + 8 + 8 + 4 + 4
)

type shortID = [idLen]byte

func short(id *[32]byte) (s shortID) {
	copy(s[:], id[:idLen])
	return
}

// frameLen is the number of chunks per frame for a pack size: 512, fewer for
// small packs (a pack holds whole frames).
func frameLen(packSize int) int { return min(frameChunks, max(1, packSize/(2*chunkSize))) }

// frame is a run of consecutive unique chunks compressed on its own. Frames
// are cut from the stream of unique chunks independently of packs (every
// frameLen chunks), so they can be compressed in parallel and the seed stays
// deterministic.
type frame struct {
	first uint64 // global number of the first chunk
	ids   [][32]byte
	raw   []byte // len(ids) chunks
	comp  []byte
	done  chan struct{}
}

func tableLen(nframes, nchunks int) int { return packHeaderLen + 8*nframes + idLen*nchunks }

// packLen is the encoded length of a pack of these frames.
func packLen(frames []*frame) int {
	n := packHeaderLen
	for _, f := range frames {
		n += 8 + idLen*len(f.ids) + len(f.comp)
	}
	return n
}

// maxPackLen bounds the stored length of any pack for a given PackSize and
// frame length: a pack is closed before a frame would take it over PackSize,
// so only a pack of a single frame can be larger.
func maxPackLen(packSize, fc int) int64 {
	one := tableLen(1, fc) + zstdBound(fc*chunkSize)
	return int64(max(packSize, one)) + int64(sealOverhead)
}

// zstdBound is an upper bound of the size of a zstd frame of n input bytes
// (raw blocks of at most 128 KiB, 3-byte block headers, frame header and
// checksum).
func zstdBound(n int) int { return n + (n>>17+1)*3 + 32 }

// encodePack returns the pack's plaintext.
func encodePack(num uint64, frames []*frame) []byte {
	var nchunks int
	for _, f := range frames {
		nchunks += len(f.ids)
	}
	w := &wr{b: make([]byte, 0, packLen(frames))}
	w.bytes([]byte(packMagic))
	w.u64(num)
	w.u64(frames[0].first)
	w.u32(uint32(nchunks))
	w.u32(uint32(len(frames)))
	for _, f := range frames {
		w.u32(uint32(len(f.comp)))
		w.u32(uint32(len(f.ids)))
	}
	for _, f := range frames {
		for i := range f.ids {
			w.bytes(f.ids[i][:idLen])
		}
	}
	for _, f := range frames {
		w.bytes(f.comp)
	}
	return w.b
}

type packHeader struct {
	num, first uint64
	ids        []shortID
	frameLen   []uint32
	frameCnt   []uint32
	frameOff   []int64  // plaintext offset of each frame
	frameFirst []uint64 // first chunk (relative to the pack) of each frame, plus the end
}

// packTableSize returns the length of the table of a pack from its first
// packHeaderLen plaintext bytes (checked against the index).
func packTableSize(head []byte, num, first uint64, count uint32) (int, error) {
	if len(head) < packHeaderLen || string(head[:len(packMagic)]) != packMagic {
		return 0, errors.New("dedup: not a pack")
	}
	r := &rd{b: head[len(packMagic):packHeaderLen]}
	pn, pf, n, nf := r.u64(), r.u64(), r.u32(), r.u32()
	if pn != num || pf != first || n != count || n == 0 || n > maxPackChunks || nf == 0 || nf > n {
		return 0, fmt.Errorf("dedup: pack %d: header does not match index", num)
	}
	return tableLen(int(nf), int(n)), nil
}

// parsePackTable parses a pack's table (plain holds at least the table) of a
// pack whose plaintext is plainLen bytes, checking it against the index.
func parsePackTable(plain []byte, plainLen int64, num, first uint64, count uint32) (*packHeader, error) {
	tl, err := packTableSize(plain, num, first, count)
	if err != nil {
		return nil, err
	}
	if len(plain) < tl || int64(tl) > plainLen {
		return nil, fmt.Errorf("dedup: pack %d: truncated table", num)
	}
	r := &rd{b: plain[packHeaderLen:tl]}
	nf := int(uint32le(plain[len(packMagic)+20:]))
	h := &packHeader{num: num, first: first}
	var total uint64
	off := int64(tl)
	for i := 0; i < nf; i++ {
		l, c := r.u32(), r.u32()
		if c == 0 || c > maxFrameChunks || l == 0 {
			return nil, fmt.Errorf("dedup: pack %d: bad frame", num)
		}
		h.frameLen = append(h.frameLen, l)
		h.frameCnt = append(h.frameCnt, c)
		h.frameOff = append(h.frameOff, off)
		h.frameFirst = append(h.frameFirst, total)
		total += uint64(c)
		off += int64(l)
	}
	h.frameFirst = append(h.frameFirst, total)
	if r.err != nil || total != uint64(count) || off != plainLen {
		return nil, fmt.Errorf("dedup: pack %d: table does not add up", num)
	}
	h.ids = make([]shortID, count)
	for i := range h.ids {
		copy(h.ids[i][:], r.take(idLen))
	}
	return h, nil
}

func uint32le(b []byte) uint32 {
	return uint32(b[0]) | uint32(b[1])<<8 | uint32(b[2])<<16 | uint32(b[3])<<24
}

// frameOf returns the frame holding pack-relative chunk rel.
func (h *packHeader) frameOf(rel uint64) int {
	lo, hi := 0, len(h.frameCnt)
	for lo < hi {
		m := (lo + hi) / 2
		if h.frameFirst[m+1] > rel {
			hi = m
		} else {
			lo = m + 1
		}
	}
	return lo
}

var zdec, _ = zstd.NewReader(nil, zstd.WithDecoderConcurrency(0), zstd.WithDecoderMaxMemory(maxFrameChunks*chunkSize))

// decodeFrame decompresses frame i (its compressed bytes in comp) into buf
// (reused when large enough). It does not check the chunks: see verify.
func (h *packHeader) decodeFrame(i int, comp, buf []byte) ([]byte, error) {
	want := int(h.frameCnt[i]) * chunkSize
	if cap(buf) < want {
		buf = make([]byte, 0, want)
	}
	out, err := zdec.DecodeAll(comp, buf[:0])
	if err != nil {
		return nil, fmt.Errorf("dedup: pack %d frame %d: %w", h.num, i, err)
	}
	if len(out) != want {
		return nil, fmt.Errorf("dedup: pack %d frame %d: wrong size", h.num, i)
	}
	return out, nil
}

// verify checks n chunks of decoded frame i, from frame-relative chunk at,
// against their ids. ids, if not nil, receives the n full ids computed.
func (h *packHeader) verify(i int, raw []byte, at, n uint64, hash func([]byte) [32]byte, ids [][32]byte) error {
	rel := h.frameFirst[i]
	for c := at; c < at+n; c++ {
		id := hash(raw[c*chunkSize : (c+1)*chunkSize])
		if short(&id) != h.ids[rel+c] {
			return fmt.Errorf("dedup: pack %d: chunk %d fails its id", h.num, h.first+rel+c)
		}
		if ids != nil {
			ids[c-at] = id
		}
	}
	return nil
}

// decode decompresses every frame of a whole plaintext and checks every
// chunk (tests).
func (h *packHeader) decode(plain []byte, hash func([]byte) [32]byte) ([]byte, error) {
	var raw []byte
	for i := range h.frameLen {
		b, err := h.decodeFrame(i, plain[h.frameOff[i]:h.frameOff[i]+int64(h.frameLen[i])], nil)
		if err != nil {
			return nil, err
		}
		if err := h.verify(i, b, 0, uint64(h.frameCnt[i]), hash, nil); err != nil {
			return nil, err
		}
		raw = append(raw, b...)
	}
	return raw, nil
}

var zeroChunk = make([]byte, chunkSize)

func isZero(b []byte) bool { return bytes.Equal(b, zeroChunk[:len(b)]) }
