package integration

// I5 over the wire, with the paired primary's own credentials: corrupt and
// truncated cycles are refused (422), replayed cycles are ignored, an
// out-of-order cycle is refused at commit; the replica keeps its last good
// state. Also retention (--points 3 --point-every 1s).

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestReplBadInput(t *testing.T) {
	e := newReplEnv(t, "vm7", imgSpec{"a.img", 16 * mib})
	e.start("--interval", "5m")
	c := primaryClient(t, e.PStore)
	base := "https://" + e.Rep.Addr

	// cutCopy pauses nothing itself: it writes, cuts a.img with `cycle cut`
	// (the group is paused, so the shipper leaves the file alone) and copies it.
	cutCopy := func(tag string) (listEntry, []byte, string) {
		e.writeRandom("a.img", 40, 8, 0, 16*mib)
		ce := cutOne(t, e.PStore, "a.img")
		var le listEntry
		for _, l := range listCycles(t, e.PStore, "a.img") {
			if l.Seq == ce.Seq {
				le = l
			}
		}
		if le.ID == "" {
			t.Fatalf("cut seq %d not in cycle list", ce.Seq)
		}
		data, err := os.ReadFile(ce.Path)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%s: cut a.img seq %d (%d bytes, group cut %s)", tag, le.Seq, len(data), ce.GroupCut)
		return le, data, ce.GroupCut
	}
	put := func(le listEntry, data []byte, total int) httpResult {
		p := fmt.Sprintf("/v1/groups/%s/uploads/%s/%d/%d?offset=0&total=%d&name=a.img", e.Group, le.ID, le.Generation, le.Seq, total)
		return doRaw(c, "PUT", base, p, data)
	}
	commit := func(le listEntry, gc string) httpResult {
		b, _ := json.Marshal(map[string]any{"group_cut": gc, "cycles": []map[string]any{{"id": le.ID, "generation": le.Generation, "seq": le.Seq}},
			"policy": map[string]any{"points": 24, "point_every": int64(time.Hour)}})
		return doRaw(c, "POST", base, "/v1/groups/"+e.Group+"/commit", b)
	}
	state := func() (string, map[string]string) {
		return strings.Join(pointIDs(listPoints(t, e.RStore, e.Group)), ","), exportHashes(t, e.RStore, e.Group, "latest")
	}
	unchanged := func(what, pts0 string, h0 map[string]string) {
		t.Helper()
		pts, h := state()
		if pts != pts0 || !equalMaps(h, h0) {
			t.Errorf("%s changed the replica: points %s → %s, latest %v → %v", what, pts0, pts, h0, h)
		}
		verifyPoint(t, e.RStore, e.Group, "latest")
	}

	mustStandin(t, "replicate", "pause", "--store", e.PStore, "--group", e.Group)
	le, good, gc := cutCopy("corrupt")
	want := e.frozen()
	pts0, h0 := state()

	bad := append([]byte(nil), good...)
	bad[len(bad)/2] ^= 0x40
	res := put(le, bad, len(bad))
	t.Logf("corrupt upload → %s", res)
	if res.Status != http.StatusUnprocessableEntity || !strings.Contains(res.Body, "corrupt") {
		t.Errorf("corrupt cycle upload: %s, want 422 corrupt", res)
	}
	res = put(le, good[:len(good)/2], len(good)/2)
	t.Logf("truncated upload → %s", res)
	if res.Status != http.StatusUnprocessableEntity {
		t.Errorf("truncated cycle upload: %s, want 422", res)
	}
	if n, _ := inboxFiles(e.RStore, e.Group, ""); n != 0 {
		t.Errorf("refused uploads left %d files in the inbox", n)
	}
	if res := commit(le, gc); res.Status/100 == 2 {
		t.Errorf("commit of a refused (never completely uploaded) cycle: %s", res)
	}
	unchanged("corrupt/truncated upload", pts0, h0)

	// The real cycle ships when replication resumes.
	mustStandin(t, "replicate", "resume", "--store", e.PStore, "--group", e.Group)
	e.now()
	e.checkPoint("latest", want, "after the corrupt upload")
	pts1, h1 := state()

	// Replay of the applied cycle: ignored (already applied), state intact.
	res = put(le, good, len(good))
	t.Logf("replayed upload → %s", res)
	if res.Status/100 == 2 && !strings.Contains(res.Body, `"applied":true`) {
		t.Errorf("replayed applied cycle accepted as new: %s", res)
	}
	res = commit(le, gc)
	t.Logf("replayed commit → %s", res)
	if res.Status/100 == 2 && !strings.Contains(res.Body, `"skipped":true`) {
		t.Errorf("replayed commit was applied again: %s", res)
	}
	if n, _ := inboxFiles(e.RStore, e.Group, ""); n != 0 {
		t.Errorf("replayed upload left %d files in the inbox", n)
	}
	unchanged("replay", pts1, h1)

	// Out of order: seq k+2 before k+1.
	mustStandin(t, "replicate", "pause", "--store", e.PStore, "--group", e.Group)
	cutCopy("k+1")
	le2, data2, gc2 := cutCopy("k+2")
	want2 := e.frozen()
	res = put(le2, data2, len(data2))
	t.Logf("out-of-order upload → %s", res)
	res = commit(le2, gc2)
	t.Logf("out-of-order commit → %s", res)
	if res.Status != http.StatusConflict || !strings.Contains(res.Body, "refused") {
		t.Errorf("commit of seq %d while the replica is at %d: %s, want 409 refused", le2.Seq, le.Seq, res)
	}
	unchanged("out-of-order commit", pts1, h1)
	mustStandin(t, "replicate", "resume", "--store", e.PStore, "--group", e.Group)
	e.now()
	if !waitFor(20*time.Second, 100*time.Millisecond, func() bool { n, _ := stagedFiles(e.PStore); return n == 0 }) {
		t.Errorf("cuts k+1, k+2 not shipped after resume")
	}
	e.checkPoint("latest", want2, "after k+1, k+2 in order")
	for _, p := range listPoints(t, e.RStore, e.Group) {
		verifyPoint(t, e.RStore, e.Group, p.Point)
	}
}

