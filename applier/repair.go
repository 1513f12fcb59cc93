package applier

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/standin/standin/internal/format"
	"github.com/standin/standin/internal/fsutil"
)

// PendingReport says what is pending in a group: an apply whose commit
// record is durable but that could not be completed (and why), or nothing.
type PendingReport struct {
	Group string `json:"group"`
	// Pending is false when nothing is pending (the group is clean).
	Pending bool `json:"pending"`
	// Kind: "apply" (an apply after its commit record), "seed" / "adopt"
	// (an interrupted seed import or adopt), "load" (the group's files
	// could not be read).
	Kind   string `json:"kind,omitempty"`
	Reason string `json:"reason,omitempty"`
	// Point is the point the pending apply would record; LastPoint the
	// last recorded (good) point, the one a drop rolls back to.
	Point     string        `json:"point,omitempty"`
	LastPoint string        `json:"last_point,omitempty"`
	Items     []PendingItem `json:"items,omitempty"`
	// Droppable: DropPending can roll the apply back; WhyNot says why not.
	Droppable bool   `json:"droppable"`
	WhyNot    string `json:"why_not,omitempty"`
	// Dropped is set by DropPending when it rolled the apply back.
	Dropped bool `json:"dropped,omitempty"`
}

// PendingItem is one image of a pending apply.
type PendingItem struct {
	ID         string `json:"id"`
	Name       string `json:"name,omitempty"`
	Generation uint64 `json:"generation"`
	Seq        uint64 `json:"seq"`
	Path       string `json:"path"`
	// Cycle: the state of the recorded cycle file ("ok", "missing", or the
	// error opening and verifying it).
	Cycle string `json:"cycle"`
	// Done: this image's part of the apply finished before it stopped.
	Done bool `json:"done,omitempty"`
}

// Pending reports what is pending in a group (see PendingReport). It
// changes nothing.
func (r *Replica) Pending(groupName string) (PendingReport, error) {
	g, err := r.group(groupName)
	if err != nil {
		return PendingReport{}, err
	}
	g.wmu.Lock()
	defer g.wmu.Unlock()
	return r.pendingReport(g), nil
}

// pendingReport describes g's pending work. Called with g.wmu held.
func (r *Replica) pendingReport(g *group) PendingReport {
	rep := PendingReport{Group: g.name}
	g.mu.RLock()
	perr, lerr := g.pendingErr, g.loadErr
	if n := len(g.pts.Points); n > 0 {
		rep.LastPoint = pointID(g.pts.Points[n-1].N)
	}
	next := g.pts.Next
	g.mu.RUnlock()
	if perr == nil && !g.needRecover {
		return rep
	}
	rep.Pending = true
	if perr != nil {
		rep.Reason = perr.Error()
	} else {
		rep.Reason = "an operation stopped half-way; the next commit completes it"
	}
	if lerr != nil {
		rep.Kind, rep.WhyNot = "load", "the group's files could not be read; fix or restore them (see the reason)"
		return rep
	}
	var j journal
	err := fsutil.ReadJSON(filepath.Join(g.dir, "apply.json"), &j)
	switch {
	case errors.Is(err, fs.ErrNotExist) && fileExists(filepath.Join(g.dir, "seed.json")):
		rep.Kind, rep.WhyNot = "seed", "an interrupted seed import: run the same 'standin seed import' again"
		return rep
	case errors.Is(err, fs.ErrNotExist) && fileExists(filepath.Join(g.dir, "adopt.json")):
		rep.Kind, rep.WhyNot = "adopt", "an interrupted adopt: run the same failover command again"
		return rep
	case errors.Is(err, fs.ErrNotExist):
		rep.Kind, rep.WhyNot = "apply", "no commit record: the next commit rolls the interrupted apply back by itself"
		return rep
	case err != nil:
		rep.Kind, rep.WhyNot = "apply", fmt.Sprintf("the commit record cannot be read: %v", err)
		return rep
	}
	rep.Kind, rep.Point = "apply", pointID(j.Point)
	g.mu.RLock()
	for _, it := range j.Items {
		pi := PendingItem{ID: it.ID, Generation: it.Gen, Seq: it.Seq, Path: it.Path, Cycle: "ok"}
		if im := g.images[it.ID]; im != nil {
			pi.Name = im.st.Name
			pi.Done = !im.st.Applying && im.st.Present && im.st.Generation == it.Gen && im.st.Seq == it.Seq
		}
		rep.Items = append(rep.Items, pi)
	}
	g.mu.RUnlock()
	for i := range rep.Items {
		pi := &rep.Items[i]
		if pi.Done {
			pi.Cycle = "not needed (applied)"
			continue
		}
		// The whole-file hash: what recovery checks first.
		if c, err := openCycleWith(pi.Path, false); err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				pi.Cycle = "missing"
			} else {
				pi.Cycle = err.Error()
			}
		} else {
			if pi.Name == "" {
				pi.Name = c.r.Header().Name
			}
			c.f.Close()
		}
	}
	if j.Point < next {
		rep.WhyNot = "the point was recorded; the next commit finishes the clean-up"
		return rep
	}
	if _, err := r.dropPlan(g, &j); err != nil {
		rep.WhyNot = err.Error()
		return rep
	}
	rep.Droppable = true
	return rep
}

