package daemon

// Extended replication: the replica daemon forwards a group
// it receives onward to a third host, from its recovery points
// (applier.Replica.ForwardCut), shipped by a shipper.Relay. One goroutine per
// (group, target); configuration and state in RSTORE/forward.json; the relay
// directory (credentials, staged cut, thinned bases) in
// RSTORE/forward/TARGET/GROUP/. See docs/design.md, Extended replication.
//
// A round: ship a cut staged by an earlier round (crash, failure) and record
// it; then, if the group's latest point is not the one forwarded last, stage
// it (a merged delta per image from the last forwarded point, or a base) and
// ship it. The last forwarded point stays durably pinned (owner
// "forward:TARGET") so it is still a point when the next delta is computed;
// a staged point is pinned too ("forward-staged:TARGET"), the committed pin
// moves to it in one durable write before the staged pin goes.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/standin/standin/applier"
	"github.com/standin/standin/internal/fsutil"
	"github.com/standin/standin/shipper"
)

// minForwardInterval is the shortest forward interval accepted.
var minForwardInterval = 30 * time.Second

// Forward is one forward of a group to a third host, with its state
// (RSTORE/forward.json).
type Forward struct {
	Group          string        `json:"group"`
	To             string        `json:"to"` // HOST:PORT of the third host's replica daemon
	Interval       time.Duration `json:"interval"`
	Bandwidth      int64         `json:"bandwidth"` // bytes per second, 0 = unlimited
	Points         int           `json:"points"`
	PointEvery     time.Duration `json:"point_every"`
	AnyPointWindow time.Duration `json:"any_point_window"`

	// State.
	LastPoint     string            `json:"last_point,omitempty"`      // this store's point the target holds (pinned)
	LastPointTime *time.Time        `json:"last_point_time,omitempty"` // its cut time
	Gens          map[string]uint64 `json:"generations,omitempty"`     // image id → generation at LastPoint
	TargetPoint   string            `json:"target_point,omitempty"`    // the target's point made from it
	LastForwarded *time.Time        `json:"last_forwarded,omitempty"`  // when the target committed it
	LastBytes     int64             `json:"last_bytes"`                // bytes sent for it
	LastBase      bool              `json:"last_base,omitempty"`       // it was sent as a (thinned) base
	BytesSent     int64             `json:"bytes_sent"`                // every upload and dedup query, ever
	Forwards      int               `json:"forwards"`                  // cuts committed on the target
	LastError     string            `json:"last_error,omitempty"`
}

type forwardFile struct {
	Forwards []Forward `json:"forwards"`
}

// ForwardRequest is the body of POST /forward/enable, /forward/disable and
// /forward/now on the replica daemon.
type ForwardRequest struct {
	Group          string        `json:"group"`
	To             string        `json:"to"` // now: "" = every target of the group
	Token          string        `json:"token,omitempty"`
	Interval       time.Duration `json:"interval,omitempty"`
	Bandwidth      int64         `json:"bandwidth,omitempty"`
	Points         int           `json:"points,omitempty"`
	PointEvery     time.Duration `json:"point_every,omitempty"`
	AnyPointWindow time.Duration `json:"any_point_window,omitempty"`
	Wait           bool          `json:"wait,omitempty"`
}

// ForwardStatus is one entry of GET /forward.
type ForwardStatus struct {
	Forward
	Interval   string   `json:"interval"` // e.g. "15m0s" (forward.json keeps nanoseconds)
	Health     string   `json:"health"`   // Normal, Warning, Critical
	Reasons    []string `json:"reasons,omitempty"`
	Lag        string   `json:"lag,omitempty"` // age of the forwarded point while the store has a newer one
	LagSeconds float64  `json:"lag_seconds"`
	Latest     string   `json:"latest,omitempty"` // the group's latest point on this store
	Staged     string   `json:"staged,omitempty"` // a point staged, not yet committed by the target
	FailedOver bool     `json:"failed_over,omitempty"`
	Relay      string   `json:"relay"` // the relay directory
}

