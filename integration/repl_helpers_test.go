package integration

// Helpers for the replication tests (TestRepl*): a replica daemon subprocess,
// a primary with a paired replica, random workloads through the mount, the
// replicate/points JSON, an mTLS client with the primary's credentials and a
// TCP proxy that can cut connections.

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// ---------------------------------------------------------------------------
// replica daemon

type replicaProc struct {
	t      testing.TB
	Store  string
	Addr   string
	cmd    *exec.Cmd
	out    *lockedBuffer
	done   chan struct{}
	logAll lockedBuffer // output of every incarnation
	Args   []string     // extra arguments of standin serve
	Env    []string     // extra environment of standin serve
	// NoFile, when set, is the open-file limit (soft and hard) the daemon
	// starts with (through prlimit, which executes it in its place).
	NoFile int
}

func freeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// startReplica starts `standin serve` on a free 127.0.0.1 port and waits until
// it is ready. Cleanup stops it (SIGTERM, then SIGKILL) and tears down the
// FUSE mounts it left (points mount, test failovers).
func startReplica(t testing.TB, store string, args ...string) *replicaProc {
	t.Helper()
	r := &replicaProc{t: t, Store: store, Addr: freeAddr(t), Args: args}
	r.start()
	t.Cleanup(func() {
		r.Stop()
		r.teardownMounts()
		if t.Failed() {
			t.Logf("replica %s output:\n%s", r.Addr, r.logAll.String())
		}
	})
	return r
}

