package dedup

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"

	"github.com/standin/standin/internal/fsutil"
	"github.com/zeebo/blake3"
)

const (
	indexMagic   = "SDINDEX2"
	chunkSize    = 4096
	groupData    = 10 // data shards per Reed-Solomon group
	maxShardSize = 1 << 30
	maxVolumes   = 65535
	maxIndexSize = 1 << 30
)

// Shard kinds.
const (
	kindPack     byte = 1
	kindManifest byte = 2
	kindParity   byte = 3
	kindIndex    byte = 4 // only used as AEAD role, never stored
)

var indexNames = [2]string{"index.0", "index.1"}

// ErrCorruptIndex: neither copy of the shard index is intact.
var ErrCorruptIndex = errors.New("dedup: seed index damaged (both copies) or missing")

type shardEntry struct {
	Kind  byte
	Vol   int    // 1-based volume holding the shard
	Num   uint64 // pack number / manifest number / group<<8 | parity position
	Len   int64
	Hash  [32]byte // BLAKE3 of the file as stored
	First uint64   // packs: first global chunk id
	Count uint32   // packs: number of chunks
}

// Name is the shard's file name below its volume directory, derived from
// kind and number (the index stores no names).
func (s shardEntry) Name() string {
	switch s.Kind {
	case kindPack:
		return packName(s.Num)
	case kindManifest:
		return manifestName(s.Num)
	case kindParity:
		return parityName(int(s.Num>>8), int(s.Num&0xff))
	}
	return "?"
}

type groupEntry struct {
	Data, Parity int
	ShardSize    int64
	Shards       []shardEntry // Data data shards, then Parity parity shards
}

type seedIndex struct {
	SeedID      [16]byte
	Volume      int  // the volume this copy is on (1-based)
	Volumes     int  // volumes of the seed (0 in a partial index)
	Partial     bool // written on a volume closed before the seed was complete
	Encrypted   bool
	Salt        [32]byte
	Check       [32]byte
	TotalChunks uint64
	Images      int
	Groups      []groupEntry

	raw []byte // the intact copy as read
}

const (
	flagEncrypted = 1
	flagPartial   = 2
)

// indexCommonStart is the offset of the bytes that are the same in every
// complete copy of one seed's index (everything after the volume number, up
// to the MAC).
const indexCommonStart = len(indexMagic) + 16 + 4

func kindName(k byte) string {
	switch k {
	case kindPack:
		return "pack"
	case kindManifest:
		return "manifest"
	case kindParity:
		return "parity"
	}
	return "?"
}

func (ix *seedIndex) encode(k *keys) []byte {
	w := &wr{}
	w.bytes([]byte(indexMagic))
	w.bytes(ix.SeedID[:])
	w.u32(uint32(ix.Volume))
	w.u32(uint32(ix.Volumes))
	var fl uint8
	if ix.Encrypted {
		fl |= flagEncrypted
	}
	if ix.Partial {
		fl |= flagPartial
	}
	w.u8(fl)
	w.bytes(ix.Salt[:])
	w.bytes(ix.Check[:])
	w.u32(chunkSize)
	w.u64(ix.TotalChunks)
	w.u32(uint32(ix.Images))
	w.u32(uint32(len(ix.Groups)))
	for _, g := range ix.Groups {
		w.u16(uint16(g.Data))
		w.u16(uint16(g.Parity))
		w.u64(uint64(g.ShardSize))
		for _, s := range g.Shards {
			w.u8(s.Kind)
			w.u32(uint32(s.Vol))
			w.u64(s.Num)
			w.u64(uint64(s.Len))
			w.bytes(s.Hash[:])
			if s.Kind == kindPack {
				w.u64(s.First)
				w.u32(s.Count)
			}
		}
	}
	mac := k.indexMAC(w.b)
	w.bytes(mac[:])
	sum := blake3.Sum256(w.b)
	w.bytes(sum[:])
	return w.b
}

// indexSizeBound is an upper bound of the encoded size of an index with the
// given numbers of groups and shards.
func indexSizeBound(groups, packs, others int64) int64 {
	return int64(len(indexMagic)) + 16 + 4 + 4 + 1 + 32 + 32 + 4 + 8 + 4 + 4 + 64 +
		groups*12 + packs*(1+4+8+8+32+12) + others*(1+4+8+8+32)
}

