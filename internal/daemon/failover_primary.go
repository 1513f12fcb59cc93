package daemon

// Planned failover and failback, primary side (the mount daemon). The host
// that gives up a group fences its images, (planned) ships a final cycle and
// proves equality by BLAKE3 roots, asks the replica to take over, and then
// adopts its own images into this host's replica store, so the reverse
// direction starts without copying the disks. See docs/design.md, Failover.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/RoaringBitmap/roaring/v2"
	"github.com/google/uuid"

	"github.com/standin/standin/applier"
	"github.com/standin/standin/internal/format"
	"github.com/standin/standin/internal/fsutil"
	"github.com/standin/standin/internal/wire"
	"github.com/standin/standin/shipper"
	"github.com/standin/standin/tracker"
)

// FailoverRequest is the body of POST /failover/planned and /failover/reverse
// on the mount daemon.
type FailoverRequest struct {
	Groups []string `json:"groups"`
	All    bool     `json:"all"`
	Force  bool     `json:"force"` // fence images that are open for writing
	DryRun bool     `json:"dry_run"`
	// ReplicaStore is this host's replica store (its daemon receives the
	// reverse direction); ReplicaAddr is its HOST:PORT as the peer reaches
	// it ("" = its listen address).
	ReplicaStore string `json:"replica_store"`
	ReplicaAddr  string `json:"replica_addr,omitempty"`
}

// FailoverResult reports one group of a failover command.
type FailoverResult struct {
	Group   string               `json:"group"`
	Kind    string               `json:"kind"`
	DryRun  bool                 `json:"dry_run,omitempty"`
	Plan    []string             `json:"plan,omitempty"`
	Steps   []FailoverStep       `json:"steps,omitempty"`
	Point   string               `json:"point,omitempty"` // the point promoted on the new primary
	Images  []wire.FailoverImage `json:"images,omitempty"`
	Error   string               `json:"error,omitempty"`
	Message string               `json:"message,omitempty"`
}

// FailoverStep is one timed step.
type FailoverStep struct {
	Step    string  `json:"step"`
	Seconds float64 `json:"seconds"`
	Bytes   int64   `json:"bytes,omitempty"`
	Detail  string  `json:"detail,omitempty"`
}

// AdoptRequest is the body of POST /failover/adopt on the mount daemon, sent
// by this host's replica daemon after it promoted a group's images: track
// them, and optionally pair with the old primary's replica store and
// replicate back.
type AdoptRequest struct {
	Images []AdoptImage   `json:"images"`
	Join   *JoinSpec      `json:"join,omitempty"`
	Group  *shipper.Group `json:"group,omitempty"`
}

// AdoptImage is one promoted image file to track.
type AdoptImage struct {
	Name       string `json:"name"`
	Path       string `json:"path"`
	ID         string `json:"id"`
	Generation uint64 `json:"generation"`
	NextSeq    uint64 `json:"next_seq"`
}

// JoinSpec pairs this primary store with a replica.
type JoinSpec struct {
	Replica string `json:"replica"`
	Token   string `json:"token"`
	Name    string `json:"name"`
}

func failoverControl(mux *http.ServeMux, st *tracker.Store, sh *shipper.Shipper, log *slog.Logger) {
	pf := &primaryFailover{st: st, sh: sh, log: log}
	mux.HandleFunc("POST /failover/planned", func(w http.ResponseWriter, r *http.Request) { pf.serve(w, r, "planned") })
	mux.HandleFunc("POST /failover/reverse", func(w http.ResponseWriter, r *http.Request) { pf.serve(w, r, "reverse") })
	mux.HandleFunc("POST /failover/adopt", func(w http.ResponseWriter, r *http.Request) {
		var req AdoptRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			reply(w, http.StatusBadRequest, apiError{Error: "bad request: " + err.Error(), Code: "usage"})
			return
		}
		if err := pf.adopt(r.Context(), req); err != nil {
			reply(w, http.StatusInternalServerError, apiError{Error: err.Error(), Code: "failure"})
			return
		}
		reply(w, http.StatusOK, map[string]bool{"ok": true})
	})
}

type primaryFailover struct {
	st  *tracker.Store
	sh  *shipper.Shipper
	log *slog.Logger
}

