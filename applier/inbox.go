package applier

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/standin/standin/internal/format"
	"github.com/standin/standin/internal/fsutil"
)

// InboxStaleAge: inbox files of a group or image the store does not hold
// (an upload whose commit never came, a group removed since) are removed
// once they are this old. Files of held images are removed as soon as their
// cycle is applied, never before.
const InboxStaleAge = 7 * 24 * time.Hour

var inboxRE = regexp.MustCompile(`^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})-g([0-9]+)-s([0-9]+)\.cyc(\.part|\.part\.hash|\.part\.name)?$`)

// InboxCollected says what an inbox collection removed.
type InboxCollected struct {
	Files int   `json:"files"`
	Bytes int64 `json:"bytes"`
}

// inboxView is what the store holds of a group, for the inbox collection.
type inboxView struct {
	exists  bool
	held    map[string]imageState // present images
	pending map[string]bool       // cycle files a pending apply records
}

func (r *Replica) inboxView(groupName string) (inboxView, error) {
	v := inboxView{held: map[string]imageState{}, pending: map[string]bool{}}
	g, err := r.group(groupName)
	if errors.Is(err, ErrNoGroup) {
		return v, nil
	}
	if err != nil {
		return v, err
	}
	v.exists = true
	// The commit record first: a drop (repair.go) rolls the image states
	// back before it removes the record, so a cycle it made needed again
	// is either protected by the record or not applied in the states.
	var j journal
	if err := fsutil.ReadJSON(filepath.Join(g.dir, "apply.json"), &j); err == nil {
		for _, it := range j.Items {
			v.pending[it.Path] = true
		}
	}
	g.mu.RLock()
	for id, im := range g.images {
		if im.st.Present {
			v.held[id] = im.st
		}
		if im.st.Applying && im.st.ApplyingPath != "" {
			v.pending[im.st.ApplyingPath] = true
		}
	}
	g.mu.RUnlock()
	return v, nil
}

// CollectInbox removes inbox files that are no longer needed (group "" =
// every group): cycle files and partial uploads of cycles the replica
// already holds (its image is at a later generation, or at the same
// generation and that seq or later), and, once older than InboxStaleAge,
// those of groups or images the store does not hold. A file a pending apply
// records is always kept. It logs what it removed.
func (s *Server) CollectInbox(group string) (InboxCollected, error) {
	var out InboxCollected
	groups := []string{group}
	if group == "" {
		ents, err := os.ReadDir(s.inbox)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return out, nil
			}
			return out, err
		}
		groups = groups[:0]
		for _, e := range ents {
			if e.IsDir() && storeNameOK(e.Name()) {
				groups = append(groups, e.Name())
			}
		}
	}
	now := time.Now()
	var errs []error
	for _, gname := range groups {
		if !storeNameOK(gname) {
			continue
		}
		dir := filepath.Join(s.inbox, gname)
		ents, err := os.ReadDir(dir)
		if err != nil {
			if !errors.Is(err, fs.ErrNotExist) {
				errs = append(errs, err)
			}
			continue
		}
		v, err := s.rep.inboxView(gname)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		var files int
		var bytes int64
		for _, e := range ents {
			m := inboxRE.FindStringSubmatch(e.Name())
			if m == nil || !e.Type().IsRegular() {
				continue
			}
			gen, err1 := strconv.ParseUint(m[2], 10, 64)
			seq, err2 := strconv.ParseUint(m[3], 10, 64)
			if err1 != nil || err2 != nil {
				continue
			}
			p := filepath.Join(dir, e.Name())
			cyc := strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(p, ".hash"), ".name"), ".part")
			fi, err := os.Lstat(p)
			if err != nil || inboxObsolete(v, m[1], gen, seq, p, cyc, now.Sub(fi.ModTime())) == "" {
				continue
			}
			// A candidate: decide again under the lock an upload of the
			// cycle holds (only candidates wait for it).
			unlock := s.lock(cyc)
			fi, err = os.Lstat(p)
			if err != nil || !fi.Mode().IsRegular() {
				unlock()
				continue
			}
			why := inboxObsolete(v, m[1], gen, seq, p, cyc, now.Sub(fi.ModTime()))
			if why != "" {
				if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
					errs = append(errs, err)
				} else if err == nil {
					files++
					bytes += fi.Size()
					s.log.Debug("inbox: removed", "file", p, "bytes", fi.Size(), "why", why)
				}
			}
			unlock()
		}
		if files > 0 {
			fsutil.SyncDir(dir)
			s.log.Info("inbox: removed files no longer needed", "group", gname, "files", files, "bytes", bytes)
			out.Files += files
			out.Bytes += bytes
		}
	}
	return out, errors.Join(errs...)
}

// inboxObsolete says why inbox file p (of cycle id/gen/seq; cyc is the
// complete cycle's path) is no longer needed, or "" to keep it.
func inboxObsolete(v inboxView, id string, gen, seq uint64, p, cyc string, age time.Duration) string {
	if v.pending[cyc] || v.pending[p] {
		return ""
	}
	st, held := v.held[id]
	switch {
	case !v.exists:
		if age > InboxStaleAge {
			return "the store holds no such group"
		}
	case !held:
		if age > InboxStaleAge {
			return "the group holds no such image"
		}
	case st.Generation > gen:
		return "the image is at a later generation"
	case st.Generation == gen && st.Seq >= seq:
		return "the cycle is applied"
	}
	return ""
}

// afterCommit serialises the commits of a group with its inbox collection
// and returns the func (deferred by commit) that collects the group's inbox
// and releases it: a cycle a concurrent commit of the group is about to
// apply is never removed under it.
func (s *Server) afterCommit(group string) func() {
	unlock := s.lock("\x00commit/" + group)
	return func() {
		defer unlock()
		if _, err := s.CollectInbox(group); err != nil {
			s.log.Warn("inbox collection", "group", group, "err", err)
		}
	}
}

// discardCorrupt removes the inbox files among paths (of a commit that
// failed on corrupt input) whose whole-file hash no longer matches: the
// upload state then asks the primary for them again from byte 0, and the
// next commit (or the recovery of a pending apply) uses the new copy.
func (s *Server) discardCorrupt(group string, paths []string) {
	for _, p := range paths {
		if filepath.Dir(p) != filepath.Join(s.inbox, group) {
			continue
		}
		unlock := s.lock(p)
		c, err := openCycleWith(p, false)
		if err == nil {
			c.f.Close()
		} else if errors.Is(err, format.ErrCorrupt) || errors.Is(err, format.ErrNotCycle) || errors.Is(err, format.ErrVersion) {
			if os.Remove(p) == nil {
				s.log.Warn("inbox: removed a damaged cycle file; the primary sends it again", "group", group, "file", p, "err", err)
			}
		}
		unlock()
	}
}
