package integration

// Seeds end to end: three VMs cloned from one ext4 template are
// exported to a seed on the primary (through its daemon, at one
// crash-consistent cut), the seed is damaged within its parity budget,
// imported on the replica, and replication continues with catch-up cycles;
// every step is compared by BLAKE3 with the primary and checked by fsck.
// Wrong seeds (another VM, older cut, older generation, wrong key, lost
// shards) are refused without importing anything; interrupted exports and
// imports resume.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

type seedExportSummary struct {
	Groups       []string `json:"groups"`
	Images       int      `json:"images"`
	Allocated    int64    `json:"allocated_bytes"`
	Unique       int64    `json:"unique_bytes"`
	SeedBytes    int64    `json:"seed_bytes"`
	Ratio        float64  `json:"ratio"`
	ResumedPacks int      `json:"resumed_packs"`
}

type seedImportSummary struct {
	Written int64             `json:"written_bytes"`
	Resumed int64             `json:"resumed_bytes"`
	Points  map[string]string `json:"points"`
	Checks  []struct {
		Group  string `json:"group"`
		Action string `json:"action"`
		Reason string `json:"reason"`
	} `json:"checks"`
}

// fsckImage runs fsck.ext4 -n -f on a plain image file.
func fsckImage(t *testing.T, img string) {
	t.Helper()
	r := execCmd(cmdTimeout, nil, "fsck.ext4", "-n", "-f", img)
	if r.Code != 0 {
		t.Errorf("fsck -n %s: %s", img, r)
	}
}

type seedEnv struct {
	t                *testing.T
	dir, PStore, Mnt string
	RStore           string
	Rep              *replicaProc
	Pri              *Daemon
	Groups           []string
}

// newSeedEnv: one image per group (GROUP.img, a copy of template), a replica,
// the primary daemon, paired, every group enabled with --initial seed.
func newSeedEnv(t *testing.T, template string, groups ...string) *seedEnv {
	t.Helper()
	requireRoot(t)
	requireTools(t, "mkfs.ext4", "fsck.ext4", "losetup")
	dir := testDir(t)
	e := &seedEnv{t: t, dir: dir, PStore: filepath.Join(dir, "pstore"), Mnt: filepath.Join(dir, "mnt"), RStore: filepath.Join(dir, "rstore"), Groups: groups}
	if err := os.MkdirAll(filepath.Join(e.PStore, "images"), 0o700); err != nil {
		t.Fatal(err)
	}
	for _, g := range groups {
		mustRun(t, time.Minute, "cp", "--sparse=always", template, filepath.Join(e.PStore, "images", g+".img"))
	}
	e.Rep = startReplica(t, e.RStore)
	e.Pri = startDaemon(t, e.PStore, e.Mnt)
	r := mustStandin(t, "pair", "token", "--store", e.RStore, "--images", "*", "--json")
	var tok map[string]string
	if err := json.Unmarshal([]byte(r.Stdout), &tok); err != nil {
		t.Fatal(err)
	}
	mustStandin(t, "pair", "join", "--store", e.PStore, "--token", tok["token"], "--replica", e.Rep.Addr, "--name", "seed-primary")
	for _, g := range groups {
		mustStandin(t, "replicate", "enable", "--store", e.PStore, "--group", g, "--images", g+".img",
			"--replica", e.Rep.Addr, "--interval", "30s", "--initial", "seed")
	}
	return e
}

func (e *seedEnv) export(to string, extra ...string) seedExportSummary {
	e.t.Helper()
	args := append([]string{"seed", "export", "--store", e.PStore, "--to", to, "--json"}, extra...)
	r := mustStandin(e.t, args...)
	var s seedExportSummary
	if err := json.Unmarshal([]byte(r.Stdout), &s); err != nil {
		e.t.Fatalf("seed export --json: %v\n%s", err, r)
	}
	return s
}

func (e *seedEnv) primaryHashes() map[string]string {
	out := map[string]string{}
	for _, g := range e.Groups {
		out[g] = b3File(e.t, filepath.Join(e.PStore, "images", g+".img"))
	}
	return out
}

