package integration

// Power-cut campaigns (I1, I4): a store on lazyfs (fusefs/lazyfs), a FUSE
// filesystem that keeps whatever was not fsynced in memory and drops it on a
// simulated power cut. kill -9 alone (TestCrashI1, TestReplKillPrimary) keeps
// the kernel's page cache, so it cannot show a write that was staged and
// shipped but never made durable on the primary.
//
// STANDIN_POWERCUTS sets the number of power cuts per store (default 3;
// make soak runs 30).

import (
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

var (
	lazyOnce sync.Once
	lazyBin  string
	lazyErr  error
)

// lazyfsBinary builds fusefs/lazyfs/cmd/lazyfs into the run directory once
// (LAZYFS_BIN overrides).
func lazyfsBinary(t testing.TB) string {
	t.Helper()
	lazyOnce.Do(func() {
		if b := os.Getenv("LAZYFS_BIN"); b != "" {
			lazyBin = b
			return
		}
		root, err := filepath.Abs("..")
		if err != nil {
			lazyErr = err
			return
		}
		lazyBin = filepath.Join(runDir, "lazyfs")
		cmd := exec.Command("go", "build", "-o", lazyBin, "./fusefs/lazyfs/cmd/lazyfs")
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			lazyErr = fmt.Errorf("building lazyfs: %v\n%s", err, out)
		}
	})
	if lazyErr != nil {
		t.Fatal(lazyErr)
	}
	return lazyBin
}

func powerCutCount() int {
	if n, err := strconv.Atoi(os.Getenv("STANDIN_POWERCUTS")); err == nil && n > 0 {
		return n
	}
	return 3
}

// lazyProc is a lazyfs subprocess serving Backing at Mnt. Cleanup makes
// everything durable, unmounts and tears the mount down whatever happened.
type lazyProc struct {
	t            testing.TB
	Backing, Mnt string
	cmd          *exec.Cmd
	out          lockedBuffer // every incarnation
	done         chan struct{}
}

func startLazy(t testing.TB, backing, mnt string) *lazyProc {
	t.Helper()
	l := &lazyProc{t: t, Backing: backing, Mnt: mnt}
	t.Cleanup(func() {
		if l.cmd != nil && l.running() {
			l.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-l.done:
			case <-time.After(20 * time.Second):
				l.cmd.Process.Kill()
				<-l.done
			}
		}
		if err := teardownMount(l.Mnt); err != nil {
			t.Errorf("cleanup: lazyfs: %v", err)
		}
		if t.Failed() {
			t.Logf("lazyfs output:\n%s", l.out.String())
		}
	})
	l.start()
	return l
}

func (l *lazyProc) running() bool { return !exited(l.done) }

func (l *lazyProc) start() {
	l.t.Helper()
	for _, d := range []string{l.Backing, l.Mnt} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			l.t.Fatal(err)
		}
	}
	l.done = make(chan struct{})
	l.cmd = exec.Command(lazyfsBinary(l.t), l.Backing, l.Mnt)
	startChild(l.t, "lazyfs", l.cmd, &l.out, l.done)
	if !waitFor(readyTimeout, 20*time.Millisecond, func() bool { return !l.running() || isMounted(l.Mnt) }) || !l.running() {
		l.t.Fatalf("lazyfs not mounted at %s:\n%s", l.Mnt, l.out.String())
	}
}

// sync makes everything durable (the sync(2) FUSE never sees).
func (l *lazyProc) sync() {
	l.t.Helper()
	n := strings.Count(l.out.String(), "synced")
	l.cmd.Process.Signal(syscall.SIGUSR2)
	if !waitFor(30*time.Second, 20*time.Millisecond, func() bool { return strings.Count(l.out.String(), "synced") > n }) {
		l.t.Fatalf("lazyfs did not confirm the sync:\n%s", l.out.String())
	}
}

// powerCut drops everything not durable and waits until lazyfs is gone; it
// returns what lazyfs says it dropped.
func (l *lazyProc) powerCut() string {
	l.t.Helper()
	l.cmd.Process.Signal(syscall.SIGUSR1)
	select {
	case <-l.done:
	case <-time.After(30 * time.Second):
		l.t.Fatalf("lazyfs did not exit after the power cut:\n%s", l.out.String())
	}
	if err := teardownMount(l.Mnt); err != nil {
		l.t.Fatalf("lazyfs mount after the power cut: %v", err)
	}
	lines := strings.Split(strings.TrimSpace(l.out.String()), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if strings.Contains(lines[i], "power cut:") {
			return lines[i]
		}
	}
	l.t.Fatalf("lazyfs exited without reporting the power cut:\n%s", l.out.String())
	return ""
}

