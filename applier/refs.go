package applier

// Ref extents (internal/format KindRef, version 2 cycles) carry only the
// BLAKE3 hash of a block the replica already holds. Before an apply touches
// anything, every ref block of every cycle of the commit is resolved:
//
//   - keep: this image's hashes.bin holds the same hash at the same block, so
//     latest.img already has the content and the apply leaves the block alone
//     (it is not written and not saved in the undo log);
//   - copy: the chunk index names a location (this or another image, any
//     group the primary may access) whose hashes.bin entry and whose bytes
//     (BLAKE3 re-computed) match; the block is copied into a durable refs
//     file (GROUP/refs/ID-gG-sS.refs) that the apply — and its redo after a
//     crash — writes into latest.img like data, so the redo never depends on
//     other images or on what the interrupted run changed;
//   - missing: neither; the commit fails with *MissingChunksError listing
//     the blocks, and nothing is applied.
//
// Refs file ("STREFS01"): the copied blocks (4096 bytes each, ascending
// block order), then the table of runs (start u64, count u64), then a
// 24-byte trailer: runs u64 | blocks u64 | "STREFS01". Every block is checked
// against the cycle's ref hash again when it is applied.

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"

	"github.com/google/uuid"
	"github.com/zeebo/blake3"

	"github.com/standin/standin/internal/format"
	"github.com/standin/standin/internal/fsutil"
	"github.com/standin/standin/internal/wire"
)

// ErrMissingChunks is matched by *MissingChunksError.
var ErrMissingChunks = errors.New("ref blocks of the cycle are not held by the replica")

// MissingChunksError lists the ref blocks a commit could not resolve.
type MissingChunksError struct {
	Missing []wire.MissingBlocks
}

func (e *MissingChunksError) Error() string {
	n := uint64(0)
	for _, m := range e.Missing {
		for _, r := range m.Runs {
			n += r[1]
		}
	}
	return fmt.Sprintf("%v: %d blocks in %d cycles (send their data)", ErrMissingChunks, n, len(e.Missing))
}

func (e *MissingChunksError) Unwrap() error { return ErrMissingChunks }

// SourceFunc says whether ref blocks may be resolved from image name of
// group (nil: from anywhere in the store). The server passes the primary's
// allow-list, so a primary can never obtain content of images it may not
// send by guessing hashes.
type SourceFunc func(group, name string) bool

// refSet is the resolution of one cycle's ref blocks.
type refSet struct {
	keep   []brange // ref blocks kept at the same position
	runs   []brange // ref blocks copied into path, in file order
	blocks uint64   // blocks in runs
	path   string   // refs file ("" if runs is empty)
}

const refsMagic = "STREFS01"

func (r *Replica) refsPath(g *group, id string, h format.Header) string {
	return filepath.Join(g.dir, "refs", fmt.Sprintf("%s-g%d-s%d.refs", id, h.Generation, h.Seq))
}

// imageFiles are open handles of one image used as a source.
type srcImage struct {
	g  *group
	im *image
}