// checkReplica compares the latest point of every group with want and fscks it.
func (e *seedEnv) checkReplica(want map[string]string, what string) {
	e.t.Helper()
	for _, g := range e.Groups {
		out := filepath.Join(e.dir, "check-"+g)
		os.RemoveAll(out)
		mustStandin(e.t, "points", "export", "--store", e.RStore, "--group", g, "--to", out)
		img := filepath.Join(out, g+".img")
		if got := b3File(e.t, img); got != want[g] {
			e.t.Errorf("%s: group %s: replica %.16s, primary %.16s", what, g, got, want[g])
		}
		fsckImage(e.t, img)
		os.RemoveAll(out)
	}
}

func TestSeedRoundTrip(t *testing.T) {
	requireRoot(t)
	tmpl := extTemplate(t, testDir(t))
	e := newSeedEnv(t, tmpl, "vm1", "vm2", "vm3")

	// Clones diverge a little before the seed (tracked writes through the mount).
	extEdit(t, filepath.Join(e.Mnt, "vm2.img"), filepath.Join(e.dir, "ext"), func(root string) { writeFiles(t, root, "web", 20, 100000, 3000) })
	extEdit(t, filepath.Join(e.Mnt, "vm3.img"), filepath.Join(e.dir, "ext"), func(root string) { writeFiles(t, root, "db", 10, 300000, 2000) })

	st := replGroupStatus(t, e.PStore, "vm1")
	if !strings.Contains(strings.Join(st.Reasons, " "), "waiting for the seed export") {
		t.Errorf("before the export: reasons %v, want waiting for the seed export", st.Reasons)
	}

	seed := filepath.Join(e.dir, "usb")
	sum := e.export(seed, "--all", "--parity", "50%")
	atCut := e.primaryHashes()
	t.Logf("seed: %d images, allocated %d, unique %d, seed %d bytes, ratio %.2f", sum.Images, sum.Allocated, sum.Unique, sum.SeedBytes, sum.Ratio)
	if sum.Images != 3 || sum.Ratio < 1.2 {
		t.Errorf("seed of 3 clones: %+v, want 3 images and a ratio ≥ 1.2 with 50%% parity on incompressible data (dedup across clones)", sum)
	}
	if sum.Unique*2 > sum.Allocated {
		t.Errorf("unique %d bytes of %d allocated: clones did not dedup", sum.Unique, sum.Allocated)
	}
	// Changes after the seed's cut are queued.
	extEdit(t, filepath.Join(e.Mnt, "vm1.img"), filepath.Join(e.dir, "ext"), func(root string) { writeFiles(t, root, "after", 8, 50000, 5000) })
	if h := b3File(t, filepath.Join(e.PStore, "images", "vm1.img")); h == atCut["vm1"] {
		t.Fatal("edit after the seed changed nothing")
	}

	mustStandin(t, "seed", "verify", seed)

	// Damage within the parity budget: flip bytes in one pack, delete another.
	packs, _ := filepath.Glob(filepath.Join(seed, "packs", "*.pack"))
	if len(packs) < 2 {
		t.Fatalf("seed has %d packs, want ≥ 2", len(packs))
	}
	flipFileByte(t, packs[0], 100)
	if err := os.Remove(packs[1]); err != nil {
		t.Fatal(err)
	}
	r := standin(cmdTimeout, "seed", "verify", seed)
	if r.Code != 0 || !strings.Contains(r.Stdout, "repairable") {
		t.Errorf("seed verify of damage within parity: %s, want exit 0 and 'repairable'", r)
	}

	// Dry run: says what it would do, writes nothing.
	r = mustStandin(t, "seed", "import", "--store", e.RStore, seed, "--dry-run")
	if strings.Count(r.Stdout, "would import") != 3 {
		t.Errorf("dry run: %s", r.Stdout)
	}
	if ents, _ := os.ReadDir(filepath.Join(e.RStore, "groups")); len(ents) != 0 {
		t.Errorf("dry run created groups: %v", ents)
	}

	// Replication is waiting for the import; kick a round so the primary announces its seed.
	standin(time.Minute, "replicate", "now", "--store", e.PStore, "--all", "--wait")
	// The announcement carries every image's manifest root (the import
	// checks the seed's content against it).
	for _, g := range e.Groups {
		var ann struct {
			Roots map[string]string `json:"roots"`
		}
		b, err := os.ReadFile(filepath.Join(e.RStore, "expect", g+".json"))
		if err != nil || json.Unmarshal(b, &ann) != nil || len(ann.Roots) != 1 {
			t.Errorf("announcement of %s: %v %s: want one manifest root", g, err, b)
		}
	}
	r = mustStandin(t, "seed", "import", "--store", e.RStore, seed, "--json")
	var is seedImportSummary
	if err := json.Unmarshal([]byte(r.Stdout), &is); err != nil {
		t.Fatal(err)
	}
	if len(is.Points) != 3 {
		t.Fatalf("import: %+v", is)
	}
	for _, c := range is.Checks {
		if c.Action != "import" {
			t.Errorf("import check %+v", c)
		}
	}
	e.checkReplica(atCut, "after import")
	for _, g := range e.Groups { // hashes.bin written by the import matches the data
		verifyPoint(t, e.RStore, g, "latest")
	}

	// Replication goes on from the seed: catch-up cycles only.
	for _, g := range e.Groups {
		mustStandin(t, "replicate", "now", "--store", e.PStore, "--group", g, "--wait", "--timeout", "90s")
	}
	e.checkReplica(e.primaryHashes(), "after catch-up")
	var sent int64
	for _, g := range e.Groups {
		st := replGroupStatus(t, e.PStore, g)
		sent += st.BytesSent
		if st.Health != "Normal" {
			t.Errorf("group %s: health %s %v", g, st.Health, st.Reasons)
		}
	}
	t.Logf("catch-up after the seed: %d bytes sent for 3 groups (allocated %d)", sent, sum.Allocated)
	if sent > sum.Allocated/4 {
		t.Errorf("catch-up sent %d bytes, more than a quarter of the allocated %d: the seed was not used as the base", sent, sum.Allocated)
	}
	// And later cuts too.
	extEdit(t, filepath.Join(e.Mnt, "vm2.img"), filepath.Join(e.dir, "ext"), func(root string) { writeFiles(t, root, "later", 5, 70000, 5000) })
	mustStandin(t, "replicate", "now", "--store", e.PStore, "--group", "vm2", "--wait", "--timeout", "90s")
	e.checkReplica(e.primaryHashes(), "later cut")
	if st := replGroupStatus(t, e.PStore, "vm2"); st.Cycles < 2 || st.LastPoint == "1" {
		t.Errorf("vm2 after two cycles on top of the seed: %+v", st)
	}
}

