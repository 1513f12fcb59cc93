package dedup

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/zeebo/blake3"
)

// ---- test images and sinks ----

type memImage struct {
	name string
	id   [16]byte
	gen  uint64
	seq  uint64
	data []byte
	ext  [][2]int64
	cut  time.Time
	gcut [16]byte
}

func (m *memImage) Name() string       { return m.name }
func (m *memImage) ID() [16]byte       { return m.id }
func (m *memImage) Generation() uint64 { return m.gen }
func (m *memImage) Seq() uint64        { return m.seq }
func (m *memImage) Size() int64        { return int64(len(m.data)) }
func (m *memImage) CutTime() time.Time { return m.cut }
func (m *memImage) GroupCut() [16]byte { return m.gcut }
func (m *memImage) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(m.data)) {
		return 0, nil
	}
	n := copy(p, m.data[off:])
	return n, nil
}
func (m *memImage) DataExtents() ([][2]int64, error) { return m.ext, nil }

type memSink struct {
	mu      sync.Mutex
	data    []byte
	written [][2]int64
}

func (s *memSink) WriteAt(p []byte, off int64) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if off+int64(len(p)) > int64(len(s.data)) {
		return 0, errors.New("write beyond size")
	}
	copy(s.data[off:], p)
	s.written = append(s.written, [2]int64{off, int64(len(p))})
	return len(p), nil
}

func (s *memSink) Sync() error { return nil }

func (s *memSink) Truncate(n int64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	d := make([]byte, n)
	copy(d, s.data)
	s.data = d
	return nil
}

// testImages builds 3 images from one template: random and compressible
// template blocks, per-image changes, zero regions, one image shifted by whole
// chunks, one of a size that is not a multiple of 4 KiB.
func testImages(seed uint64) []*memImage {
	r := rand.New(rand.NewPCG(seed, 7))
	const tmplChunks = 768
	tmpl := make([]byte, tmplChunks*chunkSize)
	for c := 0; c < tmplChunks; c++ {
		b := tmpl[c*chunkSize : (c+1)*chunkSize]
		switch c % 4 {
		case 0, 1: // random
			for i := range b {
				b[i] = byte(r.Uint32())
			}
		case 2: // text-like, compressible
			words := []string{"kernel ", "debian ", "libc.so ", "usr/share/doc ", "lorem ", "ipsum "}
			var sb strings.Builder
			for sb.Len() < chunkSize {
				sb.WriteString(words[r.IntN(len(words))])
			}
			copy(b, sb.String())
		case 3: // zero chunk inside the template
		}
	}
	mk := func(name string, shift int, size int, changes int) *memImage {
		d := make([]byte, size)
		copy(d[shift*chunkSize:], tmpl)
		// zero region already at the end (size > template); add a zero hole in the middle
		clear(d[(shift+100)*chunkSize : (shift+140)*chunkSize])
		for i := 0; i < changes; i++ {
			off := r.IntN(size - 64)
			for j := 0; j < 64; j++ {
				d[off+j] = byte(r.Uint32())
			}
		}
		id := [16]byte{byte(len(name)), 1, 2, 3}
		copy(id[4:], name)
		return &memImage{name: name, id: id, gen: 3, seq: 42, data: d, ext: [][2]int64{{0, int64(size)}},
			cut: time.Date(2025, 11, 22, 2, 0, 0, 123456789, time.UTC), gcut: [16]byte{0xcc, 1, 2, 3}}
	}
	a := mk("vm-alpha/disk0.raw", 0, 1024*chunkSize, 10)
	b := mk("vm-bravo/disk0.raw", 5, 1100*chunkSize+1000, 12) // shifted by 5 chunks, odd size
	c := mk("vm-charlie/disk0.raw", 0, 1024*chunkSize, 8)
	// c: declare only part as allocated (a hole region beyond it is skipped)
	c.ext = [][2]int64{{0, 800 * chunkSize}, {900*chunkSize + 17, 50 * chunkSize}}
	clear(c.data[800*chunkSize : 900*chunkSize])
	clear(c.data[950*chunkSize:])
	return []*memImage{a, b, c}
}

