package integration

// Dedup-aware initial replication and hash-compare resync,
// with real daemons, real TLS on 127.0.0.1 and real ext4 images:
//
//   - TestReplDedupClone: a VM cloned from an already replicated template
//     ships only what differs (≤ 25% of its allocated bytes on the wire).
//   - TestReplResyncLostState: the tracker state is deleted and the image
//     changed behind the daemon's back; the new generation's base ships only
//     the differing blocks, recovery points are kept.
//   - TestReplResyncWindow: 'replicate resync --window' outside the window
//     does nothing, inside it repairs a divergence tracking never saw.
//
// Bytes are read from 'replicate list' (bytes_sent counts uploads and
// queries) and from a TCP proxy in front of the replica (TLS included).

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// dedupStatus is the part of 'replicate list --json' these tests read.
type dedupStatus struct {
	Group      string   `json:"group"`
	BytesSent  int64    `json:"bytes_sent"`
	DedupSaved int64    `json:"dedup_saved_bytes"`
	Resync     string   `json:"resync"`
	Health     string   `json:"health"`
	Reasons    []string `json:"reasons"`
	LastError  string   `json:"last_error"`
	Cycles     int      `json:"cycles_replicated"`
}

func dedupGroup(t *testing.T, pstore, group string) dedupStatus {
	t.Helper()
	r := mustStandin(t, "replicate", "list", "--store", pstore, "--json")
	var gs []dedupStatus
	if err := json.Unmarshal([]byte(r.Stdout), &gs); err != nil {
		t.Fatalf("replicate list --json: %v\n%s", err, r.Stdout)
	}
	for _, g := range gs {
		if g.Group == group {
			return g
		}
	}
	t.Fatalf("no group %s in %s", group, r.Stdout)
	return dedupStatus{}
}

// extTemplate builds a 64 MiB ext4 image holding a file tree (mkfs.ext4 -d).
func extTemplate(t *testing.T, dir string) string {
	t.Helper()
	tree := filepath.Join(dir, "tree")
	writeTree(t, tree, 120)
	img := filepath.Join(dir, "template.img")
	mustRun(t, cmdTimeout, "mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", "-d", tree, img, "64M")
	return img
}

// extEdit attaches img (a file on the FUSE mount) to a loop device, mounts
// its ext4, runs f, then unmounts and detaches, also on failure.
func extEdit(t *testing.T, img, mnt string, f func(root string)) {
	t.Helper()
	dev := strings.TrimSpace(mustRun(t, 30*time.Second, "losetup", "-f", "--show", img))
	defer execCmd(20*time.Second, nil, "losetup", "-d", dev)
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	mustRun(t, 30*time.Second, "mount", dev, mnt)
	mounted := true
	defer func() {
		if mounted {
			unmountTimeout(mnt, 0, 30*time.Second)
		}
	}()
	f(mnt)
	mustRun(t, time.Minute, "sync")
	if err := unmountTimeout(mnt, 0, time.Minute); err != nil {
		t.Fatalf("umount %s: %v", mnt, err)
	}
	mounted = false
}

