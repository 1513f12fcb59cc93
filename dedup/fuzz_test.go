package dedup

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/zeebo/blake3"

	"github.com/standin/standin/internal/testutil"
)

// Fuzz targets of every decoder of seed files (index, manifest, pack,
// journal, volume label, sealed framing) and of a whole seed volume. Seeds
// come from a real export so the fuzzer starts deep inside the formats.

// fuzzSeed is a small real seed: files of an export of two small images.
type fuzzSeed struct {
	dir   string
	index []byte
	ix    *seedIndex
	packs [][]byte // plaintext
	mans  [][]byte // plaintext
	files []string // every file below dir (relative)
}

func smallImages() []*memImage {
	mk := func(name string, n int, salt byte) *memImage {
		d := make([]byte, n*chunkSize+100)
		for c := 0; c < n; c++ {
			b := d[c*chunkSize : (c+1)*chunkSize]
			switch c % 3 {
			case 0:
				for i := range b {
					b[i] = byte(i*7+c) ^ salt
				}
			case 1:
				copy(b, bytes.Repeat([]byte("standin seed "), chunkSize/13))
			}
		}
		id := [16]byte{salt, 1, 2, 3}
		return &memImage{name: name, id: id, gen: 2, seq: 9, data: d, ext: [][2]int64{{0, int64(len(d))}},
			cut: time.Date(2025, 11, 22, 2, 0, 0, 5, time.UTC), gcut: [16]byte{0xcc, 1}}
	}
	return []*memImage{mk("vm-a/disk0.raw", 24, 1), mk("vm-b/disk0.raw", 9, 2)}
}

func exportFuzzSeed(tb testing.TB, key []byte) *fuzzSeed {
	tb.Helper()
	dir := tb.TempDir()
	if _, err := Export(context.Background(), []string{dir}, sources(smallImages()),
		ExportOptions{Parity: 0.3, Key: key, PackSize: 16 << 10}); err != nil {
		tb.Fatal(err)
	}
	s := &fuzzSeed{dir: dir}
	var err error
	if s.index, err = os.ReadFile(filepath.Join(dir, "index.0")); err != nil {
		tb.Fatal(err)
	}
	if s.ix, err = decodeIndex(s.index); err != nil {
		tb.Fatal(err)
	}
	k, err := deriveKeys(key, s.ix.Salt[:])
	if err != nil {
		tb.Fatal(err)
	}
	for _, g := range s.ix.Groups {
		for _, sh := range g.Shards {
			if sh.Kind == kindParity {
				continue
			}
			b, err := os.ReadFile(filepath.Join(dir, sh.Name()))
			if err != nil {
				tb.Fatal(err)
			}
			p, err := k.open(sh.Kind, sh.Num, b)
			if err != nil {
				tb.Fatal(err)
			}
			if sh.Kind == kindPack {
				s.packs = append(s.packs, p)
			} else {
				s.mans = append(s.mans, p)
			}
		}
	}
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			rel, _ := filepath.Rel(dir, p)
			s.files = append(s.files, rel)
		}
		return nil
	})
	return s
}

func FuzzIndex(f *testing.F) {
	for _, key := range [][]byte{nil, testKey} {
		f.Add(exportFuzzSeed(f, key).index)
	}
	f.Add([]byte(indexMagic))
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, b := range [][]byte{data, testutil.WithTrailingSum(data)} {
			ix, err := decodeIndex(b)
			testutil.Allocs(t, fmt.Sprintf("decodeIndex of %d bytes", len(b)), uint64(8*len(b))+64<<10, func() { decodeIndex(b) })
			if err != nil {
				continue
			}
			enc := ix.encode(nil)
			ix2, err := decodeIndex(enc)
			if err != nil {
				t.Fatalf("re-encoded index does not decode: %v", err)
			}
			if !reflect.DeepEqual(ix.Groups, ix2.Groups) || ix.SeedID != ix2.SeedID || ix.Volume != ix2.Volume ||
				ix.Volumes != ix2.Volumes || ix.Partial != ix2.Partial || ix.Encrypted != ix2.Encrypted ||
				ix.Salt != ix2.Salt || ix.Check != ix2.Check || ix.TotalChunks != ix2.TotalChunks || ix.Images != ix2.Images {
				t.Fatalf("index round trip differs:\n%+v\n%+v", ix, ix2)
			}
		}
	})
}