func sources(ims []*memImage) []ImageSource {
	out := make([]ImageSource, len(ims))
	for i, m := range ims {
		out[i] = m
	}
	return out
}

func importAll(t *testing.T, dir string, key []byte, o ImportOptions) (map[string]*memSink, Summary, error) {
	t.Helper()
	sinks := map[string]*memSink{}
	sum, err := Import(context.Background(), []string{dir}, key, func(m Manifest) (ImageSink, error) {
		s := &memSink{}
		sinks[m.Name] = s
		return s, nil
	}, o)
	return sinks, sum, err
}

func checkEqual(t *testing.T, ims []*memImage, sinks map[string]*memSink) {
	t.Helper()
	if len(sinks) != len(ims) {
		t.Fatalf("got %d images, want %d", len(sinks), len(ims))
	}
	for _, im := range ims {
		s := sinks[im.name]
		if s == nil {
			t.Fatalf("image %s missing", im.name)
		}
		if blake3.Sum256(s.data) != blake3.Sum256(im.data) {
			t.Fatalf("image %s differs after import", im.name)
		}
		// Holes stay holes: nothing was written over an all-zero chunk.
		for _, w := range s.written {
			for off := w[0]; off < w[0]+w[1]; off += chunkSize {
				end := min(off+chunkSize, int64(len(im.data)))
				if isZero(im.data[off:end]) {
					t.Fatalf("image %s: zero chunk at %d was written", im.name, off)
				}
			}
		}
	}
}

var testKey = bytes.Repeat([]byte{0x5a}, 32)

func TestRoundTrip(t *testing.T) {
	for _, enc := range []bool{false, true} {
		t.Run(map[bool]string{false: "plain", true: "encrypted"}[enc], func(t *testing.T) {
			ims := testImages(1)
			dir := t.TempDir()
			var key []byte
			if enc {
				key = testKey
			}
			var last Progress
			start := time.Now()
			sum, err := Export(context.Background(), []string{dir}, sources(ims), ExportOptions{Parity: 0.10, Key: key, PackSize: 64 << 10, Progress: func(p Progress) { last = p }})
			if err != nil {
				t.Fatal(err)
			}
			el := time.Since(start)
			t.Logf("export: %+v in %v (%.0f MB/s)", sum, el, float64(sum.Allocated)/el.Seconds()/1e6)
			dataRatio := float64(sum.Chunks) * chunkSize / float64(sum.SeedBytes)
			t.Logf("ratio allocated/seed %.2f, non-zero data/seed %.2f", sum.Ratio, dataRatio)
			if sum.Ratio <= 2 || dataRatio <= 2 {
				t.Fatalf("dedup ratio %.2f (data %.2f), want > 2", sum.Ratio, dataRatio)
			}
			if last.BytesRead != last.BytesTotal || last.BytesTotal != sum.Allocated || last.Images != 3 {
				t.Fatalf("final progress %+v", last)
			}
			if _, err := os.Stat(filepath.Join(dir, journalName)); !os.IsNotExist(err) {
				t.Fatal("journal left behind after a finished export")
			}
			rep, err := Verify(context.Background(), []string{dir}, nil)
			if err != nil || !rep.OK() || !rep.Repairable {
				t.Fatalf("verify: %+v %v", rep, err)
			}
			ms, err := ReadManifests([]string{dir}, key)
			if err != nil {
				t.Fatal(err)
			}
			for i, m := range ms {
				if m.Name != ims[i].name || m.ID != ims[i].id || m.Generation != 3 || m.Seq != 42 || m.Size != int64(len(ims[i].data)) ||
					!m.CutTime.Equal(ims[i].cut) || m.GroupCut != ims[i].gcut {
					t.Fatalf("manifest %d: %+v", i, m)
				}
			}
			start = time.Now()
			sinks, isum, err := importAll(t, dir, key, ImportOptions{})
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("import: %+v in %v", isum, time.Since(start))
			checkEqual(t, ims, sinks)
		})
	}
}