func (pf *primaryFailover) serve(w http.ResponseWriter, r *http.Request, kind string) {
	var req FailoverRequest
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		reply(w, http.StatusBadRequest, apiError{Error: "bad request: " + err.Error(), Code: "usage"})
		return
	}
	names := req.Groups
	if req.All {
		names = nil
		for _, g := range pf.sh.Groups() {
			names = append(names, g.Name)
		}
	}
	if len(names) == 0 {
		reply(w, http.StatusBadRequest, apiError{Error: "no group named (--group NAMES or --all)", Code: "usage"})
		return
	}
	if req.ReplicaStore == "" && !req.DryRun {
		reply(w, http.StatusBadRequest, apiError{Error: "--replica-store is required: this host's replica store, which receives the reverse direction (its daemon 'standin serve --store DIR' must run)", Code: "usage"})
		return
	}
	var out []FailoverResult
	for _, name := range names {
		res := FailoverResult{Group: name, Kind: kind, DryRun: req.DryRun}
		var err error
		if kind == "planned" {
			err = pf.planned(r.Context(), name, req, &res)
		} else {
			err = pf.reverse(r.Context(), name, req, &res)
		}
		if err != nil {
			res.Error = err.Error() // the CLI exits non-zero
			pf.log.Error("failover failed", "group", name, "kind", kind, "err", err)
		}
		out = append(out, res)
	}
	reply(w, http.StatusOK, out)
}

// step runs f and records its duration.
func step(res *FailoverResult, name string, f func(*FailoverStep) error) error {
	t := time.Now()
	s := FailoverStep{Step: name}
	err := f(&s)
	s.Seconds = time.Since(t).Seconds()
	res.Steps = append(res.Steps, s)
	return err
}

func (pf *primaryFailover) group(name string) (shipper.Group, []*tracker.Image, error) {
	g, ok := pf.sh.Group(name)
	if !ok {
		return g, nil, fmt.Errorf("no replication group %q on this primary (standin replicate list): %w", name, shipper.ErrNoGroup)
	}
	var ims []*tracker.Image
	for _, n := range g.Images {
		im, err := pf.st.Image(n)
		if err != nil {
			return g, nil, err
		}
		ims = append(ims, im)
	}
	return g, ims, nil
}

// hashImages computes each image's root and writes its block hashes to
// DIR/ID.hashes (the replica store adopts them as hashes.bin).
func (pf *primaryFailover) hashImages(ctx context.Context, dir string, ims []*tracker.Image) ([]wire.FailoverImage, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	var out []wire.FailoverImage
	for _, im := range ims {
		name := im.Name()
		f, err := os.Open(filepath.Join(pf.st.ImagesDir(), name))
		if err != nil {
			return nil, err
		}
		fi, err := f.Stat()
		if err != nil {
			f.Close()
			return nil, err
		}
		hf, err := os.Create(filepath.Join(dir, im.ID().String()+".hashes"))
		if err != nil {
			f.Close()
			return nil, err
		}
		bw := bufio.NewWriterSize(hf, 1<<20)
		root, err := wire.HashImage(ctx, f, fi.Size(), bw)
		f.Close()
		if err == nil {
			err = bw.Flush()
		}
		if err == nil {
			err = hf.Sync()
		}
		hf.Close()
		if err != nil {
			return nil, fmt.Errorf("hashing image %s: %w", name, err)
		}
		out = append(out, wire.FailoverImage{ID: im.ID().String(), Name: name, Generation: im.Generation(),
			Seq: im.NextSeq() - 1, Size: fi.Size(), Root: wire.RootHex(root)})
	}
	return out, nil
}

func (pf *primaryFailover) request(g shipper.Group, kind string, imgs []wire.FailoverImage) wire.FailoverRequest {
	host, _ := os.Hostname()
	return wire.FailoverRequest{Kind: kind, Images: imgs, Peer: host, Interval: g.Interval, Points: g.Points,
		PointEvery: g.PointEvery, AnyPointWindow: g.AnyPointWindow, Bandwidth: g.Bandwidth, Compress: g.Compress}
}

