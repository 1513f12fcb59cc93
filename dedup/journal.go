package dedup

import (
	"bufio"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/zeebo/blake3"
)

// The export journal (ScratchDir/journal, one line per event, fsynced):
//
//	standin-seed-journal-v2 HEADER SALT SEEDID
//	vol N                               volume N started (label written)
//	pack NUM FIRST COUNT VOL GROUP LEN HASH IDSHASH
//	group G DATA PARITY VOL:LEN:HASH,...  group G closed with these parity shards
//	close N                             volume N closed (partial index written)
//	root I HEX                          sequential survive mode: manifest root of
//	                                    image I (0, 1, ... in image order), before data
//	data ALLOC CHUNKS UNIQUE            sequential survive mode: all data written,
//	                                    complete index in ScratchDir/index.final
//
// The ids of every journaled pack are in ScratchDir/journal.ids (32 bytes
// per chunk number); IDSHASH is BLAKE3 of the pack's ids there.

const (
	journalName  = "journal"
	idsName      = "journal.ids"
	finalIdxName = "index.final"
	accDir       = "parity-acc"
	labelName    = "volume"
	journalMagic = "standin-seed-journal-v2"
	labelMagic   = "standin-seed-volume"
)

type jPack struct {
	num, first   uint64
	count        uint32
	vol, group   int
	length       int64
	hash, idHash [32]byte
}

type jGroup struct {
	g, data, parity int
	par             []shardEntry
}

type jEntry struct {
	kind  byte // 'v', 'p', 'g', 'c', 'r', 'd'
	vol   int  // 'v', 'c'; 'r': the image's index
	pack  jPack
	group jGroup
	data  [3]int64 // 'd': allocated bytes, chunk references, unique chunks
	root  [32]byte // 'r'
}

type journal struct {
	header, salt [32]byte
	seed         [16]byte
	entries      []jEntry
}

func (e jEntry) line() string {
	switch e.kind {
	case 'v':
		return fmt.Sprintf("vol %d\n", e.vol)
	case 'c':
		return fmt.Sprintf("close %d\n", e.vol)
	case 'd':
		return fmt.Sprintf("data %d %d %d\n", e.data[0], e.data[1], e.data[2])
	case 'r':
		return fmt.Sprintf("root %d %s\n", e.vol, hex.EncodeToString(e.root[:]))
	case 'p':
		p := e.pack
		return fmt.Sprintf("pack %d %d %d %d %d %d %s %s\n", p.num, p.first, p.count, p.vol, p.group, p.length,
			hex.EncodeToString(p.hash[:]), hex.EncodeToString(p.idHash[:]))
	case 'g':
		g := e.group
		var ps []string
		for _, s := range g.par {
			ps = append(ps, fmt.Sprintf("%d:%d:%s", s.Vol, s.Len, hex.EncodeToString(s.Hash[:])))
		}
		if len(ps) == 0 {
			ps = []string{"-"}
		}
		return fmt.Sprintf("group %d %d %d %s\n", g.g, g.data, g.parity, strings.Join(ps, ","))
	}
	return ""
}

type journalFile struct{ f *os.File }

// add appends entries and syncs once.
func (j *journalFile) add(es ...jEntry) error {
	var sb strings.Builder
	for _, e := range es {
		sb.WriteString(e.line())
	}
	if _, err := j.f.WriteString(sb.String()); err != nil {
		return err
	}
	return j.f.Sync()
}

func (j *journalFile) Close() error {
	if j == nil || j.f == nil {
		return nil
	}
	err := j.f.Close()
	j.f = nil
	return err
}

// writeJournal (re)writes the journal with the given entries and opens it
// for appending.
func writeJournal(dir string, j *journal) (*journalFile, error) {
	var sb strings.Builder
	fmt.Fprintf(&sb, "%s %s %s %s\n", journalMagic, hex.EncodeToString(j.header[:]), hex.EncodeToString(j.salt[:]), hex.EncodeToString(j.seed[:]))
	for _, e := range j.entries {
		sb.WriteString(e.line())
	}
	path := filepath.Join(dir, journalName)
	if err := writeFileAtomic(path, []byte(sb.String()), privateMode); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return nil, err
	}
	return &journalFile{f: f}, nil
}

