package integration

// I6 against the real replica daemon: only paired, non-revoked primaries get
// in, only for the images they are allowed, one-time tokens expire and cannot
// be reused, names from the wire never escape the store, plain HTTP is
// refused. Refused attempts write nothing into RSTORE/groups or inbox.

import (
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"
)

func TestReplSecurity(t *testing.T) {
	e := newReplEnv(t, "vmA", imgSpec{"a.img", 8 * mib}, imgSpec{"b.img", 8 * mib})
	e.Names = []string{"a.img"} // group vmA; b.img is offered as group vmB
	e.pair("vmA/*", e.Rep.Addr)
	e.enable(e.Rep.Addr, "--interval", "5m")
	e.now()
	want := e.frozen()
	e.checkPoint("latest", want, "vmA base")
	pointsA := pointIDs(listPoints(t, e.RStore, "vmA"))

	// Everything but the replica's own bookkeeping must stay as it is.
	snapSkip := []string{"pstore", "mnt", "rstore/pki", "rstore/control.sock"}
	snap := func() map[string]bool { return treeSnapshot(t, e.dir, snapSkip...) }
	noChange := func(what string, before map[string]bool) {
		t.Helper()
		if n := newPaths(before, snap()); len(n) > 0 {
			t.Errorf("%s: refused, but new paths appeared: %v", what, n)
		}
	}

	// A primary allowed only vmA/* replicating group vmB.
	t.Run("foreign group", func(t *testing.T) {
		before := snap()
		r := standin(cmdTimeout, "replicate", "enable", "--store", e.PStore, "--group", "vmB", "--images", "b.img", "--replica", e.Rep.Addr, "--interval", "5m")
		if r.Code == 0 {
			r = standin(cmdTimeout, "replicate", "now", "--store", e.PStore, "--group", "vmB", "--wait", "--timeout", "30s")
			t.Logf("replicate now vmB: exit %d: %s", r.Code, strings.TrimSpace(r.Stderr))
			if r.Code == 0 {
				t.Errorf("group vmB replicated by a primary allowed only vmA/*: %s", r)
			} else if !strings.Contains(r.Stderr, "forbidden") && !strings.Contains(r.Stderr, "may not") {
				t.Errorf("refusal of vmB does not say why (want 'forbidden' / 'may not'): %s", r.Stderr)
			}
			if st := replGroupStatus(t, e.PStore, "vmB"); st.Health == "Normal" || st.LastError == "" {
				t.Errorf("vmB refused but health %s, last_error %q", st.Health, st.LastError)
			}
			mustStandin(t, "replicate", "disable", "--store", e.PStore, "--group", "vmB")
		} else {
			t.Logf("replicate enable vmB refused at once: %s", r)
		}
		for _, p := range []string{filepath.Join(e.RStore, "groups", "vmB"), filepath.Join(e.RStore, "inbox", "vmB")} {
			if _, err := os.Stat(p); err == nil {
				t.Errorf("%s exists on the replica after vmB was refused", p)
			}
		}
		noChange("foreign group", before)
	})

	id := uuid.NewString()
	upload := "/v1/groups/vmA/uploads/" + id + "/1/0?offset=0&total=16&name=a.img"
	body := []byte("0123456789abcdef")

	t.Run("unpaired client", func(t *testing.T) {
		before := snap()
		c := tlsClient(t, filepath.Join(e.RStore, "pki", "ca.pem"), "", "")
		for _, rq := range []struct{ method, path string }{{"GET", "/v1/groups/vmA"}, {"PUT", upload}, {"POST", "/v1/groups/vmA/commit"}} {
			var b []byte
			if rq.method != "GET" {
				b = body
			}
			res := doRaw(c, rq.method, "https://"+e.Rep.Addr, rq.path, b)
			t.Logf("unpaired %s %s: %s", rq.method, rq.path, res)
			if res.Err == nil && res.Status != http.StatusUnauthorized {
				t.Errorf("unpaired %s %s: %s, want 401", rq.method, rq.path, res)
			}
		}
		noChange("unpaired client", before)
	})

	t.Run("plain HTTP", func(t *testing.T) {
		before := snap()
		c := &http.Client{Timeout: 10 * time.Second}
		res := doRaw(c, "PUT", "http://"+e.Rep.Addr, upload, body)
		t.Logf("plain HTTP PUT: %s", res)
		if res.Err == nil && (res.Status < 400 || res.Status >= 500) {
			t.Errorf("plain HTTP to the HTTPS port: %s, want a 4xx refusal or a dropped connection", res)
		}
		noChange("plain HTTP", before)
	})

	t.Run("names from the wire", func(t *testing.T) {
		before := snap()
		c := primaryClient(t, e.PStore)
		base := "https://" + e.Rep.Addr
		// The paired client itself works (so refusals below are about names).
		if res := doRaw(c, "GET", base, "/v1/groups/vmA", nil); res.Status != http.StatusOK {
			t.Fatalf("paired client GET /v1/groups/vmA: %s", res)
		}
		q := "?offset=0&total=16&name=a.img"
		for _, rq := range []struct{ method, path string }{
			{"PUT", "/v1/groups/..%2F..%2Fetc/uploads/" + id + "/1/0" + q},
			{"PUT", "/v1/groups/..%2F..%2F..%2Fvar%2Ftmp/uploads/" + id + "/1/0" + q},
			{"PUT", "/v1/groups/..%2Fgroups/uploads/" + id + "/1/0" + q},
			{"PUT", "/v1/groups/.hidden/uploads/" + id + "/1/0" + q},
			{"PUT", "/v1/groups/vmA/uploads/..%2F..%2F..%2Fx/1/0" + q},
			{"PUT", "/v1/groups/vmA/uploads/not-a-uuid/1/0" + q},
			{"PUT", "/v1/groups/vmA/uploads/" + strings.ToUpper(id) + "/1/0" + q},
			{"PUT", "/v1/groups/vmA/uploads/" + id + "/1/..%2F0" + q},
			{"PUT", "/v1/groups/vmA/uploads/" + id + "/-1/0" + q},
			{"PUT", "/v1/groups/vmA/uploads/" + id + "/1/0?offset=0&total=16&name=..%2F..%2Fx"},
			{"PUT", "/v1/groups/vmA/uploads/" + id + "/1/0?offset=0&total=16&name=b.img"},
			{"GET", "/v1/groups/..%2F..%2Fetc"},
			{"GET", "/v1/groups/vmA/uploads/..%2F..%2Fx/1/0"},
		} {
			var b []byte
			if rq.method == "PUT" {
				b = body
			}
			res := doRaw(c, rq.method, base, rq.path, b)
			t.Logf("%s %s → %d %s", rq.method, rq.path, res.Status, strings.TrimSpace(res.Body))
			if res.Err != nil || res.Status < 300 || res.Status >= 500 {
				t.Errorf("%s %s: %s, want a 4xx (or redirect) refusal", rq.method, rq.path, res)
			}
		}
		for _, bad := range []string{"../../x", strings.ToUpper(id), "x"} {
			cr, _ := json.Marshal(map[string]any{"group_cut": "x", "cycles": []map[string]any{{"id": bad, "generation": 1, "seq": 0}},
				"policy": map[string]any{"points": 24, "point_every": int64(time.Hour)}})
			res := doRaw(c, "POST", base, "/v1/groups/vmA/commit", cr)
			t.Logf("commit with image id %q → %d %s", bad, res.Status, strings.TrimSpace(res.Body))
			if res.Err != nil || res.Status < 400 || res.Status >= 500 {
				t.Errorf("commit with image id %q: %s, want 4xx", bad, res)
			}
		}
		noChange("names from the wire", before)
		for _, p := range []string{"/etc/uploads", filepath.Join(filepath.Dir(e.RStore), "etc"), filepath.Join(e.RStore, "etc"), "/var/tmp/uploads"} {
			if _, err := os.Stat(p); err == nil {
				t.Errorf("%s exists after path-traversal uploads", p)
			}
		}
	})

	t.Run("revoked primary", func(t *testing.T) {
		mustStandin(t, "pair", "revoke", "--store", e.RStore, "pri-vmA")
		r := mustStandin(t, "pair", "list", "--store", e.RStore, "--json")
		var pl struct {
			Primaries []struct {
				Name    string `json:"name"`
				Revoked bool   `json:"revoked"`
			} `json:"primaries"`
		}
		if err := json.Unmarshal([]byte(r.Stdout), &pl); err != nil {
			t.Fatal(err)
		}
		if len(pl.Primaries) != 1 || !pl.Primaries[0].Revoked {
			t.Errorf("pair list after revoke: %s", r.Stdout)
		}
		before := snap()
		e.writeRandom("a.img", 20, 8, 0, 8*mib)
		res := standin(cmdTimeout, "replicate", "now", "--store", e.PStore, "--group", "vmA", "--wait", "--timeout", "30s")
		t.Logf("replicate now after revoke: exit %d: %s", res.Code, strings.TrimSpace(res.Stderr))
		if res.Code == 0 {
			t.Errorf("a revoked primary replicated: %s", res)
		} else if !strings.Contains(res.Stderr, "revoked") {
			t.Errorf("refusal after revoke does not say 'revoked': %s", res.Stderr)
		}
		noChange("revoked primary", before)
		if got := pointIDs(listPoints(t, e.RStore, "vmA")); strings.Join(got, ",") != strings.Join(pointsA, ",") {
			t.Errorf("points changed after a revoked primary's attempt: %v → %v", pointsA, got)
		}
		e.checkPoint("latest", want, "after revoked attempt")
	})

	t.Run("tokens", func(t *testing.T) {
		token := func(ttl string) string {
			r := mustStandin(t, "pair", "token", "--store", e.RStore, "--images", "vmC/*", "--ttl", ttl)
			return strings.TrimSpace(r.Stdout)
		}
		store := func(n string) string { return filepath.Join(e.dir, n) }
		expired := token("1s")
		time.Sleep(2100 * time.Millisecond)
		r := standin(cmdTimeout, "pair", "join", "--store", store("p2"), "--token", expired, "--replica", e.Rep.Addr, "--name", "p2")
		t.Logf("join with an expired token: exit %d: %s", r.Code, strings.TrimSpace(r.Stderr))
		if r.Code != 4 {
			t.Errorf("join with an expired token: exit %d, want 4: %s", r.Code, r)
		}
		if creds, _ := filepath.Glob(filepath.Join(store("p2"), "replicas", "*", "client.pem")); len(creds) != 0 {
			t.Errorf("expired token: credentials stored: %v", creds)
		}
		once := token("1h")
		mustStandin(t, "pair", "join", "--store", store("p3"), "--token", once, "--replica", e.Rep.Addr, "--name", "p3")
		r = standin(cmdTimeout, "pair", "join", "--store", store("p4"), "--token", once, "--replica", e.Rep.Addr, "--name", "p4")
		t.Logf("join with a used token: exit %d: %s", r.Code, strings.TrimSpace(r.Stderr))
		if r.Code != 4 {
			t.Errorf("join with a used token: exit %d, want 4: %s", r.Code, r)
		}
		r = mustStandin(t, "pair", "list", "--store", e.RStore, "--json")
		if strings.Contains(r.Stdout, `"p4"`) || strings.Contains(r.Stdout, `"p2"`) {
			t.Errorf("refused joins appear as paired primaries: %s", r.Stdout)
		}
		if !strings.Contains(r.Stdout, `"p3"`) {
			t.Errorf("the successful join p3 is not listed: %s", r.Stdout)
		}
	})
}
