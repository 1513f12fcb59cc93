package integration

import (
	"encoding/json"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// App-consistent points end to end: an ext4 in a loop device over the
// mounted image, frozen with fsfreeze around the cut while a writer inside
// it keeps writing.

type acGroup struct {
	Health            string     `json:"health"`
	Reasons           []string   `json:"reasons"`
	AppConsistent     string     `json:"app_consistent"`
	LastAppConsistent *time.Time `json:"last_app_consistent"`
	Cycles            int        `json:"cycles_replicated"`
	FreezeThaw        *struct {
		Freeze        string  `json:"freeze"`
		Thaw          string  `json:"thaw"`
		Cut           string  `json:"cut"`
		AppConsistent bool    `json:"app_consistent"`
		FreezeSeconds float64 `json:"freeze_seconds"`
		ThawSeconds   float64 `json:"thaw_seconds"`
		FrozenSeconds float64 `json:"frozen_seconds"`
	} `json:"freeze_thaw"`
}

type acPoint struct {
	Point         string    `json:"point"`
	Time          time.Time `json:"time"`
	Kind          string    `json:"kind"`
	AppConsistent *bool     `json:"app_consistent"`
}

func acStatus(t *testing.T, pstore, group string) acGroup {
	t.Helper()
	r := mustStandin(t, "replicate", "list", "--store", pstore, "--json")
	var gs []map[string]json.RawMessage
	if err := json.Unmarshal([]byte(r.Stdout), &gs); err != nil {
		t.Fatalf("replicate list --json: %v\n%s", err, r.Stdout)
	}
	for _, g := range gs {
		if string(g["group"]) == `"`+group+`"` {
			b, _ := json.Marshal(g)
			var out acGroup
			if err := json.Unmarshal(b, &out); err != nil {
				t.Fatal(err)
			}
			return out
		}
	}
	t.Fatalf("no group %s in %s", group, r.Stdout)
	return acGroup{}
}

func acPoints(t *testing.T, rstore, group string) []acPoint {
	t.Helper()
	r := mustStandin(t, "points", "list", "--store", rstore, "--group", group, "--json")
	var ps []acPoint
	if err := json.Unmarshal([]byte(r.Stdout), &ps); err != nil {
		t.Fatalf("points list --json: %v\n%s", err, r.Stdout)
	}
	for _, p := range ps {
		if p.AppConsistent == nil {
			t.Fatalf("points list --json has no app_consistent: %s", r.Stdout)
		}
	}
	return ps
}

// guestWriter writes 64 KiB blocks into a file of the ext4 (fdatasync every
// 16 writes) and records when each write returned.
type guestWriter struct {
	mu    sync.Mutex
	times []time.Time
	stop  atomic.Bool
	done  chan struct{}
	err   error
}

func startGuestWriter(path string) *guestWriter {
	w := &guestWriter{done: make(chan struct{})}
	go func() {
		defer close(w.done)
		f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
		if err != nil {
			w.err = err
			return
		}
		defer f.Close()
		buf := make([]byte, 64<<10)
		rng := rand.New(rand.NewPCG(1, 2))
		for i := 0; !w.stop.Load(); i++ {
			fillRandom(rng, buf)
			if _, err := f.WriteAt(buf, int64(i%128)*int64(len(buf))); err != nil {
				w.err = err
				return
			}
			if i%16 == 15 {
				if err := unix.Fdatasync(int(f.Fd())); err != nil {
					w.err = err
					return
				}
			}
			w.mu.Lock()
			w.times = append(w.times, time.Now())
			w.mu.Unlock()
			time.Sleep(2 * time.Millisecond)
		}
	}()
	return w
}

func (w *guestWriter) count() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.times)
}

// maxGap is the longest time between two writes returning in [from, to].
func (w *guestWriter) maxGap(from, to time.Time) time.Duration {
	w.mu.Lock()
	defer w.mu.Unlock()
	var gap time.Duration
	prev := from
	for _, t := range w.times {
		if t.Before(from) {
			continue
		}
		if t.After(to) {
			break
		}
		gap = max(gap, t.Sub(prev))
		prev = t
	}
	return gap
}

// waitWrites waits until the writer completed n more writes.
func (w *guestWriter) waitWrites(n int, timeout time.Duration) bool {
	start := w.count()
	return waitFor(timeout, 10*time.Millisecond, func() bool { return w.count() >= start+n })
}

// sleepRunning reports whether a process runs "sleep ARG".
func sleepRunning(arg string) bool {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && string(b) == "sleep\x00"+arg+"\x00" {
			return true
		}
	}
	return false
}