// readJournal parses dir/journal. Lines after the first malformed or
// inconsistent one are ignored (a torn last line after a crash).
func readJournal(dir string) *journal {
	f, _, err := openRegular(filepath.Join(dir, journalName))
	if err != nil {
		return nil
	}
	defer f.Close()
	sc := bufio.NewScanner(io.LimitReader(f, 1<<30))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	if !sc.Scan() {
		return nil
	}
	fs := strings.Fields(sc.Text())
	if len(fs) != 4 || fs[0] != journalMagic {
		return nil
	}
	j := &journal{}
	var seed [32]byte
	if !unhexN(fs[1], j.header[:]) || !unhexN(fs[2], j.salt[:]) || !unhexN(fs[3], seed[:16]) {
		return nil
	}
	copy(j.seed[:], seed[:16])
	var nextPack, nextChunk uint64
	nextGroup := 0
	maxVol := 0
	nextRoot := 0
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) == 0 {
			break
		}
		e, ok := parseEntry(fs)
		if !ok {
			break
		}
		switch e.kind {
		case 'v':
			if e.vol != maxVol+1 {
				return j
			}
			maxVol = e.vol
		case 'c':
			if e.vol < 1 || e.vol > maxVol {
				return j
			}
		case 'r':
			if e.vol != nextRoot {
				return j
			}
			nextRoot++
		case 'p':
			p := e.pack
			if p.num != nextPack || p.first != nextChunk || p.vol < 1 || p.vol > maxVol || p.group < nextGroup {
				return j
			}
			nextPack++
			nextChunk += uint64(p.count)
		case 'g':
			if e.group.g != nextGroup {
				return j
			}
			for _, s := range e.group.par {
				if s.Vol < 1 || s.Vol > maxVol {
					return j
				}
			}
			nextGroup++
		}
		j.entries = append(j.entries, e)
	}
	return j
}

func parseEntry(fs []string) (jEntry, bool) {
	num := func(s string, bits int) (uint64, bool) {
		v, err := strconv.ParseUint(s, 10, bits)
		return v, err == nil
	}
	switch {
	case fs[0] == "vol" && len(fs) == 2, fs[0] == "close" && len(fs) == 2:
		v, ok := num(fs[1], 31)
		if !ok || v < 1 || v > maxVolumes {
			return jEntry{}, false
		}
		return jEntry{kind: fs[0][0], vol: int(v)}, true
	case fs[0] == "root" && len(fs) == 3:
		v, ok := num(fs[1], 31)
		e := jEntry{kind: 'r', vol: int(v)}
		if !ok || !unhexN(fs[2], e.root[:]) {
			return jEntry{}, false
		}
		return e, true
	case fs[0] == "data" && len(fs) == 4:
		var e jEntry
		e.kind = 'd'
		for i := range e.data {
			v, ok := num(fs[1+i], 63)
			if !ok {
				return jEntry{}, false
			}
			e.data[i] = int64(v)
		}
		return e, true
	case fs[0] == "pack" && len(fs) == 9:
		var p jPack
		var ok [6]bool
		var cnt, vol, grp, ln uint64
		p.num, ok[0] = num(fs[1], 40)
		p.first, ok[1] = num(fs[2], 63)
		cnt, ok[2] = num(fs[3], 32)
		vol, ok[3] = num(fs[4], 31)
		grp, ok[4] = num(fs[5], 31)
		ln, ok[5] = num(fs[6], 63)
		for _, o := range ok {
			if !o {
				return jEntry{}, false
			}
		}
		if cnt == 0 || cnt > maxPackChunks || ln == 0 || ln > maxShardSize || !unhexN(fs[7], p.hash[:]) || !unhexN(fs[8], p.idHash[:]) {
			return jEntry{}, false
		}
		p.count, p.vol, p.group, p.length = uint32(cnt), int(vol), int(grp), int64(ln)
		return jEntry{kind: 'p', pack: p}, true
	case fs[0] == "group" && len(fs) == 5:
		g, ok1 := num(fs[1], 31)
		d, ok2 := num(fs[2], 9)
		p, ok3 := num(fs[3], 9)
		if !ok1 || !ok2 || !ok3 || d < 1 || d+p > 256 {
			return jEntry{}, false
		}
		e := jEntry{kind: 'g', group: jGroup{g: int(g), data: int(d), parity: int(p)}}
		if fs[4] != "-" {
			for i, ps := range strings.Split(fs[4], ",") {
				f := strings.Split(ps, ":")
				if len(f) != 3 {
					return jEntry{}, false
				}
				v, ok1 := num(f[0], 31)
				l, ok2 := num(f[1], 31)
				s := shardEntry{Kind: kindParity, Vol: int(v), Len: int64(l), Num: g<<8 | uint64(i)}
				if !ok1 || !ok2 || !unhexN(f[2], s.Hash[:]) {
					return jEntry{}, false
				}
				e.group.par = append(e.group.par, s)
			}
		}
		if len(e.group.par) != int(p) {
			return jEntry{}, false
		}
		return e, true
	}
	return jEntry{}, false
}

