package applier

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/zeebo/blake3"

	"github.com/standin/standin/internal/format"
	"github.com/standin/standin/internal/fsutil"
	"github.com/standin/standin/internal/testutil"
)

// Fuzz targets of the replica's on-disk records (undo logs, refs files,
// chunk index values, every JSON state file of a group) and of the request
// bodies the server decodes. Seeds are real encoder output.

var fuzzImageID = [16]byte{0x11, 0x42, 7, 7, 7, 7, 0x40, 7, 0x80, 7, 7, 7, 7, 7, 7, 0x11}

// fuzzImageUUID is fuzzImageID as a string.
const fuzzImageUUID = "11420707-0707-4007-8007-070707070711"

// fuzzJSON is v marshalled.
func fuzzJSON(tb testing.TB, v any) []byte {
	tb.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

// fuzzCycle writes cycle seq (0 = base) of the fuzz image: blocks maps a
// block to its fill byte (0 = a zero extent).
func fuzzCycle(tb testing.TB, dir string, seq uint64, size uint64, blocks map[uint64]byte) string {
	tb.Helper()
	h := format.Header{ImageID: fuzzImageID, Generation: 1, Seq: seq, Parent: seq - 1,
		CutTime: time.Date(2025, 6, 1, 12, int(seq), 0, 0, time.UTC), ImageSize: size, GroupCut: [16]byte{byte(seq), 0xf0}, Name: "disk0.img"}
	if seq == 0 {
		h.Flags, h.Parent = format.FlagBase, format.NoParent
	}
	p := filepath.Join(dir, fmt.Sprintf("c%d.cyc", seq))
	f, err := os.Create(p)
	if err != nil {
		tb.Fatal(err)
	}
	w, err := format.NewWriter(f, h, format.WriterOptions{Compress: seq%2 == 1})
	if err != nil {
		tb.Fatal(err)
	}
	for b := uint64(0); b < (size+format.BlockSize-1)/format.BlockSize; b++ {
		v, ok := blocks[b]
		switch {
		case !ok:
		case v == 0:
			err = w.WriteZero(b, 1)
		default:
			d := bytes.Repeat([]byte{v}, format.BlockSize)
			d[7] = byte(b)
			err = w.WriteBlocks(b, d)
		}
		if err != nil {
			tb.Fatal(err)
		}
	}
	if _, err := w.Close(); err != nil {
		tb.Fatal(err)
	}
	if err := f.Close(); err != nil {
		tb.Fatal(err)
	}
	return p
}

// fuzzReplicaDir builds a replica store with group vm1 holding one image
// and three points (so undo logs exist), closed.
func fuzzReplicaDir(tb testing.TB) string {
	tb.Helper()
	dir, cyc := tb.TempDir(), tb.TempDir()
	now := time.Date(2025, 6, 1, 13, 0, 0, 0, time.UTC)
	rep, err := OpenReplica(dir, ReplicaOptions{Now: func() time.Time { return now }})
	if err != nil {
		tb.Fatal(err)
	}
	defer rep.Close()
	if err := rep.EnsureGroup("vm1", Retention{AnyPointWindow: 1000 * time.Hour}); err != nil {
		tb.Fatal(err)
	}
	const size = 12*format.BlockSize - 100
	for seq, blocks := range []map[uint64]byte{
		{0: 1, 1: 2, 2: 3, 5: 4, 11: 5},
		{1: 6, 2: 0, 7: 7},
		{0: 8, 3: 9, 5: 0, 6: 10},
	} {
		if _, err := rep.ApplyGroup(context.Background(), "vm1", []string{fuzzCycle(tb, cyc, uint64(seq), size, blocks)}); err != nil {
			tb.Fatal(err)
		}
	}
	return dir
}

const fuzzImageDir = "groups/vm1/images/11420707-0707-4007-8007-070707070711"

// fixUndoSum replaces the file hash in an undo log's footer so mutations of
// the body get past it.
func fixUndoSum(b []byte) []byte {
	if len(b) < undoHeaderSize+undoFooterSize {
		return b
	}
	out := bytes.Clone(b)
	end := len(out) - undoFooterSize
	s := blake3.Sum256(out[:end])
	copy(out[end+24:end+56], s[:])
	return out
}

func writeUndoBytes(tb testing.TB, dir string, from, to uint64, absent bool, oldSize uint64, ents []undoEntry, data func(i int) []byte) []byte {
	tb.Helper()
	w, err := createUndo(dir, from, to, absent, oldSize)
	if err != nil {
		tb.Fatal(err)
	}
	for i, e := range ents {
		var d []byte
		if e.kind == undoKindData {
			d = data(i)
		}
		if err := w.add(e.block, e.hash, d); err != nil {
			tb.Fatal(err)
		}
	}
	u, err := w.finish(func(string) error { return nil })
	if err != nil {
		tb.Fatal(err)
	}
	u.close()
	b, err := os.ReadFile(filepath.Join(dir, undoName(from, to)))
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

// FuzzUndoLog parses undo logs; an accepted log rewritten from its parsed
// entries is the same bytes (the format is canonical).
func FuzzUndoLog(f *testing.F) {
	src := fuzzReplicaDir(f)
	logs, _ := filepath.Glob(filepath.Join(src, fuzzImageDir, "undo", "*.undo"))
	for _, l := range logs {
		b, err := os.ReadFile(l)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	blk := bytes.Repeat([]byte{9}, format.BlockSize)
	f.Add(writeUndoBytes(f, f.TempDir(), 4, 4, true, 0, nil, nil))
	f.Add(writeUndoBytes(f, f.TempDir(), 4, 4, false, 1<<20, []undoEntry{
		{block: 0, kind: undoKindZero}, {block: 3, kind: undoKindData, hash: blockHash(blk)}, {block: 1 << 40, kind: undoKindZero},
	}, func(int) []byte { return blk }))
	dir, dir2 := f.TempDir(), f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, b := range [][]byte{data, fixUndoSum(data)} {
			from, to := uint64(4), uint64(4)
			if len(b) >= 24 {
				from, to = binary.LittleEndian.Uint64(b[8:]), binary.LittleEndian.Uint64(b[16:])
			}
			if from == 0 || from > to {
				from, to = 4, 4
			}
			path := filepath.Join(dir, undoName(from, to))
			if err := os.WriteFile(path, b, 0o600); err != nil {
				t.Fatal(err)
			}
			u, err := loadUndo(path)
			testutil.Allocs(t, fmt.Sprintf("loadUndo of %d bytes", len(b)), uint64(4*len(b))+64<<10, func() {
				if u, err := loadUndo(path); err == nil {
					u.close()
				}
			})
			if err != nil {
				os.Remove(path)
				continue
			}
			buf := make([]byte, format.BlockSize)
			out := writeUndoBytes(t, dir2, u.from, u.to, u.absent, u.oldSize, u.ents, func(i int) []byte {
				if err := u.readEntry(&u.ents[i], buf); err != nil {
					t.Fatal(err)
				}
				return buf
			})
			u.close()
			os.Remove(path)
			os.Remove(filepath.Join(dir2, undoName(from, to)))
			if !bytes.Equal(out, b) {
				t.Fatalf("undo log %d-%d: rewritten from its entries it differs (%d bytes, was %d)", from, to, len(out), len(b))
			}
		}
	})
}

func refsBytes(runs []brange, fill byte) []byte {
	var b []byte
	var n uint64
	for _, r := range runs {
		n += r.hi - r.lo
	}
	b = append(b, bytes.Repeat([]byte{fill}, int(n)*format.BlockSize)...)
	for _, r := range runs {
		b = binary.LittleEndian.AppendUint64(b, r.lo)
		b = binary.LittleEndian.AppendUint64(b, r.hi-r.lo)
	}
	b = binary.LittleEndian.AppendUint64(b, uint64(len(runs)))
	b = binary.LittleEndian.AppendUint64(b, n)
	return append(b, refsMagic...)
}

// FuzzRefsFile parses refs files (copied blocks of a thinned cycle); an
// accepted file's runs re-encode to its table.
func FuzzRefsFile(f *testing.F) {
	f.Add(refsBytes([]brange{{0, 1}, {5, 7}}, 3))
	f.Add(refsBytes([]brange{{1 << 40, 1<<40 + 1}}, 0))
	f.Add(refsBytes(nil, 0))
	dir := f.TempDir()
	path := filepath.Join(dir, "x.refs")
	f.Fuzz(func(t *testing.T, data []byte) {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		rf, runs, err := openRefs(path)
		testutil.Allocs(t, fmt.Sprintf("openRefs of %d bytes", len(data)), uint64(4*len(data))+64<<10, func() {
			if f, _, err := openRefs(path); err == nil {
				f.Close()
			}
		})
		if err != nil {
			return
		}
		rf.Close()
		var blocks uint64
		for _, r := range runs {
			blocks += r.hi - r.lo
		}
		want := refsBytes(runs, 0)[blocks*format.BlockSize:]
		if got := data[blocks*format.BlockSize:]; !bytes.Equal(got, want) {
			t.Fatalf("refs table re-encodes differently: %x vs %x", got, want)
		}
		s := &refSource{f: nil, runs: runs}
		for _, r := range runs {
			s.copied(r.lo)
		}
	})
}

// FuzzChunkLocs decodes chunk index values (image number, block varints).
func FuzzChunkLocs(f *testing.F) {
	f.Add(encodeLocs([]locVal{{1, 0}, {2, 1 << 40}}))
	f.Add(encodeLocs([]locVal{{1<<32 - 1, 1<<64 - 1}}))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		ls := decodeLocs(data)
		if len(ls) > maxLocsPerHash {
			t.Fatalf("%d locations decoded", len(ls))
		}
		if got := decodeLocs(encodeLocs(ls)); !slices.Equal(got, ls) {
			t.Fatalf("round trip: %v -> %v", ls, got)
		}
	})
}