// resolveRefs resolves the ref blocks of cycle cr for image im (nil for an
// image the group does not hold yet). Called with g.wmu held, before the
// apply changes anything. Missing blocks are returned as runs.
func (r *Replica) resolveRefs(groups map[string]*group, g *group, im *image, id string, cr *format.Reader, ok SourceFunc) (*refSet, [][2]uint64, error) {
	h := cr.Header()
	rs := &refSet{}
	var curSize uint64
	if im != nil && im.st.Present {
		curSize = im.st.Size
	}
	curBlocks := blocksOf(curSize)
	path := r.refsPath(g, id, h)
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, nil, err
	}
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return nil, nil, err
	}
	defer func() {
		if f != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	bw := bufio.NewWriterSize(f, 1<<20)
	var missing [][2]uint64
	addRun := func(list *[]brange, b uint64) {
		if n := len(*list); n > 0 && (*list)[n-1].hi == b {
			(*list)[n-1].hi++
			return
		}
		*list = append(*list, brange{b, b + 1})
	}
	stale := map[[32]byte][]chunkLoc{}
	srcs := map[string]srcImage{}
	blk := make([]byte, format.BlockSize)
	var hb, cur []byte
	for i, e := range cr.Extents() {
		if e.Kind != format.KindRef {
			continue
		}
		if hb, err = cr.ExtentHashes(i, hb); err != nil {
			return nil, nil, err
		}
		// Same position: this image's recorded hashes.
		nCur := uint64(0)
		if e.Start < curBlocks {
			nCur = min(uint64(e.Count), curBlocks-e.Start)
			if cap(cur) < int(nCur)*32 {
				cur = make([]byte, nCur*32)
			}
			cur = cur[:nCur*32]
			if err := readFullAt(im.hashes, cur, int64(e.Start)*32); err != nil {
				return nil, nil, err
			}
		}
		var need []uint64
		var needHash [][32]byte
		for k := uint64(0); k < uint64(e.Count); k++ {
			hk := [32]byte(hb[k*32 : (k+1)*32])
			if k < nCur && [32]byte(cur[k*32:(k+1)*32]) == hk {
				addRun(&rs.keep, e.Start+k)
				continue
			}
			need = append(need, e.Start+k)
			needHash = append(needHash, hk)
		}
		if len(need) == 0 {
			continue
		}
		var locs [][]chunkLoc
		if r.chunks != nil {
			if locs, err = r.chunks.lookup(needHash); err != nil {
				return nil, nil, err
			}
		}
		for j, b := range need {
			found := false
			if needHash[j] == zeroBlockBLAKE3 {
				clear(blk)
				found = true
			}
			for li := 0; !found && locs != nil && li < len(locs[j]); li++ {
				l := locs[j][li]
				got, okRead := r.readSource(groups, srcs, l, needHash[j], blk, ok)
				if got {
					found = true
				} else if okRead {
					stale[needHash[j]] = append(stale[needHash[j]], l)
				}
			}
			if !found {
				if n := len(missing); n > 0 && missing[n-1][0]+missing[n-1][1] == b {
					missing[n-1][1]++
				} else {
					missing = append(missing, [2]uint64{b, 1})
				}
				continue
			}
			if _, err := bw.Write(blk); err != nil {
				return nil, nil, err
			}
			addRun(&rs.runs, b)
			rs.blocks++
		}
	}
	if r.chunks != nil && len(stale) > 0 {
		if err := r.chunks.drop(stale); err != nil {
			r.o.Logger.Warn("chunk index: dropping stale locations", "err", err)
		}
	}
	if len(missing) > 0 {
		return nil, missing, nil
	}
	if rs.blocks == 0 {
		return rs, nil, nil // everything kept: no refs file
	}
	var tb []byte
	for _, x := range rs.runs {
		tb = binary.LittleEndian.AppendUint64(tb, x.lo)
		tb = binary.LittleEndian.AppendUint64(tb, x.hi-x.lo)
	}
	tb = binary.LittleEndian.AppendUint64(tb, uint64(len(rs.runs)))
	tb = binary.LittleEndian.AppendUint64(tb, rs.blocks)
	tb = append(tb, refsMagic...)
	if _, err := bw.Write(tb); err != nil {
		return nil, nil, err
	}
	if err := bw.Flush(); err != nil {
		return nil, nil, err
	}
	if err := f.Sync(); err != nil {
		return nil, nil, err
	}
	if err := f.Close(); err != nil {
		return nil, nil, err
	}
	f = nil
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return nil, nil, err
	}
	if err := fsutil.SyncDir(filepath.Dir(path)); err != nil {
		return nil, nil, err
	}
	rs.path = path
	return rs, nil, nil
}

