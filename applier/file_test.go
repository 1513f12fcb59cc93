package applier

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/zeebo/blake3"

	"github.com/standin/standin/internal/format"
	"github.com/standin/standin/internal/fsutil"
)

type blocks map[uint64]byte // block → fill byte (0 = zero extent)

// writeCycle writes a cycle file with the given blocks.
func writeCycle(t *testing.T, dir string, id [16]byte, gen, seq uint64, size uint64, bs blocks) string {
	t.Helper()
	h := format.Header{ImageID: id, Generation: gen, Seq: seq, Parent: seq - 1, CutTime: time.Unix(1700000000, 0), ImageSize: size, Name: "a.img"}
	if seq == 0 {
		h.Flags, h.Parent = format.FlagBase, format.NoParent
	}
	p := filepath.Join(dir, filepathName(id, gen, seq))
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w, err := format.NewWriter(f, h, format.WriterOptions{Compress: true})
	if err != nil {
		t.Fatal(err)
	}
	for b := uint64(0); b < (size+4095)/4096; b++ {
		v, ok := bs[b]
		switch {
		case !ok:
		case v == 0:
			if err := w.WriteZero(b, 1); err != nil {
				t.Fatal(err)
			}
		default:
			if err := w.WriteBlocks(b, bytes.Repeat([]byte{v}, 4096)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if _, err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return p
}

func filepathName(id [16]byte, gen, seq uint64) string {
	return string(rune('a'+id[0])) + "-" + string(rune('0'+gen)) + "-" + string(rune('0'+seq)) + ".cyc"
}

func hashFile(t *testing.T, p string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return blake3.Sum256(b)
}

func TestApplySequence(t *testing.T) {
	dir := t.TempDir()
	id := [16]byte{1}
	target := filepath.Join(dir, "replica.img")
	c0 := writeCycle(t, dir, id, 1, 0, 40960, blocks{0: 1, 5: 2})
	c1 := writeCycle(t, dir, id, 1, 1, 40960+100, blocks{5: 0, 7: 3, 10: 4})
	c2 := writeCycle(t, dir, id, 1, 2, 8192, blocks{1: 5})
	if _, err := ApplyFiles(target, []string{c0, c1}); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 40960+100)
	copy(want[0:4096], bytes.Repeat([]byte{1}, 4096))
	copy(want[7*4096:], bytes.Repeat([]byte{3}, 4096))
	copy(want[10*4096:], bytes.Repeat([]byte{4}, 100)) // partial last block
	got, _ := os.ReadFile(target)
	if !bytes.Equal(got, want) {
		t.Fatal("content after cycles 0,1 differs")
	}
	h1 := hashFile(t, target)

	// idempotent: re-applying the current cycle does nothing
	res, err := ApplyFiles(target, []string{c1})
	if err != nil || !res[0].Skipped || hashFile(t, target) != h1 {
		t.Fatalf("re-apply: %v %+v", err, res)
	}
	// refusals leave the target untouched
	other := writeCycle(t, dir, [16]byte{2}, 1, 2, 8192, blocks{0: 9})
	oldGen := writeCycle(t, dir, id, 0, 2, 8192, blocks{0: 9})
	gap := writeCycle(t, dir, id, 1, 3, 8192, blocks{0: 9})
	gap4 := writeCycle(t, dir, id, 1, 4, 8192, blocks{0: 9})
	for _, c := range []struct {
		name  string
		files []string
		want  error
	}{
		{"replay", []string{c0}, ErrReplay},
		{"foreign", []string{other}, ErrForeign},
		{"old generation", []string{oldGen}, ErrForeign},
		{"gap", []string{gap}, ErrGap},
		{"gap after valid", []string{c2, c2, gap4}, ErrGap},
	} {
		if _, err := ApplyFiles(target, c.files); !errors.Is(err, c.want) {
			t.Errorf("%s: got %v, want %v", c.name, err, c.want)
		}
		if hashFile(t, target) != h1 {
			t.Fatalf("%s: target changed", c.name)
		}
	}
	// corrupt: flip one data byte; refused before anything is applied
	bad := filepath.Join(dir, "bad.cyc")
	b, _ := os.ReadFile(c2)
	b[200] ^= 0xff
	os.WriteFile(bad, b, 0o600)
	if _, err := ApplyFiles(target, []string{bad}); !errors.Is(err, format.ErrCorrupt) {
		t.Fatalf("corrupt: %v", err)
	}
	if hashFile(t, target) != h1 {
		t.Fatal("corrupt cycle changed the target")
	}
	// shrink
	if _, err := ApplyFiles(target, []string{c2}); err != nil {
		t.Fatal(err)
	}
	got, _ = os.ReadFile(target)
	if len(got) != 8192 || got[4096] != 5 || got[0] != 1 {
		t.Fatalf("after shrink: len %d", len(got))
	}
}

func TestNoBaseRefused(t *testing.T) {
	dir := t.TempDir()
	c1 := writeCycle(t, dir, [16]byte{1}, 1, 1, 4096, blocks{0: 1})
	target := filepath.Join(dir, "t.img")
	os.WriteFile(target, []byte("precious"), 0o600)
	if _, err := ApplyFiles(target, []string{c1}); !errors.Is(err, ErrNoBase) {
		t.Fatalf("got %v", err)
	}
	if b, _ := os.ReadFile(target); string(b) != "precious" {
		t.Fatal("target changed")
	}
}

// TestInterruptedApplyCompletes: a crash mid-apply leaves the state
// "applying k"; only cycle k is accepted, and applying it completes.
func TestInterruptedApplyCompletes(t *testing.T) {
	dir := t.TempDir()
	id := [16]byte{1}
	target := filepath.Join(dir, "replica.img")
	c0 := writeCycle(t, dir, id, 1, 0, 16384, blocks{0: 1})
	c1 := writeCycle(t, dir, id, 1, 1, 16384, blocks{1: 2, 2: 3})
	c2 := writeCycle(t, dir, id, 1, 2, 16384, blocks{3: 4})
	if _, err := ApplyFiles(target, []string{c0}); err != nil {
		t.Fatal(err)
	}
	// simulate: state says applying 1, and half of cycle 1 is in the image
	st, _, _ := ReadState(target)
	st.Seq, st.Applying = 1, true
	if err := writeStateForTest(target, st); err != nil {
		t.Fatal(err)
	}
	f, _ := os.OpenFile(target, os.O_RDWR, 0)
	f.WriteAt(bytes.Repeat([]byte{2}, 4096), 4096)
	f.Close()
	if _, err := ApplyFiles(target, []string{c2}); !errors.Is(err, ErrGap) {
		t.Fatalf("cycle 2 on a half-applied cycle 1: %v", err)
	}
	if _, err := ApplyFiles(target, []string{c1, c2}); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(target)
	for i, v := range []byte{1, 2, 3, 4} {
		if got[i*4096] != v {
			t.Fatalf("block %d = %d, want %d", i, got[i*4096], v)
		}
	}
	if st, _, _ := ReadState(target); st.Seq != 2 || st.Applying {
		t.Fatalf("state %+v", st)
	}
}

func writeStateForTest(target string, st State) error { return fsutil.WriteJSON(StatePath(target), st) }

// TestApplyFilesSizeChecked: the plain-file apply checks that the target's
// filesystem can hold the image once per larger size (the same cache as the
// replica's), not with a new temporary file on every call.
func TestApplyFilesSizeChecked(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "disk.img")
	id := [16]byte{0x44, 1}
	c0 := writeCycle(t, t.TempDir(), id, 1, 0, 3<<20, blocks{0: 1})
	if _, err := ApplyFiles(target, []string{c0}); err != nil {
		t.Fatal(err)
	}
	if got := sizeCacheOf(dir).ok.Load(); got < 3<<20 {
		t.Fatalf("size cache of the target's filesystem holds %d, want ≥ %d", got, 3<<20)
	}
}
