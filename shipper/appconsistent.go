package shipper

// App-consistent points. When one is due (every AppConsistent.Every, or
// requested with 'standin replicate now --app-consistent'), the group's cut
// is taken between a freeze command and a thaw command:
//
//	freeze command (sh -c, bounded by the timeout)
//	  → cut: write barrier on every image, dirty maps swapped, barrier released
//	  → thaw command, at once (tracker.CutOptions.AfterBarrier), before staging
//	→ staging, shipping as for any cut
//
// The thaw command always runs: after a freeze that failed or timed out
// (its process group is killed), after a cut that failed, and when the
// daemon is stopping. A failed freeze still cuts — crash-consistent — so no
// cycle is skipped; the group shows a warning. A failed thaw is reported
// loudly (Critical, error log): the guest may still be frozen.
//
// The cycles of an app-consistent cut carry format.FlagAppConsistent in
// their headers, so the flag survives a daemon crash between cut and
// shipping; the commit says so too and the replica records the point as
// app-consistent.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/standin/standin/tracker"
)

// DefaultFreezeTimeout bounds each freeze and thaw command when the group
// does not say otherwise.
const DefaultFreezeTimeout = 30 * time.Second

// maxFreezeTimeout: no guest should stay frozen longer.
const maxFreezeTimeout = 10 * time.Minute

// AppConsistent configures the app-consistent points of a group
// (standin replicate enable --app-consistent-every D --freeze-cmd CMD
// --thaw-cmd CMD [--freeze-timeout D]).
type AppConsistent struct {
	// Every is the spacing of app-consistent points; 0 = only on request.
	Every     time.Duration `json:"every,omitempty"`
	FreezeCmd string        `json:"freeze_cmd"`
	ThawCmd   string        `json:"thaw_cmd"`
	// Timeout bounds each of the two commands (default DefaultFreezeTimeout).
	Timeout time.Duration `json:"timeout,omitempty"`

	// State, kept when the group is re-enabled:
	// LastAttempt is when the last app-consistent cut was tried (the next
	// scheduled one is due Every after it, also after a failed freeze, so a
	// hanging freeze command does not stall the guest at every round).
	LastAttempt time.Time `json:"last_attempt,omitzero"`
	// LastPoint is the cut time of the last app-consistent point the
	// replica committed.
	LastPoint time.Time `json:"last_point,omitzero"`
}

func (a *AppConsistent) validate(g *Group) error {
	if a == nil {
		return nil
	}
	if a.FreezeCmd == "" || a.ThawCmd == "" {
		return fmt.Errorf("group %s: app-consistent points need both --freeze-cmd and --thaw-cmd", g.Name)
	}
	if a.Every < 0 {
		return fmt.Errorf("group %s: --app-consistent-every %s is negative", g.Name, a.Every)
	}
	if a.Every > 0 && a.Every < g.Interval {
		return fmt.Errorf("group %s: --app-consistent-every %s is shorter than the interval %s", g.Name, a.Every, g.Interval)
	}
	if a.Timeout == 0 {
		a.Timeout = DefaultFreezeTimeout
	}
	if a.Timeout < 0 || a.Timeout > maxFreezeTimeout {
		return fmt.Errorf("group %s: --freeze-timeout %s: use a duration up to %s", g.Name, a.Timeout, maxFreezeTimeout)
	}
	return nil
}

// keepState returns a copy of a with the state of old (re-enabling a group
// with other options must not make an app-consistent point due at once).
func (a *AppConsistent) keepState(old *AppConsistent) *AppConsistent {
	if a == nil || old == nil {
		return a
	}
	c := *a
	c.LastAttempt, c.LastPoint = old.LastAttempt, old.LastPoint
	return &c
}

func (a *AppConsistent) timeout() time.Duration {
	if a.Timeout <= 0 {
		return DefaultFreezeTimeout
	}
	return a.Timeout
}

// String describes the schedule for status output.
func (a *AppConsistent) String() string {
	if a == nil {
		return ""
	}
	if a.Every == 0 {
		return "on request"
	}
	return "every " + a.Every.String()
}

