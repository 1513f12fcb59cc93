package dedup

import (
	"container/list"
	"context"
	"fmt"
	"runtime"
	"sort"
	"sync"

	"github.com/zeebo/blake3"
)

// ImageSink receives one reconstructed image. Import calls Truncate(0) and
// Truncate(Size) first (only Truncate(Size) when resuming), then WriteAt for
// stored chunks only, so holes stay holes in a sparse file.
type ImageSink interface {
	WriteAt(p []byte, off int64) (int, error)
	Truncate(size int64) error
	// Sync makes everything written so far durable. Import calls it before
	// each Checkpoint and at the end of each image.
	Sync() error
}

// HashedSink is an ImageSink that keeps the plain BLAKE3-256 of every chunk
// it stores (the replica's per-block hashes). Import computes them in its
// parallel verify workers — for a seed without encryption they are the
// chunk ids it checks anyway — and passes one per 4 KiB chunk of p (the
// image's short last chunk hashed zero-padded), instead of calling WriteAt.
type HashedSink interface {
	ImageSink
	WriteHashedAt(p []byte, off int64, hashes [][32]byte) (int, error)
}

// ImportOptions tune Import.
type ImportOptions struct {
	// RepairInPlace writes rebuilt shards (and damaged or missing index
	// copies) back into the given volumes. Otherwise the seed is only read
	// and rebuilt shards are kept in memory while they are needed.
	RepairInPlace bool
	Progress      func(Progress)
	// PackCache is the number of pack tables (chunk ids and frame offsets,
	// 16 bytes per chunk) kept in memory (default 256).
	PackCache int
	// FrameCache is the number of bytes of decompressed frames kept in memory
	// across checkpoint windows and images (default 32 MiB).
	FrameCache int64
	// ScratchDir holds shards rebuilt from parity while the import runs (an
	// unlinked file; default os.TempDir()). Not used for shards written back
	// with RepairInPlace.
	ScratchDir string
	// Accept, when set, sees every manifest before anything is written and
	// may refuse the seed (wrong VM, wrong generation) by returning an error.
	Accept func([]Manifest) error
	// ResumeAt returns the image chunk index (4 KiB units) from which to
	// continue an interrupted import of m, as reported earlier by
	// Checkpoint; 0 = from the start. For a resumed image Import does not
	// call Truncate(0): chunks below the index are not written again (their
	// ids still enter the root check, taken from the seed's pack tables).
	ResumeAt func(m Manifest) uint64
	// Checkpoint is called after the sink was synced, at least every 256 MiB
	// of written data and at the end of each image (nextChunk = the image's
	// chunk count): every stored chunk below nextChunk is durable.
	Checkpoint func(m Manifest, nextChunk uint64) error
}

// checkpointEvery is the size of the image windows Import writes in pack
// order before it syncs the sink and calls Checkpoint (a variable for tests).
var checkpointEvery int64 = 256 << 20

// ReadManifests returns the manifests of the seed whose volumes are in paths
// (repairing a damaged manifest from parity in memory), for dry runs and
// identity checks.
func ReadManifests(paths []string, key []byte) ([]Manifest, error) {
	ss, err := openSeed(paths, key, false)
	if err != nil {
		return nil, err
	}
	st := newShardStore(ss, false, nil)
	defer st.Close()
	ms, err := loadManifests(ss, st)
	if err != nil {
		return nil, err
	}
	out := make([]Manifest, len(ms))
	for i, m := range ms {
		out[i] = *m
	}
	return out, nil
}

func loadManifests(ss *seedSet, st *shardStore) ([]*Manifest, error) {
	ix := ss.ix
	ms := make([]*Manifest, ix.Images)
	names := map[string]bool{}
	for gi, g := range ix.Groups {
		for i, s := range g.Shards[:g.Data] {
			if s.Kind != kindManifest {
				continue
			}
			b, err := st.get(gi, i)
			if err != nil {
				return nil, err
			}
			plain, err := ss.k.open(kindManifest, s.Num, b)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", lostName(s), err)
			}
			m, err := decodeManifest(plain, ix.TotalChunks)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", lostName(s), err)
			}
			if names[m.Name] {
				return nil, fmt.Errorf("dedup: image %q appears twice in the seed", m.Name)
			}
			names[m.Name] = true
			m.SeedID = ix.SeedID
			ms[s.Num] = m
		}
	}
	return ms, nil
}