// decodeIndex parses and validates an index. It never trusts a count or
// length without checking it against the bytes present and fixed limits.
func decodeIndex(b []byte) (*seedIndex, error) {
	if len(b) < indexCommonStart+64 || string(b[:len(indexMagic)]) != indexMagic {
		return nil, errors.New("dedup: not a seed index")
	}
	body, sum := b[:len(b)-32], b[len(b)-32:]
	if s := blake3.Sum256(body); !bytes.Equal(s[:], sum) {
		return nil, errors.New("dedup: index hash mismatch")
	}
	r := &rd{b: body[len(indexMagic) : len(body)-32]}
	ix := &seedIndex{}
	copy(ix.SeedID[:], r.take(16))
	ix.Volume = int(r.u32())
	ix.Volumes = int(r.u32())
	fl := r.u8()
	if fl&^(flagEncrypted|flagPartial) != 0 {
		return nil, errors.New("dedup: index: bad flags")
	}
	ix.Encrypted = fl&flagEncrypted != 0
	ix.Partial = fl&flagPartial != 0
	if r.err != nil || ix.Volume < 1 || ix.Volume > maxVolumes || ix.Volumes > maxVolumes ||
		(ix.Partial && ix.Volumes != 0) || (!ix.Partial && ix.Volume > ix.Volumes) {
		return nil, errors.New("dedup: index: bad volume numbers")
	}
	maxVol := ix.Volumes
	if ix.Partial {
		maxVol = ix.Volume
	}
	ix.Salt = r.h32()
	ix.Check = r.h32()
	if cs := r.u32(); cs != chunkSize && r.err == nil {
		return nil, fmt.Errorf("dedup: index: unsupported chunk size %d", cs)
	}
	ix.TotalChunks = r.u64()
	ix.Images = int(r.u32())
	ng := r.u32()
	if r.err != nil || uint64(ng) > uint64(len(r.b))/12 || ix.Images < 0 || ix.Images > 1<<24 {
		return nil, errors.New("dedup: index: bad group count")
	}
	// Every image has a manifest shard entry (53 bytes at least) below.
	if uint64(ix.Images) > uint64(len(r.b))/53 {
		return nil, fmt.Errorf("dedup: index: %d images for %d bytes of shard entries", ix.Images, len(r.b))
	}
	var packs []*shardEntry
	manifests := make([]bool, 0)
	for gi := uint32(0); gi < ng; gi++ {
		g := groupEntry{Data: int(r.u16()), Parity: int(r.u16()), ShardSize: int64(r.u64())}
		if r.err != nil || g.Data < 1 || g.Data+g.Parity > 256 || g.ShardSize < 0 || g.ShardSize > maxShardSize ||
			uint64(g.Data+g.Parity) > uint64(len(r.b))/53 {
			return nil, fmt.Errorf("dedup: index: group %d: bad geometry", gi)
		}
		var maxLen int64
		for si := 0; si < g.Data+g.Parity; si++ {
			s := shardEntry{Kind: r.u8(), Vol: int(r.u32()), Num: r.u64()}
			s.Len = int64(r.u64())
			s.Hash = r.h32()
			if s.Kind == kindPack {
				s.First = r.u64()
				s.Count = r.u32()
			}
			if r.err != nil {
				return nil, errors.New("dedup: index: truncated")
			}
			if s.Vol < 1 || s.Vol > maxVol {
				return nil, fmt.Errorf("dedup: index: group %d: shard on volume %d of %d", gi, s.Vol, maxVol)
			}
			if s.Len < 0 || s.Len > g.ShardSize {
				return nil, fmt.Errorf("dedup: index: group %d: shard %d: bad length", gi, si)
			}
			isParity := si >= g.Data
			switch {
			case isParity:
				if s.Kind != kindParity || s.Len != g.ShardSize || s.Num != uint64(gi)<<8|uint64(si-g.Data) {
					return nil, fmt.Errorf("dedup: index: group %d: bad parity shard", gi)
				}
			case s.Kind == kindPack:
				if s.Count == 0 || s.Count > maxPackChunks || s.Num > 1<<40 {
					return nil, fmt.Errorf("dedup: index: group %d: bad pack entry", gi)
				}
			case s.Kind == kindManifest:
				if s.Num >= uint64(ix.Images) || manifestSeen(&manifests, s.Num) {
					return nil, fmt.Errorf("dedup: index: manifest %d out of range or listed twice", s.Num)
				}
			default:
				return nil, fmt.Errorf("dedup: index: group %d: shard %d: bad kind", gi, si)
			}
			if !isParity {
				maxLen = max(maxLen, s.Len)
			}
			g.Shards = append(g.Shards, s)
		}
		if maxLen != g.ShardSize {
			return nil, fmt.Errorf("dedup: index: group %d: shard size does not match its shards", gi)
		}
		ix.Groups = append(ix.Groups, g)
	}
	if len(r.b) != 0 {
		return nil, errors.New("dedup: index: trailing bytes")
	}
	// Packs: numbers 0..n-1 each once, chunk ranges contiguous in pack order.
	for gi := range ix.Groups {
		g := &ix.Groups[gi]
		for si := range g.Shards[:g.Data] {
			if g.Shards[si].Kind == kindPack {
				packs = append(packs, &g.Shards[si])
			}
		}
	}
	sort.Slice(packs, func(i, j int) bool { return packs[i].Num < packs[j].Num })
	var next uint64
	for i, p := range packs {
		if p.Num != uint64(i) || p.First != next {
			return nil, fmt.Errorf("dedup: index: pack %d out of order or listed twice", p.Num)
		}
		next += uint64(p.Count)
	}
	if next != ix.TotalChunks || len(manifests) != ix.Images {
		return nil, errors.New("dedup: index: counts do not add up")
	}
	for _, seen := range manifests {
		if !seen {
			return nil, errors.New("dedup: index: counts do not add up")
		}
	}
	return ix, nil
}