// token asks this host's replica daemon for a pairing token the new primary
// uses to replicate back. The new primary keeps one certificate per replica,
// so the token allows every group that may come back from that host: the
// group failing over, the groups this primary replicates to it, and those
// that failed over to it earlier (failover/reverse.json). peer is the name
// the new primary pairs under (its host name, wire.FailoverReply.Host): the
// pairing replaces this store's earlier primary of that name, and the token
// pairs under that name only. Without it (an older peer) the token is an
// ordinary one, which replaces nobody.
func (pf *primaryFailover) token(ctx context.Context, replicaStore, addr string, g shipper.Group, peer string) (string, error) {
	groups := map[string]bool{g.Name: true}
	for _, x := range pf.sh.Groups() {
		if x.Replica == g.Replica {
			groups[x.Name] = true
		}
	}
	back, err := readReverse(pf.reversePath())
	if err != nil {
		return "", err
	}
	for grp, peer := range back {
		if peer == g.Replica {
			groups[grp] = true
		}
	}
	var pats []string
	for _, grp := range slices.Sorted(maps.Keys(groups)) {
		pats = append(pats, grp+"/*")
	}
	var tok map[string]string
	err = NewClient(replicaStore).Call(ctx, "/pair/token", TokenRequest{Pattern: strings.Join(pats, ","), TTL: time.Hour, Addr: addr, Replaces: peer}, &tok)
	if err != nil {
		return "", fmt.Errorf("this host's replica store %s (the reverse direction's target): %w", replicaStore, err)
	}
	return tok["token"], nil
}

// rememberReverse records that group now comes back from peer (for the
// patterns of later tokens).
func (pf *primaryFailover) rememberReverse(group, peer string) error {
	return rememberReverseAt(pf.reversePath(), group, peer)
}

func (pf *primaryFailover) reversePath() string {
	return filepath.Join(pf.st.Dir(), "failover", "reverse.json")
}

