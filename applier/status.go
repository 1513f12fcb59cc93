package applier

import (
	"fmt"
	"slices"
	"time"

	"github.com/standin/standin/internal/wire"
)

// GroupStatus summarises one replication group of the replica store.
type GroupStatus struct {
	Group     string        `json:"group"`
	Images    []ImageStatus `json:"images"`
	Points    int           `json:"points"`
	Latest    *Point        `json:"latest,omitempty"`
	UndoBytes int64         `json:"undo_bytes"`
	Retention Retention     `json:"retention"`
	// Pending is set when an interrupted apply could not be completed yet.
	Pending string `json:"pending,omitempty"`
	// FailedOver is set while the group is failed over to this host
	// (GROUP/failover.json, see Promote): it takes no replication.
	FailedOver *FailoverState `json:"failed_over,omitempty"`
	// Scrubbed is when the group's last scrub ended (zero: never; its
	// findings show in the group's health).
	Scrubbed time.Time `json:"scrubbed,omitzero"`
}

// ImageStatus is the replica's state of one image.
type ImageStatus struct {
	ID         string `json:"id"`
	Name       string `json:"name"`
	Generation uint64 `json:"generation"`
	Seq        uint64 `json:"seq"`
	Size       uint64 `json:"size"`
	Applying   bool   `json:"applying"`
}

// Status lists every group, sorted by name.
func (r *Replica) Status() ([]GroupStatus, error) {
	r.mu.Lock()
	names := make([]string, 0, len(r.groups))
	for n := range r.groups {
		names = append(names, n)
	}
	r.mu.Unlock()
	slices.Sort(names)
	var out []GroupStatus
	for _, n := range names {
		g, err := r.group(n)
		if err != nil {
			return nil, err
		}
		ps, err := r.Points(n)
		if err != nil {
			return nil, err
		}
		gs := GroupStatus{Group: n, Points: len(ps)}
		_, _, gs.Scrubbed = r.ScrubHealth(n)
		if len(ps) > 0 {
			gs.Latest = &ps[len(ps)-1]
		}
		g.mu.RLock()
		gs.Retention = g.meta.Retention.withDefaults()
		if g.pendingErr != nil {
			gs.Pending = g.pendingErr.Error()
		}
		if g.fo != nil {
			gs.FailedOver = g.fo.clone()
		}
		retired := g.retiredBy()
		for _, im := range g.images {
			if !im.st.Present {
				continue
			}
			if retired[im.id] == "" { // a retired image only serves older points
				gs.Images = append(gs.Images, ImageStatus{ID: im.id, Name: im.st.Name, Generation: im.st.Generation, Seq: im.st.Seq, Size: im.st.Size, Applying: im.st.Applying})
			}
			for _, l := range im.logs {
				gs.UndoBytes += l.size
			}
		}
		g.mu.RUnlock()
		slices.SortFunc(gs.Images, func(a, b ImageStatus) int {
			if a.Name != b.Name {
				if a.Name < b.Name {
					return -1
				}
				return 1
			}
			if a.ID < b.ID {
				return -1
			}
			return 1
		})
		out = append(out, gs)
	}
	return out, nil
}

// ImageState returns the state of image id in a group; ok is false when the
// group or the image does not exist (yet). The Seq is the last applied
// cycle; Applying is set while an apply of it is not complete.
func (r *Replica) ImageState(groupName, id string) (st State, ok bool, err error) {
	if err := checkName("group", groupName); err != nil {
		return st, false, err
	}
	if !imageIDOK(id) {
		return st, false, fmt.Errorf("image id %q: %w", id, ErrBadName)
	}
	r.mu.Lock()
	g := r.groups[groupName]
	r.mu.Unlock()
	if g == nil {
		return st, false, nil
	}
	g.mu.RLock()
	defer g.mu.RUnlock()
	im := g.images[id]
	if im == nil || !im.st.Present {
		return st, false, nil
	}
	return State{ID: im.id, Generation: im.st.Generation, Seq: im.st.Seq, Applying: im.st.Applying, Name: im.st.Name}, true, nil
}

// GroupImages lists the images of a group (empty if the group does not exist yet).
func (r *Replica) GroupImages(groupName string) ([]wire.ImageState, error) {
	if err := checkName("group", groupName); err != nil {
		return nil, err
	}
	r.mu.Lock()
	g := r.groups[groupName]
	r.mu.Unlock()
	out := []wire.ImageState{}
	if g == nil {
		return out, nil
	}
	g.mu.RLock()
	retired := g.retiredBy()
	for _, im := range g.images {
		if im.st.Present && retired[im.id] == "" {
			out = append(out, wire.ImageState{ID: im.id, Name: im.st.Name, Generation: im.st.Generation, Seq: im.st.Seq})
		}
	}
	g.mu.RUnlock()
	slices.SortFunc(out, func(a, b wire.ImageState) int {
		if a.ID < b.ID {
			return -1
		}
		return 1
	})
	return out, nil
}
