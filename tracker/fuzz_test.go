package tracker

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/RoaringBitmap/roaring/v2"
	"golang.org/x/sys/unix"

	"github.com/standin/standin/internal/testutil"
)

// Fuzz targets of the tracker's state files: the dirty map checkpoint, the
// write-intent (active extents) file, and every file of an image's state
// directory as a restarted store reads it.

func dirtyBytes(tb testing.TB, b *roaring.Bitmap) []byte {
	tb.Helper()
	dir := tb.TempDir()
	if err := (&Image{dir: dir}).writeDirty(b); err != nil {
		tb.Fatal(err)
	}
	p, err := os.ReadFile(filepath.Join(dir, "dirty"))
	if err != nil {
		tb.Fatal(err)
	}
	return p
}

// FuzzDirtyMap reads dirty map checkpoints; an accepted map written again
// reads back equal.
func FuzzDirtyMap(f *testing.F) {
	b := roaring.New()
	f.Add(dirtyBytes(f, b))
	b.AddRange(10, 5000)
	b.Add(1 << 30)
	for i := uint32(0); i < 3000; i += 3 {
		b.Add(70000 + i)
	}
	f.Add(dirtyBytes(f, b))
	dir, dir2 := f.TempDir(), f.TempDir()
	path := filepath.Join(dir, "dirty")
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, d := range [][]byte{data, testutil.WithTrailingSum(data)} {
			if err := os.WriteFile(path, d, 0o600); err != nil {
				t.Fatal(err)
			}
			m, err := readDirty(path)
			testutil.Allocs(t, fmt.Sprintf("readDirty of %d bytes", len(d)), uint64(16*len(d))+256<<10, func() { readDirty(path) })
			if err != nil {
				continue
			}
			m.GetCardinality()
			m.Iterator()
			if err := (&Image{dir: dir2}).writeDirty(m); err != nil {
				t.Fatal(err)
			}
			m2, err := readDirty(filepath.Join(dir2, "dirty"))
			if err != nil || !m2.Equals(m) {
				t.Fatalf("dirty map round trip: %v", err)
			}
		}
	})
}

// FuzzActiveBits decodes the write-intent file (one bit per extent).
func FuzzActiveBits(f *testing.F) {
	var b bits
	b.set(0)
	b.set(77)
	b.set(4000)
	f.Add(b.bytesOf(0, len(b)))
	f.Fuzz(func(t *testing.T, data []byte) {
		data = data[:len(data)/8*8]
		b := bitsFromBytes(data)
		if got := b.bytesOf(0, len(b)); !bytes.Equal(got, data) {
			t.Fatalf("round trip: %x -> %x", data, got)
		}
		n := 0
		b.each(func(uint64) { n++ })
		if n != b.count() {
			t.Fatalf("each saw %d bits, count says %d", n, b.count())
		}
	})
}

// fuzzStateFiles are the files of an image's state directory.
var fuzzStateFiles = []string{"meta.json", "active", "dirty", fencedFile, "clean"}

// FuzzStoreState replaces one state file of a tracked image (chosen by
// which) and restarts the store: recovery refuses or falls back (the whole
// image dirty), never panics; writes and a cut still work.
func FuzzStoreState(f *testing.F) {
	// In /dev/shm when it takes user xattrs: the store fsyncs a lot.
	dir := testutil.MemTempDir(f, func(d string) bool {
		return unix.Setxattr(d, "user.standin.probe", []byte("1"), 0) == nil
	})
	if err := os.MkdirAll(filepath.Join(dir, "images"), 0o700); err != nil {
		f.Fatal(err)
	}
	img := filepath.Join(dir, "images", "disk.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		f.Fatal(err)
	}
	if err := os.Truncate(img, 3<<20); err != nil {
		f.Fatal(err)
	}
	o := Options{ExtentBlocks: 16, Logger: slog.New(slog.DiscardHandler)}
	s, err := Open(dir, o)
	if err != nil {
		f.Fatal(err)
	}
	im, err := s.Image("disk.img")
	if err != nil {
		f.Fatal(err)
	}
	fh, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		f.Fatal(err)
	}
	for _, off := range []int64{0, 70000, 2 << 20} {
		end, err := im.BeginWrite(off, 5000)
		if err != nil {
			f.Fatal(err)
		}
		fh.WriteAt(bytes.Repeat([]byte{7}, 5000), off)
		end()
	}
	fh.Close()
	if err := s.Fence([]string{"disk.img"}, "fuzz seed", true); err != nil {
		f.Fatal(err)
	}
	if err := s.Close(); err != nil {
		f.Fatal(err)
	}
	sdir := filepath.Join(dir, "state", im.ID().String())
	saved := map[string][]byte{}
	ents, err := os.ReadDir(sdir)
	if err != nil {
		f.Fatal(err)
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(sdir, e.Name()))
		if err != nil {
			f.Fatal(err)
		}
		saved[e.Name()] = b
	}
	xa := make([]byte, 64)
	n, err := unix.Getxattr(img, xattrID, xa)
	if err != nil {
		f.Fatal(err)
	}
	xa = xa[:n]
	for i, name := range fuzzStateFiles {
		f.Add(uint8(i), saved[name])
	}
	restore := func(t *testing.T) {
		os.RemoveAll(filepath.Join(dir, "state"))
		os.RemoveAll(filepath.Join(dir, "cycles"))
		if err := os.MkdirAll(sdir, 0o700); err != nil {
			t.Fatal(err)
		}
		for n, b := range saved {
			if err := os.WriteFile(filepath.Join(sdir, n), b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		if err := unix.Setxattr(img, xattrID, xa, 0); err != nil {
			t.Fatal(err)
		}
	}
	f.Fuzz(func(t *testing.T, which uint8, data []byte) {
		restore(t)
		name := fuzzStateFiles[int(which)%len(fuzzStateFiles)]
		if err := os.WriteFile(filepath.Join(sdir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
		s, err := Open(dir, o)
		if err != nil {
			return
		}
		defer s.Close()
		s.Status(true)
		im, err := s.Image("disk.img")
		if err != nil {
			return
		}
		im.FencedReason()
		s.Unfence([]string{"disk.img"})
		if end, err := im.BeginWrite(4096, 100); err == nil {
			end()
		}
		cis, err := s.Cut(context.Background(), []string{"disk.img"})
		if err != nil {
			t.Fatalf("cut after recovery: %v", err)
		}
		for _, ci := range cis {
			os.Remove(ci.Path)
		}
	})
}
