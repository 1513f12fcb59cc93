package applier

// The chunk index: a replica-wide map from 4 KiB block hashes to where the
// store holds that content (group, image, block of latest.img), used to
// resolve the ref extents of thinned cycles (dedup-aware initial replication,
// hash-compare resync) and to answer the primary's held queries.
//
// It is a cache, never the truth: an entry goes stale when the block is
// overwritten later, so every use checks hashes.bin at the location and the
// BLAKE3 of the bytes read. Entries are added after every apply (data and
// ref blocks written) and by IndexImage (a whole image from its hashes.bin,
// e.g. after a seed import). A lost or damaged index only costs dedup: it is
// rebuilt from hashes.bin.
//
// Layout (bbolt, REPLICA/chunks.db):
//
//	chunks:   key = first 8 bytes of the block hash → 1 or 2 locations,
//	          each uvarint(image number) uvarint(block); the first location
//	          is sticky (the oldest copy, e.g. a template), the second the
//	          most recent one
//	images:   "GROUP/ID" → image number (u32 big endian)
//	imagenos: image number → "GROUP/ID"
//
// A key is the first 8 bytes of the hash: a collision only costs a dedup
// opportunity, since every use checks the full hash.
//
// Cost per distinct block (TestChunkIndexSize): 28 B used (8 B key, 2–8 B
// value, 16 B bbolt element header), 41 B of B+tree pages, ≈ 70 B of file
// with bbolt's copy-on-write slack — ≈ 1.7% of the unique data.

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/standin/standin/internal/format"
)

const (
	chunkKeyLen    = 8
	chunkBatch     = 1 << 17 // entries per write transaction
	maxLocsPerHash = 2
)

var chunkFill = 0.5

var (
	bktChunks   = []byte("chunks")
	bktImages   = []byte("images")
	bktImageNos = []byte("imagenos")
)

type chunkIndex struct {
	db *bolt.DB

	mu   sync.Mutex
	nos  map[string]uint32 // "group/id" → number
	refs map[uint32]string // number → "group/id"
}

// chunkLoc is one place a block's content may be found.
type chunkLoc struct {
	group, id string
	block     uint64
}

// chunkEntry is a block hash at a block of one image.
type chunkEntry struct {
	hash  [32]byte
	block uint64
}

// openChunkIndex opens or creates the index; a file that bbolt cannot open
// is moved aside and a new one created (fresh reports that the index is
// empty and should be rebuilt).
func openChunkIndex(path string) (ci *chunkIndex, fresh bool, err error) {
	_, statErr := os.Stat(path)
	fresh = statErr != nil
	opts := &bolt.Options{Timeout: 2 * time.Second, NoFreelistSync: true, FreelistType: bolt.FreelistMapType}
	db, err := bolt.Open(path, 0o600, opts)
	if err != nil && !fresh {
		bad := path + ".damaged"
		os.Remove(bad)
		if rerr := os.Rename(path, bad); rerr != nil {
			return nil, false, fmt.Errorf("chunk index %s: %w (and moving it aside: %v)", path, err, rerr)
		}
		fresh = true
		db, err = bolt.Open(path, 0o600, opts)
	}
	if err != nil {
		return nil, false, fmt.Errorf("chunk index %s: %w", path, err)
	}
	ci = &chunkIndex{db: db, nos: map[string]uint32{}, refs: map[uint32]string{}}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bktChunks, bktImages, bktImageNos} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return tx.Bucket(bktImages).ForEach(func(k, v []byte) error {
			if len(v) == 4 {
				n := binary.BigEndian.Uint32(v)
				ci.nos[string(k)] = n
				ci.refs[n] = string(k)
			}
			return nil
		})
	})
	if err != nil {
		db.Close()
		return nil, false, fmt.Errorf("chunk index %s: %w", path, err)
	}
	return ci, fresh, nil
}

func (ci *chunkIndex) close() error { return ci.db.Close() }

// imageNo returns (creating in tx) the number of image group/id.
func (ci *chunkIndex) imageNo(tx *bolt.Tx, group, id string) (uint32, error) {
	key := group + "/" + id
	ci.mu.Lock()
	n, ok := ci.nos[key]
	ci.mu.Unlock()
	if ok {
		return n, nil
	}
	if v := tx.Bucket(bktImages).Get([]byte(key)); len(v) == 4 {
		n = binary.BigEndian.Uint32(v)
	} else {
		seq, err := tx.Bucket(bktImages).NextSequence()
		if err != nil {
			return 0, err
		}
		if seq > 1<<32-1 {
			return 0, errors.New("chunk index: too many images")
		}
		n = uint32(seq)
		var nb [4]byte
		binary.BigEndian.PutUint32(nb[:], n)
		if err := tx.Bucket(bktImages).Put([]byte(key), nb[:]); err != nil {
			return 0, err
		}
		if err := tx.Bucket(bktImageNos).Put(nb[:], []byte(key)); err != nil {
			return 0, err
		}
	}
	// The cache is filled after the commit (see add); a rolled-back number
	// must not be remembered.
	return n, nil
}

