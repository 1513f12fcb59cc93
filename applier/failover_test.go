package applier

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/zeebo/blake3"

	"github.com/standin/standin/internal/format"
	"github.com/standin/standin/internal/fsutil"
	"github.com/standin/standin/internal/wire"
)

var foStart = time.Date(2026, 6, 1, 0, 0, 0, 0, time.UTC)

// foStore is a group vm1 of two images (a, b) with four points, all kept.
func foStore(t *testing.T, o ReplicaOptions, seed uint64) (s *tStore, a, b *tImage, rng *rand.Rand) {
	t.Helper()
	o.Now = func() time.Time { return foStart.Add(24 * time.Hour) }
	s = newTStore(t, o, Retention{AnyPointWindow: 1000 * time.Hour})
	rng = rand.New(rand.NewPCG(seed, 77))
	a, b = newTImage(0x31, "a.img"), newTImage(0x32, "b.img")
	for i := 0; i < 4; i++ {
		a, b = foApply(t, s, rng, i, a, b, cycOpt{nOps: 24, resize: i > 0}, cycOpt{nOps: 24, resize: i > 0})
	}
	return s, a, b, rng
}

// foApply applies the next cycle of each image as one point and records it.
func foApply(t *testing.T, s *tStore, rng *rand.Rand, i int, a, b *tImage, oa, ob cycOpt) (*tImage, *tImage) {
	t.Helper()
	cut := foStart.Add(time.Duration(i) * 10 * time.Minute)
	gc := [16]byte{byte(i), 0xf0}
	pa, na := a.cycle(t, s.cyc, rng, gc, cut, oa)
	pb, nb := b.cycle(t, s.cyc, rng, gc, cut, ob)
	res, err := s.rep.ApplyGroup(context.Background(), s.group, []string{pa, pb})
	if err != nil {
		t.Fatalf("apply %d: %v", i, err)
	}
	s.record(res.Point, na, nb)
	return na, nb
}

func fileWant(t *testing.T, path string) want {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return want{int64(len(b)), blake3.Sum256(b)}
}

func exportWant(t *testing.T, rep *Replica, group, point, id string) want {
	t.Helper()
	dst := filepath.Join(t.TempDir(), "export.img")
	if err := rep.Export(context.Background(), group, point, id, dst); err != nil {
		t.Fatalf("export of point %s image %s: %v", point, id, err)
	}
	return fileWant(t, dst)
}

// exports returns every point's export of every image.
func exports(t *testing.T, rep *Replica, group string) map[string]map[string]want {
	t.Helper()
	ps, err := rep.Points(group)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]map[string]want{}
	for _, p := range ps {
		out[p.ID] = map[string]want{}
		for id := range p.Seqs {
			out[p.ID][id] = exportWant(t, rep, group, p.ID, id)
		}
	}
	return out
}

