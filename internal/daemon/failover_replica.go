package daemon

// Failover, replica side (the replica daemon): promotion of a group's point
// to a tracked primary in this host's primary store (planned: requested by
// the old primary and verified by BLAKE3 roots; unplanned: from the CLI),
// setting up replication back, and adopting demoted images as this store's
// copy. See docs/design.md, Failover.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/RoaringBitmap/roaring/v2"

	"github.com/standin/standin/applier"
	"github.com/standin/standin/internal/pki"
	"github.com/standin/standin/internal/wire"
	"github.com/standin/standin/shipper"
)

// UnplannedRequest is the body of POST /failover/unplanned on the replica
// daemon.
type UnplannedRequest struct {
	Groups       []string `json:"groups"`
	All          bool     `json:"all"`
	Point        string   `json:"point"`         // "" or latest, a point ID or a time
	PrimaryStore string   `json:"primary_store"` // "" = the daemon's --primary-store
	DryRun       bool     `json:"dry_run"`
}

// ReplicaAdoptRequest is the body of POST /failover/adopt on the replica
// daemon: a demoted primary's images become the group's newest point.
type ReplicaAdoptRequest struct {
	Group     string               `json:"group"`
	Images    []applier.AdoptImage `json:"images"`
	Retention applier.Retention    `json:"retention"`
}

type replicaFailover struct {
	rep          *applier.Replica
	primaryStore string
	log          *slog.Logger

	// Warm standby (serve --warm-standby): after every apply the prepared
	// promotion copy is brought forward, so a failover copies nothing.
	warmStandby bool
	warmCtx     context.Context
	warmStop    context.CancelFunc
	warmMu      sync.Mutex
	warmBusy    map[string]bool // a refresh runs
	warmAgain   map[string]bool // another apply came meanwhile
	warmWG      sync.WaitGroup
}

func newReplicaFailover(rep *applier.Replica, primaryStore string, warm bool, log *slog.Logger) *replicaFailover {
	rf := &replicaFailover{rep: rep, primaryStore: primaryStore, log: log, warmStandby: warm && primaryStore != "",
		warmBusy: map[string]bool{}, warmAgain: map[string]bool{}}
	rf.warmCtx, rf.warmStop = context.WithCancel(context.Background())
	return rf
}

// applied is called after every successful apply: with a warm standby, the
// group's prepared copy is brought forward (in the background, coalesced).
func (rf *replicaFailover) applied(group string) {
	if !rf.warmStandby {
		return
	}
	rf.warmMu.Lock()
	defer rf.warmMu.Unlock()
	if rf.warmBusy[group] {
		rf.warmAgain[group] = true
		return
	}
	rf.warmBusy[group] = true
	rf.warmWG.Add(1)
	go func() {
		defer rf.warmWG.Done()
		dir := filepath.Join(rf.primaryStore, "failover", group)
		for {
			t := time.Now()
			pt, refreshed, err := rf.rep.PreparePromote(rf.warmCtx, group, dir)
			switch {
			case errors.Is(err, applier.ErrFailedOver) || rf.warmCtx.Err() != nil:
			case err != nil:
				rf.log.Warn("warm standby: preparing the promotion copy failed; a failover copies in full", "group", group, "err", err)
			default:
				rf.log.Debug("warm standby: promotion copy at the latest point", "group", group, "point", pt, "incremental", refreshed, "took", time.Since(t))
			}
			rf.warmMu.Lock()
			if !rf.warmAgain[group] || rf.warmCtx.Err() != nil {
				delete(rf.warmBusy, group)
				delete(rf.warmAgain, group)
				rf.warmMu.Unlock()
				return
			}
			rf.warmAgain[group] = false
			rf.warmMu.Unlock()
		}
	}()
}

// stop ends warm standby refreshes (before the store closes).
func (rf *replicaFailover) stop() {
	rf.warmStop()
	rf.warmWG.Wait()
}

func (rf *replicaFailover) control(mux *http.ServeMux) {
	mux.HandleFunc("POST /failover/unplanned", func(w http.ResponseWriter, r *http.Request) {
		var req UnplannedRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			reply(w, http.StatusBadRequest, apiError{Error: "bad request: " + err.Error(), Code: "usage"})
			return
		}
		out, status := rf.unplanned(r.Context(), req)
		reply(w, status, out)
	})
	mux.HandleFunc("POST /failover/adopt", func(w http.ResponseWriter, r *http.Request) {
		var req ReplicaAdoptRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			reply(w, http.StatusBadRequest, apiError{Error: "bad request: " + err.Error(), Code: "usage"})
			return
		}
		res, err := rf.rep.Adopt(req.Group, req.Images, req.Retention)
		if err != nil {
			reply(w, http.StatusInternalServerError, apiError{Error: err.Error(), Code: "failure"})
			return
		}
		rf.log.Info("adopted the old primary's images: this store is now the group's replica", "group", req.Group, "point", res.Point)
		reply(w, http.StatusOK, res)
	})
}

