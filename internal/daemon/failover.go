package daemon

// Points mount and test failover in the replica daemon (docs/replica.md,
// "Points as files" and "Test failover"). The replica store is locked by this
// process, so every FUSE mount of it is served from here: the points mount
// (standin serve --points-mount, or standin points mount through the control
// socket) and one mount per test failover.
//
// Restart: test failovers are re-mounted when the daemon starts (their
// records, deltas and durable pins are in the store). A test whose mount
// cannot be restored (directory gone, busy, point unreadable) is listed as
// stale with the reason and can be stopped. A mount left dead by a killed
// daemon (ENOTCONN) at a test's directory is detached first. Points mounts
// made with 'standin points mount' last until the daemon stops; the
// --points-mount flag mounts at every start.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/standin/standin/applier"
	"github.com/standin/standin/fusefs"
)

var (
	errBusy  = errors.New("busy")
	errUsage = errors.New("usage")
)

// PointsMountRequest is the body of POST /points/mount and /points/unmount.
type PointsMountRequest struct {
	Dir string `json:"dir"`
	// Access: who besides the daemon's user may read (mount only; default
	// nobody).
	Access fusefs.Access `json:"access"`
}

// PointsMount is one points mount of the daemon.
type PointsMount struct {
	Dir    string        `json:"dir"`
	Since  time.Time     `json:"since"`
	Flag   bool          `json:"flag,omitempty"` // from --points-mount
	Access fusefs.Access `json:"access"`
}

// FailoverTestRequest is the body of POST /failover/test.
type FailoverTestRequest struct {
	Groups      []string      `json:"groups"`
	All         bool          `json:"all"`
	Point       string        `json:"point"` // ID, time or latest ("" = latest)
	Mount       string        `json:"mount"` // "" = RSTORE/failover-tests/ID/mnt
	BootCheck   string        `json:"boot_check"`
	BootTimeout time.Duration `json:"boot_timeout"`
	DryRun      bool          `json:"dry_run"`
	// Access: who besides the daemon's user may use the images (default
	// nobody); kept with the test, also across restarts.
	Access fusefs.Access `json:"access"`
}

// FailoverTest is a test failover as the daemon reports it.
type FailoverTest struct {
	applier.TestFailover
	State   string   `json:"state"` // planned (dry run), mounted, stale
	Reason  string   `json:"reason,omitempty"`
	Paths   []string `json:"paths"`
	Written int64    `json:"written_bytes"`
	// CreateSeconds is how long creating and mounting took (creation only).
	CreateSeconds float64 `json:"create_seconds,omitempty"`
}

// FailoverStopRequest is the body of POST /failover/test/stop.
type FailoverStopRequest struct {
	Groups []string `json:"groups"`
	All    bool     `json:"all"`
	ID     string   `json:"id"`
	Force  bool     `json:"force"` // detach a busy mount lazily instead of refusing
}

type liveTest struct {
	srv    *fusefs.Server
	sess   *applier.TestSession
	reason string // stale: why it is not mounted
}

type failoverMgr struct {
	rep   *applier.Replica
	store string
	log   *slog.Logger

	mu      sync.Mutex // create/stop/mount/unmount one at a time
	pmounts map[string]*pointsMount
	tests   map[string]*liveTest
}

type pointsMount struct {
	srv  *fusefs.Server
	info PointsMount
}

