package dedup

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/klauspost/compress/zstd"
	"github.com/klauspost/reedsolomon"
	"github.com/zeebo/blake3"
)

// ImageSource is one image at a crash-consistent cut.
type ImageSource interface {
	Name() string
	ID() [16]byte
	Generation() uint64
	Seq() uint64
	Size() int64
	ReadAt(p []byte, off int64) (int, error)
	// DataExtents returns the allocated byte ranges as {offset, length}
	// pairs. Bytes outside them are read as zeros and not read at all.
	DataExtents() ([][2]int64, error)
}

// DefaultParity is the parity fraction the CLI should use when none is given.
const DefaultParity = 0.10

// DefaultPackSize is the compressed size at which a pack is closed.
const DefaultPackSize = 4 << 20

// ExportOptions tune Export.
type ExportOptions struct {
	// Parity is the fraction of parity shards per group of packs: each group
	// of up to 10 data shards gets ceil(n*Parity) parity shards. 0 = none.
	Parity float64
	// Key, when set (32 bytes), encrypts packs and manifests (AES-256-GCM)
	// and keys the chunk ids (keyed BLAKE3).
	Key []byte
	// Progress is called from the exporting goroutine after each read batch.
	Progress func(Progress)
	// PackSize is the compressed size at which a pack is closed (default 4 MiB).
	PackSize int
}

// Progress reports an export or import under way.
type Progress struct {
	Images, Image          int   // number of images, index of the current one
	BytesRead, BytesTotal  int64 // allocated bytes read / to read (import: written / to write)
	UniqueBytes, SeedBytes int64 // unique chunk bytes so far, seed bytes written (import: read)
}

// Summary is the outcome of Export or Import.
type Summary struct {
	Images       int
	Allocated    int64 // bytes in the images' data extents (import: bytes written)
	Unique       int64 // bytes of unique chunks
	SeedBytes    int64 // bytes of all seed files, parity and index included
	Chunks       int   // stored (non-zero) chunk references
	UniqueChunks int
	Ratio        float64 // Allocated / SeedBytes
	ResumedPacks int     // packs reused from an interrupted export
}

const journalName = "journal"

type journalPack struct {
	num, first uint64
	count      uint32
	length     int64
	hash       [32]byte
}

func packName(n uint64) string     { return fmt.Sprintf("packs/%08d.pack", n) }
func manifestName(n uint64) string { return fmt.Sprintf("manifests/%08d.man", n) }
func parityName(g, p int) string   { return fmt.Sprintf("parity/%08d-%02d.par", g, p) }
func parityCount(n int, f float64) int {
	if f <= 0 {
		return 0
	}
	p := int(math.Ceil(float64(n)*f - 1e-9))
	return min(max(p, 1), 256-n)
}

