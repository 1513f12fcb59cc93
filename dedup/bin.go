package dedup

import (
	"encoding/binary"
	"errors"
)

var errShort = errors.New("dedup: truncated data")

// rd is a bounds-checked little-endian reader; after the first short read
// every further read returns zero values and err stays set.
type rd struct {
	b   []byte
	err error
}

func (r *rd) take(n int) []byte {
	if r.err != nil || n < 0 || n > len(r.b) {
		if r.err == nil {
			r.err = errShort
		}
		return nil
	}
	v := r.b[:n]
	r.b = r.b[n:]
	return v
}

func (r *rd) u8() uint8 {
	b := r.take(1)
	if len(b) < 1 {
		return 0
	}
	return b[0]
}

func (r *rd) u16() uint16 {
	b := r.take(2)
	if len(b) < 2 {
		return 0
	}
	return binary.LittleEndian.Uint16(b)
}

func (r *rd) u32() uint32 {
	b := r.take(4)
	if len(b) < 4 {
		return 0
	}
	return binary.LittleEndian.Uint32(b)
}

func (r *rd) u64() uint64 {
	b := r.take(8)
	if len(b) < 8 {
		return 0
	}
	return binary.LittleEndian.Uint64(b)
}

func (r *rd) h32() (h [32]byte) {
	copy(h[:], r.take(32))
	return
}

func (r *rd) uvarint() uint64 {
	if r.err != nil {
		return 0
	}
	v, n := binary.Uvarint(r.b)
	if n <= 0 {
		r.err = errShort
		return 0
	}
	r.b = r.b[n:]
	return v
}

type wr struct{ b []byte }

func (w *wr) u8(v uint8)       { w.b = append(w.b, v) }
func (w *wr) u16(v uint16)     { w.b = binary.LittleEndian.AppendUint16(w.b, v) }
func (w *wr) u32(v uint32)     { w.b = binary.LittleEndian.AppendUint32(w.b, v) }
func (w *wr) u64(v uint64)     { w.b = binary.LittleEndian.AppendUint64(w.b, v) }
func (w *wr) bytes(v []byte)   { w.b = append(w.b, v...) }
func (w *wr) uvarint(v uint64) { w.b = binary.AppendUvarint(w.b, v) }