func writeFiles(t *testing.T, root, sub string, n, size int, seed uint64) {
	t.Helper()
	d := filepath.Join(root, sub)
	if err := os.MkdirAll(d, 0o755); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i++ {
		b := make([]byte, size)
		fillPattern(b, int64(i)<<24, seed+uint64(i))
		if err := os.WriteFile(filepath.Join(d, fmt.Sprintf("f%03d", i)), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// exportCheck exports the latest point of group, compares it with the
// primary's backing file and runs fsck -n on it when ext is set.
func exportCheck(t *testing.T, rstore, group, image, primary string, ext bool) {
	t.Helper()
	out := filepath.Join(filepath.Dir(rstore), "export-"+group)
	os.RemoveAll(out)
	defer os.RemoveAll(out)
	mustStandin(t, "points", "export", "--store", rstore, "--group", group, "--to", out)
	got := filepath.Join(out, image)
	if a, b := b3File(t, got), b3File(t, primary); a != b {
		t.Errorf("group %s: replica latest %.16s, primary %.16s", group, a, b)
	}
	if ext {
		if r := execCmd(cmdTimeout, nil, "fsck.ext4", "-n", "-f", got); r.Code != 0 {
			t.Errorf("fsck -n of the replica's %s: %s", image, r)
		}
	}
}

// dedupEnv: a primary whose vm1.img is a copy of an ext4 template, a
// replica, a TCP proxy in front of it; the primary is paired through the
// proxy and directly.
type dedupEnv struct {
	dir, tmpl, pstore, mnt, rstore string
	rep                            *replicaProc
	proxy                          *tcpProxy
	pri                            *Daemon
}

func newDedupEnv(t *testing.T) *dedupEnv {
	t.Helper()
	requireRoot(t)
	requireTools(t, "mkfs.ext4", "fsck.ext4", "losetup")
	dir := testDir(t)
	e := &dedupEnv{dir: dir, tmpl: extTemplate(t, dir), pstore: filepath.Join(dir, "pstore"), mnt: filepath.Join(dir, "mnt"), rstore: filepath.Join(dir, "rstore")}
	if err := os.MkdirAll(filepath.Join(e.pstore, "images"), 0o700); err != nil {
		t.Fatal(err)
	}
	mustRun(t, time.Minute, "cp", "--sparse=always", e.tmpl, filepath.Join(e.pstore, "images", "vm1.img"))
	e.rep = startReplica(t, e.rstore)
	e.proxy = startProxy(t, e.rep.Addr)
	e.pri = startDaemon(t, e.pstore, e.mnt)
	for _, addr := range []string{e.proxy.Addr(), e.rep.Addr} {
		tok := mustStandin(t, "pair", "token", "--store", e.rstore, "--images", "*", "--json")
		var tm map[string]string
		if err := json.Unmarshal([]byte(tok.Stdout), &tm); err != nil {
			t.Fatal(err)
		}
		mustStandin(t, "pair", "join", "--store", e.pstore, "--token", tm["token"], "--replica", addr, "--name", "dedup-primary")
	}
	return e
}

func TestReplDedupClone(t *testing.T) {
	e := newDedupEnv(t)
	dir, pstore, mnt, rstore, proxy, tmpl := e.dir, e.pstore, e.mnt, e.rstore, e.proxy, e.tmpl

	// The template VM: a full initial replication (nothing to dedup against).
	mustStandin(t, "replicate", "enable", "--store", pstore, "--group", "vm1", "--images", "vm1.img", "--replica", proxy.Addr(), "--interval", "30s")
	mustStandin(t, "replicate", "now", "--store", pstore, "--group", "vm1", "--wait", "--timeout", "90s")
	alloc1 := allocatedBytes(t, filepath.Join(pstore, "images", "vm1.img"))
	st1 := dedupGroup(t, pstore, "vm1")
	t.Logf("vm1 (template) IR: bytes_sent %d, allocated %d", st1.BytesSent, alloc1)
	exportCheck(t, rstore, "vm1", "vm1.img", filepath.Join(pstore, "images", "vm1.img"), true)

	// vm2: a copy of the template made through the mount, then changed a little.
	mustRun(t, time.Minute, "cp", "--sparse=always", tmpl, filepath.Join(mnt, "vm2.img"))
	extEdit(t, filepath.Join(mnt, "vm2.img"), filepath.Join(dir, "ext"), func(root string) {
		writeFiles(t, root, "web", 12, 100000, 7)
		os.RemoveAll(filepath.Join(root, "d03"))
	})
	alloc2 := allocatedBytes(t, filepath.Join(pstore, "images", "vm2.img"))
	up0 := proxy.up.Load()
	mustStandin(t, "replicate", "enable", "--store", pstore, "--group", "vm2", "--images", "vm2.img", "--replica", proxy.Addr(), "--interval", "30s")
	mustStandin(t, "replicate", "now", "--store", pstore, "--group", "vm2", "--wait", "--timeout", "90s")
	wire := proxy.up.Load() - up0
	st2 := dedupGroup(t, pstore, "vm2")
	t.Logf("vm2 (clone) IR: bytes_sent %d (%.1f%% of allocated %d), TCP bytes to the replica %d (%.1f%%), dedup_saved %d, cycles %d",
		st2.BytesSent, 100*float64(st2.BytesSent)/float64(alloc2), alloc2, wire, 100*float64(wire)/float64(alloc2), st2.DedupSaved, st2.Cycles)
	if st2.BytesSent > alloc2/4 || wire > alloc2/4 {
		t.Errorf("clone IR sent %d bytes (TCP %d), more than 25%% of its %d allocated bytes", st2.BytesSent, wire, alloc2)
	}
	if st2.BytesSent < 1<<20 || st2.DedupSaved < alloc2/2 {
		t.Errorf("clone IR: bytes_sent %d, dedup_saved %d: the changed files did not ship or nothing was deduplicated", st2.BytesSent, st2.DedupSaved)
	}
	if st2.Health != "Normal" || st2.LastError != "" {
		t.Errorf("vm2: health %s %v, last error %q", st2.Health, st2.Reasons, st2.LastError)
	}
	exportCheck(t, rstore, "vm2", "vm2.img", filepath.Join(pstore, "images", "vm2.img"), true)
	verifyPoint(t, rstore, "vm2", "latest")
	// Replication of the clone goes on with ordinary deltas.
	extEdit(t, filepath.Join(mnt, "vm2.img"), filepath.Join(dir, "ext"), func(root string) { writeFiles(t, root, "later", 3, 50000, 99) })
	mustStandin(t, "replicate", "now", "--store", pstore, "--group", "vm2", "--wait", "--timeout", "90s")
	exportCheck(t, rstore, "vm2", "vm2.img", filepath.Join(pstore, "images", "vm2.img"), true)
	if n, _ := inboxFiles(rstore, "vm2", ""); n != 0 {
		t.Errorf("%d files left in the replica inbox", n)
	}
	if files, _ := filepath.Glob(filepath.Join(pstore, "thin", "*")); len(files) != 0 {
		t.Errorf("thinned cycles left on the primary: %v", files)
	}
}

// TestReplDedupMissingChunks: blocks the replica said it held change before
// the thinned cycle is committed (and the thinned upload is cut off mid-way):
// the upload resumes, the commit answers missing_chunks, the primary sends
// those blocks' data and the replica ends equal to the primary.
func TestReplDedupMissingChunks(t *testing.T) {
	e := newDedupEnv(t)
	mustStandin(t, "replicate", "enable", "--store", e.pstore, "--group", "vm1", "--images", "vm1.img", "--replica", e.rep.Addr, "--interval", "30s")
	mustStandin(t, "replicate", "now", "--store", e.pstore, "--group", "vm1", "--wait", "--timeout", "90s")
	mustRun(t, time.Minute, "cp", "--sparse=always", e.tmpl, filepath.Join(e.mnt, "vm2.img"))
	extEdit(t, filepath.Join(e.mnt, "vm2.img"), filepath.Join(e.dir, "ext"), func(root string) { writeFiles(t, root, "new", 4, 100000, 3) })
	// Throttled, so the upload of the thinned cycle is still running when
	// the proxy cuts it.
	mustStandin(t, "replicate", "enable", "--store", e.pstore, "--group", "vm2", "--images", "vm2.img", "--replica", e.proxy.Addr(), "--interval", "30s", "--bandwidth", "4Mbit")
	if !waitFor(60*time.Second, 10*time.Millisecond, func() bool { n, _ := inboxFiles(e.rstore, "vm2", ".part"); return n > 0 }) {
		t.Fatal("the upload of vm2 never started")
	}
	e.proxy.refuse.Store(true)
	e.proxy.dropAll()
	if n, _ := stagedFiles(e.pstore); n == 0 {
		t.Fatal("no staged cycle left: the upload finished before the cut")
	}
	// The template's blocks change on the replica meanwhile: 256 allocated blocks of vm1.
	tmpl, err := os.ReadFile(e.tmpl)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(filepath.Join(e.mnt, "vm1.img"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	junk := make([]byte, blockSize)
	n := 0
	for off := 4 * mib; off < int64(len(tmpl)) && n < 256; off += blockSize {
		if strings.Trim(string(tmpl[off:off+blockSize]), "\x00") == "" {
			continue
		}
		fillPattern(junk, off, 77)
		if _, err := f.WriteAt(junk, off); err != nil {
			t.Fatal(err)
		}
		n++
	}
	f.Sync()
	f.Close()
	mustStandin(t, "replicate", "now", "--store", e.pstore, "--group", "vm1", "--wait", "--timeout", "90s")
	e.proxy.refuse.Store(false)
	mustStandin(t, "replicate", "now", "--store", e.pstore, "--group", "vm2", "--wait", "--timeout", "120s")
	if !strings.Contains(e.pri.Stderr.String(), "no longer holds blocks") {
		t.Errorf("the missing-chunks fallback did not run:\n%s", e.pri.Output())
	}
	exportCheck(t, e.rstore, "vm2", "vm2.img", filepath.Join(e.pstore, "images", "vm2.img"), true)
	exportCheck(t, e.rstore, "vm1", "vm1.img", filepath.Join(e.pstore, "images", "vm1.img"), false)
	st := dedupGroup(t, e.pstore, "vm2")
	t.Logf("vm2 after the fallback: bytes_sent %d, dedup_saved %d, last error %q", st.BytesSent, st.DedupSaved, st.LastError)
	for _, l := range strings.Split(e.pri.Stderr.String(), "\n") {
		if strings.Contains(l, "group=vm2") && (strings.Contains(l, "thinned") || strings.Contains(l, "no longer") || strings.Contains(l, "replicated") || strings.Contains(l, "failed")) {
			t.Log(l)
		}
	}
	if n, _ := inboxFiles(e.rstore, "vm2", ""); n != 0 {
		t.Errorf("%d files left in the replica inbox", n)
	}
	if files, _ := filepath.Glob(filepath.Join(e.pstore, "thin", "*")); len(files) != 0 {
		t.Errorf("thinned cycles left on the primary: %v", files)
	}
}

// changeBacking writes n MiB of random data straight into a backing file at
// off (bypassing the mount: tracking never sees it).
func changeBacking(e *replEnv, name string, off, n int64) {
	e.t.Helper()
	f, err := os.OpenFile(filepath.Join(e.PStore, "images", name), os.O_RDWR, 0)
	if err != nil {
		e.t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, n)
	fillRandom(e.rng, buf)
	if _, err := f.WriteAt(buf, off); err != nil {
		e.t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		e.t.Fatal(err)
	}
}

func TestReplResyncLostState(t *testing.T) {
	e := newReplEnv(t, "vm1", imgSpec{"a.img", 64 * mib})
	proxy := startProxy(t, e.Rep.Addr)
	e.pair("vm1/*", proxy.Addr())
	e.enable(proxy.Addr(), "--interval", "30s", "--any-point-window", "1h")
	e.now()
	e.writeRandom("a.img", 50, 8, 0, 64*mib)
	wantOld := e.frozen()
	e.now()
	old := listPoints(t, e.RStore, e.Group)
	before, oldPoint := len(old), old[len(old)-1].Point
	alloc := allocatedBytes(t, filepath.Join(e.PStore, "images", "a.img"))

	// Stop, lose the tracking state, change 4 MiB behind the daemon's back.
	if err := e.Pri.Stop(); err != nil {
		t.Fatal(err)
	}
	states, _ := filepath.Glob(filepath.Join(e.PStore, "state", "*"))
	if len(states) != 1 {
		t.Fatalf("state directories: %v", states)
	}
	if err := os.RemoveAll(states[0]); err != nil {
		t.Fatal(err)
	}
	changeBacking(e, "a.img", 10*mib, 3*mib)
	changeBacking(e, "a.img", 40*mib, 1*mib)
	changed := 4 * mib
	up0 := proxy.up.Load()
	e.Pri = startDaemon(t, e.PStore, e.Mnt)
	want := e.frozen()
	e.now()
	st := e.status()
	wire := proxy.up.Load() - up0
	t.Logf("resync after lost tracker state: bytes_sent %d, TCP %d, changed %d, allocated %d, image size %d, dedup_saved %d",
		st.BytesSent, wire, changed, alloc, 64*mib, dedupGroup(t, e.PStore, e.Group).DedupSaved)
	if st.BytesSent < changed*9/10 || st.BytesSent > changed+2*mib || wire > changed+3*mib {
		t.Errorf("resync sent %d bytes (TCP %d) for %d changed bytes of a %d-byte image (allocated %d)", st.BytesSent, wire, changed, 64*mib, alloc)
	}
	e.checkPoint("latest", want, "after the resync")
	ps := listPoints(t, e.RStore, e.Group)
	if len(ps) <= before {
		t.Errorf("points %v: the resync did not add a point or dropped older ones (had %d)", pointIDs(ps), before)
	}
	e.checkPoint(oldPoint, wantOld, "the point before the resync")
	for _, p := range ps {
		verifyPoint(t, e.RStore, e.Group, p.Point)
	}
	if st.Health != "Normal" {
		t.Errorf("health %s %v", st.Health, st.Reasons)
	}
}

func TestReplResyncWindow(t *testing.T) {
	e := newReplEnv(t, "vm1", imgSpec{"a.img", 48 * mib})
	e.start("--interval", "30s")
	// A divergence tracking cannot see: written to the backing file directly.
	changeBacking(e, "a.img", 20*mib, 1*mib)
	clock := func(d time.Duration) string { return time.Now().Add(d).Format("15:04") }

	r := standin(cmdTimeout, "replicate", "resync", "--store", e.PStore, "--group", e.Group, "--window", "25:00-26:00")
	if r.Code != 2 {
		t.Errorf("resync with a bad window: %s, want exit 2", r)
	}
	// Outside the window nothing happens: ordinary cycles only.
	notNow := clock(2*time.Hour) + "-" + clock(3*time.Hour)
	mustStandin(t, "replicate", "resync", "--store", e.PStore, "--group", e.Group, "--window", notNow)
	s0 := dedupGroup(t, e.PStore, e.Group)
	if !strings.Contains(s0.Resync, notNow) {
		t.Errorf("status after scheduling: resync %q, want it scheduled in %s", s0.Resync, notNow)
	}
	e.writeRandom("a.img", 10, 4, 0, 8*mib)
	e.now()
	s1 := dedupGroup(t, e.PStore, e.Group)
	t.Logf("outside the window: %d bytes sent", s1.BytesSent-s0.BytesSent)
	if got := exportHashes(t, e.RStore, e.Group, "latest"); got["a.img"] == e.frozen()["a.img"] || s1.Resync == "" {
		t.Errorf("a resync ran outside its window (resync %q), or the divergence shipped without one", s1.Resync)
	}
	if s1.BytesSent-s0.BytesSent > 1*mib {
		t.Errorf("outside the window %d bytes were sent for ≤ 40 dirty blocks", s1.BytesSent-s0.BytesSent)
	}
	// Inside the window: only the divergent MiB (plus block hashes) travels.
	now := clock(-time.Hour) + "-" + clock(time.Hour)
	mustStandin(t, "replicate", "resync", "--store", e.PStore, "--group", e.Group, "--window", now)
	want := e.frozen()
	e.now()
	s2 := dedupGroup(t, e.PStore, e.Group)
	sent := s2.BytesSent - s1.BytesSent
	t.Logf("resync in the window: %d bytes sent for 1 MiB diverged (image %d, allocated %d)", sent, 48*mib, allocatedBytes(t, filepath.Join(e.PStore, "images", "a.img")))
	if s2.Resync != "" {
		t.Errorf("resync still scheduled after it ran: %q", s2.Resync)
	}
	if sent < mib || sent > 2*mib {
		t.Errorf("resync sent %d bytes for 1 MiB of divergence", sent)
	}
	e.checkPoint("latest", want, "after the resync")
	for _, p := range listPoints(t, e.RStore, e.Group) {
		verifyPoint(t, e.RStore, e.Group, p.Point)
	}
}
