package dedup

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// fileImage is an ImageSource over a sparse file (extents from SEEK_DATA).
type fileImage struct {
	name string
	f    *os.File
	size int64
}

func (fi *fileImage) Name() string                            { return fi.name }
func (fi *fileImage) ID() [16]byte                            { var id [16]byte; copy(id[:], fi.name); return id }
func (fi *fileImage) Generation() uint64                      { return 1 }
func (fi *fileImage) Seq() uint64                             { return 1 }
func (fi *fileImage) CutTime() time.Time                      { return time.Unix(1735689600, 0) }
func (fi *fileImage) GroupCut() [16]byte                      { return [16]byte{1} }
func (fi *fileImage) Size() int64                             { return fi.size }
func (fi *fileImage) ReadAt(p []byte, off int64) (int, error) { return fi.f.ReadAt(p, off) }
func (fi *fileImage) DataExtents() ([][2]int64, error) {
	var out [][2]int64
	fd := int(fi.f.Fd())
	for off := int64(0); off < fi.size; {
		d, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if err != nil {
			if errors.Is(err, unix.ENXIO) {
				break
			}
			return nil, err
		}
		h, err := unix.Seek(fd, d, unix.SEEK_HOLE)
		if err != nil {
			return nil, err
		}
		out = append(out, [2]int64{d, h - d})
		off = h
	}
	return out, nil
}

type fileSink struct{ f *os.File }

func (s *fileSink) WriteAt(p []byte, off int64) (int, error) { return s.f.WriteAt(p, off) }
func (s *fileSink) Truncate(n int64) error                   { return s.f.Truncate(n) }
func (s *fileSink) Sync() error                              { return nil } // bench: page cache only

type nullSink struct{ n atomic.Int64 }

func (s *nullSink) WriteAt(p []byte, off int64) (int, error) {
	s.n.Add(int64(len(p)))
	return len(p), nil
}
func (s *nullSink) Truncate(n int64) error { return nil }
func (s *nullSink) Sync() error            { return nil }

func cpuSeconds() float64 {
	var ru unix.Rusage
	unix.Getrusage(unix.RUSAGE_SELF, &ru)
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}

func vmHWM() string {
	b, _ := os.ReadFile("/proc/self/status")
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmHWM") || strings.HasPrefix(l, "VmRSS") {
			return strings.Join(strings.Fields(l), " ")
		}
	}
	return "?"
}

// TestBenchDataset exports and imports the images of the benchmark dataset
// (cloned Debian VM images). STANDIN_DEDUP_BENCH=DIR (the dataset
// directory, vm1.img..vm5.img); STANDIN_DEDUP_BENCH_KEY=1 to encrypt;
// STANDIN_DEDUP_BENCH_SINK=file to import into sparse files (default: a sink
// that discards).
func TestBenchDataset(t *testing.T) {
	ds := os.Getenv("STANDIN_DEDUP_BENCH")
	if ds == "" {
		t.Skip("set STANDIN_DEDUP_BENCH=/var/tmp/standin-dataset")
	}
	var ims []ImageSource
	for i := 1; i <= 5; i++ {
		f, err := os.Open(filepath.Join(ds, fmt.Sprintf("vm%d.img", i)))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		st, _ := f.Stat()
		ims = append(ims, &fileImage{name: fmt.Sprintf("vm%d/disk0.img", i), f: f, size: st.Size()})
	}
	var key []byte
	if os.Getenv("STANDIN_DEDUP_BENCH_KEY") != "" {
		key = testKey
	}
	out := os.Getenv("STANDIN_DEDUP_BENCH_OUT")
	if out == "" {
		out = t.TempDir()
	}
	vols := []string{filepath.Join(out, "vol1")}
	o := ExportOptions{Parity: 0.1, Key: key}
	importOnly := os.Getenv("STANDIN_DEDUP_BENCH_IMPORTONLY") != ""
	if !importOnly {
		if err := os.RemoveAll(vols[0]); err != nil {
			t.Fatal(err)
		}
		benchExport(t, ims, vols, o)
	}
	if os.Getenv("STANDIN_DEDUP_BENCH_NOIMPORT") != "" {
		return
	}
	benchImport(t, vols, key, out)
}

