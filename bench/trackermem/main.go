// Command trackermem measures the tracker's memory per TiB of image: the
// in-memory dirty map (Status.MemoryBytes) and the Go heap in use after GC,
// for three marking patterns on a sparse 1 TiB image:
//
//	random1pct   4 KiB marks at 1% of the blocks, uniformly random
//	alternate64  every other 4 KiB block of a 64 GiB region (roaring's worst
//	             case: bitmap containers, no runs), extrapolated ×16 to a TiB
//	seqfull      the whole TiB marked sequentially in 1 MiB calls
//
// Only bits are set: every BeginWrite is ended at once and no data is
// written. Marks are issued from several goroutines, as concurrent FUSE
// requests would, so the tracker's write-intent commits are group-committed.
//
// Usage: go run ./bench/trackermem [-dir /var/tmp/...] [-json]
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/standin/standin/tracker"
)

const (
	tib   = int64(1) << 40
	block = int64(tracker.BlockSize)
)

type result struct {
	Case           string  `json:"case"`
	Marks          int64   `json:"marks"`
	DirtyBlocks    uint64  `json:"dirty_blocks"`
	Scale          float64 `json:"scale_to_tib"`
	MemoryBytes    uint64  `json:"memory_bytes"`
	MemoryPerTiB   float64 `json:"memory_bytes_per_tib"`
	HeapDelta      int64   `json:"heap_inuse_delta_bytes"`
	HeapPerTiB     float64 `json:"heap_inuse_per_tib"`
	HeapAllocDelta int64   `json:"heap_alloc_delta_bytes"`
	IntentCommits  uint64  `json:"intent_commits"`
	TrackingBytes  int64   `json:"tracking_bytes_written"`
	Seconds        float64 `json:"seconds"`
}

func heap() (inuse, alloc int64) {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return int64(ms.HeapInuse), int64(ms.HeapAlloc)
}

// run opens a fresh store with a sparse 1 TiB image, calls gen(i) for
// i in [0, n) from workers goroutines (each returns off, len to mark) and
// measures.
func run(base, name string, n int64, workers, extentBlocks int, scale float64, gen func(i int64) (int64, int64)) (result, error) {
	dir := filepath.Join(base, name)
	os.RemoveAll(dir)
	defer os.RemoveAll(dir)
	if err := os.MkdirAll(filepath.Join(dir, "images"), 0o700); err != nil {
		return result{}, err
	}
	img := filepath.Join(dir, "images", "x.img")
	f, err := os.Create(img)
	if err != nil {
		return result{}, err
	}
	if err := f.Truncate(tib); err != nil {
		f.Close()
		return result{}, err
	}
	f.Close()

	st, err := tracker.Open(dir, tracker.Options{ExtentBlocks: extentBlocks, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		return result{}, err
	}
	im, err := st.Image("x.img")
	if err != nil {
		st.Close()
		return result{}, err
	}
	h0, a0 := heap()
	t0 := time.Now()
	var next atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1) - 1
				if i >= n {
					return
				}
				off, l := gen(i)
				end, err := im.BeginWrite(off, l)
				if err != nil {
					firstErr.CompareAndSwap(nil, err)
					return
				}
				end()
			}
		}()
	}
	wg.Wait()
	secs := time.Since(t0).Seconds()
	if e := firstErr.Load(); e != nil {
		st.Close()
		return result{}, e.(error)
	}
	h1, a1 := heap()
	var s tracker.Status
	for _, x := range st.Status(false) {
		if x.Name == "x.img" {
			s = x
		}
	}
	r := result{
		Case: name, Marks: n, DirtyBlocks: s.DirtyBlocks, Scale: scale,
		MemoryBytes: s.MemoryBytes, MemoryPerTiB: float64(s.MemoryBytes) * scale,
		HeapDelta: h1 - h0, HeapPerTiB: float64(h1-h0) * scale, HeapAllocDelta: a1 - a0,
		IntentCommits: s.IntentCommits, TrackingBytes: s.TrackingBytes, Seconds: secs,
	}
	runtime.KeepAlive(im)
	if err := st.Close(); err != nil {
		return r, fmt.Errorf("close: %w", err)
	}
	return r, nil
}

func main() {
	dir := flag.String("dir", "/var/tmp/standin-trackermem", "scratch directory (not tmpfs-specific; sparse files)")
	workers := flag.Int("workers", 64, "concurrent markers")
	extentBlocks := flag.Int("extent-blocks", 1<<16, "write-intent extent size in 4 KiB blocks (the dirty map does not depend on it; "+
		"the tracker's default 1024 = 4 MiB costs about one fdatasync per 2-4 new extents, minutes for a TiB)")
	asJSON := flag.Bool("json", false, "print one JSON object per case")
	flag.Parse()

	blocks := tib / block // 2^28
	rng := rand.New(rand.NewPCG(1, 2))
	randBlocks := make([]int64, blocks/100)
	for i := range randBlocks {
		randBlocks[i] = rng.Int64N(blocks)
	}
	region := int64(64) << 30
	cases := []struct {
		name  string
		n     int64
		scale float64
		gen   func(i int64) (int64, int64)
	}{
		{"random1pct", int64(len(randBlocks)), 1, func(i int64) (int64, int64) { return randBlocks[i] * block, block }},
		{"alternate64", region / block / 2, float64(tib / region), func(i int64) (int64, int64) { return 2 * i * block, block }},
		{"seqfull", tib >> 20, 1, func(i int64) (int64, int64) { return i << 20, 1 << 20 }},
	}
	var results []result
	for _, c := range cases {
		r, err := run(*dir, c.name, c.n, *workers, *extentBlocks, c.scale, c.gen)
		if err != nil {
			fmt.Fprintf(os.Stderr, "trackermem: %s: %v\n", c.name, err)
			os.Exit(1)
		}
		results = append(results, r)
		if *asJSON {
			json.NewEncoder(os.Stdout).Encode(r)
		}
	}
	os.Remove(*dir)
	if *asJSON {
		return
	}
	const mib = 1 << 20
	fmt.Printf("%-12s %10s %12s %14s %14s %15s %8s %7s\n", "case", "marks", "dirty_blocks", "memory MiB/TiB", "heap MiB/TiB", "live heap MiB/TiB", "commits", "secs")
	for _, r := range results {
		fmt.Printf("%-12s %10d %12d %14.2f %14.2f %15.2f %8d %7.1f\n", r.Case, r.Marks, r.DirtyBlocks,
			r.MemoryPerTiB/mib, r.HeapPerTiB/mib, float64(r.HeapAllocDelta)*r.Scale/mib, r.IntentCommits, r.Seconds)
	}
}