// DropPending rolls a pending apply that cannot finish back to the group's
// last recorded point: every image it touched gets its content, block
// hashes and state of that point back from the apply's undo logs, and the
// commit record goes. Every shown point stays complete throughout (the
// apply's point was never shown); a crash in the middle is finished by the
// next open. The primary's next commit then applies again (or is refused
// with a clear error). When recovery succeeds now (the cycle files are
// back), nothing is dropped: the apply is completed instead.
func (r *Replica) DropPending(groupName string) (PendingReport, error) {
	g, err := r.group(groupName)
	if err != nil {
		return PendingReport{}, err
	}
	g.wmu.Lock()
	defer g.wmu.Unlock()
	if g.needRecover {
		if err := r.recoverGroup(g, nil); err == nil {
			return r.pendingReport(g), nil // completed after all
		}
	}
	rep := r.pendingReport(g)
	if !rep.Pending {
		return rep, nil
	}
	if !rep.Droppable {
		return rep, fmt.Errorf("group %s: the pending %s cannot be dropped: %s", g.name, rep.Kind, rep.WhyNot)
	}
	var j journal
	if err := fsutil.ReadJSON(filepath.Join(g.dir, "apply.json"), &j); err != nil {
		return rep, err
	}
	prev, err := r.dropPlan(g, &j)
	if err != nil {
		return rep, err
	}
	// The decision is durable first: from here an open finishes the drop.
	j.Dropping = true
	for i := range j.Items {
		j.Items[i].Prev = prev[i]
	}
	if err := fsutil.WriteJSON(filepath.Join(g.dir, "apply.json"), j); err != nil {
		return rep, err
	}
	r.o.Logger.Warn("dropping a pending apply that cannot finish", "group", g.name, "point", j.Point, "reason", rep.Reason)
	if err := r.hook("drop-journal"); err != nil {
		return rep, err
	}
	if err := r.finishDrop(g, &j); err != nil {
		g.setPending(fmt.Errorf("%w: dropping point %d: %v", ErrPending, j.Point, err))
		return rep, err
	}
	out := r.pendingReport(g)
	out.Dropped, out.Reason, out.Point = true, rep.Reason, rep.Point
	return out, nil
}

// dropPlan returns, per journal item, the image state to roll back to (nil:
// nothing of the image to roll back), or why the apply cannot be rolled
// back. Called with g.wmu held.
func (r *Replica) dropPlan(g *group, j *journal) ([]*imageState, error) {
	g.mu.RLock()
	defer g.mu.RUnlock()
	out := make([]*imageState, len(j.Items))
	for i, it := range j.Items {
		im := g.images[it.ID]
		var prev imageState
		switch {
		case it.Prev != nil:
			prev = *it.Prev
		case im == nil:
			continue // never created
		case im.st.Applying:
			prev = im.st
			prev.Applying, prev.ApplyingSeq, prev.ApplyingGen, prev.ApplyingPoint, prev.ApplyingPath = false, 0, 0, 0, ""
		default:
			return nil, fmt.Errorf("image %s finished its part of point %d and the commit record (of an older version) does not say what it held before; complete the apply instead (put its cycle files back, or let the primary send them again)", it.ID, j.Point)
		}
		if im != nil && prev.Present && undoOf(im, j.Point) == nil {
			return nil, fmt.Errorf("image %s: undo log %d of the apply is missing; the apply cannot be rolled back", it.ID, j.Point)
		}
		out[i] = &prev
	}
	return out, nil
}

