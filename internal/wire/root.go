package wire

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"os"
	"runtime"
	"sync"

	"github.com/zeebo/blake3"

	"github.com/standin/standin/internal/fsutil"
)

// The BLAKE3 root of an image proves two copies equal without sending
// either: root = BLAKE3(size as u64 little-endian ‖ h0 ‖ h1 ‖ …), where hi is
// the recorded hash of 4 KiB block i (BLAKE3-256 of the block, the last one
// zero-padded; 32 zero bytes for an all-zero block — the layout of the
// replica's hashes.bin). A planned failover compares the primary's root with
// the root of the copy the replica promotes.

const rootBlock = 4096

var zeroBlock = make([]byte, rootBlock)

// BlockHash is the recorded hash of one 4 KiB block (zero-padded).
func BlockHash(b []byte) [32]byte {
	if len(b) < rootBlock {
		b = append(append(make([]byte, 0, rootBlock), b...), zeroBlock[len(b):]...)
	}
	if bytes.Equal(b, zeroBlock) {
		return [32]byte{}
	}
	return blake3.Sum256(b)
}

// Rooter computes an image root from the block hashes, in block order.
type Rooter struct {
	h *blake3.Hasher
}

// NewRooter starts the root of an image of size bytes.
func NewRooter(size int64) *Rooter {
	r := &Rooter{h: blake3.New()}
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], uint64(size))
	r.h.Write(b[:])
	return r
}

// Add appends block hashes (32 bytes each, in order).
func (r *Rooter) Add(hashes []byte) { r.h.Write(hashes) }

// Write is Add as an io.Writer (e.g. to io.Copy a hashes.bin file).
func (r *Rooter) Write(hashes []byte) (int, error) {
	r.Add(hashes)
	return len(hashes), nil
}

// Sum returns the root.
func (r *Rooter) Sum() [32]byte {
	var out [32]byte
	r.h.Sum(out[:0])
	return out
}

// HashImage reads the first size bytes of f (holes are not read) and returns
// the image root. When hashes is not nil, every block hash is also written to
// it, in order (the hashes.bin layout). Blocks are hashed in parallel.
func HashImage(ctx context.Context, f *os.File, size int64, hashes io.Writer) ([32]byte, error) {
	const chunk = 1 << 20 // bytes per work item
	exts, err := fsutil.DataExtents(f, size)
	if err != nil {
		return [32]byte{}, err
	}
	nChunks := (size + chunk - 1) / chunk
	// data[i]: chunk i overlaps a data extent.
	data := make([]bool, nChunks)
	for _, e := range exts {
		for c := e.Off / chunk; c*chunk < e.Off+e.Len && c < nChunks; c++ {
			data[c] = true
		}
	}
	workers := max(1, min(runtime.GOMAXPROCS(0), 8))
	type item struct {
		idx  int64
		out  []byte
		err  error
		done chan struct{}
	}
	items := make(chan *item, workers*2)
	order := make(chan *item, workers*2)
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	go func() {
		defer close(order)
		defer close(items)
		for c := int64(0); c < nChunks; c++ {
			it := &item{idx: c, done: make(chan struct{})}
			select {
			case order <- it:
			case <-ctx.Done():
				return
			}
			select {
			case items <- it:
			case <-ctx.Done():
				return
			}
		}
	}()
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, chunk)
			for it := range items {
				off := it.idx * chunk
				n := min(chunk, size-off)
				nb := (n + rootBlock - 1) / rootBlock
				it.out = make([]byte, nb*32)
				if data[it.idx] {
					if _, err := f.ReadAt(buf[:n], off); err != nil && err != io.EOF {
						it.err = fmt.Errorf("hashing %s at %d: %w", f.Name(), off, err)
					} else {
						for i := int64(0); i < nb; i++ {
							b := buf[i*rootBlock : min(n, (i+1)*rootBlock)]
							h := BlockHash(b)
							copy(it.out[i*32:], h[:])
						}
					}
				}
				close(it.done)
			}
		}()
	}
	r := NewRooter(size)
	for it := range order {
		select {
		case <-it.done:
		case <-ctx.Done():
			return [32]byte{}, ctx.Err()
		}
		if it.err != nil {
			return [32]byte{}, it.err
		}
		r.Add(it.out)
		if hashes != nil {
			if _, err := hashes.Write(it.out); err != nil {
				return [32]byte{}, err
			}
		}
	}
	if err := ctx.Err(); err != nil {
		return [32]byte{}, err
	}
	return r.Sum(), nil
}
