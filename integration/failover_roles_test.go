package integration

// Planned and unplanned failover, reverse replication and failback,
// end to end between two "hosts" on 127.0.0.1. Each host
// runs both daemons: a mount daemon over its primary store and a replica
// daemon over its replica store (serve --primary-store), so either can take
// either role. Every step is checked by BLAKE3 of whole images, and the bytes
// each direction ships are compared with the blocks written.

import (
	"encoding/json"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

type host struct {
	Name   string
	PStore string
	Mnt    string
	RStore string
	Rep    *replicaProc
	Pri    *Daemon
}

// newHost starts a host's replica daemon (promoting into its primary store)
// and its mount daemon. Images put into PSTORE/images before are served.
func newHost(t *testing.T, dir, name string) *host {
	t.Helper()
	h := &host{Name: name, PStore: filepath.Join(dir, name, "pstore"), Mnt: filepath.Join(dir, name, "mnt"), RStore: filepath.Join(dir, name, "rstore")}
	if err := os.MkdirAll(filepath.Join(h.PStore, "images"), 0o700); err != nil {
		t.Fatal(err)
	}
	h.Rep = startReplica(t, h.RStore, "--primary-store", h.PStore)
	h.Pri = startDaemon(t, h.PStore, h.Mnt)
	return h
}

func (h *host) image(name string) string { return filepath.Join(h.PStore, "images", name) }

// twoHosts starts the named hosts (the first two become A and B) with a
// prefilled disk.img of size bytes in A's primary store, pairs A with B's
// replica store and enables replication of group vm1 (interval 1h, points
// kept for 1h). It returns A's environment, the shared one (sizes, random
// source) and the hosts.
func twoHosts(t *testing.T, size int64, seed uint64, names ...string) (ab, base *replEnv, hs []*host) {
	t.Helper()
	dir := testDir(t)
	base = &replEnv{t: t, Sizes: map[string]int64{"disk.img": size}, rng: rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), seed))}
	if err := os.MkdirAll(filepath.Join(dir, names[0], "pstore", "images"), 0o700); err != nil {
		t.Fatal(err)
	}
	prefill(t, filepath.Join(dir, names[0], "pstore", "images", "disk.img"), size, base.rng)
	for _, n := range names {
		hs = append(hs, newHost(t, dir, n))
	}
	ab = hs[0].env(t, "vm1", []string{"disk.img"}, hs[1].Rep, base)
	ab.pair("vm1/*", hs[1].Rep.Addr)
	ab.enable(hs[1].Rep.Addr, "--interval", "1h", "--any-point-window", "1h")
	return ab, base, hs
}

// env returns a replEnv for the group as replicated from h to the replica
// store rstore (served by rep).
func (h *host) env(t *testing.T, group string, names []string, rep *replicaProc, base *replEnv) *replEnv {
	e := &replEnv{t: t, PStore: h.PStore, Mnt: h.Mnt, RStore: rep.Store, Rep: rep, Pri: h.Pri, Group: group, Names: names, Sizes: base.Sizes, rng: base.rng}
	return e
}

type failoverStepJSON struct {
	Step    string  `json:"step"`
	Seconds float64 `json:"seconds"`
	Bytes   int64   `json:"bytes"`
	Detail  string  `json:"detail"`
}

type failoverResultJSON struct {
	Group  string             `json:"group"`
	Kind   string             `json:"kind"`
	Plan   []string           `json:"plan"`
	Steps  []failoverStepJSON `json:"steps"`
	Point  string             `json:"point"`
	Error  string             `json:"error"`
	Images []struct {
		Name       string `json:"name"`
		Generation uint64 `json:"generation"`
		Seq        uint64 `json:"seq"`
		Root       string `json:"root"`
	} `json:"images"`
}

func (r failoverResultJSON) step(name string) failoverStepJSON {
	for _, s := range r.Steps {
		if strings.HasPrefix(s.Step, name) {
			return s
		}
	}
	return failoverStepJSON{}
}