func FuzzManifest(f *testing.F) {
	s := exportFuzzSeed(f, nil)
	for _, m := range s.mans {
		f.Add(m, s.ix.TotalChunks)
	}
	f.Add([]byte(manifestMagic), uint64(1))
	enc, err := newTestEncoder()
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, data []byte, total uint64) {
		m, err := decodeManifest(data, total)
		testutil.Allocs(t, fmt.Sprintf("decodeManifest of %d bytes", len(data)), uint64(64*len(data))+manifestWindow+1<<20, func() { decodeManifest(data, total) })
		if err != nil {
			return
		}
		m2, err := decodeManifest(encodeManifest(m, enc), total)
		if err != nil {
			t.Fatalf("re-encoded manifest does not decode: %v", err)
		}
		if !reflect.DeepEqual(m, m2) {
			t.Fatalf("manifest round trip differs:\n%+v\n%+v", m, m2)
		}
	})
}

// FuzzPack parses a pack's table with the header's own numbers (as the
// index would give them) and decodes and checks every frame.
func FuzzPack(f *testing.F) {
	s := exportFuzzSeed(f, nil)
	for _, p := range s.packs {
		f.Add(p)
	}
	f.Add([]byte(packMagic))
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) < packHeaderLen {
			packTableSize(data, 0, 0, 1)
			return
		}
		le := binary.LittleEndian
		num, first, count := le.Uint64(data[8:]), le.Uint64(data[16:]), le.Uint32(data[24:])
		h, err := parsePackTable(data, int64(len(data)), num, first, count)
		testutil.Allocs(t, fmt.Sprintf("parsePackTable of %d bytes", len(data)), uint64(8*len(data))+64<<10, func() {
			parsePackTable(data, int64(len(data)), num, first, count)
		})
		if err != nil {
			return
		}
		buf := make([]byte, 0, maxFrameChunks*chunkSize)
		for i := range h.frameLen {
			comp := data[h.frameOff[i] : h.frameOff[i]+int64(h.frameLen[i])]
			raw, err := h.decodeFrame(i, comp, buf)
			if err != nil {
				continue
			}
			h.verify(i, raw, 0, uint64(h.frameCnt[i]), blake3.Sum256, nil)
		}
	})
}

// FuzzSealed opens sealed (encrypted) files: only authentic bytes open.
func FuzzSealed(f *testing.F) {
	salt := [32]byte{1}
	k, err := deriveKeys(testKey, salt[:])
	if err != nil {
		f.Fatal(err)
	}
	f.Add(k.seal(kindPack, 3, []byte("plain pack bytes")), uint64(3))
	f.Add(k.seal(kindManifest, 0, nil), uint64(0))
	f.Add([]byte(encMagic), uint64(0))
	f.Fuzz(func(t *testing.T, data []byte, num uint64) {
		for _, kind := range []byte{kindPack, kindManifest} {
			p, err := k.open(kind, num, data)
			if err == nil {
				// Authentic: it must be what seal produced.
				q, err := k.open(kind, num, k.seal(kind, num, p))
				if err != nil || !bytes.Equal(p, q) {
					t.Fatalf("sealed round trip: %v", err)
				}
			}
			if _, err := (*keys)(nil).open(kind, num, data); err == nil && bytes.HasPrefix(data, []byte(encMagic)) {
				t.Fatal("a sealed file opened without a key")
			}
		}
	})
}

