package integration

import (
	"os"
	"path/filepath"
	"testing"
)

// TestReplRecreatedDisk: b.img is deleted through the primary's mount and
// created again under the same name (a new image to the tracker). The
// replica retires the old image: the export of the latest point holds
// exactly a.img and the new b.img (BLAKE3 of the primary's files), the
// export of the point before still holds the old b.img, and every point
// verifies.
func TestReplRecreatedDisk(t *testing.T) {
	e := newReplEnv(t, "vm1", imgSpec{"a.img", 16 * mib}, imgSpec{"b.img", 8 * mib})
	e.start("--interval", "1h", "--any-point-window", "24h")
	e.writeRandom("b.img", 50, 8, 0, 8*mib)
	old := e.frozen()
	e.now()
	e.checkPoint("latest", old, "before the re-creation")
	ps := listPoints(t, e.RStore, e.Group)
	before := ps[len(ps)-1].Point

	// Delete and re-create b.img (other size, other content) through the mount.
	b := filepath.Join(e.Mnt, "b.img")
	if err := os.Remove(b); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(b, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	for off := int64(0); off < 6*mib; off += int64(len(buf)) {
		fillRandom(e.rng, buf)
		if _, err := f.WriteAt(buf, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	e.writeRandom("a.img", 20, 4, 0, 16*mib)
	cur := e.frozen()
	if cur["b.img"] == old["b.img"] {
		t.Fatal("the re-created b.img has the old content")
	}
	e.now()
	e.checkPoint("latest", cur, "after the re-creation") // exactly a.img and the new b.img
	e.checkPoint(before, old, "the point before the re-creation")
	for _, p := range listPoints(t, e.RStore, e.Group) {
		verifyPoint(t, e.RStore, e.Group, p.Point)
	}
	// One more round: the old image stays retired.
	e.writeRandom("b.img", 20, 4, 0, 6*mib)
	cur = e.frozen()
	e.now()
	e.checkPoint("latest", cur, "the round after")
	if st := e.status(); st.Health != "Normal" {
		t.Errorf("health %s %v, want Normal", st.Health, st.Reasons)
	}
}