// readSource reads block l into blk if the location still holds content with
// hash want. found: blk has it; checked: the location exists and was read
// (so a mismatch means the index entry is stale).
func (r *Replica) readSource(groups map[string]*group, srcs map[string]srcImage, l chunkLoc, want [32]byte, blk []byte, ok SourceFunc) (found, checked bool) {
	if !storeNameOK(l.group) || !imageIDOK(l.id) {
		return false, false
	}
	key := l.group + "/" + l.id
	s, have := srcs[key]
	if !have {
		if g := groups[l.group]; g != nil {
			g.mu.RLock()
			s = srcImage{g: g, im: g.images[l.id]}
			g.mu.RUnlock()
		}
		srcs[key] = s
	}
	if s.g == nil || s.im == nil {
		return false, false
	}
	s.g.mu.RLock()
	defer s.g.mu.RUnlock()
	if s.g.images[l.id] != s.im || !s.im.st.Present || s.im.img == nil {
		return false, false // reloaded or gone since
	}
	if ok != nil && !ok(l.group, s.im.st.Name) {
		return false, false
	}
	if l.block >= blocksOf(s.im.st.Size) {
		return false, true
	}
	var rec [32]byte
	if err := readFullAt(s.im.hashes, rec[:], int64(l.block)*32); err != nil || rec != want {
		return false, err == nil
	}
	if err := readFullAt(s.im.img, blk, int64(l.block)*format.BlockSize); err != nil {
		return false, false
	}
	if blake3.Sum256(blk) != want {
		return false, true
	}
	return true, true
}

// groupsSnapshot returns the loaded groups (a copy of the map).
func (r *Replica) groupsSnapshot() map[string]*group {
	r.mu.Lock()
	defer r.mu.Unlock()
	m := make(map[string]*group, len(r.groups))
	for k, v := range r.groups {
		m[k] = v
	}
	return m
}

// openRefs reads the run table of a refs file, checking it against the
// file size.
func openRefs(path string) (*os.File, []brange, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, err
	}
	fail := func(format string, a ...any) (*os.File, []brange, error) {
		f.Close()
		return nil, nil, fmt.Errorf("refs file %s: %s", path, fmt.Sprintf(format, a...))
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	size := st.Size()
	if size < 24 {
		return fail("%d bytes, too short", size)
	}
	var tr [24]byte
	if _, err := f.ReadAt(tr[:], size-24); err != nil {
		f.Close()
		return nil, nil, err
	}
	if string(tr[16:]) != refsMagic {
		return fail("bad trailer")
	}
	nr := binary.LittleEndian.Uint64(tr[0:])
	nb := binary.LittleEndian.Uint64(tr[8:])
	if nr > uint64(size)/16 || nb > uint64(size)/format.BlockSize || nr > nb || uint64(size) != nb*format.BlockSize+nr*16+24 {
		return fail("trailer says %d runs, %d blocks for %d bytes", nr, nb, size)
	}
	tb := make([]byte, nr*16)
	if _, err := f.ReadAt(tb, int64(nb*format.BlockSize)); err != nil {
		f.Close()
		return nil, nil, err
	}
	runs := make([]brange, nr)
	var sum, next uint64
	for i := range runs {
		lo := binary.LittleEndian.Uint64(tb[i*16:])
		n := binary.LittleEndian.Uint64(tb[i*16+8:])
		if n == 0 || lo < next || n > nb-sum {
			return fail("run %d out of order", i)
		}
		runs[i] = brange{lo, lo + n}
		sum += n
		next = lo + n
	}
	if sum != nb {
		return fail("runs hold %d blocks, trailer says %d", sum, nb)
	}
	return f, runs, nil
}

// refSource hands out, in ascending block order, the copied blocks of a
// refs file during an apply.
type refSource struct {
	f    *os.File
	runs []brange
	run  int    // current run
	off  int64  // file offset of the current run's first block
	done uint64 // blocks before the current run
}