// Export writes a seed of images into dir. It is resumable: packs finished by
// an earlier, interrupted Export of the same images with the same key and
// pack size are kept and not compressed or written again.
func Export(ctx context.Context, dir string, images []ImageSource, o ExportOptions) (Summary, error) {
	var sum Summary
	if o.PackSize <= 0 {
		o.PackSize = DefaultPackSize
	}
	if o.Parity < 0 || o.Parity > 10 || math.IsNaN(o.Parity) {
		return sum, fmt.Errorf("dedup: bad parity fraction %v", o.Parity)
	}
	if o.Key != nil && len(o.Key) != KeySize {
		return sum, fmt.Errorf("dedup: key must be %d bytes", KeySize)
	}
	seen := map[string]bool{}
	for _, im := range images {
		if err := ValidImageName(im.Name()); err != nil {
			return sum, err
		}
		if seen[im.Name()] {
			return sum, fmt.Errorf("dedup: image %q given twice", im.Name())
		}
		seen[im.Name()] = true
		if im.Size() < 0 {
			return sum, fmt.Errorf("dedup: image %q: negative size", im.Name())
		}
	}
	for _, d := range []string{dir, filepath.Join(dir, "packs"), filepath.Join(dir, "parity"), filepath.Join(dir, "manifests")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return sum, err
		}
	}

	// Journal: reuse finished packs of an interrupted export of the same input.
	var salt [32]byte
	done, jsalt, ok := readJournal(dir)
	if ok {
		salt = jsalt
	} else if _, err := rand.Read(salt[:]); err != nil {
		return sum, err
	}
	k, err := deriveKeys(o.Key, salt[:])
	if err != nil {
		return sum, err
	}
	hdr := journalHeader(k, images, o.PackSize)
	if !ok || done.header != hdr {
		done = nil
		if err := cleanSeedDir(dir); err != nil {
			return sum, err
		}
		if _, err := rand.Read(salt[:]); err != nil {
			return sum, err
		}
		if k, err = deriveKeys(o.Key, salt[:]); err != nil {
			return sum, err
		}
	}
	jf, err := openJournal(dir, hdr, salt, done)
	if err != nil {
		return sum, err
	}
	defer jf.Close()

	// Rebuild the chunk map from finished packs.
	ids := map[[32]byte]uint64{}
	var packs []journalPack
	if done != nil {
		for _, p := range done.packs {
			b, err := readFileLimited(filepath.Join(dir, packName(p.num)), maxShardSize)
			if err != nil || int64(len(b)) != p.length || blake3.Sum256(b) != p.hash {
				break
			}
			plain, err := k.open(kindPack, p.num, b)
			if err != nil {
				break
			}
			h, err := parsePackHeader(plain, p.num, p.first, p.count)
			if err != nil {
				break
			}
			for i, id := range h.hashes {
				ids[id] = p.first + uint64(i)
			}
			packs = append(packs, p)
			sum.SeedBytes += p.length
		}
		sum.ResumedPacks = len(packs)
		// Rewrite the journal with what survived the check.
		jf.Close()
		if jf, err = openJournal(dir, hdr, salt, &journal{header: hdr, packs: packs}); err != nil {
			return sum, err
		}
	}
	var nextID uint64
	if n := len(packs); n > 0 {
		nextID = packs[n-1].first + uint64(packs[n-1].count)
	}
	storedIDs := nextID // ids below this are already in finished packs

	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedDefault), zstd.WithEncoderConcurrency(1), zstd.WithLowerEncoderMem(true))
	if err != nil {
		return sum, err
	}
	pw := &packWriter{enc: enc, num: uint64(len(packs)), first: nextID}

	flushPack := func() error {
		if pw.chunks() == 0 {
			return nil
		}
		num, first, count := pw.num, pw.first, uint32(pw.chunks())
		data := k.seal(kindPack, num, pw.encode())
		if err := writeFileAtomic(filepath.Join(dir, packName(num)), data); err != nil {
			return err
		}
		p := journalPack{num: num, first: first, count: count, length: int64(len(data)), hash: blake3.Sum256(data)}
		packs = append(packs, p)
		sum.SeedBytes += p.length
		return jf.add(p)
	}

	// Totals for progress.
	prog := Progress{Images: len(images)}
	extents := make([][][2]int64, len(images))
	for i, im := range images {
		e, err := chunkExtents(im)
		if err != nil {
			return sum, fmt.Errorf("dedup: image %q: %w", im.Name(), err)
		}
		extents[i] = e
		for _, x := range e {
			prog.BytesTotal += x[1] - x[0]
		}
	}

	workers := min(runtime.GOMAXPROCS(0), 8)
	hashers := make([]func([]byte) [32]byte, workers)
	for i := range hashers {
		hashers[i] = k.chunkHasher()
	}
	const batch = 1024 // chunks per read (4 MiB)
	buf := make([]byte, batch*chunkSize)
	hs := make([][32]byte, batch)
	zero := make([]bool, batch)
	manifests := make([]*Manifest, len(images))

	for ii, im := range images {
		prog.Image = ii
		m := &Manifest{Name: im.Name(), ID: im.ID(), Generation: im.Generation(), Seq: im.Seq(), Size: im.Size()}
		root := newRootHasher()
		for _, x := range extents[ii] {
			for off := x[0]; off < x[1]; {
				if err := ctx.Err(); err != nil {
					return sum, err
				}
				n := min(int64(len(buf)), x[1]-off)
				b := buf[:n]
				if err := readFull(im, b, off); err != nil {
					return sum, fmt.Errorf("dedup: image %q at %d: %w", im.Name(), off, err)
				}
				nc := int((n + chunkSize - 1) / chunkSize)
				hashBatch(b, nc, hs, zero, hashers)
				for c := 0; c < nc; c++ {
					if zero[c] {
						continue
					}
					idx := uint64(off/chunkSize) + uint64(c)
					id, found := ids[hs[c]]
					if !found {
						id = nextID
						nextID++
						ids[hs[c]] = id
						if id >= storedIDs {
							chunk := b[c*chunkSize : (c+1)*chunkSize]
							pw.add(hs[c], chunk)
							if pw.size() >= o.PackSize || pw.chunks() >= maxPackChunks {
								if err := flushPack(); err != nil {
									return sum, err
								}
							}
						}
					}
					m.runs = appendRun(m.runs, idx, id)
					m.Chunks++
					root.add(idx, hs[c])
				}
				off += n
				prog.BytesRead += n
				prog.UniqueBytes = int64(nextID) * chunkSize
				prog.SeedBytes = sum.SeedBytes + int64(pw.size())
				if o.Progress != nil {
					o.Progress(prog)
				}
			}
		}
		m.Root = root.sum()
		m.Allocated = allocated(m.runs, m.Size)
		manifests[ii] = m
		sum.Chunks += int(m.Chunks)
	}
	if nextID < storedIDs {
		return sum, errors.New("dedup: resumed export does not match the journal")
	}
	if err := flushPack(); err != nil {
		return sum, err
	}
	if err := ctx.Err(); err != nil {
		return sum, err
	}

	// Manifests.
	var mshards []shardEntry
	for i, m := range manifests {
		data := k.seal(kindManifest, uint64(i), encodeManifest(m, enc))
		name := manifestName(uint64(i))
		if err := writeFileAtomic(filepath.Join(dir, name), data); err != nil {
			return sum, err
		}
		mshards = append(mshards, shardEntry{Kind: kindManifest, Num: uint64(i), Name: name, Len: int64(len(data)), Hash: blake3.Sum256(data)})
		sum.SeedBytes += int64(len(data))
	}

	// Groups and parity.
	ix := &seedIndex{Encrypted: k != nil, Salt: salt, TotalChunks: nextID, Images: len(images)}
	if k != nil {
		ix.Check = k.check
	}
	var pshards []shardEntry
	for _, p := range packs {
		pshards = append(pshards, shardEntry{Kind: kindPack, Num: p.num, Name: packName(p.num), Len: p.length, Hash: p.hash, First: p.first, Count: p.count})
	}
	for _, set := range [][]shardEntry{pshards, mshards} {
		for len(set) > 0 {
			n := min(groupData, len(set))
			g, err := makeGroup(ctx, dir, len(ix.Groups), set[:n], parityCount(n, o.Parity))
			if err != nil {
				return sum, err
			}
			for _, s := range g.Shards[g.Data:] {
				sum.SeedBytes += s.Len
			}
			ix.Groups = append(ix.Groups, g)
			set = set[n:]
		}
	}
	ib := ix.encode(k)
	for _, n := range indexNames {
		if err := writeFileAtomic(filepath.Join(dir, n), ib); err != nil {
			return sum, err
		}
		sum.SeedBytes += int64(len(ib))
	}
	syncDir(dir)
	jf.Close()
	os.Remove(filepath.Join(dir, journalName))
	syncDir(dir)

	sum.Images = len(images)
	sum.Allocated = prog.BytesTotal
	sum.UniqueChunks = int(nextID)
	sum.Unique = int64(nextID) * chunkSize
	if sum.SeedBytes > 0 {
		sum.Ratio = float64(sum.Allocated) / float64(sum.SeedBytes)
	}
	if o.Progress != nil {
		prog.Image = len(images)
		prog.SeedBytes = sum.SeedBytes
		o.Progress(prog)
	}
	return sum, nil
}

