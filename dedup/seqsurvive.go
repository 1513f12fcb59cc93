package dedup

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/standin/standin/internal/fsutil"
	"github.com/zeebo/blake3"
)

// Sequential volumes that survive the loss of one (SurviveVolumeLoss with a
// single directory and NextVolume). Volumes are written one after the other,
// so a group cannot be striped over volumes known in advance. Instead groups
// are transposed: data shard number i of every data volume belongs to group
// i, so each data volume holds at most one shard of any group. Each group
// gets one parity shard, accumulated shard by shard (the Cauchy columns do
// not depend on how many volumes there will be) in ScratchDir; when all data
// is written, the parity shards are written onto the last volume(s), which
// hold nothing else. Losing any one volume loses at most one shard per group.
//
// The accumulator of group i after folding c data shards is the scratch file
// parity-acc/IIIIIIII.CCC. A new version is written (atomically) before the
// pack is journaled; older versions are deleted only when the volume is
// closed, so a resume can always fall back to the version that matches the
// journal.

type seqGroup struct {
	shards []shardEntry
	maxLen int64
}

func (l *layout) accPath(g, c int) string {
	return filepath.Join(l.e.state, accDir, fmt.Sprintf("%08d.%03d", g, c))
}

func (l *layout) readAcc(g, c int) ([]byte, error) {
	if c == 0 {
		return nil, nil
	}
	b, err := os.ReadFile(l.accPath(g, c))
	if err != nil {
		return nil, fmt.Errorf("dedup: scratch parity: %w", err)
	}
	if int64(len(b)) != l.sg[g].maxLen && c == len(l.sg[g].shards) {
		return nil, fmt.Errorf("dedup: scratch parity %s has %d bytes, want %d", l.accPath(g, c), len(b), l.sg[g].maxLen)
	}
	return b, nil
}

// placeSeq writes one data shard in sequential survive mode.
func (l *layout) placeSeq(kind byte, num uint64, data []byte, jp *jPack) error {
	n := int64(len(data))
	if l.set == nil {
		if err := l.newSet(); err != nil {
			return err
		}
	}
	v := l.set[0]
	if v.used+n+l.idxRes > l.size {
		if v.count == 0 {
			return fmt.Errorf("dedup: a %d-byte shard does not fit on an empty volume of %d bytes", n, l.size)
		}
		if err := l.closeSeqVolume(); err != nil {
			return err
		}
		if err := l.newSet(); err != nil {
			return err
		}
		v = l.set[0]
	}
	gi := v.count
	for len(l.sg) <= gi {
		l.sg = append(l.sg, seqGroup{})
	}
	g := &l.sg[gi]
	c := len(g.shards)
	if c+1+1 > 256 {
		return errors.New("dedup: more than 255 data volumes: use larger volumes")
	}
	s := shardEntry{Kind: kind, Vol: v.n, Num: num, Len: n, Hash: blake3.Sum256(data)}
	if jp != nil {
		s.First, s.Count = jp.first, jp.count
	}
	if err := writeFileAtomic(filepath.Join(v.dir, s.Name()), data, l.e.mode()); err != nil {
		return l.volErr(v, s.Name(), err)
	}
	old, err := l.readAcc(gi, c)
	if err != nil {
		return err
	}
	acc := &parityAcc{p: 1, d: c, acc: [][]byte{old}}
	if err := acc.add(data); err != nil {
		return err
	}
	if err := fsutil.MkdirPrivate(filepath.Join(l.e.state, accDir), DirMode(privateMode)); err != nil {
		return err
	}
	if err := writeFileAtomic(l.accPath(gi, c+1), acc.acc[0], privateMode); err != nil {
		return fmt.Errorf("dedup: scratch parity: %w", err)
	}
	v.used += n
	v.count++
	l.e.seedBytes.Add(n)
	g.shards = append(g.shards, s)
	g.maxLen = max(g.maxLen, n)
	if jp != nil {
		jp.vol, jp.group = v.n, gi
		if err := l.e.jf.add(jEntry{kind: 'p', pack: *jp}); err != nil {
			return err
		}
	}
	return nil
}

// seqIndex is the index of sequential survive mode: without parity (a
// partial index) or with the parity shards on volumes first, first+1, ...
func (l *layout) seqIndex(partial bool, first int) (*seedIndex, error) {
	ix := &seedIndex{SeedID: l.e.seed, Partial: partial, Encrypted: l.e.k != nil, Salt: l.e.salt}
	if l.e.k != nil {
		ix.Check = l.e.k.check
	}
	vol, used := first, int64(0)
	for gi, g := range l.sg {
		if len(g.shards) == 0 {
			continue
		}
		ge := groupEntry{Data: len(g.shards), ShardSize: g.maxLen, Shards: append([]shardEntry(nil), g.shards...)}
		for _, s := range g.shards {
			if s.Kind == kindPack {
				ix.TotalChunks += uint64(s.Count)
			}
		}
		if !partial {
			b, err := l.readAcc(gi, len(g.shards))
			if err != nil {
				return nil, err
			}
			if used > 0 && used+int64(len(b))+l.idxRes > l.size {
				vol, used = vol+1, 0
			}
			used += int64(len(b))
			ge.Parity = 1
			ge.Shards = append(ge.Shards, shardEntry{Kind: kindParity, Vol: vol, Num: uint64(len(ix.Groups)) << 8, Len: int64(len(b)), Hash: blake3.Sum256(b)})
		}
		ix.Groups = append(ix.Groups, ge)
	}
	if !partial {
		ix.Volumes = vol
	}
	return ix, nil
}

