package pki

import (
	"errors"
	"testing"
)

// A token's quota goes to the primary that joins with it; SetQuota changes
// it durably (another Authority on the directory sees it) and refuses
// unknown primaries and negative sizes.
func TestQuotaFromTokenAndSetQuota(t *testing.T) {
	dir := t.TempDir()
	a := open(t, dir)
	tok, err := a.NewTokenWith("127.0.0.1:7443", TokenOptions{Pattern: "*", Quota: Quota{Held: 500 << 30, Inflight: 20 << 30}})
	if err != nil {
		t.Fatal(err)
	}
	pt, err := ParseToken(tok)
	if err != nil {
		t.Fatal(err)
	}
	_, csr, err := NewCSR("h1")
	if err != nil {
		t.Fatal(err)
	}
	_, _, p, err := a.Join(pt.Secret, csr, "h1")
	if err != nil {
		t.Fatal(err)
	}
	if p.Quota != (Quota{Held: 500 << 30, Inflight: 20 << 30}) {
		t.Fatalf("joined primary quota %+v", p.Quota)
	}
	if ts := a.Tokens(); len(ts) != 1 || ts[0].Quota.Held != 500<<30 {
		t.Fatalf("tokens: %+v", ts)
	}
	if err := a.SetQuota("h1", Quota{Held: 1 << 30}); err != nil {
		t.Fatal(err)
	}
	b := open(t, dir)
	if got, ok := b.Primary(p.ID); !ok || got.Quota != (Quota{Held: 1 << 30}) {
		t.Fatalf("after SetQuota, another Authority sees %+v %v", got.Quota, ok)
	}
	if err := a.SetQuota("nobody", Quota{}); !errors.Is(err, ErrNoSuchPrimary) {
		t.Fatalf("SetQuota of an unknown primary: %v", err)
	}
	if err := a.SetQuota(p.ID, Quota{Held: -1}); err == nil {
		t.Fatalf("negative quota accepted")
	}
	if _, err := a.NewTokenWith("127.0.0.1:7443", TokenOptions{Pattern: "*", Quota: Quota{Inflight: -5}}); err == nil {
		t.Fatalf("token with a negative quota issued")
	}
}

// ChangeQuota changes only the fields it is given; every primary of a name
// keeps its own value of the others.
func TestChangeQuotaKeepsOtherFields(t *testing.T) {
	a := open(t, t.TempDir())
	join := func(q Quota) Primary {
		t.Helper()
		tok, err := a.NewTokenWith("127.0.0.1:7443", TokenOptions{Quota: q})
		if err != nil {
			t.Fatal(err)
		}
		pt, _ := ParseToken(tok)
		_, csr, _ := NewCSR("h1")
		_, _, p, err := a.Join(pt.Secret, csr, "h1")
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	old := join(Quota{Held: 1, Inflight: 10})
	if err := a.Revoke(old.ID); err != nil {
		t.Fatal(err)
	}
	cur := join(Quota{Held: 2, Inflight: 20})
	held := int64(7)
	if err := a.ChangeQuota("h1", QuotaChange{Held: &held}); err != nil {
		t.Fatal(err)
	}
	for id, want := range map[string]Quota{old.ID: {Held: 7, Inflight: 10}, cur.ID: {Held: 7, Inflight: 20}} {
		if p, _ := a.Primary(id); p.Quota != want {
			t.Errorf("primary %s: quota %+v, want %+v", id, p.Quota, want)
		}
	}
	neg := int64(-1)
	if err := a.ChangeQuota("h1", QuotaChange{Inflight: &neg}); err == nil {
		t.Error("a negative in-flight quota was accepted")
	}
}