func unhexN(s string, out []byte) bool {
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != len(out) {
		return false
	}
	copy(out, b)
	return true
}

// journalHeader identifies the export: format, options that shape the
// layout, key, and the identity of every image (not the cut time or cut id:
// a rerun takes a new cut of the same images). With a key it is keyed, so it
// reveals no names.
func journalHeader(k *keys, images []ImageSource, o *ExportOptions, nvols int) [32]byte {
	h := blake3.New()
	if k != nil {
		h, _ = blake3.NewKeyed(k.mac[:])
	}
	var b []byte
	b = append(b, "standin seed journal v2"...)
	b = binary.LittleEndian.AppendUint64(b, uint64(o.PackSize))
	b = binary.LittleEndian.AppendUint64(b, math.Float64bits(o.Parity))
	b = binary.LittleEndian.AppendUint64(b, uint64(o.VolumeSize))
	b = binary.LittleEndian.AppendUint64(b, uint64(nvols))
	if o.SurviveVolumeLoss {
		b = append(b, 1)
	} else {
		b = append(b, 0)
	}
	for _, im := range images {
		b = binary.LittleEndian.AppendUint64(b, uint64(len(im.Name())))
		b = append(b, im.Name()...)
		id := im.ID()
		b = append(b, id[:]...)
		b = binary.LittleEndian.AppendUint64(b, im.Generation())
		b = binary.LittleEndian.AppendUint64(b, im.Seq())
		b = binary.LittleEndian.AppendUint64(b, uint64(im.Size()))
	}
	h.Write(b)
	var out [32]byte
	h.Sum(out[:0])
	return out
}

// ---- volume labels ----

func writeLabel(dir string, seed [16]byte, vol int, perm os.FileMode) error {
	return writeFileAtomic(filepath.Join(dir, labelName), fmt.Appendf(nil, "%s %s %d\n", labelMagic, hex.EncodeToString(seed[:]), vol), perm)
}

// identifyVolume says which seed and volume a directory holds, from its
// label (a volume being written) or an intact index copy.
func identifyVolume(dir string) (seed [16]byte, vol int, ok bool) {
	if b, err := readFileLimited(filepath.Join(dir, labelName), 4096); err == nil {
		fs := strings.Fields(string(b))
		if len(fs) == 3 && fs[0] == labelMagic && unhexN(fs[1], seed[:]) {
			if v, err := strconv.Atoi(fs[2]); err == nil && v >= 1 && v <= maxVolumes {
				return seed, v, true
			}
		}
	}
	for _, n := range indexNames {
		if b, err := readFileLimited(filepath.Join(dir, n), maxIndexSize); err == nil {
			if ix, err := decodeIndex(b); err == nil {
				return ix.SeedID, ix.Volume, true
			}
		}
	}
	return seed, 0, false
}

// seedFilePatterns match every name this package writes in a volume
// directory: shards, index copies, the label, and their temporary files.
var seedFilePatterns = []string{"packs/*.pack", "packs/*.tmp", "parity/*.par", "parity/*.tmp", "manifests/*.man", "manifests/*.tmp",
	"index.?", "index.?.tmp", labelName, labelName + ".tmp",
	"packs/.*.tmp-*", "parity/.*.tmp-*", "manifests/.*.tmp-*", ".index.?.tmp-*", "." + labelName + ".tmp-*"}

// cleanSeedDir removes the files an export leaves in a volume directory
// (only names this package writes).
func cleanSeedDir(dir string) error {
	for _, pat := range seedFilePatterns {
		m, _ := filepath.Glob(filepath.Join(dir, pat))
		for _, f := range m {
			if err := os.Remove(f); err != nil && !os.IsNotExist(err) {
				return err
			}
		}
	}
	return nil
}

func cleanState(dir string) {
	for _, n := range []string{journalName, journalName + ".tmp", idsName, finalIdxName, finalIdxName + ".tmp"} {
		os.Remove(filepath.Join(dir, n))
	}
	for _, n := range []string{journalName, finalIdxName} {
		m, _ := filepath.Glob(filepath.Join(dir, "."+n+".tmp-*"))
		for _, f := range m {
			os.Remove(f)
		}
	}
	os.RemoveAll(filepath.Join(dir, accDir))
}
