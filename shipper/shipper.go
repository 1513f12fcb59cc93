package shipper

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/standin/standin/internal/wire"
	"github.com/standin/standin/tracker"
)

// Shipper runs the replication schedule of every group of a primary store:
// cut every interval, upload the cycle files (resumable, throttled), commit
// them on the replica as one recovery point, retry with backoff. While cycles
// of a group are still unshipped no new cut is taken, so the dirty maps keep
// merging and one catch-up cycle ships when the replica is back: there is no
// "resync required" state.
type Shipper struct {
	store *tracker.Store
	dir   string
	log   *slog.Logger
	mnt   string // the mount point (SetMountpoint): image paths for freeze/thaw commands

	mu     sync.Mutex
	cfg    Config
	runs   map[string]*run
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

type run struct {
	g      Group
	cancel context.CancelFunc
	kick   chan chan error
	mu     sync.Mutex
	st     GroupStatus
	hist   []time.Time // successful cycle times (last 12 h)
	fails  []time.Time // failed rounds (last 12 h)
	app    appRun      // app-consistent points (appconsistent.go)
	// lastErr is the last round's error (guarded by mu).
	lastErr error
}

// GroupStatus is the health of one relationship, Hyper-V style.
type GroupStatus struct {
	Group        string     `json:"group"`
	Replica      string     `json:"replica"`
	Images       []string   `json:"images"`
	Interval     string     `json:"interval"`
	Paused       bool       `json:"paused"`
	Health       string     `json:"health"` // Normal, Warning, Critical
	Reasons      []string   `json:"reasons,omitempty"`
	LastCut      *time.Time `json:"last_cut,omitempty"`
	LastApplied  *time.Time `json:"last_replicated,omitempty"`
	LastPoint    string     `json:"last_point,omitempty"`
	Lag          string     `json:"lag,omitempty"`
	LagSeconds   float64    `json:"lag_seconds"`
	PendingBytes int64      `json:"pending_bytes"`
	BytesSent    int64      `json:"bytes_sent"`        // cycle uploads and chunk queries
	DedupSaved   int64      `json:"dedup_saved_bytes"` // cycle bytes not sent because the replica held the blocks
	Cycles       int        `json:"cycles_replicated"`
	Missed12h    int        `json:"missed_cycles_12h"`
	LastError    string     `json:"last_error,omitempty"`
	Initial      string     `json:"initial"`
	Resync       string     `json:"resync,omitempty"`  // a requested hash-compare resync not yet cut
	Waiting      string     `json:"waiting,omitempty"` // what the relationship waits for (a seed export or import)
	// App-consistent points (appconsistent.go): the schedule, the cut time
	// of the last app-consistent point the replica committed, the last
	// freeze/thaw.
	AppConsistent     string        `json:"app_consistent,omitempty"`
	LastAppConsistent *time.Time    `json:"last_app_consistent,omitempty"`
	FreezeThaw        *FreezeResult `json:"freeze_thaw,omitempty"`
}

// New creates the shipper of a store; Start runs it.
func New(st *tracker.Store, log *slog.Logger) (*Shipper, error) {
	cfg, err := LoadConfig(st.Dir())
	if err != nil {
		return nil, err
	}
	return &Shipper{store: st, dir: st.Dir(), log: log, cfg: cfg, runs: map[string]*run{}}, nil
}

// Start runs every configured group until ctx ends or Stop is called.
func (s *Shipper) Start(ctx context.Context) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ctx, s.cancel = context.WithCancel(ctx)
	for _, g := range s.cfg.Groups {
		s.startLocked(g)
	}
}

