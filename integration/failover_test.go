package integration

// Points as files and test failover on the replica,
// end to end: a primary replicates an ext4 image to a replica daemon over
// mutual TLS; the replica exposes its points through a FUSE mount and starts
// a test failover (writable copy-on-write images over an older point) while
// replication keeps applying new cycles.

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/zeebo/blake3"
)

type failoverTestJSON struct {
	ID        string    `json:"id"`
	Group     string    `json:"group"`
	Point     string    `json:"point"`
	PointTime time.Time `json:"point_time"`
	Mount     string    `json:"mount"`
	State     string    `json:"state"`
	Reason    string    `json:"reason"`
	Paths     []string  `json:"paths"`
	Written   int64     `json:"written_bytes"`
	CreateSec float64   `json:"create_seconds"`
	BootCheck *struct {
		Passed   bool    `json:"passed"`
		ExitCode int     `json:"exit_code"`
		Seconds  float64 `json:"seconds"`
		Output   string  `json:"output"`
	} `json:"boot_check"`
}

type pinJSON struct {
	Group  string   `json:"group"`
	Point  string   `json:"point"`
	Open   int      `json:"open_files"`
	Owners []string `json:"owners"`
}

func failoverList(t *testing.T, rstore string) []failoverTestJSON {
	t.Helper()
	r := mustStandin(t, "failover", "test", "list", "--store", rstore, "--json")
	var out []failoverTestJSON
	if err := json.Unmarshal([]byte(r.Stdout), &out); err != nil {
		t.Fatalf("failover test list --json: %v\n%s", err, r.Stdout)
	}
	return out
}

func pinsOf(t *testing.T, rstore string) []pinJSON {
	t.Helper()
	r := mustStandin(t, "points", "pins", "--store", rstore, "--json")
	var out []pinJSON
	if err := json.Unmarshal([]byte(r.Stdout), &out); err != nil {
		t.Fatalf("points pins --json: %v\n%s", err, r.Stdout)
	}
	return out
}

func pointKinds(ps []pointInfo) map[string]string {
	out := map[string]string{}
	for _, p := range ps {
		out[p.Point] = p.Kind
	}
	return out
}

// wantCode runs standin and fails unless it exits with code and its stderr
// contains what.
func wantCode(t *testing.T, code int, what string, args ...string) {
	t.Helper()
	r := standin(cmdTimeout, args...)
	if r.Code != code || !strings.Contains(r.Stderr, what) {
		t.Errorf("want exit %d with %q: %s", code, what, r)
	}
}