// primary returns this host's primary store, after checking that its mount
// daemon runs (it tracks what a promotion materialises): nothing is promoted
// when it cannot be.
func (rf *replicaFailover) primary(ctx context.Context, override string) (string, error) {
	p := override
	if p == "" {
		p = rf.primaryStore
	}
	if p == "" {
		return "", errors.New("no primary store on this host to promote into: start the replica daemon with --primary-store DIR (or pass --primary-store), and run 'standin mount --store DIR MOUNTPOINT' for it")
	}
	if _, err := NewClient(p).Status(ctx, false); err != nil {
		return "", fmt.Errorf("this host's primary store %s cannot take the group: %w", p, err)
	}
	return p, nil
}

// promote materialises a point of group into the primary store and has the
// mount daemon track it. It returns the promoted images.
func (rf *replicaFailover) promote(ctx context.Context, pstore, group, point, kind, peer string) ([]applier.PromotedImage, error) {
	dir := filepath.Join(pstore, "failover", group)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	return rf.rep.Promote(ctx, group, point, kind, peer, dir)
}

func adoptPrimary(ctx context.Context, pstore string, req AdoptRequest) error {
	if err := NewClient(pstore).Call(ctx, "/failover/adopt", req, nil); err != nil {
		return fmt.Errorf("the primary store %s of this host: %w", pstore, err)
	}
	return nil
}

func promotedAdopt(pimgs []applier.PromotedImage) []AdoptImage {
	var out []AdoptImage
	for _, p := range pimgs {
		out = append(out, AdoptImage{Name: p.Name, Path: p.Path, ID: p.ID, Generation: p.Generation, NextSeq: p.Seq + 1})
	}
	return out
}

func (rf *replicaFailover) pointTime(group, point string) time.Time {
	ps, _ := rf.rep.Points(group)
	for _, p := range ps {
		if p.ID == point {
			return p.Time
		}
	}
	return time.Time{}
}

func (rf *replicaFailover) unplanned(ctx context.Context, req UnplannedRequest) ([]FailoverResult, int) {
	names := req.Groups
	if req.All {
		names = nil
		for _, g := range rf.rep.Groups() {
			if _, promoted, _ := rf.rep.Failover(g); !promoted {
				names = append(names, g)
			}
		}
	}
	status := http.StatusOK
	var out []FailoverResult
	for _, g := range names {
		res := FailoverResult{Group: g, Kind: "unplanned", DryRun: req.DryRun}
		if err := rf.unplannedGroup(ctx, g, req, &res); err != nil {
			res.Error = err.Error() // the CLI exits non-zero
		}
		out = append(out, res)
	}
	if len(names) == 0 {
		status = http.StatusBadRequest
	}
	return out, status
}

func (rf *replicaFailover) unplannedGroup(ctx context.Context, group string, req UnplannedRequest, res *FailoverResult) error {
	pstore, err := rf.primary(ctx, req.PrimaryStore)
	if err != nil {
		return err
	}
	point := req.Point
	if point == "" {
		point = "latest"
	}
	if fs, promoted, err := rf.rep.Failover(group); err != nil {
		return err
	} else if promoted && !req.DryRun && fs.Kind != "unplanned" {
		return fmt.Errorf("group %s was already failed over to this host (%s, point %s, %s)", group, fs.Kind, fs.Point, fs.Time.Format(time.RFC3339))
	}
	if req.DryRun {
		ps, err := rf.rep.Points(group)
		if err != nil {
			return err
		}
		if len(ps) == 0 {
			return fmt.Errorf("group %s has no recovery point", group)
		}
		res.Plan = append(res.Plan,
			fmt.Sprintf("mark group %s failed over: from now on its old primary is refused (split brain protection)", group),
			fmt.Sprintf("materialise point %s of its %d images into %s and track them as primary images (generation +1)", point, len(ps[len(ps)-1].Seqs), pstore),
			"later, when the old primary is back: 'standin failover reverse --group "+group+"' on it ships back only the blocks that differ")
		return nil
	}
	var pimgs []applier.PromotedImage
	if err := step(res, "promote point", func(s *FailoverStep) error {
		pimgs, err = rf.promote(ctx, pstore, group, point, "unplanned", "")
		for _, p := range pimgs {
			s.Bytes += p.Size
		}
		if len(pimgs) > 0 && pimgs[0].Prepared {
			s.Detail = "brought forward from the prepared (warm standby) copy"
		} else {
			s.Detail = "copied in full"
		}
		return err
	}); err != nil {
		return err
	}
	if err := step(res, "track as primary", func(*FailoverStep) error {
		return adoptPrimary(ctx, pstore, AdoptRequest{Images: promotedAdopt(pimgs)})
	}); err != nil {
		return err
	}
	fs, _, _ := rf.rep.Failover(group)
	res.Point = fs.Point
	for _, p := range pimgs {
		res.Images = append(res.Images, wire.FailoverImage{ID: p.ID, Name: p.Name, Generation: p.Generation, Seq: p.Seq, Size: p.Size, Root: wire.RootHex(p.Root)})
	}
	res.Message = fmt.Sprintf("group %s runs from %s now (point %s); its old primary is refused until 'standin failover reverse --group %s' is run on it", group, pstore, fs.Point, group)
	rf.log.Warn("unplanned failover: this host is now the primary", "group", group, "point", fs.Point)
	return nil
}