func FuzzJournal(f *testing.F) {
	j := &journal{header: [32]byte{1, 2}, salt: [32]byte{3}, seed: [16]byte{4}}
	j.entries = []jEntry{
		{kind: 'v', vol: 1},
		{kind: 'p', pack: jPack{num: 0, first: 0, count: 17, vol: 1, group: 0, length: 9000, hash: [32]byte{5}, idHash: [32]byte{6}}},
		{kind: 'p', pack: jPack{num: 1, first: 17, count: 3, vol: 1, group: 0, length: 900, hash: [32]byte{7}, idHash: [32]byte{8}}},
		{kind: 'g', group: jGroup{g: 0, data: 2, parity: 1, par: []shardEntry{{Kind: kindParity, Vol: 1, Len: 9000, Num: 0, Hash: [32]byte{9}}}}},
		{kind: 'c', vol: 1},
		{kind: 'v', vol: 2},
		{kind: 'g', group: jGroup{g: 1, data: 1, parity: 0}},
		{kind: 'r', vol: 0, root: [32]byte{10}},
		{kind: 'r', vol: 1, root: [32]byte{11}},
		{kind: 'd', data: [3]int64{1 << 20, 300, 20}},
	}
	seedDir := f.TempDir()
	jf, err := writeJournal(seedDir, j)
	if err != nil {
		f.Fatal(err)
	}
	jf.Close()
	b, err := os.ReadFile(filepath.Join(seedDir, journalName))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	f.Add([]byte(journalMagic + "\n"))
	dir, dir2 := f.TempDir(), f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte) {
		if err := os.WriteFile(filepath.Join(dir, journalName), data, 0o600); err != nil {
			t.Fatal(err)
		}
		j := readJournal(dir)
		if j == nil {
			return
		}
		jf, err := writeJournal(dir2, j)
		if err != nil {
			t.Fatal(err)
		}
		jf.Close()
		j2 := readJournal(dir2)
		if !reflect.DeepEqual(j, j2) {
			t.Fatalf("journal round trip differs:\n%+v\n%+v", j, j2)
		}
	})
}

func FuzzVolumeLabel(f *testing.F) {
	seedDir := f.TempDir()
	if err := writeLabel(seedDir, [16]byte{1, 2, 3}, 7, 0o600); err != nil {
		f.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(seedDir, labelName))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte) {
		if err := os.WriteFile(filepath.Join(dir, labelName), data, 0o600); err != nil {
			t.Fatal(err)
		}
		seed, vol, ok := identifyVolume(dir)
		if !ok {
			return
		}
		if vol < 1 || vol > maxVolumes {
			t.Fatalf("volume %d accepted", vol)
		}
		d2 := t.TempDir()
		if err := writeLabel(d2, seed, vol, 0o600); err != nil {
			t.Fatal(err)
		}
		if s2, v2, ok := identifyVolume(d2); !ok || s2 != seed || v2 != vol {
			t.Fatalf("label round trip: %x %d -> %x %d %v", seed, vol, s2, v2, ok)
		}
	})
}

// discardSink is an import sink that keeps nothing (a manifest may claim any
// size).
type discardSink struct{}

func (discardSink) WriteAt(p []byte, off int64) (int, error) { return len(p), nil }
func (discardSink) Sync() error                              { return nil }
func (discardSink) Truncate(int64) error                     { return nil }

// FuzzSeedVolume replaces one file of a real seed volume (chosen by which)
// with the input and runs Verify, ReadManifests and Import on it: a damaged
// seed is refused or repaired, never a panic.
func FuzzSeedVolume(f *testing.F) {
	s := exportFuzzSeed(f, nil)
	for i, name := range s.files {
		b, err := os.ReadFile(filepath.Join(s.dir, name))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(uint8(i), b)
		if len(b) > 40 {
			b = bytes.Clone(b)
			b[len(b)/2] ^= 0x55
			f.Add(uint8(i), b)
		}
	}
	f.Fuzz(func(t *testing.T, which uint8, data []byte) {
		name := s.files[int(which)%len(s.files)]
		path := filepath.Join(s.dir, name)
		orig, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, data, 0o644); err != nil {
			t.Fatal(err)
		}
		defer os.WriteFile(path, orig, 0o644)
		ctx := context.Background()
		Verify(ctx, []string{s.dir}, nil)
		ReadManifests([]string{s.dir}, nil)
		Import(ctx, []string{s.dir}, nil, func(Manifest) (ImageSink, error) { return discardSink{}, nil }, ImportOptions{})
	})
}

