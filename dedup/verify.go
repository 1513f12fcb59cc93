package dedup

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/standin/standin/internal/fsutil"
	"github.com/zeebo/blake3"
)

// ErrUnrepairable: more shards of some group are damaged than it has parity.
var ErrUnrepairable = errors.New("dedup: seed damaged beyond repair")

// UnrepairableError names what is lost. errors.Is(err, ErrUnrepairable) holds.
type UnrepairableError struct {
	Lost           []string // damaged data shards (packs/manifests) that cannot be rebuilt, as "volume N: file"
	Groups         []int    // the groups concerned
	MissingVolumes []int    // volumes that were not given
}

func (e *UnrepairableError) Error() string {
	s := fmt.Sprintf("dedup: seed damaged beyond its parity in group(s) %v; lost: %s", e.Groups, strings.Join(e.Lost, ", "))
	if len(e.MissingVolumes) > 0 {
		s += fmt.Sprintf(" (missing volume(s): %v)", e.MissingVolumes)
	}
	return s
}

func (e *UnrepairableError) Is(t error) bool { return t == ErrUnrepairable }

// Report is the outcome of Verify.
type Report struct {
	SeedID         [16]byte
	Encrypted      bool
	Volumes        int   // volumes of the seed
	MissingVolumes []int // volumes not given (1-based)
	IndexCopies    int   // intact index copies found (a whole seed has 2 per volume)
	Groups         []GroupReport
	Shards         int   // shards checked
	DamagedShards  int   // of which damaged or missing
	Bytes          int64 // bytes read
	Repairable     bool  // every group has no more damaged shards than parity shards
	Lost           []string
}

// GroupReport is one Reed-Solomon group.
type GroupReport struct {
	Group, Data, Parity int
	Damaged             []DamagedShard
	Repairable          bool
}

// DamagedShard names one bad file and what is wrong with it.
type DamagedShard struct {
	Name, Kind, Problem string
	Volume              int // 1-based volume the file belongs on
}

// OK reports an undamaged, complete seed.
func (r Report) OK() bool {
	return r.DamagedShards == 0 && r.IndexCopies == 2*r.Volumes && len(r.MissingVolumes) == 0
}

// Verify checks every shard of the seed whose volumes are in paths (any
// order; missing volumes are reported, and the seed is repairable if parity
// covers them) against its hash in the index. It needs no key; if a key is
// given it must be the seed's key.
func Verify(ctx context.Context, paths []string, key []byte) (Report, error) {
	ss, err := openSeed(paths, key, true)
	if err != nil {
		return Report{}, err
	}
	return checkShards(ctx, ss)
}

func lostName(s shardEntry) string { return fmt.Sprintf("volume %d: %s", s.Vol, s.Name()) }

func checkShards(ctx context.Context, ss *seedSet) (Report, error) {
	ix := ss.ix
	rep := Report{SeedID: ix.SeedID, Encrypted: ix.Encrypted, Repairable: true, Volumes: ix.Volumes}
	for _, c := range ss.copies {
		rep.IndexCopies += c
	}
	rep.MissingVolumes = ss.missingVolumes()
	missing := map[int]bool{}
	for _, v := range rep.MissingVolumes {
		missing[v] = true
	}
	for gi, g := range ix.Groups {
		gr := GroupReport{Group: gi, Data: g.Data, Parity: g.Parity}
		for _, s := range g.Shards {
			if err := ctx.Err(); err != nil {
				return rep, err
			}
			rep.Shards++
			var n int64
			problem := ""
			if missing[s.Vol] {
				problem = fmt.Sprintf("volume %d missing", s.Vol)
			} else if p := ss.locate(s); p == "" {
				problem = "missing"
			} else {
				n, problem = checkShard(p, s)
			}
			rep.Bytes += n
			if problem != "" {
				gr.Damaged = append(gr.Damaged, DamagedShard{Name: s.Name(), Kind: kindName(s.Kind), Problem: problem, Volume: s.Vol})
			}
		}
		rep.DamagedShards += len(gr.Damaged)
		gr.Repairable = len(gr.Damaged) <= g.Parity
		if !gr.Repairable {
			rep.Repairable = false
			for i, d := range gr.Damaged {
				if d.Kind != "parity" {
					rep.Lost = append(rep.Lost, lostName(g.Shards[shardPos(g, gr.Damaged[i].Name)]))
				}
			}
		}
		rep.Groups = append(rep.Groups, gr)
	}
	return rep, nil
}