// fuzzStateFiles are the group state files FuzzReplicaState damages
// (relative to the store), with the records written when absent.
var fuzzStateFiles = []string{
	"groups/vm1/group.json",
	"groups/vm1/points.json",
	fuzzImageDir + "/state.json",
	fuzzImageDir + "/hashes.bin",
	fuzzImageDir + "/undo/2-2.undo",
	fuzzImageDir + "/undo/3-3.undo",
	"groups/vm1/pins.json",
	"groups/vm1/failover.json",
	"groups/vm1/apply.json",
	"groups/vm1/adopt.json",
	"groups/vm1/seed.json",
	"expect/vm1.json",
	"groups/vm1/" + ForwardCutFile,
}

func copyTree(tb testing.TB, src, dst string) {
	tb.Helper()
	err := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		to := filepath.Join(dst, rel)
		if d.IsDir() {
			return os.MkdirAll(to, 0o700)
		}
		in, err := os.Open(p)
		if err != nil {
			return err
		}
		defer in.Close()
		out, err := os.Create(to)
		if err != nil {
			return err
		}
		_, err = io.Copy(out, in)
		if cerr := out.Close(); err == nil {
			err = cerr
		}
		return err
	})
	if err != nil {
		tb.Fatal(err)
	}
}

// FuzzReplicaState replaces one state file of a real group (chosen by
// which) with the input, opens the store and uses the group: recovery and
// every reader must refuse damage with an error, never panic or hang.
func FuzzReplicaState(f *testing.F) {
	src := fuzzReplicaDir(f)
	now := time.Date(2025, 6, 1, 13, 0, 0, 0, time.UTC)
	t0 := now.Add(-time.Hour)
	id := fuzzImageUUID
	made := map[string][]byte{
		"groups/vm1/pins.json":         fuzzJSON(f, pinsFile{Pins: []PinRecord{{Owner: "fwd", Point: 2, Time: t0}}}),
		"groups/vm1/failover.json":     fuzzJSON(f, FailoverState{Kind: "planned", Time: t0, Point: "3", Images: []FailoverImage{{ID: id, Name: "disk0.img"}}}),
		"groups/vm1/apply.json":        fuzzJSON(f, journal{Point: 4, Time: t0, Cycle: 4, Items: []journalItem{{ID: id, Gen: 1, Seq: 3}}}),
		"groups/vm1/adopt.json":        fuzzJSON(f, adoptRecord{Point: 4, Time: t0, Cycle: 4, Images: []adoptItem{{ID: id, Name: "disk0.img", Generation: 2, Seq: 0, Size: 4096}}}),
		"groups/vm1/seed.json":         fuzzJSON(f, seedCommit{Point: 4, Time: t0, Cycle: 4, Images: []SeedImage{{Group: "vm1", ID: id, Name: "disk0.img", Generation: 2, Size: 4096}}}),
		"expect/vm1.json":              fuzzJSON(f, map[string]any{"group_cut": "00", "time": t0, "images": []map[string]any{{"id": id, "name": "disk0.img", "generation": 2, "seq": 5}}}),
		"groups/vm1/" + ForwardCutFile: fuzzJSON(f, map[string]any{"point": "3"}),
	}
	for i, name := range fuzzStateFiles {
		b, err := os.ReadFile(filepath.Join(src, name))
		if err != nil {
			b = made[name]
		}
		f.Add(uint8(i), b)
	}
	f.Fuzz(func(t *testing.T, which uint8, data []byte) {
		dir := testutil.MemTempDir(t, nil)
		copyTree(t, src, dir)
		name := fuzzStateFiles[int(which)%len(fuzzStateFiles)]
		os.MkdirAll(filepath.Dir(filepath.Join(dir, name)), 0o700)
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
		testutil.Deadline(t, 20*time.Second, func() { useReplica(dir, now, id) })
	})
}

