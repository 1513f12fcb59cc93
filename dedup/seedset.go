package dedup

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

var (
	// ErrMixedSeeds: the paths given hold volumes of different seeds.
	ErrMixedSeeds = errors.New("dedup: the volumes given belong to different seeds")
	// ErrIncomplete: no volume given carries the seed's complete index (only
	// volumes closed before the end of a sequential export were given).
	ErrIncomplete = errors.New("dedup: seed incomplete: no volume given carries the complete index")
)

// seedSet is an opened seed: its index and where its volumes are.
type seedSet struct {
	ix     *seedIndex
	k      *keys
	keyErr error          // ErrKeyRequired when the seed is encrypted and no key was given
	dirs   map[int]string // volume number -> directory
	copies map[int]int    // volume number -> intact index copies there
	extra  []string       // directories without an intact index (searched for shards)
	modes  map[int]os.FileMode
}

// mode is the mode of the seed files on volume v (seedModeOf its directory,
// looked up once): that of the files a repair writes there.
func (ss *seedSet) mode(v int) os.FileMode {
	m, ok := ss.modes[v]
	if !ok {
		m = seedModeOf(ss.dirs[v])
		ss.modes[v] = m
	}
	return m
}

type indexCopy struct {
	ix   *seedIndex
	raw  []byte
	dir  string
	name string
}

// openSeed reads the index copies of every path, checks that they belong to
// one seed and picks the complete index. With allowNoKey an encrypted seed
// opens without a key (Verify); ss.k is then nil and ss.keyErr is set.
func openSeed(paths []string, key []byte, allowNoKey bool) (*seedSet, error) {
	if len(paths) == 0 {
		return nil, errors.New("dedup: no seed path given")
	}
	ss := &seedSet{dirs: map[int]string{}, copies: map[int]int{}, modes: map[int]os.FileMode{}}
	seenPath := map[string]bool{}
	var all []indexCopy
	var errs []error
	for _, p := range paths {
		cp := filepath.Clean(p)
		if abs, err := filepath.Abs(cp); err == nil {
			cp = abs
		}
		if seenPath[cp] {
			continue
		}
		seenPath[cp] = true
		if st, err := os.Stat(cp); err != nil {
			return nil, fmt.Errorf("dedup: seed volume %s: %w", p, err)
		} else if !st.IsDir() {
			return nil, fmt.Errorf("dedup: seed volume %s is not a directory", p)
		}
		var found []indexCopy
		for _, n := range indexNames {
			b, err := readFileLimited(filepath.Join(cp, n), maxIndexSize)
			var ix *seedIndex
			if err == nil {
				ix, err = decodeIndex(b)
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", filepath.Join(p, n), err))
				continue
			}
			ix.raw = b
			found = append(found, indexCopy{ix: ix, raw: b, dir: p, name: n})
		}
		if len(found) == 0 {
			ss.extra = append(ss.extra, p)
			continue
		}
		if len(found) == 2 && (found[0].ix.SeedID != found[1].ix.SeedID || found[0].ix.Volume != found[1].ix.Volume) {
			return nil, fmt.Errorf("%w: %s holds index copies of two different seeds or volumes", ErrMixedSeeds, p)
		}
		v := found[0].ix.Volume
		if d, ok := ss.dirs[v]; ok {
			return nil, fmt.Errorf("dedup: %s and %s are both volume %d", d, p, v)
		}
		ss.dirs[v] = p
		ss.copies[v] = len(found)
		all = append(all, found...)
	}
	if len(all) == 0 {
		return nil, fmt.Errorf("%w: %v", ErrCorruptIndex, errors.Join(errs...))
	}
	// One seed only.
	bySeed := map[[16]byte][]string{}
	for _, c := range all {
		s := fmt.Sprintf("%s (volume %d)", c.dir, c.ix.Volume)
		if l := bySeed[c.ix.SeedID]; len(l) == 0 || l[len(l)-1] != s {
			bySeed[c.ix.SeedID] = append(bySeed[c.ix.SeedID], s)
		}
	}
	if len(bySeed) > 1 {
		var parts []string
		for id, l := range bySeed {
			parts = append(parts, fmt.Sprintf("seed %x: %s", id[:], strings.Join(l, ", ")))
		}
		sort.Strings(parts)
		return nil, fmt.Errorf("%w: %s", ErrMixedSeeds, strings.Join(parts, "; "))
	}
	// The complete index: every complete copy must say the same.
	var best *indexCopy
	for i := range all {
		c := &all[i]
		if c.ix.Partial {
			continue
		}
		if best == nil {
			best = c
			continue
		}
		if !bytes.Equal(best.raw[indexCommonStart:len(best.raw)-64], c.raw[indexCommonStart:len(c.raw)-64]) {
			return nil, fmt.Errorf("dedup: the index on %s differs from the one on %s (volumes of different runs of one export?)",
				filepath.Join(best.dir, best.name), filepath.Join(c.dir, c.name))
		}
	}
	if best == nil {
		var have []int
		for v := range ss.dirs {
			have = append(have, v)
		}
		sort.Ints(have)
		return nil, fmt.Errorf("%w (volumes given: %v; the last volume of the seed is missing)", ErrIncomplete, have)
	}
	ss.ix = best.ix
	for v := range ss.dirs {
		if v > ss.ix.Volumes {
			return nil, fmt.Errorf("dedup: %s claims volume %d of a seed of %d volumes", ss.dirs[v], v, ss.ix.Volumes)
		}
	}
	if !ss.ix.Encrypted {
		if key != nil {
			return nil, ErrNotEncrypted
		}
		return ss, nil
	}
	if key == nil {
		if allowNoKey {
			ss.keyErr = ErrKeyRequired
			return ss, nil
		}
		return nil, ErrKeyRequired
	}
	k, err := deriveKeys(key, ss.ix.Salt[:])
	if err != nil {
		return nil, err
	}
	if k.check != ss.ix.Check {
		return nil, ErrWrongKey
	}
	raw := best.raw
	if mac := k.indexMAC(raw[:len(raw)-64]); !bytes.Equal(mac[:], raw[len(raw)-64:len(raw)-32]) {
		return nil, errors.New("dedup: index authentication failed (tampered)")
	}
	ss.k = k
	return ss, nil
}