// startFailover cleans up interrupted test failovers, re-mounts the others
// and mounts the points at pointsDir (if set).
func startFailover(rep *applier.Replica, store, pointsDir string, pointsAcc fusefs.Access, log *slog.Logger) (*failoverMgr, error) {
	m := &failoverMgr{rep: rep, store: store, log: log, pmounts: map[string]*pointsMount{}, tests: map[string]*liveTest{}}
	removed, err := rep.CleanupTests()
	for _, x := range removed {
		log.Info("test failover: removed leftover of an interrupted create/stop", "what", x)
	}
	if err != nil {
		log.Error("test failover cleanup", "err", err)
	}
	tfs, err := rep.Tests()
	if err != nil {
		log.Error("test failovers unreadable", "err", err)
	}
	for _, tf := range tfs {
		lt := &liveTest{}
		m.tests[tf.ID] = lt
		if err := m.prepareDir(tf.Mount, true); err != nil {
			lt.reason = err.Error()
		} else if err := m.mountTest(tf.ID, lt); err != nil {
			lt.reason = err.Error()
		}
		if lt.reason != "" {
			log.Error("test failover not re-mounted; listed as stale", "id", tf.ID, "group", tf.Group, "reason", lt.reason)
		} else {
			log.Info("test failover re-mounted", "id", tf.ID, "group", tf.Group, "point", tf.Point, "mount", tf.Mount)
		}
	}
	if pointsDir != "" {
		if _, err := m.mountPoints(pointsDir, true, pointsAcc); err != nil {
			m.close()
			return nil, fmt.Errorf("--points-mount: %w", err)
		}
	}
	return m, nil
}

// close unmounts everything (lazily where busy) and closes the test images
// (their deltas are synced); records and pins stay for the next start.
func (m *failoverMgr) close() {
	m.mu.Lock()
	defer m.mu.Unlock()
	for id, lt := range m.tests {
		if lt.srv != nil {
			if err := lt.srv.Unmount(); err != nil {
				m.log.Error("test failover unmount", "id", id, "err", err)
			}
		}
		if lt.sess != nil {
			if err := lt.sess.Close(); err != nil {
				m.log.Error("test failover close", "id", id, "err", err)
			}
		}
	}
	m.tests = map[string]*liveTest{}
	for dir, pm := range m.pmounts {
		if err := pm.srv.Unmount(); err != nil {
			m.log.Error("points unmount", "dir", dir, "err", err)
		}
	}
	m.pmounts = map[string]*pointsMount{}
}

// ---------------------------------------------------------------------------
// mount directories

// mountAt returns the filesystem type of the mount at dir ("" if dir is not
// a mount point).
func mountAt(dir string) string {
	fstype, _ := mountInfo(dir)
	return fstype
}

// mountInfo returns the filesystem type and the device ("major:minor") of
// the topmost mount at dir, from /proc/self/mountinfo ("" if none).
func mountInfo(dir string) (fstype, dev string) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<16), 1<<20)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 7 || unescapeMountinfo(fs[4]) != dir {
			continue
		}
		dev = fs[2] // the last (topmost) mount wins
		for i := 6; i+1 < len(fs); i++ {
			if fs[i] == "-" {
				fstype = fs[i+1]
				break
			}
		}
	}
	return fstype, dev
}

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

// ours reports whether dir is served by this daemon, or lies inside one of
// its mounts (this process must never access its own mounts: go-fuse can
// deadlock). Called with m.mu held.
func (m *failoverMgr) ours(dir string) bool {
	inside := func(mnt string) bool { return dir == mnt || strings.HasPrefix(dir, mnt+"/") }
	for d := range m.pmounts {
		if inside(d) {
			return true
		}
	}
	for _, lt := range m.tests {
		if lt.srv != nil && inside(lt.srv.Dir()) {
			return true
		}
	}
	return false
}

// prepareDir makes dir usable as a mount point: it must be an empty
// directory that is not a mount point; it is created if missing (returns
// made). With stale, a dead FUSE mount of standin at dir (a killed daemon's)
// is detached first. Called with m.mu held.
func (m *failoverMgr) prepareDir(dir string, stale bool) error {
	_, err := m.prepareDirMade(dir, stale)
	return err
}