// Stop stops every group and waits for them.
func (s *Shipper) Stop() {
	s.mu.Lock()
	if s.cancel != nil {
		s.cancel()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

func (s *Shipper) startLocked(g Group) {
	if old := s.runs[g.Name]; old != nil {
		old.cancel()
	}
	ctx, cancel := context.WithCancel(s.ctx)
	r := &run{g: g, cancel: cancel, kick: make(chan chan error)}
	r.st = GroupStatus{Group: g.Name, Replica: g.Replica, Images: g.Images, Interval: g.Interval.String(), Paused: g.Paused, Health: "Normal", Initial: g.Initial, Resync: g.Resync.String()}
	s.runs[g.Name] = r
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.loop(ctx, r)
	}()
}

// Enable adds or replaces a group and persists the configuration.
func (s *Shipper) Enable(g Group) error {
	if err := g.Validate(); err != nil {
		return err
	}
	for _, name := range g.Images {
		if _, err := s.store.Image(name); err != nil {
			return fmt.Errorf("group %s: %w", g.Name, err)
		}
	}
	if _, err := newClient(s.dir, g.Replica); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, other := range s.cfg.Groups {
		if other.Name == g.Name {
			continue
		}
		for _, a := range other.Images {
			for _, b := range g.Images {
				if a == b {
					return fmt.Errorf("image %s is already replicated by group %s", a, other.Name)
				}
			}
		}
	}
	cfg := s.cfg
	cfg.Groups = append([]Group(nil), cfg.Groups...)
	if old := cfg.Find(g.Name); old != nil {
		if g.Seed == nil && slices.Equal(old.Images, g.Images) {
			g.Seed = old.Seed // re-enabling with other options keeps the seed state
		}
		g.AppConsistent = g.AppConsistent.keepState(old.AppConsistent)
		*old = g
	} else {
		cfg.Groups = append(cfg.Groups, g)
	}
	if err := SaveConfig(s.dir, cfg); err != nil {
		return err
	}
	s.cfg = cfg
	if s.ctx != nil {
		s.startLocked(g)
	}
	return nil
}

// Update applies f to the named group (pause, resume) and persists.
func (s *Shipper) Update(name string, f func(*Group)) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	g := s.cfg.Find(name)
	if g == nil {
		return fmt.Errorf("no replication group %q: %w", name, ErrNoGroup)
	}
	f(g)
	if err := SaveConfig(s.dir, s.cfg); err != nil {
		return err
	}
	if s.ctx != nil {
		s.startLocked(*g)
	}
	return nil
}

// persist applies f to the named group's configuration and saves it without
// restarting the group's run (for state the run itself records). The
// configuration is copied on write: f must replace, not modify, what a
// pointer field points to. f returns false to change nothing.
func (s *Shipper) persist(name string, f func(*Group) bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	cfg := s.cfg
	cfg.Groups = append([]Group(nil), cfg.Groups...)
	x := cfg.Find(name)
	if x == nil || !f(x) {
		return nil
	}
	if err := SaveConfig(s.dir, cfg); err != nil {
		return err
	}
	s.cfg = cfg
	return nil
}

// Disable removes a group. Its unshipped cycle files stay on disk.
func (s *Shipper) Disable(name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	var keep []Group
	found := false
	for _, g := range s.cfg.Groups {
		if g.Name == name {
			found = true
			continue
		}
		keep = append(keep, g)
	}
	if !found {
		return fmt.Errorf("no replication group %q: %w", name, ErrNoGroup)
	}
	if err := SaveConfig(s.dir, Config{Groups: keep}); err != nil {
		return err
	}
	s.cfg.Groups = keep
	if r := s.runs[name]; r != nil {
		r.cancel()
		delete(s.runs, name)
	}
	return nil
}

// ErrNoGroup: no such replication group.
var ErrNoGroup = errors.New("no such replication group")

// Groups returns the configured groups.
func (s *Shipper) Groups() []Group {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Group(nil), s.cfg.Groups...)
}

// Status returns the health of every group.
func (s *Shipper) Status() []GroupStatus {
	s.mu.Lock()
	runs := make([]*run, 0, len(s.runs))
	for _, r := range s.runs {
		runs = append(runs, r)
	}
	s.mu.Unlock()
	out := make([]GroupStatus, 0, len(runs))
	for _, r := range runs {
		out = append(out, r.status())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Group < out[j].Group })
	return out
}

