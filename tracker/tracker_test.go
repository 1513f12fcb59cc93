package tracker

import (
	"bytes"
	"context"
	"encoding/binary"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/RoaringBitmap/roaring/v2"

	"github.com/standin/standin/internal/format"
)

func newStore(t *testing.T, o Options) (*Store, string) {
	t.Helper()
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "images"), 0o700); err != nil {
		t.Fatal(err)
	}
	s, err := Open(dir, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, dir
}

func createImage(t *testing.T, dir, name string, size int64) string {
	t.Helper()
	p := filepath.Join(dir, "images", name)
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(p, size); err != nil {
		t.Fatal(err)
	}
	return p
}

// write performs a tracked write the way the FUSE layer does.
func write(t testing.TB, im *Image, f *os.File, p []byte, off int64) {
	end, err := im.BeginWrite(off, int64(len(p)))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(p, off); err != nil {
		t.Fatal(err)
	}
	end()
}

func blocksOf(im *Image) *roaring.Bitmap {
	im.mu.Lock()
	defer im.mu.Unlock()
	b := im.dirty.Clone()
	if im.frozen != nil {
		b.Or(im.frozen)
	}
	return b
}

func TestIntentDurableBeforeWrite(t *testing.T) {
	s, dir := newStore(t, Options{})
	createImage(t, dir, "a.img", 1<<30)
	im, err := s.Image("a.img")
	if err != nil {
		t.Fatal(err)
	}
	off := int64(300 << 20) // extent 75 with 4 MiB extents
	end, err := im.BeginWrite(off, 4096)
	if err != nil {
		t.Fatal(err)
	}
	defer end()
	raw, err := os.ReadFile(filepath.Join(im.dir, "active"))
	if err != nil {
		t.Fatal(err)
	}
	if !bitsFromBytes(raw[:len(raw)/8*8]).has(75) {
		t.Fatalf("extent 75 not durable in the active file when BeginWrite returned")
	}
	if !blocksOf(im).Contains(uint32(off / BlockSize)) {
		t.Fatal("block not in dirty map")
	}
}

func TestCrashRecoveryCoversWrites(t *testing.T) {
	for _, ckpt := range []bool{false, true} {
		t.Run(map[bool]string{false: "no-checkpoint", true: "after-checkpoint"}[ckpt], func(t *testing.T) {
			dir := t.TempDir()
			os.MkdirAll(filepath.Join(dir, "images"), 0o700)
			p := createImage(t, dir, "a.img", 1<<30)
			s, err := Open(dir, Options{CheckpointInterval: time.Hour})
			if err != nil {
				t.Fatal(err)
			}
			im, _ := s.Image("a.img")
			if _, err := s.Cut(context.Background(), nil); err != nil { // base cycle of the empty image
				t.Fatal(err)
			}
			f, _ := os.OpenFile(p, os.O_RDWR, 0)
			defer f.Close()
			rng := rand.New(rand.NewPCG(1, 2))
			want := roaring.New()
			buf := bytes.Repeat([]byte{0xab}, 8192)
			for i := 0; i < 60; i++ {
				off := rng.Int64N(1<<30-8192) &^ 511
				write(t, im, f, buf[:4096+rng.IntN(4096)], off)
				want.AddRange(uint64(off)/BlockSize, (uint64(off)+8192+BlockSize-1)/BlockSize)
				if ckpt && i == 30 {
					if err := im.Checkpoint(); err != nil {
						t.Fatal(err)
					}
				}
			}
			s.crashForTest()
			s2, err := Open(dir, Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer s2.Close()
			im2, err := s2.Image("a.img")
			if err != nil {
				t.Fatal(err)
			}
			got := blocksOf(im2)
			// every written block (conservatively rounded) must be dirty
			missing := roaring.AndNot(exactWritten(t, p), got)
			if !missing.IsEmpty() {
				t.Fatalf("%d written blocks missing from the recovered dirty set", missing.GetCardinality())
			}
			st := im2.Status(false)
			if !st.UncleanRecovery {
				t.Fatal("recovery not reported as unclean")
			}
			limit := uint64(60 * 2 * 1024) // at most the touched 4 MiB extents (≤2 per write)
			if got.GetCardinality() > limit || got.GetCardinality() >= (1<<30)/BlockSize/2 {
				t.Fatalf("recovered dirty set %d blocks: not bounded by the active extents (limit %d)", got.GetCardinality(), limit)
			}
			t.Logf("written ≈%d blocks, recovered dirty %d blocks (%d extents)", want.GetCardinality(), got.GetCardinality(), st.ActiveExtents)
		})
	}
}

// exactWritten returns the blocks of p holding non-zero data (the test writes
// 0xab over a sparse file).
func exactWritten(t *testing.T, p string) *roaring.Bitmap {
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, _ := f.Stat()
	b := roaring.New()
	buf := make([]byte, 1<<20)
	zero := make([]byte, BlockSize)
	for off := int64(0); off < st.Size(); off += int64(len(buf)) {
		n, _ := f.ReadAt(buf, off)
		for i := 0; i+BlockSize <= n; i += BlockSize {
			if !bytes.Equal(buf[i:i+BlockSize], zero) {
				b.Add(uint32((off + int64(i)) / BlockSize))
			}
		}
	}
	return b
}

func TestCleanShutdownKeepsExactDirtySet(t *testing.T) {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "images"), 0o700)
	p := createImage(t, dir, "a.img", 1<<30)
	s, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	im, _ := s.Image("a.img")
	f, _ := os.OpenFile(p, os.O_RDWR, 0)
	defer f.Close()
	write(t, im, f, make([]byte, 4096), 123*4096)
	want := blocksOf(im)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s2, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	im2, _ := s2.Image("a.img")
	if got := blocksOf(im2); !got.Equals(want) {
		t.Fatalf("after clean shutdown dirty = %v, want %v", got.ToArray(), want.ToArray())
	}
	if im2.Status(false).UncleanRecovery {
		t.Fatal("clean shutdown reported unclean")
	}
}

