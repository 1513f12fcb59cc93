package dedup

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/zeebo/blake3"
)

const (
	indexMagic   = "SDINDEX1"
	chunkSize    = 4096
	groupData    = 10 // data shards per Reed-Solomon group
	maxShardSize = 1 << 30
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
	Num   uint64 // pack number / manifest number / group*256+parity position
	Name  string
	Len   int64
	Hash  [32]byte // BLAKE3 of the file as stored
	First uint64   // packs: first global chunk id
	Count uint32   // packs: number of chunks
}

type groupEntry struct {
	Data, Parity int
	ShardSize    int64
	Shards       []shardEntry // Data data shards, then Parity parity shards
}

type seedIndex struct {
	Encrypted   bool
	Salt        [32]byte
	Check       [32]byte
	TotalChunks uint64
	Images      int
	Groups      []groupEntry

	encodeRaw []byte // the intact copy as read
}

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
	if ix.Encrypted {
		w.u8(1)
	} else {
		w.u8(0)
	}
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
			w.u64(s.Num)
			w.u16(uint16(len(s.Name)))
			w.bytes([]byte(s.Name))
			w.u64(uint64(s.Len))
			w.bytes(s.Hash[:])
			w.u64(s.First)
			w.u32(s.Count)
		}
	}
	mac := k.indexMAC(w.b)
	w.bytes(mac[:])
	sum := blake3.Sum256(w.b)
	w.bytes(sum[:])
	return w.b
}

// decodeIndex parses and validates an index. It never trusts a count or
// length without checking it against the bytes present and fixed limits.
func decodeIndex(b []byte) (*seedIndex, error) {
	if len(b) < len(indexMagic)+64 || string(b[:len(indexMagic)]) != indexMagic {
		return nil, errors.New("dedup: not a seed index")
	}
	body, sum := b[:len(b)-32], b[len(b)-32:]
	if s := blake3.Sum256(body); !bytes.Equal(s[:], sum) {
		return nil, errors.New("dedup: index hash mismatch")
	}
	r := &rd{b: body[len(indexMagic) : len(body)-32]}
	ix := &seedIndex{}
	switch r.u8() {
	case 0:
	case 1:
		ix.Encrypted = true
	default:
		return nil, errors.New("dedup: index: bad flags")
	}
	ix.Salt = r.h32()
	ix.Check = r.h32()
	if cs := r.u32(); cs != chunkSize && r.err == nil {
		return nil, fmt.Errorf("dedup: index: unsupported chunk size %d", cs)
	}
	ix.TotalChunks = r.u64()
	ix.Images = int(r.u32())
	ng := r.u32()
	if r.err != nil || uint64(ng) > uint64(len(r.b))/13 {
		return nil, errors.New("dedup: index: bad group count")
	}
	var nextPack, nextChunk uint64
	var manifests int
	names := map[string]bool{}
	for gi := uint32(0); gi < ng; gi++ {
		g := groupEntry{Data: int(r.u16()), Parity: int(r.u16()), ShardSize: int64(r.u64())}
		if r.err != nil || g.Data < 1 || g.Data+g.Parity > 256 || g.ShardSize < 0 || g.ShardSize > maxShardSize {
			return nil, fmt.Errorf("dedup: index: group %d: bad geometry", gi)
		}
		for si := 0; si < g.Data+g.Parity; si++ {
			s := shardEntry{Kind: r.u8(), Num: r.u64()}
			s.Name = string(r.take(int(r.u16())))
			s.Len = int64(r.u64())
			s.Hash = r.h32()
			s.First = r.u64()
			s.Count = r.u32()
			if r.err != nil {
				return nil, errors.New("dedup: index: truncated")
			}
			if err := validShardName(s.Name); err != nil {
				return nil, err
			}
			if names[s.Name] {
				return nil, fmt.Errorf("dedup: index: shard %q listed twice", s.Name)
			}
			names[s.Name] = true
			if s.Len < 0 || s.Len > g.ShardSize {
				return nil, fmt.Errorf("dedup: index: shard %q: bad length", s.Name)
			}
			isParity := si >= g.Data
			switch {
			case isParity:
				if s.Kind != kindParity || s.Len != g.ShardSize {
					return nil, fmt.Errorf("dedup: index: group %d: bad parity shard %q", gi, s.Name)
				}
			case s.Kind == kindPack:
				if s.Num != nextPack || s.First != nextChunk || s.Count == 0 {
					return nil, fmt.Errorf("dedup: index: pack %q out of order", s.Name)
				}
				nextPack++
				nextChunk += uint64(s.Count)
			case s.Kind == kindManifest:
				if s.Num != uint64(manifests) {
					return nil, fmt.Errorf("dedup: index: manifest %q out of order", s.Name)
				}
				manifests++
			default:
				return nil, fmt.Errorf("dedup: index: shard %q: bad kind", s.Name)
			}
			g.Shards = append(g.Shards, s)
		}
		ix.Groups = append(ix.Groups, g)
	}
	if len(r.b) != 0 {
		return nil, errors.New("dedup: index: trailing bytes")
	}
	if nextChunk != ix.TotalChunks || manifests != ix.Images {
		return nil, errors.New("dedup: index: counts do not add up")
	}
	return ix, nil
}

// readIndex loads the first intact copy of the index and, when a key is
// given, checks it. It returns the index and the derived keys (nil when the
// seed is not encrypted).
func readIndex(dir string, key []byte) (*seedIndex, *keys, error) {
	var ix *seedIndex
	var errs []error
	var raw []byte
	for _, n := range indexNames {
		b, err := readFileLimited(filepath.Join(dir, n), 64<<20)
		if err == nil {
			ix, err = decodeIndex(b)
		}
		if err == nil {
			raw = b
			break
		}
		errs = append(errs, fmt.Errorf("%s: %w", n, err))
	}
	if ix != nil {
		ix.encodeRaw = raw
	}
	if ix == nil {
		return nil, nil, fmt.Errorf("%w: %v", ErrCorruptIndex, errors.Join(errs...))
	}
	if !ix.Encrypted {
		if key != nil {
			return nil, nil, ErrNotEncrypted
		}
		return ix, nil, nil
	}
	if key == nil {
		return ix, nil, ErrKeyRequired
	}
	k, err := deriveKeys(key, ix.Salt[:])
	if err != nil {
		return nil, nil, err
	}
	if k.check != ix.Check {
		return nil, nil, ErrWrongKey
	}
	body := raw[:len(raw)-64]
	if mac := k.indexMAC(body); !bytes.Equal(mac[:], raw[len(raw)-64:len(raw)-32]) {
		return nil, nil, errors.New("dedup: index authentication failed (tampered)")
	}
	return ix, k, nil
}

func readFileLimited(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("dedup: %s is not a regular file", path)
	}
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

// writeFileAtomic writes data to path via path.tmp + fsync + rename.
func writeFileAtomic(path string, data []byte) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	if _, err = f.Write(data); err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
	}
	return err
}