// Now cuts and ships the group at once; with wait it returns only when the
// replica has applied the cut (the error says why it could not).
func (s *Shipper) Now(ctx context.Context, name string, wait bool) error {
	s.mu.Lock()
	r := s.runs[name]
	s.mu.Unlock()
	if r == nil {
		return fmt.Errorf("no replication group %q: %w", name, ErrNoGroup)
	}
	done := make(chan error, 1)
	select {
	case r.kick <- done:
	case <-ctx.Done():
		return ctx.Err()
	}
	if !wait {
		return nil
	}
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (s *Shipper) loop(ctx context.Context, r *run) {
	interval := r.g.Interval
	backoff := time.Second
	next := time.NewTimer(0) // first round at once: ship what is pending, cut the base
	defer next.Stop()
	for {
		var waiter chan error
		select {
		case <-ctx.Done():
			return
		case <-next.C:
		case waiter = <-r.kick:
		}
		if r.g.Paused {
			if waiter != nil {
				waiter <- fmt.Errorf("group %s is paused (standin replicate resume --group %s)", r.g.Name, r.g.Name)
			}
			next.Reset(interval)
			continue
		}
		err := s.round(ctx, r, waiter != nil)
		if waiter != nil {
			waiter <- err
		}
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			s.log.Warn("replication round failed; retrying", "group", r.g.Name, "in", backoff, "err", err)
			next.Reset(backoff)
			backoff = min(backoff*2, interval)
			continue
		}
		backoff = time.Second
		next.Reset(interval)
	}
}

// round ships pending cycles, or cuts and ships new ones.
func (s *Shipper) round(ctx context.Context, r *run, forced bool) (err error) {
	g := r.g
	defer func() { r.finish(g, err) }()
	c, err := newClient(s.dir, g.Replica)
	if err != nil {
		return err
	}
	ids := map[string]bool{}
	for _, name := range g.Images {
		im, err := s.store.Image(name)
		if err != nil {
			return err
		}
		ids[im.ID().String()] = true
	}
	if wait, err := s.seedGate(ctx, r, c); err != nil || wait != "" {
		r.mu.Lock()
		r.st.Waiting = wait
		r.mu.Unlock()
		if err == nil && forced {
			err = fmt.Errorf("group %s: %s", g.Name, wait)
		}
		return err
	}
	if err := s.reconcile(ctx, r, c); err != nil {
		return err
	}
	pending, err := s.pending(ids)
	if err != nil {
		return err
	}
	s.cleanThin(ids, pending)
	lim := newLimiter(&g)
	resync := g.Resync.Due(time.Now())
	if len(pending) > 0 {
		// Catch up first: a scheduled round ships what is pending and cuts
		// at the next tick; "replicate now" (or a due resync) cuts right after.
		if err := s.ship(ctx, r, c, lim, pending); err != nil || (!forced && !resync) {
			return err
		}
	}
	infos, err := s.cut(ctx, r, tracker.CutOptions{Compress: g.Compress != "none", Base: resync}) // freeze/thaw around it when due
	if err != nil {
		return err
	}
	if resync {
		// The base cut is durable: it ships (thinned) like any pending cycle.
		if err := s.resyncCut(r); err != nil {
			return err
		}
	}
	r.mu.Lock()
	t := infos[0].Time
	r.st.LastCut = &t
	r.mu.Unlock()
	if pending, err = s.pending(ids); err != nil {
		return err
	}
	return s.ship(ctx, r, c, lim, pending)
}

