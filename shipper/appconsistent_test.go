package shipper

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/standin/standin/tracker"
)

func TestAppConsistentValidate(t *testing.T) {
	base := func(a *AppConsistent) Group {
		return Group{Name: "vm1", Images: []string{"a.img"}, Replica: "r:7443", Interval: 5 * time.Minute, AppConsistent: a}
	}
	ok := base(&AppConsistent{Every: 4 * time.Hour, FreezeCmd: "fsfreeze -f /x", ThawCmd: "fsfreeze -u /x"})
	if err := ok.Validate(); err != nil {
		t.Fatal(err)
	}
	if ok.AppConsistent.Timeout != DefaultFreezeTimeout {
		t.Errorf("default timeout %s, want %s", ok.AppConsistent.Timeout, DefaultFreezeTimeout)
	}
	for _, a := range []*AppConsistent{
		nil, // crash-consistent only
		{Every: 5 * time.Minute, FreezeCmd: "f", ThawCmd: "t"}, // every = interval
		{FreezeCmd: "f", ThawCmd: "t"},                         // on request only
		{Every: time.Hour, FreezeCmd: "f", ThawCmd: "t", Timeout: 2 * time.Second},
	} {
		g := base(a)
		if err := g.Validate(); err != nil {
			t.Errorf("%+v refused: %v", a, err)
		}
	}
	for name, a := range map[string]*AppConsistent{
		"freeze without thaw": {Every: time.Hour, FreezeCmd: "f"},
		"thaw without freeze": {Every: time.Hour, ThawCmd: "t"},
		"every without cmds":  {Every: time.Hour},
		"timeout only":        {Timeout: time.Minute},
		"every < interval":    {Every: time.Minute, FreezeCmd: "f", ThawCmd: "t"},
		"negative every":      {Every: -time.Hour, FreezeCmd: "f", ThawCmd: "t"},
		"negative timeout":    {Every: time.Hour, FreezeCmd: "f", ThawCmd: "t", Timeout: -time.Second},
		"huge timeout":        {Every: time.Hour, FreezeCmd: "f", ThawCmd: "t", Timeout: time.Hour},
	} {
		g := base(a)
		if err := g.Validate(); err == nil {
			t.Errorf("%s: accepted %+v", name, a)
		}
	}
	// Re-enabling keeps the schedule's state.
	old := &AppConsistent{Every: time.Hour, FreezeCmd: "f", ThawCmd: "t", LastAttempt: time.Unix(100, 0), LastPoint: time.Unix(90, 0)}
	n := (&AppConsistent{Every: 2 * time.Hour, FreezeCmd: "g", ThawCmd: "u"}).keepState(old)
	if !n.LastAttempt.Equal(old.LastAttempt) || !n.LastPoint.Equal(old.LastPoint) || n.Every != 2*time.Hour || n.FreezeCmd != "g" {
		t.Errorf("keepState: %+v", n)
	}
	if (*AppConsistent)(nil).keepState(old) != nil {
		t.Error("keepState of nil (app-consistent points turned off) is not nil")
	}
}

// acEnv is a shipper over a real tracker store with one image holding
// mb MiB of data (its first cut is a base carrying them), without a replica:
// the tests drive cut() directly.
type acEnv struct {
	t   *testing.T
	dir string
	log string // where the freeze/thaw commands write their timestamps
	s   *Shipper
	r   *run
}

func newACEnv(t *testing.T, mb int, stageDelay time.Duration, a *AppConsistent, images ...string) *acEnv {
	t.Helper()
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "images"), 0o700); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, mb<<20)
	for i := range buf {
		buf[i] = byte(i*7 + i>>12)
	}
	if err := os.WriteFile(filepath.Join(dir, "images", "a.img"), buf, 0o600); err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	st, err := tracker.Open(dir, tracker.Options{StageDelay: stageDelay, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	if _, err := st.Image("a.img"); err != nil {
		t.Fatal(err)
	}
	if len(images) == 0 {
		images = []string{"a.img"}
	}
	e := &acEnv{t: t, dir: dir, log: filepath.Join(dir, "hooks.log")}
	e.s = &Shipper{store: st, dir: dir, log: log, runs: map[string]*run{}}
	e.r = &run{g: Group{Name: "vm1", Images: images, Interval: time.Minute, AppConsistent: a}}
	return e
}

// stamp is a shell snippet appending "WHAT <unix ns>" to the hook log.
func (e *acEnv) stamp(what string) string {
	return `echo "` + what + ` $(date +%s%N)" >> ` + e.log
}

// events reads the hook log: event → time (the last one of each name).
func (e *acEnv) events() (map[string]time.Time, []string) {
	e.t.Helper()
	b, err := os.ReadFile(e.log)
	if err != nil && !os.IsNotExist(err) {
		e.t.Fatal(err)
	}
	m := map[string]time.Time{}
	var order []string
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.Fields(line)
		if len(f) != 2 {
			continue
		}
		ns, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil {
			continue
		}
		m[f[0]] = time.Unix(0, ns)
		order = append(order, f[0])
	}
	return m, order
}