// ForwardNowResult is one target's outcome of POST /forward/now with wait.
type ForwardNowResult struct {
	Group       string `json:"group"`
	To          string `json:"to"`
	Point       string `json:"point,omitempty"`        // this store's point forwarded (or already there)
	TargetPoint string `json:"target_point,omitempty"` // the target's point
	Bytes       int64  `json:"bytes"`                  // sent by this round
	Base        bool   `json:"base,omitempty"`
	UpToDate    bool   `json:"up_to_date,omitempty"` // nothing new to forward
	Error       string `json:"error,omitempty"`
}

// errForwardFailedOver: the group runs on this host (failed over); a
// forward waits until it is a replica again.
var errForwardFailedOver = errors.New("group failed over to this host; forwarding resumes when it is a replica again")

type forwarder struct {
	rep   *applier.Replica
	srv   *applier.Server
	store string
	log   *slog.Logger

	mu     sync.Mutex
	cfg    forwardFile
	runs   map[string]*fwdRun
	locks  map[string]*sync.Mutex // per forward: one round at a time (also across a restart of its goroutine)
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

type fwdRun struct {
	key    string
	cancel context.CancelFunc
	done   chan struct{}
	kick   chan chan fwdOutcome
	mu     sync.Mutex
	failed bool // last round found the group failed over
	lastEr error
}

type fwdOutcome struct {
	res ForwardNowResult
	err error
}

func fwdKey(group, to string) string { return group + "\x00" + to }

func (f *forwarder) path() string { return filepath.Join(f.store, "forward.json") }

// relayDir is RSTORE/forward/TARGET/GROUP.
func (f *forwarder) relayDir(group, to string) string {
	safe := strings.NewReplacer(":", "_", "/", "_", "[", "", "]", "").Replace(to)
	return filepath.Join(f.store, "forward", safe, group)
}

func ownerCommitted(to string) string { return "forward:" + to }
func ownerStaged(to string) string    { return "forward-staged:" + to }

// startForwarder loads RSTORE/forward.json and starts every forward.
func startForwarder(ctx context.Context, rep *applier.Replica, srv *applier.Server, store string, log *slog.Logger) (*forwarder, error) {
	f := &forwarder{rep: rep, srv: srv, store: store, log: log, runs: map[string]*fwdRun{}, locks: map[string]*sync.Mutex{}}
	if err := fsutil.ReadJSON(f.path(), &f.cfg); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%s: %w", f.path(), err)
	}
	f.ctx, f.cancel = context.WithCancel(ctx)
	f.mu.Lock()
	for _, e := range f.cfg.Forwards {
		f.startLocked(e)
	}
	f.mu.Unlock()
	return f, nil
}

// stop ends every forward and waits for them.
func (f *forwarder) stop() {
	f.cancel()
	f.wg.Wait()
}

// find returns the index of the forward (f.mu held), -1 if none.
func (f *forwarder) find(group, to string) int {
	return slices.IndexFunc(f.cfg.Forwards, func(e Forward) bool { return e.Group == group && e.To == to })
}

func (f *forwarder) entry(key string) (Forward, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, e := range f.cfg.Forwards {
		if fwdKey(e.Group, e.To) == key {
			return e, true
		}
	}
	return Forward{}, false
}

// update applies fn to the forward's entry and persists the configuration.
func (f *forwarder) update(group, to string, fn func(*Forward)) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	i := f.find(group, to)
	if i < 0 {
		return fmt.Errorf("no forward of group %s to %s: %w", group, to, applier.ErrNoGroup)
	}
	cfg := forwardFile{Forwards: slices.Clone(f.cfg.Forwards)}
	fn(&cfg.Forwards[i])
	if err := fsutil.WriteJSON(f.path(), cfg); err != nil {
		return err
	}
	f.cfg = cfg
	return nil
}

func (f *forwarder) startLocked(e Forward) {
	key := fwdKey(e.Group, e.To)
	if old := f.runs[key]; old != nil {
		old.cancel()
	}
	ctx, cancel := context.WithCancel(f.ctx)
	fr := &fwdRun{key: key, cancel: cancel, done: make(chan struct{}), kick: make(chan chan fwdOutcome)}
	f.runs[key] = fr
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		defer close(fr.done)
		f.loop(ctx, fr)
	}()
}