type packLoc struct {
	g, i  int
	entry shardEntry
}

// Import reconstructs every image of the seed whose volumes are in paths
// through sink. It first checks every shard; if some group is damaged beyond
// its parity (missing volumes included) it returns an *UnrepairableError
// naming the lost files before calling sink at all, and it rebuilds (and
// checks) every damaged shard before the first write. Every chunk is checked
// against its id and every image against its manifest root. sink is called
// once per image, in manifest order, and may refuse an image (wrong identity
// or generation) by returning an error, which aborts Import.
//
// Each image is written in windows of 256 MiB of its address space: within a
// window, chunks are written in the order they are stored in the seed (each
// frame is decompressed once, in parallel), then the sink is synced and
// Checkpoint called with the window's end.
func Import(ctx context.Context, paths []string, key []byte, sink func(m Manifest) (ImageSink, error), o ImportOptions) (Summary, error) {
	var sum Summary
	ss, err := openSeed(paths, key, false)
	if err != nil {
		return sum, err
	}
	ix := ss.ix
	rep, err := checkShards(ctx, ss)
	if err != nil {
		return sum, err
	}
	if !rep.Repairable {
		return sum, rep.unrepairable()
	}
	sum.SeedBytes = rep.Bytes
	sum.SeedID = ix.SeedID
	sum.Volumes = ix.Volumes
	st := newShardStore(ss, o.RepairInPlace, &rep)
	st.scratch = o.ScratchDir
	defer st.Close()
	if o.RepairInPlace {
		if err := ss.rewriteIndexes(); err != nil {
			return sum, err
		}
	}
	ms, err := loadManifests(ss, st)
	if err != nil {
		return sum, err
	}
	if o.Accept != nil {
		all := make([]Manifest, len(ms))
		for i, m := range ms {
			all[i] = *m
		}
		if err := o.Accept(all); err != nil {
			return sum, fmt.Errorf("dedup: seed refused: %w", err)
		}
	}
	// Rebuild (and check) every damaged shard before the first byte reaches
	// a sink, so a reconstruction failure cannot leave an image half written.
	for _, g := range rep.Groups {
		if err := ctx.Err(); err != nil {
			return sum, err
		}
		if len(g.Damaged) > 0 {
			if err := st.rebuild(g.Group); err != nil {
				return sum, err
			}
		}
	}

	pr := newPackReader(ss, st, o)
	prog := Progress{Images: len(ms)}
	for _, m := range ms {
		prog.BytesTotal += m.Allocated
	}
	for mi, m := range ms {
		prog.Image = mi
		if err := pr.image(ctx, m, sink, &o, &prog, &sum); err != nil {
			return sum, err
		}
	}
	sum.Images = len(ms)
	sum.Allocated = prog.BytesRead
	sum.UniqueChunks = int(ix.TotalChunks)
	sum.Unique = int64(ix.TotalChunks) * chunkSize
	if sum.SeedBytes > 0 {
		sum.Ratio = float64(sum.Allocated) / float64(sum.SeedBytes)
	}
	return sum, nil
}

// piece is a run of consecutive image chunks stored consecutively in one
// frame.
type piece struct {
	idx, gid, n uint64
	pack        uint64
	frame       int
}

