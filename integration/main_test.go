package integration

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// testRoot holds every directory, store and mount point of every run. Stale
// mounts under it are removed before a run; a run fails if one is left after.
const testRoot = "/var/tmp/standin-it"

var (
	runDir      string // this run's directory under testRoot
	standinBin  string // absolute path of the binary under test
	binErr      error  // why the binary is unusable, reported by each test
	ciStrict    = os.Getenv("CI") == "true"
	mountsMu    sync.Mutex
	watchdogHit bool
)

func TestMain(m *testing.M) {
	flag.Parse()
	os.Exit(testMain(m))
}

func testMain(m *testing.M) int {
	if os.Geteuid() != 0 {
		// requireRoot in each test decides between skip and fail.
		standinBin, binErr = "", fmt.Errorf("not root")
		return m.Run()
	}
	if err := os.MkdirAll(testRoot, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, "integration:", err)
		return 1
	}
	unlock, err := lockRoot(lockWait())
	if err != nil {
		fmt.Fprintln(os.Stderr, "integration:", err)
		return 1
	}
	defer unlock()

	cleanStale()

	runDir, err = os.MkdirTemp(testRoot, "run-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "integration:", err)
		return 1
	}
	standinBin, binErr = findBinary(runDir)
	if binErr != nil {
		fmt.Fprintln(os.Stderr, "integration: standin binary unusable:", binErr)
	}

	stopWatchdog := startWatchdog()
	code := m.Run()
	stopWatchdog()

	// A run must not leave a mount behind, whatever the tests did.
	if left := mountsUnder(testRoot); len(left) > 0 {
		fmt.Fprintf(os.Stderr, "integration: FAIL: mounts left behind under %s: %v; tearing down\n", testRoot, left)
		for _, mi := range left {
			if err := teardownMount(mi.Point); err != nil {
				fmt.Fprintln(os.Stderr, "integration:", err)
			}
		}
		code = 1
	}
	if loops := loopsUnder(testRoot); len(loops) > 0 {
		fmt.Fprintf(os.Stderr, "integration: FAIL: loop devices left behind: %v; detaching\n", loops)
		detachLoops(testRoot)
		code = 1
	}
	if code == 0 {
		os.RemoveAll(runDir)
	} else {
		fmt.Fprintln(os.Stderr, "integration: test directories kept in", runDir)
	}
	return code
}

// lockRoot serialises runs on this machine: TestMain unmounts stale mounts
// under testRoot, which must never hit a concurrent run's live mounts.
func lockRoot(timeout time.Duration) (func(), error) {
	f, err := os.OpenFile(filepath.Join(testRoot, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(timeout)
	for {
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { syscall.Flock(int(f.Fd()), syscall.LOCK_UN); f.Close() }, nil
		}
		if time.Now().After(deadline) {
			f.Close()
			return nil, fmt.Errorf("another integration run holds %s/.lock: %v", testRoot, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// cleanStale removes what a crashed earlier run left: loop devices on test
// files, mounts under testRoot (lazily, after aborting FUSE connections), and
// the old run directories.
func cleanStale() {
	detachLoops(testRoot)
	for _, mi := range mountsUnder(testRoot) {
		fmt.Fprintf(os.Stderr, "integration: removing stale mount %s (%s)\n", mi.Point, mi.FSType)
		if err := teardownMount(mi.Point); err != nil {
			fmt.Fprintln(os.Stderr, "integration:", err)
		}
	}
	if len(mountsUnder(testRoot)) > 0 {
		return // never RemoveAll across a mount
	}
	old, _ := filepath.Glob(filepath.Join(testRoot, "run-*"))
	for _, d := range old {
		os.RemoveAll(d)
	}
}

// findBinary returns STANDIN_BIN or builds ./cmd/standin into dir.
func findBinary(dir string) (string, error) {
	if b := os.Getenv("STANDIN_BIN"); b != "" {
		if !filepath.IsAbs(b) {
			return "", fmt.Errorf("STANDIN_BIN=%q is not an absolute path", b)
		}
		if _, err := os.Stat(b); err != nil {
			return "", fmt.Errorf("STANDIN_BIN: %w", err)
		}
		return b, nil
	}
	root, err := filepath.Abs("..")
	if err != nil {
		return "", err
	}
	bin := filepath.Join(dir, "standin")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/standin")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./cmd/standin: %v\n%s", err, strings.TrimSpace(string(out)))
	}
	return bin, nil
}

// startWatchdog tears every live mount down shortly before go test's own
// -timeout fires, so that a hung FUSE request turns into test failures
// (ENOTCONN) and a clean exit instead of a panic that leaves mounts behind.
func startWatchdog() (stop func()) {
	f := flag.Lookup("test.timeout")
	if f == nil {
		return func() {}
	}
	d, err := time.ParseDuration(f.Value.String())
	if err != nil || d <= 0 {
		return func() {}
	}
	margin := 30 * time.Second
	if d < 2*margin {
		margin = d / 4
	}
	timer := time.AfterFunc(d-margin, func() {
		fmt.Fprintln(os.Stderr, "integration: WATCHDOG: test timeout approaching; aborting all test mounts")
		mountsMu.Lock()
		watchdogHit = true
		mountsMu.Unlock()
		detachLoops(testRoot)
		for _, mi := range mountsUnder(testRoot) {
			teardownMount(mi.Point)
		}
	})
	return func() { timer.Stop() }
}

// lockWait is how long a run waits for another run on this machine to finish
// (STANDIN_IT_LOCK_WAIT, a Go duration; default 45 minutes, so runs started side
// by side queue instead of failing).
func lockWait() time.Duration {
	if d, err := time.ParseDuration(os.Getenv("STANDIN_IT_LOCK_WAIT")); err == nil && d > 0 {
		return d
	}
	return 45 * time.Minute
}
