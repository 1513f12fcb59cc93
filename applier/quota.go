package applier

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/standin/standin/internal/fsutil"
	"github.com/standin/standin/internal/pki"
	"github.com/standin/standin/internal/units"
)

// Per-primary quotas (pki.Quota) on a shared replica host.
//
// Attribution: a group belongs to the primary that first wrote to it over
// the wire (an upload, a commit or a seed announcement), recorded durably in
// STORE/owners.json before anything of the upload reaches the disk. A group
// created locally (seed import, adopt after a failover) belongs to nobody
// until a primary writes to it. If the recorded owner is no longer paired
// (revoked or removed: e.g. it paired again and got a new ID), the next
// primary that writes to the group becomes its owner.
//
// Accounting: a primary holds the allocated bytes of its groups' directories
// (images, undo logs, promotion staging), their inbox (complete and partial
// uploads) and seed staging; its bytes in flight are its groups' partial
// uploads (inbox *.part). An upload is admitted only if the owner's usage
// plus the bytes still to come of it and of its other uploads in progress
// (what they wrote already is in the usage) stays within both quotas;
// otherwise it is refused before any byte is read (507, code "quota").
// Commits of admitted uploads are not refused: the bytes are already on the
// disk.

const ownersFile = "owners.json"

type ownerRec struct {
	Primary string    `json:"primary"` // primary ID
	Name    string    `json:"name"`    // its name when recorded, for people
	Since   time.Time `json:"since"`
}

type ownersState struct {
	Version int                 `json:"version"`
	Groups  map[string]ownerRec `json:"groups"`
}

type quotas struct {
	rep   *Replica
	inbox string

	mu     sync.Mutex
	owners map[string]ownerRec // nil until loaded
	// reserved: primary ID -> its uploads in progress (removed when none).
	reserved map[string]map[*reservation]bool
	// shown: primary ID -> its usage as last walked, for the status
	// (Server.Usage) within usageAge; uploads always walk afresh.
	shown    map[string]shownUsage
	usageAge time.Duration
}

// usageAge: how old a primary's usage in the status may be (the walk of
// its groups' directories is not repeated on every status request).
const usageAge = 5 * time.Second

type shownUsage struct {
	groups string // the groups walked, joined
	u      Usage
	at     time.Time
}

// reservation is an admitted upload in progress: its .part file grows up to
// total bytes. What it has written is counted on the disk, so it reserves
// only what is still to come (total minus the size of the .part now).
type reservation struct {
	part  string
	total int64
}

func (r *reservation) toCome() int64 {
	var have int64
	if fi, err := os.Stat(r.part); err == nil {
		have = fi.Size()
	}
	return max(0, r.total-have)
}

func newQuotas(rep *Replica, inbox string) *quotas {
	return &quotas{rep: rep, inbox: inbox, reserved: map[string]map[*reservation]bool{}, shown: map[string]shownUsage{}, usageAge: usageAge}
}

func (q *quotas) path() string { return filepath.Join(q.rep.dir, ownersFile) }

// load reads owners.json once. Call with q.mu held.
func (q *quotas) load() error {
	if q.owners != nil {
		return nil
	}
	st := ownersState{}
	if err := fsutil.ReadJSON(q.path(), &st); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("group owners %s: %w (fix or remove the file; owners are recorded again on the next upload)", q.path(), err)
	}
	q.owners = st.Groups
	if q.owners == nil {
		q.owners = map[string]ownerRec{}
	}
	return nil
}

// QuotaError refuses an upload of a primary over its quota.
type QuotaError struct {
	Primary, Name string
	What          string // "held" or "in flight"
	Used, Need    int64
	Limit         int64
}

func (e *QuotaError) Error() string {
	verb, flag := "hold", "held"
	if e.What == "in flight" {
		verb, flag = "have in flight", "inflight"
	}
	return fmt.Sprintf("quota: primary %s (%s) would %s %s on this replica, over its %s quota of %s (%s now + %s for this upload); "+
		"on the replica raise it with 'standin pair quota --store RSTORE --%s SIZE %s', or free space (fewer recovery points)",
		e.Name, e.Primary, verb, units.Bytes(e.Used+e.Need), e.What, units.Bytes(e.Limit), units.Bytes(e.Used), units.Bytes(e.Need), flag, e.Name)
}

// ErrQuota is matched by every QuotaError (errors.Is).
var ErrQuota = errors.New("quota exceeded")

func (e *QuotaError) Is(target error) bool { return target == ErrQuota }

