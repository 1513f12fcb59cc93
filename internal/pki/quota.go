package pki

import (
	"fmt"
)

// Quota limits what one primary may keep on the replica (see the applier's
// quota accounting and docs/security.md). Zero fields are unlimited.
type Quota struct {
	// Held bounds the bytes of the primary's groups on the replica disk:
	// images, undo logs, uploads in the inbox and seed staging.
	Held int64 `json:"held,omitempty"`
	// Inflight bounds the bytes of its unfinished uploads (inbox .part files).
	Inflight int64 `json:"inflight,omitempty"`
}

func (q Quota) check() error {
	if q.Held < 0 || q.Inflight < 0 {
		return fmt.Errorf("pki: quota held %d / in flight %d: sizes must not be negative (0 = unlimited)", q.Held, q.Inflight)
	}
	return nil
}

// SetQuota sets the quota of the primary with this ID, or else of every
// primary with this name. It is durable and applies from the next request.
func (a *Authority) SetQuota(idOrName string, q Quota) error {
	return a.ChangeQuota(idOrName, QuotaChange{Held: &q.Held, Inflight: &q.Inflight})
}

// QuotaChange is a change of a quota: a nil field keeps the current value.
type QuotaChange struct {
	Held, Inflight *int64
}

// ChangeQuota is SetQuota for the fields c gives; each primary changed keeps
// its own value of the others.
func (a *Authority) ChangeQuota(idOrName string, c QuotaChange) error {
	var q Quota
	if c.Held != nil {
		q.Held = *c.Held
	}
	if c.Inflight != nil {
		q.Inflight = *c.Inflight
	}
	if err := q.check(); err != nil {
		return err
	}
	byName := func([]Primary) (func(Primary) bool, error) {
		return func(p Primary) bool { return p.Name == idOrName }, nil
	}
	return a.updatePrimaries(idOrName, byName, func(p *Primary) {
		if c.Held != nil {
			p.Quota.Held = *c.Held
		}
		if c.Inflight != nil {
			p.Quota.Inflight = *c.Inflight
		}
	})
}

// Primary returns the primary with this ID (revoked ones included).
func (a *Authority) Primary(id string) (Primary, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	_ = a.reloadPrimaries() // on error keep the last good list
	for _, p := range a.primaries {
		if p.ID == id {
			return p, true
		}
	}
	return Primary{}, false
}