// seedGate holds a relationship that starts from a seed until the replica
// has imported it: before the export nothing is cut (the changes keep
// merging in the dirty maps), after it the replica is told which seed to
// expect and asked what it holds. It returns what the group waits for, or "".
func (s *Shipper) seedGate(ctx context.Context, r *run, c *client) (string, error) {
	g := r.g
	if g.Initial != "seed" || (g.Seed != nil && g.Seed.Imported) {
		r.mu.Lock()
		r.st.Waiting = ""
		r.mu.Unlock()
		return "", nil
	}
	if g.Seed == nil {
		return fmt.Sprintf("waiting for the seed export ('standin seed export --group %s --to DIR')", g.Name), nil
	}
	for _, si := range g.Seed.Images {
		im, err := s.store.Image(si.Name)
		if err != nil {
			return "", err
		}
		if gen := im.Generation(); gen != si.Generation {
			return fmt.Sprintf("the seed exported %s is of generation %d, but image %s is now at generation %d (its tracking state was lost): export a new seed ('standin seed export --group %s --to DIR')",
				g.Seed.Time.Format(time.RFC3339), si.Generation, si.Name, gen, g.Name), nil
		}
	}
	e := wire.SeedExpect{GroupCut: g.Seed.GroupCut, Time: g.Seed.Time}
	for _, im := range g.Seed.Images {
		e.Images = append(e.Images, wire.ImageState{ID: im.ID, Name: im.Name, Generation: im.Generation, Seq: im.Seq})
		if im.Root != "" {
			if e.Roots == nil {
				e.Roots = map[string]string{}
			}
			e.Roots[im.ID] = im.Root
		}
	}
	st, err := c.announceSeed(ctx, g.Name, e)
	if err != nil {
		return "", fmt.Errorf("announcing the seed to the replica: %w", err)
	}
	have := map[string]wire.ImageState{}
	for _, im := range st.Images {
		have[im.ID] = im
	}
	for _, im := range g.Seed.Images {
		h, ok := have[im.ID]
		if !ok || h.Generation != im.Generation || h.Seq < im.Seq {
			return fmt.Sprintf("waiting for the seed of %s to be imported on the replica ('standin seed import' of the seed exported %s)", g.Seed.Time.Format(time.RFC3339), g.Seed.Time.Format(time.RFC3339)), nil
		}
	}
	// Persist without restarting this run (Update would cancel it).
	err = s.persist(g.Name, func(x *Group) bool {
		if x.Seed == nil || x.Seed.GroupCut != g.Seed.GroupCut {
			return false
		}
		seed := *x.Seed
		seed.Imported = true
		x.Seed = &seed
		return true
	})
	if err != nil {
		return "", err
	}
	seed := *g.Seed
	seed.Imported = true
	r.g.Seed = &seed
	r.mu.Lock()
	r.st.Waiting = ""
	r.mu.Unlock()
	s.log.Info("the replica imported the seed; replication continues from its cut", "group", g.Name, "cut", g.Seed.Time)
	return "", nil
}

// SeedExported records a completed seed export of group: the relationship
// continues from its cut once the replica has imported it.
func (s *Shipper) SeedExported(group string, st SeedState) error {
	return s.Update(group, func(g *Group) {
		st.Imported = false
		g.Seed = &st
		g.Initial = "seed"
	})
}

// ship uploads and commits the pending cuts in order.
func (s *Shipper) ship(ctx context.Context, r *run, c *client, lim *limiter, pending [][]tracker.CycleInfo) error {
	g := r.g
	for _, cut := range pending {
		cr := wire.CommitRequest{GroupCut: cut[0].GroupCut, Policy: wire.Policy{Interval: g.Interval, Points: g.Points, PointEvery: g.PointEvery, AnyPointWindow: g.AnyPointWindow}}
		cr.AppConsistent = cutAppConsistent(cut)
		var pendingBytes int64
		for _, ci := range cut {
			pendingBytes += ci.Bytes
		}
		r.mu.Lock()
		r.st.PendingBytes = pendingBytes
		r.mu.Unlock()
		// Upload (base cycles thinned against what the replica holds) and commit.
		rep, err := s.shipCut(ctx, r, c, lim, cut, cr)
		if err != nil {
			return err
		}
		for _, ci := range cut {
			if err := os.Remove(ci.Path); err != nil {
				s.log.Warn("removing shipped cycle", "path", ci.Path, "err", err)
			}
		}
		r.mu.Lock()
		t := cut[0].Time
		r.st.LastApplied = &t
		r.st.LastPoint = rep.Point
		r.st.Cycles++
		r.st.PendingBytes = 0
		r.hist = append(r.hist, t)
		r.mu.Unlock()
		if cr.AppConsistent {
			s.appPointShipped(r, t)
		}
		s.log.Info("replicated", "group", g.Name, "point", rep.Point, "cycles", len(cut), "bytes", pendingBytes, "app_consistent", cr.AppConsistent)
	}
	return nil
}