// shardsOf returns the index's groups for damage tests.
func loadIndex(t *testing.T, dir string) *seedIndex {
	t.Helper()
	ss, err := openSeed([]string{dir}, nil, true)
	if err != nil {
		t.Fatal(err)
	}
	return ss.ix
}

func flipByte(t *testing.T, path string, off int64) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	b[off%int64(len(b))] ^= 0xff
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestDamageWithinParity(t *testing.T) {
	for _, enc := range []bool{false, true} {
		t.Run(map[bool]string{false: "plain", true: "encrypted"}[enc], func(t *testing.T) {
			ims := testImages(2)
			dir := t.TempDir()
			var key []byte
			if enc {
				key = testKey
			}
			if _, err := Export(context.Background(), []string{dir}, sources(ims), ExportOptions{Parity: 0.10, Key: key, PackSize: 32 << 10}); err != nil {
				t.Fatal(err)
			}
			ix := loadIndex(t, dir)
			if len(ix.Groups) < 4 {
				t.Fatalf("only %d groups", len(ix.Groups))
			}
			// group 0: flip bytes in a pack; group 1: delete a pack; group 2:
			// delete its parity; last group (manifests): flip a manifest; one index copy.
			flipByte(t, filepath.Join(dir, ix.Groups[0].Shards[3].Name()), 1000)
			os.Remove(filepath.Join(dir, ix.Groups[1].Shards[0].Name()))
			os.Remove(filepath.Join(dir, ix.Groups[2].Shards[ix.Groups[2].Data].Name()))
			lg := ix.Groups[len(ix.Groups)-1]
			if lg.Shards[0].Kind != kindManifest {
				t.Fatal("last group is not the manifests")
			}
			flipByte(t, filepath.Join(dir, lg.Shards[1].Name()), 20)
			flipByte(t, filepath.Join(dir, "index.0"), 50)

			rep, err := Verify(context.Background(), []string{dir}, key)
			if err != nil {
				t.Fatal(err)
			}
			if !rep.Repairable || rep.DamagedShards != 4 || rep.IndexCopies != 1 || rep.OK() {
				t.Fatalf("verify: %+v", rep)
			}
			sinks, _, err := importAll(t, dir, key, ImportOptions{})
			if err != nil {
				t.Fatal(err)
			}
			checkEqual(t, ims, sinks)
			// The seed was not modified.
			if rep2, _ := Verify(context.Background(), []string{dir}, key); rep2.DamagedShards != 4 {
				t.Fatalf("seed changed by a read-only import: %+v", rep2)
			}
			// Repair in place, then the seed is whole again.
			sinks, _, err = importAll(t, dir, key, ImportOptions{RepairInPlace: true})
			if err != nil {
				t.Fatal(err)
			}
			checkEqual(t, ims, sinks)
			if rep3, err := Verify(context.Background(), []string{dir}, key); err != nil || !rep3.OK() {
				t.Fatalf("after in-place repair: %+v %v", rep3, err)
			}
		})
	}
}

