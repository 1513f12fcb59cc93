package daemon

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/standin/standin/internal/pki"
)

// TestPairTokenReplacesKeepsQuota: the control endpoint's replacing token
// (a failover's) carries the quota asked for and pairs under the name it
// replaces only.
func TestPairTokenReplacesKeepsQuota(t *testing.T) {
	dir := t.TempDir()
	auth, err := OpenAuthority(ReplicaOptions{Store: dir})
	if err != nil {
		t.Fatal(err)
	}
	mux := replicaControl(nil, nil, auth, ReplicaOptions{Store: dir}, "127.0.0.1:7443")
	body, _ := json.Marshal(TokenRequest{Pattern: "vm1/*", Replaces: "host1", Quota: pki.Quota{Held: 5 << 30}})
	w := httptest.NewRecorder()
	mux.ServeHTTP(w, httptest.NewRequest("POST", "/pair/token", bytes.NewReader(body)))
	var tok map[string]string
	if w.Code != http.StatusOK || json.Unmarshal(w.Body.Bytes(), &tok) != nil {
		t.Fatalf("POST /pair/token: %d %s", w.Code, w.Body)
	}
	pt, err := pki.ParseToken(tok["token"])
	if err != nil {
		t.Fatal(err)
	}
	join := func(name string) (pki.Primary, error) {
		_, csr, err := pki.NewCSR(name)
		if err != nil {
			t.Fatal(err)
		}
		_, _, p, err := auth.Join(pt.Secret, csr, name)
		return p, err
	}
	if _, err := join("host2"); !errors.Is(err, pki.ErrTokenName) {
		t.Fatalf("joining under another name: %v", err)
	}
	p, err := join("host1")
	if err != nil {
		t.Fatal(err)
	}
	if p.Quota.Held != 5<<30 {
		t.Fatalf("the replacing pairing's quota: %+v, want held 5 GiB", p.Quota)
	}
}
