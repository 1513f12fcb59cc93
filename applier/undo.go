package applier

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/zeebo/blake3"

	"github.com/standin/standin/internal/format"
	"github.com/standin/standin/internal/fsutil"
)

// Undo log file format (docs/replica.md, "Undo log format"):
//
//	header  36 B: magic "STUNDO01" | from u64 | to u64 | flags u32 | old size u64
//	data    4096 B per data entry, in entry order
//	table   48 B per entry, sorted by block, strictly ascending:
//	        block u64 | kind u8 (1 data, 2 zero) | 7 B zero | BLAKE3-256 [32]
//	footer  64 B: table offset u64 | entries u64 | data entries u64 |
//	        BLAKE3-256 of every byte before the footer [32] | magic "STUNDEND"
//
// An undo log with range [from, to] holds, for every block that one of the
// applies from..to changed, the block's content (and its block hash) at point
// from-1. A log written by one apply has from == to.
const (
	undoMagic      = "STUNDO01"
	undoEndMagic   = "STUNDEND"
	undoHeaderSize = 36
	undoEntrySize  = 48
	undoFooterSize = 64
	undoFlagAbsent = 1 // the image did not exist at point from-1

	undoKindData = 1
	undoKindZero = 2
)

// errUndoCorrupt marks an undo log that fails its structural or hash checks.
var errUndoCorrupt = errors.New("undo log corrupt")

type undoEntry struct {
	block uint64
	kind  uint8
	hash  [32]byte
	off   int64 // file offset of the data (data entries)
}

// undoLog is one undo log file, loaded: the table is in memory, the data is
// read from the open file.
type undoLog struct {
	from, to uint64
	absent   bool
	oldSize  uint64
	ents     []undoEntry
	path     string
	f        *os.File
	size     int64
}

// lookup returns the entry of block b, or nil.
func (u *undoLog) lookup(b uint64) *undoEntry {
	i := sort.Search(len(u.ents), func(i int) bool { return u.ents[i].block >= b })
	if i < len(u.ents) && u.ents[i].block == b {
		return &u.ents[i]
	}
	return nil
}

func (u *undoLog) close() {
	if u.f != nil {
		u.f.Close()
		u.f = nil
	}
}

func undoName(from, to uint64) string { return fmt.Sprintf("%d-%d.undo", from, to) }

// parseUndoName parses FROM-TO.undo; only the canonical spelling is accepted.
func parseUndoName(name string) (from, to uint64, ok bool) {
	s, found := strings.CutSuffix(name, ".undo")
	if !found {
		return 0, 0, false
	}
	a, b, found := strings.Cut(s, "-")
	if !found {
		return 0, 0, false
	}
	from, err1 := strconv.ParseUint(a, 10, 64)
	to, err2 := strconv.ParseUint(b, 10, 64)
	if err1 != nil || err2 != nil || from == 0 || from > to || undoName(from, to) != name {
		return 0, 0, false
	}
	return from, to, true
}

var zeroHash [32]byte

// blockHash is the hash recorded for a block: BLAKE3-256 of its 4096 bytes,
// except that an all-zero block is recorded as 32 zero bytes.
func blockHash(b []byte) [32]byte {
	if isZero(b) {
		return zeroHash
	}
	return blake3.Sum256(b)
}