func (r *replicaProc) start() {
	r.t.Helper()
	if err := os.MkdirAll(r.Store, 0o700); err != nil {
		r.t.Fatal(err)
	}
	r.out = &lockedBuffer{}
	r.done = make(chan struct{})
	argv := append([]string{standinBin, "serve", "--store", r.Store, "--listen", r.Addr}, r.Args...)
	if r.NoFile > 0 {
		argv = append([]string{"prlimit", fmt.Sprintf("--nofile=%d:%d", r.NoFile, r.NoFile), "--"}, argv...)
	}
	r.cmd = exec.Command(argv[0], argv[1:]...)
	r.cmd.Env = append(os.Environ(), r.Env...)
	startChild(r.t, "replica", r.cmd, io.MultiWriter(r.out, &r.logAll), r.done)
	done := r.done
	deadline := time.Now().Add(readyTimeout)
	for {
		select {
		case <-done:
			r.t.Fatalf("replica daemon exited before it was ready:\n%s", r.out.String())
		default:
		}
		if _, err := os.Stat(filepath.Join(r.Store, "control.sock")); err == nil {
			if standin(5*time.Second, "pair", "list", "--store", r.Store).Code == 0 {
				if c, err := net.DialTimeout("tcp", r.Addr, time.Second); err == nil {
					c.Close()
					return
				}
			}
		}
		if time.Now().After(deadline) {
			r.t.Fatalf("replica daemon not ready after %v:\n%s", readyTimeout, r.out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (r *replicaProc) running() bool { return !exited(r.done) }

// teardownMounts removes, once the daemon is gone, its points mount and
// every FUSE mount below the directory of its store whose server is gone
// (its test failover mounts; a live mount there belongs to another daemon).
func (r *replicaProc) teardownMounts() {
	if r.running() {
		return
	}
	var ps []string
	for i, a := range r.Args {
		if a == "--points-mount" && i+1 < len(r.Args) {
			ps = append(ps, r.Args[i+1])
		}
	}
	for _, mi := range mountsUnder(filepath.Dir(r.Store)) {
		if strings.HasPrefix(mi.FSType, "fuse") && deadFUSE(mi.Point) {
			ps = append(ps, mi.Point)
		}
	}
	for _, p := range ps {
		if err := teardownMount(p); err != nil {
			r.t.Errorf("cleanup: replica mount: %v", err)
		}
	}
}

// deadFUSE reports whether the FUSE mount at p lost its server (ENOTCONN).
func deadFUSE(p string) bool {
	ch := make(chan error, 1)
	go func() { // open, not stat: the kernel may answer a stat from its cache
		f, err := os.Open(p)
		if err == nil {
			f.Close()
		}
		ch <- err
	}()
	select {
	case err := <-ch:
		return errors.Is(err, syscall.ENOTCONN)
	case <-time.After(2 * time.Second):
		return false // hung: not ours to judge
	}
}

// startChild starts the child process cmd with its output to out, to be
// killed with the test binary (Pdeathsig), and closes done once it exited.
func startChild(t testing.TB, what string, cmd *exec.Cmd, out io.Writer, done chan struct{}) {
	t.Helper()
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", what, err)
	}
	go func() { cmd.Wait(); close(done) }()
}

// exited reports whether done (closed when a child process exited) is closed.
func exited(done <-chan struct{}) bool {
	select {
	case <-done:
		return true
	default:
		return false
	}
}

// Kill sends SIGKILL and waits.
func (r *replicaProc) Kill() {
	if r.running() {
		r.cmd.Process.Kill()
	}
	select {
	case <-r.done:
	case <-time.After(10 * time.Second):
		r.t.Errorf("replica pid %d did not die after SIGKILL", r.cmd.Process.Pid)
	}
}

// Stop sends SIGTERM, waits up to 10 s, then kills.
func (r *replicaProc) Stop() {
	if !r.running() {
		return
	}
	r.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-r.done:
		return
	case <-time.After(10 * time.Second):
	}
	r.t.Errorf("replica ignored SIGTERM for 10 s; killing")
	r.Kill()
}

// Restart starts the daemon again on the same store and port.
func (r *replicaProc) Restart() {
	r.t.Helper()
	if r.running() {
		r.t.Fatalf("replica still running")
	}
	r.start()
}

// ---------------------------------------------------------------------------
// JSON of replicate list / points

type replGroup struct {
	Group        string   `json:"group"`
	Replica      string   `json:"replica"`
	Images       []string `json:"images"`
	Paused       bool     `json:"paused"`
	Health       string   `json:"health"`
	Reasons      []string `json:"reasons"`
	LastPoint    string   `json:"last_point"`
	LagSeconds   float64  `json:"lag_seconds"`
	PendingBytes int64    `json:"pending_bytes"`
	BytesSent    int64    `json:"bytes_sent"`
	Cycles       int      `json:"cycles_replicated"`
	LastError    string   `json:"last_error"`
}

type pointInfo struct {
	Point string            `json:"point"`
	Time  time.Time         `json:"time"`
	Cycle uint64            `json:"cycle"`
	Seqs  map[string]uint64 `json:"seqs"`
	Kind  string            `json:"kind"`
	Bytes int64             `json:"bytes"`
}

type verifyReport struct {
	Blocks   uint64          `json:"blocks"`
	Mismatch json.RawMessage `json:"mismatch"`
}

// replicaStatus is the part of 'standin status --json' on a replica the
// tests read.
type replicaStatus struct {
	Groups []struct {
		Group   string   `json:"group"`
		Health  string   `json:"health"`
		Reasons []string `json:"reasons"`
	} `json:"groups"`
	Usage []struct {
		Name  string `json:"name"`
		Usage struct {
			Held int64 `json:"held"`
		} `json:"usage"`
		Groups []string `json:"groups"`
	} `json:"usage"`
}

func getReplicaStatus(t testing.TB, rstore string) replicaStatus {
	t.Helper()
	r := mustStandin(t, "status", "--store", rstore, "--json")
	var st replicaStatus
	if err := json.Unmarshal([]byte(r.Stdout), &st); err != nil {
		t.Fatalf("status --json: %v\n%s", err, r.Stdout)
	}
	return st
}

// replicaHealth returns the health and reasons of group in the replica
// daemon's status.
func replicaHealth(t testing.TB, rstore, group string) (string, []string) {
	t.Helper()
	st := getReplicaStatus(t, rstore)
	for _, g := range st.Groups {
		if g.Group == group {
			return g.Health, g.Reasons
		}
	}
	t.Fatalf("replica status has no group %s: %+v", group, st.Groups)
	return "", nil
}

func replGroupStatus(t testing.TB, pstore, group string) replGroup {
	t.Helper()
	r := mustStandin(t, "replicate", "list", "--store", pstore, "--json")
	var gs []replGroup
	if err := json.Unmarshal([]byte(r.Stdout), &gs); err != nil {
		t.Fatalf("replicate list --json: %v\n%s", err, r.Stdout)
	}
	for _, g := range gs {
		if g.Group == group {
			return g
		}
	}
	t.Fatalf("replicate list has no group %q: %s", group, r.Stdout)
	return replGroup{}
}

func listPoints(t testing.TB, rstore, group string) []pointInfo {
	t.Helper()
	r := mustStandin(t, "points", "list", "--store", rstore, "--group", group, "--json")
	var ps []pointInfo
	if err := json.Unmarshal([]byte(r.Stdout), &ps); err != nil {
		t.Fatalf("points list --json: %v\n%s", err, r.Stdout)
	}
	return ps
}

func pointIDs(ps []pointInfo) []string {
	var out []string
	for _, p := range ps {
		out = append(out, p.Point+"/"+p.Kind)
	}
	return out
}

// verifyPoint runs points verify and fails unless it reports no mismatch and
// a non-zero block count.
func verifyPoint(t testing.TB, rstore, group, point string) uint64 {
	t.Helper()
	return checkVerify(t, group, point, runVerify(rstore, group, point))
}

func runVerify(rstore, group, point string) result {
	return standin(cmdTimeout, "points", "verify", "--store", rstore, "--group", group, "--point", point, "--json")
}

// checkVerify checks the outcome r of 'points verify --json' (runVerify):
// success, no mismatch, some blocks checked; it returns the blocks checked.
func checkVerify(t testing.TB, group, point string, r result) uint64 {
	t.Helper()
	if r.Code != 0 {
		t.Errorf("points verify %s/%s: %s", group, point, r)
		return 0
	}
	var v verifyReport
	if err := json.Unmarshal([]byte(r.Stdout), &v); err != nil {
		t.Fatalf("points verify --json: %v\n%s", err, r.Stdout)
	}
	if m := strings.TrimSpace(string(v.Mismatch)); m != "" && m != "null" {
		t.Errorf("points verify %s/%s: mismatch %s", group, point, m)
	}
	if v.Blocks == 0 {
		t.Errorf("points verify %s/%s checked 0 blocks: %s", group, point, r.Stdout)
	}
	return v.Blocks
}

// exportHashes exports a point of the whole group into a fresh directory and
// returns the BLAKE3 of each exported file by base name; the files are removed.
func exportHashes(t testing.TB, rstore, group, point string) map[string]string {
	t.Helper()
	dir, err := os.MkdirTemp(filepath.Dir(rstore), "export-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	to := filepath.Join(dir, "out")
	mustStandin(t, "points", "export", "--store", rstore, "--group", group, "--point", point, "--to", to)
	ents, err := os.ReadDir(to)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, e := range ents {
		out[e.Name()] = b3File(t, filepath.Join(to, e.Name()))
	}
	return out
}

// ---------------------------------------------------------------------------
// environment: one primary (mount daemon) + one replica, paired

type replEnv struct {
	t      *testing.T
	dir    string
	PStore string
	Mnt    string
	RStore string
	Rep    *replicaProc
	Pri    *Daemon
	Group  string
	Names  []string
	Sizes  map[string]int64
	rng    *rand.Rand
}

type imgSpec struct {
	Name string
	Size int64
}

// newReplEnv prefills the images with random data in PSTORE/images before the
// first mount (so the base carries it), starts the replica and the primary.
func newReplEnv(t *testing.T, group string, imgs ...imgSpec) *replEnv {
	t.Helper()
	requireRoot(t)
	dir := testDir(t)
	e := bareReplEnv(t, dir, filepath.Join(dir, "pstore"), filepath.Join(dir, "mnt"), filepath.Join(dir, "rstore"), group,
		rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 7)))
	e.prefillImages(imgs...)
	e.Rep = startReplica(t, e.RStore)
	e.Pri = startDaemon(t, e.PStore, e.Mnt)
	return e
}

// bareReplEnv returns the environment of a group's primary (store pstore,
// mount mnt) and replica (store rstore), with no image, process or pairing
// yet.
func bareReplEnv(t *testing.T, dir, pstore, mnt, rstore, group string, rng *rand.Rand) *replEnv {
	return &replEnv{t: t, dir: dir, PStore: pstore, Mnt: mnt, RStore: rstore, Group: group, Sizes: map[string]int64{}, rng: rng}
}

// prefillImages adds the images to the group and creates them, prefilled,
// in the primary's store.
func (e *replEnv) prefillImages(imgs ...imgSpec) {
	e.t.Helper()
	e.prefillImagesWith(prefill, imgs...)
}

// prefillImagesWith adds the images to the group and creates them in the
// primary's store with fill.
func (e *replEnv) prefillImagesWith(fill func(t testing.TB, path string, size int64, rng *rand.Rand), imgs ...imgSpec) {
	e.t.Helper()
	if err := os.MkdirAll(filepath.Join(e.PStore, "images"), 0o700); err != nil {
		e.t.Fatal(err)
	}
	for _, im := range imgs {
		e.Names = append(e.Names, im.Name)
		e.Sizes[im.Name] = im.Size
		fill(e.t, filepath.Join(e.PStore, "images", im.Name), im.Size, e.rng)
	}
}

// otherHost starts a second primary host (its own store and mount, its
// images prefilled with rng) for group, on the same replica as e.
func (e *replEnv) otherHost(dir, pstore, mnt, group string, rng *rand.Rand, imgs ...imgSpec) *replEnv {
	e.t.Helper()
	h := bareReplEnv(e.t, dir, pstore, mnt, e.RStore, group, rng)
	h.Rep = e.Rep
	h.prefillImages(imgs...)
	h.Pri = startDaemon(e.t, h.PStore, h.Mnt)
	return h
}

// prefill writes random data over most of a new file of size bytes, leaving a
// few holes so the image is sparse.
func prefill(t testing.TB, path string, size int64, rng *rand.Rand) {
	t.Helper()
	buf := make([]byte, 1<<20)
	createImage(t, path, size, func(f *os.File) error {
		for off := int64(0); off < size; off += int64(len(buf)) {
			if (off>>20)%4 == 3 {
				continue // a hole every 4 MiB
			}
			fillRandom(rng, buf)
			if _, err := f.WriteAt(buf[:min(int64(len(buf)), size-off)], off); err != nil {
				return err
			}
		}
		return nil
	})
}

// createImage creates (or truncates) path as a sparse file of size bytes,
// lets write fill it and makes it durable (fsync).
func createImage(t testing.TB, path string, size int64, write func(f *os.File) error) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR|os.O_TRUNC, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	if err := write(f); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

func fillRandom(rng *rand.Rand, b []byte) {
	for i := 0; i+8 <= len(b); i += 8 {
		v := rng.Uint64()
		b[i], b[i+1], b[i+2], b[i+3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
		b[i+4], b[i+5], b[i+6], b[i+7] = byte(v>>32), byte(v>>40), byte(v>>48), byte(v>>56)
	}
}

// pair issues a token on the replica (allowing pattern, with extra 'pair
// token' flags) and joins the primary with it as "pri-GROUP", through
// replicaAddr (the replica itself or a proxy in front of it).
func (e *replEnv) pair(pattern, replicaAddr string, tokenFlags ...string) {
	e.t.Helper()
	r := mustStandin(e.t, append([]string{"pair", "token", "--store", e.RStore, "--images", pattern, "--json"}, tokenFlags...)...)
	var tok map[string]string
	if err := json.Unmarshal([]byte(r.Stdout), &tok); err != nil || tok["token"] == "" {
		e.t.Fatalf("pair token --json: %v: %s", err, r.Stdout)
	}
	mustStandin(e.t, "pair", "join", "--store", e.PStore, "--token", tok["token"], "--replica", replicaAddr, "--name", "pri-"+e.Group)
}

// enable enables replication of the group to replicaAddr with extra flags.
func (e *replEnv) enable(replicaAddr string, extra ...string) {
	e.t.Helper()
	args := []string{"replicate", "enable", "--store", e.PStore, "--group", e.Group, "--images", strings.Join(e.Names, ","), "--replica", replicaAddr}
	mustStandin(e.t, append(args, extra...)...)
}

// start pairs the primary with the replica for the group's images
// ("GROUP/*"), enables replication of the group with extra flags and ships
// a first cycle (now).
func (e *replEnv) start(extra ...string) {
	e.t.Helper()
	e.pair(e.Group+"/*", e.Rep.Addr)
	e.enable(e.Rep.Addr, extra...)
	e.now()
}

func (e *replEnv) now() {
	e.t.Helper()
	mustStandin(e.t, "replicate", "now", "--store", e.PStore, "--group", e.Group, "--wait", "--timeout", "90s")
}

func (e *replEnv) status() replGroup { e.t.Helper(); return replGroupStatus(e.t, e.PStore, e.Group) }

// frozen returns the BLAKE3 of every primary backing file.
func (e *replEnv) frozen() map[string]string {
	e.t.Helper()
	out := map[string]string{}
	for _, n := range e.Names {
		out[filepath.Base(n)] = b3File(e.t, filepath.Join(e.PStore, "images", n))
	}
	return out
}

// checkPoint exports point of the group and compares it with want.
func (e *replEnv) checkPoint(point string, want map[string]string, what string) {
	e.t.Helper()
	got := exportHashes(e.t, e.RStore, e.Group, point)
	if len(got) != len(want) {
		e.t.Errorf("%s: export of %s/%s has %d images %v, want %d", what, e.Group, point, len(got), got, len(want))
	}
	for n, h := range want {
		if got[n] != h {
			e.t.Errorf("%s: image %s at point %s: replica %.16s, primary frozen %.16s", what, n, point, got[n], h)
		}
	}
}

// writeRandom writes n random runs (1..maxRun blocks of random data) at
// 4 KiB-aligned offsets inside [lo, hi) of a mounted image, fsyncs, and
// returns the set of blocks written.
func (e *replEnv) writeRandom(name string, n, maxRun int, lo, hi int64) map[int64]bool {
	e.t.Helper()
	blocks, err := writeRandomErr(e.rng, filepath.Join(e.Mnt, name), n, maxRun, lo, hi)
	if err != nil {
		e.t.Fatal(err)
	}
	return blocks
}

func writeRandomErr(rng *rand.Rand, path string, n, maxRun int, lo, hi int64) (map[int64]bool, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	blocks := map[int64]bool{}
	nb := (hi - lo) / blockSize
	buf := make([]byte, maxRun*blockSize)
	for i := 0; i < n; i++ {
		run := 1 + rng.IntN(maxRun)
		b := lo/blockSize + rng.Int64N(nb-int64(run)+1)
		fillRandom(rng, buf[:run*blockSize])
		if _, err := f.WriteAt(buf[:run*blockSize], b*blockSize); err != nil {
			return blocks, err
		}
		for k := int64(0); k < int64(run); k++ {
			blocks[b+k] = true
		}
	}
	return blocks, f.Sync()
}

// writeSeq writes size bytes of random data at off, fsynced.
func (e *replEnv) writeSeq(name string, off, size int64) {
	e.t.Helper()
	f, err := os.OpenFile(filepath.Join(e.Mnt, name), os.O_RDWR, 0)
	if err != nil {
		e.t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for p := off; p < off+size; p += int64(len(buf)) {
		fillRandom(e.rng, buf)
		if _, err := f.WriteAt(buf[:min(int64(len(buf)), off+size-p)], p); err != nil {
			e.t.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		e.t.Fatal(err)
	}
}

// replicateKillMidApply starts a replication round of the group and kills
// the replica daemon (SIGKILL) as soon as its apply journal (apply.json)
// appears. It returns false when the round completed first (or 60 s passed)
// without the replica being caught mid-apply.
func (e *replEnv) replicateKillMidApply() bool {
	e.t.Helper()
	journal := filepath.Join(e.RStore, "groups", e.Group, "apply.json")
	c0 := e.status().Cycles
	mustStandin(e.t, "replicate", "now", "--store", e.PStore, "--group", e.Group)
	deadline := time.Now().Add(60 * time.Second)
	for i := 0; time.Now().Before(deadline); i++ {
		if _, err := os.Stat(journal); err == nil {
			e.Rep.Kill()
			return true
		}
		if i%500 == 499 && e.status().Cycles > c0 {
			return false
		}
		time.Sleep(time.Millisecond)
	}
	return false
}

// stagedFiles returns the number and total size of the staged (unshipped)
// cycle files of the primary.
func stagedFiles(pstore string) (n int, bytes int64) {
	files, _ := filepath.Glob(filepath.Join(pstore, "cycles", "*", "*.cyc"))
	for _, f := range files {
		if fi, err := os.Stat(f); err == nil {
			n++
			bytes += fi.Size()
		}
	}
	return
}

// inboxFiles returns the number and total size of the files of group in
// the replica inbox whose names end in suffix.
func inboxFiles(rstore, group, suffix string) (n int, bytes int64) {
	files, _ := filepath.Glob(filepath.Join(rstore, "inbox", group, "*"+suffix))
	for _, f := range files {
		if fi, err := os.Stat(f); err == nil {
			n++
			bytes += fi.Size()
		}
	}
	return
}

// waitFor polls cond every interval until it returns true or timeout passes.
func waitFor(timeout, interval time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(interval)
	}
}

// extents4M returns the number of distinct 4 MiB extents the blocks touch.
func extents4M(blocks map[int64]bool) int {
	ext := map[int64]bool{}
	for b := range blocks {
		ext[b*blockSize>>22] = true
	}
	return len(ext)
}

func mergeBlocks(dst, src map[int64]bool) {
	for b := range src {
		dst[b] = true
	}
}

// treeSnapshot lists every path below dir (relative), except skipped prefixes.
func treeSnapshot(t testing.TB, dir string, skip ...string) map[string]bool {
	t.Helper()
	out := map[string]bool{}
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		rel, _ := filepath.Rel(dir, p)
		for _, s := range skip {
			if rel == s || strings.HasPrefix(rel, s+"/") {
				if d.IsDir() {
					return filepath.SkipDir
				}
				return nil
			}
		}
		out[rel] = true
		return nil
	})
	return out
}

func newPaths(before, after map[string]bool) []string {
	var out []string
	for p := range after {
		if !before[p] {
			out = append(out, p)
		}
	}
	sort.Strings(out)
	return out
}

// ---------------------------------------------------------------------------
// mTLS client with the primary's credentials

func primaryCredDir(t testing.TB, pstore string) string {
	t.Helper()
	dirs, _ := filepath.Glob(filepath.Join(pstore, "replicas", "*"))
	if len(dirs) != 1 {
		t.Fatalf("want exactly one credential directory in %s/replicas, got %v", pstore, dirs)
	}
	return dirs[0]
}

func tlsClient(t testing.TB, caPEMFile, certFile, keyFile string) *http.Client {
	t.Helper()
	ca, err := os.ReadFile(caPEMFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		t.Fatalf("no certificate in %s", caPEMFile)
	}
	cfg := &tls.Config{RootCAs: pool, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12}
	if certFile != "" {
		c, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			t.Fatal(err)
		}
		cfg.Certificates = []tls.Certificate{c}
	}
	return &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: cfg, DisableKeepAlives: true}}
}