func (pr *packReader) image(ctx context.Context, m *Manifest, sink func(m Manifest) (ImageSink, error), o *ImportOptions, prog *Progress, sum *Summary) error {
	resume := uint64(0)
	if o.ResumeAt != nil {
		resume = o.ResumeAt(*m)
	}
	nimg := imageChunks(m.Size)
	if resume > nimg {
		return fmt.Errorf("dedup: image %q: resume point %d beyond its %d chunks", m.Name, resume, nimg)
	}
	sk, err := sink(*m)
	if err != nil {
		return fmt.Errorf("dedup: image %q refused: %w", m.Name, err)
	}
	if resume == 0 {
		if err := sk.Truncate(0); err != nil {
			return err
		}
	}
	if err := sk.Truncate(m.Size); err != nil {
		return err
	}
	checkpoint := func(next uint64) error {
		if err := sk.Sync(); err != nil {
			return fmt.Errorf("dedup: image %q: %w", m.Name, err)
		}
		if o.Checkpoint != nil {
			return o.Checkpoint(*m, next)
		}
		return nil
	}
	root := newRootHasher()
	W := max(1, uint64(checkpointEvery/chunkSize))
	ri, rj := 0, uint64(0)
	var pieces []piece
	for w0 := uint64(0); w0 < nimg && ri < len(m.runs); w0 += W {
		if err := ctx.Err(); err != nil {
			return err
		}
		w1 := min(w0+W, nimg)
		// The window's pieces, in image order, split at frames and at the
		// resume point.
		pieces = pieces[:0]
		for ri < len(m.runs) && m.runs[ri].Index+rj < w1 {
			r := m.runs[ri]
			idx, gid := r.Index+rj, r.Global+rj
			n := min(r.Count-rj, w1-idx)
			for n > 0 {
				pl, h, err := pr.table(gid)
				if err != nil {
					return err
				}
				rel := gid - pl.entry.First
				f := h.frameOf(rel)
				k := min(n, h.frameFirst[f+1]-rel)
				if idx < resume && idx+k > resume {
					k = resume - idx
				}
				pieces = append(pieces, piece{idx: idx, gid: gid, n: k, pack: pl.entry.Num, frame: f})
				idx, gid, n, rj = idx+k, gid+k, n-k, rj+k
			}
			if rj == r.Count {
				ri, rj = ri+1, 0
			}
		}
		// Write in seed order.
		var todo []piece
		for _, p := range pieces {
			if p.idx >= resume {
				todo = append(todo, p)
			}
		}
		if len(todo) > 0 {
			sort.Slice(todo, func(i, j int) bool {
				if todo[i].pack != todo[j].pack {
					return todo[i].pack < todo[j].pack
				}
				if todo[i].frame != todo[j].frame {
					return todo[i].frame < todo[j].frame
				}
				return todo[i].idx < todo[j].idx
			})
			if err := pr.write(ctx, m, sk, todo, prog, sum, o); err != nil {
				return err
			}
		}
		// Root over the window in image order, from the pack tables (every
		// chunk written was checked against them).
		for _, p := range pieces {
			pl, h, err := pr.table(p.gid)
			if err != nil {
				return err
			}
			rel := p.gid - pl.entry.First
			for c := uint64(0); c < p.n; c++ {
				root.add(p.idx+c, h.ids[rel+c])
			}
		}
		if len(todo) > 0 && w1 < nimg {
			if err := checkpoint(w1); err != nil {
				return err
			}
		}
	}
	if root.sum() != m.Root {
		return fmt.Errorf("dedup: image %q does not match its manifest root (seed tampered or inconsistent)", m.Name)
	}
	return checkpoint(nimg)
}