func checkPromoted(t *testing.T, pi PromotedImage, w want) {
	t.Helper()
	if got := fileWant(t, pi.Path); got != w || pi.Size != w.size {
		t.Fatalf("materialised %s (%d bytes) differs from the point's export (%d bytes)", pi.Path, got.size, w.size)
	}
	f, err := os.Open(pi.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	root, err := wire.HashImage(context.Background(), f, pi.Size, nil)
	if err != nil {
		t.Fatal(err)
	}
	if root != pi.Root {
		t.Fatalf("%s: Root %x, wire.HashImage %x", pi.Path, pi.Root[:8], root[:8])
	}
	// Sparse: only non-zero blocks are data.
	b, _ := os.ReadFile(pi.Path)
	var nonZero int64
	for off := 0; off < len(b); off += format.BlockSize {
		if !isZero(b[off:min(len(b), off+format.BlockSize)]) {
			nonZero++
		}
	}
	exts, err := fsutil.DataExtents(f, pi.Size)
	if err != nil {
		t.Fatal(err)
	}
	var data int64
	for _, e := range exts {
		data += (e.Len + format.BlockSize - 1) / format.BlockSize
	}
	if data > nonZero {
		t.Fatalf("%s: %d blocks of data for %d non-zero blocks: not sparse", pi.Path, data, nonZero)
	}
}

// TestPromoteLatest: the materialised files equal the latest point's export
// and their roots wire.HashImage; failover.json refuses applies and seed
// commits; every point stays readable; a second Promote is idempotent and one
// of another kind is refused.
func TestPromoteLatest(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s, a, b, rng := foStore(t, ReplicaOptions{}, 1)
	before := exports(t, s.rep, s.group)
	dst := t.TempDir()
	out, err := s.rep.Promote(ctx, s.group, "", "planned", "hostA", dst)
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != 2 {
		t.Fatalf("%d images promoted", len(out))
	}
	for _, pi := range out {
		ti := map[string]*tImage{a.idString(): a, b.idString(): b}[pi.ID]
		if ti == nil || pi.Name != ti.name || pi.Seq != ti.seq || pi.Generation != ti.gen+1 || pi.Path != filepath.Join(dst, pi.ID+".img") {
			t.Fatalf("promoted %+v", pi)
		}
		checkPromoted(t, pi, before["4"][pi.ID])
		if w := (want{int64(len(ti.data)), blake3.Sum256(ti.data)}); w != before["4"][pi.ID] {
			t.Fatal("export differs from the model")
		}
	}
	st, ok, err := s.rep.Failover(s.group)
	if err != nil || !ok || st.Point != "4" || st.Kind != "planned" || st.Peer != "hostA" || len(st.Images) != 2 || st.Images[0].Generation != st.Images[0].FromGeneration+1 {
		t.Fatalf("Failover: %+v %v %v", st, ok, err)
	}
	if !fileExists(filepath.Join(s.dir, "groups", s.group, "failover.json")) {
		t.Fatal("no failover.json")
	}
	gs, _ := s.rep.Status()
	if len(gs) != 1 || gs[0].FailedOver == nil || gs[0].FailedOver.Point != "4" {
		t.Fatalf("status does not show the failover: %+v", gs)
	}
	// No replication into the group.
	pa, _ := a.cycle(t, s.cyc, rng, [16]byte{9}, foStart.Add(time.Hour), cycOpt{nOps: 3})
	_, err = s.rep.ApplyGroup(ctx, s.group, []string{pa})
	var fe *FailedOverError
	if !errors.Is(err, ErrFailedOver) || !errors.As(err, &fe) || !strings.Contains(err.Error(), "failed over to this host at point 4") ||
		!strings.Contains(err.Error(), "standin failover reverse --group vm1") {
		t.Fatalf("apply after promote: %v", err)
	}
	if he := classify(err); he.status != http.StatusConflict || he.code != "failed_over" {
		t.Fatalf("classify: %d %s", he.status, he.code)
	}
	si := SeedImage{Group: s.group, Name: a.name, ID: a.idString(), Generation: a.gen, Seq: a.seq, Size: int64(len(a.data)), CutTime: foStart}
	if _, err := s.rep.CommitSeed(s.group, []SeedImage{si}, Retention{}); !errors.Is(err, ErrFailedOver) {
		t.Fatalf("seed commit after promote: %v", err)
	}
	// History kept: every point reads, exports and verifies as before.
	s.check(true, true)
	if got := exports(t, s.rep, s.group); fmt.Sprint(got) != fmt.Sprint(before) {
		t.Fatal("exports changed by the promotion")
	}
	if pins, _ := s.rep.Pins(s.group); len(pins) != 0 {
		t.Fatalf("pins left: %+v", pins)
	}
	// Idempotent: the same point and kind re-materialise.
	os.Remove(out[0].Path)
	out2, err := s.rep.Promote(ctx, s.group, "latest", "planned", "hostA", dst)
	if err != nil || len(out2) != 2 || out2[0].Root != out[0].Root || out2[1].Root != out[1].Root {
		t.Fatalf("second promote: %v %+v", err, out2)
	}
	checkPromoted(t, out2[0], before["4"][out2[0].ID])
	if st2, _, _ := s.rep.Failover(s.group); !st2.Time.Equal(st.Time) {
		t.Fatal("second promote rewrote failover.json")
	}
	if _, err := s.rep.Promote(ctx, s.group, "", "unplanned", "", dst); !errors.Is(err, ErrFailedOver) {
		t.Fatalf("promote of another kind: %v", err)
	}
	if _, err := s.rep.Promote(ctx, s.group, "3", "planned", "", dst); !errors.Is(err, ErrFailedOver) {
		t.Fatalf("promote of another point: %v", err)
	}
	// The state survives reopening.
	s.reopen(s.o)
	if _, ok, _ := s.rep.Failover(s.group); !ok {
		t.Fatal("failover state lost on reopen")
	}
	if _, err := s.rep.ApplyGroup(ctx, s.group, []string{pa}); !errors.Is(err, ErrFailedOver) {
		t.Fatalf("apply after reopen: %v", err)
	}
	// Unpromote: replication resumes.
	if err := s.rep.Unpromote(s.group); err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := s.rep.Failover(s.group); ok || fileExists(filepath.Join(s.dir, "groups", s.group, "failover.json")) {
		t.Fatal("Unpromote left the failover state")
	}
	a, b = foApply(t, s, rng, 5, a, b, cycOpt{nOps: 5}, cycOpt{nOps: 5})
	s.check(false, true)
}

// TestPromoteOlderPoint: promoting a point that is not the latest gives that
// point's content (read through the undo logs).
func TestPromoteOlderPoint(t *testing.T) {
	t.Parallel()
	s, _, _, _ := foStore(t, ReplicaOptions{}, 2)
	out, err := s.rep.Promote(context.Background(), s.group, "2", "unplanned", "", t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != 2 {
		t.Fatalf("%d images", len(out))
	}
	for _, pi := range out {
		w := s.points["2"][pi.ID]
		if w == s.points["4"][pi.ID] {
			t.Fatal("the test needs points 2 and 4 to differ")
		}
		checkPromoted(t, pi, w)
		if st, _, _ := s.rep.ImageState(s.group, pi.ID); pi.Generation != st.Generation+1 {
			t.Fatalf("generation %d, held %d", pi.Generation, st.Generation)
		}
	}
	if st, ok, _ := s.rep.Failover(s.group); !ok || st.Point != "2" || st.Kind != "unplanned" {
		t.Fatalf("failover state %+v", st)
	}
	s.check(true, true)
}

// TestPromoteMismatch: a damaged block of latest.img fails the promotion with
// ErrMismatch; failover.json is removed again and nothing is left in the
// destination; replication continues.
func TestPromoteMismatch(t *testing.T) {
	t.Parallel()
	s, a, b, rng := foStore(t, ReplicaOptions{}, 3)
	img := filepath.Join(s.dir, "groups", s.group, "images", b.idString(), "latest.img")
	data, _ := os.ReadFile(img)
	i := bytes.LastIndexFunc(data, func(r rune) bool { return r != 0 })
	f, _ := os.OpenFile(img, os.O_RDWR, 0)
	f.WriteAt([]byte{data[i] ^ 0x10}, int64(i))
	f.Close()
	dst := t.TempDir()
	_, err := s.rep.Promote(context.Background(), s.group, "", "planned", "", dst)
	if !errors.Is(err, ErrMismatch) {
		t.Fatalf("promote of a damaged replica: %v", err)
	}
	if _, ok, _ := s.rep.Failover(s.group); ok || fileExists(filepath.Join(s.dir, "groups", s.group, "failover.json")) {
		t.Fatal("failover.json left after a failed promotion")
	}
	if ents, _ := os.ReadDir(dst); len(ents) != 0 {
		t.Fatalf("destination not empty: %v", ents)
	}
	f, _ = os.OpenFile(img, os.O_RDWR, 0)
	f.WriteAt([]byte{data[i]}, int64(i))
	f.Close()
	foApply(t, s, rng, 5, a, b, cycOpt{nOps: 5}, cycOpt{nOps: 5})
	s.check(false, true)
	// A cancelled promotion also leaves nothing.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := s.rep.Promote(ctx, s.group, "", "planned", "", dst); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled promote: %v", err)
	}
	if _, ok, _ := s.rep.Failover(s.group); ok {
		t.Fatal("failover.json left after a cancelled promotion")
	}
}

// randomFile writes a file of size bytes, every fourth block a hole, and
// returns its content.
func randomFile(t *testing.T, path string, rng *rand.Rand, size int) []byte {
	t.Helper()
	data := make([]byte, size)
	for i := range data {
		if (i/format.BlockSize)%4 != 1 {
			data[i] = byte(rng.Uint32())
		}
	}
	writeSparse(t, path, data)
	return data
}

func writeSparse(t *testing.T, path string, data []byte) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(int64(len(data))); err != nil {
		t.Fatal(err)
	}
	for off := 0; off < len(data); off += format.BlockSize {
		blk := data[off:min(len(data), off+format.BlockSize)]
		if !isZero(blk) {
			if _, err := f.WriteAt(blk, int64(off)); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// modifyFile changes random blocks of the file at path (data, zeros) and
// resizes it to size; returns the new content.
func modifyFile(t *testing.T, path string, rng *rand.Rand, size int, changes int) []byte {
	t.Helper()
	old, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, size)
	copy(data, old)
	nb := (size + format.BlockSize - 1) / format.BlockSize
	for i := 0; i < changes; i++ {
		off := rng.IntN(nb) * format.BlockSize
		blk := data[off:min(size, off+format.BlockSize)]
		if rng.IntN(4) == 0 {
			clear(blk)
		} else {
			for k := range blk {
				blk[k] = byte(rng.Uint32())
			}
		}
	}
	os.Remove(path)
	writeSparse(t, path, data)
	return data
}

// TestAdoptNewGroup: files adopted into a group that does not exist become
// its one point (exportable equal to the files, verified); the sources are
// moved; the next delta of the adopted generation applies, and a promotion of
// the result (several runs of blocks) equals the model. Both the hard-link
// and the copy path (across filesystems).
func TestAdoptNewGroup(t *testing.T) {
	for _, mode := range []string{"link", "copy"} {
		t.Run(mode, func(t *testing.T) {
			if mode == "copy" {
				linkFile = func(string, string) error { return &os.LinkError{Op: "link", Err: syscall.EXDEV} }
				defer func() { linkFile = os.Link }()
			}
			ctx := context.Background()
			s := &tStore{t: t, dir: t.TempDir(), cyc: t.TempDir(), group: "vm2", points: map[string]map[string]want{}}
			s.open()
			t.Cleanup(func() { s.rep.Close() })
			rng := rand.New(rand.NewPCG(4, 4))
			src := t.TempDir()
			a, b := newTImage(0x41, "a.img"), newTImage(0x42, "b.img")
			a.gen, a.seq, a.have = 3, 17, true
			b.gen, b.seq, b.have = 3, 17, true
			pa, pb := filepath.Join(src, "a.img"), filepath.Join(src, "b.img")
			a.data = randomFile(t, pa, rng, 600*format.BlockSize+123)
			b.data = randomFile(t, pb, rng, 40*format.BlockSize)
			// b comes with its hashes (as the primary's tracker would give them).
			hb := filepath.Join(src, "b.hashes")
			hf, _ := os.Create(hb)
			bf, _ := os.Open(pb)
			if _, err := wire.HashImage(ctx, bf, int64(len(b.data)), hf); err != nil {
				t.Fatal(err)
			}
			bf.Close()
			hf.Close()
			cut := foStart.Add(-time.Hour)
			res, err := s.rep.Adopt(s.group, []AdoptImage{
				{ID: a.idString(), Name: a.name, Generation: 3, Seq: 17, Size: int64(len(a.data)), Path: pa, CutTime: cut},
				{ID: b.idString(), Name: b.name, Generation: 3, Seq: 17, Size: int64(len(b.data)), Path: pb, Hashes: hb, CutTime: cut},
			}, Retention{AnyPointWindow: time.Hour})
			if err != nil {
				t.Fatal(err)
			}
			if res.Point != "1" || !res.Time.Equal(cut) {
				t.Fatalf("adopt: %+v", res)
			}
			if fileExists(pa) || fileExists(pb) {
				t.Fatal("adopted files not moved")
			}
			if !fileExists(hb) {
				t.Fatal("the hashes file was removed")
			}
			s.record(res.Point, a, b)
			s.check(true, true)
			if ps, _ := s.rep.Points(s.group); len(ps) != 1 || !ps[0].Time.Equal(cut) || ps[0].Seqs[a.idString()] != 17 {
				t.Fatalf("points %+v", ps)
			}
			if st, ok, _ := s.rep.ImageState(s.group, a.idString()); !ok || st.Generation != 3 || st.Seq != 17 || st.Name != "a.img" {
				t.Fatalf("state %+v", st)
			}
			if entries := s.rep.chunkCount(t); entries == 0 {
				t.Fatal("adopted blocks not in the chunk index")
			}
			// The next delta (generation 3, seq 18).
			pa2, na := a.cycle(t, s.cyc, rng, [16]byte{1}, cut.Add(time.Minute), cycOpt{nOps: 30, resize: true})
			pb2, nb := b.cycle(t, s.cyc, rng, [16]byte{1}, cut.Add(time.Minute), cycOpt{nOps: 10})
			res, err = s.rep.ApplyGroup(ctx, s.group, []string{pa2, pb2})
			if err != nil || res.Point != "2" {
				t.Fatalf("delta after adopt: %v %+v", err, res)
			}
			s.record(res.Point, na, nb)
			s.check(true, true)
			out, err := s.rep.Promote(ctx, s.group, "", "planned", "", t.TempDir())
			if err != nil {
				t.Fatal(err)
			}
			for _, pi := range out {
				checkPromoted(t, pi, s.points["2"][pi.ID])
			}
		})
	}
}

// chunkCount counts the chunk index's entries.
func (r *Replica) chunkCount(t *testing.T) int64 {
	t.Helper()
	st, err := r.ChunkIndexStats()
	if err != nil {
		t.Fatal(err)
	}
	return int64(st.Entries)
}

// adoptCase is a failed-over group and the files a failback adopts into it:
// a (grown, changed), b (shrunk, changed) and c, an image the group did not
// hold.
type adoptCase struct {
	s             *tStore
	a, b, c       *tImage // the models of the adopted files
	rng           *rand.Rand
	imgs          []AdoptImage
	before        map[string]map[string]want // every point's exports before
	promoted, gen uint64
}

func newAdoptCase(t *testing.T, o ReplicaOptions, seed uint64) *adoptCase {
	t.Helper()
	s, a, b, rng := foStore(t, o, seed)
	out, err := s.rep.Promote(context.Background(), s.group, "", "unplanned", "hostA", t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ac := &adoptCase{s: s, rng: rng, before: exports(t, s.rep, s.group)}
	ac.gen = out[0].Generation
	cut := foStart.Add(5 * time.Hour)
	for _, pi := range out {
		ti := map[string]*tImage{a.idString(): a, b.idString(): b}[pi.ID]
		size := int(pi.Size) + 23*format.BlockSize + 77
		if ti == b {
			size = max(int(pi.Size)*3/4-1000, format.BlockSize+1)
		}
		m := *ti
		m.gen, m.seq = pi.Generation, pi.Seq+5
		m.data = modifyFile(t, pi.Path, rng, size, 12)
		if ti == a {
			ac.a = &m
		} else {
			ac.b = &m
		}
		ac.imgs = append(ac.imgs, AdoptImage{ID: pi.ID, Name: pi.Name, Generation: m.gen, Seq: m.seq, Size: int64(size), Path: pi.Path, CutTime: cut})
	}
	ac.c = newTImage(0x33, "c.img")
	ac.c.gen, ac.c.seq, ac.c.have = 1, 9, true
	pc := filepath.Join(t.TempDir(), "c.img")
	ac.c.data = randomFile(t, pc, rng, 30*format.BlockSize+5)
	ac.imgs = append(ac.imgs, AdoptImage{ID: ac.c.idString(), Name: "c.img", Generation: 1, Seq: 9, Size: int64(len(ac.c.data)), Path: pc, CutTime: cut})
	return ac
}

// checkBefore: the group is exactly as before the adopt.
func (ac *adoptCase) checkBefore(t *testing.T) {
	t.Helper()
	s := ac.s
	if _, ok, _ := s.rep.Failover(s.group); !ok {
		t.Fatal("failover state lost")
	}
	if got := exports(t, s.rep, s.group); fmt.Sprint(got) != fmt.Sprint(ac.before) {
		t.Fatalf("points changed: %v", got)
	}
	for _, ti := range []*tImage{ac.a, ac.b, ac.c} {
		for _, im := range ac.imgs {
			if im.ID == ti.idString() {
				if fileWant(t, im.Path) != (want{int64(len(ti.data)), blake3.Sum256(ti.data)}) {
					t.Fatalf("source %s changed", im.Path)
				}
			}
		}
	}
	ac.checkClean(t)
}

// checkAfter: the adopted files are the newest point, history unchanged.
func (ac *adoptCase) checkAfter(t *testing.T) string {
	t.Helper()
	s := ac.s
	if _, ok, _ := s.rep.Failover(s.group); ok || fileExists(filepath.Join(s.dir, "groups", s.group, "failover.json")) {
		t.Fatal("failover state left after adopt")
	}
	ps, err := s.rep.Points(s.group)
	if err != nil {
		t.Fatal(err)
	}
	if len(ps) != len(ac.before)+1 || ps[len(ps)-1].ID != "5" {
		t.Fatalf("points after adopt: %+v", ps)
	}
	got := exports(t, s.rep, s.group)
	for id, w := range ac.before {
		if fmt.Sprint(got[id]) != fmt.Sprint(w) {
			t.Fatalf("point %s changed by the adopt", id)
		}
	}
	s.record("5", ac.a, ac.b, ac.c)
	s.check(true, true)
	for _, im := range ac.imgs {
		if fileExists(im.Path) {
			t.Fatalf("adopted %s still there", im.Path)
		}
	}
	for _, ti := range []*tImage{ac.a, ac.b, ac.c} {
		if st, ok, _ := s.rep.ImageState(s.group, ti.idString()); !ok || st.Generation != ti.gen || st.Seq != ti.seq {
			t.Fatalf("image %s: state %+v, want generation %d seq %d", ti.name, st, ti.gen, ti.seq)
		}
	}
	ac.checkClean(t)
	return "5"
}

// checkClean: no commit record, staging or undo log beyond the last point.
func (ac *adoptCase) checkClean(t *testing.T) {
	t.Helper()
	gdir := filepath.Join(ac.s.dir, "groups", ac.s.group)
	if fileExists(filepath.Join(gdir, "adopt.json")) || fileExists(filepath.Join(gdir, "adopt")) {
		t.Fatal("adopt record or staging left")
	}
	next, _, _ := ac.s.rep.PointsVersion(ac.s.group)
	logs, _ := filepath.Glob(filepath.Join(gdir, "images", "*", "undo", "*"))
	for _, l := range logs {
		_, to, ok := parseUndoName(filepath.Base(l))
		if !ok || to >= next {
			t.Fatalf("undo file %s left (next point %d)", l, next)
		}
	}
}

// continueAfter applies a delta of the adopted generation (seq+1), then a
// base of the next generation, and checks every point.
func (ac *adoptCase) continueAfter(t *testing.T) {
	t.Helper()
	s := ac.s
	cut := foStart.Add(6 * time.Hour)
	pa, na := ac.a.cycle(t, s.cyc, ac.rng, [16]byte{0xa1}, cut, cycOpt{nOps: 20, resize: true})
	pb, nb := ac.b.cycle(t, s.cyc, ac.rng, [16]byte{0xa1}, cut, cycOpt{nOps: 20})
	pc, nc := ac.c.cycle(t, s.cyc, ac.rng, [16]byte{0xa1}, cut, cycOpt{nOps: 20})
	res, err := s.rep.ApplyGroup(context.Background(), s.group, []string{pa, pb, pc})
	if err != nil {
		t.Fatalf("delta after adopt: %v", err)
	}
	s.record(res.Point, na, nb, nc)
	// failback after an unplanned failover: a base of the next generation
	cut = cut.Add(time.Minute)
	pa, na2 := na.cycle(t, s.cyc, ac.rng, [16]byte{0xa2}, cut, cycOpt{base: true})
	pb, nb2 := nb.cycle(t, s.cyc, ac.rng, [16]byte{0xa2}, cut, cycOpt{nOps: 5})
	res, err = s.rep.ApplyGroup(context.Background(), s.group, []string{pa, pb})
	if err != nil {
		t.Fatalf("base of generation %d after adopt: %v", na2.gen, err)
	}
	s.record(res.Point, na2, nb2, nc)
	s.check(true, true)
}

// TestAdoptFailedOverGroup: after an (unplanned) promotion, modified files
// adopted into the failed-over group become its newest point; every older
// point exports exactly what it did; failover.json is gone; a delta of the
// new generation and a base of the next apply. Adopting again is refused
// (older generation/cut), and an adopt into a group that holds a newer
// generation changes nothing.
func TestAdoptFailedOverGroup(t *testing.T) {
	t.Parallel()
	ac := newAdoptCase(t, ReplicaOptions{}, 5)
	res, err := ac.s.rep.Adopt(ac.s.group, ac.imgs, Retention{})
	if err != nil {
		t.Fatal(err)
	}
	if res.Point != "5" || res.UndoBytes == 0 {
		t.Fatalf("adopt: %+v", res)
	}
	ac.checkAfter(t)
	// The retention policy was kept (zero Retention).
	if gs, _ := ac.s.rep.Status(); gs[0].Retention.AnyPointWindow != 1000*time.Hour {
		t.Fatalf("retention changed: %+v", gs[0].Retention)
	}
	ac.continueAfter(t)
	// Not failed over any more: an adopt of an older generation is refused
	// and changes nothing.
	before := exports(t, ac.s.rep, ac.s.group)
	p := filepath.Join(t.TempDir(), "old.img")
	randomFile(t, p, ac.rng, 8*format.BlockSize)
	_, err = ac.s.rep.Adopt(ac.s.group, []AdoptImage{{ID: ac.a.idString(), Name: "a.img", Generation: ac.gen, Seq: 1000, Size: 8 * format.BlockSize, Path: p, CutTime: foStart.Add(7 * time.Hour)}}, Retention{})
	if !errors.Is(err, ErrReplay) {
		t.Fatalf("adopt of an older generation: %v", err)
	}
	if !fileExists(p) || fmt.Sprint(exports(t, ac.s.rep, ac.s.group)) != fmt.Sprint(before) {
		t.Fatal("a refused adopt changed something")
	}
	ac.checkClean(t)
	ac.s.reopen(ac.s.o)
	ac.s.check(true, true)
}

// TestAdoptCrash crashes an adopt into a failed-over group (two images held,
// one new) at every step, reopens, and checks the group is exactly as before
// (then the adopt is retried) or exactly as after; then replication goes on.
func TestAdoptCrash(t *testing.T) {
	t.Parallel()
	stages := map[string]bool{}
	var forward, back int
	for n := 1; ; n++ {
		var calls atomic.Int64
		var armed atomic.Bool
		var stage atomic.Value
		o := ReplicaOptions{testHook: func(st string) error {
			if armed.Load() && calls.Add(1) == int64(n) {
				stage.Store(st)
				return errCrash
			}
			return nil
		}}
		ac := newAdoptCase(t, o, 100+uint64(n))
		armed.Store(true)
		_, err := ac.s.rep.Adopt(ac.s.group, ac.imgs, Retention{})
		armed.Store(false)
		if err == nil {
			ac.s.rep.Close()
			break // every step has crashed once
		}
		if !errors.Is(err, errCrash) {
			t.Fatalf("n=%d: %v", n, err)
		}
		st := stage.Load().(string)
		stages[st] = true
		ac.s.reopen(ReplicaOptions{Now: ac.s.o.Now})
		if _, ok, _ := ac.s.rep.Failover(ac.s.group); ok {
			back++
			ac.checkBefore(t)
			if _, err := ac.s.rep.Adopt(ac.s.group, ac.imgs, Retention{}); err != nil {
				t.Fatalf("n=%d (%s): adopt after the rollback: %v", n, st, err)
			}
		} else {
			forward++
		}
		ac.checkAfter(t)
		ac.continueAfter(t)
		ac.s.rep.Close()
	}
	var got []string
	for st := range stages {
		got = append(got, st)
	}
	slices.Sort(got)
	t.Logf("crashed at %v: %d rolled back, %d forward", got, back, forward)
	for _, st := range []string{"undo-tmp", "adopt-undo", "adopt-commit", "adopt-rename", "adopt-source", "adopt-state", "adopt-point"} {
		if !stages[st] {
			t.Errorf("stage %s never crashed", st)
		}
	}
	if back == 0 || forward == 0 {
		t.Errorf("%d rollbacks, %d roll-forwards", back, forward)
	}
}

// TestFailedOverServerRefuses: through the real HTTPS API (paired primary,
// mutual TLS), every replication request for a failed-over group is refused
// with 409 "failed_over" and the explanation; group state is still served,
// other groups replicate; after Unpromote the group is served again.
func TestFailedOverServerRefuses(t *testing.T) {
	t.Parallel()
	s, a, _, _ := foStore(t, ReplicaOptions{}, 6)
	if err := s.rep.EnsureGroup("vm2", Retention{}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.rep.Promote(context.Background(), s.group, "", "planned", "", t.TempDir()); err != nil {
		t.Fatal(err)
	}
	srv, auth, addr := tlsServer(t, s.rep, t.TempDir())
	c := pairTLS(t, auth, addr, "*", "prim")
	id := a.idString()
	do := func(method, path, body string) (int, wire.Error) {
		t.Helper()
		return c.do(method, path, []byte(body))
	}
	reqs := func(group string) [][3]string {
		up := fmt.Sprintf("/groups/%s/uploads/%s/%d/%d", group, id, a.gen, a.seq+1)
		return [][3]string{
			{"GET", up, ""},
			{"PUT", up + "?offset=0&total=10&name=a.img", "0123456789"},
			{"DELETE", up + "?name=a.img", ""},
			{"POST", "/groups/" + group + "/commit", fmt.Sprintf(`{"cycles":[{"id":%q,"generation":%d,"seq":%d}]}`, id, a.gen, a.seq+1)},
			{"POST", "/groups/" + group + "/seed", fmt.Sprintf(`{"images":[{"id":%q,"name":"a.img","generation":%d,"seq":%d}]}`, id, a.gen, a.seq)},
			{"POST", fmt.Sprintf("/groups/%s/images/%s/held?name=a.img&blocks=10", group, id), ""},
			{"GET", fmt.Sprintf("/groups/%s/images/%s/regions?name=a.img&blocks=10&from=0&count=1", group, id), ""},
		}
	}
	for _, rq := range reqs(s.group) {
		code, we := do(rq[0], rq[1], rq[2])
		if code != http.StatusConflict || we.Code != "failed_over" || !strings.Contains(we.Error, "failed over to this host at point 4") ||
			!strings.Contains(we.Error, "standin failover reverse --group vm1") {
			t.Fatalf("%s %s: %d %+v", rq[0], rq[1], code, we)
		}
	}
	if code, we := do("GET", "/groups/"+s.group, ""); code != http.StatusOK {
		t.Fatalf("group state of a failed-over group: %d %+v", code, we)
	}
	// Another group is served (the same requests get other answers).
	if code, we := do("GET", fmt.Sprintf("/groups/vm2/uploads/%s/1/1", id), ""); code != http.StatusOK {
		t.Fatalf("upload state of another group: %d %+v", code, we)
	}
	for _, rq := range reqs("vm2") {
		if _, we := do(rq[0], rq[1], rq[2]); we.Code == "failed_over" {
			t.Fatalf("%s %s refused as failed over", rq[0], rq[1])
		}
	}
	hl, _ := srv.Health()
	for _, h := range hl {
		if (h.Group == s.group) != (h.FailedOver != nil) || (h.Group == s.group && h.Health != "Warning") {
			t.Fatalf("health %+v", h)
		}
	}
	if err := s.rep.Unpromote(s.group); err != nil {
		t.Fatal(err)
	}
	if code, we := do("GET", fmt.Sprintf("/groups/%s/uploads/%s/%d/%d", s.group, id, a.gen, a.seq+1), ""); code != http.StatusOK {
		t.Fatalf("upload state after Unpromote: %d %+v", code, we)
	}
}

// writeExactCycle writes the next cycle of ti with exactly the given size and
// data blocks (a base if base or ti has none yet) and returns the new model.
func writeExactCycle(t *testing.T, dir string, ti *tImage, base bool, size uint64, blocks map[uint64]byte, cut time.Time) (string, *tImage) {
	t.Helper()
	next := *ti
	base = base || !ti.have
	data := make([]byte, size)
	if base {
		if ti.have {
			next.gen++
		}
		next.seq = 0
	} else {
		next.seq++
		copy(data, ti.data)
	}
	h := format.Header{ImageID: ti.id, Generation: next.gen, Seq: next.seq, Parent: next.seq - 1, CutTime: cut, ImageSize: size,
		GroupCut: [16]byte{byte(next.seq), 0xee}, Name: ti.name}
	if base {
		h.Flags, h.Parent = format.FlagBase, format.NoParent
	}
	p := filepath.Join(dir, fmt.Sprintf("%s-g%d-s%d.cyc", ti.idString(), next.gen, next.seq))
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	w, err := format.NewWriter(f, h, format.WriterOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var bs []uint64
	for b := range blocks {
		bs = append(bs, b)
	}
	slices.Sort(bs)
	for _, b := range bs {
		blk := bytes.Repeat([]byte{blocks[b]}, format.BlockSize)
		if err := w.WriteBlocks(b, blk); err != nil {
			t.Fatal(err)
		}
		copy(data[b*format.BlockSize:min(size, (b+1)*format.BlockSize)], blk)
	}
	if _, err := w.Close(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	next.data, next.have = data, true
	return p, &next
}

// TestAdoptGrowAfterShrink: an image shrank after point 1 (its blocks past
// the new end were holes, so no undo entry holds them); the adopted file grows
// it again with data there. Point 1 must still read those blocks as zero:
// undo N holds zero entries for the blocks past the old end that the adopted
// file fills.
func TestAdoptGrowAfterShrink(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s := newTStore(t, ReplicaOptions{Now: func() time.Time { return foStart.Add(time.Hour) }}, Retention{AnyPointWindow: 1000 * time.Hour})
	a := newTImage(0x51, "a.img")
	p, a1 := writeExactCycle(t, s.cyc, a, true, 64*format.BlockSize, map[uint64]byte{0: 1, 5: 2, 9: 3}, foStart)
	res, err := s.rep.Apply(ctx, s.group, p)
	if err != nil {
		t.Fatal(err)
	}
	s.record(res.Point, a1)
	p, a2 := writeExactCycle(t, s.cyc, a1, false, 16*format.BlockSize, map[uint64]byte{1: 4}, foStart.Add(time.Minute))
	if res, err = s.rep.Apply(ctx, s.group, p); err != nil {
		t.Fatal(err)
	}
	s.record(res.Point, a2)
	out, err := s.rep.Promote(ctx, s.group, "", "unplanned", "", t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	m := *a2
	m.gen, m.seq = out[0].Generation, out[0].Seq+1
	m.data = slices.Clone(a2.data)
	m.data = append(m.data, make([]byte, 48*format.BlockSize)...)
	copy(m.data[40*format.BlockSize:], bytes.Repeat([]byte{9}, format.BlockSize))
	writeSparse(t, out[0].Path, m.data)
	res, err = s.rep.Adopt(s.group, []AdoptImage{{ID: out[0].ID, Name: m.name, Generation: m.gen, Seq: m.seq, Size: int64(len(m.data)), Path: out[0].Path, CutTime: foStart.Add(2 * time.Minute)}}, Retention{})
	if err != nil {
		t.Fatal(err)
	}
	s.record(res.Point, &m)
	s.check(true, true)
	p, a4 := writeExactCycle(t, s.cyc, &m, false, 70*format.BlockSize, map[uint64]byte{41: 7, 69: 8}, foStart.Add(3*time.Minute))
	if res, err = s.rep.Apply(ctx, s.group, p); err != nil {
		t.Fatal(err)
	}
	s.record(res.Point, a4)
	s.check(true, true)
}