func benchExport(t *testing.T, ims []ImageSource, vols []string, o ExportOptions) {
	key := o.Key
	runtime.GC()
	var peak atomic.Uint64
	stop := make(chan struct{})
	go func() {
		var ms runtime.MemStats
		for {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			runtime.ReadMemStats(&ms)
			if v := ms.HeapInuse + ms.StackInuse; v > peak.Load() {
				peak.Store(v)
			}
		}
	}()
	start, cpu0 := time.Now(), cpuSeconds()
	sum, err := Export(context.Background(), vols, ims, o)
	close(stop)
	if err != nil {
		t.Fatal(err)
	}
	el, cpu := time.Since(start), cpuSeconds()-cpu0
	ix := loadIndex(t, vols[0])
	var packs, mans, par int64
	for _, g := range ix.Groups {
		for _, s := range g.Shards {
			switch s.Kind {
			case kindPack:
				packs += s.Len
			case kindManifest:
				mans += s.Len
			case kindParity:
				par += s.Len
			}
		}
	}
	idx := int64(len(ix.raw)) * 2
	const mib = 1 << 20
	t.Logf("export (encrypted=%v): %d images, %.2f GiB allocated, %d unique chunks, %.1f s wall = %.0f MB/s allocated; %.1f CPU-s = %.0f MB/CPU-s",
		key != nil, sum.Images, float64(sum.Allocated)/(1<<30), sum.UniqueChunks, el.Seconds(), float64(sum.Allocated)/el.Seconds()/1e6,
		cpu, float64(sum.Allocated)/cpu/1e6)
	t.Logf("seed: packs %.1f MiB + manifests %.2f MiB + index %.2f MiB = %.1f MiB before parity; parity %.1f MiB; total %.1f MiB",
		float64(packs)/mib, float64(mans)/mib, float64(idx)/mib, float64(packs+mans+idx)/mib, float64(par)/mib, float64(sum.SeedBytes)/mib)
	t.Logf("memory: id table %d bytes = %.1f B/unique chunk; Go heap peak %.0f MiB; %s",
		sum.IDTableBytes, float64(sum.IDTableBytes)/float64(sum.UniqueChunks), float64(peak.Load())/mib, vmHWM())

}

func benchImport(t *testing.T, vols []string, key []byte, out string) {
	var sinkFor func(m Manifest) (ImageSink, error)
	if os.Getenv("STANDIN_DEDUP_BENCH_SINK") == "file" {
		sd := filepath.Join(out, "import")
		os.RemoveAll(sd)
		os.MkdirAll(sd, 0o755)
		sinkFor = func(m Manifest) (ImageSink, error) {
			f, err := os.Create(filepath.Join(sd, strings.ReplaceAll(m.Name, "/", "_")))
			if err != nil {
				return nil, err
			}
			return &fileSink{f}, nil
		}
		defer os.RemoveAll(sd)
	} else {
		sinkFor = func(m Manifest) (ImageSink, error) { return &nullSink{}, nil }
	}
	start, cpu0 := time.Now(), cpuSeconds()
	isum, err := Import(context.Background(), vols, key, sinkFor, ImportOptions{})
	if err != nil {
		t.Fatal(err)
	}
	el, cpu := time.Since(start), cpuSeconds()-cpu0
	t.Logf("import: %.2f GiB written in %.1f s wall = %.0f MB/s (verify pass included); %.1f CPU-s = %.0f MB/CPU-s; %s",
		float64(isum.Allocated)/(1<<30), el.Seconds(), float64(isum.Allocated)/el.Seconds()/1e6, cpu, float64(isum.Allocated)/cpu/1e6, vmHWM())
	_ = io.EOF
}