func TestLostStateStartsNewGeneration(t *testing.T) {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "images"), 0o700)
	p := createImage(t, dir, "a.img", 1<<20)
	os.WriteFile(p, bytes.Repeat([]byte{1}, 8192), 0o600)
	s, _ := Open(dir, Options{})
	im, _ := s.Image("a.img")
	id := im.ID()
	s.Close()
	os.RemoveAll(filepath.Join(dir, "state", id.String()))
	s2, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	im2, _ := s2.Image("a.img")
	st := im2.Status(false)
	if im2.ID() != id || st.Generation != 2 || st.DirtyBlocks != 2 || st.NextSeq != 0 {
		t.Fatalf("got id %s gen %d dirty %d next %d; want same id, gen 2, 2 dirty blocks, seq 0", im2.ID(), st.Generation, st.DirtyBlocks, st.NextSeq)
	}
}

// TestCutIsPrefixConsistent runs writers over two images while cutting
// repeatedly. Every write carries a global sequence number; each cut must
// equal the images after exactly the writes with numbers below some N (the
// same N for both images: one barrier), with copy-before-write exercised by
// a staging delay.
func TestCutIsPrefixConsistent(t *testing.T) {
	s, dir := newStore(t, Options{StageDelay: 2 * time.Millisecond, Compress: true})
	const blocks = 2048
	names := []string{"a.img", "b.img"}
	files := map[string]*os.File{}
	imgs := map[string]*Image{}
	for _, n := range names {
		p := createImage(t, dir, n, blocks*BlockSize)
		f, err := os.OpenFile(p, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		files[n] = f
		im, err := s.Image(n)
		if err != nil {
			t.Fatal(err)
		}
		imgs[n] = im
	}
	type w struct {
		img   string
		block uint64
	}
	var (
		logMu sync.Mutex
		log   []w // log[i] = write with sequence number i+1
		seq   atomic.Uint64
		stop  atomic.Bool
		wg    sync.WaitGroup
		// Writes to one block are serialised (as a guest's would be),
		// so the log order of a block is its content order.
		blockMu [blocks]sync.Mutex
	)
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 7))
			buf := make([]byte, BlockSize)
			for !stop.Load() {
				n := names[rng.IntN(2)]
				b := rng.Uint64N(blocks)
				im := imgs[n]
				blockMu[b].Lock()
				end, err := im.BeginWrite(int64(b)*BlockSize, BlockSize)
				if err != nil {
					t.Error(err)
					blockMu[b].Unlock()
					return
				}
				// The sequence number is taken inside the barrier, so it
				// orders writes consistently with the cut.
				logMu.Lock()
				v := seq.Add(1)
				log = append(log, w{n, b})
				logMu.Unlock()
				binary.LittleEndian.PutUint64(buf, v)
				binary.LittleEndian.PutUint64(buf[8:], b)
				files[n].WriteAt(buf, int64(b)*BlockSize)
				end()
				blockMu[b].Unlock()
			}
		}(g)
	}
	var cycles []CycleInfo
	for i := 0; i < 6; i++ {
		time.Sleep(30 * time.Millisecond)
		cs, err := s.Cut(context.Background(), names)
		if err != nil {
			t.Fatal(err)
		}
		cycles = append(cycles, cs...)
	}
	stop.Store(true)
	wg.Wait()

	// Replay: apply each group's cycles to in-memory replicas and find N.
	replica := map[string][]uint64{"a.img": make([]uint64, blocks), "b.img": make([]uint64, blocks)}
	byGroup := map[string][]CycleInfo{}
	var order []string
	for _, c := range cycles {
		if _, ok := byGroup[c.GroupCut]; !ok {
			order = append(order, c.GroupCut)
		}
		byGroup[c.GroupCut] = append(byGroup[c.GroupCut], c)
	}
	var cbw uint64
	for _, g := range order {
		if len(byGroup[g]) != 2 {
			t.Fatalf("group %s has %d cycles, want 2", g, len(byGroup[g]))
		}
		for _, c := range byGroup[g] {
			cbw += c.CBWBlocks
			applyToVersions(t, c.Path, replica[c.Image])
		}
		// N = the highest version present anywhere; every write ≤ N must be
		// reflected, none above it.
		var n uint64
		for _, vs := range replica {
			for _, v := range vs {
				n = max(n, v)
			}
		}
		want := map[string][]uint64{"a.img": make([]uint64, blocks), "b.img": make([]uint64, blocks)}
		for i := uint64(0); i < n; i++ {
			want[log[i].img][log[i].block] = i + 1
		}
		for _, name := range names {
			for b := range want[name] {
				if want[name][b] != replica[name][b] {
					t.Fatalf("cut %s: %s block %d holds write %d, want %d (prefix up to %d)", g, name, b, replica[name][b], want[name][b], n)
				}
			}
		}
	}
	t.Logf("%d writes, %d cuts, %d blocks saved by copy-before-write", seq.Load(), len(order), cbw)
}

