package dedup

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/zeebo/blake3"
)

const manifestMagic = "SDMANI02"

// Manifest describes one image of a seed.
type Manifest struct {
	Name       string   // image name (validated with ValidImageName)
	ID         [16]byte // image identity (UUID)
	Generation uint64   // image generation
	Seq        uint64   // cut sequence: the relationship's base
	CutTime    time.Time
	GroupCut   [16]byte // id shared by all images of one crash-consistent cut
	Size       int64    // image size in bytes
	Root       [32]byte // BLAKE3 over (u64 chunk index, 16-byte chunk id) of every stored chunk, in image order
	Chunks     int64    // stored (non-hole) chunks
	Allocated  int64    // bytes of stored chunks, the last one trimmed at Size
	SeedID     [16]byte // the seed this manifest was read from (not stored in the manifest)

	runs []run
}

// run maps Count consecutive image chunks starting at Index to consecutive
// global chunk ids starting at Global.
type run struct{ Index, Count, Global uint64 }

func appendRun(runs []run, idx, global uint64) []run {
	if n := len(runs); n > 0 {
		l := &runs[n-1]
		if l.Index+l.Count == idx && l.Global+l.Count == global {
			l.Count++
			return runs
		}
	}
	return append(runs, run{idx, 1, global})
}

func imageChunks(size int64) uint64 { return uint64((size + chunkSize - 1) / chunkSize) }

func encodeManifest(m *Manifest, enc *zstd.Encoder) []byte {
	var raw []byte
	raw = binary.AppendUvarint(raw, uint64(len(m.runs)))
	var prevEnd, prevGlobal uint64
	for _, r := range m.runs {
		raw = binary.AppendUvarint(raw, r.Index-prevEnd)
		raw = binary.AppendUvarint(raw, r.Count)
		raw = binary.AppendVarint(raw, int64(r.Global-prevGlobal))
		prevEnd, prevGlobal = r.Index+r.Count, r.Global+r.Count
	}
	comp := enc.EncodeAll(raw, nil)
	w := &wr{}
	w.bytes([]byte(manifestMagic))
	w.u16(uint16(len(m.Name)))
	w.bytes([]byte(m.Name))
	w.bytes(m.ID[:])
	w.u64(m.Generation)
	w.u64(m.Seq)
	w.u64(uint64(timeNanos(m.CutTime)))
	w.bytes(m.GroupCut[:])
	w.u64(uint64(m.Size))
	w.u64(uint64(m.Chunks))
	w.bytes(m.Root[:])
	w.u32(uint32(len(raw)))
	w.u32(uint32(len(comp)))
	w.bytes(comp)
	return w.b
}

// manifestWindow is the largest zstd window of a run list: the encoder's
// default window (8 MiB); smaller lists are single frames of their own size.
const manifestWindow = 8 << 20

// decodeRunList decompresses a manifest's run list of rawLen bytes. It
// streams, so the memory used grows with the bytes actually decoded (plus
// at most a manifestWindow window), never with a length the file claims
// (rawLen, the zstd frame's content size).
func decodeRunList(comp []byte, rawLen uint32) ([]byte, error) {
	zr, err := zstd.NewReader(bytes.NewReader(comp), zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true),
		zstd.WithDecoderMaxMemory(maxManifestRaw), zstd.WithDecoderMaxWindow(manifestWindow))
	if err != nil {
		return nil, err
	}
	defer zr.Close()
	raw, err := io.ReadAll(io.LimitReader(zr, int64(rawLen)+1))
	if err == nil && len(raw) != int(rawLen) {
		err = fmt.Errorf("%d bytes, want %d", len(raw), rawLen)
	}
	return raw, err
}