type locVal struct {
	no    uint32
	block uint64
}

func decodeLocs(v []byte) []locVal {
	var out []locVal
	for len(v) > 0 && len(out) < maxLocsPerHash {
		no, n1 := binary.Uvarint(v)
		if n1 <= 0 || no > 1<<32-1 {
			return out
		}
		blk, n2 := binary.Uvarint(v[n1:])
		if n2 <= 0 {
			return out
		}
		out = append(out, locVal{uint32(no), blk})
		v = v[n1+n2:]
	}
	return out
}

func encodeLocs(ls []locVal) []byte {
	var b []byte
	for _, l := range ls {
		b = binary.AppendUvarint(b, uint64(l.no))
		b = binary.AppendUvarint(b, l.block)
	}
	return b
}

// add records entries of image group/id (all-zero blocks are skipped), in
// transactions of chunkBatch entries.
func (ci *chunkIndex) add(group, id string, entries []chunkEntry) error {
	for len(entries) > 0 {
		n := min(len(entries), chunkBatch)
		if err := ci.addBatch(group, id, entries[:n]); err != nil {
			return err
		}
		entries = entries[n:]
	}
	return nil
}

func (ci *chunkIndex) addBatch(group, id string, entries []chunkEntry) error {
	sorted := slices.Clone(entries)
	slices.SortFunc(sorted, func(a, b chunkEntry) int { return bytes.Compare(a.hash[:chunkKeyLen], b.hash[:chunkKeyLen]) })
	var no uint32
	err := ci.db.Update(func(tx *bolt.Tx) error {
		var err error
		if no, err = ci.imageNo(tx, group, id); err != nil {
			return err
		}
		b := tx.Bucket(bktChunks)
		b.FillPercent = chunkFill
		for _, e := range sorted {
			if e.hash == zeroHash || e.hash == zeroBlockBLAKE3 {
				continue
			}
			k := e.hash[:chunkKeyLen]
			l := locVal{no, e.block}
			ls := decodeLocs(b.Get(k))
			switch {
			case slices.Contains(ls, l):
				continue
			case len(ls) == 0:
				ls = []locVal{l}
			default:
				ls = []locVal{ls[0], l}
			}
			if err := b.Put(k, encodeLocs(ls)); err != nil {
				return err
			}
		}
		return nil
	})
	if err == nil {
		key := group + "/" + id
		ci.mu.Lock()
		ci.nos[key], ci.refs[no] = no, key
		ci.mu.Unlock()
	}
	return err
}

// lookup returns the recorded locations of each hash (nil where none).
func (ci *chunkIndex) lookup(hashes [][32]byte) ([][]chunkLoc, error) {
	out := make([][]chunkLoc, len(hashes))
	err := ci.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(bktChunks)
		for i, h := range hashes {
			for _, l := range decodeLocs(b.Get(h[:chunkKeyLen])) {
				ref, ok := ci.imageRef(tx, l.no)
				if !ok {
					continue
				}
				group, id, _ := strings.Cut(ref, "/")
				out[i] = append(out[i], chunkLoc{group, id, l.block})
			}
		}
		return nil
	})
	return out, err
}

func (ci *chunkIndex) imageRef(tx *bolt.Tx, no uint32) (string, bool) {
	ci.mu.Lock()
	ref, ok := ci.refs[no]
	ci.mu.Unlock()
	if ok {
		return ref, true
	}
	var nb [4]byte
	binary.BigEndian.PutUint32(nb[:], no)
	if v := tx.Bucket(bktImageNos).Get(nb[:]); v != nil {
		return string(v), true
	}
	return "", false
}

// drop removes stale locations (the content there no longer has the hash).
func (ci *chunkIndex) drop(stale map[[32]byte][]chunkLoc) error {
	if len(stale) == 0 {
		return nil
	}
	return ci.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bktChunks)
		for h, locs := range stale {
			k := h[:chunkKeyLen]
			ls := decodeLocs(b.Get(k))
			keep := ls[:0]
			for _, l := range ls {
				ref, _ := ci.imageRef(tx, l.no)
				gone := false
				for _, s := range locs {
					if ref == s.group+"/"+s.id && l.block == s.block {
						gone = true
					}
				}
				if !gone {
					keep = append(keep, l)
				}
			}
			var err error
			if len(keep) == 0 {
				err = b.Delete(k)
			} else if len(keep) != len(ls) {
				err = b.Put(k, encodeLocs(keep))
			}
			if err != nil {
				return err
			}
		}
		return nil
	})
}