func (f *forwarder) loop(ctx context.Context, fr *fwdRun) {
	backoff := time.Second
	next := time.NewTimer(0) // at once: ship what is staged, forward what is new
	defer next.Stop()
	for {
		var waiter chan fwdOutcome
		select {
		case <-ctx.Done():
			return
		case <-next.C:
		case waiter = <-fr.kick:
		}
		e, ok := f.entry(fr.key)
		if !ok {
			return
		}
		res, err := f.round(ctx, fr, e)
		if waiter != nil {
			waiter <- fwdOutcome{res, err}
		}
		if ctx.Err() != nil {
			return
		}
		if err != nil && !errors.Is(err, errForwardFailedOver) {
			f.log.Warn("forward round failed; retrying", "group", e.Group, "to", e.To, "in", backoff, "err", err)
			next.Reset(backoff)
			backoff = min(backoff*2, e.Interval)
			continue
		}
		backoff = time.Second
		next.Reset(e.Interval)
	}
}

// round forwards the group's latest point if it is new (see the file comment).
func (f *forwarder) round(ctx context.Context, fr *fwdRun, e Forward) (out ForwardNowResult, err error) {
	f.mu.Lock()
	lk := f.locks[fr.key]
	if lk == nil {
		lk = &sync.Mutex{}
		f.locks[fr.key] = lk
	}
	f.mu.Unlock()
	lk.Lock()
	defer lk.Unlock()
	if cur, ok := f.entry(fr.key); ok {
		e = cur // a round of the previous goroutine may have moved it
	}
	out = ForwardNowResult{Group: e.Group, To: e.To}
	defer func() {
		fr.mu.Lock()
		fr.failed = errors.Is(err, errForwardFailedOver)
		fr.lastEr = err
		fr.mu.Unlock()
		if err != nil {
			out.Error = err.Error()
		}
		msg := ""
		if err != nil && !errors.Is(err, errForwardFailedOver) {
			msg = err.Error()
		}
		sent := out.Bytes
		if uerr := f.update(e.Group, e.To, func(x *Forward) { x.LastError = msg; x.BytesSent += sent }); uerr != nil && err == nil {
			err = uerr
		}
	}()
	if _, promoted, ferr := f.rep.Failover(e.Group); ferr != nil {
		return out, ferr
	} else if promoted {
		return out, fmt.Errorf("group %s: %w", e.Group, errForwardFailedOver)
	}
	dir := f.relayDir(e.Group, e.To)
	cyc := filepath.Join(dir, "cycles")
	relay := shipper.NewRelay(dir, f.log)
	g := shipper.Group{Name: e.Group, Replica: e.To, Interval: e.Interval, Points: e.Points, PointEvery: e.PointEvery,
		AnyPointWindow: e.AnyPointWindow, Bandwidth: e.Bandwidth, Compress: "zstd"}

	// A cut staged by an earlier round: ship it, record it.
	staged, ok, err := applier.ReadForwardCut(cyc)
	if err != nil {
		return out, err
	}
	st, err := relay.Ship(ctx, g)
	out.Bytes += st.Bytes
	if err != nil {
		return out, fmt.Errorf("shipping to %s: %w", e.To, err)
	}
	recorded := false
	if ok && staged.Point != e.LastPoint {
		if err := f.commit(e, staged, st, cyc); err != nil {
			return out, err
		}
		e, _ = f.entry(fr.key)
		recorded = true
		out.Point, out.TargetPoint, out.Base = staged.Point, e.TargetPoint, staged.Base
		f.log.Info("forwarded a cut staged earlier", "group", e.Group, "to", e.To, "point", staged.Point, "target_point", e.TargetPoint)
	}
	// The latest point, if it is new.
	ps, err := f.rep.Points(e.Group)
	if err != nil {
		return out, err
	}
	if len(ps) == 0 {
		return out, fmt.Errorf("group %s has no recovery point yet", e.Group)
	}
	out.Point = ps[len(ps)-1].ID
	if out.Point == e.LastPoint {
		if !recorded {
			out.UpToDate, out.TargetPoint, out.Base = true, e.TargetPoint, false
		}
		return out, nil
	}
	res, err := f.rep.ForwardCut(ctx, e.Group, applier.ForwardFrom{Point: e.LastPoint, Gens: e.Gens, Owner: ownerStaged(e.To)}, cyc)
	if err != nil {
		return out, fmt.Errorf("staging point %s: %w", out.Point, err)
	}
	out.Point, out.Base = res.Point, res.Base
	st, err = relay.Ship(ctx, g)
	out.Bytes += st.Bytes
	if err != nil {
		return out, fmt.Errorf("shipping point %s to %s: %w", res.Point, e.To, err)
	}
	out.TargetPoint = st.Point
	if res.Point == e.LastPoint {
		return out, nil
	}
	st.Bytes = out.Bytes
	if err := f.commit(e, res, st, cyc); err != nil {
		return out, err
	}
	f.log.Info("forwarded", "group", e.Group, "to", e.To, "point", res.Point, "target_point", st.Point,
		"files", len(res.Files), "staged_bytes", res.Bytes, "sent_bytes", out.Bytes, "base", res.Base)
	return out, nil
}

