package applier

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/zeebo/blake3"

	"github.com/standin/standin/internal/pki"
	"github.com/standin/standin/internal/wire"
)

// tenant is a primary paired (for real) with the test replica.
type tenant struct {
	t    *testing.T
	name string
	hc   *http.Client
	base string
	auth *pki.Authority
	addr string
}

type tReply struct {
	status int
	we     wire.Error
	body   []byte
}

func (tn *tenant) do(method, path string, body []byte) tReply {
	tn.t.Helper()
	req, err := http.NewRequest(method, tn.base+path, bytes.NewReader(body))
	if err != nil {
		tn.t.Fatal(err)
	}
	resp, err := tn.hc.Do(req)
	if err != nil {
		tn.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	out := tReply{status: resp.StatusCode, body: b}
	if resp.StatusCode != http.StatusOK {
		json.Unmarshal(b, &out.we)
	}
	return out
}

// put uploads the cycle file at path in one request.
func (tn *tenant) put(group, id string, gen, seq uint64, name, path string) tReply {
	tn.t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		tn.t.Fatal(err)
	}
	return tn.do("PUT", fmt.Sprintf("/groups/%s/uploads/%s/%d/%d?offset=0&total=%d&name=%s", group, id, gen, seq, len(b), name), b)
}

// authzServer serves rep over mutual TLS and pairs one primary per
// pattern through the pairing endpoint.
func authzServer(t *testing.T, rep *Replica, names, patterns []string) (*Server, []*tenant) {
	t.Helper()
	return authzServerIn(t, rep, t.TempDir(), names, patterns)
}

// pairVia pairs through the pairing endpoint, as standin pair join does.
func pairVia(t *testing.T, addr, tok, name string) (wire.PairReply, []byte, tReply) {
	t.Helper()
	pt, key, csr := tokenCSR(t, tok, name)
	hc := &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{TLSClientConfig: pki.PinnedClientTLS(pt.CAFingerprint, "127.0.0.1")}}
	b, _ := json.Marshal(wire.PairRequest{Secret: pt.Secret, CSR: csr, Name: name})
	resp, err := hc.Post("https://"+addr+wire.Prefix+"/pair", "application/json", bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	r := tReply{status: resp.StatusCode, body: body}
	var pr wire.PairReply
	if r.status == http.StatusOK {
		if err := json.Unmarshal(body, &pr); err != nil {
			t.Fatal(err)
		}
	} else {
		json.Unmarshal(body, &r.we)
	}
	return pr, key, r
}

func authzServerIn(t *testing.T, rep *Replica, inbox string, names, patterns []string) (*Server, []*tenant) {
	t.Helper()
	srv, auth, addr := tlsServer(t, rep, inbox)
	var out []*tenant
	for i, pat := range patterns {
		tok, err := auth.NewToken(addr, pat, 0)
		if err != nil {
			t.Fatal(err)
		}
		pr, key, r := pairVia(t, addr, tok, names[i])
		if r.status != http.StatusOK {
			t.Fatalf("pairing %s: %d %+v", names[i], r.status, r.we)
		}
		out = append(out, &tenant{t: t, name: names[i], auth: auth, addr: addr, base: "https://" + addr + wire.Prefix,
			hc: mtlsClient(t, key, pr.Cert, pr.CA)})
	}
	return srv, out
}

// replicaSnapshot renders everything a refused request must leave alone:
// held images (id, name, generation, seq), points, retention, the inbox and
// the seed announcements.
func replicaSnapshot(t *testing.T, s *tStore, srv *Server, groups ...string) string {
	t.Helper()
	var b strings.Builder
	for _, g := range groups {
		imgs, err := s.rep.GroupImages(g)
		if err != nil {
			t.Fatal(err)
		}
		ps, err := s.rep.Points(g)
		if err != nil {
			t.Fatal(err)
		}
		meta, _ := os.ReadFile(filepath.Join(s.dir, "groups", g, "group.json"))
		exp, _ := os.ReadFile(s.rep.expectPath(g))
		fmt.Fprintf(&b, "group %s: %+v\npoints %+v\nmeta %s\nexpect %s\n", g, imgs, ps, meta, exp)
	}
	filepath.WalkDir(srv.inbox, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			fi, _ := d.Info()
			sum, _ := os.ReadFile(p)
			fmt.Fprintf(&b, "inbox %s %d %x\n", strings.TrimPrefix(p, srv.inbox), fi.Size(), blake3.Sum256(sum))
		}
		return nil
	})
	return b.String()
}

