package dedup

import (
	"bytes"
	"errors"
	"fmt"

	"github.com/klauspost/compress/zstd"
)

const (
	packMagic      = "SDPACK01"
	frameChunks    = 64        // chunks per zstd frame (256 KiB raw)
	maxPackChunks  = 1 << 16   // 256 MiB raw: refuse larger packs
	maxManifestRaw = 256 << 20 // decoded run list limit
)

// packWriter accumulates unique chunks into frames and frames into one pack.
type packWriter struct {
	enc      *zstd.Encoder
	num      uint64
	first    uint64
	hashes   [][32]byte
	frames   [][]byte
	counts   []uint32
	pending  []byte // raw chunks of the frame being filled
	compSize int
}

func (p *packWriter) chunks() int { return len(p.hashes) }

func (p *packWriter) add(h [32]byte, chunk []byte) {
	p.hashes = append(p.hashes, h)
	p.pending = append(p.pending, chunk...)
	if len(p.pending) == frameChunks*chunkSize {
		p.flushFrame()
	}
}

func (p *packWriter) flushFrame() {
	if len(p.pending) == 0 {
		return
	}
	c := p.enc.EncodeAll(p.pending, make([]byte, 0, len(p.pending)/2))
	p.frames = append(p.frames, c)
	p.counts = append(p.counts, uint32(len(p.pending)/chunkSize))
	p.compSize += len(c)
	p.pending = p.pending[:0]
}

// size is the compressed size so far plus an estimate for the open frame.
func (p *packWriter) size() int { return p.compSize + len(p.pending)/2 }

// encode returns the pack's plaintext and resets the writer for the next pack.
func (p *packWriter) encode() []byte {
	p.flushFrame()
	w := &wr{b: make([]byte, 0, 32+8*len(p.frames)+32*len(p.hashes)+p.compSize)}
	w.bytes([]byte(packMagic))
	w.u64(p.num)
	w.u64(p.first)
	w.u32(uint32(len(p.hashes)))
	w.u32(uint32(len(p.frames)))
	for i, f := range p.frames {
		w.u32(uint32(len(f)))
		w.u32(p.counts[i])
	}
	for _, h := range p.hashes {
		w.bytes(h[:])
	}
	for _, f := range p.frames {
		w.bytes(f)
	}
	p.num++
	p.first += uint64(len(p.hashes))
	p.hashes, p.frames, p.counts, p.compSize = nil, nil, nil, 0
	return w.b
}

type packHeader struct {
	num, first uint64
	hashes     [][32]byte
	frameLen   []uint32
	frameCnt   []uint32
	data       []byte
}

// parsePackHeader checks the pack's table against what the index says.
func parsePackHeader(plain []byte, num, first uint64, count uint32) (*packHeader, error) {
	if len(plain) < len(packMagic) || string(plain[:len(packMagic)]) != packMagic {
		return nil, errors.New("dedup: not a pack")
	}
	r := &rd{b: plain[len(packMagic):]}
	h := &packHeader{num: r.u64(), first: r.u64()}
	n, nf := r.u32(), r.u32()
	if r.err != nil || h.num != num || h.first != first || n != count || n == 0 || n > maxPackChunks || nf == 0 || nf > n {
		return nil, fmt.Errorf("dedup: pack %d: header does not match index", num)
	}
	var total uint64
	var data uint64
	for i := uint32(0); i < nf; i++ {
		l, c := r.u32(), r.u32()
		if c == 0 || c > frameChunks {
			return nil, fmt.Errorf("dedup: pack %d: bad frame", num)
		}
		h.frameLen = append(h.frameLen, l)
		h.frameCnt = append(h.frameCnt, c)
		total += uint64(c)
		data += uint64(l)
	}
	if r.err != nil || total != uint64(n) || uint64(len(r.b)) != 32*uint64(n)+data {
		return nil, fmt.Errorf("dedup: pack %d: table does not add up", num)
	}
	h.hashes = make([][32]byte, n)
	for i := range h.hashes {
		h.hashes[i] = r.h32()
	}
	h.data = r.b
	return h, nil
}

var zdec, _ = zstd.NewReader(nil, zstd.WithDecoderConcurrency(0), zstd.WithDecoderMaxMemory(frameChunks*chunkSize))

// decodePack decompresses every frame and checks every chunk against its
// hash. It returns the raw chunks back to back.
func (h *packHeader) decode(hash func([]byte) [32]byte) ([]byte, error) {
	raw := make([]byte, 0, len(h.hashes)*chunkSize)
	off := 0
	for i, l := range h.frameLen {
		want := int(h.frameCnt[i]) * chunkSize
		out, err := zdec.DecodeAll(h.data[off:off+int(l)], raw[len(raw):len(raw):len(raw)+want])
		if err != nil {
			return nil, fmt.Errorf("dedup: pack %d frame %d: %w", h.num, i, err)
		}
		if len(out) != want {
			return nil, fmt.Errorf("dedup: pack %d frame %d: wrong size", h.num, i)
		}
		if &out[0] != &raw[:len(raw)+1][len(raw)] {
			copy(raw[len(raw):len(raw)+want], out)
		}
		raw = raw[:len(raw)+want]
		off += int(l)
	}
	for i := range h.hashes {
		if hash(raw[i*chunkSize:(i+1)*chunkSize]) != h.hashes[i] {
			return nil, fmt.Errorf("dedup: pack %d: chunk %d fails its hash", h.num, h.first+uint64(i))
		}
	}
	return raw, nil
}

var zeroChunk = make([]byte, chunkSize)

func isZero(b []byte) bool { return bytes.Equal(b, zeroChunk[:len(b)]) }