// claim returns the group's owner, recording p as the owner if the group
// has none (or its owner is no longer paired). owned(id) reports whether a
// primary ID is still paired and not revoked.
func (q *quotas) claim(group string, p pki.Primary, paired func(id string) bool) (string, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if err := q.load(); err != nil {
		return "", err
	}
	if o, ok := q.owners[group]; ok && (o.Primary == p.ID || paired(o.Primary)) {
		return o.Primary, nil
	}
	next := make(map[string]ownerRec, len(q.owners)+1)
	for g, o := range q.owners {
		next[g] = o
	}
	next[group] = ownerRec{Primary: p.ID, Name: p.Name, Since: time.Now().UTC()}
	if err := fsutil.WriteJSON(q.path(), ownersState{Version: 1, Groups: next}); err != nil {
		return "", fmt.Errorf("record the owner of group %s: %w", group, err)
	}
	q.owners = next
	return p.ID, nil
}

// groupsOf lists the groups owned by a primary.
func (q *quotas) groupsOf(id string) []string {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.load() != nil {
		return nil
	}
	var out []string
	for g, o := range q.owners {
		if o.Primary == id {
			out = append(out, g)
		}
	}
	slices.Sort(out)
	return out
}

// Usage is what one primary's groups take on the replica.
type Usage struct {
	Held     int64 `json:"held"`
	Inflight int64 `json:"inflight"`
}

// usage adds up the allocated bytes of the groups (see the top of the file).
func (q *quotas) usage(groups []string) (Usage, error) {
	var u Usage
	for _, g := range groups {
		if !storeNameOK(g) {
			continue
		}
		for _, dir := range []string{filepath.Join(q.rep.dir, "groups", g), filepath.Join(q.rep.dir, "seed-staging", g)} {
			n, _, err := duTree(dir)
			if err != nil {
				return u, err
			}
			u.Held += n
		}
		n, part, err := duTree(filepath.Join(q.inbox, g))
		if err != nil {
			return u, err
		}
		u.Held += n
		u.Inflight += part
	}
	return u, nil
}

// shownUsage is usage(groups) of primary id for the status: the last walk
// if it is younger than q.usageAge, else a new one.
func (q *quotas) shownUsage(id string, groups []string) (Usage, error) {
	key := strings.Join(groups, "\x00")
	q.mu.Lock()
	c, ok := q.shown[id]
	q.mu.Unlock()
	if ok && c.groups == key && time.Since(c.at) < q.usageAge {
		return c.u, nil
	}
	u, err := q.usage(groups)
	if err == nil {
		q.mu.Lock()
		q.shown[id] = shownUsage{groups: key, u: u, at: time.Now()}
		q.mu.Unlock()
	}
	return u, err
}

// keepShown forgets the shown usage of primaries not in ids (no longer
// paired).
func (q *quotas) keepShown(ids map[string]bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for id := range q.shown {
		if !ids[id] {
			delete(q.shown, id)
		}
	}
}

// duTree returns the allocated bytes under dir and the apparent bytes of
// its *.part files; a missing dir is empty.
func duTree(dir string) (alloc, part int64, err error) {
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil // gone meanwhile (applied, expired)
			}
			return err
		}
		if d.IsDir() {
			return nil
		}
		fi, err := d.Info()
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			alloc += st.Blocks * 512
		} else {
			alloc += fi.Size()
		}
		if strings.HasSuffix(p, ".part") {
			part += fi.Size()
		}
		return nil
	})
	return alloc, part, err
}