// failoverCmd runs a failover command with --json and returns its one result.
func failoverCmd(t *testing.T, args ...string) failoverResultJSON {
	t.Helper()
	r := standin(3*time.Minute, append(append([]string{"failover"}, args...), "--json")...)
	var out []failoverResultJSON
	if err := json.Unmarshal([]byte(r.Stdout), &out); err != nil || len(out) != 1 {
		t.Fatalf("failover %v: exit %d, %v\n%s", args, r.Code, err, r)
	}
	if r.Code != 0 || out[0].Error != "" {
		t.Fatalf("failover %v failed: %s", args, r)
	}
	t.Logf("failover %s %s: steps %+v", args[0], out[0].Group, out[0].Steps)
	return out[0]
}

// listFailedOver reports whether the replica store shows group as failed
// over (points list still works; the status says so).
func listFailedOver(t *testing.T, rstore, group string) (string, bool) {
	t.Helper()
	r := mustStandin(t, "status", "--store", rstore, "--json")
	var st struct {
		Groups []struct {
			Group      string `json:"group"`
			FailedOver *struct {
				Point string `json:"point"`
			} `json:"failed_over"`
		} `json:"groups"`
	}
	if err := json.Unmarshal([]byte(r.Stdout), &st); err != nil {
		t.Fatalf("status --json: %v\n%s", err, r.Stdout)
	}
	for _, g := range st.Groups {
		if g.Group == group && g.FailedOver != nil {
			return g.FailedOver.Point, true
		}
	}
	return "", false
}

// history exports every point of group on rstore.
func history(t *testing.T, rstore, group string) map[string]map[string]string {
	t.Helper()
	out := map[string]map[string]string{}
	for _, p := range listPoints(t, rstore, group) {
		out[p.Point] = exportHashes(t, rstore, group, p.Point)
	}
	return out
}

// checkHistory fails unless every point of old still exports the same.
func checkHistory(t *testing.T, rstore, group string, old map[string]map[string]string, what string) {
	t.Helper()
	for p, want := range old {
		got := exportHashes(t, rstore, group, p)
		for n, h := range want {
			if got[n] != h {
				t.Errorf("%s: point %s image %s changed: %.16s, was %.16s", what, p, n, got[n], h)
			}
		}
	}
}

