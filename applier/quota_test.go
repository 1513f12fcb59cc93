package applier

import (
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/standin/standin/internal/fsutil"
	"github.com/standin/standin/internal/pki"
)

func groupHealthOf(t *testing.T, s *Server, group string) GroupHealth {
	t.Helper()
	gs, err := s.Health()
	if err != nil {
		t.Fatal(err)
	}
	for _, g := range gs {
		if g.Group == group {
			return g
		}
	}
	t.Fatalf("no health for group %s", group)
	return GroupHealth{}
}

// Tenant A over its quota is refused (507 "quota", saying what it holds, its
// quota and what to do) and its group turns Critical; tenant B on the same
// replica keeps replicating. Raising the quota lets A continue.
func TestQuotaPerPrimary(t *testing.T) {
	t.Parallel()
	e := newSrvEnv(t, nil)
	hcA, idA := e.pair("tenant-a")
	hcB, idB := e.pair("tenant-b")
	a, b := newTImage(0x61, "a.img"), newTImage(0x62, "b.img")
	ship := func(hc *http.Client, group string, ti *tImage) (*tImage, int, string, string) {
		t.Helper()
		p, next := e.cycle(ti)
		code, we := e.ship(hc, group, p, next)
		if code == http.StatusOK {
			return next, code, "", ""
		}
		return ti, code, we.Code, we.Error
	}
	var code int
	var wcode, msg string
	for i := 0; i < 2; i++ {
		if a, code, _, msg = ship(hcA, "vmA", a); code != http.StatusOK {
			t.Fatalf("A cycle %d without quota: %d %s", i, code, msg)
		}
		if b, code, _, msg = ship(hcB, "vmB", b); code != http.StatusOK {
			t.Fatalf("B cycle %d: %d %s", i, code, msg)
		}
	}
	var owners ownersState
	if err := fsutil.ReadJSON(e.rep.dir+"/owners.json", &owners); err != nil {
		t.Fatal(err)
	}
	if owners.Groups["vmA"].Primary != idA || owners.Groups["vmB"].Primary != idB {
		t.Fatalf("owners.json: %+v, want vmA=%s vmB=%s", owners.Groups, idA, idB)
	}
	us, err := e.srv.Usage()
	if err != nil {
		t.Fatal(err)
	}
	var heldA int64
	for _, u := range us {
		if u.ID == idA {
			heldA = u.Usage.Held
		}
	}
	if heldA <= 0 {
		t.Fatalf("usage of A: %+v", us)
	}

	// A's quota: just what it holds now.
	if err := e.auth.SetQuota("tenant-a", pki.Quota{Held: heldA}); err != nil {
		t.Fatal(err)
	}
	a, code, wcode, msg = ship(hcA, "vmA", a)
	if code != http.StatusInsufficientStorage || wcode != "quota" || !strings.Contains(msg, "held") ||
		!strings.Contains(msg, "tenant-a") || !strings.Contains(msg, "standin pair quota") {
		t.Fatalf("A over its held quota: %d %s %q, want 507 quota naming the primary, the bytes and the command", code, wcode, msg)
	}
	t.Logf("refusal: %s", msg)
	if h := groupHealthOf(t, e.srv, "vmA"); h.Health != "Critical" || !strings.Contains(strings.Join(h.Reasons, ";"), "quota") {
		t.Fatalf("vmA health after a quota refusal: %s %v, want Critical with the quota reason", h.Health, h.Reasons)
	}
	// B is unaffected.
	for i := 0; i < 2; i++ {
		if b, code, _, msg = ship(hcB, "vmB", b); code != http.StatusOK {
			t.Fatalf("B while A is over quota: %d %s", code, msg)
		}
	}
	if h := groupHealthOf(t, e.srv, "vmB"); h.Health != "Normal" {
		t.Fatalf("vmB health: %s %v", h.Health, h.Reasons)
	}
	// B writing into A's group is charged to A, the group's owner.
	if _, code, wcode, _ = ship(hcB, "vmA", newTImage(0x63, "c.img")); code != http.StatusInsufficientStorage || wcode != "quota" {
		t.Fatalf("B uploading into A's group while A is over quota: %d %s, want 507", code, wcode)
	}

	// In flight: an upload larger than the in-flight quota is refused.
	if err := e.auth.SetQuota(idA, pki.Quota{Inflight: 1024}); err != nil {
		t.Fatal(err)
	}
	if a, code, wcode, msg = ship(hcA, "vmA", a); code != http.StatusInsufficientStorage || !strings.Contains(msg, "in flight") {
		t.Fatalf("A over its in-flight quota: %d %s %q", code, wcode, msg)
	}
	// Unlimited again: A continues and its health clears.
	if err := e.auth.SetQuota(idA, pki.Quota{}); err != nil {
		t.Fatal(err)
	}
	if a, code, _, msg = ship(hcA, "vmA", a); code != http.StatusOK {
		t.Fatalf("A after its quota was lifted: %d %s", code, msg)
	}
	if h := groupHealthOf(t, e.srv, "vmA"); h.Health == "Critical" {
		t.Fatalf("vmA still Critical after the quota was lifted: %v", h.Reasons)
	}
	if n := len(e.srv.quota.reserved); n != 0 {
		t.Fatalf("%d quota reservations left", n)
	}
}