// readReverse reads the record of groups that failed over to other hosts
// (group → host). A missing file is an empty record; an unreadable or
// damaged one is an error, never an empty record: rewriting it would drop
// the other groups' entries, and the next failover token would no longer
// allow them to come back.
func readReverse(path string) (map[string]string, error) {
	back := map[string]string{}
	err := fsutil.ReadJSON(path, &back)
	if errors.Is(err, os.ErrNotExist) {
		return map[string]string{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("record of groups that failed over to other hosts: %w (repair the JSON object of group → host in it, or remove it if no group of this host runs elsewhere)", err)
	}
	return back, nil
}

// rememberReverseAt adds group → peer to the record at path; a damaged
// record is left as it is and reported.
func rememberReverseAt(path, group, peer string) error {
	back, err := readReverse(path)
	if err != nil {
		return err
	}
	back[group] = peer
	return fsutil.WriteJSON(path, back)
}

func (pf *primaryFailover) planned(ctx context.Context, name string, req FailoverRequest, res *FailoverResult) error {
	g, ims, err := pf.group(name)
	if err != nil {
		return err
	}
	names := slices.Clone(g.Images)
	if req.DryRun {
		for _, im := range ims {
			s := im.Status(false)
			res.Plan = append(res.Plan, fmt.Sprintf("fence %s (open for writing: %d, dirty %d blocks = %d MiB%s)", s.Name, im.WriteOpens(), s.DirtyBlocks, s.DirtyBlocks*4096>>20, map[bool]string{true: "; refused unless --force", false: ""}[im.WriteOpens() > 0 && !req.Force]))
		}
		res.Plan = append(res.Plan,
			fmt.Sprintf("ship a final cycle to %s and verify the BLAKE3 roots of every image", g.Replica),
			fmt.Sprintf("promote the replica's copy to a tracked primary on %s (generation +1)", g.Replica),
			fmt.Sprintf("move the images into this host's replica store %s and replicate back from %s (no full copy)", req.ReplicaStore, g.Replica))
		return nil
	}
	// While the VM still runs: the replica copies its latest point, so the
	// promotion after the final cycle only brings that copy forward.
	var peer string // the replica's host name, for the token
	step(res, "prepare on replica (VM still running)", func(s *FailoverStep) error {
		fr := pf.request(g, "prepare", nil)
		for _, im := range ims {
			fr.Images = append(fr.Images, wire.FailoverImage{ID: im.ID().String(), Name: im.Name()})
		}
		rep, err := shipper.RequestFailover(ctx, pf.st.Dir(), g.Replica, name, fr)
		peer = rep.Host
		if err != nil {
			// Not needed for correctness: the promotion then copies in full.
			s.Detail = "not prepared (" + err.Error() + "); the promotion copies the whole image"
			pf.log.Warn("replica could not prepare the promotion", "group", name, "err", err)
			return nil
		}
		s.Detail = rep.Message
		return nil
	})
	cancel := func() {
		fr := pf.request(g, "cancel", []wire.FailoverImage{{ID: ims[0].ID().String(), Name: ims[0].Name()}})
		if _, err := shipper.RequestFailover(ctx, pf.st.Dir(), g.Replica, name, fr); err != nil {
			pf.log.Warn("dropping the replica's prepared copy", "group", name, "err", err)
		}
	}
	if err := step(res, "fence", func(*FailoverStep) error {
		return pf.st.Fence(names, "planned failover of group "+name+" to "+g.Replica, req.Force)
	}); err != nil {
		cancel()
		if errors.Is(err, tracker.ErrOpenForWrite) {
			return fmt.Errorf("%w: stop the VM first, or pass --force (writes then fail with EROFS)", err)
		}
		return err
	}
	unfence := func(why error) error {
		cancel()
		if uerr := pf.st.Unfence(names); uerr != nil {
			return errors.Join(why, fmt.Errorf("and unfencing failed (images stay read-only): %w", uerr))
		}
		if !g.Paused { // FinalCut paused the schedule
			if uerr := pf.sh.Update(name, func(x *shipper.Group) { x.Paused = false }); uerr != nil {
				return errors.Join(why, fmt.Errorf("the images are writable again, but resuming replication failed ('standin replicate resume --group %s'): %w", name, uerr))
			}
		}
		return fmt.Errorf("%w (nothing failed over: the images are writable again and replication goes on)", why)
	}
	// The images are fenced, so their content is final: hash them while the
	// final cycle is staged and shipped.
	dir := filepath.Join(pf.st.Dir(), "failover", name)
	type hashed struct {
		imgs []wire.FailoverImage
		step FailoverStep
		err  error
	}
	hc := make(chan hashed, 1)
	go func() {
		t := time.Now()
		imgs, err := pf.hashImages(ctx, dir, ims)
		h := hashed{imgs: imgs, err: err, step: FailoverStep{Step: "hash primary (during the final cycle)"}}
		for _, im := range imgs {
			h.step.Bytes += im.Size
		}
		h.step.Seconds = time.Since(t).Seconds()
		hc <- h
	}()
	ferr := step(res, "final cycle", func(s *FailoverStep) error {
		var err error
		s.Bytes, err = pf.sh.FinalCut(ctx, name)
		if errors.Is(err, shipper.ErrFailedOver) {
			// An earlier attempt got as far as the promotion (then this
			// daemon was interrupted): the roots decide whether it may
			// finish.
			s.Detail = "the replica took over already (a repeated failover)"
			return nil
		}
		return err
	})
	h := <-hc
	res.Steps = append(res.Steps, h.step)
	if ferr != nil {
		return unfence(fmt.Errorf("final cycle: %w", ferr))
	}
	if h.err != nil {
		return unfence(h.err)
	}
	imgs := h.imgs
	for i, im := range ims {
		imgs[i].Seq = im.NextSeq() - 1 // the final cut
	}
	tok, err := pf.token(ctx, req.ReplicaStore, req.ReplicaAddr, g, peer)
	if err != nil {
		return unfence(err)
	}
	fr := pf.request(g, "planned", imgs)
	fr.Token = tok
	var rep wire.FailoverReply
	if err := step(res, "promote on replica (verify roots)", func(s *FailoverStep) error {
		rep, err = shipper.RequestFailover(ctx, pf.st.Dir(), g.Replica, name, fr)
		s.Detail = rep.Message
		return err
	}); err != nil {
		var re *shipper.RemoteError
		if errors.As(err, &re) && re.Status/100 == 4 && !errors.Is(err, shipper.ErrFailedOver) {
			return unfence(err) // refused: the replica promoted nothing
		}
		if errors.Is(err, shipper.ErrFailedOver) {
			return fmt.Errorf("%w — the replica is the primary now and this host's images differ from it: they stay fenced; make this host its replica with 'standin failover reverse --group %s'", err, name)
		}
		return fmt.Errorf("%w — the replica may or may not have taken over; the images stay fenced: run the same 'standin failover planned' again (it is idempotent)", err)
	}
	res.Point, res.Images = rep.Point, rep.Images
	if crashHook("after-promote") {
		return nil
	}
	return pf.demote(ctx, g, ims, rep, dir, req, res)
}

// crashHook kills the daemon at a named step of a failover when
// STANDIN_TEST_FAILOVER_CRASH names it (tests of kill -9 mid-failover).
func crashHook(at string) bool {
	if os.Getenv("STANDIN_TEST_FAILOVER_CRASH") == at {
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {}
	}
	return false
}

// demote moves the group's images out of this primary store into this host's
// replica store, as the copy the new primary replicates to.
func (pf *primaryFailover) demote(ctx context.Context, g shipper.Group, ims []*tracker.Image, rep wire.FailoverReply, dir string, req FailoverRequest, res *FailoverResult) error {
	newGen := map[string]wire.FailoverImage{}
	for _, im := range rep.Images {
		newGen[im.ID] = im
	}
	var adopt []applier.AdoptImage
	err := step(res, "adopt into replica store", func(s *FailoverStep) error {
		for _, im := range ims {
			name := im.Name()
			dst := filepath.Join(dir, im.ID().String()+".img")
			id, gen, next, err := pf.st.Release(name, dst)
			if err != nil {
				return fmt.Errorf("releasing image %s: %w", name, err)
			}
			fi, err := os.Stat(dst)
			if err != nil {
				return err
			}
			ai := applier.AdoptImage{ID: id.String(), Name: name, Generation: gen, Seq: next - 1, Size: fi.Size(),
				Path: dst, Hashes: filepath.Join(dir, id.String()+".hashes"), CutTime: rep.Time}
			if n, ok := newGen[ai.ID]; ok && n.Generation > 0 {
				// Planned: equal to the new primary's image at its promoted
				// cut. Reverse: equal to it except in the candidate blocks,
				// which the new primary hash-checks and sends first. Either
				// way the reverse direction continues with deltas.
				ai.Generation, ai.Seq = n.Generation, n.Seq
			}
			if ai.CutTime.IsZero() {
				ai.CutTime = time.Now()
			}
			adopt = append(adopt, ai)
		}
		var ar applier.ApplyResult
		err := NewClient(req.ReplicaStore).Call(ctx, "/failover/adopt", ReplicaAdoptRequest{Group: g.Name, Images: adopt,
			Retention: applier.Retention{Points: g.Points, Every: g.PointEvery, AnyPointWindow: g.AnyPointWindow}}, &ar)
		s.Detail = "point " + ar.Point
		return err
	})
	if err != nil {
		return fmt.Errorf("%w — the new primary runs; finish with the same command (idempotent) once the cause is fixed", err)
	}
	if err := pf.rememberReverse(g.Name, g.Replica); err != nil {
		return err
	}
	if err := pf.sh.Disable(g.Name); err != nil && !errors.Is(err, shipper.ErrNoGroup) {
		return err
	}
	res.Message = fmt.Sprintf("group %s now runs on %s; this host's replica store %s receives it", g.Name, g.Replica, req.ReplicaStore)
	pf.log.Info("failover done: this host is now the replica", "group", g.Name, "kind", res.Kind, "new_primary", g.Replica)
	return nil
}

// reverse: after an unplanned failover, this (old, stale) primary becomes the
// replica of the new primary. Its images are fenced and adopted into this
// host's replica store as they are — a recovery point there keeps what only
// this host had — and the new primary ships a hash-compare base, so only the
// blocks that differ travel.
func (pf *primaryFailover) reverse(ctx context.Context, name string, req FailoverRequest, res *FailoverResult) error {
	g, ims, err := pf.group(name)
	if err != nil {
		return err
	}
	names := slices.Clone(g.Images)
	// Ask first (a dry run on the other side): nothing is fenced unless the
	// other host did take the group over.
	fr := pf.request(g, "reverse", nil)
	fr.DryRun = true
	for _, im := range ims {
		fr.Images = append(fr.Images, wire.FailoverImage{ID: im.ID().String(), Name: im.Name(), Generation: im.Generation(), Seq: im.NextSeq() - 1})
	}
	plan, err := shipper.RequestFailover(ctx, pf.st.Dir(), g.Replica, name, fr)
	if err != nil {
		return fmt.Errorf("%w (nothing changed here)", err)
	}
	if req.DryRun {
		for _, im := range ims {
			s := im.Status(false)
			res.Plan = append(res.Plan, fmt.Sprintf("fence %s (open for writing: %d; its %d changed blocks not replicated stay recoverable as a point in %s)", s.Name, im.WriteOpens(), s.DirtyBlocks, req.ReplicaStore))
		}
		res.Plan = append(res.Plan, plan.Plan...)
		return nil
	}
	if err := step(res, "fence", func(*FailoverStep) error {
		return pf.st.Fence(names, "failback of group "+name+" from "+g.Replica, req.Force)
	}); err != nil {
		if errors.Is(err, tracker.ErrOpenForWrite) {
			return fmt.Errorf("%w: stop the VM first, or pass --force", err)
		}
		return err
	}
	if err := pf.sh.Update(name, func(g *shipper.Group) { g.Paused = true }); err != nil {
		return err
	}
	dir := filepath.Join(pf.st.Dir(), "failover", name)
	var imgs []wire.FailoverImage
	if err := step(res, "hash old primary", func(s *FailoverStep) error {
		imgs, err = pf.hashImages(ctx, dir, ims)
		for _, im := range imgs {
			s.Bytes += im.Size
		}
		return err
	}); err != nil {
		return err
	}
	tok, err := pf.token(ctx, req.ReplicaStore, req.ReplicaAddr, g, plan.Host)
	if err != nil {
		return err
	}
	for i, im := range ims {
		c, err := pf.candidates(im)
		if err != nil {
			return err
		}
		if imgs[i].Candidates, err = c.ToBytes(); err != nil {
			return err
		}
	}
	fr = pf.request(g, "reverse", imgs)
	fr.Token = tok
	var rep wire.FailoverReply
	if err := step(res, "new primary pairs back", func(s *FailoverStep) error {
		rep, err = shipper.RequestFailover(ctx, pf.st.Dir(), g.Replica, name, fr)
		s.Detail = rep.Message
		return err
	}); err != nil {
		return fmt.Errorf("%w — the images stay fenced (this host is stale); run the same command again", err)
	}
	res.Point, res.Images = rep.Point, rep.Images
	return pf.demote(ctx, g, ims, rep, dir, req, res)
}

// candidates returns the blocks of im that the replica may lack: its dirty
// map (also blocks of cuts in progress) and every block of its staged cycle
// files (cut, but never confirmed applied).
func (pf *primaryFailover) candidates(im *tracker.Image) (*roaring.Bitmap, error) {
	b := im.Changed()
	cycles, err := tracker.Cycles(pf.st.Dir(), im.Name())
	if err != nil {
		return nil, err
	}
	for _, ci := range cycles {
		if err := cycleBlocks(ci.Path, b); err != nil {
			return nil, err
		}
	}
	return b, nil
}

// cycleBlocks adds every block a cycle file changes to b.
func cycleBlocks(path string, b *roaring.Bitmap) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	cr, err := format.Open(f, fi.Size())
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if cr.Header().Base() {
		b.AddRange(0, cr.Header().Blocks())
		return nil
	}
	for _, e := range cr.Extents() {
		b.AddRange(e.Start, e.Start+uint64(e.Count))
	}
	return nil
}