func (m *failoverMgr) prepareDirMade(dir string, stale bool) (made bool, err error) {
	if !filepath.IsAbs(dir) {
		return false, fmt.Errorf("mount directory %q: not an absolute path: %w", dir, errUsage)
	}
	dir = filepath.Clean(dir)
	if m.ours(dir) {
		return false, fmt.Errorf("mount directory %s: %w: this daemon serves a mount there (or around it)", dir, errBusy)
	}
	if ft := mountAt(dir); ft != "" {
		var st unix.Stat_t
		serr := unix.Stat(dir, &st)
		if stale && ft == "fuse.standin" && errors.Is(serr, syscall.ENOTCONN) {
			m.log.Info("detaching the dead mount of an earlier daemon", "dir", dir)
			if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
				return false, fmt.Errorf("mount directory %s: detaching a dead mount: %w", dir, err)
			}
		} else {
			return false, fmt.Errorf("mount directory %s: %w: something (%s) is mounted there", dir, errBusy, ft)
		}
	}
	st, err := os.Stat(dir)
	switch {
	case errors.Is(err, os.ErrNotExist):
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return false, fmt.Errorf("mount directory: %w", err)
		}
		return true, nil
	case err != nil:
		return false, fmt.Errorf("mount directory: %w", err)
	case !st.IsDir():
		return false, fmt.Errorf("mount directory %s is not a directory: %w", dir, errUsage)
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return false, fmt.Errorf("mount directory: %w", err)
	}
	if len(ents) > 0 {
		return false, fmt.Errorf("mount directory %s: %w: not empty", dir, errBusy)
	}
	return false, nil
}

// ---------------------------------------------------------------------------
// points mount

// pointSource adapts the replica store to the points mount. Listings are
// cached per group until its list of points changes (PointsVersion): a
// READDIRPLUS looks every entry up, which would otherwise list the group
// once per entry.
type pointSource struct {
	rep   *applier.Replica
	mu    sync.Mutex
	cache map[string]cachedFiles
}

type cachedFiles struct {
	next  uint64
	count int
	files []fusefs.PointFile
}

func newPointSource(rep *applier.Replica) *pointSource {
	return &pointSource{rep: rep, cache: map[string]cachedFiles{}}
}

func (s *pointSource) Groups() ([]string, error) { return s.rep.Groups(), nil }

// pointTimeName is the time part of a point file name: RFC 3339 in UTC to
// the second, or to the nanosecond when two points of the group fall in the
// same second.
func pointTimeName(t time.Time, nano bool) string {
	if nano {
		return t.UTC().Format(time.RFC3339Nano)
	}
	return t.UTC().Format(time.RFC3339)
}

func (s *pointSource) Files(group string) ([]fusefs.PointFile, error) {
	next, count, err := s.rep.PointsVersion(group)
	if err != nil {
		return nil, sourceErr(err)
	}
	s.mu.Lock()
	c, ok := s.cache[group]
	s.mu.Unlock()
	if ok && c.next == next && c.count == count {
		return c.files, nil
	}
	pfs, err := s.rep.PointFiles(group)
	if err != nil {
		return nil, sourceErr(err)
	}
	perSecond := map[int64]map[string]bool{}
	for _, pf := range pfs {
		sec := pf.Time.Unix()
		if perSecond[sec] == nil {
			perSecond[sec] = map[string]bool{}
		}
		perSecond[sec][pf.Point] = true
	}
	out := make([]fusefs.PointFile, 0, len(pfs))
	for _, pf := range pfs {
		nano := len(perSecond[pf.Time.Unix()]) > 1
		out = append(out, fusefs.PointFile{
			Name: pf.File + "@" + pointTimeName(pf.Time, nano), Image: pf.File,
			Key: pf.Point + "/" + pf.ImageID, Size: pf.Size, Time: pf.Time, Latest: pf.Latest, Allocated: pf.Allocated,
		})
	}
	if next2, count2, err := s.rep.PointsVersion(group); err == nil && next2 == next && count2 == count {
		s.mu.Lock()
		s.cache[group] = cachedFiles{next: next, count: count, files: out}
		s.mu.Unlock()
	}
	return out, nil
}

func (s *pointSource) Open(group string, f fusefs.PointFile) (fusefs.ImageReader, error) {
	point, id, ok := strings.Cut(f.Key, "/")
	if !ok {
		return nil, syscall.ENOENT
	}
	r, err := s.rep.OpenPinned(group, point, id)
	if err != nil {
		return nil, sourceErr(err)
	}
	return r, nil
}