// closeSeqVolume ends a data volume: partial index, label removed, old
// accumulator versions dropped.
func (l *layout) closeSeqVolume() error {
	ix, err := l.seqIndex(true, 0)
	if err != nil {
		return err
	}
	v := l.set[0]
	if err := l.seal(v, ix, false); err != nil {
		return err
	}
	if err := l.e.jf.add(jEntry{kind: 'c', vol: v.n}); err != nil {
		return err
	}
	l.set = nil
	l.pruneAccs()
	return nil
}

// pruneAccs deletes every accumulator version but the one matching the
// shards placed so far.
func (l *layout) pruneAccs() {
	ents, _ := os.ReadDir(filepath.Join(l.e.state, accDir))
	for _, de := range ents {
		g, c, ok := parseAccName(de.Name())
		if !ok || g >= len(l.sg) || c != len(l.sg[g].shards) {
			os.Remove(filepath.Join(l.e.state, accDir, de.Name()))
		}
	}
}

func parseAccName(n string) (g, c int, ok bool) {
	a, b, found := strings.Cut(n, ".")
	if !found {
		return 0, 0, false
	}
	g, e1 := strconv.Atoi(a)
	c, e2 := strconv.Atoi(b)
	return g, c, e1 == nil && e2 == nil
}

// finishSeq places the manifests (all on one volume, so that a resume can
// write them again), writes the complete index onto the last data volume and
// into ScratchDir, journals the manifests' roots, and then writes the parity
// volumes.
func (l *layout) finishSeq(data [][]byte, sum [3]int64, roots [][32]byte) error {
	var total int64
	for _, d := range data {
		total += int64(len(d))
	}
	if l.set == nil {
		if err := l.newSet(); err != nil {
			return err
		}
	}
	if v := l.set[0]; v.used+total+l.idxRes > l.size && v.count > 0 {
		if err := l.closeSeqVolume(); err != nil {
			return err
		}
		if err := l.newSet(); err != nil {
			return err
		}
	}
	if v := l.set[0]; v.used+total+l.idxRes > l.size {
		return fmt.Errorf("dedup: the manifests (%d bytes) do not fit on one volume of %d bytes", total, l.size)
	}
	for i, d := range data {
		if err := l.placeSeq(kindManifest, uint64(i), d, nil); err != nil {
			return err
		}
	}
	v := l.set[0]
	ix, err := l.seqIndex(false, v.n+1)
	if err != nil {
		return err
	}
	ix.Images = len(data)
	if err := l.seal(v, ix, true); err != nil {
		return err
	}
	fin := *ix
	fin.Volume = v.n
	if err := writeFileAtomic(filepath.Join(l.e.state, finalIdxName), fin.encode(l.e.k), privateMode); err != nil {
		return fmt.Errorf("dedup: scratch: %w", err)
	}
	if err := l.e.jf.add(jEntry{kind: 'c', vol: v.n}); err != nil {
		return err
	}
	// The roots, for Summary.Roots of a run that resumes with only the
	// parity volumes left (the manifests are on a data volume).
	var es []jEntry
	for i, r := range roots {
		es = append(es, jEntry{kind: 'r', vol: i, root: r})
	}
	if err := l.e.jf.add(append(es, jEntry{kind: 'd', data: sum})...); err != nil {
		return err
	}
	l.set = nil
	return l.writeParityVolumes(ix, v.n+1)
}

// writeParityVolumes writes the parity shards of ix (from the accumulators)
// onto volumes from..ix.Volumes, each with the complete index.
func (l *layout) writeParityVolumes(ix *seedIndex, from int) error {
	for n := from; n <= ix.Volumes; n++ {
		var v *volState
		if n <= len(l.all) {
			v = l.all[n-1]
			if v.closed {
				continue
			}
		} else {
			d, err := l.e.o.NextVolume(n)
			if err != nil {
				return fmt.Errorf("dedup: next volume %d: %w", n, err)
			}
			if err := l.startVolume(n, d); err != nil {
				return err
			}
			v = l.all[n-1]
		}
		for gi, g := range ix.Groups {
			s := g.Shards[len(g.Shards)-1]
			if s.Vol != n {
				continue
			}
			b, err := l.readAcc(gi, g.Data)
			if err != nil {
				return err
			}
			if blake3.Sum256(b) != s.Hash {
				return fmt.Errorf("dedup: scratch parity of group %d changed", gi)
			}
			if err := writeFileAtomic(filepath.Join(v.dir, s.Name()), b, l.e.mode()); err != nil {
				return l.volErr(v, s.Name(), err)
			}
			v.used += s.Len
			l.e.seedBytes.Add(s.Len)
		}
		if err := l.seal(v, ix, true); err != nil {
			return err
		}
		if err := l.e.jf.add(jEntry{kind: 'c', vol: n}); err != nil {
			return err
		}
		l.set = nil
	}
	return nil
}