func TestDamageBeyondParity(t *testing.T) {
	ims := testImages(3)
	dir := t.TempDir()
	if _, err := Export(context.Background(), []string{dir}, sources(ims), ExportOptions{Parity: 0.10, PackSize: 64 << 10}); err != nil {
		t.Fatal(err)
	}
	ix := loadIndex(t, dir)
	a, b := ix.Groups[1].Shards[2].Name(), ix.Groups[1].Shards[5].Name()
	la, lb := "volume 1: "+a, "volume 1: "+b
	flipByte(t, filepath.Join(dir, a), 77)
	os.Remove(filepath.Join(dir, b))
	rep, err := Verify(context.Background(), []string{dir}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Repairable || len(rep.Lost) != 2 || rep.Lost[0] != la || rep.Lost[1] != lb {
		t.Fatalf("verify: %+v", rep)
	}
	called := false
	_, err = Import(context.Background(), []string{dir}, nil, func(m Manifest) (ImageSink, error) {
		called = true
		return &memSink{}, nil
	}, ImportOptions{})
	if !errors.Is(err, ErrUnrepairable) || !strings.Contains(err.Error(), a) || !strings.Contains(err.Error(), b) {
		t.Fatalf("import: %v", err)
	}
	var ue *UnrepairableError
	if !errors.As(err, &ue) || len(ue.Lost) != 2 {
		t.Fatalf("not an UnrepairableError: %v", err)
	}
	if called {
		t.Fatal("sink was called for an unrepairable seed")
	}
	t.Log(err)
}

func TestNoParity(t *testing.T) {
	ims := testImages(4)
	dir := t.TempDir()
	if _, err := Export(context.Background(), []string{dir}, sources(ims), ExportOptions{PackSize: 64 << 10}); err != nil {
		t.Fatal(err)
	}
	sinks, _, err := importAll(t, dir, nil, ImportOptions{})
	if err != nil {
		t.Fatal(err)
	}
	checkEqual(t, ims, sinks)
	ix := loadIndex(t, dir)
	os.Remove(filepath.Join(dir, ix.Groups[0].Shards[0].Name()))
	if _, _, err := importAll(t, dir, nil, ImportOptions{}); !errors.Is(err, ErrUnrepairable) {
		t.Fatalf("import: %v", err)
	}
}

func TestKeys(t *testing.T) {
	ims := testImages(5)
	dir := t.TempDir()
	if _, err := Export(context.Background(), []string{dir}, sources(ims), ExportOptions{Parity: 0.1, Key: testKey, PackSize: 64 << 10}); err != nil {
		t.Fatal(err)
	}
	wrong := bytes.Repeat([]byte{1}, 32)
	if _, err := ReadManifests([]string{dir}, wrong); !errors.Is(err, ErrWrongKey) {
		t.Fatalf("wrong key: %v", err)
	}
	called := false
	_, err := Import(context.Background(), []string{dir}, wrong, func(Manifest) (ImageSink, error) { called = true; return &memSink{}, nil }, ImportOptions{})
	if !errors.Is(err, ErrWrongKey) || called {
		t.Fatalf("import with wrong key: %v", err)
	}
	if _, err := ReadManifests([]string{dir}, nil); !errors.Is(err, ErrKeyRequired) {
		t.Fatalf("no key: %v", err)
	}
	if _, err := Verify(context.Background(), []string{dir}, wrong); !errors.Is(err, ErrWrongKey) {
		t.Fatalf("verify with wrong key: %v", err)
	}
	if rep, err := Verify(context.Background(), []string{dir}, nil); err != nil || !rep.OK() || !rep.Encrypted {
		t.Fatalf("verify without key: %+v %v", rep, err)
	}
	if _, err := ReadManifests([]string{dir}, []byte("short")); err == nil {
		t.Fatal("short key accepted")
	}
	// A key for a plain seed is an error too.
	plain := t.TempDir()
	if _, err := Export(context.Background(), []string{plain}, sources(ims[:1]), ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadManifests([]string{plain}, testKey); !errors.Is(err, ErrNotEncrypted) {
		t.Fatalf("key for plain seed: %v", err)
	}
}

func TestNoPlaintextWhenEncrypted(t *testing.T) {
	ims := testImages(6)
	needles := [][]byte{
		ims[0].data[4*chunkSize+100 : 4*chunkSize+164], // random template block
		ims[0].data[2*chunkSize : 2*chunkSize+48],      // text template block
	}
	for _, im := range ims {
		needles = append(needles, []byte(im.name), []byte(strings.Split(im.name, "/")[0]))
	}
	grep := func(dir string) (found []string) {
		filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
			if err != nil || fi.IsDir() {
				return err
			}
			b, _ := os.ReadFile(p)
			for i, n := range needles {
				if bytes.Contains(b, n) {
					found = append(found, p+":"+string(rune('0'+i)))
				}
			}
			return nil
		})
		return
	}
	plain := t.TempDir()
	if _, err := Export(context.Background(), []string{plain}, sources(ims), ExportOptions{Parity: 0.1, PackSize: 64 << 10}); err != nil {
		t.Fatal(err)
	}
	if len(grep(plain)) == 0 {
		t.Fatal("control: plaintext not found in an unencrypted seed; test is not meaningful")
	}
	enc := t.TempDir()
	if _, err := Export(context.Background(), []string{enc}, sources(ims), ExportOptions{Parity: 0.1, Key: testKey, PackSize: 64 << 10}); err != nil {
		t.Fatal(err)
	}
	if f := grep(enc); len(f) > 0 {
		t.Fatalf("plaintext found in encrypted seed: %v", f)
	}
	// Chunk ids are keyed: the plain BLAKE3 of a template block is nowhere.
	h := blake3.Sum256(ims[0].data[0:chunkSize])
	needles = [][]byte{h[:8]}
	if f := grep(enc); len(f) > 0 {
		t.Fatalf("plain chunk hash found in encrypted seed: %v", f)
	}
}