func sourceErr(err error) error {
	for _, e := range []error{applier.ErrNoGroup, applier.ErrNoPoint, applier.ErrPointGone, applier.ErrNoImage, applier.ErrBadName} {
		if errors.Is(err, e) {
			return syscall.ENOENT
		}
	}
	return err
}

// mountPoints mounts the points at dir. Called with m.mu NOT held.
func (m *failoverMgr) mountPoints(dir string, flag bool, acc fusefs.Access) (PointsMount, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	dir = filepath.Clean(dir)
	if err := m.prepareDir(dir, flag); err != nil {
		return PointsMount{}, err
	}
	srv, err := fusefs.MountPoints(dir, newPointSource(m.rep), fusefs.Options{Logger: m.log, Access: acc})
	if err != nil {
		return PointsMount{}, err
	}
	tuneReadAhead(dir, m.log)
	pm := &pointsMount{srv: srv, info: PointsMount{Dir: dir, Since: time.Now().UTC(), Flag: flag, Access: acc}}
	m.pmounts[dir] = pm
	m.log.Info("points mounted", "dir", dir, "allow_other", acc.AllowOther, "gid", acc.Gid, "mode", fmt.Sprintf("%04o", acc.Mode))
	return pm.info, nil
}

func (m *failoverMgr) unmountPoints(dir string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	dir = filepath.Clean(dir)
	pm := m.pmounts[dir]
	if pm == nil {
		return fmt.Errorf("%s is not a points mount of this daemon: %w", dir, applier.ErrNoPoint)
	}
	if err := pm.srv.UnmountStrict(); err != nil {
		if errors.Is(err, syscall.EBUSY) {
			return fmt.Errorf("points mount %s: %w: files are open (%v)", dir, errBusy, err)
		}
		return err
	}
	delete(m.pmounts, dir)
	m.log.Info("points unmounted", "dir", dir)
	return nil
}

// readAheadKB is the kernel read-ahead set on the mounts' backing device
// info: FUSE starts at 128 KiB, which caps buffered sequential reads.
const readAheadKB = 4096

// tuneReadAhead raises the read-ahead of the FUSE mount at dir (best effort).
func tuneReadAhead(dir string, log *slog.Logger) {
	_, dev := mountInfo(dir)
	if dev == "" {
		return
	}
	p := filepath.Join("/sys/class/bdi", dev, "read_ahead_kb")
	if err := os.WriteFile(p, []byte(strconv.Itoa(readAheadKB)), 0o644); err != nil {
		log.Debug("read-ahead not raised", "path", p, "err", err)
	}
}

// ---------------------------------------------------------------------------
// test failover

// mountTest opens a test's images and mounts them at its directory.
// Called with m.mu held (or before the manager is shared).
func (m *failoverMgr) mountTest(id string, lt *liveTest) error {
	sess, err := m.rep.OpenTest(id)
	if err != nil {
		return err
	}
	var imgs []fusefs.NamedImage
	for _, ti := range sess.Images {
		imgs = append(imgs, fusefs.NamedImage{Name: ti.Info.File, Image: ti})
	}
	acc := fusefs.Access{AllowOther: sess.Record.AllowOther, Gid: sess.Record.Gid, Mode: sess.Record.Mode}
	srv, err := fusefs.MountImages(sess.Record.Mount, imgs, fusefs.Options{Logger: m.log, Access: acc})
	if err != nil {
		sess.Close()
		return err
	}
	tuneReadAhead(sess.Record.Mount, m.log)
	lt.srv, lt.sess, lt.reason = srv, sess, ""
	return nil
}

func (m *failoverMgr) report(tf applier.TestFailover) FailoverTest {
	ft := FailoverTest{TestFailover: tf, State: "planned"}
	for _, im := range tf.Images {
		ft.Paths = append(ft.Paths, filepath.Join(tf.Mount, im.File))
	}
	if tf.ID == "" { // a plan
		return ft
	}
	if lt := m.tests[tf.ID]; lt != nil {
		switch {
		case lt.srv != nil:
			ft.State = "mounted"
			ft.Written = lt.sess.Written()
		default:
			ft.State, ft.Reason = "stale", lt.reason
		}
	} else {
		ft.State, ft.Reason = "stale", "not mounted by this daemon"
	}
	return ft
}