func TestReplRetention(t *testing.T) {
	e := newReplEnv(t, "vm8", imgSpec{"a.img", 16 * mib})
	e.start("--interval", "1s", "--points", "3", "--point-every", "1s")
	undoBytes := func() int64 {
		var n int64
		files, _ := filepath.Glob(filepath.Join(e.RStore, "groups", e.Group, "images", "*", "undo", "*.undo"))
		for _, f := range files {
			if fi, err := os.Stat(f); err == nil {
				n += fi.Size()
			}
		}
		return n
	}
	var counts []int
	var written, maxUndo, maxRound int64
	seen := map[string]bool{}
	gone := map[string]bool{}
	start := time.Now()
	for round := 1; time.Since(start) < 25*time.Second && round <= 30; round++ {
		d := int64(len(e.writeRandom("a.img", 30, 8, 0, 16*mib))) * blockSize
		written += d
		maxRound = max(maxRound, d)
		want := e.frozen()
		e.now()
		ps := listPoints(t, e.RStore, e.Group)
		counts = append(counts, len(ps))
		if len(ps) == 0 || ps[len(ps)-1].Kind != "latest" {
			t.Fatalf("round %d: points %v: no latest", round, pointIDs(ps))
		}
		// Observed and documented rule: the latest plus the newest point of
		// each of the last 3 one-second slots (the latest's slot is one of
		// them), so at most 3 points, older ones of kind "every", one per slot.
		if len(ps) > 3 {
			t.Errorf("round %d: %d points %v, want at most 3 (latest + newest of each of the last 3 slots)", round, len(ps), pointIDs(ps))
		}
		cur := map[string]bool{}
		slots := map[int64]string{}
		for _, p := range ps {
			if s := p.Time.Unix(); slots[s] != "" {
				t.Errorf("round %d: points %s and %s share the 1 s slot %d", round, slots[s], p.Point, s)
			} else {
				slots[s] = p.Point
			}
			if p.Point != ps[len(ps)-1].Point && p.Kind != "every" {
				t.Errorf("round %d: older point %s has kind %q, want every", round, p.Point, p.Kind)
			}
			cur[p.Point] = true
			if gone[p.Point] {
				t.Errorf("round %d: dropped point %s is listed again", round, p.Point)
			}
			seen[p.Point] = true
			if age := time.Since(p.Time); p.Kind != "latest" && age > 5*time.Second {
				t.Errorf("round %d: point %s (%s) is %v old, beyond 3 slots of 1 s", round, p.Point, p.Kind, age.Round(time.Millisecond))
			}
		}
		for p := range seen {
			if !cur[p] {
				gone[p] = true
			}
		}
		if round%5 == 0 {
			for _, p := range ps {
				verifyPoint(t, e.RStore, e.Group, p.Point)
			}
			e.checkPoint("latest", want, fmt.Sprintf("retention round %d", round))
		}
		maxUndo = max(maxUndo, undoBytes())
		time.Sleep(300 * time.Millisecond)
	}
	ps := listPoints(t, e.RStore, e.Group)
	for _, p := range ps {
		verifyPoint(t, e.RStore, e.Group, p.Point)
	}
	final := undoBytes()
	t.Logf("retention: point counts per round %v; final points %v; %d points seen, %d dropped", counts, pointIDs(ps), len(seen), len(gone))
	t.Logf("undo: final %d bytes, max %d, written %d dirty bytes over the run (max %d per round)", final, maxUndo, written, maxRound)
	if len(gone) == 0 {
		t.Errorf("no point was ever dropped with --points 3 --point-every 1s")
	}
	if maxUndo > 10*maxRound+2*mib {
		t.Errorf("undo logs grew to %d bytes, want bounded (≤ 10 × %d + 2 MiB): dropped points not reclaimed", maxUndo, maxRound)
	}
	if final > written/2 {
		t.Errorf("undo logs hold %d of %d bytes written: dropped points not reclaimed", final, written)
	}
	// After the writes stop the count settles and stays within the rule.
	time.Sleep(3 * time.Second)
	if n := len(listPoints(t, e.RStore, e.Group)); n < 1 || n > 3 {
		t.Errorf("after idle: %d points", n)
	}
}