func shardPos(g groupEntry, name string) int {
	for i, s := range g.Shards {
		if s.Name() == name {
			return i
		}
	}
	return 0
}

// checkShard hashes one shard file; it returns the bytes read and a problem
// description, empty when the shard is intact.
func checkShard(path string, s shardEntry) (int64, string) {
	f, st, err := openRegular(path)
	if err != nil {
		if os.IsNotExist(err) {
			return 0, "missing"
		}
		return 0, err.Error()
	}
	defer f.Close()
	if st.Size() != s.Len {
		return 0, fmt.Sprintf("size %d, want %d", st.Size(), s.Len)
	}
	h := blake3.New()
	n, err := io.Copy(h, io.LimitReader(f, s.Len))
	if err != nil {
		return n, "read error: " + err.Error()
	}
	var sum [32]byte
	h.Sum(sum[:0])
	if n != s.Len || sum != s.Hash {
		return n, "hash mismatch"
	}
	return n, ""
}

func (r Report) unrepairable() *UnrepairableError {
	e := &UnrepairableError{Lost: r.Lost, MissingVolumes: r.MissingVolumes}
	for _, g := range r.Groups {
		if !g.Repairable {
			e.Groups = append(e.Groups, g.Group)
		}
	}
	return e
}

// shardStore hands out verified shard contents, rebuilding damaged ones from
// parity. Rebuilt shards are written back into the seed (inPlace, when the
// shard's volume was given) or into an unlinked scratch file, never kept in
// memory (a lost volume may be large).
type shardStore struct {
	ss      *seedSet
	inPlace bool
	scratch string          // directory for the scratch file ("" = os.TempDir())
	bad     map[string]bool // shards known damaged (from checkShards)
	rebuilt map[string][2]int64
	spill   *os.File
	spilled int64
	failed  map[int]error
	files   map[string]*os.File // open shard files (bounded)
}

func newShardStore(ss *seedSet, inPlace bool, rep *Report) *shardStore {
	st := &shardStore{ss: ss, inPlace: inPlace, bad: map[string]bool{}, rebuilt: map[string][2]int64{}, failed: map[int]error{}, files: map[string]*os.File{}}
	if rep != nil {
		for _, g := range rep.Groups {
			for _, d := range g.Damaged {
				st.bad[d.Name] = true
			}
		}
	}
	return st
}

func (st *shardStore) Close() {
	for _, f := range st.files {
		f.Close()
	}
	st.files = nil
	if st.spill != nil {
		st.spill.Close()
		st.spill = nil
	}
}

func (st *shardStore) readVerified(s shardEntry) ([]byte, bool) {
	p := st.ss.locate(s)
	if p == "" {
		return nil, false
	}
	b, err := readFileLimited(p, s.Len)
	if err != nil || int64(len(b)) != s.Len || blake3.Sum256(b) != s.Hash {
		return nil, false
	}
	return b, true
}

// get returns shard i of group g, verified against its hash.
func (st *shardStore) get(g, i int) ([]byte, error) {
	s := st.ss.ix.Groups[g].Shards[i]
	if loc, ok := st.rebuilt[s.Name()]; ok {
		b := make([]byte, loc[1])
		if _, err := st.spill.ReadAt(b, loc[0]); err != nil {
			return nil, err
		}
		if blake3.Sum256(b) != s.Hash {
			return nil, fmt.Errorf("dedup: rebuilt %s changed in the scratch file", lostName(s))
		}
		return b, nil
	}
	if !st.bad[s.Name()] {
		if b, ok := st.readVerified(s); ok {
			return b, nil
		}
	}
	if err := st.rebuild(g); err != nil {
		return nil, err
	}
	if _, ok := st.rebuilt[s.Name()]; ok {
		return st.get(g, i)
	}
	if b, ok := st.readVerified(s); ok {
		return b, nil
	}
	return nil, fmt.Errorf("dedup: %s could not be rebuilt", lostName(s))
}