// write decodes the frames of the pieces (sorted by pack and frame) in
// parallel, checks every chunk to be written against its id, and writes the
// pieces.
func (pr *packReader) write(ctx context.Context, m *Manifest, sk ImageSink, todo []piece, prog *Progress, sum *Summary, o *ImportOptions) error {
	type job struct {
		key    frameKey
		h      *packHeader
		comp   []byte
		raw    []byte
		cached bool
		ps     []piece
		hs     [][][32]byte // per piece, for a HashedSink
		err    error
	}
	hsk, hashed := sk.(HashedSink)
	plainIDs := pr.ss.k == nil // chunk ids are the plain BLAKE3
	var all []*job
	for i, p := range todo {
		if i == 0 || p.pack != todo[i-1].pack || p.frame != todo[i-1].frame {
			all = append(all, &job{key: frameKey{p.pack, p.frame}})
		}
		j := all[len(all)-1]
		j.ps = append(j.ps, p)
	}
	batch := pr.workers * 2
	for b := 0; b < len(all); b += batch {
		if err := ctx.Err(); err != nil {
			return err
		}
		jobs := all[b:min(b+batch, len(all))]
		for _, j := range jobs {
			h, err := pr.tableOf(j.key.pack)
			if err != nil {
				return err
			}
			j.h = h
			if raw, ok := pr.cached(j.key); ok {
				j.raw, j.cached = raw, true
			} else if j.comp, err = pr.frameBytes(j.key.pack, h, j.key.frame); err != nil {
				return err
			}
		}
		var wg sync.WaitGroup
		next := make(chan *job, len(jobs))
		for _, j := range jobs {
			next <- j
		}
		close(next)
		for w := 0; w < min(pr.workers, len(jobs)); w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				hash := pr.ss.k.chunkHasher()
				for j := range next {
					if j.raw == nil {
						buf, _ := pr.bufs.Get().([]byte)
						if j.raw, j.err = j.h.decodeFrame(j.key.frame, j.comp, buf); j.err != nil {
							continue
						}
					}
					base := j.h.frameFirst[j.key.frame]
					first := pr.packs[j.key.pack].entry.First
					for _, p := range j.ps {
						var ids [][32]byte
						if hashed {
							ids = make([][32]byte, p.n)
							j.hs = append(j.hs, ids)
						}
						at := p.gid - first - base
						if j.err = j.h.verify(j.key.frame, j.raw, at, p.n, hash, ids); j.err != nil {
							break
						}
						if hashed && !plainIDs {
							for c := range ids {
								o := (at + uint64(c)) * chunkSize
								ids[c] = blake3.Sum256(j.raw[o : o+chunkSize])
							}
						}
					}
				}
			}()
		}
		wg.Wait()
		for _, j := range jobs {
			if j.err != nil {
				return fmt.Errorf("%s: %w", lostName(pr.packs[j.key.pack].entry), j.err)
			}
			ff := j.h.frameFirst[j.key.frame]
			first := pr.packs[j.key.pack].entry.First
			for k, p := range j.ps {
				in := p.gid - first - ff
				data := j.raw[in*chunkSize : (in+p.n)*chunkSize]
				off := int64(p.idx) * chunkSize
				if end := off + int64(len(data)); end > m.Size {
					data = data[:m.Size-off]
				}
				var err error
				if hashed {
					_, err = hsk.WriteHashedAt(data, off, j.hs[k])
				} else {
					_, err = sk.WriteAt(data, off)
				}
				if err != nil {
					return fmt.Errorf("dedup: image %q: %w", m.Name, err)
				}
				prog.BytesRead += int64(len(data))
				sum.Chunks += int(p.n)
			}
			if !j.cached {
				pr.remember(j.key, j.raw)
			}
			j.raw, j.comp, j.ps, j.hs = nil, nil, nil, nil
		}
		if o.Progress != nil {
			o.Progress(*prog)
		}
	}
	return nil
}

// packReader reads pack tables and frames by pack number, through small
// caches, without reading whole packs.
type packReader struct {
	ss      *seedSet
	st      *shardStore
	packs   []packLoc // by pack number
	tables  map[uint64]*packHeader
	torder  []uint64
	maxTab  int
	frames  map[frameKey]*list.Element // LRU of decoded frames
	flru    *list.List
	fbytes  int64
	maxFr   int64
	bufs    sync.Pool // frame buffers evicted from the cache
	workers int
}

type cachedFrame struct {
	key frameKey
	raw []byte
}

type frameKey struct {
	pack  uint64
	frame int
}