// commit records that the target committed the staged cut res: the forward
// pin moves to its point (one durable write), the staged pin goes, the state
// is persisted, the cut's record is removed.
func (f *forwarder) commit(e Forward, res applier.ForwardResult, st shipper.ShipStats, cyc string) error {
	if err := f.rep.PinForward(e.Group, res.Point, ownerCommitted(e.To)); err != nil {
		// The point expired (its staged pin was lost): the next forward
		// sends bases, which the target takes.
		f.log.Warn("pinning the forwarded point failed; the next forward sends whole (thinned) images", "group", e.Group, "point", res.Point, "err", err)
		res.Point, res.Gens = "", nil
	}
	if err := f.rep.UnpinForward(e.Group, ownerStaged(e.To)); err != nil {
		return err
	}
	now := time.Now().UTC()
	t := res.Time
	err := f.update(e.Group, e.To, func(x *Forward) {
		x.LastPoint, x.Gens, x.LastPointTime, x.LastForwarded = res.Point, res.Gens, &t, &now
		x.LastBytes, x.LastBase, x.Forwards = st.Bytes, res.Base, x.Forwards+1
		if st.Point != "" {
			x.TargetPoint = st.Point
		}
	})
	if err != nil {
		return err
	}
	if err := os.Remove(filepath.Join(cyc, applier.ForwardCutFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// enable pairs with the target (unless paired already), persists the forward
// and starts it. Re-enabling keeps the state (what the target holds).
func (f *forwarder) enable(ctx context.Context, req ForwardRequest) (Forward, error) {
	if !shipper.ValidName(req.Group) {
		return Forward{}, fmt.Errorf("group name %q: %w", req.Group, errUsage)
	}
	if _, _, err := net.SplitHostPort(req.To); err != nil || req.To == "" {
		return Forward{}, fmt.Errorf("--to %q: want HOST:PORT: %w", req.To, errUsage)
	}
	if req.Interval < minForwardInterval {
		return Forward{}, fmt.Errorf("--interval %s: at least %s: %w", req.Interval, minForwardInterval, errUsage)
	}
	if req.Points < 0 || req.PointEvery < 0 || req.AnyPointWindow < 0 || req.Bandwidth < 0 {
		return Forward{}, fmt.Errorf("negative --points, --point-every, --any-point-window or --bandwidth: %w", errUsage)
	}
	// Like Hyper-V: the second hop is not more frequent than the first.
	if f.srv == nil {
		// no first hop to compare with
	} else if hs, err := f.srv.Health(); err == nil {
		for _, h := range hs {
			if h.Group != req.Group || h.Interval == "" {
				continue
			}
			if first, err := time.ParseDuration(h.Interval); err == nil && req.Interval < first {
				return Forward{}, fmt.Errorf("--interval %s is shorter than the interval %s at which the group arrives here; use at least %s: %w", req.Interval, first, first, errUsage)
			}
		}
	}
	dir := f.relayDir(req.Group, req.To)
	if !shipper.Paired(dir, req.To) {
		if req.Token == "" {
			return Forward{}, fmt.Errorf("not paired with %s yet: give --token (from 'standin pair token' on that host's replica store): %w", req.To, errUsage)
		}
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return Forward{}, err
		}
		host, _ := os.Hostname()
		if _, err := shipper.Join(ctx, dir, req.To, req.Token, "forward-"+host); err != nil {
			return Forward{}, fmt.Errorf("pairing with %s: %w", req.To, err)
		}
	}
	if req.Points <= 0 {
		req.Points = 24
	}
	if req.PointEvery <= 0 {
		req.PointEvery = time.Hour
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	cfg := forwardFile{Forwards: slices.Clone(f.cfg.Forwards)}
	e := Forward{Group: req.Group, To: req.To}
	i := f.find(req.Group, req.To)
	if i >= 0 {
		e = cfg.Forwards[i]
	}
	e.Interval, e.Bandwidth, e.Points, e.PointEvery, e.AnyPointWindow = req.Interval, req.Bandwidth, req.Points, req.PointEvery, req.AnyPointWindow
	if i >= 0 {
		cfg.Forwards[i] = e
	} else {
		cfg.Forwards = append(cfg.Forwards, e)
	}
	if err := fsutil.WriteJSON(f.path(), cfg); err != nil {
		return Forward{}, err
	}
	f.cfg = cfg
	f.startLocked(e)
	f.log.Info("forwarding enabled", "group", e.Group, "to", e.To, "interval", e.Interval)
	return e, nil
}

// disable stops the forward, releases its pins and removes its relay
// directory (credentials included: enabling again needs a new token).
func (f *forwarder) disable(req ForwardRequest) error {
	f.mu.Lock()
	i := f.find(req.Group, req.To)
	if i < 0 {
		f.mu.Unlock()
		return fmt.Errorf("no forward of group %s to %s: %w", req.Group, req.To, applier.ErrNoGroup)
	}
	key := fwdKey(req.Group, req.To)
	fr := f.runs[key]
	delete(f.runs, key)
	cfg := forwardFile{Forwards: slices.Delete(slices.Clone(f.cfg.Forwards), i, i+1)}
	if err := fsutil.WriteJSON(f.path(), cfg); err != nil {
		f.mu.Unlock()
		return err
	}
	f.cfg = cfg
	f.mu.Unlock()
	if fr != nil {
		fr.cancel()
		<-fr.done
	}
	for _, o := range []string{ownerCommitted(req.To), ownerStaged(req.To)} {
		if err := f.rep.UnpinForward(req.Group, o); err != nil && !errors.Is(err, applier.ErrNoGroup) {
			return err
		}
	}
	if err := os.RemoveAll(f.relayDir(req.Group, req.To)); err != nil {
		return err
	}
	f.log.Info("forwarding disabled", "group", req.Group, "to", req.To)
	return nil
}

// now runs a round of every matching forward at once; with wait it returns
// their outcomes.
func (f *forwarder) now(ctx context.Context, req ForwardRequest) ([]ForwardNowResult, error) {
	f.mu.Lock()
	var runs []*fwdRun
	var keys []Forward
	for _, e := range f.cfg.Forwards {
		if e.Group == req.Group && (req.To == "" || e.To == req.To) {
			if fr := f.runs[fwdKey(e.Group, e.To)]; fr != nil {
				runs = append(runs, fr)
				keys = append(keys, e)
			}
		}
	}
	f.mu.Unlock()
	if len(runs) == 0 {
		to := req.To
		if to == "" {
			to = "any host"
		}
		return nil, fmt.Errorf("no forward of group %s to %s: %w", req.Group, to, applier.ErrNoGroup)
	}
	chans := make([]chan fwdOutcome, len(runs))
	for i, fr := range runs {
		chans[i] = make(chan fwdOutcome, 1)
		select {
		case fr.kick <- chans[i]:
		case <-fr.done:
			return nil, fmt.Errorf("the forward of group %s to %s stopped", req.Group, keys[i].To)
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	var out []ForwardNowResult
	if !req.Wait {
		for _, e := range keys {
			out = append(out, ForwardNowResult{Group: e.Group, To: e.To})
		}
		return out, nil
	}
	for _, ch := range chans {
		select {
		case o := <-ch:
			out = append(out, o.res)
		case <-ctx.Done():
			return out, ctx.Err()
		}
	}
	return out, nil
}

// status lists every forward with its health.
func (f *forwarder) status() []ForwardStatus {
	f.mu.Lock()
	fs := slices.Clone(f.cfg.Forwards)
	runs := map[string]*fwdRun{}
	for k, v := range f.runs {
		runs[k] = v
	}
	f.mu.Unlock()
	now := time.Now()
	out := make([]ForwardStatus, 0, len(fs))
	for _, e := range fs {
		s := ForwardStatus{Forward: e, Interval: e.Interval.String(), Health: "Normal", Relay: f.relayDir(e.Group, e.To)}
		if ps, err := f.rep.Points(e.Group); err == nil && len(ps) > 0 {
			s.Latest = ps[len(ps)-1].ID
		}
		if st, ok, _ := applier.ReadForwardCut(filepath.Join(s.Relay, "cycles")); ok && st.Point != e.LastPoint {
			s.Staged = st.Point
		}
		if s.Latest != "" && s.Latest != e.LastPoint && e.LastPointTime != nil {
			lag := now.Sub(*e.LastPointTime)
			s.Lag, s.LagSeconds = lag.Round(time.Second).String(), lag.Seconds()
		}
		_, promoted, _ := f.rep.Failover(e.Group)
		s.FailedOver = promoted
		lag := time.Duration(s.LagSeconds * float64(time.Second))
		switch {
		case promoted:
			s.Health = "Warning"
			s.Reasons = append(s.Reasons, errForwardFailedOver.Error())
		case e.LastForwarded == nil && e.LastError != "":
			s.Health = "Critical"
			s.Reasons = append(s.Reasons, "never forwarded: "+e.LastError)
		case lag > 6*e.Interval && lag > time.Minute:
			s.Health = "Critical"
			s.Reasons = append(s.Reasons, fmt.Sprintf("lag %s is more than 6 intervals", s.Lag))
		case lag > 2*e.Interval+30*time.Second:
			s.Health = "Warning"
			s.Reasons = append(s.Reasons, fmt.Sprintf("lag %s is more than 2 intervals", s.Lag))
		case e.LastError != "":
			s.Health = "Warning"
			s.Reasons = append(s.Reasons, "last round failed: "+e.LastError)
		}
		if _, running := runs[fwdKey(e.Group, e.To)]; !running {
			s.Health = "Critical"
			s.Reasons = append(s.Reasons, "not running")
		}
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b ForwardStatus) int {
		if c := strings.Compare(a.Group, b.Group); c != 0 {
			return c
		}
		return strings.Compare(a.To, b.To)
	})
	return out
}

func (f *forwarder) control(mux *http.ServeMux) {
	decode := func(w http.ResponseWriter, r *http.Request, req *ForwardRequest) bool {
		if err := json.NewDecoder(r.Body).Decode(req); err != nil {
			reply(w, http.StatusBadRequest, apiError{Error: "bad request: " + err.Error(), Code: "usage"})
			return false
		}
		return true
	}
	mux.HandleFunc("POST /forward/enable", func(w http.ResponseWriter, r *http.Request) {
		var req ForwardRequest
		if !decode(w, r, &req) {
			return
		}
		e, err := f.enable(r.Context(), req)
		if err != nil {
			replyErr(w, err)
			return
		}
		reply(w, http.StatusOK, e)
	})
	mux.HandleFunc("POST /forward/disable", func(w http.ResponseWriter, r *http.Request) {
		var req ForwardRequest
		if !decode(w, r, &req) {
			return
		}
		if err := f.disable(req); err != nil {
			replyErr(w, err)
			return
		}
		reply(w, http.StatusOK, map[string]string{"group": req.Group, "to": req.To})
	})
	mux.HandleFunc("POST /forward/now", func(w http.ResponseWriter, r *http.Request) {
		var req ForwardRequest
		if !decode(w, r, &req) {
			return
		}
		out, err := f.now(r.Context(), req)
		if err != nil {
			replyErr(w, err)
			return
		}
		reply(w, http.StatusOK, out)
	})
	mux.HandleFunc("GET /forward", func(w http.ResponseWriter, r *http.Request) {
		reply(w, http.StatusOK, f.status())
	})
}