// TestManifestClaimedSizeNotAllocated: a manifest claiming a 200 MiB run
// list (length field and zstd frame content size) with a few bytes of data
// is refused without allocating what it claims.
func TestManifestClaimedSizeNotAllocated(t *testing.T) {
	enc, err := newTestEncoder()
	if err != nil {
		t.Fatal(err)
	}
	const claim = 200 << 20
	m := &Manifest{Name: "vm/disk.raw", Size: 1 << 50, Chunks: claim/30 + 1}
	b := encodeManifest(m, enc)
	// A frame header claiming claim bytes (window 128 MiB), one RLE block of 1 byte.
	frame := []byte{0x28, 0xb5, 0x2f, 0xfd, 0xc0, 17 << 3}
	frame = binary.LittleEndian.AppendUint64(frame, claim)
	frame = append(frame, 0x0b, 0, 0, 0x01)
	// Rebuild the tail: rawLen, compLen, comp.
	tail := len(b) - 8
	for ; tail > 0; tail-- {
		if rl, cl := binary.LittleEndian.Uint32(b[tail:]), binary.LittleEndian.Uint32(b[tail+4:]); int(cl) == len(b)-tail-8 && rl < 64 {
			break
		}
	}
	b = binary.LittleEndian.AppendUint32(b[:tail:tail], claim)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(frame)))
	b = append(b, frame...)
	before := testutil.HeapAllocs()
	_, err = decodeManifest(b, 1<<40)
	if d := testutil.HeapAllocs() - before; d > 16<<20 {
		t.Fatalf("decodeManifest of %d bytes allocated %d bytes", len(b), d)
	}
	if err == nil {
		t.Fatal("a manifest with a damaged run list was accepted")
	}
	t.Logf("refused: %v", err)
}

// TestIndexClaimedImagesNotAllocated: an index claiming 2^24 images and
// listing only manifest number 2^24-1 is refused without allocating per
// claimed image.
func TestIndexClaimedImagesNotAllocated(t *testing.T) {
	ix := &seedIndex{Volume: 1, Volumes: 1, Images: 1 << 24, Groups: []groupEntry{{Data: 1, ShardSize: 10,
		Shards: []shardEntry{{Kind: kindManifest, Vol: 1, Num: 1<<24 - 1, Len: 10}}}}}
	b := ix.encode(nil)
	before := testutil.HeapAllocs()
	_, err := decodeIndex(b)
	if d := testutil.HeapAllocs() - before; d > 1<<20 {
		t.Fatalf("decodeIndex of %d bytes allocated %d bytes", len(b), d)
	}
	if err == nil {
		t.Fatal("an index listing one of 2^24 manifests was accepted")
	}
	t.Logf("refused: %v", err)
}

// FuzzExportResume resumes an interrupted export whose scratch state (the
// journal, the journaled chunk ids or a finished pack; chosen by which) was
// replaced by the input. The resumed export fails with an error or writes a
// seed that verifies and imports to exactly the images.
func FuzzExportResume(f *testing.F) {
	ims := smallImages()
	for i := range 4 { // more data: the export is interrupted after some packs
		im := *ims[0]
		im.name = fmt.Sprintf("vm-c%d/disk.raw", i)
		im.id[5] = byte(i + 1)
		im.data = bytes.Repeat(im.data, 6)
		for c := 0; c+chunkSize <= len(im.data); c += 3 * chunkSize {
			im.data[c+9] = byte(c/chunkSize) ^ byte(i)
		}
		im.ext = [][2]int64{{0, int64(len(im.data))}}
		ims = append(ims, &im)
	}
	o := ExportOptions{Parity: 0.3, PackSize: 16 << 10}
	src := testutil.MemTempDir(f, nil)
	ctx, cancel := context.WithCancel(context.Background())
	oc := o
	oc.Progress = func(p Progress) {
		if p.BytesRead > p.BytesTotal/2 {
			cancel()
		}
	}
	if _, err := Export(ctx, []string{src}, sources(ims), oc); err == nil {
		f.Fatal("export not interrupted")
	}
	targets := []string{journalName, idsName}
	packs, _ := filepath.Glob(filepath.Join(src, "packs", "*.pack"))
	if len(packs) > 0 {
		targets = append(targets, filepath.Join("packs", filepath.Base(packs[0])))
	}
	for i, n := range targets {
		b, err := os.ReadFile(filepath.Join(src, n))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(uint8(i), b)
	}
	f.Fuzz(func(t *testing.T, which uint8, data []byte) {
		dir := testutil.MemTempDir(t, nil)
		if err := os.CopyFS(dir, os.DirFS(src)); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, targets[int(which)%len(targets)]), data, 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := Export(context.Background(), []string{dir}, sources(ims), o); err != nil {
			return
		}
		if rep, err := Verify(context.Background(), []string{dir}, nil); err != nil || !rep.OK() {
			t.Fatalf("resumed export does not verify: %+v %v", rep, err)
		}
		sinks, _, err := importAll(t, dir, nil, ImportOptions{})
		if err != nil {
			t.Fatalf("resumed export does not import: %v", err)
		}
		checkEqual(t, ims, sinks)
	})
}