func TestTruncatedManifest(t *testing.T) {
	ims := testImages(7)
	dir := t.TempDir()
	if _, err := Export(context.Background(), []string{dir}, sources(ims), ExportOptions{PackSize: 64 << 10}); err != nil {
		t.Fatal(err)
	}
	ix := loadIndex(t, dir)
	lg := ix.Groups[len(ix.Groups)-1]
	name := lg.Shards[0].Name()
	b, _ := os.ReadFile(filepath.Join(dir, name))
	os.WriteFile(filepath.Join(dir, name), b[:len(b)/2], 0o644)
	if _, err := ReadManifests([]string{dir}, nil); err == nil {
		t.Fatal("truncated manifest accepted")
	}
	if _, _, err := importAll(t, dir, nil, ImportOptions{}); err == nil {
		t.Fatal("import with truncated manifest succeeded")
	}
	// Even with a matching hash (a consistent but truncated seed), every
	// truncation is refused by the decoder.
	for n := 0; n < len(b); n++ {
		if _, err := decodeManifest(b[:n], ix.TotalChunks); err == nil {
			t.Fatalf("manifest truncated to %d bytes accepted", n)
		}
	}
	if _, err := decodeManifest(b, ix.TotalChunks); err != nil {
		t.Fatal(err)
	}
	// Rewrite the truncated file consistently into the index: still refused.
	writeConsistent(t, dir, ix, name, b[:len(b)-3])
	if _, err := ReadManifests([]string{dir}, nil); err == nil {
		t.Fatal("consistently truncated manifest accepted")
	}
}

// writeConsistent replaces a shard and updates the index so the shard hash
// matches (what an attacker or a buggy tool could produce).
func writeConsistent(t *testing.T, dir string, ix *seedIndex, name string, data []byte) {
	t.Helper()
	for gi := range ix.Groups {
		g := &ix.Groups[gi]
		for si := range g.Shards {
			if g.Shards[si].Name() == name {
				g.Shards[si].Len = int64(len(data))
				g.Shards[si].Hash = blake3.Sum256(data)
				g.ShardSize = max(g.ShardSize, int64(len(data)))
			}
		}
	}
	if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
		t.Fatal(err)
	}
	ib := ix.encode(nil)
	for _, n := range indexNames {
		os.WriteFile(filepath.Join(dir, n), ib, 0o644)
	}
}

