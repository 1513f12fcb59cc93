package integration

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestScrubWarmStandbyBitFlip: B keeps a warm standby copy of A's disk. A bit
// flips in that copy. 'points verify --prepared' reports it, the scrub finds
// it (health Critical, the copy dropped), and the unplanned failover after
// A dies promotes the latest point's content — copied from the store, not
// the damaged copy.
func TestScrubWarmStandbyBitFlip(t *testing.T) {
	requireRoot(t)
	const size = 16 << 20
	ab, _, hs := twoHosts(t, size, 9, "a", "b")
	a, b := hs[0], hs[1]
	b.Rep.Stop()
	b.Rep.Args = append(b.Rep.Args, "--warm-standby", "--scrub-interval", "0")
	b.Rep.Restart()
	ab.now()
	ab.writeRandom("disk.img", 30, 8, 0, size)
	ab.now()
	dir := filepath.Join(b.PStore, "failover", "vm1")
	if !waitFor(60*time.Second, 100*time.Millisecond, func() bool {
		r := standin(cmdTimeout, "points", "verify", "--store", b.RStore, "--group", "vm1", "--prepared")
		ps := listPoints(t, b.RStore, "vm1")
		return r.Code == 0 && strings.Contains(r.Stdout, "point "+ps[len(ps)-1].Point)
	}) {
		t.Fatal("no warm standby copy at the latest point")
	}
	mustStandin(t, "points", "scrub", "--store", b.RStore)
	if h, rs := replicaHealth(t, b.RStore, "vm1"); h != "Normal" {
		t.Fatalf("clean scrub: health %s %v", h, rs)
	}
	pres, _ := filepath.Glob(filepath.Join(dir, "*.img.pre"))
	if len(pres) != 1 {
		t.Fatalf("warm standby files %v", pres)
	}
	data, err := os.ReadFile(pres[0])
	if err != nil {
		t.Fatal(err)
	}
	i := strings.IndexFunc(string(data[:1<<20]), func(r rune) bool { return r != 0 })
	flipFileByte(t, pres[0], int64(i))

	if r := standin(cmdTimeout, "points", "verify", "--store", b.RStore, "--group", "vm1", "--prepared"); r.Code == 0 || !strings.Contains(r.Stdout, "MISMATCH") {
		t.Errorf("points verify --prepared of a flipped copy: %s", r)
	}
	if r := standin(cmdTimeout, "points", "scrub", "--store", b.RStore); r.Code == 0 || !strings.Contains(r.Stdout, "Critical") {
		t.Errorf("scrub of a flipped copy: %s", r)
	}
	if h, rs := replicaHealth(t, b.RStore, "vm1"); h != "Critical" || !strings.Contains(strings.Join(rs, " "), "promotion copy") {
		t.Errorf("after the scrub: health %s %v, want Critical naming the promotion copy", h, rs)
	}
	latest := exportHashes(t, b.RStore, "vm1", "latest")["disk.img"]
	a.Pri.Kill()
	if err := teardownMount(a.Mnt); err != nil {
		t.Fatal(err)
	}
	res := failoverCmd(t, "unplanned", "--store", b.RStore, "--group", "vm1")
	if d := res.step("promote").Detail; strings.Contains(d, "warm standby") {
		t.Errorf("promoted from the damaged warm standby copy: %q", d)
	}
	if got := b3File(t, b.image("disk.img")); got != latest {
		t.Fatalf("promoted image %.16s, latest point %.16s", got, latest)
	}
}
