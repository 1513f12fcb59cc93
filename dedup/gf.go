package dedup

import (
	"fmt"
	"sync"

	"github.com/klauspost/reedsolomon"
)

// Parity matrix. Every group uses the systematic code [I; C] over GF(2^8)
// with the generating polynomial x^8+x^4+x^3+x^2+1 (0x11d, the field of
// klauspost/reedsolomon), where C is the Cauchy matrix
//
//	C[j][i] = 1 / ((255-j) XOR i)   parity row j < P, data column i < D, D+P <= 256
//
// Every square submatrix of a Cauchy matrix is invertible, so any P lost
// shards of a group can be rebuilt. Column i does not depend on D: parity can
// be accumulated shard by shard (EncodeIdx) before the group's final size is
// known, and a group that ends early is simply a group with fewer data shards.

var gfExp [512]byte
var gfLog [256]int

func init() {
	x := 1
	for i := 0; i < 255; i++ {
		gfExp[i] = byte(x)
		gfLog[x] = i
		x <<= 1
		if x&0x100 != 0 {
			x ^= 0x11d
		}
	}
	for i := 255; i < 512; i++ {
		gfExp[i] = gfExp[i-255]
	}
}

func gfInv(a byte) byte {
	if a == 0 {
		panic("dedup: inverse of 0")
	}
	return gfExp[255-gfLog[a]]
}

func cauchyMatrix(p, d int) [][]byte {
	m := make([][]byte, p)
	for j := range m {
		m[j] = make([]byte, d)
		for i := range m[j] {
			m[j][i] = gfInv(byte(255-j) ^ byte(i))
		}
	}
	return m
}

var (
	codecMu sync.Mutex
	codecs  = map[[2]int]reedsolomon.Encoder{}
)

// rsCodec returns the (cached) encoder for d data and p parity shards.
func rsCodec(d, p int) (reedsolomon.Encoder, error) {
	if d < 1 || p < 1 || d+p > 256 {
		return nil, fmt.Errorf("dedup: bad group geometry %d+%d", d, p)
	}
	codecMu.Lock()
	defer codecMu.Unlock()
	if e, ok := codecs[[2]int{d, p}]; ok {
		return e, nil
	}
	e, err := reedsolomon.New(d, p, reedsolomon.WithCustomMatrix(cauchyMatrix(p, d)))
	if err != nil {
		return nil, err
	}
	if len(codecs) > 512 {
		clear(codecs)
	}
	codecs[[2]int{d, p}] = e
	return e, nil
}

// parityAcc accumulates the parity shards of one group as its data shards
// arrive. Shards may have different lengths: the code works byte position by
// byte position, so a shorter shard is a shard padded with zeros, and the
// parity is as long as the longest data shard.
type parityAcc struct {
	p   int
	d   int // data shards added
	acc [][]byte
	pad []byte
}

func newParityAcc(p int) *parityAcc { return &parityAcc{p: p, acc: make([][]byte, p)} }

// add folds data shard number a.d into the parity.
func (a *parityAcc) add(data []byte) error {
	idx := a.d
	a.d++
	if a.p == 0 {
		return nil
	}
	if len(data) > len(a.acc[0]) {
		for j := range a.acc {
			a.acc[j] = append(a.acc[j], make([]byte, len(data)-len(a.acc[j]))...)
		}
	}
	n := len(a.acc[0])
	if n == 0 {
		return nil
	}
	in := data
	if len(data) < n {
		if cap(a.pad) < n {
			a.pad = make([]byte, n)
		}
		in = a.pad[:n]
		copy(in, data)
		clear(in[len(data):])
	}
	enc, err := rsCodec(idx+1, a.p)
	if err != nil {
		return err
	}
	return enc.EncodeIdx(in, idx, a.acc)
}