// An upload in progress counts once: what its .part holds is in the usage,
// only the rest is reserved. A second upload that fits beside it is
// admitted; one that does not is refused.
func TestQuotaUploadsInProgressCountOnce(t *testing.T) {
	t.Parallel()
	s := newTStore(t, ReplicaOptions{}, Retention{Points: 1})
	inbox := t.TempDir()
	q := newQuotas(s.rep, inbox)
	p := pki.Primary{ID: "p-1", Name: "tenant", Quota: pki.Quota{Inflight: 1000}}
	quotaOf := func(id string) (pki.Quota, string, bool) { return p.Quota, p.Name, id == p.ID }
	part := func(n int) string { return filepath.Join(inbox, "vm1", fmt.Sprintf("u%d.cyc.part", n)) }
	if err := os.MkdirAll(filepath.Join(inbox, "vm1"), 0o700); err != nil {
		t.Fatal(err)
	}
	release, err := q.admit("vm1", p, quotaOf, part(1), 0, 600)
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	// The first upload has written 400 of its 600 bytes: 400 on the disk,
	// 200 to come.
	if err := os.WriteFile(part(1), make([]byte, 400), 0o600); err != nil {
		t.Fatal(err)
	}
	r2, err := q.admit("vm1", p, quotaOf, part(2), 0, 400)
	if err != nil {
		t.Fatalf("an upload that fits beside the one in progress (400 + 200 + 400 of 1000): %v", err)
	}
	r2()
	if _, err := q.admit("vm1", p, quotaOf, part(3), 0, 401); !errors.Is(err, ErrQuota) {
		t.Fatalf("an upload over the quota beside the one in progress: %v", err)
	}
}

// Quota refusals for group names that never come to exist are remembered
// for at most maxQuotaOnlyHealth groups, the newest kept; a cleared refusal
// leaves no entry.
func TestQuotaHealthBounded(t *testing.T) {
	t.Parallel()
	e := newSrvEnv(t, nil)
	refused := &QuotaError{Primary: "p-1", Name: "tenant", What: "held", Used: 1, Need: 1, Limit: 1}
	for i := 0; i < maxQuotaOnlyHealth+50; i++ {
		e.srv.noteQuota(fmt.Sprintf("g%d", i), refused)
	}
	if n := len(e.srv.health); n != maxQuotaOnlyHealth {
		t.Fatalf("%d health entries after %d refused groups, want %d", n, maxQuotaOnlyHealth+50, maxQuotaOnlyHealth)
	}
	last := fmt.Sprintf("g%d", maxQuotaOnlyHealth+49)
	if e.srv.health[last] == nil || e.srv.health["g0"] != nil {
		t.Fatal("the newest refusal was dropped, or the oldest kept")
	}
	e.srv.noteQuota(last, nil)
	if e.srv.health[last] != nil {
		t.Fatal("a cleared quota refusal left its health entry")
	}
}

// The status shows a primary's usage from a walk at most usageAge old; an
// older one is walked again.
func TestQuotaUsageShownAtMostUsageAge(t *testing.T) {
	t.Parallel()
	e := newSrvEnv(t, nil)
	hc, id := e.pair("tenant-a")
	a := newTImage(0x64, "a.img")
	p, next := e.cycle(a)
	if code, we := e.ship(hc, "vmA", p, next); code != http.StatusOK {
		t.Fatalf("ship: %d %+v", code, we)
	}
	held := func() int64 {
		t.Helper()
		us, err := e.srv.Usage()
		if err != nil {
			t.Fatal(err)
		}
		for _, u := range us {
			if u.ID == id {
				return u.Usage.Held
			}
		}
		t.Fatalf("no usage of %s: %+v", id, us)
		return 0
	}
	h0 := held()
	if err := os.WriteFile(filepath.Join(e.rep.dir, "groups", "vmA", "extra"), make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	if h := held(); h != h0 {
		t.Fatalf("usage walked again within usageAge: %d, then %d", h0, h)
	}
	e.srv.quota.usageAge = 0
	if h := held(); h < h0+1<<20 {
		t.Fatalf("usage after usageAge: %d, want at least %d", h, h0+1<<20)
	}
}