// decodeManifest parses and validates a manifest against the seed's chunk
// count. Every length and index is checked before use.
func decodeManifest(b []byte, totalChunks uint64) (*Manifest, error) {
	if len(b) < len(manifestMagic) || string(b[:len(manifestMagic)]) != manifestMagic {
		return nil, errors.New("dedup: not a manifest")
	}
	r := &rd{b: b[len(manifestMagic):]}
	m := &Manifest{}
	m.Name = string(r.take(int(r.u16())))
	copy(m.ID[:], r.take(16))
	m.Generation = r.u64()
	m.Seq = r.u64()
	m.CutTime = nanosTime(int64(r.u64()))
	copy(m.GroupCut[:], r.take(16))
	m.Size = int64(r.u64())
	m.Chunks = int64(r.u64())
	m.Root = r.h32()
	rawLen, compLen := r.u32(), r.u32()
	comp := r.take(int(compLen))
	if r.err != nil {
		return nil, errors.New("dedup: manifest truncated")
	}
	if len(r.b) != 0 {
		return nil, errors.New("dedup: manifest has trailing bytes")
	}
	if err := ValidImageName(m.Name); err != nil {
		return nil, err
	}
	if m.Size < 0 || m.Size > 1<<56 {
		return nil, fmt.Errorf("dedup: manifest %q: bad size", m.Name)
	}
	nimg := imageChunks(m.Size)
	if m.Chunks < 0 || uint64(m.Chunks) > nimg || rawLen > maxManifestRaw || uint64(rawLen) > 1+uint64(m.Chunks)*30 {
		return nil, fmt.Errorf("dedup: manifest %q: bad counts", m.Name)
	}
	raw, err := decodeRunList(comp, rawLen)
	if err != nil || len(raw) != int(rawLen) {
		return nil, fmt.Errorf("dedup: manifest %q: chunk list damaged: %v", m.Name, err)
	}
	rr := &rd{b: raw}
	nruns := rr.uvarint()
	if nruns > uint64(m.Chunks) {
		return nil, fmt.Errorf("dedup: manifest %q: bad run count", m.Name)
	}
	var prevEnd, prevGlobal, total uint64
	m.runs = make([]run, 0, nruns)
	for i := uint64(0); i < nruns; i++ {
		gap, cnt := rr.uvarint(), rr.uvarint()
		var dg int64
		if rr.err == nil {
			v, n := binary.Varint(rr.b)
			if n <= 0 {
				rr.err = errShort
			} else {
				dg, rr.b = v, rr.b[n:]
			}
		}
		if rr.err != nil {
			return nil, fmt.Errorf("dedup: manifest %q: chunk list truncated", m.Name)
		}
		idx := prevEnd + gap
		g := prevGlobal + uint64(dg)
		if cnt == 0 || gap > nimg || idx < prevEnd || cnt > nimg-idx || idx > nimg || g >= totalChunks || cnt > totalChunks-g {
			return nil, fmt.Errorf("dedup: manifest %q: chunk run %d out of range", m.Name, i)
		}
		m.runs = append(m.runs, run{idx, cnt, g})
		prevEnd, prevGlobal = idx+cnt, g+cnt
		total += cnt
	}
	if len(rr.b) != 0 || total != uint64(m.Chunks) {
		return nil, fmt.Errorf("dedup: manifest %q: chunk list does not add up", m.Name)
	}
	m.Allocated = allocated(m.runs, m.Size)
	return m, nil
}

func allocated(runs []run, size int64) int64 {
	var a int64
	for _, r := range runs {
		end := int64(r.Index+r.Count) * chunkSize
		if end > size {
			end = size
		}
		a += end - int64(r.Index)*chunkSize
	}
	return a
}

// rootHasher accumulates the manifest root: (u64 index, 16-byte id) per
// stored chunk.
type rootHasher struct {
	h   *blake3.Hasher
	buf [8 + idLen]byte
}

func newRootHasher() *rootHasher { return &rootHasher{h: blake3.New()} }

func (r *rootHasher) add(idx uint64, id shortID) {
	binary.LittleEndian.PutUint64(r.buf[:8], idx)
	copy(r.buf[8:], id[:])
	r.h.Write(r.buf[:])
}

func (r *rootHasher) sum() (s [32]byte) {
	r.h.Sum(s[:0])
	return
}

// timeNanos encodes a time as Unix nanoseconds, the zero time as 0.
func timeNanos(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

func nanosTime(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n).UTC()
}