// FreezeResult is the outcome of the last freeze/thaw of a group.
type FreezeResult struct {
	Time      time.Time `json:"time"`      // the freeze command started
	Requested bool      `json:"requested"` // replicate now --app-consistent (else scheduled)
	Freeze    string    `json:"freeze"`    // "ok" or why it failed
	Thaw      string    `json:"thaw"`      // "ok" or why it failed
	Cut       string    `json:"cut"`       // "ok" or why the cut failed
	// AppConsistent: the cut was taken frozen and staged.
	AppConsistent bool    `json:"app_consistent"`
	FreezeSeconds float64 `json:"freeze_seconds"` // run time of the freeze command
	ThawSeconds   float64 `json:"thaw_seconds"`   // run time of the thaw command
	// FrozenSeconds is the frozen window: from the end of the freeze
	// command to the end of the thaw command.
	FrozenSeconds float64 `json:"frozen_seconds"`
}

// appRun is the app-consistent state of a group's run.
type appRun struct {
	requested atomic.Bool // the next cut is app-consistent (replicate now --app-consistent)
	// Guarded by run.mu:
	loaded      bool // lastAttempt/lastPoint were taken from the configuration
	lastAttempt time.Time
	lastPoint   time.Time
	attempts    int
	result      *FreezeResult
	freezeWarn  string // the last failed freeze, until one succeeds
	thawErr     string // the last failed thaw, until one succeeds
}

// load takes the persisted state once. Called with r.mu held.
func (r *run) appLoad() {
	if r.app.loaded {
		return
	}
	r.app.loaded = true
	if a := r.g.AppConsistent; a != nil {
		r.app.lastAttempt, r.app.lastPoint = a.LastAttempt, a.LastPoint
	}
}

// SetMountpoint tells the shipper where the images are mounted: freeze and
// thaw commands get their paths there (STANDIN_IMAGES). Call before Start.
func (s *Shipper) SetMountpoint(mnt string) {
	s.mu.Lock()
	s.mnt = mnt
	s.mu.Unlock()
}

// imagePaths returns the paths of the group's images on the mount (in the
// store's image directory when no mount point was set).
func (s *Shipper) imagePaths(g Group) []string {
	s.mu.Lock()
	root := s.mnt
	s.mu.Unlock()
	if root == "" {
		root = s.store.ImagesDir()
	}
	out := make([]string, len(g.Images))
	for i, im := range g.Images {
		out[i] = filepath.Join(root, im)
	}
	return out
}

// cut takes the group's next cut: between the freeze and the thaw command
// when an app-consistent point is due or was requested, else plainly.
func (s *Shipper) cut(ctx context.Context, r *run, o tracker.CutOptions) ([]tracker.CycleInfo, error) {
	g := r.g
	a := g.AppConsistent
	requested := r.app.requested.Swap(false)
	now := time.Now()
	r.mu.Lock()
	r.appLoad()
	due := a != nil && a.Every > 0 && now.Sub(r.app.lastAttempt) >= a.Every
	r.mu.Unlock()
	if a == nil || !(requested || due) {
		return s.store.CutWith(ctx, g.Images, o)
	}
	infos, res, err := s.frozenCut(ctx, g, a, o)
	res.Requested = requested
	s.appAttempt(r, now, res)
	return infos, err
}