// ChunkIndexStats describes the chunk index.
type ChunkIndexStats struct {
	Entries   int   `json:"entries"`    // distinct block hashes
	FileBytes int64 `json:"file_bytes"` // pages of chunks.db in use or free (the file's high-water mark)
	PageBytes int64 `json:"page_bytes"` // bytes of the pages holding the chunk entries
	UsedBytes int64 `json:"used_bytes"` // bytes of those pages actually used
}

// ChunkIndexStats reports the size of the chunk index.
func (r *Replica) ChunkIndexStats() (ChunkIndexStats, error) {
	var s ChunkIndexStats
	if r.chunks == nil {
		return s, errors.New("no chunk index")
	}
	err := r.chunks.db.View(func(tx *bolt.Tx) error {
		bs := tx.Bucket(bktChunks).Stats()
		s.Entries = bs.KeyN
		s.FileBytes = tx.Size()
		s.PageBytes = int64(bs.LeafAlloc + bs.BranchAlloc)
		s.UsedBytes = int64(bs.LeafInuse + bs.BranchInuse)
		return nil
	})
	return s, err
}

// IndexImage records every non-zero block of image id of group (from its
// hashes.bin) in the chunk index. Call it after writing latest.img and
// hashes.bin directly (a seed import); applies index what they write
// themselves. It is idempotent.
func (r *Replica) IndexImage(group, id string) error {
	if err := checkName("group", group); err != nil {
		return err
	}
	if !imageIDOK(id) {
		return fmt.Errorf("image id %q: %w", id, ErrBadName)
	}
	if r.chunks == nil {
		return errors.New("no chunk index")
	}
	return r.indexHashesFile(group, id, filepath.Join(r.dir, "groups", group, "images", id, "hashes.bin"))
}

func (r *Replica) indexHashesFile(group, id, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := make([]byte, chunkBatch*32)
	entries := make([]chunkEntry, 0, chunkBatch)
	for blk := uint64(0); ; {
		select {
		case <-r.idxStop:
			return ErrClosed
		default:
		}
		n, err := io.ReadFull(f, buf)
		for i := 0; i+32 <= n; i += 32 {
			h := [32]byte(buf[i : i+32])
			if h != zeroHash {
				entries = append(entries, chunkEntry{h, blk})
			}
			blk++
		}
		if len(entries) > 0 {
			if aerr := r.chunks.add(group, id, entries); aerr != nil {
				return aerr
			}
			entries = entries[:0]
		}
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// indexCycle records the data and ref blocks of an applied cycle (best
// effort: a failure only costs dedup later, and is logged).
func (r *Replica) indexCycle(group, id string, cr *format.Reader) {
	if r.chunks == nil {
		return
	}
	var entries []chunkEntry
	var hb []byte
	flush := func() bool {
		if err := r.chunks.add(group, id, entries); err != nil {
			r.o.Logger.Warn("chunk index: recording an applied cycle failed (dedup may miss its blocks)", "group", group, "image", id, "err", err)
			return false
		}
		entries = entries[:0]
		return true
	}
	for i, e := range cr.Extents() {
		if e.Kind != format.KindData && e.Kind != format.KindRef {
			continue
		}
		var err error
		if hb, err = cr.ExtentHashes(i, hb); err != nil {
			r.o.Logger.Warn("chunk index: reading cycle hashes", "group", group, "image", id, "err", err)
			return
		}
		for k := 0; k < int(e.Count); k++ {
			entries = append(entries, chunkEntry{[32]byte(hb[k*32 : (k+1)*32]), e.Start + uint64(k)})
		}
		if len(entries) >= chunkBatch && !flush() {
			return
		}
	}
	if len(entries) > 0 {
		flush()
	}
}

// reindexAll rebuilds the index from every image's hashes.bin (after the
// index was created or found damaged). It runs in the background and stops
// at Close.
func (r *Replica) reindexAll(stop <-chan struct{}) {
	groups, _ := os.ReadDir(filepath.Join(r.dir, "groups"))
	n := 0
	for _, g := range groups {
		if !g.IsDir() || !storeNameOK(g.Name()) {
			continue
		}
		imgs, _ := os.ReadDir(filepath.Join(r.dir, "groups", g.Name(), "images"))
		for _, im := range imgs {
			select {
			case <-stop:
				return
			default:
			}
			if !im.IsDir() || !imageIDOK(im.Name()) {
				continue
			}
			if err := r.IndexImage(g.Name(), im.Name()); err != nil {
				r.o.Logger.Warn("chunk index: rebuilding", "group", g.Name(), "image", im.Name(), "err", err)
				continue
			}
			n++
		}
	}
	if n > 0 {
		r.o.Logger.Info("chunk index rebuilt from hashes.bin", "images", n)
	}
}