func TestFailoverPlannedRoundTrip(t *testing.T) {
	requireRoot(t)
	const size = 64 << 20
	ab, base, hs := twoHosts(t, size, 5, "a", "b")
	a, b := hs[0], hs[1]
	names := ab.Names
	ab.now()
	ab.writeRandom("disk.img", 50, 8, 0, size)
	ab.now()
	histB := history(t, b.RStore, "vm1")

	// Failback of a group that did not fail over: refused, nothing fenced.
	r0 := standin(cmdTimeout, "failover", "reverse", "--store", a.PStore, "--replica-store", a.RStore, "--group", "vm1")
	if r0.Code == 0 || !strings.Contains(r0.Stderr+r0.Stdout, "not failed over") {
		t.Fatalf("failover reverse of a live relationship: %s", r0)
	}
	ab.writeRandom("disk.img", 2, 1, 0, size) // still writable

	// Dry run: a plan, nothing changes.
	r := standin(cmdTimeout, "failover", "planned", "--store", a.PStore, "--replica-store", a.RStore, "--group", "vm1", "--dry-run")
	if r.Code != 0 || !strings.Contains(r.Stdout, "fence disk.img") || !strings.Contains(r.Stdout, "final cycle") {
		t.Fatalf("dry run: %s", r)
	}
	// Writes right before the failover travel with the final cycle.
	wA := ab.writeRandom("disk.img", 40, 4, 0, size)
	want := b3File(t, a.image("disk.img"))
	res := failoverCmd(t, "planned", "--store", a.PStore, "--replica-store", a.RStore, "--group", "vm1")
	if d := res.step("promote").Detail; !strings.Contains(d, "brought forward from the prepared copy") {
		t.Errorf("the promotion did not use the copy prepared while the VM ran: %q", d)
	}
	if fc := res.step("final cycle"); fc.Bytes > int64(len(wA))*blockSize*11/10+64<<10 {
		t.Errorf("final cycle sent %d bytes for %d blocks written (%d bytes)", fc.Bytes, len(wA), len(wA)*blockSize)
	}
	if _, err := os.Stat(a.image("disk.img")); !os.IsNotExist(err) {
		t.Errorf("the old primary still serves the image after the failover: %v", err)
	}
	if got := b3File(t, b.image("disk.img")); got != want {
		t.Fatalf("promoted image %.16s, primary had %.16s", got, want)
	}
	if got := b3File(t, filepath.Join(b.Mnt, "disk.img")); got != want {
		t.Fatalf("promoted image through B's mount %.16s, want %.16s", got, want)
	}
	checkHistory(t, b.RStore, "vm1", histB, "B's recovery points after the failover")
	if _, ok := listFailedOver(t, b.RStore, "vm1"); !ok {
		t.Error("B's replica store does not show the group as failed over")
	}
	// A's replica store starts with its own image, adopted (B's first,
	// empty cycle may have arrived already).
	if ps := listPoints(t, a.RStore, "vm1"); len(ps) < 1 || len(ps) > 2 {
		t.Errorf("A's replica store has points %v, want the adopted one (and B's first cycle)", pointIDs(ps))
	} else if got := exportHashes(t, a.RStore, "vm1", ps[0].Point)["disk.img"]; got != want {
		t.Errorf("A's adopted replica copy %.16s, want %.16s", got, want)
	}

	// B runs the VM and replicates back to A: only what B writes travels.
	ba := b.env(t, "vm1", names, a.Rep, base)
	wB := ba.writeRandom("disk.img", 60, 8, 0, size)
	ba.now()
	if sent := ba.status().BytesSent; sent > int64(len(wB))*blockSize*11/10+64<<10 {
		t.Errorf("reverse replication sent %d bytes for %d blocks written (%d bytes)", sent, len(wB), len(wB)*blockSize)
	} else {
		t.Logf("reverse replication: %d bytes sent for %d blocks (%d bytes) written on the new primary", sent, len(wB), len(wB)*blockSize)
	}
	wantB := b3File(t, b.image("disk.img"))
	if got := exportHashes(t, a.RStore, "vm1", "latest")["disk.img"]; got != wantB {
		t.Fatalf("A's replica after reverse replication %.16s, B has %.16s", got, wantB)
	}
	histA := history(t, a.RStore, "vm1")
	histB = history(t, b.RStore, "vm1")

	// Planned failover back to A.
	wB2 := ba.writeRandom("disk.img", 20, 4, 0, size)
	wantB = b3File(t, b.image("disk.img"))
	res = failoverCmd(t, "planned", "--store", b.PStore, "--replica-store", b.RStore, "--group", "vm1")
	if fc := res.step("final cycle"); fc.Bytes > int64(len(wB2))*blockSize*11/10+64<<10 {
		t.Errorf("final cycle back sent %d bytes for %d blocks written", fc.Bytes, len(wB2))
	}
	if got := b3File(t, a.image("disk.img")); got != wantB {
		t.Fatalf("A after failing back %.16s, B had %.16s", got, wantB)
	}
	checkHistory(t, a.RStore, "vm1", histA, "A's recovery points after failing back")
	checkHistory(t, b.RStore, "vm1", histB, "B's recovery points after failing back")
	if got := exportHashes(t, b.RStore, "vm1", "latest")["disk.img"]; got != wantB {
		t.Errorf("B's replica copy after failing back %.16s, want %.16s", got, wantB)
	}

	// A replicates to B again, deltas only.
	ab.Pri = a.Pri
	s0 := ab.status().BytesSent
	wA2 := ab.writeRandom("disk.img", 30, 8, 0, size)
	ab.now()
	if sent := ab.status().BytesSent - s0; sent > int64(len(wA2))*blockSize*11/10+64<<10 {
		t.Errorf("after failing back, A sent %d bytes for %d blocks written", sent, len(wA2))
	}
	if got, want := exportHashes(t, b.RStore, "vm1", "latest")["disk.img"], b3File(t, a.image("disk.img")); got != want {
		t.Errorf("B's replica after the round trip %.16s, A has %.16s", got, want)
	}
	checkHistory(t, b.RStore, "vm1", histB, "B's older recovery points after replication resumed")
	verifyPoint(t, b.RStore, "vm1", "latest")
	verifyPoint(t, a.RStore, "vm1", "latest")
}