// hashBatch hashes nc chunks of b in parallel and marks all-zero chunks.
func hashBatch(b []byte, nc int, hs [][32]byte, zero []bool, hashers []func([]byte) [32]byte) {
	// Pad a short last chunk with zeros (image end): b has room up to
	// nc*chunkSize because buf is chunk-aligned.
	if tail := len(b) % chunkSize; tail != 0 {
		b = b[:nc*chunkSize]
		clear(b[len(b)-chunkSize+tail:])
	}
	w := len(hashers)
	per := (nc + w - 1) / w
	var wg sync.WaitGroup
	for i := 0; i < w; i++ {
		lo, hi := i*per, min((i+1)*per, nc)
		if lo >= hi {
			break
		}
		wg.Add(1)
		go func(h func([]byte) [32]byte) {
			defer wg.Done()
			for c := lo; c < hi; c++ {
				ch := b[c*chunkSize : (c+1)*chunkSize]
				if zero[c] = isZero(ch); !zero[c] {
					hs[c] = h(ch)
				}
			}
		}(hashers[i])
	}
	wg.Wait()
}

// chunkExtents turns the image's data extents into sorted, merged,
// chunk-aligned [start, end) byte ranges clipped to the image (end may be the
// image size when it is not chunk-aligned).
func chunkExtents(im ImageSource) ([][2]int64, error) {
	ext, err := im.DataExtents()
	if err != nil {
		return nil, err
	}
	size := im.Size()
	var out [][2]int64
	for _, e := range ext {
		s, l := e[0], e[1]
		if s < 0 || l < 0 || s > size {
			return nil, fmt.Errorf("extent {%d,%d} outside image of %d bytes", s, l, size)
		}
		end := min(s+l, size)
		s = s / chunkSize * chunkSize
		end = min((end+chunkSize-1)/chunkSize*chunkSize, size)
		if end > s {
			out = append(out, [2]int64{s, end})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i][0] < out[j][0] })
	merged := out[:0]
	for _, e := range out {
		if n := len(merged); n > 0 && e[0] <= merged[n-1][1] {
			merged[n-1][1] = max(merged[n-1][1], e[1])
			continue
		}
		merged = append(merged, e)
	}
	return merged, nil
}