func TestFailoverTestWhileReplicating(t *testing.T) {
	requireRoot(t)
	requireTools(t, "mkfs.ext4", "fsck.ext4", "losetup", "mount")
	dir := testDir(t)
	pstore, mnt, rstore := filepath.Join(dir, "pstore"), filepath.Join(dir, "mnt"), filepath.Join(dir, "rstore")
	pmnt := filepath.Join(dir, "points")   // points mount (standin serve --points-mount)
	tmnt := filepath.Join(dir, "testvm")   // test failover mount (--mount)
	extMnt := filepath.Join(dir, "ext4")   // where the test image's ext4 is mounted
	pmnt2 := filepath.Join(dir, "points2") // a second points mount (standin points mount)
	t.Cleanup(func() {
		// Whatever happened: no mount and no loop device stays behind.
		for _, p := range []string{extMnt, tmnt, pmnt, pmnt2} {
			if err := teardownMount(p); err != nil {
				t.Errorf("cleanup: %v", err)
			}
		}
	})

	// An ext4 image with a file tree (mkfs.ext4 -d) as the primary's disk.
	tree := filepath.Join(dir, "tree")
	sums := writeTree(t, tree, 80)
	if err := os.MkdirAll(filepath.Join(pstore, "images"), 0o700); err != nil {
		t.Fatal(err)
	}
	mustRun(t, cmdTimeout, "mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", "-d", tree, filepath.Join(pstore, "images", "disk.img"), "64M")

	rep := startReplica(t, rstore, "--points-mount", pmnt)
	startDaemon(t, pstore, mnt)
	e := &replEnv{t: t, dir: dir, PStore: pstore, Mnt: mnt, RStore: rstore, Rep: rep, Group: "vm1", Names: []string{"disk.img"}}
	e.pair("vm1/*", rep.Addr)
	// Cycles only on 'replicate now'; retention keeps the latest point and
	// those younger than 3 s: an older point survives only while pinned.
	e.enable(rep.Addr, "--interval", "1h", "--points", "1", "--any-point-window", "3s")
	cut := func(what string) string { // one cycle; the replica's latest must equal the primary
		t.Helper()
		want := e.frozen()
		e.now()
		e.checkPoint("latest", want, what)
		ps := listPoints(t, rstore, "vm1")
		return ps[len(ps)-1].Point
	}
	edit := func(prefix string, n int) {
		t.Helper()
		extEdit(t, filepath.Join(mnt, "disk.img"), filepath.Join(dir, "pext"), func(root string) { writeFiles(t, root, prefix, n, 50000, uint64(len(prefix)*1000)) })
	}

	pA := cut("base")
	hA := exportHashes(t, rstore, "vm1", pA)["disk.img"]
	// Hold point A open through the points mount (an open pin): it cannot
	// expire however slow the next steps are.
	fA, err := os.Open(filepath.Join(pmnt, "vm1", "latest", "disk.img"))
	if err != nil {
		t.Fatal(err)
	}
	defer fA.Close()
	edit("b", 10)
	pB := cut("after b")
	psNow := listPoints(t, rstore, "vm1")
	var timeA time.Time
	for _, p := range psNow {
		if p.Point == pA {
			timeA = p.Time
		}
	}
	if timeA.IsZero() {
		t.Fatalf("point %s (base) expired while a file of it was open: %v", pA, pointIDs(psNow))
	}
	// The file opened as latest still reads point A after B was applied.
	hOpen := blake3.New()
	if _, err := io.Copy(hOpen, fA); err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprintf("%x", hOpen.Sum(nil)); got != hA {
		t.Errorf("latest/disk.img opened at point %s read %.16s after point %s was applied; want %.16s", pA, got, pB, hA)
	}

	// Bad input: clear errors and exit codes, nothing created.
	wantCode(t, 6, "no such replication group", "failover", "test", "--store", rstore, "--group", "nope")
	wantCode(t, 6, "no such recovery point", "failover", "test", "--store", rstore, "--group", "vm1", "--point", "999")
	wantCode(t, 6, "no point at or before", "failover", "test", "--store", rstore, "--group", "vm1", "--point", "2001-01-01T00:00:00Z")
	wantCode(t, 7, "busy", "failover", "test", "--store", rstore, "--group", "vm1", "--mount", pmnt)
	wantCode(t, 6, "has no test failover", "failover", "test", "stop", "--store", rstore, "--group", "vm1")
	wantCode(t, 2, "--group VM", "failover", "test", "--store", rstore)

	// Dry run by time: the plan names point A and changes nothing.
	r := mustStandin(t, "failover", "test", "--store", rstore, "--group", "vm1", "--point", timeA.Format(time.RFC3339Nano), "--mount", tmnt, "--dry-run", "--json")
	var plan []failoverTestJSON
	if err := json.Unmarshal([]byte(r.Stdout), &plan); err != nil || len(plan) != 1 || plan[0].Point != pA || plan[0].State != "planned" {
		t.Fatalf("dry run: %v %+v\n%s", err, plan, r)
	}
	r = mustStandin(t, "failover", "test", "--store", rstore, "--all", "--dry-run", "--json")
	if err := json.Unmarshal([]byte(r.Stdout), &plan); err != nil || len(plan) != 1 || plan[0].Group != "vm1" || plan[0].Point != pB {
		t.Fatalf("dry run --all: %v %+v\n%s", err, plan, r)
	}
	if _, err := os.Stat(tmnt); !os.IsNotExist(err) || len(failoverList(t, rstore)) != 0 {
		t.Fatalf("dry run created something: stat %v, tests %v", err, failoverList(t, rstore))
	}

	// The test failover of point A, with a boot check (fsck -n of the images).
	t0 := time.Now()
	r = mustStandin(t, "failover", "test", "--store", rstore, "--group", "vm1", "--point", pA, "--mount", tmnt,
		"--boot-check", `for i in $STANDIN_TEST_IMAGES; do fsck.ext4 -n -f "$i" || exit 1; done; echo "group=$STANDIN_TEST_GROUP point=$STANDIN_TEST_POINT"`, "--json")
	cliTime := time.Since(t0)
	var created []failoverTestJSON
	if err := json.Unmarshal([]byte(r.Stdout), &created); err != nil || len(created) != 1 {
		t.Fatalf("failover test --json: %v\n%s", err, r)
	}
	ft := created[0]
	t.Logf("test failover %s of point %s created and mounted in %.3f s (CLI round trip incl. boot check %.2f s)", ft.ID, ft.Point, ft.CreateSec, cliTime.Seconds())
	if ft.Point != pA || ft.State != "mounted" || len(ft.Paths) != 1 || ft.Paths[0] != filepath.Join(tmnt, "disk.img") {
		t.Fatalf("created %+v", ft)
	}
	if ft.CreateSec > 2 {
		t.Errorf("creating a test failover took %.3f s (target < 1 s)", ft.CreateSec)
	}
	if bc := ft.BootCheck; bc == nil || !bc.Passed || !strings.Contains(bc.Output, "group=vm1 point="+pA) {
		t.Errorf("boot check: %+v", bc)
	}
	img := ft.Paths[0]
	if got := b3File(t, img); got != hA {
		t.Errorf("test image %.16s, point %s exported %.16s", got, pA, hA)
	}
	fA.Close() // from now on only the test failover's pin holds A

	// Replication keeps applying; point A is kept (pinned), B expires.
	time.Sleep(3 * time.Second)
	edit("c", 10)
	pC := cut("while testing")
	k := pointKinds(listPoints(t, rstore, "vm1"))
	if k[pA] != "pinned" || k[pC] != "latest" {
		t.Errorf("points %v: want %s pinned and %s latest", k, pA, pC)
	}
	if _, ok := k[pB]; ok {
		t.Errorf("point %s (not pinned, older than the window) still kept: %v", pB, k)
	}

	// Boot the test image: loop-mount its ext4 read-write, files intact, write.
	dev := strings.TrimSpace(mustRun(t, 30*time.Second, "losetup", "-f", "--show", img))
	t.Cleanup(func() { // on failure: before the replica daemon stops
		if isMounted(extMnt) {
			unmountTimeout(extMnt, 0, 30*time.Second)
		}
		if r := execCmd(10*time.Second, nil, "losetup", "--list", "--noheadings", "--output", "BACK-FILE", dev); r.Code == 0 &&
			strings.HasPrefix(strings.TrimSpace(r.Stdout), img) {
			execCmd(20*time.Second, nil, "losetup", "-d", dev) // still ours
		}
	})
	if err := os.MkdirAll(extMnt, 0o755); err != nil {
		t.Fatal(err)
	}
	mustRun(t, 30*time.Second, "mount", dev, extMnt)
	for rel, want := range sums {
		if got := b3File(t, filepath.Join(extMnt, rel)); got != want {
			t.Errorf("test image: %s changed", rel)
		}
	}
	if _, err := os.Stat(filepath.Join(extMnt, "b")); !os.IsNotExist(err) {
		t.Errorf("test image of point %s has directory b written after it: %v", pA, err)
	}
	writeFiles(t, extMnt, "testonly", 20, 70000, 8000)
	mustRun(t, time.Minute, "sync")
	// Meanwhile the replica applies another cycle.
	edit("d", 5)
	pD := cut("while the test image is mounted")
	if err := unmountTimeout(extMnt, 0, time.Minute); err != nil {
		t.Fatalf("umount test ext4: %v", err)
	}
	fr := execCmd(cmdTimeout, nil, "fsck.ext4", "-n", "-f", dev)
	if fr.Code != 0 {
		t.Errorf("fsck -n of the written test image: %s", fr)
	}
	t.Logf("fsck -n of the written test image: %s", lastLine(fr.Stdout))
	mustRun(t, 30*time.Second, "losetup", "-d", dev)
	hTest := b3File(t, img)
	if hTest == hA {
		t.Errorf("test image unchanged after writes")
	}
	// The point itself is untouched by the test's writes.
	if got := exportHashes(t, rstore, "vm1", pA)["disk.img"]; got != hA {
		t.Errorf("point %s changed under the test failover: %.16s, was %.16s", pA, got, hA)
	}
	verifyPoint(t, rstore, "vm1", pA)
	verifyPoint(t, rstore, "vm1", pD)
	lst := failoverList(t, rstore)
	if len(lst) != 1 || lst[0].Written == 0 || lst[0].BootCheck == nil || !lst[0].BootCheck.Passed {
		t.Errorf("failover test list: %+v", lst)
	}

	// Points mount: listing, and a point file read while an apply happens.
	names, err := os.ReadDir(filepath.Join(pmnt, "vm1"))
	if err != nil {
		t.Fatal(err)
	}
	var listed []string
	for _, n := range names {
		listed = append(listed, n.Name())
	}
	wantA := "disk.img@" + timeA.UTC().Format(time.RFC3339)
	if !strings.Contains(strings.Join(listed, " "), wantA) || !strings.Contains(strings.Join(listed, " "), "latest") {
		t.Errorf("points mount lists %v, want %s and latest", listed, wantA)
	}
	if got := b3File(t, filepath.Join(pmnt, "vm1", wantA)); got != hA {
		t.Errorf("%s via the points mount %.16s, export %.16s", wantA, got, hA)
	}
	f, err := os.Open(filepath.Join(pmnt, "vm1", "latest", "disk.img"))
	if err != nil {
		t.Fatal(err)
	}
	h := blake3.New()
	half := make([]byte, 32<<20)
	if _, err := io.ReadFull(f, half); err != nil {
		t.Fatal(err)
	}
	h.Write(half)
	edit("e", 5)
	pE := cut("during a read through the points mount") // applied while the file is open
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	readHash := fmt.Sprintf("%x", h.Sum(nil))
	// Still open (pinned): the point it was opened at is exportable.
	if got := exportHashes(t, rstore, "vm1", pD)["disk.img"]; got != readHash {
		t.Errorf("latest/disk.img opened at point %s read %.16s across the apply of %s; export of %s %.16s", pD, readHash, pE, pD, got)
	}
	if ps := pinsOf(t, rstore); len(ps) != 2 {
		t.Errorf("pins while a point file is open: %+v, want the test's and the open file's", ps)
	}
	f.Close()

	// standin points mount / unmount (a second mount, at runtime).
	mustStandin(t, "points", "mount", "--store", rstore, pmnt2)
	wantCode(t, 7, "busy", "points", "mount", "--store", rstore, pmnt2)
	if got := b3File(t, filepath.Join(pmnt2, "vm1", "latest", "disk.img")); got != e.frozen()["disk.img"] {
		t.Errorf("latest via the second points mount differs from the primary")
	}
	mustStandin(t, "points", "unmount", "--store", rstore, pmnt2)
	if isMounted(pmnt2) {
		t.Errorf("%s still mounted after points unmount", pmnt2)
	}
	wantCode(t, 6, "not a points mount", "points", "unmount", "--store", rstore, pmnt2)

	// A replica daemon restart re-mounts the test failover with its writes.
	rep.Stop()
	if isMounted(tmnt) || isMounted(pmnt) {
		t.Fatalf("mounts left after the replica daemon stopped: test %v points %v", isMounted(tmnt), isMounted(pmnt))
	}
	rep.Restart()
	lst = failoverList(t, rstore)
	if len(lst) != 1 || lst[0].State != "mounted" {
		t.Fatalf("after restart: %+v", lst)
	}
	if got := b3File(t, img); got != hTest {
		t.Errorf("test image after restart %.16s, before %.16s", got, hTest)
	}
	edit("f", 5)
	cut("after the replica restart")

	// Stop: no mount, no file, no pin; the point expires on the next apply.
	r = mustStandin(t, "failover", "test", "stop", "--store", rstore, "--group", "vm1")
	if !strings.Contains(r.Stdout, ft.ID) {
		t.Errorf("stop output: %s", r)
	}
	if isMounted(tmnt) {
		t.Errorf("%s still mounted after stop", tmnt)
	}
	if _, err := os.Stat(tmnt); !os.IsNotExist(err) {
		t.Errorf("mount directory %s left after stop: %v", tmnt, err)
	}
	if ents, _ := os.ReadDir(filepath.Join(rstore, "failover-tests")); len(ents) != 0 {
		t.Errorf("left in failover-tests: %v", ents)
	}
	if ps := pinsOf(t, rstore); len(ps) != 0 {
		t.Errorf("pins left after stop: %+v", ps)
	}
	if b, err := os.ReadFile(filepath.Join(rstore, "groups", "vm1", "pins.json")); err == nil && strings.Contains(string(b), ft.ID) {
		t.Errorf("pins.json still names the test: %s", b)
	}
	if len(failoverList(t, rstore)) != 0 {
		t.Errorf("failover test list not empty after stop")
	}
	wantCode(t, 6, "no such test failover", "failover", "test", "stop", "--store", rstore, "--id", ft.ID)
	time.Sleep(3 * time.Second)
	last := cut("after stop")
	k = pointKinds(listPoints(t, rstore, "vm1"))
	if _, ok := k[pA]; ok || k[last] != "latest" {
		t.Errorf("after stop and an apply: points %v, want %s expired", k, pA)
	}
}