// reader returns a reader over shard i of group g as stored (checked by
// checkShards or rebuilt), without reading it whole.
func (st *shardStore) reader(g, i int) (io.ReaderAt, error) {
	s := st.ss.ix.Groups[g].Shards[i]
	if st.bad[s.Name()] {
		if _, ok := st.rebuilt[s.Name()]; !ok {
			if err := st.rebuild(g); err != nil {
				return nil, err
			}
		}
	}
	if loc, ok := st.rebuilt[s.Name()]; ok {
		return io.NewSectionReader(st.spill, loc[0], loc[1]), nil
	}
	p := st.ss.locate(s)
	if f, ok := st.files[p]; ok {
		return f, nil
	}
	if p == "" {
		return nil, fmt.Errorf("dedup: %s not found", lostName(s))
	}
	f, _, err := openRegular(p)
	if err != nil {
		return nil, err
	}
	if len(st.files) >= 64 {
		for k, f := range st.files {
			f.Close()
			delete(st.files, k)
		}
	}
	st.files[p] = f
	return f, nil
}

// rebuild reconstructs the damaged shards of group gi, checks them against
// their hashes and stores the data shards (in place or in the scratch file).
func (st *shardStore) rebuild(gi int) error {
	if err, ok := st.failed[gi]; ok {
		return err
	}
	g := st.ss.ix.Groups[gi]
	shards := make([][]byte, len(g.Shards))
	var bad []int
	for i, s := range g.Shards {
		if _, ok := st.rebuilt[s.Name()]; ok && i < g.Data {
			b, err := st.get(gi, i)
			if err != nil {
				return err
			}
			shards[i] = padTo(b, g.ShardSize)
			continue
		}
		if b, ok := st.readVerified(s); ok {
			shards[i] = padTo(b, g.ShardSize)
			continue
		}
		bad = append(bad, i)
	}
	if len(bad) == 0 {
		return nil
	}
	if len(bad) > g.Parity {
		e := &UnrepairableError{Groups: []int{gi}, MissingVolumes: st.ss.missingVolumes()}
		for _, i := range bad {
			if i < g.Data {
				e.Lost = append(e.Lost, lostName(g.Shards[i]))
			}
		}
		st.failed[gi] = e
		return e
	}
	rs, err := rsCodec(g.Data, g.Parity)
	if err != nil {
		return err
	}
	if err := rs.Reconstruct(shards); err != nil {
		return fmt.Errorf("dedup: group %d: reconstruction failed: %w", gi, err)
	}
	for _, i := range bad {
		s := g.Shards[i]
		b := shards[i][:s.Len]
		if blake3.Sum256(b) != s.Hash {
			err := fmt.Errorf("dedup: group %d: rebuilt %s does not match its hash", gi, lostName(s))
			st.failed[gi] = err
			return err
		}
		if d, ok := st.ss.dirs[s.Vol]; ok && st.inPlace {
			p := filepath.Join(d, s.Name())
			mode := st.ss.mode(s.Vol)
			if err := fsutil.MkdirPrivate(filepath.Dir(p), DirMode(mode)); err != nil {
				return err
			}
			if err := writeFileAtomic(p, b, mode); err != nil {
				return err
			}
			delete(st.bad, s.Name())
			if f, ok := st.files[p]; ok {
				f.Close()
				delete(st.files, p)
			}
			continue
		}
		if i >= g.Data {
			continue
		}
		if st.spill == nil {
			f, err := os.CreateTemp(st.scratch, "standin-seed-rebuilt-*")
			if err != nil {
				return fmt.Errorf("dedup: scratch file for rebuilt shards: %w", err)
			}
			os.Remove(f.Name())
			st.spill = f
		}
		if _, err := st.spill.WriteAt(b, st.spilled); err != nil {
			return fmt.Errorf("dedup: scratch file for rebuilt shards: %w", err)
		}
		st.rebuilt[s.Name()] = [2]int64{st.spilled, int64(len(b))}
		st.spilled += int64(len(b))
	}
	return nil
}