func undoOf(im *image, n uint64) *undoLog {
	for _, l := range im.logs {
		if l.from == n && l.to == n {
			return l
		}
	}
	return nil
}

// finishDrop rolls back the apply of journal j (Dropping set, every item's
// Prev recorded): idempotent, so an open after a crash runs it again.
// Called with g.wmu held.
func (r *Replica) finishDrop(g *group, j *journal) error {
	g.needRecover = true
	for _, it := range j.Items {
		im := g.images[it.ID]
		if it.Prev == nil || im == nil {
			continue
		}
		if !it.Prev.Present {
			// A new image: no point has it.
			g.mu.Lock()
			delete(g.images, it.ID)
			g.mu.Unlock()
			im.close()
			if err := os.RemoveAll(im.dir); err != nil {
				return err
			}
			if err := fsutil.SyncDir(filepath.Dir(im.dir)); err != nil {
				return err
			}
			continue
		}
		l := undoOf(im, j.Point)
		if l == nil {
			return fmt.Errorf("image %s: undo log %d missing", it.ID, j.Point)
		}
		if err := restoreUndo(im, l); err != nil {
			return fmt.Errorf("image %s: restoring point %d from undo log %d: %w", it.ID, j.Point-1, j.Point, err)
		}
		if err := r.hook("drop-data"); err != nil {
			return err
		}
		st := *it.Prev
		if err := fsutil.WriteJSON(filepath.Join(im.dir, "state.json"), st); err != nil {
			return err
		}
		g.mu.Lock()
		im.st = st
		g.mu.Unlock()
		if err := r.hook("drop-state"); err != nil {
			return err
		}
	}
	// The apply's undo logs (and any beyond the last point) go, then the
	// commit record, then its refs files.
	if err := removeLogsBeyondPoints(g); err != nil {
		return err
	}
	if err := os.Remove(filepath.Join(g.dir, "apply.json")); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if err := fsutil.SyncDir(g.dir); err != nil {
		return err
	}
	os.RemoveAll(filepath.Join(g.dir, "refs"))
	r.o.Logger.Warn("pending apply dropped; the group is back at its last point", "group", g.name, "point", j.Point, "last_point", j.Point-1)
	g.setPending(nil)
	g.needRecover = false
	return nil
}

// restoreUndo writes the content and block hashes an undo log holds (the
// image at point l.from-1) back into latest.img and hashes.bin, checking
// every data block against its recorded hash, and restores the size.
func restoreUndo(im *image, l *undoLog) error {
	f, hf := im.img, im.hashes
	nb := blocksOf(l.oldSize)
	buf := make([]byte, format.BlockSize)
	for i := range l.ents {
		e := &l.ents[i]
		if e.block >= nb {
			continue // beyond the old end: cut by the truncation below
		}
		off := int64(e.block) * format.BlockSize
		if e.kind == undoKindData {
			if err := l.readEntry(e, buf); err != nil {
				return err
			}
			if blockHash(buf) != e.hash {
				return fmt.Errorf("%w: %s: block %d does not match its hash", errUndoCorrupt, l.path, e.block)
			}
			if _, err := f.WriteAt(buf, off); err != nil {
				return err
			}
		} else if err := punch(f, off, format.BlockSize); err != nil {
			return err
		}
		if e.hash == zeroHash {
			if err := punch(hf, int64(e.block)*32, 32); err != nil {
				return err
			}
		} else if _, err := hf.WriteAt(e.hash[:], int64(e.block)*32); err != nil {
			return err
		}
	}
	if err := f.Truncate(int64(l.oldSize)); err != nil {
		return err
	}
	if err := hf.Truncate(int64(nb * 32)); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	return hf.Sync()
}

// pendingReason is the health reason of a group with pending work that
// could not be completed: why, and what to run.
func pendingReason(store, group, pending string) string {
	return fmt.Sprintf("interrupted apply cannot finish (%s); new cycles are refused until it does: run 'standin replicate repair --store %s --group %s' to see it, add --drop-pending to roll back to the last good point",
		pending, store, group)
}