// selectGroups resolves the groups of a request.
func (m *failoverMgr) selectGroups(groups []string, all bool) ([]string, error) {
	have := m.rep.Groups()
	if all {
		if len(groups) > 0 {
			return nil, fmt.Errorf("--group and --all exclude each other: %w", errUsage)
		}
		if len(have) == 0 {
			return nil, fmt.Errorf("the replica holds no group: %w", applier.ErrNoGroup)
		}
		return have, nil
	}
	if len(groups) == 0 {
		return nil, fmt.Errorf("name a --group or --all: %w", errUsage)
	}
	var out []string
	for _, g := range groups {
		if !slices.Contains(have, g) {
			return nil, fmt.Errorf("group %q (the replica holds: %s): %w", g, strings.Join(have, ", "), applier.ErrNoGroup)
		}
		if !slices.Contains(out, g) {
			out = append(out, g)
		}
	}
	return out, nil
}

// createTests plans every group first (nothing changes if one cannot be
// planned), then creates and mounts each; if one fails, the ones created by
// this request are removed again. Boot checks run after all are mounted.
func (m *failoverMgr) createTests(req FailoverTestRequest) ([]FailoverTest, error) {
	groups, err := m.selectGroups(req.Groups, req.All)
	if err != nil {
		return nil, err
	}
	if req.Mount != "" && !filepath.IsAbs(req.Mount) {
		return nil, fmt.Errorf("--mount %q: not an absolute path: %w", req.Mount, errUsage)
	}
	m.mu.Lock()
	var plans []applier.TestFailover
	for _, g := range groups {
		p, err := m.rep.PlanTest(g, req.Point)
		if err != nil {
			m.mu.Unlock()
			return nil, err
		}
		p.AllowOther, p.Gid, p.Mode = req.Access.AllowOther, req.Access.Gid, req.Access.Mode
		switch {
		case req.Mount == "":
		case len(groups) == 1:
			p.Mount = filepath.Clean(req.Mount)
		default:
			p.Mount = filepath.Join(req.Mount, g)
		}
		plans = append(plans, p)
	}
	// Check the mount directories without creating them.
	for _, p := range plans {
		if p.Mount == "" {
			continue
		}
		if ft := mountAt(p.Mount); ft != "" || m.ours(p.Mount) {
			m.mu.Unlock()
			return nil, fmt.Errorf("mount directory %s: %w: something (%s) is mounted there", p.Mount, errBusy, ft)
		}
		if ents, err := os.ReadDir(p.Mount); err == nil && len(ents) > 0 {
			m.mu.Unlock()
			return nil, fmt.Errorf("mount directory %s: %w: not empty", p.Mount, errBusy)
		} else if err != nil && !errors.Is(err, os.ErrNotExist) {
			m.mu.Unlock()
			return nil, fmt.Errorf("mount directory %s: %w", p.Mount, err)
		}
	}
	if req.DryRun {
		m.mu.Unlock()
		var out []FailoverTest
		for _, p := range plans {
			if p.Mount == "" {
				p.Mount = m.rep.DefaultTestMount(p.Group + "-XXXXXXXX")
			}
			if req.BootCheck != "" {
				p.BootCheck = &applier.BootCheck{Command: req.BootCheck, ExitCode: -1}
			}
			out = append(out, m.report(p))
		}
		return out, nil
	}
	var out []FailoverTest
	var created []string
	fail := func(err error) ([]FailoverTest, error) {
		for _, id := range created {
			if e := m.stopLocked(id, true); e != nil {
				m.log.Error("test failover: rolling back", "id", id, "err", e)
			}
		}
		m.mu.Unlock()
		return nil, err
	}
	for _, p := range plans {
		t0 := time.Now()
		made := false
		if p.Mount != "" {
			if made, err = m.prepareDirMade(p.Mount, false); err != nil {
				return fail(err)
			}
		}
		tf, err := m.rep.CreateTest(p, p.Mount, made)
		if err != nil {
			if made {
				os.Remove(p.Mount)
			}
			return fail(err)
		}
		created = append(created, tf.ID)
		lt := &liveTest{}
		m.tests[tf.ID] = lt
		if p.Mount == "" {
			if err := os.MkdirAll(tf.Mount, 0o755); err != nil {
				return fail(err)
			}
		}
		if err := m.mountTest(tf.ID, lt); err != nil {
			lt.reason = err.Error()
			return fail(fmt.Errorf("test failover of %s: mount %s: %w", tf.Group, tf.Mount, err))
		}
		ft := m.report(tf)
		ft.CreateSeconds = time.Since(t0).Seconds()
		m.log.Info("test failover created", "id", tf.ID, "group", tf.Group, "point", tf.Point, "mount", tf.Mount, "seconds", ft.CreateSeconds)
		out = append(out, ft)
	}
	m.mu.Unlock()
	if req.BootCheck != "" {
		timeout := req.BootTimeout
		if timeout <= 0 {
			timeout = 10 * time.Minute
		}
		for i := range out {
			bc := runBootCheck(req.BootCheck, timeout, out[i])
			out[i].BootCheck = &bc
			if err := m.rep.UpdateTest(out[i].ID, func(tf *applier.TestFailover) { tf.BootCheck = &bc }); err != nil {
				m.log.Error("test failover: recording the boot check", "id", out[i].ID, "err", err)
			}
			m.log.Info("test failover boot check", "id", out[i].ID, "passed", bc.Passed, "exit", bc.ExitCode, "seconds", bc.Seconds)
		}
	}
	return out, nil
}