// handle serves a failover request of the group's (old) primary.
func (rf *replicaFailover) handle(ctx context.Context, group string, p pki.Primary, req wire.FailoverRequest) (wire.FailoverReply, error) {
	// host is the name this host pairs back under (JoinSpec below); the old
	// primary ties its replacing token to it.
	host, _ := os.Hostname()
	rep := wire.FailoverReply{Host: host}
	if req.Kind == "cancel" { // also when this host's mount daemon is down
		if rf.primaryStore == "" {
			return rep, nil
		}
		return rep, rf.rep.CancelPrepared(group, filepath.Join(rf.primaryStore, "failover", group))
	}
	pstore, err := rf.primary(ctx, "")
	if err != nil {
		return rep, applier.Refuse("%v", err)
	}
	fs, promoted, err := rf.rep.Failover(group)
	if err != nil {
		return rep, err
	}
	addr := req.Replica
	if req.Token != "" && addr == "" {
		tok, err := pki.ParseToken(req.Token)
		if err != nil {
			return rep, applier.Refuse("pairing token of the old primary's replica store: %v", err)
		}
		addr = tok.Addr
	}
	if !req.DryRun && (req.Token == "" || addr == "") && (req.Kind == "planned" || req.Kind == "reverse") {
		return rep, applier.Refuse("a failover request needs a pairing token for the old primary's replica store")
	}
	grp := &shipper.Group{Name: group, Replica: addr, Interval: req.Interval, Points: req.Points, PointEvery: req.PointEvery,
		AnyPointWindow: req.AnyPointWindow, Bandwidth: req.Bandwidth, Compress: req.Compress, Initial: "network"}
	if grp.Interval <= 0 {
		grp.Interval = 5 * time.Minute
	}
	switch req.Kind {
	case "prepare":
		if promoted {
			return rep, applier.Refuse("group %s is failed over to this host already", group)
		}
		t := time.Now()
		pt, refreshed, blocks, err := rf.rep.PreparePromoteChecked(ctx, group, filepath.Join(pstore, "failover", group))
		if err != nil {
			return rep, err
		}
		rep.Point = pt
		how := "copied"
		if refreshed {
			how = "brought forward (warm standby)"
		}
		rep.Message = fmt.Sprintf("point %s %s into %s and every block re-read and checked (%d blocks) in %.1f s", pt, how, pstore, blocks, time.Since(t).Seconds())
		return rep, nil
	case "planned":
		held, err := rf.rep.GroupImages(group)
		if err != nil {
			return rep, err
		}
		byID := map[string]wire.ImageState{}
		for _, h := range held {
			byID[h.ID] = h
		}
		if len(req.Images) != len(held) && !promoted {
			return rep, applier.Refuse("group %s: the primary names %d images, the replica holds %d", group, len(req.Images), len(held))
		}
		for _, im := range req.Images {
			if promoted {
				// A repeated request (the old primary was interrupted, maybe
				// killed, and may have cut again): the roots decide below.
				if !slices.ContainsFunc(fs.Images, func(x applier.FailoverImage) bool { return x.ID == im.ID }) {
					return rep, fmt.Errorf("image %s is not part of the failover: %w", im.Name, &applier.FailedOverError{Group: group, State: fs})
				}
				continue
			}
			h, ok := byID[im.ID]
			if !ok {
				return rep, applier.Refuse("group %s: the replica does not hold image %s (%s)", group, im.Name, im.ID)
			}
			if h.Generation != im.Generation || h.Seq != im.Seq {
				return rep, applier.Refuse("group %s image %s: the replica holds generation %d cut %d, the primary's final cut is generation %d cut %d: the final cycle was not applied", group, im.Name, h.Generation, h.Seq, im.Generation, im.Seq)
			}
		}
		if req.DryRun {
			rep.Plan = []string{fmt.Sprintf("%s promotes the latest point of %s, verified by BLAKE3 roots, into %s and replicates it back", host, group, pstore)}
			return rep, nil
		}
		pimgs, err := rf.promote(ctx, pstore, group, "latest", "planned", p.Name)
		if err != nil {
			return rep, err
		}
		crashHook("replica-after-promote")
		want := map[string]wire.FailoverImage{}
		for _, im := range req.Images {
			want[im.ID] = im
		}
		for _, pi := range pimgs {
			w := want[pi.ID]
			if w.Root != wire.RootHex(pi.Root) {
				for _, x := range pimgs {
					os.Remove(x.Path)
				}
				if promoted {
					// Promoted by an earlier request and maybe in use: keep it.
					return rep, fmt.Errorf("image %s differs from the copy this host promoted (root %s here, %s on the old primary): %w", pi.Name, wire.RootHex(pi.Root), w.Root, &applier.FailedOverError{Group: group, State: fs})
				}
				if uerr := rf.rep.Unpromote(group); uerr != nil {
					return rep, fmt.Errorf("verification failed for image %s and the failover mark could not be removed: %w", pi.Name, uerr)
				}
				return rep, applier.Refuse("verification failed: image %s differs between the primary (BLAKE3 root %s) and the replica (root %s); nothing was promoted — run 'standin points verify' on the replica and 'standin replicate resync --group %s' on the primary", pi.Name, w.Root, wire.RootHex(pi.Root), group)
			}
		}
		for _, pi := range pimgs {
			grp.Images = append(grp.Images, pi.Name)
			rep.Images = append(rep.Images, wire.FailoverImage{ID: pi.ID, Name: pi.Name, Generation: pi.Generation, Seq: pi.Seq, Size: pi.Size, Root: wire.RootHex(pi.Root)})
		}
		if err := adoptPrimary(ctx, pstore, AdoptRequest{Images: promotedAdopt(pimgs), Join: &JoinSpec{Replica: addr, Token: req.Token, Name: host}, Group: grp}); err != nil {
			return rep, err
		}
		fs, _, _ = rf.rep.Failover(group)
		how := "copied in full"
		if len(pimgs) > 0 && pimgs[0].Prepared {
			how = "brought forward from the prepared copy"
		}
		rep.Message = fmt.Sprintf("%s is the primary of %s now (%s); replicating back to %s", host, group, how, addr)
	case "reverse":
		if !promoted {
			return rep, applier.Refuse("group %s is not failed over on this host: nothing to reverse (for a planned failover use 'standin failover planned')", group)
		}
		if req.DryRun {
			rep.Plan = []string{fmt.Sprintf("%s (primary of %s since %s, point %s) pairs with your replica store and ships a hash-compare base: only the blocks that differ travel", host, group, fs.Time.Format(time.RFC3339), fs.Point)}
			return rep, nil
		}
		// Candidate blocks: what the old primary changed after the
		// promoted point (its report, plus what it shipped here after that
		// point) — the new primary adds its own dirty map by itself.
		later, err := rf.rep.ChangedAfter(group, fs.Point)
		if err != nil {
			return rep, err
		}
		sent := map[string]wire.FailoverImage{}
		for _, im := range req.Images {
			sent[im.ID] = im
		}
		grp.Reconcile = &shipper.Reconcile{Requested: time.Now(), Candidates: map[string]string{}}
		for _, im := range fs.Images {
			grp.Images = append(grp.Images, im.Name)
			rep.Images = append(rep.Images, wire.FailoverImage{ID: im.ID, Name: im.Name, Generation: im.Generation, Seq: im.Seq})
			c := roaring.New()
			if x, ok := sent[im.ID]; ok && len(x.Candidates) > 0 {
				if c, err = shipper.ParseCandidates(x.Candidates); err != nil {
					return rep, applier.Refuse("candidate blocks of image %s: %v", im.Name, err)
				}
			} else if !ok {
				return rep, applier.Refuse("image %s (%s) of group %s is missing from the old primary's request", im.Name, im.ID, group)
			}
			if l := later[im.ID]; l != nil {
				c.Or(l)
			}
			path := filepath.Join(pstore, "failover", group, im.ID+".candidates")
			if err := shipper.WriteCandidates(path, c); err != nil {
				return rep, err
			}
			grp.Reconcile.Candidates[im.Name] = path
		}
		if err := adoptPrimary(ctx, pstore, AdoptRequest{Join: &JoinSpec{Replica: addr, Token: req.Token, Name: host}, Group: grp}); err != nil {
			return rep, err
		}
		rep.Message = fmt.Sprintf("%s replicates %s back to %s (hash check of the candidate blocks: only differing blocks travel)", host, group, addr)
	}
	rep.Point, rep.Promoted = fs.Point, fs.Time
	rep.Time = rf.pointTime(group, fs.Point)
	return rep, nil
}
