package testutil

import (
	"bytes"
	"os"
	"runtime"
	"runtime/metrics"
	"testing"
	"time"

	"github.com/zeebo/blake3"
)

// HeapAllocs is the process's cumulative count of heap-allocated bytes.
func HeapAllocs() uint64 {
	s := []metrics.Sample{{Name: "/gc/heap/allocs:bytes"}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}

// Allocs fails if f allocates more than limit bytes. The heap metric is
// process-wide (the fuzzing engine allocates too), so a measurement over the
// limit is repeated and only a consistent excess fails.
func Allocs(t testing.TB, what string, limit uint64, f func()) {
	t.Helper()
	var d uint64
	for range 3 {
		before := HeapAllocs()
		f()
		if d = HeapAllocs() - before; d <= limit {
			return
		}
	}
	t.Fatalf("%s allocated %d bytes (limit %d)", what, d, limit)
}

// Deadline runs f and fails (with every goroutine's stack) if it takes
// longer than d: the fuzzing engine itself does not notice hangs.
func Deadline(t testing.TB, d time.Duration, f func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	select {
	case <-done:
	case <-time.After(d):
		buf := make([]byte, 1<<20)
		t.Fatalf("hang: not done after %v\n%s", d, buf[:runtime.Stack(buf, true)])
	}
}

// MemTempDir is a temporary directory in /dev/shm when there is one (and
// usable, if not nil, accepts it), else tb.TempDir(): stores and exports
// fsync a lot, which costs nothing there.
func MemTempDir(tb testing.TB, usable func(dir string) bool) string {
	tb.Helper()
	d, err := os.MkdirTemp("/dev/shm", "standin-fuzz-")
	if err != nil {
		return tb.TempDir()
	}
	if usable != nil && !usable(d) {
		os.RemoveAll(d)
		return tb.TempDir()
	}
	tb.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// WithTrailingSum returns a copy of b whose last 32 bytes are the BLAKE3 of
// the rest, so that mutations of the body get past a trailing hash check.
// Shorter input is returned as it is.
func WithTrailingSum(b []byte) []byte {
	if len(b) < 32 {
		return b
	}
	out := bytes.Clone(b)
	s := blake3.Sum256(out[:len(out)-32])
	copy(out[len(out)-32:], s[:])
	return out
}