// frozenCut runs the freeze command, cuts, and runs the thaw command right
// after the cut's barrier — in every case, also when the freeze or the cut
// failed.
func (s *Shipper) frozenCut(ctx context.Context, g Group, a *AppConsistent, o tracker.CutOptions) ([]tracker.CycleInfo, *FreezeResult, error) {
	timeout := a.timeout()
	env := []string{"STANDIN_GROUP=" + g.Name, "STANDIN_IMAGES=" + strings.Join(s.imagePaths(g), "\n")}
	res := &FreezeResult{Time: time.Now(), Freeze: "ok", Thaw: "ok", Cut: "ok"}
	ferr := runHook(ctx, a.FreezeCmd, env, timeout)
	frozen := time.Now()
	res.FreezeSeconds = frozen.Sub(res.Time).Seconds()
	var once sync.Once
	var terr error
	thaw := func() {
		once.Do(func() {
			t0 := time.Now()
			// Thaw even when the daemon is stopping (ctx cancelled).
			terr = runHook(context.WithoutCancel(ctx), a.ThawCmd, env, timeout)
			t1 := time.Now()
			res.ThawSeconds, res.FrozenSeconds = t1.Sub(t0).Seconds(), t1.Sub(frozen).Seconds()
		})
	}
	var infos []tracker.CycleInfo
	var err error
	if ferr != nil {
		res.Freeze = ferr.Error()
		thaw() // the freeze may have frozen some filesystems before it failed
		s.log.Warn("freeze command failed; the guest was thawed and the cut is crash-consistent", "group", g.Name, "err", ferr)
		infos, err = s.store.CutWith(ctx, g.Images, o) // never skip the cycle
	} else {
		o.AppConsistent = true
		o.AfterBarrier = thaw
		infos, err = s.store.CutWith(ctx, g.Images, o)
		thaw() // no-op after AfterBarrier; thaws when the cut failed before its barrier
		res.AppConsistent = err == nil
	}
	if err != nil {
		res.Cut = err.Error()
	}
	if terr != nil {
		res.Thaw = terr.Error()
		s.log.Error("THAW COMMAND FAILED: the guest's filesystems may still be frozen", "group", g.Name, "cmd", a.ThawCmd, "err", terr)
	} else {
		s.log.Info("freeze/thaw", "group", g.Name, "app_consistent", res.AppConsistent,
			"freeze", time.Duration(res.FreezeSeconds*float64(time.Second)).Round(time.Millisecond),
			"frozen", time.Duration(res.FrozenSeconds*float64(time.Second)).Round(time.Millisecond))
	}
	return infos, res, err
}

// appAttempt records an app-consistent attempt in the run and persists its
// time without restarting the run.
func (s *Shipper) appAttempt(r *run, at time.Time, res *FreezeResult) {
	r.mu.Lock()
	r.app.lastAttempt = at
	r.app.attempts++
	r.app.result = res
	switch {
	case res.Freeze != "ok":
		r.app.freezeWarn = fmt.Sprintf("freeze command failed at %s (the point is crash-consistent): %s", res.Time.Local().Format(time.DateTime), res.Freeze)
	case res.AppConsistent:
		r.app.freezeWarn = ""
	}
	if res.Thaw != "ok" {
		r.app.thawErr = fmt.Sprintf("THAW COMMAND FAILED at %s: the guest's filesystems may still be frozen: %s", time.Now().Local().Format(time.DateTime), res.Thaw)
	} else {
		r.app.thawErr = ""
	}
	r.mu.Unlock()
	s.saveAppState(r.g.Name, func(a *AppConsistent) { a.LastAttempt = at })
}

// appPointShipped records that the replica committed an app-consistent
// point of cut time t.
func (s *Shipper) appPointShipped(r *run, t time.Time) {
	r.mu.Lock()
	r.appLoad()
	if t.After(r.app.lastPoint) {
		r.app.lastPoint = t
	}
	r.mu.Unlock()
	s.saveAppState(r.g.Name, func(a *AppConsistent) {
		if t.After(a.LastPoint) {
			a.LastPoint = t
		}
	})
}

// saveAppState updates the persisted app-consistent state of a group (copy
// on write, like resyncCut: the run keeps going).
func (s *Shipper) saveAppState(name string, f func(*AppConsistent)) {
	err := s.persist(name, func(x *Group) bool {
		if x.AppConsistent == nil {
			return false
		}
		a := *x.AppConsistent
		f(&a)
		x.AppConsistent = &a
		return true
	})
	if err != nil {
		s.log.Warn("saving the app-consistent state", "group", name, "err", err)
	}
}

