package integration

import (
	"bufio"
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/zeebo/blake3"
	"golang.org/x/sys/unix"
)

const (
	blockSize    = 4096
	readyTimeout = 20 * time.Second
	cmdTimeout   = 2 * time.Minute
)

// requireRoot skips (or fails with CI=true) when the test cannot mount, and
// fails when the binary under test could not be found or built.
func requireRoot(t testing.TB) {
	t.Helper()
	why := ""
	if os.Geteuid() != 0 {
		why = "needs root"
	} else if _, err := os.Stat("/dev/fuse"); err != nil {
		why = "needs /dev/fuse: " + err.Error()
	}
	if why != "" {
		if ciStrict {
			t.Fatalf("%s (CI=true: not skipping)", why)
		}
		t.Skip(why)
	}
	if binErr != nil {
		t.Fatalf("standin binary: %v", binErr)
	}
}

// requireTools skips (or fails with CI=true) when an external program is missing.
func requireTools(t testing.TB, names ...string) {
	t.Helper()
	for _, n := range names {
		if _, err := exec.LookPath(n); err != nil {
			if ciStrict {
				t.Fatalf("%s not installed (CI=true: not skipping)", n)
			}
			t.Skipf("%s not installed", n)
		}
	}
}

var nameSanitizer = regexp.MustCompile(`[^A-Za-z0-9_.-]+`)

// testDir returns a fresh directory for t under this run's directory on
// /var/tmp. It is removed after a passing test (only when nothing is mounted
// below it) and kept after a failing one.
func testDir(t testing.TB) string {
	t.Helper()
	name := nameSanitizer.ReplaceAllString(t.Name(), "_")
	if len(name) > 60 {
		name = name[:60]
	}
	dir, err := os.MkdirTemp(runDir, name+"-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("keeping %s", dir)
			return
		}
		if len(mountsUnder(dir)) > 0 || len(loopsUnder(dir)) > 0 {
			t.Errorf("mount or loop device still present under %s", dir)
			return
		}
		os.RemoveAll(dir)
	})
	return dir
}

// ---------------------------------------------------------------------------
// Running commands

type result struct {
	Args   []string
	Stdout string
	Stderr string
	Code   int // exit code; -1 if it did not run or was killed
	Err    error
}

func (r result) String() string {
	return fmt.Sprintf("%q: exit %d (%v)\nstdout: %s\nstderr: %s", r.Args, r.Code, r.Err,
		strings.TrimSpace(r.Stdout), strings.TrimSpace(r.Stderr))
}

// execCmd runs name with a deadline and returns everything it printed.
func execCmd(timeout time.Duration, env []string, name string, args ...string) result {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.WaitDelay = 5 * time.Second
	var so, se bytes.Buffer
	cmd.Stdout, cmd.Stderr = &so, &se
	err := cmd.Run()
	r := result{Args: append([]string{name}, args...), Stdout: so.String(), Stderr: se.String(), Code: 0, Err: err}
	if err != nil {
		r.Code = -1
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			r.Code = ee.ExitCode()
		}
		if ctx.Err() != nil {
			r.Err = fmt.Errorf("timed out after %v: %w", timeout, err)
		}
	}
	return r
}

// mustRun runs a program and fails the test unless it exits 0. It returns
// stdout and stderr combined.
func mustRun(t testing.TB, timeout time.Duration, name string, args ...string) string {
	t.Helper()
	r := execCmd(timeout, nil, name, args...)
	if r.Code != 0 {
		t.Fatalf("command failed: %s", r)
	}
	return r.Stdout + r.Stderr
}

// standin runs the binary under test.
func standin(timeout time.Duration, args ...string) result {
	return execCmd(timeout, nil, standinBin, args...)
}

// mustStandin runs the binary and fails the test unless it exits 0.
func mustStandin(t testing.TB, args ...string) result {
	t.Helper()
	r := standin(cmdTimeout, args...)
	if r.Code != 0 {
		t.Fatalf("standin failed: %s", r)
	}
	return r
}

// ---------------------------------------------------------------------------
// Daemon

// lockedBuffer is an io.Writer safe for the exec copy goroutines and readers.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// Daemon is one `standin mount` subprocess.
type Daemon struct {
	t          testing.TB
	Store, Mnt string
	cmd        *exec.Cmd
	Stdout     lockedBuffer
	Stderr     lockedBuffer
	done       chan struct{}
	waitErr    error
	State      *os.ProcessState
}