func TestPathTraversal(t *testing.T) {
	for _, bad := range []string{"../vm", "/abs", "a/../b", "a//b", "a/./b", "a\\b", "a\x00b", "", "a/"} {
		if ValidImageName(bad) == nil {
			t.Fatalf("image name %q accepted", bad)
		}
	}
	if err := ValidImageName("vm1/disk 0.qcow2"); err != nil {
		t.Fatal(err)
	}
	// The index holds no file names (they derive from kind and number); a
	// forged index with a bad kind or volume is refused.
	ims := testImages(8)
	dir := t.TempDir()
	if _, err := Export(context.Background(), []string{dir}, sources(ims), ExportOptions{Parity: 0.1, PackSize: 64 << 10}); err != nil {
		t.Fatal(err)
	}
	ix := loadIndex(t, dir)
	forge := func(mut func(s *shardEntry), want string) {
		t.Helper()
		cp := *ix
		cp.Groups = append([]groupEntry(nil), ix.Groups...)
		cp.Groups[0].Shards = append([]shardEntry(nil), ix.Groups[0].Shards...)
		mut(&cp.Groups[0].Shards[0])
		ib := cp.encode(nil)
		for _, n := range indexNames {
			os.WriteFile(filepath.Join(dir, n), ib, 0o644)
		}
		if _, err := Verify(context.Background(), []string{dir}, nil); err == nil || !strings.Contains(err.Error(), want) {
			t.Fatalf("forged index (%s): %v", want, err)
		}
	}
	forge(func(s *shardEntry) { s.Kind = 9 }, "bad kind")
	forge(func(s *shardEntry) { s.Vol = 7 }, "volume 7")
	// Manifest naming an image outside the store.
	dir = t.TempDir()
	if _, err := Export(context.Background(), []string{dir}, sources(ims), ExportOptions{PackSize: 64 << 10}); err != nil {
		t.Fatal(err)
	}
	ix = loadIndex(t, dir)
	lg := ix.Groups[len(ix.Groups)-1]
	b, _ := os.ReadFile(filepath.Join(dir, lg.Shards[0].Name()))
	m, err := decodeManifest(b, ix.TotalChunks)
	if err != nil {
		t.Fatal(err)
	}
	m.Name = "../../../etc/cron.d/x"
	enc, _ := newTestEncoder()
	writeConsistent(t, dir, ix, lg.Shards[0].Name(), encodeManifest(m, enc))
	called := false
	_, err = Import(context.Background(), []string{dir}, nil, func(Manifest) (ImageSink, error) { called = true; return &memSink{}, nil }, ImportOptions{})
	if err == nil || !strings.Contains(err.Error(), "invalid image name") || called {
		t.Fatalf("traversal in manifest: %v", err)
	}
	// Export refuses such names too.
	bad := *ims[0]
	bad.name = "../evil"
	if _, err := Export(context.Background(), []string{t.TempDir()}, []ImageSource{&bad}, ExportOptions{}); err == nil {
		t.Fatal("export accepted a traversal name")
	}
}