func manifestSeen(m *[]bool, n uint64) bool {
	for uint64(len(*m)) <= n {
		*m = append(*m, false)
	}
	if (*m)[n] {
		return true
	}
	(*m)[n] = true
	return false
}

func readFileLimited(path string, limit int64) ([]byte, error) {
	f, st, err := openRegular(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if st.Size() > limit {
		return nil, fmt.Errorf("dedup: %s is larger than expected (%d > %d)", path, st.Size(), limit)
	}
	b := make([]byte, st.Size())
	n, err := f.ReadAt(b, 0)
	if n == len(b) {
		err = nil
	}
	return b[:n], err
}

// writeFileAtomic writes data to path with mode perm via a fresh temporary
// file (O_CREAT|O_EXCL: a symlink planted in the directory is never
// followed) + fsync + rename. The caller syncs the directory.
func writeFileAtomic(path string, data []byte, perm os.FileMode) error {
	return fsutil.WriteAtomicOpts(path, fsutil.AtomicOptions{Perm: perm, NoDirSync: true}, func(w io.Writer) error {
		_, err := w.Write(data)
		return err
	})
}

// DefaultMode is the mode of seed files unless ExportOptions.Mode says
// otherwise: only the owner reads a seed (an unencrypted seed is the
// images' content).
const DefaultMode os.FileMode = 0o600

// privateMode is the mode of the export's working files (journal, chunk
// ids, parity accumulators), whatever the seed's mode.
const privateMode os.FileMode = 0o600

// DirMode is the mode of a directory holding files of mode m: m plus the
// search bit for every class that may read or write.
func DirMode(m os.FileMode) os.FileMode {
	m = m.Perm()
	return m | (m&0o444)>>2 | (m&0o222)>>1
}

// seedModeOf is the mode of the seed files in volume directory dir (that of
// its index or label), DefaultMode if none is found.
func seedModeOf(dir string) os.FileMode {
	for _, n := range append(indexNames[:], labelName) {
		if st, err := os.Lstat(filepath.Join(dir, n)); err == nil && st.Mode().IsRegular() {
			return st.Mode().Perm()
		}
	}
	return DefaultMode
}