// ackLog records, per block, the content last acknowledged by fsync and
// every content written after it (any of which may have become durable).
type ackLog struct {
	mu    sync.Mutex
	acked map[int64]string
	later map[int64][]string
}

func newAckLog() *ackLog { return &ackLog{acked: map[int64]string{}, later: map[int64][]string{}} }

// powerCutWriter writes bursts into its own extents (every 4th of the
// image, starting at w) through the mount, O_DIRECT for even w, buffered for
// odd, and fsyncs after some bursts until fsyncUntil, until stop or an error
// (the daemon died). The fsync-free tail is what a power cut can lose; its
// blocks are staged, shipped and their extents retire meanwhile.
func powerCutWriter(t testing.TB, p string, w int, size int64, seed uint64, log *ackLog, fsyncUntil time.Time, stop *atomic.Bool, writes *atomic.Int64) error {
	rng := rand.New(rand.NewPCG(seed, uint64(w)))
	flags := unix.O_RDWR | unix.O_CLOEXEC
	if w%2 == 0 {
		flags |= unix.O_DIRECT
	}
	fd, err := unix.Open(p, flags, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	buf := alignedBuf(t, 8*blockSize)
	unsynced := map[int64]string{}
	nExt := size / extentSize
	for !stop.Load() {
		ext := int64(w) + 4*rng.Int64N(nExt/4)
		for i, n := 0, 5+rng.IntN(30); i < n && !stop.Load(); i++ {
			run := 1 + rng.Int64N(8)
			b := ext*extentSize/blockSize + rng.Int64N(extentSize/blockSize-run+1)
			data := buf[:run*blockSize]
			fillRandom(rng, data)
			if _, err := unix.Pwrite(fd, data, b*blockSize); err != nil {
				return err
			}
			writes.Add(1)
			log.mu.Lock()
			for k := int64(0); k < run; k++ {
				h := b3Bytes(data[k*blockSize : (k+1)*blockSize])
				unsynced[b+k] = h
				log.later[b+k] = append(log.later[b+k], h)
			}
			log.mu.Unlock()
		}
		if rng.IntN(5) < 2 && time.Now().Before(fsyncUntil) {
			if err := unix.Fsync(fd); err != nil {
				return err
			}
			log.mu.Lock()
			for b, h := range unsynced {
				log.acked[b] = h
				log.later[b] = nil
			}
			log.mu.Unlock()
			clear(unsynced)
		}
		time.Sleep(time.Duration(50+rng.IntN(200)) * time.Millisecond)
	}
	return nil
}

// checkAcked reads every acknowledged block of img: each must hold its
// acknowledged content or a later write's.
func checkAcked(t testing.TB, img string, log *ackLog) (checked int) {
	t.Helper()
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, blockSize)
	log.mu.Lock()
	defer log.mu.Unlock()
	var lost []int64
	for b, h := range log.acked {
		if _, err := f.ReadAt(buf, b*blockSize); err != nil {
			t.Fatalf("reading block %d of %s: %v", b, img, err)
		}
		got := b3Bytes(buf)
		ok := got == h
		for _, l := range log.later[b] {
			ok = ok || got == l
		}
		if !ok {
			lost = append(lost, b)
		}
		checked++
	}
	if len(lost) > 0 {
		sort.Slice(lost, func(i, j int) bool { return lost[i] < lost[j] })
		t.Errorf("%d blocks acknowledged by fsync before the power cut lost on the primary (first %v)", len(lost), firstN(lost, 10))
	}
	return checked
}

// prefillSparse creates a sparse image of size bytes with 64 KiB of random
// data at the start of every 4 MiB extent, durable.
func prefillSparse(t testing.TB, path string, size int64, rng *rand.Rand) {
	t.Helper()
	buf := make([]byte, 64<<10)
	createImage(t, path, size, func(f *os.File) error {
		for off := int64(0); off < size; off += extentSize {
			fillRandom(rng, buf)
			if _, err := f.WriteAt(buf, off); err != nil {
				return err
			}
		}
		return nil
	})
}

