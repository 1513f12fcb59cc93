package daemon

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/standin/standin/applier"
	"github.com/standin/standin/dedup"
	"github.com/standin/standin/internal/wire"
)

// memImage is a seed source held in memory.
type memImage struct {
	name string
	id   [16]byte
	data []byte
	cut  time.Time
}

func (m memImage) Name() string                     { return m.name }
func (m memImage) ID() [16]byte                     { return m.id }
func (m memImage) Generation() uint64               { return 1 }
func (m memImage) Seq() uint64                      { return 3 }
func (m memImage) CutTime() time.Time               { return m.cut }
func (m memImage) GroupCut() [16]byte               { return [16]byte{7} }
func (m memImage) Size() int64                      { return int64(len(m.data)) }
func (m memImage) DataExtents() ([][2]int64, error) { return [][2]int64{{0, int64(len(m.data))}}, nil }
func (m memImage) ReadAt(p []byte, off int64) (int, error) {
	return bytes.NewReader(m.data).ReadAt(p, off)
}

// TestSeedImportRefusesForgedContent: the primary announces the seed it
// exported, with its manifest root. A forged seed — same group, image id,
// generation and cut, other content, unencrypted and self-consistent — is
// refused before anything is written; the real seed then imports. An
// announcement without roots (older primary) imports with a warning.
func TestSeedImportRefusesForgedContent(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	rng := rand.New(rand.NewPCG(1, 2))
	mk := func() []byte {
		b := make([]byte, 3<<20)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		return b
	}
	cut := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	id := [16]byte{0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x40, 0x77, 0x88, 1, 2, 3, 4, 5, 6, 7}
	real := memImage{name: "vm1/disk.img", id: id, data: mk(), cut: cut}
	forged := real
	forged.data = mk()
	export := func(name string, im memImage) (string, dedup.Summary) {
		to := filepath.Join(dir, name)
		s, err := dedup.Export(ctx, []string{to}, []dedup.ImageSource{im}, dedup.ExportOptions{Parity: 0.1})
		if err != nil {
			t.Fatal(err)
		}
		return to, s
	}
	realDir, sum := export("real", real)
	forgedDir, _ := export("forged", forged)
	if len(sum.Roots) != 1 {
		t.Fatalf("export summary roots %+v", sum.Roots)
	}
	rep, err := applier.OpenReplica(filepath.Join(dir, "rstore"), applier.ReplicaOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer rep.Close()
	sid := applier.SeedImageID(id)
	announce := wire.SeedExpect{GroupCut: "x", Time: cut, Images: []wire.ImageState{{ID: sid, Name: "disk.img", Generation: 1, Seq: 3}},
		Roots: map[string]string{sid: sum.Roots[0]}}
	bad := announce
	bad.Roots = map[string]string{sid: "zz"}
	if err := rep.ExpectSeed("vm1", bad); !errors.Is(err, applier.ErrBadName) {
		t.Fatalf("announcement with a malformed root: %v", err)
	}
	if err := rep.ExpectSeed("vm1", announce); err != nil {
		t.Fatal(err)
	}
	var msgs []string
	emit := func(e SeedEvent) { msgs = append(msgs, e.Message) }
	_, err = SeedImport(ctx, rep, SeedImportRequest{Paths: []string{forgedDir}}, emit)
	if !errors.Is(err, applier.ErrWrongSeed) || !strings.Contains(err.Error(), "content") {
		t.Fatalf("forged seed: %v, want a refusal naming the content", err)
	}
	if imgs, _ := rep.GroupImages("vm1"); len(imgs) != 0 {
		t.Fatalf("forged seed left images: %+v", imgs)
	}
	if _, err := SeedImport(ctx, rep, SeedImportRequest{Paths: []string{realDir}}, emit); err != nil {
		t.Fatalf("real seed: %v", err)
	}
	pr, err := rep.OpenPoint("vm1", "latest", "disk.img")
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(io.NewSectionReader(pr, 0, pr.Size()))
	if !bytes.Equal(got, real.data) {
		t.Fatal("imported image differs from the real seed")
	}

	// An older primary's announcement (no roots): imported, with a warning.
	rep2, err := applier.OpenReplica(filepath.Join(dir, "rstore2"), applier.ReplicaOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer rep2.Close()
	announce.Roots = nil
	if err := rep2.ExpectSeed("vm1", announce); err != nil {
		t.Fatal(err)
	}
	msgs = nil
	if _, err := SeedImport(ctx, rep2, SeedImportRequest{Paths: []string{realDir}}, emit); err != nil {
		t.Fatalf("seed without announced roots: %v", err)
	}
	if !strings.Contains(strings.Join(msgs, "\n"), "no content roots") {
		t.Errorf("no warning for an announcement without roots: %q", msgs)
	}
}

// TestSeedImportRefusesSwappedSeed: the volumes are swapped between the
// import's check and its import — for a forged seed, and for a seed that
// lacks one of the checked images (whose staged image would stay empty).
// Both are refused with nothing registered; the real seed then imports.
func TestSeedImportRefusesSwappedSeed(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	rng := rand.New(rand.NewPCG(3, 4))
	mk := func() []byte {
		b := make([]byte, 1<<20)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		return b
	}
	cut := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	a := memImage{name: "vm1/a.img", id: [16]byte{0xa1, 2, 3, 4, 5, 6, 0x40, 7, 0x88, 9}, data: mk(), cut: cut}
	b := memImage{name: "vm1/b.img", id: [16]byte{0xb1, 2, 3, 4, 5, 6, 0x40, 7, 0x88, 9}, data: mk(), cut: cut}
	forgedA := a
	forgedA.data = mk()
	export := func(name string, ims ...dedup.ImageSource) (string, dedup.Summary) {
		to := filepath.Join(dir, name)
		s, err := dedup.Export(ctx, []string{to}, ims, dedup.ExportOptions{Parity: 0.1})
		if err != nil {
			t.Fatal(err)
		}
		return to, s
	}
	realDir, sum := export("real", a, b)
	forgedDir, _ := export("forged", forgedA, b)
	onlyBDir, _ := export("onlyB", b)
	rep, err := applier.OpenReplica(filepath.Join(dir, "rstore"), applier.ReplicaOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer rep.Close()
	ann := wire.SeedExpect{GroupCut: "x", Time: cut, Roots: map[string]string{}}
	for i, im := range []memImage{a, b} {
		sid := applier.SeedImageID(im.id)
		ann.Images = append(ann.Images, wire.ImageState{ID: sid, Name: strings.TrimPrefix(im.name, "vm1/"), Generation: 1, Seq: 3})
		ann.Roots[sid] = sum.Roots[i]
	}
	if err := rep.ExpectSeed("vm1", ann); err != nil {
		t.Fatal(err)
	}
	// The seed is read through a symbolic link that the hook turns to
	// another seed once the real one was checked.
	link := filepath.Join(dir, "mnt")
	point := func(to string) {
		os.Remove(link)
		if err := os.Symlink(to, link); err != nil {
			t.Fatal(err)
		}
	}
	defer func() { seedImportChecked = nil }()
	emit := func(SeedEvent) {}
	for _, swap := range []struct{ name, to string }{{"forged", forgedDir}, {"missing image", onlyBDir}} {
		point(realDir)
		seedImportChecked = func() { point(swap.to) }
		_, err := SeedImport(ctx, rep, SeedImportRequest{Paths: []string{link}}, emit)
		if !errors.Is(err, applier.ErrWrongSeed) || !strings.Contains(err.Error(), "changed since it was checked") {
			t.Fatalf("%s seed swapped in after the check: %v, want a refusal", swap.name, err)
		}
		if imgs, _ := rep.GroupImages("vm1"); len(imgs) != 0 {
			t.Fatalf("%s seed swapped in after the check: registered %+v", swap.name, imgs)
		}
	}
	seedImportChecked = nil
	point(realDir)
	if _, err := SeedImport(ctx, rep, SeedImportRequest{Paths: []string{link}}, emit); err != nil {
		t.Fatalf("real seed: %v", err)
	}
	for _, im := range []memImage{a, b} {
		pr, err := rep.OpenPoint("vm1", "latest", strings.TrimPrefix(im.name, "vm1/"))
		if err != nil {
			t.Fatal(err)
		}
		got, _ := io.ReadAll(io.NewSectionReader(pr, 0, pr.Size()))
		if !bytes.Equal(got, im.data) {
			t.Fatalf("imported %s differs from the real seed", im.name)
		}
	}
}