// adopt tracks images promoted by this host's replica daemon and, when asked,
// replicates them back to the old primary's replica store. Idempotent: an
// image already tracked with the same identity and generation is kept.
func (pf *primaryFailover) adopt(ctx context.Context, req AdoptRequest) error {
	for _, ai := range req.Images {
		id, err := uuid.Parse(ai.ID)
		if err != nil {
			return fmt.Errorf("image id %q: %w", ai.ID, err)
		}
		if _, err := os.Stat(filepath.Join(pf.st.ImagesDir(), ai.Name)); err == nil {
			if im, err := pf.st.Image(ai.Name); err == nil && im.ID() == id && im.Generation() == ai.Generation {
				os.Remove(ai.Path) // a repeated promotion: already tracked
				continue
			}
		}
		if _, err := pf.st.Adopt(ai.Name, ai.Path, id, ai.Generation, ai.NextSeq, false); err != nil {
			return fmt.Errorf("tracking promoted image %s: %w", ai.Name, err)
		}
		pf.log.Info("promoted image is now a tracked primary", "image", ai.Name, "id", id, "generation", ai.Generation, "next_seq", ai.NextSeq)
	}
	// Always join with a token given: it allows every group that may come
	// back, and replaces the certificate of an earlier failover.
	if req.Join != nil {
		if _, err := shipper.Join(ctx, pf.st.Dir(), req.Join.Replica, req.Join.Token, req.Join.Name); err != nil {
			return fmt.Errorf("pairing with the old primary's replica store: %w", err)
		}
	}
	if req.Group != nil {
		if old, ok := pf.sh.Group(req.Group.Name); ok && old.Replica == req.Group.Replica && !old.Paused {
			return nil // already replicating back
		}
		if err := pf.sh.Enable(*req.Group); err != nil {
			return fmt.Errorf("replicating group %s back: %w", req.Group.Name, err)
		}
	}
	return nil
}
