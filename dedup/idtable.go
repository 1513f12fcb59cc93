package dedup

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"sync/atomic"
)

// idTable maps chunk ids to global chunk numbers in 8 bytes per slot: the
// id's top 12 bits pick one of 4096 shards, the next 32 bits are kept as a
// fingerprint next to the 32-bit chunk number (open addressing, linear
// probing, the fingerprint also orders the slots). A fingerprint match is only
// a candidate: the full 32-byte id of that chunk number is fetched and
// compared (idStore), so a collision of the 44 bits costs a lookup, never a
// wrong dedup. Shards grow by 1.25x at 85% load, so the table averages about
// 10 bytes per unique chunk.
type idTable struct {
	shards [idShards]idShard
	n      uint64
}

const (
	idShardBits = 12
	idShards    = 1 << idShardBits
	maxChunkNum = 1<<32 - 2 // chunk numbers are stored +1 in 32 bits
)

type idShard struct {
	fp  []uint32
	num []uint32 // chunk number + 1; 0 = empty slot
	n   int
}

func idKey(id *[32]byte) (shard int, fp uint32) {
	h := binary.BigEndian.Uint64(id[:8])
	return int(h >> (64 - idShardBits)), uint32(h >> (64 - idShardBits - 32))
}

func (s *idShard) home(fp uint32) int { return int(uint64(fp) * uint64(len(s.fp)) >> 32) }

// lookup returns the chunk number of id; full(n) must return the id of chunk n.
func (t *idTable) lookup(id *[32]byte, full func(uint64) ([32]byte, error)) (uint64, bool, error) {
	si, fp := idKey(id)
	s := &t.shards[si]
	if len(s.fp) == 0 {
		return 0, false, nil
	}
	for i := s.home(fp); ; {
		n := s.num[i]
		if n == 0 {
			return 0, false, nil
		}
		if s.fp[i] == fp {
			f, err := full(uint64(n - 1))
			if err != nil {
				return 0, false, err
			}
			if f == *id {
				return uint64(n - 1), true, nil
			}
		}
		if i++; i == len(s.fp) {
			i = 0
		}
	}
}

// insert adds id (which must not be present) as chunk number n.
func (t *idTable) insert(id *[32]byte, n uint64) error {
	if n > maxChunkNum {
		return errors.New("dedup: more than 2^32-2 unique chunks in one seed")
	}
	si, fp := idKey(id)
	s := &t.shards[si]
	if (s.n+1)*100 > len(s.fp)*85 {
		s.grow()
	}
	s.put(fp, uint32(n+1))
	s.n++
	t.n++
	return nil
}

func (s *idShard) put(fp, num uint32) {
	for i := s.home(fp); ; {
		if s.num[i] == 0 {
			s.fp[i], s.num[i] = fp, num
			return
		}
		if i++; i == len(s.fp) {
			i = 0
		}
	}
}

func (s *idShard) grow() {
	nc := max(16, len(s.fp)*5/4)
	old := *s
	s.fp, s.num = make([]uint32, nc), make([]uint32, nc)
	for i, n := range old.num {
		if n != 0 {
			s.put(old.fp[i], n)
		}
	}
}

// bytes is the memory held by the table's slots.
func (t *idTable) bytes() int64 {
	var b int64
	for i := range t.shards {
		b += int64(cap(t.shards[i].fp))*4 + int64(cap(t.shards[i].num))*4
	}
	return b + int64(len(t.shards))*56
}

// idStore holds the full 32-byte id of every chunk number, on disk
// (journal.ids in the scratch directory, 32 bytes per unique chunk, also
// what a resumed export rebuilds the table from), with the ids not yet
// written there and a few recently read blocks in memory.
type idStore struct {
	f       *os.File
	durable atomic.Uint64 // ids below this are in the file (written by the pack writer)

	// owned by the exporting goroutine
	base   uint64
	recent [][32]byte // ids base, base+1, ...
	blocks [idCacheBlocks]idBlock
	tick   uint64
}

const (
	idBlockIDs    = 2048 // 64 KiB per cached block
	idCacheBlocks = 32
)

type idBlock struct {
	num, valid uint64 // block number; ids in it that were read
	used       uint64
	ids        [][32]byte
}

func openIDStore(path string, keep uint64) (*idStore, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	if err := f.Truncate(int64(keep) * 32); err != nil {
		f.Close()
		return nil, err
	}
	s := &idStore{f: f, base: keep}
	s.durable.Store(keep)
	for i := range s.blocks {
		s.blocks[i].num = ^uint64(0)
	}
	return s, nil
}

func (s *idStore) Close() error {
	if s == nil || s.f == nil {
		return nil
	}
	err := s.f.Close()
	s.f = nil
	return err
}

// add records the id of the next chunk number (base+len(recent)).
func (s *idStore) add(id [32]byte) { s.recent = append(s.recent, id) }

// trim drops ids from memory that the pack writer has written to the file.
func (s *idStore) trim() {
	d := s.durable.Load()
	if d > s.base && d-s.base >= 4096 {
		n := d - s.base
		s.recent = append(s.recent[:0:0], s.recent[n:]...)
		s.base = d
	}
}

func (s *idStore) get(n uint64) ([32]byte, error) {
	if n >= s.base {
		if n-s.base >= uint64(len(s.recent)) {
			return [32]byte{}, fmt.Errorf("dedup: chunk %d has no id yet", n)
		}
		return s.recent[n-s.base], nil
	}
	bn := n / idBlockIDs
	s.tick++
	var victim *idBlock
	for i := range s.blocks {
		b := &s.blocks[i]
		if b.num == bn && n-bn*idBlockIDs < b.valid {
			b.used = s.tick
			return b.ids[n-bn*idBlockIDs], nil
		}
		if victim == nil || b.used < victim.used {
			victim = b
		}
	}
	if victim.ids == nil {
		victim.ids = make([][32]byte, idBlockIDs)
	}
	start := bn * idBlockIDs
	end := min(start+idBlockIDs, s.durable.Load())
	buf := make([]byte, (end-start)*32)
	if _, err := s.f.ReadAt(buf, int64(start)*32); err != nil && !(err == io.EOF && len(buf) == 0) {
		victim.num = ^uint64(0)
		return [32]byte{}, fmt.Errorf("dedup: reading chunk ids: %w", err)
	}
	for i := range end - start {
		copy(victim.ids[i][:], buf[i*32:])
	}
	victim.num, victim.valid, victim.used = bn, end-start, s.tick
	return victim.ids[n-start], nil
}

// write stores the ids of chunks first.. (pack writer goroutine) and marks
// them durable for readers once written (fsync is the caller's business).
func (s *idStore) write(first uint64, ids [][32]byte) error {
	buf := make([]byte, 0, len(ids)*32)
	for i := range ids {
		buf = append(buf, ids[i][:]...)
	}
	if _, err := s.f.WriteAt(buf, int64(first)*32); err != nil {
		return err
	}
	if d := first + uint64(len(ids)); d > s.durable.Load() {
		s.durable.Store(d)
	}
	return nil
}