func TestFailoverUnplannedFailback(t *testing.T) {
	requireRoot(t)
	const size = 64 << 20
	ab, base, hs := twoHosts(t, size, 5, "a", "b")
	a, b := hs[0], hs[1]
	names := ab.Names
	// B keeps a warm standby copy: the unplanned failover copies nothing.
	b.Rep.Stop()
	b.Rep.Args = append(b.Rep.Args, "--warm-standby")
	b.Rep.Restart()
	ab.now()
	ab.writeRandom("disk.img", 30, 8, 0, size)
	ab.now()

	// A cycle in flight: 8 MiB of new data throttled to 1 Mbit/s, and the
	// primary dies (kill -9) during the upload.
	ab.enable(b.Rep.Addr, "--interval", "1h", "--bandwidth", "1Mbit")
	ab.writeSeq("disk.img", 16<<20, 8<<20)
	mustStandin(t, "replicate", "now", "--store", a.PStore, "--group", "vm1")
	if !waitFor(60*time.Second, 100*time.Millisecond, func() bool { _, n := inboxFiles(b.RStore, "vm1", ".part"); return n > 0 }) {
		t.Fatal("no upload in flight")
	}
	a.Pri.Kill()
	if err := teardownMount(a.Mnt); err != nil {
		t.Fatal(err)
	}
	before := listPoints(t, b.RStore, "vm1")
	latest := exportHashes(t, b.RStore, "vm1", "latest")["disk.img"]

	// Unplanned failover on B to the latest point.
	r := standin(cmdTimeout, "failover", "unplanned", "--store", b.RStore, "--group", "vm1", "--dry-run")
	if r.Code != 0 || !strings.Contains(r.Stdout, "failed over") {
		t.Fatalf("unplanned dry run: %s", r)
	}
	res := failoverCmd(t, "unplanned", "--store", b.RStore, "--group", "vm1")
	if d := res.step("promote").Detail; !strings.Contains(d, "warm standby") {
		t.Errorf("unplanned failover with a warm standby copied the image: %q", d)
	}
	if got := b3File(t, b.image("disk.img")); got != latest {
		t.Fatalf("promoted image %.16s, latest point %.16s", got, latest)
	}
	ba := b.env(t, "vm1", names, a.Rep, base)
	wB := ba.writeRandom("disk.img", 40, 8, 0, size)
	afterB := b3File(t, b.image("disk.img"))

	// The stale primary comes back and pushes its in-flight cycle: refused,
	// nothing on B changes; its status says why.
	a.Pri = startDaemon(t, a.PStore, a.Mnt)
	ab.Pri = a.Pri
	ab.enable(b.Rep.Addr, "--interval", "1h", "--any-point-window", "1h") // unthrottled again (the failback inherits the settings)
	if !waitFor(60*time.Second, 200*time.Millisecond, func() bool {
		st := ab.status()
		return st.Health == "Critical" && strings.Contains(strings.Join(st.Reasons, " "), "split brain")
	}) {
		t.Fatalf("the stale primary does not report the refusal: %+v", ab.status())
	}
	if got := pointIDs(listPoints(t, b.RStore, "vm1")); strings.Join(got, ",") != strings.Join(pointIDs(before), ",") {
		t.Errorf("B's points changed after the stale push: %v, were %v", got, pointIDs(before))
	}
	if got := b3File(t, b.image("disk.img")); got != afterB {
		t.Errorf("B's image changed after the stale push")
	}
	// The old VM ran on A for a while too.
	wA := ab.writeRandom("disk.img", 20, 8, 0, size)
	staleA := b3File(t, a.image("disk.img"))
	differ := int64(len(diffBlocks(t, a.image("disk.img"), b.image("disk.img"))))
	t.Logf("blocks differing between the old and the new primary: %d (%d written on B, %d on A after its return, 2048 in flight)", differ, len(wB), len(wA))

	// Failback: A becomes B's replica, only differing blocks travel.
	failoverCmd(t, "reverse", "--store", a.PStore, "--replica-store", a.RStore, "--group", "vm1")
	ba.now()
	sent := ba.status().BytesSent
	t.Logf("failback sent %d bytes for %d differing blocks (%d bytes)", sent, differ, differ*blockSize)
	if sent > differ*blockSize*11/10 {
		t.Errorf("failback sent %d bytes, more than 1.1× the %d differing blocks (%d bytes)", sent, differ, differ*blockSize)
	}
	wantB := b3File(t, b.image("disk.img"))
	if got := exportHashes(t, a.RStore, "vm1", "latest")["disk.img"]; got != wantB {
		t.Fatalf("A's replica after failback %.16s, B has %.16s", got, wantB)
	}
	// What only A had stays recoverable as a point on A.
	ps := listPoints(t, a.RStore, "vm1")
	if len(ps) < 2 {
		t.Fatalf("A's replica store has points %v, want the adopted state and the failback", pointIDs(ps))
	}
	if got := exportHashes(t, a.RStore, "vm1", ps[0].Point)["disk.img"]; got != staleA {
		t.Errorf("A's own last state is not kept as a point: %.16s, want %.16s", got, staleA)
	}
	verifyPoint(t, a.RStore, "vm1", "latest")

	// And back to A, planned.
	failoverCmd(t, "planned", "--store", b.PStore, "--replica-store", b.RStore, "--group", "vm1")
	if got := b3File(t, a.image("disk.img")); got != wantB {
		t.Fatalf("A after the planned failover back %.16s, want %.16s", got, wantB)
	}
}