// outputTail keeps the last max bytes written to it.
type outputTail struct {
	mu  sync.Mutex
	max int
	b   []byte
}

func (o *outputTail) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.b = append(o.b, p...)
	if len(o.b) > o.max {
		o.b = append(o.b[:0:0], o.b[len(o.b)-o.max:]...)
	}
	return len(p), nil
}

// runBootCheck runs cmd with sh -c against a mounted test failover, with a
// timeout that kills its whole process group.
func runBootCheck(cmd string, timeout time.Duration, ft FailoverTest) applier.BootCheck {
	bc := applier.BootCheck{Command: cmd, Started: time.Now().UTC(), ExitCode: -1}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c := exec.CommandContext(ctx, "sh", "-c", cmd)
	c.Env = append(os.Environ(),
		"STANDIN_TEST_IMAGES="+strings.Join(ft.Paths, " "),
		"STANDIN_TEST_GROUP="+ft.Group,
		"STANDIN_TEST_POINT="+ft.Point,
		"STANDIN_TEST_POINT_TIME="+ft.PointTime.UTC().Format(time.RFC3339Nano),
		"STANDIN_TEST_ID="+ft.ID,
		"STANDIN_TEST_MOUNT="+ft.Mount,
	)
	c.Dir = ft.Mount
	out := &outputTail{max: 4096}
	c.Stdout, c.Stderr = out, out
	c.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	c.Cancel = func() error { return syscall.Kill(-c.Process.Pid, syscall.SIGKILL) }
	c.WaitDelay = 5 * time.Second
	err := c.Run()
	bc.Seconds = time.Since(bc.Started).Seconds()
	bc.Output = string(out.b)
	if c.ProcessState != nil {
		bc.ExitCode = c.ProcessState.ExitCode()
	}
	if ctx.Err() != nil {
		bc.TimedOut = true
		bc.Error = fmt.Sprintf("timed out after %v", timeout)
	} else if err != nil && c.ProcessState == nil {
		bc.Error = err.Error()
	}
	bc.Passed = err == nil && bc.ExitCode == 0 && !bc.TimedOut
	return bc
}

func (m *failoverMgr) list(group string) ([]FailoverTest, error) {
	tfs, err := m.rep.Tests()
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	out := []FailoverTest{}
	for _, tf := range tfs {
		if group == "" || tf.Group == group {
			out = append(out, m.report(tf))
		}
	}
	return out, nil
}