// checkConverged ships what the primary holds and compares the replica's
// latest point with the primary images, verifies every point and reports the
// differing blocks on a mismatch.
func (e *replEnv) checkConverged(what string) {
	e.t.Helper()
	e.now()
	want := e.frozen()
	failed := e.t.Failed()
	e.checkPoint("latest", want, what+": I1 violated")
	if e.t.Failed() && !failed {
		dir, err := os.MkdirTemp(filepath.Dir(e.RStore), "diff-")
		if err != nil {
			e.t.Fatal(err)
		}
		to := filepath.Join(dir, "out")
		mustStandin(e.t, "points", "export", "--store", e.RStore, "--group", e.Group, "--point", "latest", "--to", to)
		for n := range want {
			if _, err := os.Stat(filepath.Join(to, n)); err != nil {
				continue
			}
			if diff := diffBlocks(e.t, filepath.Join(e.PStore, "images", n), filepath.Join(to, n)); len(diff) > 0 {
				e.t.Logf("%s: the replica's latest point of %s differs from the primary in %d blocks (first %v)", what, n, len(diff), firstN(diff, 10))
			}
		}
		os.RemoveAll(dir)
		st := e.status()
		e.t.Logf("%s: group health %s %v", what, st.Health, st.Reasons)
	}
	e.verifyPoints()
}

// verifyPoints runs points verify on every point of the group (verifyPoint).
// A point that retention expired meanwhile (cycles keep arriving) is skipped.
func (e *replEnv) verifyPoints() {
	e.t.Helper()
	for _, p := range listPoints(e.t, e.RStore, e.Group) {
		r := runVerify(e.RStore, e.Group, p.Point)
		if r.Code != 0 && strings.Contains(r.Stderr, "no such recovery point") &&
			!slices.ContainsFunc(listPoints(e.t, e.RStore, e.Group), func(q pointInfo) bool { return q.Point == p.Point }) {
			continue // expired
		}
		checkVerify(e.t, e.Group, p.Point, r)
	}
}

// powerCutSetup makes the test directory base with a lazyfs mount in it
// (backing base/<prefix>disk, mounted at base/<prefix>lazy) and picks (and
// logs) the seed of the run.
func powerCutSetup(t *testing.T, prefix string) (string, *lazyProc, uint64) {
	t.Helper()
	requireRoot(t)
	base := testDir(t)
	lz := startLazy(t, filepath.Join(base, prefix+"disk"), filepath.Join(base, prefix+"lazy"))
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	return base, lz, seed
}

// TestPowerCutPrimary: the primary store is on lazyfs. A writer goes through
// the standin mount (O_DIRECT and buffered, some fsyncs) while cycles are cut
// and shipped every second; at a random moment the mount daemon is killed
// and lazyfs drops everything not durable. After a restart every write
// acknowledged by fsync must be on the primary, and once the primary shipped
// what it recovered, the replica's latest point must equal the primary image
// and every point must verify.
func TestPowerCutPrimary(t *testing.T) {
	base, lz, seed := powerCutSetup(t, "p")
	e := bareReplEnv(t, base, filepath.Join(lz.Mnt, "pstore"), filepath.Join(base, "mnt"), filepath.Join(base, "rstore"), "pcp",
		rand.New(rand.NewPCG(seed, 1)))
	e.prefillImagesWith(prefillSparse, imgSpec{"a.img", 256 * mib})
	// Write-intent extents retire after 0.5-1 s idle, so a power cut a few
	// seconds after a burst finds extents that were written, shipped and
	// retired.
	env := []string{"STANDIN_TEST_CHECKPOINT_INTERVAL=500ms"}
	e.Rep = startReplica(t, e.RStore)
	e.Pri = startDaemon(t, e.PStore, e.Mnt, env...)
	e.start("--interval", "1s")
	lz.sync() // the set-up is durable; from here on only fsync makes anything durable

	n := powerCutCount()
	survived := 0
	for i := 0; i < n && !t.Failed(); i++ {
		log := newAckLog()
		var stop atomic.Bool
		var writes atomic.Int64
		var wg sync.WaitGroup
		errs := make([]error, 4)
		p := filepath.Join(e.Mnt, "a.img")
		// 2-7 s of writes; fsyncs stop 1.5-4 s before the power cut.
		dur := time.Duration(2000+e.rng.IntN(5000)) * time.Millisecond
		fsyncUntil := time.Now().Add(dur - time.Duration(1500+e.rng.IntN(2500))*time.Millisecond)
		for w := 0; w < 4; w++ {
			seed := e.rng.Uint64()
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs[w] = powerCutWriter(t, p, w, e.Sizes["a.img"], seed, log, fsyncUntil, &stop, &writes)
			}()
		}
		time.Sleep(dur)
		e.Pri.Kill()
		cut := lz.powerCut()
		stop.Store(true)
		wg.Wait()
		for _, err := range errs {
			if err != nil && !deadDaemonErr(err) {
				t.Errorf("cut %d: writer: %v", i, err)
			}
		}
		if err := teardownMount(e.Mnt); err != nil {
			t.Fatal(err)
		}
		lz.start()
		e.Pri = startDaemon(t, e.PStore, e.Mnt, env...)
		im := mustImage(t, getStatus(t, e.PStore, false), "a.img")
		acked := checkAcked(t, filepath.Join(e.PStore, "images", "a.img"), log)
		t.Logf("cut %d: %d writes, %d acknowledged blocks; lazyfs %s; recovered %d dirty blocks (unclean %v)",
			i, writes.Load(), acked, strings.TrimPrefix(cut, "lazyfs: "), im.DirtyBlocks, im.UncleanRecovery)
		e.checkConverged(fmt.Sprintf("power cut %d of the primary", i))
		if !t.Failed() {
			survived++
		}
	}
	t.Logf("primary store: %d of %d power cuts survived (I1: replica == primary, acknowledged writes kept, points verify)", survived, n)
}