func readFull(r io.ReaderAt, b []byte, off int64) error {
	n, err := r.ReadAt(b, off)
	if n == len(b) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// makeGroup computes and writes the parity shards of one group.
func makeGroup(ctx context.Context, dir string, gi int, data []shardEntry, parity int) (groupEntry, error) {
	g := groupEntry{Data: len(data), Parity: parity}
	for _, s := range data {
		g.ShardSize = max(g.ShardSize, s.Len)
	}
	g.Shards = append(g.Shards, data...)
	if parity == 0 {
		return g, nil
	}
	if err := ctx.Err(); err != nil {
		return g, err
	}
	shards := make([][]byte, len(data)+parity)
	for i, s := range data {
		b, err := readFileLimited(filepath.Join(dir, s.Name), maxShardSize)
		if err != nil {
			return g, err
		}
		if int64(len(b)) != s.Len || blake3.Sum256(b) != s.Hash {
			return g, fmt.Errorf("dedup: %s changed while the seed was written", s.Name)
		}
		shards[i] = padTo(b, g.ShardSize)
	}
	for i := len(data); i < len(shards); i++ {
		shards[i] = make([]byte, g.ShardSize)
	}
	if g.ShardSize > 0 {
		rs, err := reedsolomon.New(len(data), parity)
		if err != nil {
			return g, err
		}
		if err := rs.Encode(shards); err != nil {
			return g, err
		}
	}
	for p := 0; p < parity; p++ {
		name := parityName(gi, p)
		b := shards[len(data)+p]
		if err := writeFileAtomic(filepath.Join(dir, name), b); err != nil {
			return g, err
		}
		g.Shards = append(g.Shards, shardEntry{Kind: kindParity, Num: uint64(gi)<<8 | uint64(p), Name: name, Len: int64(len(b)), Hash: blake3.Sum256(b)})
	}
	return g, nil
}

func padTo(b []byte, n int64) []byte {
	if int64(len(b)) == n {
		return b
	}
	if int64(cap(b)) >= n {
		b = b[:n]
		clear(b[len(b):n])
		return b
	}
	p := make([]byte, n)
	copy(p, b)
	return p
}

func syncDir(dir string) {
	if f, err := os.Open(dir); err == nil {
		f.Sync()
		f.Close()
	}
}

// ---- journal ----

type journal struct {
	header [32]byte
	packs  []journalPack
}

type journalFile struct {
	f *os.File
}

func (j *journalFile) add(p journalPack) error {
	line := fmt.Sprintf("pack %d %d %d %d %s\n", p.num, p.first, p.count, p.length, hex.EncodeToString(p.hash[:]))
	if _, err := j.f.WriteString(line); err != nil {
		return err
	}
	return j.f.Sync()
}

func (j *journalFile) Close() error {
	if j == nil || j.f == nil {
		return nil
	}
	err := j.f.Close()
	j.f = nil
	return err
}

// journalHeader identifies the export input: format, key, pack size and the
// identity of every image. With a key it is keyed, so it reveals no names.
func journalHeader(k *keys, images []ImageSource, packSize int) [32]byte {
	h := blake3.New()
	if k != nil {
		h, _ = blake3.NewKeyed(k.mac[:])
	}
	var b []byte
	b = append(b, "standin seed journal v1"...)
	b = binary.LittleEndian.AppendUint64(b, uint64(packSize))
	for _, im := range images {
		b = binary.LittleEndian.AppendUint64(b, uint64(len(im.Name())))
		b = append(b, im.Name()...)
		id := im.ID()
		b = append(b, id[:]...)
		b = binary.LittleEndian.AppendUint64(b, im.Generation())
		b = binary.LittleEndian.AppendUint64(b, im.Seq())
		b = binary.LittleEndian.AppendUint64(b, uint64(im.Size()))
	}
	h.Write(b)
	var out [32]byte
	h.Sum(out[:0])
	return out
}

// readJournal parses dir/journal. Lines after the first malformed one are
// ignored (a torn last line after a crash).
func readJournal(dir string) (*journal, [32]byte, bool) {
	var salt [32]byte
	f, err := os.Open(filepath.Join(dir, journalName))
	if err != nil {
		return nil, salt, false
	}
	defer f.Close()
	sc := bufio.NewScanner(io.LimitReader(f, 256<<20))
	if !sc.Scan() {
		return nil, salt, false
	}
	fs := strings.Fields(sc.Text())
	if len(fs) != 3 || fs[0] != "standin-seed-journal-v1" {
		return nil, salt, false
	}
	j := &journal{}
	if !unhex32(fs[1], &j.header) || !unhex32(fs[2], &salt) {
		return nil, salt, false
	}
	var next, first uint64
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) != 6 || fs[0] != "pack" {
			break
		}
		num, e1 := strconv.ParseUint(fs[1], 10, 64)
		fst, e2 := strconv.ParseUint(fs[2], 10, 64)
		cnt, e3 := strconv.ParseUint(fs[3], 10, 32)
		ln, e4 := strconv.ParseInt(fs[4], 10, 64)
		var h [32]byte
		if e1 != nil || e2 != nil || e3 != nil || e4 != nil || !unhex32(fs[5], &h) ||
			num != next || fst != first || cnt == 0 || cnt > maxPackChunks || ln <= 0 || ln > maxShardSize {
			break
		}
		j.packs = append(j.packs, journalPack{num: num, first: fst, count: uint32(cnt), length: ln, hash: h})
		next++
		first += cnt
	}
	return j, salt, true
}