func TestResumeAfterCancel(t *testing.T) {
	ims := testImages(9)
	for _, enc := range []bool{false, true} {
		t.Run(map[bool]string{false: "plain", true: "encrypted"}[enc], func(t *testing.T) {
			var key []byte
			if enc {
				key = testKey
			}
			dir := t.TempDir()
			ctx, cancel := context.WithCancel(context.Background())
			_, err := Export(ctx, []string{dir}, sources(ims), ExportOptions{Parity: 0.1, Key: key, PackSize: 32 << 10, Progress: func(p Progress) {
				if p.BytesRead > p.BytesTotal/2 {
					cancel()
				}
			}})
			if !errors.Is(err, context.Canceled) {
				t.Fatalf("cancelled export: %v", err)
			}
			if _, err := os.Stat(filepath.Join(dir, journalName)); err != nil {
				t.Fatal("no journal after an interrupted export")
			}
			if _, err := os.Stat(filepath.Join(dir, "index.0")); err == nil {
				t.Fatal("index written by an interrupted export")
			}
			// Damage the last finished pack: it must be redone, not trusted.
			packs, _ := filepath.Glob(filepath.Join(dir, "packs", "*.pack"))
			if len(packs) < 3 {
				t.Fatalf("only %d packs before the cut", len(packs))
			}
			flipByte(t, packs[len(packs)-1], 5)
			// Temporary files of index copies and of the label that a crash
			// left behind go when the resumed export finishes.
			for _, n := range []string{".index.0.tmp-123", ".index.1.tmp-456", "." + labelName + ".tmp-789", "packs/.00000000.pack.tmp-1"} {
				if err := os.WriteFile(filepath.Join(dir, n), []byte("x"), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			sum, err := Export(context.Background(), []string{dir}, sources(ims), ExportOptions{Parity: 0.1, Key: key, PackSize: 32 << 10})
			if err != nil {
				t.Fatal(err)
			}
			for _, pat := range []string{".*.tmp-*", "*/.*.tmp-*"} {
				if left, _ := filepath.Glob(filepath.Join(dir, pat)); len(left) > 0 {
					t.Fatalf("temporary files left after the resumed export: %v", left)
				}
			}
			if sum.ResumedPacks != len(packs)-1 {
				t.Fatalf("resumed %d packs, want %d", sum.ResumedPacks, len(packs)-1)
			}
			clean := t.TempDir()
			csum, err := Export(context.Background(), []string{clean}, sources(ims), ExportOptions{Parity: 0.1, Key: key, PackSize: 32 << 10})
			if err != nil {
				t.Fatal(err)
			}
			if csum.UniqueChunks != sum.UniqueChunks || csum.Chunks != sum.Chunks {
				t.Fatalf("resumed %+v vs clean %+v", sum, csum)
			}
			if rep, err := Verify(context.Background(), []string{dir}, key); err != nil || !rep.OK() {
				t.Fatalf("verify resumed: %+v %v", rep, err)
			}
			m1, _ := ReadManifests([]string{dir}, key)
			m2, _ := ReadManifests([]string{clean}, key)
			for i := range m1 {
				if m1[i].Root != m2[i].Root || m1[i].Chunks != m2[i].Chunks {
					t.Fatalf("manifest %d differs from a clean export", i)
				}
			}
			sinks, _, err := importAll(t, dir, key, ImportOptions{})
			if err != nil {
				t.Fatal(err)
			}
			checkEqual(t, ims, sinks)
		})
	}
}

func TestImportAcceptRefuses(t *testing.T) {
	ims := testImages(10)
	dir := t.TempDir()
	if _, err := Export(context.Background(), []string{dir}, sources(ims), ExportOptions{}); err != nil {
		t.Fatal(err)
	}
	called := false
	_, err := Import(context.Background(), []string{dir}, nil, func(Manifest) (ImageSink, error) { called = true; return &memSink{}, nil },
		ImportOptions{Accept: func(ms []Manifest) error { return errors.New("generation 3 is older than the replica's 4") }})
	if err == nil || called {
		t.Fatalf("accept hook: %v", err)
	}
}

// Decoders must not panic on arbitrary input.
func TestDecodersRobust(t *testing.T) {
	ims := testImages(11)
	dir := t.TempDir()
	if _, err := Export(context.Background(), []string{dir}, sources(ims[:1]), ExportOptions{Parity: 0.2, PackSize: 64 << 10}); err != nil {
		t.Fatal(err)
	}
	ib, _ := os.ReadFile(filepath.Join(dir, "index.0"))
	ix := loadIndex(t, dir)
	pb, _ := os.ReadFile(filepath.Join(dir, ix.Groups[0].Shards[0].Name()))
	mb, _ := os.ReadFile(filepath.Join(dir, ix.Groups[len(ix.Groups)-1].Shards[0].Name()))
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 3000; i++ {
		for _, src := range [][]byte{ib, pb, mb} {
			b := append([]byte(nil), src...)
			for j := 0; j < 1+r.IntN(4); j++ {
				b[r.IntN(len(b))] = byte(r.Uint32())
			}
			if r.IntN(3) == 0 {
				b = b[:r.IntN(len(b))]
			}
			decodeIndex(b)
			if h, err := parsePackTable(b, int64(len(b)), 0, 0, ix.Groups[0].Shards[0].Count); err == nil {
				h.decode(b, blake3.Sum256)
			}
			decodeManifest(b, ix.TotalChunks)
		}
	}
}