// applyToVersions applies a cycle file to a model image whose blocks hold the
// version number written in their first 8 bytes.
func applyToVersions(t *testing.T, path string, vs []uint64) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, _ := f.Stat()
	r, err := format.Open(f, st.Size())
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Verify(); err != nil {
		t.Fatal(err)
	}
	var buf []byte
	for i, e := range r.Extents() {
		for k := uint64(0); k < uint64(e.Count); k++ {
			b := e.Start + k
			if e.Kind == format.KindZero {
				vs[b] = 0
				continue
			}
			if k == 0 {
				if buf, err = r.ReadExtent(i, buf); err != nil {
					t.Fatal(err)
				}
			}
			blk := buf[k*BlockSize:]
			if got := binary.LittleEndian.Uint64(blk[8:]); got != b && binary.LittleEndian.Uint64(blk) != 0 {
				t.Fatalf("block %d holds content of block %d", b, got)
			}
			vs[b] = binary.LittleEndian.Uint64(blk)
		}
	}
}

func TestFailedStagingLosesNothing(t *testing.T) {
	s, dir := newStore(t, Options{})
	p := createImage(t, dir, "a.img", 1<<20)
	im, _ := s.Image("a.img")
	f, _ := os.OpenFile(p, os.O_RDWR, 0)
	defer f.Close()
	write(t, im, f, bytes.Repeat([]byte{7}, 8192), 0)
	// Make the cycle directory unwritable by putting a file where it goes.
	cd := s.cycleDir(im.ID())
	os.RemoveAll(cd)
	os.WriteFile(cd, nil, 0o600)
	if _, err := s.Cut(context.Background(), []string{"a.img"}); err == nil {
		t.Fatal("cut succeeded without a cycle directory")
	}
	if got := blocksOf(im).GetCardinality(); got != 2 {
		t.Fatalf("after a failed cut %d blocks dirty, want 2", got)
	}
	os.Remove(cd)
	cs, err := s.Cut(context.Background(), []string{"a.img"})
	if err != nil {
		t.Fatal(err)
	}
	if cs[0].Seq != 0 || cs[0].DataBlocks != 2 {
		t.Fatalf("retry cut: %+v", cs[0])
	}
}
