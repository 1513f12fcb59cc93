package applier

import (
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestServerRefusesHugeImage: over real mutual TLS, a commit of an uploaded
// cycle claiming a 2^62-byte image is refused (422 refused, naming the
// limit) and leaves the group as it was: the primary discards the upload,
// sends the real cycle and its commit applies; the inbox ends empty.
func TestServerRefusesHugeImage(t *testing.T) {
	t.Parallel()
	s := newTStore(t, ReplicaOptions{}, Retention{AnyPointWindow: time.Hour})
	rng := rand.New(rand.NewPCG(62, 2))
	a := newTImage(0x62, "a.img")
	p0, a0 := a.cycle(t, s.cyc, rng, [16]byte{1}, time.Now(), cycOpt{})
	res, err := s.rep.Apply(t.Context(), s.group, p0)
	if err != nil {
		t.Fatal(err)
	}
	s.record(res.Point, a0)

	inbox := t.TempDir()
	srv, auth, addr := tlsServer(t, s.rep, inbox)
	do := pairTLS(t, auth, addr, s.group+"/*", "prim").do
	up := fmt.Sprintf("/groups/%s/uploads/%s/%d/%d", s.group, a0.idString(), a0.gen, a0.seq+1)
	commit := []byte(fmt.Sprintf(`{"cycles":[{"id":%q,"generation":%d,"seq":%d}]}`, a0.idString(), a0.gen, a0.seq+1))
	upload := func(p string) {
		t.Helper()
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if code, we := do("PUT", fmt.Sprintf("%s?offset=0&total=%d&name=a.img", up, len(b)), b); code != http.StatusOK {
			t.Fatalf("upload: %d %+v", code, we)
		}
	}
	// (group.json takes the retention policy each commit carries.)
	snap := func() string {
		var keep []string
		for _, l := range strings.Split(storeSnapshot(s.dir), "\n") {
			if !strings.Contains(l, "group.json") {
				keep = append(keep, l)
			}
		}
		return strings.Join(keep, "\n")
	}
	// The upload records the group's owner (owners.json); the refused commit
	// changes nothing after it.
	upload(writeSizedCycle(t, s.cyc, a0, 1<<62, 7))
	before := snap()
	for try := 0; try < 2; try++ {
		code, we := do("POST", "/groups/"+s.group+"/commit", commit)
		if code != http.StatusUnprocessableEntity || we.Code != "refused" || !strings.Contains(we.Error, "16 TiB") {
			t.Fatalf("commit of a 2^62-byte image: %d %+v", code, we)
		}
	}
	if snap() != before {
		t.Fatal("the refused commit changed the store")
	}
	if hl, _ := srv.Health(); hl[0].Pending != "" || hl[0].Health == "Critical" {
		t.Fatalf("health after a refusal: %+v", hl[0])
	}
	// The primary discards its upload and sends the real cycle.
	if code, we := do("DELETE", up+"?name=a.img", nil); code != http.StatusOK {
		t.Fatalf("discard: %d %+v", code, we)
	}
	p1, a1 := a0.cycle(t, s.cyc, rng, [16]byte{2}, time.Now(), cycOpt{nOps: 10, resize: true})
	upload(p1)
	if code, we := do("POST", "/groups/"+s.group+"/commit", commit); code != http.StatusOK {
		t.Fatalf("commit of the real cycle: %d %+v", code, we)
	}
	ps, _ := s.rep.Points(s.group)
	s.record(ps[len(ps)-1].ID, a1)
	s.check(true, true)
	if ents, _ := os.ReadDir(filepath.Join(inbox, s.group)); len(ents) != 0 {
		t.Fatalf("inbox after the commit: %v", ents)
	}
}