// stopTests stops the selected test failovers: all of the groups named (or
// --all), or the one --id names.
func (m *failoverMgr) stopTests(req FailoverStopRequest) ([]string, error) {
	tfs, err := m.rep.Tests()
	if err != nil {
		return nil, err
	}
	var ids []string
	switch {
	case req.ID != "":
		var found *applier.TestFailover
		for i := range tfs {
			if tfs[i].ID == req.ID {
				found = &tfs[i]
			}
		}
		if found == nil {
			return nil, fmt.Errorf("test failover %q: %w", req.ID, applier.ErrNoTest)
		}
		if len(req.Groups) > 0 && !slices.Contains(req.Groups, found.Group) {
			return nil, fmt.Errorf("test failover %s is of group %s, not %s: %w", req.ID, found.Group, strings.Join(req.Groups, ","), applier.ErrNoTest)
		}
		ids = []string{req.ID}
	case req.All:
		if len(req.Groups) > 0 {
			return nil, fmt.Errorf("--group and --all exclude each other: %w", errUsage)
		}
		for _, tf := range tfs {
			ids = append(ids, tf.ID)
		}
	case len(req.Groups) > 0:
		for _, g := range req.Groups {
			n := 0
			for _, tf := range tfs {
				if tf.Group == g {
					ids = append(ids, tf.ID)
					n++
				}
			}
			if n == 0 {
				return nil, fmt.Errorf("group %q has no test failover: %w", g, applier.ErrNoTest)
			}
		}
	default:
		return nil, fmt.Errorf("name a --group, an --id or --all: %w", errUsage)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	var done []string
	for _, id := range ids {
		if err := m.stopLocked(id, req.Force); err != nil {
			if len(done) > 0 {
				return done, fmt.Errorf("test failover %s: %w (stopped before it: %s)", id, err, strings.Join(done, ", "))
			}
			return done, fmt.Errorf("test failover %s: %w", id, err)
		}
		done = append(done, id)
	}
	return done, nil
}

// stopLocked unmounts, closes, removes a test failover's files and pin, and
// its mount directory if it was created for it. Called with m.mu held.
func (m *failoverMgr) stopLocked(id string, force bool) error {
	tf, err := m.rep.Test(id)
	if err != nil {
		return err
	}
	if lt := m.tests[id]; lt != nil && lt.srv != nil {
		err := lt.srv.UnmountStrict()
		if err != nil && errors.Is(err, syscall.EBUSY) && force {
			m.log.Warn("test failover busy; detaching its mount lazily", "id", id, "mount", tf.Mount)
			err = unix.Unmount(tf.Mount, unix.MNT_DETACH)
		}
		if err != nil {
			if errors.Is(err, syscall.EBUSY) {
				return fmt.Errorf("%w: %s is in use (open files or a loop device); close them or use --force", errBusy, tf.Mount)
			}
			return err
		}
		lt.srv = nil
	}
	if lt := m.tests[id]; lt != nil && lt.sess != nil {
		lt.sess.Close()
		lt.sess = nil
	}
	if mountAt(tf.Mount) != "" && !m.ours(tf.Mount) {
		// A dead mount of an earlier daemon (stale test).
		var st unix.Stat_t
		if err := unix.Stat(tf.Mount, &st); errors.Is(err, syscall.ENOTCONN) {
			unix.Unmount(tf.Mount, unix.MNT_DETACH)
		}
	}
	if err := m.rep.RemoveTest(id); err != nil {
		return err
	}
	delete(m.tests, id)
	if tf.MountMade {
		if err := os.Remove(tf.Mount); err != nil && !errors.Is(err, os.ErrNotExist) {
			m.log.Warn("test failover: mount directory left", "dir", tf.Mount, "err", err)
		}
	}
	m.log.Info("test failover stopped", "id", id, "group", tf.Group)
	return nil
}

// ---------------------------------------------------------------------------
// control socket

// handler serves the points-mount and failover routes and passes the rest
// to next.
func (m *failoverMgr) handler(next http.Handler) http.Handler {
	mux := http.NewServeMux()
	decode := func(w http.ResponseWriter, r *http.Request, v any) bool {
		if err := json.NewDecoder(r.Body).Decode(v); err != nil {
			reply(w, http.StatusBadRequest, apiError{Error: "bad request: " + err.Error(), Code: "usage"})
			return false
		}
		return true
	}
	mux.HandleFunc("POST /points/mount", func(w http.ResponseWriter, r *http.Request) {
		var req PointsMountRequest
		if !decode(w, r, &req) {
			return
		}
		if !filepath.IsAbs(req.Dir) {
			replyErr(w, fmt.Errorf("mount directory %q: not an absolute path: %w", req.Dir, errUsage))
			return
		}
		pm, err := m.mountPoints(req.Dir, false, req.Access)
		if err != nil {
			replyErr(w, err)
			return
		}
		reply(w, http.StatusOK, pm)
	})
	mux.HandleFunc("POST /points/unmount", func(w http.ResponseWriter, r *http.Request) {
		var req PointsMountRequest
		if !decode(w, r, &req) {
			return
		}
		if err := m.unmountPoints(req.Dir); err != nil {
			replyErr(w, err)
			return
		}
		reply(w, http.StatusOK, map[string]string{"unmounted": filepath.Clean(req.Dir)})
	})
	mux.HandleFunc("GET /points/mounts", func(w http.ResponseWriter, r *http.Request) {
		m.mu.Lock()
		out := []PointsMount{}
		for _, pm := range m.pmounts {
			out = append(out, pm.info)
		}
		m.mu.Unlock()
		slices.SortFunc(out, func(a, b PointsMount) int { return strings.Compare(a.Dir, b.Dir) })
		reply(w, http.StatusOK, out)
	})
	mux.HandleFunc("GET /points/pins", func(w http.ResponseWriter, r *http.Request) {
		ps, err := m.rep.Pins(r.URL.Query().Get("group"))
		if err != nil {
			replyErr(w, err)
			return
		}
		if ps == nil {
			ps = []applier.PinInfo{}
		}
		reply(w, http.StatusOK, ps)
	})
	mux.HandleFunc("POST /failover/test", func(w http.ResponseWriter, r *http.Request) {
		var req FailoverTestRequest
		if !decode(w, r, &req) {
			return
		}
		out, err := m.createTests(req)
		if err != nil {
			replyErr(w, err)
			return
		}
		reply(w, http.StatusOK, out)
	})
	mux.HandleFunc("GET /failover/tests", func(w http.ResponseWriter, r *http.Request) {
		out, err := m.list(r.URL.Query().Get("group"))
		if err != nil {
			replyErr(w, err)
			return
		}
		reply(w, http.StatusOK, out)
	})
	mux.HandleFunc("POST /failover/test/stop", func(w http.ResponseWriter, r *http.Request) {
		var req FailoverStopRequest
		if !decode(w, r, &req) {
			return
		}
		done, err := m.stopTests(req)
		if err != nil {
			replyErr(w, err)
			return
		}
		reply(w, http.StatusOK, done)
	})
	mux.Handle("/", next)
	return mux
}

func replyErr(w http.ResponseWriter, err error) {
	switch {
	case errors.Is(err, applier.ErrNoGroup), errors.Is(err, applier.ErrNoPoint), errors.Is(err, applier.ErrNoImage),
		errors.Is(err, applier.ErrNoTest), errors.Is(err, applier.ErrPointGone):
		reply(w, http.StatusNotFound, apiError{Error: err.Error(), Code: "not_found"})
	case errors.Is(err, errUsage), errors.Is(err, applier.ErrBadName):
		reply(w, http.StatusBadRequest, apiError{Error: err.Error(), Code: "usage"})
	case errors.Is(err, errBusy):
		reply(w, http.StatusConflict, apiError{Error: err.Error(), Code: "busy"})
	default:
		reply(w, http.StatusInternalServerError, apiError{Error: err.Error(), Code: "failure"})
	}
}