// exportFeatures exports the group's point P of disk.img, fscks it (when
// fsck is set) and returns its ext4 feature line.
func exportFeatures(t *testing.T, e *replEnv, point string, fsck bool) string {
	t.Helper()
	out := filepath.Join(e.dir, "export-"+point+".img")
	defer os.Remove(out)
	mustStandin(t, "points", "export", "--store", e.RStore, "--group", e.Group, "--point", point, "--image", "disk.img", "--to", out)
	if fsck {
		if r := execCmd(cmdTimeout, nil, "fsck.ext4", "-n", "-f", out); r.Code != 0 {
			t.Errorf("fsck.ext4 -n -f of app-consistent point %s: %s", point, r)
		}
	}
	for _, line := range strings.Split(mustRun(t, cmdTimeout, "dumpe2fs", "-h", out), "\n") {
		if strings.HasPrefix(line, "Filesystem features:") {
			return line
		}
	}
	t.Fatalf("dumpe2fs -h %s: no feature line", out)
	return ""
}

func TestAppConsistentFsfreeze(t *testing.T) {
	requireRoot(t)
	requireTools(t, "mkfs.ext4", "fsck.ext4", "dumpe2fs", "losetup", "fsfreeze")
	dir := testDir(t)
	e := &replEnv{t: t, dir: dir, PStore: filepath.Join(dir, "pstore"), Mnt: filepath.Join(dir, "mnt"),
		RStore: filepath.Join(dir, "rstore"), Group: "vm", Names: []string{"disk.img"}, Sizes: map[string]int64{"disk.img": 64 << 20},
		rng: rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 9))}
	if err := os.MkdirAll(filepath.Join(e.PStore, "images"), 0o700); err != nil {
		t.Fatal(err)
	}
	mustRun(t, cmdTimeout, "mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", filepath.Join(e.PStore, "images", "disk.img"), "64M")
	e.Rep = startReplica(t, e.RStore)
	e.Pri = startDaemon(t, e.PStore, e.Mnt)
	e.pair("*", e.Rep.Addr)

	// ext4 in a loop device over the mounted image, a writer inside it.
	ext := filepath.Join(dir, "ext")
	if err := os.MkdirAll(ext, 0o755); err != nil {
		t.Fatal(err)
	}
	dev := strings.TrimSpace(mustRun(t, 30*time.Second, "losetup", "-f", "--show", filepath.Join(e.Mnt, "disk.img")))
	var w *guestWriter
	t.Cleanup(func() { // before the daemon's teardown (cleanups run last-in first-out), also on failure
		execCmd(10*time.Second, nil, "fsfreeze", "-u", ext)
		if w != nil {
			w.stop.Store(true)
			select {
			case <-w.done:
			case <-time.After(20 * time.Second):
				t.Errorf("the guest writer did not stop")
			}
		}
		if isMounted(ext) && unmountTimeout(ext, 0, 30*time.Second) != nil {
			unmountTimeout(ext, unix.MNT_DETACH, 5*time.Second)
		}
		execCmd(20*time.Second, nil, "losetup", "-d", dev)
	})
	mustRun(t, 30*time.Second, "mount", dev, ext)
	w = startGuestWriter(filepath.Join(ext, "busy.dat"))
	if !w.waitWrites(20, 20*time.Second) {
		t.Fatalf("the guest writer does not write: %v", w.err)
	}

	// Replication with app-consistent points every hour: the first (base)
	// round is already frozen.
	e.enable(e.Rep.Addr, "--interval", "30s", "--app-consistent-every", "1h",
		"--freeze-cmd", "fsfreeze -f "+ext, "--thaw-cmd", "fsfreeze -u "+ext, "--freeze-timeout", "2s")
	if !waitFor(60*time.Second, 100*time.Millisecond, func() bool { return acStatus(t, e.PStore, e.Group).Cycles >= 1 }) {
		t.Fatalf("the base was not replicated: %+v", acStatus(t, e.PStore, e.Group))
	}
	if ps := acPoints(t, e.RStore, e.Group); len(ps) != 1 || !*ps[0].AppConsistent {
		t.Errorf("base point: %+v, want one app-consistent point (due at once)", ps)
	}

	// A crash-consistent point with the writer running, for contrast: the
	// mounted ext4's superblock says its journal needs recovery.
	mustStandin(t, "replicate", "now", "--store", e.PStore, "--group", e.Group, "--wait", "--timeout", "60s")
	ps := acPoints(t, e.RStore, e.Group)
	crash := ps[len(ps)-1]
	if *crash.AppConsistent {
		t.Errorf("plain 'replicate now' within the hour made an app-consistent point: %+v", crash)
	}
	crashFeatures := exportFeatures(t, e, crash.Point, false)

	// replicate now --app-consistent while the writer writes.
	before := w.count()
	t0 := time.Now()
	r := mustStandin(t, "replicate", "now", "--store", e.PStore, "--group", e.Group, "--app-consistent", "--wait", "--timeout", "60s")
	t1 := time.Now()
	if !strings.Contains(r.Stdout, "app-consistent") {
		t.Errorf("replicate now --app-consistent: %s", r.Stdout)
	}
	if !w.waitWrites(20, 10*time.Second) {
		t.Fatalf("the guest writer did not resume after the thaw: %v", w.err)
	}
	st := acStatus(t, e.PStore, e.Group)
	ps = acPoints(t, e.RStore, e.Group)
	app := ps[len(ps)-1]
	if !*app.AppConsistent {
		t.Fatalf("latest point after 'replicate now --app-consistent': %+v", ps)
	}
	if st.FreezeThaw == nil || !st.FreezeThaw.AppConsistent || st.FreezeThaw.Freeze != "ok" || st.FreezeThaw.Thaw != "ok" {
		t.Fatalf("status: %+v", st.FreezeThaw)
	}
	if st.LastAppConsistent == nil || !st.LastAppConsistent.Equal(app.Time) || st.Health != "Normal" || st.AppConsistent != "every 1h0m0s" {
		t.Errorf("status: health %s %v, last app-consistent %v (point %s), schedule %q", st.Health, st.Reasons, st.LastAppConsistent, app.Time, st.AppConsistent)
	}
	frozen := time.Duration(st.FreezeThaw.FrozenSeconds * float64(time.Second))
	gap := w.maxGap(t0, t1)
	t.Logf("app-consistent point %s: freeze command %.1f ms, frozen window (freeze done → thaw done) %.1f ms, thaw command %.1f ms; longest stall of the guest writer %s (%d writes during the call)",
		app.Point, st.FreezeThaw.FreezeSeconds*1000, st.FreezeThaw.FrozenSeconds*1000, st.FreezeThaw.ThawSeconds*1000, gap.Round(time.Millisecond), w.count()-before)
	if frozen > 2*time.Second {
		t.Errorf("frozen window %s: the thaw waited for more than the barrier", frozen)
	}
	appFeatures := exportFeatures(t, e, app.Point, true)
	if strings.Contains(appFeatures, "needs_recovery") {
		t.Errorf("app-consistent point %s needs journal recovery: %s", app.Point, appFeatures)
	}
	if !strings.Contains(crashFeatures, "needs_recovery") {
		// A mounted ext4 keeps needs_recovery in its superblock; only a freeze clears it.
		t.Errorf("the crash-consistent point %s does not need journal recovery either (the check proves nothing): %s", crash.Point, crashFeatures)
	}
	verifyPoint(t, e.RStore, e.Group, app.Point)

	// A freeze command that freezes and then hangs: killed at the 2 s
	// timeout with its process group, the thaw runs, the cut is
	// crash-consistent, the command says so, the guest writes again.
	e.enable(e.Rep.Addr, "--interval", "30s", "--app-consistent-every", "1h",
		"--freeze-cmd", "fsfreeze -f "+ext+" && sleep 61.5", "--thaw-cmd", "fsfreeze -u "+ext, "--freeze-timeout", "2s")
	n := len(acPoints(t, e.RStore, e.Group))
	t0 = time.Now()
	r = standin(cmdTimeout, "replicate", "now", "--store", e.PStore, "--group", e.Group, "--app-consistent", "--wait", "--timeout", "60s")
	took := time.Since(t0)
	if r.Code == 0 || !strings.Contains(r.Stderr, "crash-consistent") || !strings.Contains(r.Stderr, "timed out") {
		t.Errorf("replicate now --app-consistent with a hanging freeze: %s", r)
	}
	if took > 20*time.Second {
		t.Errorf("took %s with a 2 s freeze timeout", took)
	}
	if !w.waitWrites(20, 10*time.Second) {
		t.Fatalf("the guest writer is stuck after the timed-out freeze (thaw did not run?): %v", w.err)
	}
	probe := filepath.Join(ext, "probe")
	if err := os.WriteFile(probe, []byte("writable"), 0o644); err != nil {
		t.Errorf("ext4 not writable after the timed-out freeze: %v", err)
	}
	if sleepRunning("61.5") {
		t.Errorf("the hanging freeze command's sleep still runs: its process group was not killed")
	}
	ps = acPoints(t, e.RStore, e.Group)
	if len(ps) <= n || *ps[len(ps)-1].AppConsistent {
		t.Errorf("after a timed-out freeze: points %+v, want a new crash-consistent point", ps)
	}
	st = acStatus(t, e.PStore, e.Group)
	if st.Health != "Warning" || !strings.Contains(strings.Join(st.Reasons, " "), "freeze command failed") ||
		st.FreezeThaw == nil || !strings.Contains(st.FreezeThaw.Freeze, "timed out") || st.FreezeThaw.Thaw != "ok" {
		t.Errorf("status after a timed-out freeze: %s %v %+v", st.Health, st.Reasons, st.FreezeThaw)
	}
	t.Logf("timed-out freeze: 'replicate now' returned after %s; frozen window %.0f ms after the kill", took.Round(time.Millisecond), st.FreezeThaw.FrozenSeconds*1000)
	// The app-consistent point made before survives retention (1 h slots:
	// it is preferred over the newer crash-consistent points of its slot).
	found := false
	for _, p := range ps {
		if p.Point == app.Point {
			found = true
		}
	}
	if !found {
		t.Errorf("app-consistent point %s was dropped: %+v", app.Point, ps)
	}
	if w.err != nil {
		t.Errorf("guest writer: %v", w.err)
	}
}