func newPackReader(ss *seedSet, st *shardStore, o ImportOptions) *packReader {
	pr := &packReader{ss: ss, st: st, tables: map[uint64]*packHeader{}, maxTab: o.PackCache, frames: map[frameKey]*list.Element{},
		flru: list.New(), maxFr: o.FrameCache, workers: min(runtime.GOMAXPROCS(0), 8)}
	if pr.maxTab <= 0 {
		pr.maxTab = 256
	}
	if pr.maxFr <= 0 {
		pr.maxFr = 32 << 20
	}
	for gi, g := range ss.ix.Groups {
		for i, s := range g.Shards[:g.Data] {
			if s.Kind == kindPack {
				pr.packs = append(pr.packs, packLoc{gi, i, s})
			}
		}
	}
	sort.Slice(pr.packs, func(i, j int) bool { return pr.packs[i].entry.Num < pr.packs[j].entry.Num })
	return pr
}

// table returns the pack holding global chunk gid and its table.
func (pr *packReader) table(gid uint64) (*packLoc, *packHeader, error) {
	pi := sort.Search(len(pr.packs), func(i int) bool { return pr.packs[i].entry.First+uint64(pr.packs[i].entry.Count) > gid })
	if pi == len(pr.packs) || pr.packs[pi].entry.First > gid {
		return nil, nil, fmt.Errorf("dedup: chunk %d is in no pack", gid)
	}
	h, err := pr.tableOf(uint64(pi))
	return &pr.packs[pi], h, err
}

func (pr *packReader) tableOf(num uint64) (*packHeader, error) {
	if h, ok := pr.tables[num]; ok {
		return h, nil
	}
	pl := &pr.packs[num]
	r, err := pr.st.reader(pl.g, pl.i)
	if err != nil {
		return nil, err
	}
	k := pr.ss.k
	plainLen := k.plainLen(pl.entry.Len)
	head, err := k.readRange(r, 0, int64(min(int64(packHeaderLen), plainLen)))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", lostName(pl.entry), err)
	}
	tl, err := packTableSize(head, pl.entry.Num, pl.entry.First, pl.entry.Count)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", lostName(pl.entry), err)
	}
	if int64(tl) > plainLen {
		return nil, fmt.Errorf("%s: pack table longer than the pack", lostName(pl.entry))
	}
	tab, err := k.readRange(r, 0, int64(tl))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", lostName(pl.entry), err)
	}
	h, err := parsePackTable(tab, plainLen, pl.entry.Num, pl.entry.First, pl.entry.Count)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", lostName(pl.entry), err)
	}
	if len(pr.torder) >= pr.maxTab {
		delete(pr.tables, pr.torder[0])
		pr.torder = pr.torder[1:]
	}
	pr.tables[num] = h
	pr.torder = append(pr.torder, num)
	return h, nil
}

func (pr *packReader) frameBytes(num uint64, h *packHeader, f int) ([]byte, error) {
	pl := &pr.packs[num]
	r, err := pr.st.reader(pl.g, pl.i)
	if err != nil {
		return nil, err
	}
	b, err := pr.ss.k.readRange(r, h.frameOff[f], int64(h.frameLen[f]))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", lostName(pl.entry), err)
	}
	return b, nil
}

func (pr *packReader) cached(k frameKey) ([]byte, bool) {
	e, ok := pr.frames[k]
	if !ok {
		return nil, false
	}
	pr.flru.MoveToFront(e)
	return e.Value.(*cachedFrame).raw, true
}

// remember caches a decoded frame, evicting the least recently used ones
// (whose buffers are reused).
func (pr *packReader) remember(k frameKey, raw []byte) {
	if int64(len(raw)) > pr.maxFr {
		pr.bufs.Put(raw[:0])
		return
	}
	pr.frames[k] = pr.flru.PushFront(&cachedFrame{k, raw})
	pr.fbytes += int64(len(raw))
	for pr.fbytes > pr.maxFr {
		e := pr.flru.Back()
		cf := e.Value.(*cachedFrame)
		pr.flru.Remove(e)
		delete(pr.frames, cf.key)
		pr.fbytes -= int64(len(cf.raw))
		pr.bufs.Put(cf.raw[:0])
	}
}
