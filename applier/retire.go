package applier

// Retired images. When a disk is deleted on the primary and created again
// under the same name, the new disk is a new image (new id) of the same name.
// Its first apply records, in the new image's state (Supersedes), the ids of
// the images of the same name it replaces: from the point that apply
// records on, those images are retired — no later point lists them, so
// exports, the points mount's latest, test failovers, prepared copies and
// failovers see only the group's current members. Older points still list
// the retired image (what the group held then) and read it as before; the
// points mount names it NAME.retired-ID8 so it never collides with the
// current image of that name.
//
// The mark lives in the new image's state.json, written before the commit
// record (step 4 of the apply): a rolled-back apply deletes the new image's
// directory and with it the mark; a rolled-forward one keeps it.
//
// Once retention keeps no point that lists a retired image, retain deletes
// it (dropRetired): its directory goes, the ids it superseded itself move to
// the image that replaced it first, so every retired id stays marked and its
// late cycles stay refused.

import (
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"

	"github.com/standin/standin/internal/fsutil"
)

// retiredBy maps every retired image id to the id of the present image that
// replaced it. Called with g.mu held.
func (g *group) retiredBy() map[string]string {
	out := map[string]string{}
	for id, im := range g.images {
		if !im.st.Present {
			continue
		}
		for _, old := range im.st.Supersedes {
			if old != id {
				out[old] = id
			}
		}
	}
	return out
}

// supersededBy returns the present, not yet retired images of g recorded
// under name, other than the ids of the commit (a new image of that name
// replaces them). Called with g.wmu held.
func (g *group) supersededBy(name string, inCommit func(id string) bool) []string {
	g.mu.RLock()
	defer g.mu.RUnlock()
	retired := g.retiredBy()
	var out []string
	for _, id := range slices.Sorted(maps.Keys(g.images)) {
		im := g.images[id]
		if im.st.Present && im.st.Name == name && retired[id] == "" && !inCommit(id) {
			out = append(out, id)
		}
	}
	return out
}

// checkNotRetired refuses a cycle of a retired image: the primary replaced
// that disk, so a cycle of it is stale or foreign. Called with g.wmu held.
func (g *group) checkNotRetired(path, id string) error {
	g.mu.RLock()
	by := g.retiredBy()[id]
	g.mu.RUnlock()
	if by != "" {
		return fmt.Errorf("%s: %w: image %s was deleted and re-created on the primary (the replica now holds image %s of the same name); its old cycles are not applied", path, ErrForeign, id, by)
	}
	return nil
}

// dropRetired deletes the retired images that no point of kept lists: no
// point can read them any more. Crash-safe in this order: the replacing
// image's state takes over the ids the retired one superseded (durable), then
// the retired image's state.json goes (an open removes an image directory
// without one), then its directory. Called with g.wmu held.
func (r *Replica) dropRetired(g *group, kept []pointRec) (reclaimed int64, err error) {
	g.mu.RLock()
	retired := g.retiredBy()
	g.mu.RUnlock()
	for _, id := range slices.Sorted(maps.Keys(retired)) {
		im, by := g.images[id], g.images[retired[id]]
		if im == nil || by == nil || slices.ContainsFunc(kept, func(p pointRec) bool { _, ok := p.Seqs[id]; return ok }) {
			continue
		}
		if len(im.st.Supersedes) > 0 {
			st := by.st
			st.Supersedes = slices.Clone(st.Supersedes)
			for _, old := range im.st.Supersedes {
				if old != by.id && !slices.Contains(st.Supersedes, old) {
					st.Supersedes = append(st.Supersedes, old)
				}
			}
			if err := fsutil.WriteJSON(filepath.Join(by.dir, "state.json"), st); err != nil {
				return reclaimed, err
			}
			g.mu.Lock()
			by.st = st
			g.mu.Unlock()
		}
		r.o.Logger.Info("deleting retired image: no kept point lists it", "group", g.name, "image", id, "replaced_by", by.id)
		g.mu.Lock()
		delete(g.images, id)
		g.mu.Unlock()
		im.close()
		if n, _, err := duTree(im.dir); err == nil {
			reclaimed += n
		}
		if err := os.Remove(filepath.Join(im.dir, "state.json")); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return reclaimed, err
		}
		if err := fsutil.SyncDir(im.dir); err != nil {
			return reclaimed, err
		}
		if err := r.hook("retired-state-removed"); err != nil {
			return reclaimed, err
		}
		if err := os.RemoveAll(im.dir); err != nil {
			return reclaimed, err
		}
		if err := fsutil.SyncDir(filepath.Dir(im.dir)); err != nil {
			return reclaimed, err
		}
	}
	return reclaimed, nil
}

// retiredName is the points-mount file name of a retired image whose base
// name b a current image uses.
func retiredName(b, id string) string {
	n := b + ".retired-" + id[:8]
	if !storeNameOK(n) {
		return id
	}
	return n
}

// PointImage is one image of a recovery point, with its file name: the
// name the points mount shows it under (fileNames), unique in the group.
type PointImage struct {
	ID   string `json:"id"`
	Name string `json:"name"`
	File string `json:"file"`
	Size int64  `json:"size"`
}

// PointImages lists the images of one point (an ID, "latest" or empty), in id
// order. Pin the point first when the list is used to read it.
func (r *Replica) PointImages(groupName, point string) ([]PointImage, error) {
	g, p, err := r.rlockPoint(groupName, point)
	if err != nil {
		return nil, err
	}
	defer g.mu.RUnlock()
	// Files are named as the VM's disks were named at that point (an export
	// of a point is what a restore of the VM needs); only names that collide
	// within the point, or are not plain file names, become the image id.
	// The points mount, which shows every point of a group side by side,
	// names retired images apart (fileNames).
	var out []PointImage
	count := map[string]int{}
	for _, x := range g.imagesAt(p.N, p.Seqs) {
		b := filepath.Base(x.im.st.Name)
		if !storeNameOK(b) {
			b = x.id
		}
		count[b]++
		out = append(out, PointImage{ID: x.id, Name: x.im.st.Name, File: b, Size: int64(x.size)})
	}
	for i := range out {
		if count[out[i].File] > 1 {
			out[i].File = out[i].ID
		}
	}
	return out, nil
}