// TestFailoverPlannedCrash kills (-9) each side in the middle of a planned
// failover, right after the replica promoted its copy: the old primary's
// images stay fenced (no split brain), and running the same command again
// finishes the failover.
func TestFailoverPlannedCrash(t *testing.T) {
	requireRoot(t)
	const size = 32 << 20
	ab, base, hs := twoHosts(t, size, 9, "a", "b")
	a, b := hs[0], hs[1]
	names := ab.Names
	ab.now()
	writeFails := func(what string) {
		t.Helper()
		f, err := os.OpenFile(filepath.Join(a.Mnt, "disk.img"), os.O_RDWR, 0)
		if err == nil {
			f.Close()
			t.Fatalf("%s: the old primary's image opens for writing: not fenced", what)
		}
		if !strings.Contains(err.Error(), "read-only") {
			t.Fatalf("%s: open for writing: %v, want EROFS", what, err)
		}
	}

	// 0. The replica host's mount daemon is not running: refused before
	// anything is promoted; the images are writable again and replication
	// goes on.
	if err := b.Pri.Stop(); err != nil {
		t.Fatal(err)
	}
	r := standin(2*time.Minute, "failover", "planned", "--store", a.PStore, "--replica-store", a.RStore, "--group", "vm1")
	if r.Code == 0 || !strings.Contains(r.Stdout+r.Stderr, "cannot take the group") || !strings.Contains(r.Stdout+r.Stderr, "writable again") {
		t.Fatalf("failover planned without the replica host's mount daemon: %s", r)
	}
	ab.writeRandom("disk.img", 5, 2, 0, size)
	if st := ab.status(); st.Paused {
		t.Errorf("replication stays paused after a refused failover: %+v", st)
	}
	if _, promoted := listFailedOver(t, b.RStore, "vm1"); promoted {
		t.Error("the replica marked the group failed over although it refused")
	}
	b.Pri = startDaemon(t, b.PStore, b.Mnt)

	// 1. The replica daemon dies right after it promoted its copy.
	ab.writeRandom("disk.img", 30, 4, 0, size)
	want := b3File(t, a.image("disk.img"))
	b.Rep.Stop()
	b.Rep.Env = []string{"STANDIN_TEST_FAILOVER_CRASH=replica-after-promote"}
	b.Rep.start()
	r = standin(2*time.Minute, "failover", "planned", "--store", a.PStore, "--replica-store", a.RStore, "--group", "vm1")
	if r.Code == 0 {
		t.Fatalf("failover planned succeeded although the replica daemon died: %s", r)
	}
	writeFails("replica killed during the promotion")
	if got := b3File(t, a.image("disk.img")); got != want {
		t.Fatalf("the old primary's image changed")
	}
	b.Rep.Env = nil
	b.Rep.Restart()
	failoverCmd(t, "planned", "--store", a.PStore, "--replica-store", a.RStore, "--group", "vm1")
	if got := b3File(t, b.image("disk.img")); got != want {
		t.Fatalf("promoted image after the repeated failover %.16s, want %.16s", got, want)
	}

	// 2. Back to A; this time A's mount daemon dies right after B promoted.
	ba := b.env(t, "vm1", names, a.Rep, base)
	ba.writeRandom("disk.img", 30, 4, 0, size)
	ba.now()
	failoverCmd(t, "planned", "--store", b.PStore, "--replica-store", b.RStore, "--group", "vm1")
	if err := a.Pri.Stop(); err != nil {
		t.Fatal(err)
	}
	a.Pri = startDaemon(t, a.PStore, a.Mnt, "STANDIN_TEST_FAILOVER_CRASH=after-promote")
	ab.Pri = a.Pri
	ab.writeRandom("disk.img", 30, 4, 0, size)
	want = b3File(t, a.image("disk.img"))
	r = standin(2*time.Minute, "failover", "planned", "--store", a.PStore, "--replica-store", a.RStore, "--group", "vm1")
	if r.Code == 0 {
		t.Fatalf("failover planned succeeded although the daemon was killed: %s", r)
	}
	if !a.Pri.Wait(10 * time.Second) {
		t.Fatal("the crash hook did not kill the daemon")
	}
	if err := teardownMount(a.Mnt); err != nil {
		t.Fatal(err)
	}
	a.Pri = startDaemon(t, a.PStore, a.Mnt)
	ab.Pri = a.Pri
	writeFails("after kill -9 and restart")
	if im := mustImage(t, getStatus(t, a.PStore, false), "disk.img"); !im.Fenced || im.Health == "ok" || !strings.Contains(strings.Join(im.Reasons, " "), "planned failover") {
		t.Errorf("status of the fenced image after the restart: %+v", im)
	}
	if r := standin(cmdTimeout, "status", "--store", a.PStore); !strings.Contains(r.Stdout, "read-only: planned failover") {
		t.Errorf("standin status does not say the image is fenced: %s", r)
	}
	if got := b3File(t, b.image("disk.img")); got != want {
		t.Fatalf("B's promoted image %.16s, want %.16s", got, want)
	}
	failoverCmd(t, "planned", "--store", a.PStore, "--replica-store", a.RStore, "--group", "vm1")
	if _, err := os.Stat(a.image("disk.img")); !os.IsNotExist(err) {
		t.Fatalf("A still serves the image after the repeated failover: %v", err)
	}
	if got := exportHashes(t, a.RStore, "vm1", "latest")["disk.img"]; got != want {
		t.Fatalf("A's replica copy %.16s, want %.16s", got, want)
	}
	ba.writeRandom("disk.img", 10, 4, 0, size)
	ba.now()
	if got, want := exportHashes(t, a.RStore, "vm1", "latest")["disk.img"], b3File(t, b.image("disk.img")); got != want {
		t.Fatalf("replication back after the crash: A %.16s, B %.16s", got, want)
	}
}

