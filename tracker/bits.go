package tracker

import "encoding/binary"

// bits is a plain growable bitset, used for write-intent extents (one bit per
// 4 MiB by default: 32 KiB per TiB, so a roaring bitmap buys nothing here).
type bits []uint64

func (b bits) has(i uint64) bool {
	w := i / 64
	return w < uint64(len(b)) && b[w]&(1<<(i%64)) != 0
}

func (b *bits) set(i uint64) {
	w := i / 64
	for uint64(len(*b)) <= w {
		*b = append(*b, 0)
	}
	(*b)[w] |= 1 << (i % 64)
}

func (b bits) clone() bits { return append(bits(nil), b...) }

func (b *bits) or(o bits) {
	for i, w := range o {
		if w == 0 {
			continue
		}
		for len(*b) <= i {
			*b = append(*b, 0)
		}
		(*b)[i] |= w
	}
}

// and returns b ∩ o.
func (b bits) and(o bits) bits {
	n := min(len(b), len(o))
	out := make(bits, n)
	for i := 0; i < n; i++ {
		out[i] = b[i] & o[i]
	}
	return out
}

func (b bits) count() int {
	n := 0
	for _, w := range b {
		for ; w != 0; w &= w - 1 {
			n++
		}
	}
	return n
}

func (b bits) empty() bool {
	for _, w := range b {
		if w != 0 {
			return false
		}
	}
	return true
}

// each calls f for every set bit in ascending order.
func (b bits) each(f func(i uint64)) {
	for wi, w := range b {
		for ; w != 0; w &= w - 1 {
			tz := uint64(0)
			for x := w; x&1 == 0; x >>= 1 {
				tz++
			}
			f(uint64(wi)*64 + tz)
		}
	}
}

// word returns word i or 0 past the end.
func (b bits) word(i int) uint64 {
	if i < len(b) {
		return b[i]
	}
	return 0
}

// bytesOf encodes words [w0, w1) little endian.
func (b bits) bytesOf(w0, w1 int) []byte {
	out := make([]byte, (w1-w0)*8)
	for i := w0; i < w1; i++ {
		binary.LittleEndian.PutUint64(out[(i-w0)*8:], b.word(i))
	}
	return out
}

func bitsFromBytes(p []byte) bits {
	b := make(bits, len(p)/8)
	for i := range b {
		b[i] = binary.LittleEndian.Uint64(p[i*8:])
	}
	return b
}
