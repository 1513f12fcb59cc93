package dedup

import (
	"context"
	"fmt"
	"path/filepath"
	"sort"
)

// ImageSink receives one reconstructed image. Import calls Truncate(0) and
// Truncate(Size) first, then WriteAt for stored chunks only, so holes stay
// holes in a sparse file.
type ImageSink interface {
	WriteAt(p []byte, off int64) (int, error)
	Truncate(size int64) error
}

// ImportOptions tune Import.
type ImportOptions struct {
	// RepairInPlace writes rebuilt shards (and a damaged index copy) back into
	// the seed. Otherwise the seed is only read and rebuilt shards are kept in
	// memory for the duration of the import.
	RepairInPlace bool
	Progress      func(Progress)
	// PackCache is the number of decoded packs kept in memory (default 8).
	PackCache int
	// Accept, when set, sees every manifest before anything is written and
	// may refuse the seed (wrong VM, wrong generation) by returning an error.
	Accept func([]Manifest) error
}

// ReadManifests returns the manifests of the seed in dir (repairing a damaged
// manifest from parity in memory), for dry runs and identity checks.
func ReadManifests(dir string, key []byte) ([]Manifest, error) {
	ix, k, err := readIndex(dir, key)
	if err != nil {
		return nil, err
	}
	ms, err := loadManifests(ix, k, newShardStore(dir, ix, false))
	if err != nil {
		return nil, err
	}
	out := make([]Manifest, len(ms))
	for i, m := range ms {
		out[i] = *m
	}
	return out, nil
}

func loadManifests(ix *seedIndex, k *keys, st *shardStore) ([]*Manifest, error) {
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
			plain, err := k.open(kindManifest, s.Num, b)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", s.Name, err)
			}
			m, err := decodeManifest(plain, ix.TotalChunks)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", s.Name, err)
			}
			if names[m.Name] {
				return nil, fmt.Errorf("dedup: image %q appears twice in the seed", m.Name)
			}
			names[m.Name] = true
			ms[s.Num] = m
		}
	}
	return ms, nil
}

type packLoc struct {
	g, i  int
	entry shardEntry
}

type decodedPack struct {
	num    uint64
	raw    []byte
	hashes [][32]byte
}

// Import reconstructs every image of the seed in dir through sink. It first
// checks every shard; if some group is damaged beyond its parity it returns an
// *UnrepairableError naming the lost files before calling sink at all. Every
// chunk is checked against its id and every image against its manifest root.
// sink is called once per image, in manifest order, and may refuse an image
// (wrong identity or generation) by returning an error, which aborts Import.
func Import(ctx context.Context, dir string, key []byte, sink func(m Manifest) (ImageSink, error), o ImportOptions) (Summary, error) {
	var sum Summary
	ix, k, err := readIndex(dir, key)
	if err != nil {
		return sum, err
	}
	rep, err := checkShards(ctx, dir, ix)
	if err != nil {
		return sum, err
	}
	if !rep.Repairable {
		e := &UnrepairableError{Lost: rep.Lost}
		for _, g := range rep.Groups {
			if !g.Repairable {
				e.Groups = append(e.Groups, g.Group)
			}
		}
		return sum, e
	}
	sum.SeedBytes = rep.Bytes
	st := newShardStore(dir, ix, o.RepairInPlace)
	if o.RepairInPlace && rep.IndexCopies < 2 {
		for _, n := range indexNames {
			if err := writeFileAtomic(filepath.Join(dir, n), ix.encodeRaw); err != nil {
				return sum, err
			}
		}
	}
	ms, err := loadManifests(ix, k, st)
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
	// Rebuild every damaged data shard before the first byte reaches a sink,
	// so a reconstruction failure cannot leave an image half written.
	for _, g := range rep.Groups {
		if len(g.Damaged) > 0 {
			if err := st.repair(g.Group); err != nil {
				return sum, err
			}
		}
	}

	var packs []packLoc
	for gi, g := range ix.Groups {
		for i, s := range g.Shards[:g.Data] {
			if s.Kind == kindPack {
				packs = append(packs, packLoc{gi, i, s})
			}
		}
	}
	if o.PackCache <= 0 {
		o.PackCache = 8
	}
	hash := k.chunkHasher()
	var cache []*decodedPack
	getPack := func(gid uint64) (*decodedPack, *packLoc, error) {
		pi := sort.Search(len(packs), func(i int) bool { return packs[i].entry.First+uint64(packs[i].entry.Count) > gid })
		if pi == len(packs) {
			return nil, nil, fmt.Errorf("dedup: chunk %d is in no pack", gid)
		}
		pl := &packs[pi]
		for i, c := range cache {
			if c.num == pl.entry.Num {
				copy(cache[1:i+1], cache[:i])
				cache[0] = c
				return c, pl, nil
			}
		}
		b, err := st.get(pl.g, pl.i)
		if err != nil {
			return nil, nil, err
		}
		plain, err := k.open(kindPack, pl.entry.Num, b)
		if err != nil {
			return nil, nil, fmt.Errorf("%s: %w", pl.entry.Name, err)
		}
		h, err := parsePackHeader(plain, pl.entry.Num, pl.entry.First, pl.entry.Count)
		if err != nil {
			return nil, nil, fmt.Errorf("%s: %w", pl.entry.Name, err)
		}
		raw, err := h.decode(hash)
		if err != nil {
			return nil, nil, fmt.Errorf("%s: %w", pl.entry.Name, err)
		}
		c := &decodedPack{num: pl.entry.Num, raw: raw, hashes: h.hashes}
		if len(cache) >= o.PackCache {
			cache = cache[:o.PackCache-1]
		}
		cache = append([]*decodedPack{c}, cache...)
		return c, pl, nil
	}

	prog := Progress{Images: len(ms)}
	for _, m := range ms {
		prog.BytesTotal += m.Allocated
	}
	for mi, m := range ms {
		prog.Image = mi
		sk, err := sink(*m)
		if err != nil {
			return sum, fmt.Errorf("dedup: image %q refused: %w", m.Name, err)
		}
		if err := sk.Truncate(0); err != nil {
			return sum, err
		}
		if err := sk.Truncate(m.Size); err != nil {
			return sum, err
		}
		root := newRootHasher()
		for _, r := range m.runs {
			for j := uint64(0); j < r.Count; {
				if err := ctx.Err(); err != nil {
					return sum, err
				}
				gid := r.Global + j
				p, pl, err := getPack(gid)
				if err != nil {
					return sum, err
				}
				rel := gid - pl.entry.First
				n := min(r.Count-j, uint64(pl.entry.Count)-rel)
				idx := r.Index + j
				off := int64(idx) * chunkSize
				data := p.raw[rel*chunkSize : (rel+n)*chunkSize]
				if end := off + int64(len(data)); end > m.Size {
					data = data[:m.Size-off]
				}
				if _, err := sk.WriteAt(data, off); err != nil {
					return sum, fmt.Errorf("dedup: image %q: %w", m.Name, err)
				}
				for c := uint64(0); c < n; c++ {
					root.add(idx+c, p.hashes[rel+c])
				}
				j += n
				prog.BytesRead += int64(len(data))
				sum.Chunks += int(n)
			}
			if o.Progress != nil {
				o.Progress(prog)
			}
		}
		if root.sum() != m.Root {
			return sum, fmt.Errorf("dedup: image %q does not match its manifest root (seed tampered or inconsistent)", m.Name)
		}
		if s, ok := sk.(interface{ Sync() error }); ok {
			if err := s.Sync(); err != nil {
				return sum, err
			}
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