// TestFailoverUnplannedOlderPoint promotes a point older than the latest:
// the changes the replica applied after it (shipped by the old primary, so
// not in its tracker state) must still travel back at failback.
func TestFailoverUnplannedOlderPoint(t *testing.T) {
	requireRoot(t)
	const size = 32 << 20
	ab, base, hs := twoHosts(t, size, 11, "a", "b")
	a, b := hs[0], hs[1]
	ab.now()
	ab.writeRandom("disk.img", 20, 8, 0, size)
	ab.now()
	ps := listPoints(t, b.RStore, "vm1")
	older := ps[len(ps)-1].Point
	want := exportHashes(t, b.RStore, "vm1", older)["disk.img"]
	w2 := ab.writeRandom("disk.img", 30, 8, 0, size) // shipped and applied after the older point
	ab.now()
	if err := a.Pri.Stop(); err != nil { // the primary is gone
		t.Fatal(err)
	}
	res := failoverCmd(t, "unplanned", "--store", b.RStore, "--group", "vm1", "--point", older)
	if res.Point != older {
		t.Errorf("promoted point %s, asked for %s", res.Point, older)
	}
	if got := b3File(t, b.image("disk.img")); got != want {
		t.Fatalf("promoted image %.16s, point %s was %.16s", got, older, want)
	}
	ba := b.env(t, "vm1", ab.Names, a.Rep, base)
	ba.writeRandom("disk.img", 10, 4, 0, size)

	a.Pri = startDaemon(t, a.PStore, a.Mnt)
	differ := int64(len(diffBlocks(t, a.image("disk.img"), b.image("disk.img"))))
	failoverCmd(t, "reverse", "--store", a.PStore, "--replica-store", a.RStore, "--group", "vm1")
	ba.now()
	if got, want := exportHashes(t, a.RStore, "vm1", "latest")["disk.img"], b3File(t, b.image("disk.img")); got != want {
		t.Fatalf("A after failback from an older point %.16s, B %.16s", got, want)
	}
	sent := ba.status().BytesSent
	t.Logf("failback from an older point: %d bytes for %d differing blocks (%d written on A after the point)", sent, differ, len(w2))
	if sent > differ*blockSize*11/10+64<<10 {
		t.Errorf("failback sent %d bytes for %d differing blocks", sent, differ)
	}
}

