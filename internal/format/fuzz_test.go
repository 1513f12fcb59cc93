package format

import (
	"bytes"
	"fmt"
	"os"
	"testing"

	"github.com/standin/standin/internal/testutil"
)

// FuzzOpen feeds arbitrary bytes to Open, Verify and ReadExtent. None of them
// may panic, and Open may not allocate much more than the input size.
// ReadExtent may allocate its result (at most MaxExtentBlocks*BlockSize).
func FuzzOpen(f *testing.F) {
	if b, err := os.ReadFile(goldenPath); err == nil {
		f.Add(b)
	}
	if b, err := os.ReadFile("testdata/example-v1.cyc"); err == nil {
		f.Add(b)
	}
	if b, err := os.ReadFile(goldenRefsPath); err == nil {
		f.Add(b) // version 2, with ref extents
	}
	f.Add(mustWrite(f, testHeader(0), WriterOptions{}, func(*Writer) {}))
	f.Add(mustWrite(f, testHeader(5*BlockSize), WriterOptions{}, func(w *Writer) {
		d := make([]byte, 2*BlockSize)
		d[BlockSize+7] = 1
		if err := w.WriteBlocks(1, d); err != nil {
			f.Fatal(err)
		}
	}))
	f.Add([]byte(magic))
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := Open(bytes.NewReader(data), int64(len(data)))
		testutil.Allocs(t, fmt.Sprintf("Open of %d bytes", len(data)), uint64(4*len(data))+64<<10, func() {
			Open(bytes.NewReader(data), int64(len(data)))
		})
		if err != nil {
			return
		}
		_ = r.Verify()
		buf := make([]byte, 0, MaxExtentBlocks*BlockSize)
		for i := range r.Extents() {
			_, _ = r.ReadExtent(i, buf)
			testutil.Allocs(t, fmt.Sprintf("ReadExtent(%d) of a %d-byte file", i, len(data)), uint64(4*len(data))+256<<10, func() {
				r.ReadExtent(i, buf)
			})
		}
	})
}