// useReplica opens the store and reads everything of group vm1.
func useReplica(dir string, now time.Time, id string) {
	{
		rep, err := OpenReplica(dir, ReplicaOptions{Now: func() time.Time { return now }})
		if err != nil {
			return
		}
		defer rep.Close()
		ctx := context.Background()
		rep.Status()
		rep.Failover("vm1")
		rep.Pins("vm1")
		rep.SeedExpectation("vm1")
		rep.GroupImages("vm1")
		rep.ImageState("vm1", id)
		pts, err := rep.Points("vm1")
		if err != nil || len(pts) == 0 {
			return
		}
		rep.ChangedAfter("vm1", pts[0].ID)
		for _, p := range []Point{pts[0], pts[len(pts)-1]} {
			if r, err := rep.OpenPoint("vm1", p.ID, "disk0.img"); err == nil {
				io.Copy(io.Discard, io.NewSectionReader(r, 0, 1<<20))
				r.Close()
			}
		}
		rep.VerifyPoint(ctx, "vm1", pts[0].ID)
	}
}

// TestFuzzStateSeedsValid: the state files FuzzReplicaState starts from are
// what the store writes (the fuzzer starts from valid records).
func TestFuzzStateSeedsValid(t *testing.T) {
	src := fuzzReplicaDir(t)
	var pf struct{}
	if err := fsutil.ReadJSON(filepath.Join(src, "groups/vm1/points.json"), &pf); err != nil {
		t.Fatal(err)
	}
	for _, n := range fuzzStateFiles[:6] {
		if _, err := os.Stat(filepath.Join(src, n)); err != nil {
			t.Fatalf("%s: %v", n, err)
		}
	}
}