func unhex32(s string, out *[32]byte) bool {
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != 32 {
		return false
	}
	copy(out[:], b)
	return true
}

// openJournal (re)writes the journal with the given finished packs and opens
// it for appending.
func openJournal(dir string, hdr, salt [32]byte, j *journal) (*journalFile, error) {
	var sb strings.Builder
	fmt.Fprintf(&sb, "standin-seed-journal-v1 %s %s\n", hex.EncodeToString(hdr[:]), hex.EncodeToString(salt[:]))
	if j != nil {
		for _, p := range j.packs {
			fmt.Fprintf(&sb, "pack %d %d %d %d %s\n", p.num, p.first, p.count, p.length, hex.EncodeToString(p.hash[:]))
		}
	}
	path := filepath.Join(dir, journalName)
	if err := writeFileAtomic(path, []byte(sb.String())); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return nil, err
	}
	return &journalFile{f: f}, nil
}

// cleanSeedDir removes the files a previous export left in dir (only names
// this package writes).
func cleanSeedDir(dir string) error {
	for _, pat := range []string{"packs/*.pack", "packs/*.tmp", "parity/*.par", "parity/*.tmp", "manifests/*.man", "manifests/*.tmp", "index.?", "index.?.tmp", journalName, journalName + ".tmp"} {
		m, _ := filepath.Glob(filepath.Join(dir, pat))
		for _, f := range m {
			if err := os.Remove(f); err != nil && !os.IsNotExist(err) {
				return err
			}
		}
	}
	return nil
}