// admit checks an upload of bytes off..total of a cycle of group (whose
// partial upload is the file part) by p against the group owner's quota and
// reserves the bytes to come until release is called.
func (q *quotas) admit(group string, p pki.Primary, quotaOf func(id string) (pki.Quota, string, bool), part string, off, total int64) (release func(), err error) {
	paired := func(id string) bool { _, _, ok := quotaOf(id); return ok }
	owner, err := q.claim(group, p, paired)
	if err != nil {
		return nil, err
	}
	quota, name := p.Quota, p.Name
	if owner != p.ID {
		quota, name, _ = quotaOf(owner)
	}
	if quota == (pki.Quota{}) {
		return func() {}, nil
	}
	need := total - off
	u, err := q.usage(q.groupsOf(owner))
	if err != nil {
		return nil, fmt.Errorf("quota of primary %s: %w", name, err)
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	var res int64
	for r := range q.reserved[owner] {
		res += r.toCome()
	}
	if quota.Held > 0 && u.Held+res+need > quota.Held {
		return nil, &QuotaError{Primary: owner, Name: name, What: "held", Used: u.Held + res, Need: need, Limit: quota.Held}
	}
	if quota.Inflight > 0 && u.Inflight+res+need > quota.Inflight {
		return nil, &QuotaError{Primary: owner, Name: name, What: "in flight", Used: u.Inflight + res, Need: need, Limit: quota.Inflight}
	}
	r := &reservation{part: part, total: total}
	if q.reserved[owner] == nil {
		q.reserved[owner] = map[*reservation]bool{}
	}
	q.reserved[owner][r] = true
	var once sync.Once
	return func() {
		once.Do(func() {
			q.mu.Lock()
			defer q.mu.Unlock()
			if delete(q.reserved[owner], r); len(q.reserved[owner]) == 0 {
				delete(q.reserved, owner)
			}
		})
	}, nil
}

// quotaOf returns a paired, non-revoked primary's quota and name.
func (s *Server) quotaOf(id string) (pki.Quota, string, bool) {
	p, ok := s.auth.Primary(id)
	if !ok || p.Revoked {
		return pki.Quota{}, "", false
	}
	return p.Quota, p.Name, true
}

// claimGroup records p as the owner of group if it has none (commits and
// seed announcements; uploads claim in admit).
func (s *Server) claimGroup(group string, p pki.Primary) error {
	_, err := s.quota.claim(group, p, func(id string) bool { _, _, ok := s.quotaOf(id); return ok })
	return err
}

// admitUpload is quotas.admit for the server's authority (path: the
// upload's complete cycle file).
func (s *Server) admitUpload(group string, p pki.Primary, path string, off, total int64) (func(), error) {
	return s.quota.admit(group, p, s.quotaOf, path+".part", off, total)
}

// PrimaryUsage is one primary's quota and usage on this replica.
type PrimaryUsage struct {
	ID     string    `json:"id"`
	Name   string    `json:"name"`
	Quota  pki.Quota `json:"quota"`
	Usage  Usage     `json:"usage"`
	Groups []string  `json:"groups,omitempty"`
	// Over says which quota is exceeded ("" = none).
	Over string `json:"over,omitempty"`
}

// Usage lists every paired primary's quota and usage (at most usageAge
// old: a status request does not walk every primary's directories each
// time).
func (s *Server) Usage() ([]PrimaryUsage, error) {
	var out []PrimaryUsage
	paired := map[string]bool{}
	defer s.quota.keepShown(paired)
	for _, p := range s.auth.Primaries() {
		if p.Revoked {
			continue
		}
		paired[p.ID] = true
		pu := PrimaryUsage{ID: p.ID, Name: p.Name, Quota: p.Quota, Groups: s.quota.groupsOf(p.ID)}
		u, err := s.quota.shownUsage(p.ID, pu.Groups)
		if err != nil {
			return nil, err
		}
		pu.Usage = u
		switch {
		case p.Quota.Held > 0 && u.Held > p.Quota.Held:
			pu.Over = fmt.Sprintf("holds %s of its quota %s", units.Bytes(u.Held), units.Bytes(p.Quota.Held))
		case p.Quota.Inflight > 0 && u.Inflight > p.Quota.Inflight:
			pu.Over = fmt.Sprintf("has %s in flight of its quota %s", units.Bytes(u.Inflight), units.Bytes(p.Quota.Inflight))
		}
		out = append(out, pu)
	}
	return out, nil
}

// maxQuotaOnlyHealth bounds the health entries that only record a quota
// refusal (a primary with a wildcard allow-list can be refused for any
// number of group names that never come to exist); past it the oldest
// refusal is forgotten.
const maxQuotaOnlyHealth = 256

// quotaOnly: h records nothing but a quota refusal.
func (h *groupHealth) quotaOnly() bool { return h.interval == 0 && h.lastErr == "" }

// noteQuota records (err != nil) or clears a quota refusal for the group's
// health.
func (s *Server) noteQuota(group string, err error) {
	if err != nil && !errors.Is(err, ErrQuota) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	h := s.health[group]
	if err == nil {
		if h != nil {
			if h.quotaErr = ""; h.quotaOnly() {
				delete(s.health, group)
			}
		}
		return
	}
	if h == nil {
		s.evictQuotaOnly()
		h = &groupHealth{}
		s.health[group] = h
	}
	h.quotaErr, h.quotaTime = err.Error(), time.Now()
}

// evictQuotaOnly makes room for one more quota-only health entry. Call
// with s.mu held.
func (s *Server) evictQuotaOnly() {
	var n int
	var oldest string
	for g, h := range s.health {
		if h.quotaErr == "" || !h.quotaOnly() {
			continue
		}
		if n++; oldest == "" || h.quotaTime.Before(s.health[oldest].quotaTime) {
			oldest = g
		}
	}
	if n >= maxQuotaOnlyHealth {
		delete(s.health, oldest)
	}
}

// quotaOnlyHealth adds the groups refused for quota before they ever
// existed on the replica (their first upload was refused), so that the
// refusal shows in the replica's status too. Call with s.mu held.
func (s *Server) quotaOnlyHealth(out []GroupHealth) []GroupHealth {
	seen := map[string]bool{}
	for _, g := range out {
		seen[g.Group] = true
	}
	var extra []GroupHealth
	for name, h := range s.health {
		if h.quotaErr != "" && !seen[name] {
			extra = append(extra, GroupHealth{GroupStatus: GroupStatus{Group: name}, Health: "Critical",
				Reasons: []string{"last upload refused: " + h.quotaErr}})
		}
	}
	slices.SortFunc(extra, func(a, b GroupHealth) int { return strings.Compare(a.Group, b.Group) })
	return append(out, extra...)
}