// pending returns the staged, unshipped cycle files of the images (ids; nil
// = every image), grouped by cut, oldest first. Shipped files are deleted, so
// every file is pending.
func (s *Shipper) pending(ids map[string]bool) ([][]tracker.CycleInfo, error) {
	all, err := tracker.Cycles(s.dir, "")
	if err != nil {
		return nil, err
	}
	byCut := map[string][]tracker.CycleInfo{}
	var order []string
	for _, ci := range all {
		if ids != nil && !ids[ci.ID] {
			continue
		}
		if _, ok := byCut[ci.GroupCut]; !ok {
			order = append(order, ci.GroupCut)
		}
		byCut[ci.GroupCut] = append(byCut[ci.GroupCut], ci)
	}
	sort.SliceStable(order, func(i, j int) bool {
		a, b := byCut[order[i]][0], byCut[order[j]][0]
		if !a.Time.Equal(b.Time) {
			return a.Time.Before(b.Time)
		}
		return a.Seq < b.Seq
	})
	out := make([][]tracker.CycleInfo, 0, len(order))
	for _, k := range order {
		out = append(out, byCut[k])
	}
	return out, nil
}

func (r *run) finish(g Group, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	r.lastErr = err
	if err != nil {
		r.st.LastError = err.Error()
		r.fails = append(r.fails, now)
	} else {
		r.st.LastError = ""
	}
	cut := now.Add(-12 * time.Hour)
	for len(r.hist) > 0 && r.hist[0].Before(cut) {
		r.hist = r.hist[1:]
	}
	for len(r.fails) > 0 && r.fails[0].Before(cut) {
		r.fails = r.fails[1:]
	}
}

func (r *run) status() GroupStatus {
	r.mu.Lock()
	defer r.mu.Unlock()
	st := r.st
	st.Reasons = nil
	st.Missed12h = len(r.fails)
	interval := r.g.Interval
	now := time.Now()
	lag := time.Duration(0)
	if st.LastApplied != nil {
		lag = now.Sub(*st.LastApplied)
		st.Lag = lag.Round(time.Second).String()
		st.LagSeconds = lag.Seconds()
	}
	switch {
	case errors.Is(r.lastErr, ErrFailedOver):
		st.Health = "Critical"
		st.Reasons = append(st.Reasons, "split brain avoided: the replica took over this group (failover); this primary is stale and nothing it sends is applied: "+st.LastError)
	case errors.Is(r.lastErr, ErrQuota):
		st.Health = "Critical"
		st.Reasons = append(st.Reasons, "replica storage quota exceeded; nothing more is replicated until its administrator raises the quota ('standin pair quota') or space is freed: "+st.LastError)
	case st.Waiting != "" && st.LastError == "":
		st.Health = "Warning"
		st.Reasons = append(st.Reasons, st.Waiting)
	case st.Paused:
		st.Health = "Warning"
		st.Reasons = append(st.Reasons, "replication is paused")
	case st.LastApplied == nil && st.LastError != "":
		st.Health = "Critical"
		st.Reasons = append(st.Reasons, "never replicated: "+st.LastError)
	case st.LastApplied != nil && lag > 6*interval && lag > time.Minute:
		st.Health = "Critical"
		st.Reasons = append(st.Reasons, fmt.Sprintf("lag %s is more than 6 intervals", st.Lag))
	case st.LastApplied != nil && lag > 2*interval+30*time.Second:
		st.Health = "Warning"
		st.Reasons = append(st.Reasons, fmt.Sprintf("lag %s is more than 2 intervals", st.Lag))
	case st.LastError != "":
		st.Health = "Warning"
		st.Reasons = append(st.Reasons, "last round failed: "+st.LastError)
	default:
		st.Health = "Normal"
	}
	// Like Hyper-V: more than 20% of the last hour's cycles missed is a warning.
	hourAgo := now.Add(-time.Hour)
	missedHour := 0
	for _, f := range r.fails {
		if f.After(hourAgo) {
			missedHour++
		}
	}
	expected := max(1, int(time.Hour/max(interval, time.Second)))
	if missedHour*5 > expected && st.Health == "Normal" {
		st.Health = "Warning"
		st.Reasons = append(st.Reasons, fmt.Sprintf("%d of the last hour's %d cycles failed (%d in 12 h)", missedHour, expected, st.Missed12h))
	}
	r.appStatus(&st)
	return st
}