// appStatus adds the app-consistent state to a status. Called with r.mu held.
func (r *run) appStatus(st *GroupStatus) {
	r.appLoad()
	st.AppConsistent = r.g.AppConsistent.String()
	if !r.app.lastPoint.IsZero() {
		t := r.app.lastPoint
		st.LastAppConsistent = &t
	}
	if r.app.result != nil {
		res := *r.app.result
		st.FreezeThaw = &res
	}
	if r.app.thawErr != "" {
		st.Health = "Critical"
		st.Reasons = append(st.Reasons, r.app.thawErr)
	}
	if r.app.freezeWarn != "" {
		if st.Health == "Normal" {
			st.Health = "Warning"
		}
		st.Reasons = append(st.Reasons, r.app.freezeWarn)
	}
}

// cutAppConsistent reports whether every cycle of a cut was cut app-consistent.
func cutAppConsistent(cut []tracker.CycleInfo) bool {
	for _, ci := range cut {
		if !ci.AppConsistent {
			return false
		}
	}
	return len(cut) > 0
}

// ErrNotAppConsistent: a requested app-consistent point came out
// crash-consistent (the freeze failed) or the thaw failed.
var ErrNotAppConsistent = errors.New("app-consistent point failed")

// NowAppConsistent is Now with an app-consistent cut (freeze, cut, thaw).
// With wait it also fails when the point came out crash-consistent (the
// freeze command failed; the cycle was still shipped) or the thaw failed.
func (s *Shipper) NowAppConsistent(ctx context.Context, name string, wait bool) error {
	s.mu.Lock()
	r := s.runs[name]
	s.mu.Unlock()
	if r == nil {
		return fmt.Errorf("no replication group %q: %w", name, ErrNoGroup)
	}
	if r.g.AppConsistent == nil {
		return fmt.Errorf("group %s has no freeze and thaw commands (standin replicate enable ... --freeze-cmd CMD --thaw-cmd CMD)", name)
	}
	r.mu.Lock()
	n := r.app.attempts
	r.mu.Unlock()
	r.app.requested.Store(true)
	if err := s.Now(ctx, name, wait); err != nil || !wait {
		return err
	}
	r.mu.Lock()
	res, m := r.app.result, r.app.attempts
	r.mu.Unlock()
	switch {
	case m == n || res == nil:
		return fmt.Errorf("group %s: %w: the round took no app-consistent cut", name, ErrNotAppConsistent)
	case res.Thaw != "ok":
		return fmt.Errorf("group %s: %w: THAW COMMAND FAILED, the guest may still be frozen: %s", name, ErrNotAppConsistent, res.Thaw)
	case !res.AppConsistent:
		return fmt.Errorf("group %s: %w: replicated a crash-consistent point instead: freeze: %s", name, ErrNotAppConsistent, res.Freeze)
	}
	return nil
}

// runHook runs a freeze or thaw command with sh -c in its own process
// group. At the timeout (or when ctx ends) the whole group is killed.
func runHook(ctx context.Context, cmdline string, env []string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "sh", "-c", cmdline)
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = time.Second // a background child holding the output open
	var out tailBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	switch {
	case err == nil:
		return nil
	case errors.Is(err, exec.ErrWaitDelay) && ctx.Err() == nil:
		return nil // exited 0; a child it left behind still holds its output
	case errors.Is(ctx.Err(), context.DeadlineExceeded):
		return fmt.Errorf("%q timed out after %s (killed with its process group)%s", cmdline, timeout, out.suffix())
	case ctx.Err() != nil:
		return fmt.Errorf("%q: %w%s", cmdline, ctx.Err(), out.suffix())
	default:
		return fmt.Errorf("%q: %v%s", cmdline, err, out.suffix())
	}
}

// tailBuffer keeps the last 2 KiB of a command's output.
type tailBuffer struct {
	mu sync.Mutex
	b  []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.b = append(t.b, p...)
	if len(t.b) > 2048 {
		t.b = t.b[len(t.b)-2048:]
	}
	return len(p), nil
}

func (t *tailBuffer) suffix() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := string(bytes.TrimSpace(t.b))
	if s == "" {
		return ""
	}
	return ": " + strings.Join(strings.Fields(s), " ")
}