// TestPowerCutReplica: the replica store is on lazyfs. Writers go through the
// primary's mount (fsynced) while cycles are shipped and applied every
// second; at a random moment the replica daemon is killed and lazyfs drops
// everything not durable. After a restart every recovery point must verify
// and the replica must converge to the primary.
func TestPowerCutReplica(t *testing.T) {
	base, lz, seed := powerCutSetup(t, "r")
	e := bareReplEnv(t, base, filepath.Join(base, "pstore"), filepath.Join(base, "mnt"), filepath.Join(lz.Mnt, "rstore"), "pcr",
		rand.New(rand.NewPCG(seed, 2)))
	e.prefillImages(imgSpec{"a.img", 32 * mib})
	e.Rep = startReplica(t, e.RStore)
	e.Pri = startDaemon(t, e.PStore, e.Mnt)
	// 32 Mbit/s: an upload of a few MiB takes a second or two, so cuts hit
	// uploads as well as applies. Writes stay in the first 8 MiB: a cycle
	// carries at most that.
	e.start("--interval", "1s", "--bandwidth", "32Mbit")
	lz.sync()

	n := powerCutCount()
	survived := 0
	for i := 0; i < n && !t.Failed(); i++ {
		var stop atomic.Bool
		var wg sync.WaitGroup
		errs := make([]error, 2)
		for w := 0; w < 2; w++ {
			seed := e.rng.Uint64() // drawn here: e.rng is not safe for concurrent use
			wg.Add(1)
			go func() {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(seed, uint64(w)))
				for !stop.Load() {
					if _, err := writeRandomErr(rng, filepath.Join(e.Mnt, "a.img"), 10, 64, 0, 8*mib); err != nil {
						errs[w] = err
						return
					}
					time.Sleep(time.Duration(100+rng.IntN(300)) * time.Millisecond)
				}
			}()
		}
		time.Sleep(time.Duration(1000+e.rng.IntN(4000)) * time.Millisecond)
		parts, partBytes := inboxFiles(e.RStore, e.Group, ".part")
		e.Rep.Kill()
		cut := lz.powerCut()
		stop.Store(true)
		wg.Wait()
		for _, err := range errs {
			if err != nil {
				t.Errorf("cut %d: writer: %v", i, err)
			}
		}
		lz.start()
		e.Rep.Restart()
		t.Logf("cut %d: %d uploads in flight (%d bytes); lazyfs %s; points after restart %v", i, parts, partBytes,
			strings.TrimPrefix(cut, "lazyfs: "), pointIDs(listPoints(t, e.RStore, e.Group)))
		e.verifyPoints()
		e.checkConverged(fmt.Sprintf("power cut %d of the replica", i))
		if !t.Failed() {
			survived++
		}
	}
	t.Logf("replica store: %d of %d power cuts survived (every point verifies, replica converges)", survived, n)
}