// TestAuthorizationPerEndpoint: two tenants paired with one replica (A may
// send vm1/a.img and vm1/c.img; B vm1/b.img and vm2/*) attack each other
// through every endpoint: a foreign group, a foreign image id, a renamed
// held image, an allowed name claimed for a held image of another name, a
// new image taking a held image's name. Every attempt is refused with the
// right status before anything changes, and B's replication goes on intact.
func TestAuthorizationPerEndpoint(t *testing.T) {
	s := newTStore(t, ReplicaOptions{}, Retention{AnyPointWindow: 1000 * time.Hour})
	if err := s.rep.EnsureGroup("vm2", Retention{AnyPointWindow: 1000 * time.Hour}); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(9, 9))
	a, b, d := newTImage(0x51, "a.img"), newTImage(0x52, "b.img"), newTImage(0x53, "d.img")
	cut := time.Now().Add(-time.Hour)
	for i := 0; i < 2; i++ {
		gc := [16]byte{byte(i), 1}
		pa, na := a.cycle(t, s.cyc, rng, gc, cut, cycOpt{nOps: 8})
		pb, nb := b.cycle(t, s.cyc, rng, gc, cut, cycOpt{nOps: 8})
		pd, nd := d.cycle(t, s.cyc, rng, gc, cut, cycOpt{nOps: 8})
		if _, err := s.rep.ApplyGroup(context.Background(), "vm1", []string{pa, pb}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.rep.ApplyGroup(context.Background(), "vm2", []string{pd}); err != nil {
			t.Fatal(err)
		}
		a, b, d = na, nb, nd
		cut = cut.Add(time.Minute)
	}
	srv, tn := authzServer(t, s.rep, []string{"tenant-a", "tenant-b"}, []string{"vm1/a.img,vm1/c.img", "vm1/b.img,vm2/*"})
	var failovers int
	srv.OnFailover = func(ctx context.Context, group string, p pki.Primary, req wire.FailoverRequest) (wire.FailoverReply, error) {
		failovers++
		return wire.FailoverReply{}, Refuse("test: no failover")
	}
	A, B := tn[0], tn[1]
	ia, ib, id := a.idString(), b.idString(), d.idString()

	// B's work in progress: complete uploads of its next cycles of b and d,
	// and a seed announcement for vm1.
	gc := [16]byte{9, 1}
	pb, nb := b.cycle(t, s.cyc, rng, gc, cut, cycOpt{nOps: 8})
	pd, nd := d.cycle(t, s.cyc, rng, gc, cut, cycOpt{nOps: 8})
	if r := B.put("vm1", ib, nb.gen, nb.seq, "b.img", pb); r.status != http.StatusOK {
		t.Fatalf("B's upload: %d %+v", r.status, r.we)
	}
	if r := B.put("vm2", id, nd.gen, nd.seq, "d.img", pd); r.status != http.StatusOK {
		t.Fatalf("B's upload: %d %+v", r.status, r.we)
	}
	// and a partial upload of a new image (the first half of its cycle).
	x := newTImage(0x54, "b.img")
	px, nx := x.cycle(t, s.cyc, rng, gc, cut, cycOpt{nOps: 8})
	ix := x.idString()
	cycX, _ := os.ReadFile(px)
	half := len(cycX) / 2
	if r := B.do("PUT", fmt.Sprintf("/groups/vm1/uploads/%s/%d/%d?offset=0&total=%d&name=b.img", ix, nx.gen, nx.seq, len(cycX)), cycX[:half]); r.status != http.StatusOK {
		t.Fatalf("B's partial upload: %d %+v", r.status, r.we)
	}
	seedB, _ := json.Marshal(wire.SeedExpect{Images: []wire.ImageState{{ID: ib, Name: "b.img", Generation: b.gen, Seq: b.seq}}})
	if r := B.do("POST", "/groups/vm1/seed", seedB); r.status != http.StatusOK {
		t.Fatalf("B's seed announcement: %d %+v", r.status, r.we)
	}

	// A's crafted cycles, already in the inbox (as an upload that slipped
	// through would leave them): base cycles of a new generation, which the
	// apply accepts over the held image.
	evil := func(ti *tImage, name string, gen uint64) (path string) {
		e := *ti
		e.name, e.gen = name, gen
		if ti.have {
			e.gen-- // the base cycle starts the next generation
		}
		p, ne := e.cycle(t, s.cyc, rng, [16]byte{7, 7}, cut, cycOpt{base: true})
		dst := filepath.Join(srv.inbox, "vm1", fmt.Sprintf("%s-g%d-s%d.cyc", ne.idString(), ne.gen, ne.seq))
		if err := os.Rename(p, dst); err != nil {
			t.Fatal(err)
		}
		return dst
	}
	evil(b, "a.img", b.gen+1) // b's id under A's name
	evil(b, "b.img", b.gen+2) // b's id under its own name
	evil(a, "c.img", a.gen+1) // a renamed

	commit := func(id string, gen, seq uint64) []byte {
		b, _ := json.Marshal(wire.CommitRequest{Cycles: []wire.CycleRef{{ID: id, Gen: gen, Seq: seq}}, Policy: wire.Policy{Points: 1}})
		return b
	}
	seed := func(id, name string) []byte {
		b, _ := json.Marshal(wire.SeedExpect{Images: []wire.ImageState{{ID: id, Name: name, Generation: 1, Seq: 1}}})
		return b
	}
	failover := func(imgs ...[2]string) []byte {
		var r wire.FailoverRequest
		r.Kind = "planned"
		for _, im := range imgs {
			r.Images = append(r.Images, wire.FailoverImage{ID: im[0], Name: im[1], Generation: 1, Seq: 1})
		}
		b, _ := json.Marshal(r)
		return b
	}
	up := func(g, id string, gen, seq uint64, q string) string {
		return fmt.Sprintf("/groups/%s/uploads/%s/%d/%d%s", g, id, gen, seq, q)
	}
	img := func(g, id, what, q string) string { return fmt.Sprintf("/groups/%s/images/%s/%s%s", g, id, what, q) }
	cyc, _ := os.ReadFile(pb)
	putQ := fmt.Sprintf("?offset=0&total=%d&name=", len(cyc))

	cases := []struct {
		name, method, path string
		body               []byte
		status             int
		code               string
	}{
		// commit
		{"commit/foreign group", "POST", "/groups/vm2/commit", commit(id, nd.gen, nd.seq), 403, "forbidden"},
		{"commit/foreign image id", "POST", "/groups/vm1/commit", commit(ib, b.gen+2, 0), 403, "forbidden"},
		{"commit/foreign pending upload", "POST", "/groups/vm1/commit", commit(ib, nb.gen, nb.seq), 403, "forbidden"},
		{"commit/renamed image", "POST", "/groups/vm1/commit", commit(ia, a.gen+1, 0), 409, "renamed"},
		{"commit/allowed name, held other name", "POST", "/groups/vm1/commit", commit(ib, b.gen+1, 0), 403, "forbidden"},
		// upload
		{"upload/foreign group", "PUT", up("vm2", id, d.gen, d.seq+5, putQ+"d.img"), cyc, 403, "forbidden"},
		{"upload/foreign image id", "PUT", up("vm1", ib, b.gen, b.seq+5, putQ+"b.img"), cyc, 403, "forbidden"},
		{"upload/renamed image", "PUT", up("vm1", ia, a.gen, a.seq+5, putQ+"c.img"), cyc, 409, "renamed"},
		{"upload/allowed name, held other name", "PUT", up("vm1", ib, b.gen, b.seq+5, putQ+"a.img"), cyc, 403, "forbidden"},
		// A new id under a held name of A's own (a.img) is the disk re-created on
		// A's primary: it retires the old image (TestRecreatedImageRetires); under
		// another tenant's name it is refused by the allow-list.
		{"upload/new id taking another tenant's name", "PUT", up("vm1", "11111111-2222-4333-8444-555555555555", 1, 0, putQ+"b.img"), cyc, 403, "forbidden"},
		{"upload/appends to another's partial upload", "PUT", up("vm1", ix, nx.gen, nx.seq, fmt.Sprintf("?offset=%d&total=%d&name=a.img", half, len(cycX))), cycX[half:], 403, "forbidden"},
		{"upload/bad name", "PUT", up("vm1", "11111111-2222-4333-8444-555555555555", 1, 0, putQ+"-x%0Ay.img"), cyc, 400, "bad_request"},
		{"upload/name too long", "PUT", up("vm1", "11111111-2222-4333-8444-555555555555", 1, 0, putQ+strings.Repeat("x", 256)), cyc, 400, "bad_request"},
		// upload state
		{"state/foreign group", "GET", up("vm2", id, nd.gen, nd.seq, ""), nil, 403, "forbidden"},
		{"state/foreign image id", "GET", up("vm1", ib, nb.gen, nb.seq, ""), nil, 403, "forbidden"},
		{"state/another's partial upload", "GET", up("vm1", ix, nx.gen, nx.seq, ""), nil, 403, "forbidden"},
		{"state/another's partial upload, allowed name", "GET", up("vm1", ix, nx.gen, nx.seq, "?name=a.img"), nil, 403, "forbidden"},
		{"state/renamed image", "GET", up("vm1", ia, a.gen, a.seq+1, "?name=c.img"), nil, 409, "renamed"},
		{"state/allowed name, held other name", "GET", up("vm1", ib, nb.gen, nb.seq, "?name=a.img"), nil, 403, "forbidden"},
		// discard
		{"discard/foreign group", "DELETE", up("vm2", id, nd.gen, nd.seq, "?name=d.img"), nil, 403, "forbidden"},
		{"discard/foreign image id", "DELETE", up("vm1", ib, nb.gen, nb.seq, "?name=b.img"), nil, 403, "forbidden"},
		{"discard/another's partial upload", "DELETE", up("vm1", ix, nx.gen, nx.seq, "?name=a.img"), nil, 403, "forbidden"},
		{"discard/renamed image", "DELETE", up("vm1", ia, a.gen+1, 0, "?name=c.img"), nil, 409, "renamed"},
		{"discard/allowed name, held other name", "DELETE", up("vm1", ib, nb.gen, nb.seq, "?name=a.img"), nil, 403, "forbidden"},
		// held and regions
		{"held/foreign group", "POST", img("vm2", id, "held", "?name=d.img&blocks=8"), nil, 403, "forbidden"},
		{"held/foreign image id", "POST", img("vm1", ib, "held", "?name=b.img&blocks=8"), nil, 403, "forbidden"},
		{"held/renamed image", "POST", img("vm1", ia, "held", "?name=c.img&blocks=8"), nil, 409, "renamed"},
		{"held/allowed name, held other name", "POST", img("vm1", ib, "held", "?name=a.img&blocks=8"), nil, 403, "forbidden"},
		{"regions/foreign group", "GET", img("vm2", id, "regions", "?name=d.img&blocks=8&from=0&count=1"), nil, 403, "forbidden"},
		{"regions/foreign image id", "GET", img("vm1", ib, "regions", "?name=b.img&blocks=8&from=0&count=1"), nil, 403, "forbidden"},
		{"regions/renamed image", "GET", img("vm1", ia, "regions", "?name=c.img&blocks=8&from=0&count=1"), nil, 409, "renamed"},
		{"regions/allowed name, held other name", "GET", img("vm1", ib, "regions", "?name=a.img&blocks=8&from=0&count=1"), nil, 403, "forbidden"},
		// seed announcement
		{"seed/foreign group", "POST", "/groups/vm2/seed", seed(id, "d.img"), 403, "forbidden"},
		{"seed/foreign image id", "POST", "/groups/vm1/seed", seed(ib, "b.img"), 403, "forbidden"},
		{"seed/renamed image", "POST", "/groups/vm1/seed", seed(ia, "c.img"), 409, "renamed"},
		{"seed/allowed name, held other name", "POST", "/groups/vm1/seed", seed(ib, "a.img"), 403, "forbidden"},
		{"seed/replaces another's announcement", "POST", "/groups/vm1/seed", seed(ia, "a.img"), 403, "forbidden"},
		{"seed/bad name", "POST", "/groups/vm1/seed", seed(ia, "a\timg"), 400, "bad_request"},
		// failover
		{"failover/foreign group", "POST", "/groups/vm2/failover", failover([2]string{id, "d.img"}), 403, "forbidden"},
		{"failover/foreign image id", "POST", "/groups/vm1/failover", failover([2]string{ib, "b.img"}), 403, "forbidden"},
		{"failover/renamed image", "POST", "/groups/vm1/failover", failover([2]string{ia, "c.img"}), 409, "renamed"},
		{"failover/allowed name, held other name", "POST", "/groups/vm1/failover", failover([2]string{ib, "a.img"}), 403, "forbidden"},
		{"failover/group with foreign images", "POST", "/groups/vm1/failover", failover([2]string{ia, "a.img"}), 403, "forbidden"},
		// reads
		{"read/foreign group", "GET", "/groups/vm2", nil, 403, "forbidden"},
	}
	for _, c := range cases {
		before := replicaSnapshot(t, s, srv, "vm1", "vm2")
		r := A.do(c.method, c.path, c.body)
		if r.status != c.status || r.we.Code != c.code {
			t.Errorf("%s: %d %q %s, want %d %q", c.name, r.status, r.we.Code, r.we.Error, c.status, c.code)
		}
		if after := replicaSnapshot(t, s, srv, "vm1", "vm2"); after != before {
			t.Errorf("%s changed the replica:\nbefore %s\nafter %s", c.name, before, after)
		}
	}
	if failovers != 0 {
		t.Errorf("%d refused failover requests reached the failover handler", failovers)
	}

	// B's partial upload goes on where it stopped.
	if r := B.do("PUT", fmt.Sprintf("/groups/vm1/uploads/%s/%d/%d?offset=%d&total=%d&name=b.img", ix, nx.gen, nx.seq, half, len(cycX)), cycX[half:]); r.status != http.StatusOK {
		t.Fatalf("B's partial upload, continued: %d %+v", r.status, r.we)
	}

	// A sees only its own image of the shared group.
	r := A.do("GET", "/groups/vm1", nil)
	var gs wire.GroupState
	if err := json.Unmarshal(r.body, &gs); r.status != 200 || err != nil || len(gs.Images) != 1 || gs.Images[0].ID != ia {
		t.Errorf("A reads vm1: %d %s", r.status, r.body)
	}
	// A's own replication goes on.
	pa, na := a.cycle(t, s.cyc, rng, [16]byte{9, 2}, cut, cycOpt{nOps: 8})
	if r := A.put("vm1", ia, na.gen, na.seq, "a.img", pa); r.status != 200 {
		t.Fatalf("A's own upload: %d %+v", r.status, r.we)
	}
	if r := A.do("POST", "/groups/vm1/commit", commit(ia, na.gen, na.seq)); r.status != 200 {
		t.Fatalf("A's own commit: %d %+v", r.status, r.we)
	}
	// B's replication goes on: its pending cycles apply (not skipped), and
	// the images hold exactly B's content.
	for _, c := range []struct {
		g, id string
		ti    *tImage
	}{{"vm1", ib, nb}, {"vm2", id, nd}} {
		r := B.do("POST", "/groups/"+c.g+"/commit", commit(c.id, c.ti.gen, c.ti.seq))
		var cr wire.CommitReply
		if err := json.Unmarshal(r.body, &cr); r.status != 200 || err != nil || cr.Skipped {
			t.Fatalf("B's commit of %s: %d %s", c.g, r.status, r.body)
		}
		if _, err := s.rep.VerifyPoint(context.Background(), c.g, cr.Point); err != nil {
			t.Fatalf("verify %s point %s: %v", c.g, cr.Point, err)
		}
		pr, err := s.rep.OpenPoint(c.g, cr.Point, c.id)
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(io.NewSectionReader(pr, 0, pr.Size()))
		if err != nil || blake3.Sum256(got) != blake3.Sum256(c.ti.data) {
			t.Fatalf("%s image %s differs from B's image after the attacks (%v)", c.g, c.id, err)
		}
	}
	imgs, _ := s.rep.GroupImages("vm1")
	held := map[string]string{}
	for _, im := range imgs {
		held[im.ID] = im.Name
	}
	if want := map[string]string{ia: "a.img", ib: "b.img"}; !reflect.DeepEqual(held, want) {
		t.Fatalf("vm1 holds %v, want %v", held, want)
	}
}