func newRefSource(path string) (*refSource, error) {
	if path == "" {
		return &refSource{}, nil
	}
	f, runs, err := openRefs(path)
	if err != nil {
		return nil, err
	}
	return &refSource{f: f, runs: runs}, nil
}

func (s *refSource) close() {
	if s.f != nil {
		s.f.Close()
	}
}

// copied returns the refs-file offset of block b, or -1 if b was kept.
// Calls must be in ascending block order.
func (s *refSource) copied(b uint64) int64 {
	for s.run < len(s.runs) && s.runs[s.run].hi <= b {
		s.done += s.runs[s.run].hi - s.runs[s.run].lo
		s.run++
	}
	if s.run == len(s.runs) || b < s.runs[s.run].lo {
		return -1
	}
	return int64(s.done+b-s.runs[s.run].lo) * format.BlockSize
}

// keepRanges returns the ref blocks of cr that are not in the refs file
// (kept at the same position), from the run table.
func keepRanges(cr *format.Reader, copied []brange) []brange {
	var refs []brange
	for _, e := range cr.Extents() {
		if e.Kind == format.KindRef {
			refs = append(refs, brange{e.Start, e.End()})
		}
	}
	return subtract(normalize(refs), copied)
}

// subtract returns a − b (both sorted and disjoint).
func subtract(a, b []brange) []brange {
	var out []brange
	j := 0
	for _, x := range a {
		lo := x.lo
		for j < len(b) && b[j].hi <= lo {
			j++
		}
		k := j
		for ; k < len(b) && b[k].lo < x.hi; k++ {
			if b[k].lo > lo {
				out = append(out, brange{lo, b[k].lo})
			}
			lo = max(lo, b[k].hi)
		}
		if lo < x.hi {
			out = append(out, brange{lo, x.hi})
		}
	}
	return out
}

// covered returns the blocks covered by any extent of cr (sorted, merged).
func covered(cr *format.Reader) []brange {
	var out []brange
	for _, e := range cr.Extents() {
		if n := len(out); n > 0 && out[n-1].hi == e.Start {
			out[n-1].hi = e.End()
			continue
		}
		out = append(out, brange{e.Start, e.End()})
	}
	return out
}

// applyRefs writes the copied blocks of ref extent i into latest.img and
// their hashes into hashes.bin; kept blocks are left alone.
func applyRefExtent(f, hf *os.File, cr *format.Reader, i int, src *refSource, hb []byte, blk []byte) ([]byte, error) {
	e := cr.Extents()[i]
	hb, err := cr.ExtentHashes(i, hb)
	if err != nil {
		return hb, err
	}
	for k := uint64(0); k < uint64(e.Count); k++ {
		b := e.Start + k
		off := src.copied(b)
		if off < 0 {
			continue
		}
		if _, err := src.f.ReadAt(blk, off); err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return hb, fmt.Errorf("refs file: block %d: %w", b, err)
		}
		want := [32]byte(hb[k*32 : (k+1)*32])
		if blake3.Sum256(blk) != want {
			return hb, fmt.Errorf("refs file %s: block %d does not match its ref hash", src.f.Name(), b)
		}
		if _, err := f.WriteAt(blk, int64(b)*format.BlockSize); err != nil {
			return hb, err
		}
		if want == zeroBlockBLAKE3 {
			want = zeroHash
		}
		if _, err := hf.WriteAt(want[:], int64(b)*32); err != nil {
			return hb, err
		}
	}
	return hb, nil
}

// missingError builds the error of a commit whose refs did not all resolve.
func missingError(items map[string][][2]uint64, hdrs map[string]format.Header) error {
	me := &MissingChunksError{}
	ids := make([]string, 0, len(items))
	for id := range items {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		h := hdrs[id]
		me.Missing = append(me.Missing, wire.MissingBlocks{CycleRef: wire.CycleRef{ID: uuid.UUID(h.ImageID).String(), Gen: h.Generation, Seq: h.Seq}, Runs: items[id]})
	}
	return me
}