// locate returns the path of a shard's file: in its volume's directory when
// that volume was given, else the first directory without an intact index
// that has a file of that name. "" when the shard cannot be found.
func (ss *seedSet) locate(s shardEntry) string {
	if d, ok := ss.dirs[s.Vol]; ok {
		return filepath.Join(d, s.Name())
	}
	for _, d := range ss.extra {
		p := filepath.Join(d, s.Name())
		if _, err := os.Lstat(p); err == nil {
			return p
		}
	}
	return ""
}

// missingVolumes lists the volumes that were not given (and none of whose
// shards were found in the unidentified directories).
func (ss *seedSet) missingVolumes() []int {
	found := map[int]bool{}
	for v := range ss.dirs {
		found[v] = true
	}
	if len(ss.extra) > 0 {
		for _, g := range ss.ix.Groups {
			for _, s := range g.Shards {
				if !found[s.Vol] && ss.locate(s) != "" {
					found[s.Vol] = true
				}
			}
		}
	}
	var out []int
	for v := 1; v <= ss.ix.Volumes; v++ {
		if !found[v] {
			out = append(out, v)
		}
	}
	return out
}

// rewriteIndexes writes intact index copies onto every given volume that
// lacks one (RepairInPlace).
func (ss *seedSet) rewriteIndexes() error {
	for v, d := range ss.dirs {
		if ss.copies[v] == 2 {
			continue
		}
		cp := *ss.ix
		cp.Volume = v
		b := cp.encode(ss.k)
		mode := ss.mode(v)
		for _, n := range indexNames {
			if err := writeFileAtomic(filepath.Join(d, n), b, mode); err != nil {
				return err
			}
		}
		ss.copies[v] = 2
	}
	return nil
}