func flipFileByte(t *testing.T, path string, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x5a
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

// TestSeedRefused: seeds that do not match the relationship, a wrong key and
// damage beyond parity are refused and nothing is imported; the right seed
// then imports (encrypted: no image name or file content readable on the media).
func TestSeedRefused(t *testing.T) {
	requireRoot(t)
	tmpl := extTemplate(t, testDir(t))
	e := newSeedEnv(t, tmpl, "vm1")
	noGroups := func(what string) {
		t.Helper()
		if ents, _ := os.ReadDir(filepath.Join(e.RStore, "groups", "vm1", "images")); len(ents) != 0 {
			t.Errorf("%s: the replica holds images after a refused import", what)
		}
	}
	announce := func() { standin(time.Minute, "replicate", "now", "--store", e.PStore, "--group", "vm1", "--wait") }

	old := filepath.Join(e.dir, "seed-old")
	e.export(old, "--group", "vm1")
	extEdit(t, filepath.Join(e.Mnt, "vm1.img"), filepath.Join(e.dir, "ext"), func(root string) { writeFiles(t, root, "x", 3, 40000, 1000) })
	newer := filepath.Join(e.dir, "seed-new")
	e.export(newer, "--group", "vm1")
	announce()
	r := standin(cmdTimeout, "seed", "import", "--store", e.RStore, old)
	if r.Code != 4 || !strings.Contains(r.Stderr, "older seed") {
		t.Errorf("import of an older seed: %s, want exit 4 'older seed'", r)
	}
	noGroups("older seed")

	// Another VM's seed under the same name: a second primary with its own vm1.
	p2 := filepath.Join(e.dir, "pstore2")
	if err := os.MkdirAll(filepath.Join(p2, "images"), 0o700); err != nil {
		t.Fatal(err)
	}
	mustRun(t, time.Minute, "cp", "--sparse=always", tmpl, filepath.Join(p2, "images", "vm1.img"))
	startDaemon(t, p2, filepath.Join(e.dir, "mnt2"))
	rep2 := startReplica(t, filepath.Join(e.dir, "rstore2"))
	tok := mustStandin(t, "pair", "token", "--store", rep2.Store, "--images", "*", "--json")
	var tm map[string]string
	json.Unmarshal([]byte(tok.Stdout), &tm)
	mustStandin(t, "pair", "join", "--store", p2, "--token", tm["token"], "--replica", rep2.Addr, "--name", "other")
	mustStandin(t, "replicate", "enable", "--store", p2, "--group", "vm1", "--images", "vm1.img", "--replica", rep2.Addr, "--initial", "seed")
	foreign := filepath.Join(e.dir, "seed-foreign")
	mustStandin(t, "seed", "export", "--store", p2, "--group", "vm1", "--to", foreign)
	r = standin(cmdTimeout, "seed", "import", "--store", e.RStore, foreign)
	if r.Code != 4 || !strings.Contains(r.Stderr, "another VM") {
		t.Errorf("import of another VM's seed: %s, want exit 4 'another VM'", r)
	}
	noGroups("foreign seed")

	// Lost tracking state: generation 2; the seeds of generation 1 are now old.
	e.Pri.Stop()
	ents, _ := os.ReadDir(filepath.Join(e.PStore, "state"))
	for _, d := range ents {
		os.RemoveAll(filepath.Join(e.PStore, "state", d.Name()))
	}
	e.Pri = startDaemon(t, e.PStore, e.Mnt)
	st := replGroupStatus(t, e.PStore, "vm1")
	_ = st
	announce()
	if st := replGroupStatus(t, e.PStore, "vm1"); !strings.Contains(strings.Join(st.Reasons, " "), "generation") {
		t.Errorf("after lost tracking state: reasons %v, want a note that the seed's generation is stale", st.Reasons)
	}
	key1, key2 := filepath.Join(e.dir, "k1"), filepath.Join(e.dir, "k2")
	enc := filepath.Join(e.dir, "seed-enc")
	e.export(enc, "--group", "vm1", "--encrypt", "--key-file", key1)
	announce()
	r = standin(cmdTimeout, "seed", "import", "--store", e.RStore, newer)
	if r.Code != 4 || !strings.Contains(r.Stderr, "generation") {
		t.Errorf("import of a generation-1 seed after generation 2 was announced: %s, want exit 4 naming the generation", r)
	}
	noGroups("older generation")

	// Wrong key.
	if err := os.WriteFile(key2, []byte(strings.Repeat("ab", 32)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	r = standin(cmdTimeout, "seed", "import", "--store", e.RStore, enc, "--key-file", key2)
	if r.Code != 4 {
		t.Errorf("import with the wrong key: %s, want exit 4", r)
	}
	noGroups("wrong key")
	// Encrypted media: no image name, no file content.
	content := make([]byte, 40000)
	fillPattern(content, 0, uint64(len("x")*1000))
	if out := grepTree(t, enc, []byte("vm1.img"), content[:64]); out != "" {
		t.Errorf("plaintext found on encrypted media: %s", out)
	}

	// Damage beyond parity: a manifest and its parity shard gone.
	broken := filepath.Join(e.dir, "seed-broken")
	mustRun(t, time.Minute, "cp", "-a", enc, broken)
	mans, _ := filepath.Glob(filepath.Join(broken, "manifests", "*"))
	pars, _ := filepath.Glob(filepath.Join(broken, "parity", "*"))
	if len(mans) == 0 || len(pars) == 0 {
		t.Fatalf("seed has %d manifests, %d parity shards", len(mans), len(pars))
	}
	os.Truncate(mans[0], 10)
	for _, p := range pars {
		os.Remove(p)
	}
	r = standin(cmdTimeout, "seed", "import", "--store", e.RStore, broken, "--key-file", key1)
	if r.Code != 3 || !strings.Contains(r.Stderr, filepath.Base(mans[0])) {
		t.Errorf("import beyond parity: %s, want exit 3 naming %s", r, filepath.Base(mans[0]))
	}
	noGroups("beyond parity")
	if r := standin(cmdTimeout, "seed", "verify", broken); r.Code != 3 {
		t.Errorf("verify beyond parity: %s, want exit 3", r)
	}

	// The right seed with the right key imports, and replication continues.
	mustStandin(t, "seed", "import", "--store", e.RStore, enc, "--key-file", key1)
	mustStandin(t, "replicate", "now", "--store", e.PStore, "--group", "vm1", "--wait", "--timeout", "90s")
	e.checkReplica(e.primaryHashes(), "after the encrypted seed")
}

// grepTree reports which of the needles occur in any file below dir.
func grepTree(t *testing.T, dir string, needles ...[]byte) string {
	t.Helper()
	var hits []string
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil || !fi.Mode().IsRegular() {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return nil
		}
		for i, n := range needles {
			if bytes.Contains(b, n) {
				hits = append(hits, fmt.Sprintf("needle %d in %s", i, p))
			}
		}
		return nil
	})
	return strings.Join(hits, ", ")
}

// TestSeedResume: an export interrupted by the user (CLI killed) and an
// import interrupted the same way continue where they stopped.
func TestSeedResume(t *testing.T) {
	requireRoot(t)
	tmpl := extTemplate(t, testDir(t))
	e := newSeedEnv(t, tmpl, "vm1", "vm2")
	extEdit(t, filepath.Join(e.Mnt, "vm2.img"), filepath.Join(e.dir, "ext"), func(root string) { writeFiles(t, root, "big", 6, 2<<20, 3000) })
	seed := filepath.Join(e.dir, "usb")

	interrupt := func(what string, args []string, ready func() bool) {
		t.Helper()
		cmd := exec.Command(standinBin, args...)
		cmd.Env = append(os.Environ(), "STANDIN_TEST_SEED_DELAY=40ms")
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		ok := waitFor(2*time.Minute, 50*time.Millisecond, ready)
		cmd.Process.Kill()
		cmd.Wait()
		if !ok {
			t.Fatalf("%s never reached the point to interrupt: %s", what, out.String())
		}
	}
	interrupt("export", []string{"seed", "export", "--store", e.PStore, "--all", "--to", seed, "--parity", "0"}, func() bool {
		p, _ := filepath.Glob(filepath.Join(seed, "packs", "*.pack"))
		return len(p) >= 2
	})
	if _, err := os.Stat(filepath.Join(seed, "index.0")); err == nil {
		t.Fatal("the interrupted export finished anyway")
	}
	sum := e.export(seed, "--all", "--parity", "0")
	t.Logf("resumed export: %d packs kept, %d bytes allocated, seed %d bytes", sum.ResumedPacks, sum.Allocated, sum.SeedBytes)
	if sum.ResumedPacks == 0 {
		t.Errorf("resumed export kept no packs: %+v", sum)
	}
	atCut := e.primaryHashes()
	announce := func() { standin(time.Minute, "replicate", "now", "--store", e.PStore, "--all", "--wait") }
	announce()
	// Stop the replica daemon so the import runs in the CLI; kill it once
	// an image is staged.
	e.Rep.Stop()
	interrupt("import", []string{"seed", "import", "--store", e.RStore, seed}, func() bool {
		p, _ := filepath.Glob(filepath.Join(e.RStore, "seed-staging", "*", "*", "progress.json"))
		return len(p) >= 1
	})
	r := mustStandin(t, "seed", "import", "--store", e.RStore, seed, "--json")
	var is seedImportSummary
	if err := json.Unmarshal([]byte(r.Stdout), &is); err != nil {
		t.Fatal(err)
	}
	t.Logf("resumed import: %d bytes already written by the interrupted run, %d written", is.Resumed, is.Written)
	if is.Resumed == 0 {
		t.Errorf("resumed import wrote everything again: %+v", is)
	}
	e.Rep.start()
	e.checkReplica(atCut, "after the resumed import")
	for _, g := range e.Groups {
		mustStandin(t, "replicate", "now", "--store", e.PStore, "--group", g, "--wait", "--timeout", "90s")
	}
	e.checkReplica(e.primaryHashes(), "after catch-up")
}