func isZero(b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), len(zeroBlock))
		if !bytes.Equal(b[:n], zeroBlock[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}

// undoWriter writes an undo log to DIR/NAME.tmp; finish makes it durable
// and renames it to DIR/NAME.
type undoWriter struct {
	dir, name string
	f         *os.File
	bw        *bufio.Writer
	h         *blake3.Hasher
	w         io.Writer
	off       int64
	log       *undoLog
	last      uint64
	err       error
}

func createUndo(dir string, from, to uint64, absent bool, oldSize uint64) (*undoWriter, error) {
	name := undoName(from, to)
	f, err := os.OpenFile(filepath.Join(dir, name+".tmp"), os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return nil, err
	}
	w := &undoWriter{dir: dir, name: name, f: f, bw: bufio.NewWriterSize(f, 1<<20), h: blake3.New(),
		log: &undoLog{from: from, to: to, absent: absent, oldSize: oldSize, path: filepath.Join(dir, name)}}
	w.w = io.MultiWriter(w.bw, w.h)
	var hdr [undoHeaderSize]byte
	copy(hdr[:], undoMagic)
	binary.LittleEndian.PutUint64(hdr[8:], from)
	binary.LittleEndian.PutUint64(hdr[16:], to)
	var flags uint32
	if absent {
		flags |= undoFlagAbsent
	}
	binary.LittleEndian.PutUint32(hdr[24:], flags)
	binary.LittleEndian.PutUint64(hdr[28:], oldSize)
	w.write(hdr[:])
	return w, w.err
}

func (w *undoWriter) write(b []byte) {
	if w.err != nil {
		return
	}
	n, err := w.w.Write(b)
	w.off += int64(n)
	w.err = err
}

// add appends the entry of block b (blocks must ascend). data is the block's
// content (exactly BlockSize bytes) or nil for a zero block.
func (w *undoWriter) add(b uint64, hash [32]byte, data []byte) error {
	if len(w.log.ents) > 0 && b <= w.last {
		return fmt.Errorf("undo log: block %d after %d", b, w.last)
	}
	w.last = b
	e := undoEntry{block: b, kind: undoKindZero, hash: hash}
	if data != nil {
		e.kind, e.off = undoKindData, w.off
		w.write(data[:format.BlockSize])
	}
	w.log.ents = append(w.log.ents, e)
	return w.err
}

func (w *undoWriter) abort() {
	w.f.Close()
	os.Remove(filepath.Join(w.dir, w.name+".tmp"))
}

// finish writes the table and footer, fsyncs, calls hook (a crash there
// leaves only the .tmp file), renames to the final name and fsyncs the
// directory. The returned log is open for reading.
func (w *undoWriter) finish(hook func(string) error) (*undoLog, error) {
	tableOff := w.off
	var nData uint64
	var e [undoEntrySize]byte
	for _, ent := range w.log.ents {
		clear(e[:])
		binary.LittleEndian.PutUint64(e[0:], ent.block)
		e[8] = ent.kind
		copy(e[16:], ent.hash[:])
		w.write(e[:])
		if ent.kind == undoKindData {
			nData++
		}
	}
	var ft [undoFooterSize]byte
	binary.LittleEndian.PutUint64(ft[0:], uint64(tableOff))
	binary.LittleEndian.PutUint64(ft[8:], uint64(len(w.log.ents)))
	binary.LittleEndian.PutUint64(ft[16:], nData)
	if w.err == nil {
		w.h.Sum(ft[24:24])
		copy(ft[56:], undoEndMagic)
		if _, err := w.bw.Write(ft[:]); err != nil {
			w.err = err
		}
		w.off += undoFooterSize
	}
	if w.err == nil {
		w.err = w.bw.Flush()
	}
	if w.err == nil {
		w.err = w.f.Sync()
	}
	if w.err == nil {
		w.err = w.f.Close()
	} else {
		w.f.Close()
	}
	if w.err != nil {
		os.Remove(filepath.Join(w.dir, w.name+".tmp"))
		return nil, w.err
	}
	if err := hook("undo-tmp"); err != nil {
		return nil, err
	}
	final := filepath.Join(w.dir, w.name)
	if err := os.Rename(final+".tmp", final); err != nil {
		return nil, err
	}
	if err := fsutil.SyncDir(w.dir); err != nil {
		return nil, err
	}
	f, err := os.Open(final)
	if err != nil {
		return nil, err
	}
	w.log.f, w.log.size = f, w.off
	return w.log, nil
}

// loadUndo opens and checks an undo log completely (structure and file hash).
func loadUndo(path string) (*undoLog, error) {
	from, to, ok := parseUndoName(filepath.Base(path))
	if !ok {
		return nil, fmt.Errorf("%s: %w: bad file name", path, errUndoCorrupt)
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	u, err := parseUndo(f, from, to)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	u.path, u.f = path, f
	return u, nil
}

func parseUndo(f *os.File, from, to uint64) (*undoLog, error) {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", errUndoCorrupt, fmt.Sprintf(format, a...))
	}
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	size := st.Size()
	if size < undoHeaderSize+undoFooterSize {
		return nil, bad("%d bytes, too short", size)
	}
	var hdr [undoHeaderSize]byte
	var ft [undoFooterSize]byte
	if _, err := f.ReadAt(hdr[:], 0); err != nil {
		return nil, err
	}
	if _, err := f.ReadAt(ft[:], size-undoFooterSize); err != nil {
		return nil, err
	}
	le := binary.LittleEndian
	if string(hdr[:8]) != undoMagic || string(ft[56:]) != undoEndMagic {
		return nil, bad("magic missing")
	}
	u := &undoLog{from: le.Uint64(hdr[8:]), to: le.Uint64(hdr[16:]), oldSize: le.Uint64(hdr[28:]), size: size}
	flags := le.Uint32(hdr[24:])
	if u.from != from || u.to != to || flags&^undoFlagAbsent != 0 {
		return nil, bad("header (range %d-%d, flags %#x) does not match the name %d-%d", u.from, u.to, flags, from, to)
	}
	u.absent = flags&undoFlagAbsent != 0
	tableOff, n, nData := le.Uint64(ft[0:]), le.Uint64(ft[8:]), le.Uint64(ft[16:])
	end := uint64(size - undoFooterSize)
	if tableOff < undoHeaderSize || tableOff > end || n > (end-tableOff)/undoEntrySize ||
		tableOff+n*undoEntrySize != end || nData > n || undoHeaderSize+nData*format.BlockSize != tableOff {
		return nil, bad("inconsistent footer")
	}
	// File hash over everything before the footer.
	h := blake3.New()
	if _, err := io.Copy(h, io.NewSectionReader(f, 0, int64(end))); err != nil {
		return nil, err
	}
	if !bytes.Equal(h.Sum(nil), ft[24:56]) {
		return nil, bad("file hash mismatch")
	}
	tb := make([]byte, n*undoEntrySize)
	if _, err := f.ReadAt(tb, int64(tableOff)); err != nil {
		return nil, err
	}
	u.ents = make([]undoEntry, n)
	off := int64(undoHeaderSize)
	var seenData uint64
	for i := range u.ents {
		b := tb[i*undoEntrySize:]
		e := undoEntry{block: le.Uint64(b), kind: b[8]}
		copy(e.hash[:], b[16:48])
		if i > 0 && e.block <= u.ents[i-1].block {
			return nil, bad("entry %d: blocks not ascending", i)
		}
		if !bytes.Equal(b[9:16], make([]byte, 7)) {
			return nil, bad("entry %d: reserved bytes set", i)
		}
		switch e.kind {
		case undoKindData:
			e.off = off
			off += format.BlockSize
			seenData++
		case undoKindZero:
		default:
			return nil, bad("entry %d: kind %d", i, e.kind)
		}
		u.ents[i] = e
	}
	if seenData != nData {
		return nil, bad("%d data entries, footer says %d", seenData, nData)
	}
	return u, nil
}

// readEntry reads the content of entry e into buf (BlockSize bytes).
func (u *undoLog) readEntry(e *undoEntry, buf []byte) error {
	if e.kind == undoKindZero {
		clear(buf[:format.BlockSize])
		return nil
	}
	_, err := u.f.ReadAt(buf[:format.BlockSize], e.off)
	return err
}

// mergeUndo writes one undo log that replaces logs (contiguous ranges, sorted
// by from): for every block the entry of the earliest log that has it, which
// is the block's content at point logs[0].from-1. The result is durable when
// mergeUndo returns; the caller deletes the old logs afterwards.
func mergeUndo(dir string, logs []*undoLog, hook func(string) error) (*undoLog, error) {
	type pick struct {
		log int
		ent int
	}
	var picks []pick
	seen := make(map[uint64]struct{})
	for li, l := range logs {
		for ei := range l.ents {
			b := l.ents[ei].block
			if _, ok := seen[b]; ok {
				continue
			}
			seen[b] = struct{}{}
			picks = append(picks, pick{li, ei})
		}
	}
	slices.SortFunc(picks, func(a, b pick) int {
		x, y := logs[a.log].ents[a.ent].block, logs[b.log].ents[b.ent].block
		switch {
		case x < y:
			return -1
		case x > y:
			return 1
		}
		return 0
	})
	first, last := logs[0], logs[len(logs)-1]
	w, err := createUndo(dir, first.from, last.to, first.absent, first.oldSize)
	if err != nil {
		return nil, err
	}
	buf := make([]byte, format.BlockSize)
	for _, p := range picks {
		l := logs[p.log]
		e := &l.ents[p.ent]
		var data []byte
		if e.kind == undoKindData {
			if err := l.readEntry(e, buf); err != nil {
				w.abort()
				return nil, err
			}
			data = buf
		}
		if err := w.add(e.block, e.hash, data); err != nil {
			w.abort()
			return nil, err
		}
	}
	return w.finish(hook)
}
