package dedup

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/klauspost/reedsolomon"
	"github.com/zeebo/blake3"
)

// ErrUnrepairable: more shards of some group are damaged than it has parity.
var ErrUnrepairable = errors.New("dedup: seed damaged beyond repair")

// UnrepairableError names what is lost. errors.Is(err, ErrUnrepairable) holds.
type UnrepairableError struct {
	Lost   []string // damaged data shards (packs/manifests) that cannot be rebuilt
	Groups []int    // the groups concerned
}

func (e *UnrepairableError) Error() string {
	return fmt.Sprintf("dedup: seed damaged beyond its parity in group(s) %v; lost: %s", e.Groups, strings.Join(e.Lost, ", "))
}

func (e *UnrepairableError) Is(t error) bool { return t == ErrUnrepairable }

// Report is the outcome of Verify.
type Report struct {
	Encrypted     bool
	IndexCopies   int // intact copies of the index (of 2)
	Groups        []GroupReport
	Shards        int   // shards checked
	DamagedShards int   // of which damaged
	Bytes         int64 // bytes read
	Repairable    bool  // every group has no more damaged shards than parity shards
	Lost          []string
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
}

// OK reports an undamaged seed.
func (r Report) OK() bool { return r.DamagedShards == 0 && r.IndexCopies == 2 }

// Verify checks every shard of the seed in dir against its hash in the index.
// It needs no key; if a key is given it must be the seed's key.
func Verify(ctx context.Context, dir string, key []byte) (Report, error) {
	ix, _, err := readIndex(dir, key)
	if err != nil && !(errors.Is(err, ErrKeyRequired) && key == nil) {
		return Report{}, err
	}
	return checkShards(ctx, dir, ix)
}

func checkShards(ctx context.Context, dir string, ix *seedIndex) (Report, error) {
	rep := Report{Encrypted: ix.Encrypted, Repairable: true}
	for _, n := range indexNames {
		if b, err := readFileLimited(filepath.Join(dir, n), 64<<20); err == nil {
			if _, err := decodeIndex(b); err == nil {
				rep.IndexCopies++
			}
		}
	}
	for gi, g := range ix.Groups {
		gr := GroupReport{Group: gi, Data: g.Data, Parity: g.Parity}
		for _, s := range g.Shards {
			if err := ctx.Err(); err != nil {
				return rep, err
			}
			rep.Shards++
			n, problem := checkShard(dir, s)
			rep.Bytes += n
			if problem != "" {
				gr.Damaged = append(gr.Damaged, DamagedShard{Name: s.Name, Kind: kindName(s.Kind), Problem: problem})
			}
		}
		rep.DamagedShards += len(gr.Damaged)
		gr.Repairable = len(gr.Damaged) <= g.Parity
		if !gr.Repairable {
			rep.Repairable = false
			for _, d := range gr.Damaged {
				if d.Kind != "parity" {
					rep.Lost = append(rep.Lost, d.Name)
				}
			}
		}
		rep.Groups = append(rep.Groups, gr)
	}
	return rep, nil
}

// checkShard hashes one shard file; it returns the bytes read and a problem
// description, empty when the shard is intact.
func checkShard(dir string, s shardEntry) (int64, string) {
	f, err := os.Open(filepath.Join(dir, s.Name))
	if err != nil {
		if os.IsNotExist(err) {
			return 0, "missing"
		}
		return 0, err.Error()
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil || !st.Mode().IsRegular() {
		return 0, "not a regular file"
	}
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

// shardStore hands out verified shard contents, rebuilding damaged ones from
// parity. Rebuilt shards are kept in memory, or written back into the seed
// when inPlace.
type shardStore struct {
	dir      string
	ix       *seedIndex
	inPlace  bool
	repaired map[string][]byte
	failed   map[int]error
}

func newShardStore(dir string, ix *seedIndex, inPlace bool) *shardStore {
	return &shardStore{dir: dir, ix: ix, inPlace: inPlace, repaired: map[string][]byte{}, failed: map[int]error{}}
}

func (st *shardStore) readVerified(s shardEntry) ([]byte, bool) {
	b, err := readFileLimited(filepath.Join(st.dir, s.Name), s.Len)
	if err != nil || int64(len(b)) != s.Len || blake3.Sum256(b) != s.Hash {
		return nil, false
	}
	return b, true
}

// get returns shard i of group g, verified against its hash.
func (st *shardStore) get(g, i int) ([]byte, error) {
	s := st.ix.Groups[g].Shards[i]
	if b, ok := st.repaired[s.Name]; ok {
		return b, nil
	}
	if b, ok := st.readVerified(s); ok {
		return b, nil
	}
	if err := st.repair(g); err != nil {
		return nil, err
	}
	if b, ok := st.repaired[s.Name]; ok {
		return b, nil
	}
	if b, ok := st.readVerified(s); ok {
		return b, nil
	}
	return nil, fmt.Errorf("dedup: %s could not be rebuilt", s.Name)
}

func (st *shardStore) repair(gi int) error {
	if err, ok := st.failed[gi]; ok {
		return err
	}
	g := st.ix.Groups[gi]
	shards := make([][]byte, len(g.Shards))
	var bad []int
	for i, s := range g.Shards {
		if b, ok := st.repaired[s.Name]; ok {
			shards[i] = padTo(append([]byte(nil), b...), g.ShardSize)
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
		e := &UnrepairableError{Groups: []int{gi}}
		for _, i := range bad {
			if i < g.Data {
				e.Lost = append(e.Lost, g.Shards[i].Name)
			}
		}
		st.failed[gi] = e
		return e
	}
	rs, err := reedsolomon.New(g.Data, g.Parity)
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
			err := fmt.Errorf("dedup: group %d: rebuilt %s does not match its hash", gi, s.Name)
			st.failed[gi] = err
			return err
		}
		if st.inPlace {
			os.MkdirAll(filepath.Dir(filepath.Join(st.dir, s.Name)), 0o755)
			if err := writeFileAtomic(filepath.Join(st.dir, s.Name), b); err != nil {
				return err
			}
		} else if i < g.Data {
			st.repaired[s.Name] = b
		}
	}
	return nil
}
