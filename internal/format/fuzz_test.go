package format

import (
	"bytes"
	"fmt"
	"os"
	"runtime/metrics"
	"testing"
)

func heapAllocs() uint64 {
	s := []metrics.Sample{{Name: "/gc/heap/allocs:bytes"}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}

// checkAllocs fails if f allocates more than limit bytes. The heap metric is
// process-wide (the fuzzing engine allocates too), so a measurement over the
// limit is repeated and only a consistent excess fails.
func checkAllocs(t *testing.T, what string, limit uint64, f func()) {
	var d uint64
	for range 3 {
		before := heapAllocs()
		f()
		if d = heapAllocs() - before; d <= limit {
			return
		}
	}
	t.Fatalf("%s allocated %d bytes (limit %d)", what, d, limit)
}

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
		checkAllocs(t, fmt.Sprintf("Open of %d bytes", len(data)), uint64(4*len(data))+64<<10, func() {
			Open(bytes.NewReader(data), int64(len(data)))
		})
		if err != nil {
			return
		}
		_ = r.Verify()
		buf := make([]byte, 0, MaxExtentBlocks*BlockSize)
		for i := range r.Extents() {
			_, _ = r.ReadExtent(i, buf)
			checkAllocs(t, fmt.Sprintf("ReadExtent(%d) of a %d-byte file", i, len(data)), uint64(4*len(data))+256<<10, func() {
				r.ReadExtent(i, buf)
			})
		}
	})
}