// TestFreezeCutThawOrder: the freeze command ends before the cut's barrier,
// the thaw command starts after it and before staging ends (the frozen
// window does not include staging); the cycles are flagged app-consistent.
func TestFreezeCutThawOrder(t *testing.T) {
	e := newACEnv(t, 8, 60*time.Millisecond, nil) // staging 8 MiB takes ≥ 480 ms
	env := filepath.Join(e.dir, "env")
	e.r.g.AppConsistent = &AppConsistent{Every: time.Hour, Timeout: 10 * time.Second,
		FreezeCmd: e.stamp("freeze-start") + `; printf '%s|%s' "$STANDIN_GROUP" "$STANDIN_IMAGES" > ` + env + `; sleep 0.1; ` + e.stamp("freeze-end"),
		ThawCmd:   e.stamp("thaw-start") + "; " + e.stamp("thaw-end")}
	infos, err := e.s.cut(context.Background(), e.r, tracker.CutOptions{Compress: true})
	returned := time.Now()
	if err != nil {
		t.Fatal(err)
	}
	ev, order := e.events()
	t.Logf("events %v; cut %s, returned %s", order, infos[0].Time.Format("15:04:05.000"), returned.Format("15:04:05.000"))
	if strings.Join(order, ",") != "freeze-start,freeze-end,thaw-start,thaw-end" {
		t.Fatalf("hook order %v", order)
	}
	cut := infos[0].Time
	if !ev["freeze-end"].Before(cut) {
		t.Errorf("freeze ended %s, after the cut's barrier %s", ev["freeze-end"], cut)
	}
	if ev["thaw-start"].Before(cut) {
		t.Errorf("thaw started %s, before the cut's barrier %s", ev["thaw-start"], cut)
	}
	if d := returned.Sub(ev["thaw-end"]); d < 300*time.Millisecond {
		t.Errorf("thaw ended only %s before the cut was staged: it waited for staging", d)
	}
	for _, ci := range infos {
		if !ci.AppConsistent {
			t.Errorf("cycle %s seq %d not flagged app-consistent", ci.Image, ci.Seq)
		}
		if ri, err := tracker.ReadCycleInfo(ci.Path); err != nil || !ri.AppConsistent {
			t.Errorf("staged file %s: app-consistent %v, %v", ci.Path, ri.AppConsistent, err)
		}
	}
	got, _ := os.ReadFile(env)
	if want := "vm1|" + filepath.Join(e.dir, "images", "a.img"); string(got) != want {
		t.Errorf("hook environment %q, want %q", got, want)
	}
	st := e.r.status()
	if st.FreezeThaw == nil || !st.FreezeThaw.AppConsistent || st.FreezeThaw.Freeze != "ok" || st.FreezeThaw.Thaw != "ok" || st.FreezeThaw.Cut != "ok" {
		t.Fatalf("status %+v", st.FreezeThaw)
	}
	frozen := time.Duration(st.FreezeThaw.FrozenSeconds * float64(time.Second))
	t.Logf("frozen window (freeze end → thaw end) %s", frozen)
	if frozen <= 0 || frozen > 400*time.Millisecond {
		t.Errorf("frozen window %s", frozen)
	}
	if st.Health != "Normal" || st.AppConsistent != "every 1h0m0s" {
		t.Errorf("health %s %v, schedule %q", st.Health, st.Reasons, st.AppConsistent)
	}

	// Not due again within the hour: a plain cut, no hooks.
	os.Remove(e.log)
	infos, err = e.s.cut(context.Background(), e.r, tracker.CutOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, order := e.events(); len(order) != 0 || infos[0].AppConsistent {
		t.Errorf("second cut within the hour: hooks %v, app-consistent %v", order, infos[0].AppConsistent)
	}
	// Requested (replicate now --app-consistent): frozen again.
	e.r.app.requested.Store(true)
	infos, err = e.s.cut(context.Background(), e.r, tracker.CutOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, order := e.events(); len(order) != 4 || !infos[0].AppConsistent {
		t.Errorf("requested cut: hooks %v, app-consistent %v", order, infos[0].AppConsistent)
	}
	if e.r.app.requested.Load() {
		t.Error("the request was not consumed")
	}
}

// TestFreezeFailureThawsAndCuts: a failing freeze command is followed by
// the thaw command, then a crash-consistent cut (the cycle is not skipped),
// and a warning in the status until an app-consistent cut succeeds.
func TestFreezeFailureThawsAndCuts(t *testing.T) {
	e := newACEnv(t, 1, 0, nil)
	e.r.g.AppConsistent = &AppConsistent{Every: time.Hour, Timeout: 10 * time.Second,
		FreezeCmd: e.stamp("freeze") + "; echo 'domain not running' >&2; exit 3", ThawCmd: e.stamp("thaw")}
	infos, err := e.s.cut(context.Background(), e.r, tracker.CutOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ev, order := e.events()
	if strings.Join(order, ",") != "freeze,thaw" {
		t.Fatalf("hooks %v", order)
	}
	if len(infos) != 1 || infos[0].AppConsistent {
		t.Fatalf("cut after a failed freeze: %+v, want one crash-consistent cycle", infos)
	}
	if !ev["thaw"].Before(infos[0].Time) {
		t.Errorf("the crash-consistent cut %s was taken before the thaw %s", infos[0].Time, ev["thaw"])
	}
	st := e.r.status()
	if st.Health != "Warning" || !strings.Contains(strings.Join(st.Reasons, ";"), "freeze command failed") ||
		!strings.Contains(st.FreezeThaw.Freeze, "domain not running") || st.FreezeThaw.AppConsistent {
		t.Errorf("status after a failed freeze: %s %v %+v", st.Health, st.Reasons, st.FreezeThaw)
	}
	// The next attempt is not at the next round (the guest is not stalled
	// every interval), but a request runs it; success clears the warning.
	os.Remove(e.log)
	if _, err := e.s.cut(context.Background(), e.r, tracker.CutOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, order := e.events(); len(order) != 0 {
		t.Errorf("failed freeze retried at the next round: %v", order)
	}
	e.r.g.AppConsistent = &AppConsistent{Every: time.Hour, Timeout: 10 * time.Second, FreezeCmd: "true", ThawCmd: "true"}
	e.r.app.requested.Store(true)
	if infos, err := e.s.cut(context.Background(), e.r, tracker.CutOptions{}); err != nil || !infos[0].AppConsistent {
		t.Fatalf("requested cut: %v %+v", err, infos)
	}
	if st := e.r.status(); st.Health != "Normal" {
		t.Errorf("after a good freeze: %s %v", st.Health, st.Reasons)
	}
}

// TestFreezeTimeoutKillsAndThaws: a hanging freeze command is killed with
// its process group at the timeout; the thaw runs; the cut is taken.
func TestFreezeTimeoutKillsAndThaws(t *testing.T) {
	e := newACEnv(t, 1, 0, nil)
	child := filepath.Join(e.dir, "child.pid")
	e.r.g.AppConsistent = &AppConsistent{Every: time.Hour, Timeout: 300 * time.Millisecond,
		FreezeCmd: e.stamp("freeze") + "; sleep 30 & echo $! > " + child + "; wait",
		ThawCmd:   e.stamp("thaw")}
	start := time.Now()
	infos, err := e.s.cut(context.Background(), e.r, tracker.CutOptions{})
	took := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	ev, order := e.events()
	if strings.Join(order, ",") != "freeze,thaw" {
		t.Fatalf("hooks %v", order)
	}
	if d := ev["thaw"].Sub(ev["freeze"]); d < 250*time.Millisecond || d > 2*time.Second {
		t.Errorf("thaw %s after the freeze started, want about the 300 ms timeout", d)
	}
	if took > 3*time.Second || len(infos) != 1 || infos[0].AppConsistent {
		t.Errorf("cut took %s: %+v", took, infos)
	}
	b, err := os.ReadFile(child)
	if err != nil {
		t.Fatal(err)
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	if !processGone(pid) {
		t.Errorf("the freeze command's child %d (sleep 30) is still running: its process group was not killed", pid)
		syscall.Kill(pid, syscall.SIGKILL)
	}
	st := e.r.status()
	if st.FreezeThaw == nil || !strings.Contains(st.FreezeThaw.Freeze, "timed out") || st.Health != "Warning" {
		t.Errorf("status %s %v %+v", st.Health, st.Reasons, st.FreezeThaw)
	}
}

// processGone: pid does not exist or is a zombie nobody reaped yet.
func processGone(pid int) bool {
	deadline := time.Now().Add(2 * time.Second)
	for {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		if err != nil {
			return true
		}
		if f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:])); len(f) > 0 && f[0] == "Z" {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestThawAfterCutFailure: a cut that fails (here: before its barrier, an
// image that does not exist) still thaws; the result says why.
func TestThawAfterCutFailure(t *testing.T) {
	e := newACEnv(t, 1, 0, nil, "a.img", "gone.img")
	e.r.g.AppConsistent = &AppConsistent{Every: time.Hour, Timeout: 5 * time.Second, FreezeCmd: e.stamp("freeze"), ThawCmd: e.stamp("thaw")}
	if _, err := e.s.cut(context.Background(), e.r, tracker.CutOptions{}); err == nil {
		t.Fatal("cut of a missing image succeeded")
	}
	if _, order := e.events(); strings.Join(order, ",") != "freeze,thaw" {
		t.Fatalf("hooks %v", order)
	}
	st := e.r.status()
	if st.FreezeThaw == nil || st.FreezeThaw.Cut == "ok" || st.FreezeThaw.AppConsistent || st.FreezeThaw.Thaw != "ok" {
		t.Errorf("result %+v", st.FreezeThaw)
	}
}

// TestThawWhenStopping: the daemon stopping during the freeze (context
// cancelled) kills the freeze command and still runs the thaw command.
func TestThawWhenStopping(t *testing.T) {
	e := newACEnv(t, 1, 0, nil)
	e.r.g.AppConsistent = &AppConsistent{Every: time.Hour, Timeout: 20 * time.Second, FreezeCmd: e.stamp("freeze") + "; sleep 20", ThawCmd: e.stamp("thaw")}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	e.s.cut(ctx, e.r, tracker.CutOptions{}) // the cut itself fails: ctx is done
	if took := time.Since(start); took > 3*time.Second {
		t.Errorf("took %s", took)
	}
	if _, order := e.events(); strings.Join(order, ",") != "freeze,thaw" {
		t.Fatalf("hooks %v", order)
	}
}

// TestThawFailureIsCritical: a failing thaw command makes the group
// Critical (the guest may still be frozen) until a thaw succeeds.
func TestThawFailureIsCritical(t *testing.T) {
	e := newACEnv(t, 1, 0, nil)
	e.r.g.AppConsistent = &AppConsistent{Every: time.Hour, Timeout: 5 * time.Second, FreezeCmd: "true", ThawCmd: "echo cannot thaw >&2; exit 1"}
	infos, err := e.s.cut(context.Background(), e.r, tracker.CutOptions{})
	if err != nil || !infos[0].AppConsistent {
		t.Fatalf("%v %+v (the cut was taken frozen: it is app-consistent)", err, infos)
	}
	st := e.r.status()
	if st.Health != "Critical" || !strings.Contains(strings.Join(st.Reasons, ";"), "THAW COMMAND FAILED") || !strings.Contains(st.FreezeThaw.Thaw, "cannot thaw") {
		t.Errorf("status %s %v %+v", st.Health, st.Reasons, st.FreezeThaw)
	}
	e.r.g.AppConsistent = &AppConsistent{Every: time.Hour, Timeout: 5 * time.Second, FreezeCmd: "true", ThawCmd: "true"}
	e.r.app.requested.Store(true)
	if _, err := e.s.cut(context.Background(), e.r, tracker.CutOptions{}); err != nil {
		t.Fatal(err)
	}
	if st := e.r.status(); st.Health != "Normal" {
		t.Errorf("after a good thaw: %s %v", st.Health, st.Reasons)
	}
}