// TestPairNamesOverTheWire: a bad primary name is 400 and does not use up
// the token; a name already paired gets a suffix, so names stay unique.
func TestPairNamesOverTheWire(t *testing.T) {
	s := newTStore(t, ReplicaOptions{}, Retention{})
	_, tn := authzServer(t, s.rep, []string{"tenant-a"}, []string{"vm1/*"})
	tok, err := tn[0].auth.NewToken(tn[0].addr, "vm2/*", 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, r := pairVia(t, tn[0].addr, tok, "bad name\n"); r.status != http.StatusBadRequest || r.we.Code != "bad_name" {
		t.Fatalf("bad name: %d %+v", r.status, r.we)
	}
	pr, _, r := pairVia(t, tn[0].addr, tok, "tenant-a")
	if r.status != http.StatusOK {
		t.Fatalf("pairing with the token after the refusal: %d %+v", r.status, r.we)
	}
	names := map[string]bool{}
	for _, p := range tn[0].auth.Primaries() {
		if names[p.Name] {
			t.Fatalf("two primaries named %s", p.Name)
		}
		names[p.Name] = true
		if p.ID == pr.PrimaryID && p.Name != "tenant-a-2" {
			t.Fatalf("second tenant-a paired as %q", p.Name)
		}
	}
}

// TestUploadStoreFull: an upload that fills the replica's store is refused
// with 507 and a clear message (the primary resumes from the durable offset
// once space was freed).
func TestUploadStoreFull(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a small tmpfs as the inbox")
	}
	inbox := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", inbox).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a tmpfs (%v: %s)", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", inbox).Run() })
	s := newTStore(t, ReplicaOptions{}, Retention{})
	_, tn := authzServerIn(t, s.rep, inbox, []string{"tenant-a"}, []string{"vm1/*"})
	ballast := filepath.Join(inbox, "ballast")
	if err := os.WriteFile(ballast, make([]byte, 200<<10), 0o600); err != nil {
		t.Fatal(err)
	}
	a := newTImage(0x61, "a.img")
	big := make([]byte, 128<<10)
	for i := range big {
		big[i] = byte(i*7 + i>>9)
	}
	r := tn[0].do("PUT", fmt.Sprintf("/groups/vm1/uploads/%s/1/0?offset=0&total=%d&name=a.img", a.idString(), len(big)), big)
	if r.status != http.StatusInsufficientStorage || r.we.Code != "store_full" || !strings.Contains(r.we.Error, "replica store full") {
		t.Fatalf("upload into a full store: %d %+v", r.status, r.we)
	}
}

func TestCheckImageName(t *testing.T) {
	for _, n := range []string{"a.img", "disk 1.qcow2", "vm-1_a.raw", "Ü.img", strings.Repeat("x", 255), ".hidden", "a-"} {
		if err := checkImageName(n); err != nil {
			t.Errorf("%q refused: %v", n, err)
		}
	}
	for _, n := range []string{"", ".", "..", "-rf", "a/b", "../x", "a\nb", "a\tb", "a\x00b", "a\x7fb", "a\u0085b", strings.Repeat("x", 256), "\xff.img"} {
		if err := checkImageName(n); !errors.Is(err, ErrBadName) {
			t.Errorf("%q accepted (%v)", n, err)
		}
	}
}