// startDaemon starts `standin mount --store store mnt` with extra environment
// variables and waits until it is ready: `status --json` answers and the
// mount point shows in /proc/self/mountinfo. Cleanup stops it and tears the
// mount down, whatever happened.
func startDaemon(t testing.TB, store, mnt string, env ...string) *Daemon {
	t.Helper()
	return startDaemonFor(t, t, store, mnt, env...)
}

// startDaemonFor is startDaemon for a daemon that outlives the (sub)test t
// starting it: stopping and teardown are registered on owner.
func startDaemonFor(t, owner testing.TB, store, mnt string, env ...string) *Daemon {
	t.Helper()
	d := spawnDaemon(t, owner, store, mnt, env...)
	if err := d.waitReady(readyTimeout); err != nil {
		t.Fatalf("daemon not ready: %v\n%s", err, d.Output())
	}
	return d
}

func spawnDaemon(t, owner testing.TB, store, mnt string, env ...string) *Daemon {
	t.Helper()
	for _, p := range []string{store, mnt} {
		if err := os.MkdirAll(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	d := &Daemon{t: owner, Store: store, Mnt: mnt, done: make(chan struct{})}
	d.cmd = exec.Command(standinBin, "mount", "--store", store, mnt)
	d.cmd.Env = append(os.Environ(), env...)
	d.cmd.Stdout, d.cmd.Stderr = &d.Stdout, &d.Stderr
	// If the test binary dies (go test -timeout panic), take the daemon with
	// it; the next run's TestMain removes the dead mount.
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := d.cmd.Start(); err != nil {
		t.Fatalf("start daemon: %v", err)
	}
	go func() {
		d.waitErr = d.cmd.Wait()
		d.State = d.cmd.ProcessState
		close(d.done)
	}()
	owner.Cleanup(func() {
		if d.Running() {
			if err := d.Stop(); err != nil {
				owner.Errorf("daemon stop in cleanup: %v", err)
			}
		}
		if err := teardownMount(mnt); err != nil {
			owner.Errorf("cleanup: %v", err)
		}
		if owner.Failed() {
			owner.Logf("daemon (pid %d, env %v) output:\n%s", d.cmd.Process.Pid, env, d.Output())
		}
	})
	return d
}

// Output returns what the daemon printed so far.
func (d *Daemon) Output() string {
	return fmt.Sprintf("--- daemon stderr ---\n%s\n--- daemon stdout ---\n%s", d.Stderr.String(), d.Stdout.String())
}

// Running reports whether the process has not exited yet.
func (d *Daemon) Running() bool {
	select {
	case <-d.done:
		return false
	default:
		return true
	}
}

func (d *Daemon) waitReady(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last result
	for {
		if !d.Running() {
			return fmt.Errorf("daemon exited before it was ready: %v", d.waitErr)
		}
		last = standin(5*time.Second, "status", "--store", d.Store, "--json")
		if last.Code == 0 && isMounted(d.Mnt) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not ready after %v (mounted=%v); last status: %s", timeout, isMounted(d.Mnt), last)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Wait waits up to timeout for the daemon to exit on its own.
func (d *Daemon) Wait(timeout time.Duration) (exited bool) {
	select {
	case <-d.done:
		return true
	case <-time.After(timeout):
		return false
	}
}

// Stop sends SIGTERM and waits up to 10 s, then SIGKILLs. It returns nil only
// if the daemon exited 0 after SIGTERM.
func (d *Daemon) Stop() error {
	if !d.Running() {
		return fmt.Errorf("daemon already exited: %v", d.waitErr)
	}
	d.cmd.Process.Signal(syscall.SIGTERM)
	if d.Wait(10 * time.Second) {
		if d.waitErr != nil {
			return fmt.Errorf("daemon exit after SIGTERM: %v", d.waitErr)
		}
		return nil
	}
	d.cmd.Process.Kill()
	d.Wait(10 * time.Second)
	return fmt.Errorf("daemon ignored SIGTERM for 10s; killed")
}

// Kill sends SIGKILL and waits for the exit.
func (d *Daemon) Kill() {
	if d.Running() {
		d.cmd.Process.Kill()
	}
	if !d.Wait(10 * time.Second) {
		d.t.Errorf("daemon pid %d did not die within 10s of SIGKILL", d.cmd.Process.Pid)
	}
}

// Killed reports whether the daemon died from SIGKILL.
func (d *Daemon) Killed() bool {
	if d.Running() || d.State == nil {
		return false
	}
	ws, ok := d.State.Sys().(syscall.WaitStatus)
	return ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL
}

// ---------------------------------------------------------------------------
// status JSON

type imageStatus struct {
	Name            string     `json:"name"`
	ID              string     `json:"id"`
	Generation      uint64     `json:"generation"`
	Size            int64      `json:"size"`
	DirtyBlocks     int64      `json:"dirty_blocks"`
	DirtyBytes      int64      `json:"dirty_bytes"`
	NextSeq         uint64     `json:"next_seq"`
	Writes          int64      `json:"writes"`
	UncleanRecovery bool       `json:"unclean_recovery"`
	StagingBlocks   int64      `json:"staging_blocks"` // optional: blocks of a cut still being staged
	DirtyRanges     [][2]int64 `json:"dirty_ranges"`
	Fenced          bool       `json:"fenced"`
	Health          string     `json:"health"`
	Reasons         []string   `json:"reasons"`
}

type daemonStatus struct {
	PID        int           `json:"pid"`
	Mountpoint string        `json:"mountpoint"`
	Images     []imageStatus `json:"images"`
}

func (s daemonStatus) image(name string) (imageStatus, bool) {
	for _, im := range s.Images {
		if im.Name == name {
			return im, true
		}
	}
	return imageStatus{}, false
}

func getStatus(t testing.TB, store string, blocks bool) daemonStatus {
	t.Helper()
	args := []string{"status", "--store", store, "--json"}
	if blocks {
		args = append(args, "--blocks")
	}
	r := mustStandin(t, args...)
	var s daemonStatus
	if err := json.Unmarshal([]byte(r.Stdout), &s); err != nil {
		t.Fatalf("status --json: %v\n%s", err, r.Stdout)
	}
	return s
}

func mustImage(t testing.TB, s daemonStatus, name string) imageStatus {
	t.Helper()
	im, ok := s.image(name)
	if !ok {
		var names []string
		for _, im := range s.Images {
			names = append(names, im.Name)
		}
		t.Fatalf("status has no image %q (has %q)", name, names)
	}
	return im
}

// dirtySet expands dirty_ranges into a set of block numbers and checks the
// ranges are well formed and agree with dirty_blocks.
func dirtySet(t testing.TB, im imageStatus) map[int64]bool {
	t.Helper()
	set := map[int64]bool{}
	for _, r := range im.DirtyRanges {
		if r[0] < 0 || r[1] <= 0 {
			t.Fatalf("image %s: malformed dirty range %v", im.Name, r)
		}
		for b := r[0]; b < r[0]+r[1]; b++ {
			set[b] = true
		}
	}
	if int64(len(set)) != im.DirtyBlocks {
		t.Errorf("image %s: dirty_ranges cover %d blocks but dirty_blocks=%d", im.Name, len(set), im.DirtyBlocks)
	}
	return set
}

// ---------------------------------------------------------------------------
// cycles

type cutEntry struct {
	Image string `json:"image"`
	Seq   uint64 `json:"seq"`
	Path  string `json:"path"`
	Bytes int64  `json:"bytes"`
	// Optional extras the current binary prints (not in the minimal contract).
	GroupCut string `json:"group_cut"`
}

type listEntry struct {
	Image      string `json:"image"`
	ID         string `json:"id"`
	Generation uint64 `json:"generation"`
	Seq        uint64 `json:"seq"`
	Path       string `json:"path"`
	Bytes      int64  `json:"bytes"`
	Time       string `json:"time"`
}

func cutCycles(t testing.TB, store string, images ...string) []cutEntry {
	t.Helper()
	r := mustStandin(t, "cycle", "cut", "--store", store, "--images", strings.Join(images, ","), "--json")
	var out []cutEntry
	if err := json.Unmarshal([]byte(r.Stdout), &out); err != nil {
		t.Fatalf("cycle cut --json: %v\n%s", err, r.Stdout)
	}
	if len(out) != len(images) {
		t.Fatalf("cycle cut of %v returned %d entries: %s", images, len(out), r.Stdout)
	}
	for _, c := range out {
		if fi, err := os.Stat(c.Path); err != nil {
			t.Fatalf("cut cycle file: %v", err)
		} else if fi.Size() != c.Bytes {
			t.Errorf("cut %s seq %d: bytes=%d but file has %d", c.Image, c.Seq, c.Bytes, fi.Size())
		}
	}
	return out
}

func cutOne(t testing.TB, store, image string) cutEntry {
	t.Helper()
	c := cutCycles(t, store, image)[0]
	if c.Image != image {
		t.Fatalf("cut %s returned image %q", image, c.Image)
	}
	return c
}

func listCycles(t testing.TB, store, image string) []listEntry {
	t.Helper()
	args := []string{"cycle", "list", "--store", store, "--json"}
	if image != "" {
		args = append(args, "--image", image)
	}
	r := mustStandin(t, args...)
	var out []listEntry
	if err := json.Unmarshal([]byte(r.Stdout), &out); err != nil {
		t.Fatalf("cycle list --json: %v\n%s", err, r.Stdout)
	}
	return out
}

func applyCycles(t testing.TB, replica string, files ...string) {
	t.Helper()
	mustStandin(t, append([]string{"cycle", "apply", "--to", replica}, files...)...)
}

// ---------------------------------------------------------------------------
// mounts

type mountInfo struct {
	Point  string
	FSType string
	Major  uint32
	Minor  uint32
}

// unescapeMountinfo undoes the octal escapes (\040 etc.) of mountinfo fields.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func readMounts() []mountInfo {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []mountInfo
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<16), 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 7 {
			continue
		}
		mi := mountInfo{Point: unescapeMountinfo(fields[4])}
		if mm := strings.SplitN(fields[2], ":", 2); len(mm) == 2 {
			ma, _ := strconv.ParseUint(mm[0], 10, 32)
			mn, _ := strconv.ParseUint(mm[1], 10, 32)
			mi.Major, mi.Minor = uint32(ma), uint32(mn)
		}
		for i := 6; i < len(fields); i++ {
			if fields[i] == "-" && i+1 < len(fields) {
				mi.FSType = fields[i+1]
				break
			}
		}
		out = append(out, mi)
	}
	return out
}

func isMounted(p string) bool {
	p = filepath.Clean(p)
	for _, mi := range readMounts() {
		if mi.Point == p {
			return true
		}
	}
	return false
}

// mountsUnder lists mounts at or below dir, deepest first.
func mountsUnder(dir string) []mountInfo {
	dir = filepath.Clean(dir)
	var out []mountInfo
	for _, mi := range readMounts() {
		if mi.Point == dir || strings.HasPrefix(mi.Point, dir+"/") {
			out = append(out, mi)
		}
	}
	for i, j := 0, len(out)-1; i < j; i, j = i+1, j-1 {
		out[i], out[j] = out[j], out[i]
	}
	return out
}

// unmountTimeout runs umount2 in a goroutine so a hung kernel request cannot
// hang the caller; a stuck call is abandoned.
func unmountTimeout(p string, flags int, timeout time.Duration) error {
	ch := make(chan error, 1)
	go func() { ch <- unix.Unmount(p, flags) }()
	select {
	case err := <-ch:
		return err
	case <-time.After(timeout):
		return fmt.Errorf("umount2(%s, %#x) hung for %v", p, flags, timeout)
	}
}

func ensureFusectl() error {
	for _, mi := range readMounts() {
		if mi.Point == "/sys/fs/fuse/connections" {
			return nil
		}
	}
	return unix.Mount("none", "/sys/fs/fuse/connections", "fusectl", 0, "")
}

// teardownMount removes every mount at p (and below it): loop devices backed
// by files below p are detached first; then umount with retries, then the
// FUSE connection is aborted through fusectl, then a lazy unmount.
func teardownMount(p string) error {
	p = filepath.Clean(p)
	detachLoops(p)
	for _, sub := range mountsUnder(p) {
		if sub.Point != p {
			teardownMount(sub.Point)
		}
	}
	for i := 0; i < 4 && isMounted(p); i++ {
		if unmountTimeout(p, 0, 5*time.Second) == nil {
			continue
		}
		time.Sleep(time.Duration(100*(i+1)) * time.Millisecond)
	}
	if !isMounted(p) {
		return nil
	}
	for _, mi := range readMounts() {
		if mi.Point != p || !strings.HasPrefix(mi.FSType, "fuse") {
			continue
		}
		if err := ensureFusectl(); err != nil {
			fmt.Fprintf(os.Stderr, "integration: mount fusectl: %v\n", err)
		}
		abort := fmt.Sprintf("/sys/fs/fuse/connections/%d/abort", mi.Minor)
		if err := os.WriteFile(abort, []byte("1"), 0o200); err != nil && !os.IsNotExist(err) {
			fmt.Fprintf(os.Stderr, "integration: %s: %v\n", abort, err)
		}
	}
	for i := 0; i < 3 && isMounted(p); i++ {
		if unmountTimeout(p, 0, 5*time.Second) != nil {
			time.Sleep(100 * time.Millisecond)
		}
	}
	for i := 0; i < 3 && isMounted(p); i++ {
		unmountTimeout(p, unix.MNT_DETACH, 5*time.Second)
	}
	if isMounted(p) {
		return fmt.Errorf("could not unmount %s", p)
	}
	return nil
}

// loopsUnder lists loop devices whose backing file is below dir.
func loopsUnder(dir string) []string {
	r := execCmd(10*time.Second, nil, "losetup", "--list", "--noheadings", "--raw", "--output", "NAME,BACK-FILE")
	if r.Code != 0 {
		return nil
	}
	dir = filepath.Clean(dir)
	var out []string
	for _, line := range strings.Split(r.Stdout, "\n") {
		f := strings.SplitN(strings.TrimSpace(line), " ", 2)
		if len(f) != 2 {
			continue
		}
		back := strings.TrimSuffix(unescapeLosetup(f[1]), " (deleted)")
		if back == dir || strings.HasPrefix(back, dir+"/") {
			out = append(out, f[0])
		}
	}
	return out
}

func unescapeLosetup(s string) string {
	return strings.ReplaceAll(s, `\x20`, " ")
}

// detachLoops detaches loop devices backed by files below dir, first
// unmounting whatever is mounted from them.
func detachLoops(dir string) {
	for _, dev := range loopsUnder(dir) {
		devMounts := map[string]bool{}
		if st, err := os.Stat(dev); err == nil {
			if sys, ok := st.Sys().(*syscall.Stat_t); ok {
				for _, mi := range readMounts() {
					if uint64(mi.Major) == uint64(unix.Major(sys.Rdev)) && uint64(mi.Minor) == uint64(unix.Minor(sys.Rdev)) {
						devMounts[mi.Point] = true
					}
				}
			}
		}
		for mp := range devMounts {
			if unmountTimeout(mp, 0, 10*time.Second) != nil {
				unmountTimeout(mp, unix.MNT_DETACH, 5*time.Second)
			}
		}
		execCmd(20*time.Second, nil, "losetup", "-d", dev)
	}
}

// ---------------------------------------------------------------------------
// hashing and data

func b3File(t testing.TB, path string) string {
	t.Helper()
	h, err := b3FileErr(path)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func b3FileErr(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := blake3.New()
	if _, err := io.CopyBuffer(h, f, make([]byte, 1<<20)); err != nil {
		return "", fmt.Errorf("hash %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func b3Bytes(b []byte) string {
	s := blake3.Sum256(b)
	return hex.EncodeToString(s[:])
}

// alignedBuf returns an anonymous mapping of n bytes (page aligned, as
// O_DIRECT needs); it is unmapped at cleanup.
func alignedBuf(t testing.TB, n int) []byte {
	t.Helper()
	b, err := unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(b) })
	return b
}

// fillPattern fills b with bytes that depend only on the absolute file
// offset off and a seed, so overlapping writers produce a deterministic file.
func fillPattern(b []byte, off int64, seed uint64) {
	for i := range b {
		x := uint64(off+int64(i))*0x9E3779B97F4A7C15 + seed*0xBF58476D1CE4E5B9
		x ^= x >> 29
		b[i] = byte(x ^ x>>17)
	}
}

// allocatedBytes returns st_blocks*512 of a path.
func allocatedBytes(t testing.TB, path string) int64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// diffBlocks returns the 4 KiB block numbers where a and b differ; bytes past
// the end of the shorter file count as zeros.
func diffBlocks(t testing.TB, a, b string) []int64 {
	t.Helper()
	fa, err := os.Open(a)
	if err != nil {
		t.Fatal(err)
	}
	defer fa.Close()
	fb, err := os.Open(b)
	if err != nil {
		t.Fatal(err)
	}
	defer fb.Close()
	const chunk = 4 << 20
	ba, bb := make([]byte, chunk), make([]byte, chunk)
	var out []int64
	for off := int64(0); ; off += chunk {
		na, ea := fa.ReadAt(ba, off)
		nb, eb := fb.ReadAt(bb, off)
		if ea != nil && ea != io.EOF {
			t.Fatal(ea)
		}
		if eb != nil && eb != io.EOF {
			t.Fatal(eb)
		}
		if na == 0 && nb == 0 {
			return out
		}
		clear(ba[na:])
		clear(bb[nb:])
		n := max(na, nb)
		for i := 0; i < n; i += blockSize {
			e := min(i+blockSize, n)
			if !bytes.Equal(ba[i:e], bb[i:e]) {
				out = append(out, (off+int64(i))/blockSize)
			}
		}
	}
}

// errName renders an error as its errno name (stable between filesystems).
func errName(err error) string {
	if err == nil {
		return "ok"
	}
	var en syscall.Errno
	if errors.As(err, &en) {
		return unix.ErrnoName(en)
	}
	return err.Error()
}

func jsonUnmarshal(s string, v any) error { return json.Unmarshal([]byte(s), v) }