// TestFailoverBulk: two VMs (groups) fail over with one command (--all), the
// dry run lists both and changes nothing, and an unplanned failover takes a
// list of groups.
func TestFailoverBulk(t *testing.T) {
	requireRoot(t)
	const size = 16 << 20
	ab, base, hs := twoHosts(t, size, 13, "a", "b")
	a, b := hs[0], hs[1]
	// A second VM: its disk created through A's mount, replicated to B too
	// (paired again: one certificate per replica, allowing both groups).
	prefill(t, filepath.Join(a.Mnt, "disk2.img"), size, base.rng)
	mustStandin(t, "pair", "join", "--store", a.PStore, "--token", func() string {
		r := mustStandin(t, "pair", "token", "--store", b.RStore, "--images", "vm1/*,vm2/*", "--json")
		var tok map[string]string
		if err := json.Unmarshal([]byte(r.Stdout), &tok); err != nil {
			t.Fatal(err)
		}
		return tok["token"]
	}(), "--replica", b.Rep.Addr, "--name", "pri-vm2")
	mustStandin(t, "replicate", "enable", "--store", a.PStore, "--group", "vm2", "--images", "disk2.img", "--replica", b.Rep.Addr, "--interval", "1h")
	ab.now()
	mustStandin(t, "replicate", "now", "--store", a.PStore, "--group", "vm2", "--wait", "--timeout", "90s")

	r := standin(cmdTimeout, "failover", "planned", "--store", a.PStore, "--all", "--dry-run")
	if r.Code != 0 || !strings.Contains(r.Stdout, "vm1: planned failover plan") || !strings.Contains(r.Stdout, "vm2: planned failover plan") {
		t.Fatalf("dry run of --all: %s", r)
	}
	ab.writeRandom("disk.img", 3, 2, 0, size) // still writable: the dry run fenced nothing
	want1, want2 := b3File(t, a.image("disk.img")), b3File(t, a.image("disk2.img"))
	r = standin(3*time.Minute, "failover", "planned", "--store", a.PStore, "--replica-store", a.RStore, "--all", "--json")
	var out []failoverResultJSON
	if err := json.Unmarshal([]byte(r.Stdout), &out); err != nil || r.Code != 0 || len(out) != 2 || out[0].Error != "" || out[1].Error != "" {
		t.Fatalf("failover planned --all: %v %s", err, r)
	}
	if b3File(t, b.image("disk.img")) != want1 || b3File(t, b.image("disk2.img")) != want2 {
		t.Fatal("an image differs after the bulk failover")
	}

	// Both groups back with an unplanned failover on A (as if B were gone),
	// naming the groups.
	for _, g := range []string{"vm1", "vm2"} {
		mustStandin(t, "replicate", "now", "--store", b.PStore, "--group", g, "--wait", "--timeout", "90s")
	}
	if err := b.Pri.Stop(); err != nil {
		t.Fatal(err)
	}
	r = standin(3*time.Minute, "failover", "unplanned", "--store", a.RStore, "--group", "vm1,vm2", "--json")
	if err := json.Unmarshal([]byte(r.Stdout), &out); err != nil || r.Code != 0 || len(out) != 2 || out[0].Error != "" || out[1].Error != "" {
		t.Fatalf("failover unplanned --group vm1,vm2: %v %s", err, r)
	}
	if b3File(t, a.image("disk.img")) != b3File(t, b.image("disk.img")) || b3File(t, a.image("disk2.img")) != b3File(t, b.image("disk2.img")) {
		t.Fatal("an image differs after the bulk unplanned failover")
	}
}