// primaryClient is an mTLS client with the paired primary's credentials.
func primaryClient(t testing.TB, pstore string) *http.Client {
	d := primaryCredDir(t, pstore)
	return tlsClient(t, filepath.Join(d, "ca.pem"), filepath.Join(d, "client.pem"), filepath.Join(d, "client.key"))
}

type httpResult struct {
	Status int
	Body   string
	Err    error
}

func (h httpResult) String() string {
	return fmt.Sprintf("status %d err %v body %s", h.Status, h.Err, strings.TrimSpace(h.Body))
}

// doRaw sends a request with a raw (not re-escaped) path.
func doRaw(c *http.Client, method, base, rawPath string, body []byte) httpResult {
	req, err := http.NewRequest(method, base+"/", nil)
	if err != nil {
		return httpResult{Err: err}
	}
	if i := strings.IndexByte(rawPath, '?'); i >= 0 {
		req.URL.RawQuery = rawPath[i+1:]
		rawPath = rawPath[:i]
	}
	req.URL.Opaque = rawPath // sent as is: "%2F" stays escaped
	if body != nil {
		req.Body = io.NopCloser(strings.NewReader(string(body)))
		req.ContentLength = int64(len(body))
	}
	resp, err := c.Do(req)
	if err != nil {
		return httpResult{Err: err}
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
	return httpResult{Status: resp.StatusCode, Body: string(b)}
}

// ---------------------------------------------------------------------------
// TCP proxy

type tcpProxy struct {
	ln     net.Listener
	target string
	up     atomic.Int64 // client → server bytes
	down   atomic.Int64
	refuse atomic.Bool
	mu     sync.Mutex
	conns  map[net.Conn]bool
}

func startProxy(t testing.TB, target string) *tcpProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &tcpProxy{ln: ln, target: target, conns: map[net.Conn]bool{}}
	go p.serve()
	t.Cleanup(func() { ln.Close(); p.dropAll() })
	return p
}

func (p *tcpProxy) Addr() string { return p.ln.Addr().String() }

func (p *tcpProxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		if p.refuse.Load() {
			c.Close()
			continue
		}
		s, err := net.DialTimeout("tcp", p.target, 5*time.Second)
		if err != nil {
			c.Close()
			continue
		}
		p.mu.Lock()
		p.conns[c], p.conns[s] = true, true
		p.mu.Unlock()
		pipe := func(dst, src net.Conn, n *atomic.Int64) {
			buf := make([]byte, 32<<10)
			for {
				k, err := src.Read(buf)
				if k > 0 {
					n.Add(int64(k))
					if _, werr := dst.Write(buf[:k]); werr != nil {
						break
					}
				}
				if err != nil {
					break
				}
			}
			dst.Close()
			src.Close()
		}
		go pipe(s, c, &p.up)
		go pipe(c, s, &p.down)
	}
}

// dropAll closes every proxied connection (both sides, with RST where possible).
func (p *tcpProxy) dropAll() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for c := range p.conns {
		if tc, ok := c.(*net.TCPConn); ok {
			tc.SetLinger(0)
		}
		c.Close()
		delete(p.conns, c)
		n++
	}
	return n
}
