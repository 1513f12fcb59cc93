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
