package integration

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/standin/standin/internal/format"
)

// TestReplTenantIsolation: two real primaries replicate to one replica
// daemon. Tenant A is paired with the pattern */a.img, so group vmB is
// within its reach by name — but vmB holds only tenant B's b.img. A, with
// its own paired credentials, tries to overwrite b.img with a crafted base
// cycle under B's image id (named a.img and b.img), to commit it, to
// create a second "b.img", and to read vmB. Every attempt is refused, and
// B's replication goes on: its next point is complete, verifies, and holds
// exactly B's image (BLAKE3).
func TestReplTenantIsolation(t *testing.T) {
	e := newReplEnv(t, "vmB", imgSpec{"b.img", 8 * mib})
	e.start("--interval", "5m")
	e.checkPoint("latest", e.frozen(), "B's base")

	// Tenant A: a second primary host (own store and mount) on the same replica.
	dirA := filepath.Join(e.dir, "hostA")
	a := e.otherHost(dirA, filepath.Join(dirA, "pstore"), filepath.Join(dirA, "mnt"), "vmA",
		rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 8)), imgSpec{"a.img", 4 * mib})
	a.pair("*/a.img", e.Rep.Addr)
	a.enable(e.Rep.Addr, "--interval", "5m")
	a.now()
	a.checkPoint("latest", a.frozen(), "A's base")

	ents, err := os.ReadDir(filepath.Join(e.RStore, "groups", "vmB", "images"))
	if err != nil || len(ents) != 1 {
		t.Fatalf("vmB images on the replica: %v %v", ents, err)
	}
	bid := ents[0].Name()
	pointsB := pointIDs(listPoints(t, e.RStore, "vmB"))

	// A crafted base cycle of a new generation of B's image.
	craft := func(id, name string) []byte {
		var buf bytes.Buffer
		u := uuid.MustParse(id)
		h := format.Header{ImageID: u, Generation: 99, Seq: 0, Parent: format.NoParent, Flags: format.FlagBase,
			CutTime: time.Now(), ImageSize: uint64(8 * mib), GroupCut: [16]byte{0xee}, Name: name}
		w, err := format.NewWriter(&buf, h, format.WriterOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if err := w.WriteBlocks(0, bytes.Repeat([]byte{0xa7}, format.BlockSize)); err != nil {
			t.Fatal(err)
		}
		if _, err := w.Close(); err != nil {
			t.Fatal(err)
		}
		return buf.Bytes()
	}
	c := primaryClient(t, a.PStore)
	base := "https://" + e.Rep.Addr
	refused := func(what string, res httpResult, status int) {
		t.Helper()
		t.Logf("%s → %s", what, res)
		if res.Err != nil || res.Status != status {
			t.Errorf("%s: %s, want %d", what, res, status)
		}
	}
	for _, name := range []string{"a.img", "b.img"} {
		cyc := craft(bid, name)
		refused("A uploads B's image id as "+name, doRaw(c, "PUT", base, fmt.Sprintf("/v1/groups/vmB/uploads/%s/99/0?offset=0&total=%d&name=%s", bid, len(cyc), name), cyc), http.StatusForbidden)
	}
	// The cycle under B's id, put into the inbox as if an upload had slipped
	// through: the commit itself must refuse it.
	inbox := filepath.Join(e.RStore, "inbox", "vmB")
	if err := os.MkdirAll(inbox, 0o700); err != nil {
		t.Fatal(err)
	}
	slipped := filepath.Join(inbox, bid+"-g99-s0.cyc")
	if err := os.WriteFile(slipped, craft(bid, "a.img"), 0o600); err != nil {
		t.Fatal(err)
	}
	cr, _ := json.Marshal(map[string]any{"group_cut": "x", "cycles": []map[string]any{{"id": bid, "generation": 99, "seq": 0}},
		"policy": map[string]any{"points": 1}})
	refused("A commits B's image id", doRaw(c, "POST", base, "/v1/groups/vmB/commit", cr), http.StatusForbidden)
	os.Remove(slipped)
	// A new image of A that takes the name b.img is not A's to send; one
	// named a.img is (A may send */a.img), and is the only thing A may see.
	nid := uuid.NewString()
	cyc := craft(nid, "b.img")
	refused("A sends a new image named b.img", doRaw(c, "PUT", base, fmt.Sprintf("/v1/groups/vmB/uploads/%s/99/0?offset=0&total=%d&name=b.img", nid, len(cyc)), cyc), http.StatusForbidden)
	res := doRaw(c, "GET", base, "/v1/groups/vmB", nil)
	if res.Status != http.StatusOK || strings.Contains(res.Body, bid) || strings.Contains(res.Body, "b.img") {
		t.Errorf("A reads vmB: %s (want B's image hidden)", res)
	}
	res = doRaw(c, "GET", base, fmt.Sprintf("/v1/groups/vmB/uploads/%s/1/1", bid), nil)
	refused("A reads the upload state of B's image", res, http.StatusForbidden)
	if got := pointIDs(listPoints(t, e.RStore, "vmB")); strings.Join(got, " ") != strings.Join(pointsB, " ") {
		t.Errorf("vmB points changed by refused requests: %v, were %v", got, pointsB)
	}

	// B's replication goes on and its copy stays exact.
	e.writeRandom("b.img", 64, 8, 0, 8*mib)
	e.now()
	want := e.frozen()
	e.checkPoint("latest", want, "B after A's attempts")
	ps := listPoints(t, e.RStore, "vmB")
	if len(ps) == 0 || strings.Join(pointIDs(ps), " ") == strings.Join(pointsB, " ") {
		t.Fatalf("vmB points after B's next cycle: %v, were %v (the cycle was not applied)", pointIDs(ps), pointsB)
	}
	verifyPoint(t, e.RStore, "vmB", ps[len(ps)-1].Point)
	a.checkPoint("latest", a.frozen(), "A's own group")
}
