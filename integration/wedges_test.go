package integration

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestReplInboxEmptyAfterKills: the replica daemon is killed (SIGKILL) in
// the middle of applies again and again and restarted; the cycles recovery
// completes must not stay in the inbox. After the last round the inbox holds
// nothing and every point verifies. STANDIN_IT_INBOX_KILLS sets the number
// of kills (default 3).
func TestReplInboxEmptyAfterKills(t *testing.T) {
	kills := 3
	if v, err := strconv.Atoi(os.Getenv("STANDIN_IT_INBOX_KILLS")); err == nil && v > 0 {
		kills = v
	}
	e := newReplEnv(t, "vm9", imgSpec{"a.img", 64 * mib}, imgSpec{"b.img", 16 * mib})
	e.start("--interval", "5m", "--any-point-window", "1h")
	caught := 0
	for k := 0; k < kills; k++ {
		held := false
		for attempt := 1; attempt <= 4 && !held; attempt++ {
			e.writeSeq("a.img", int64(k%2)*16*mib, 48*mib)
			e.writeSeq("b.img", 0, 8*mib)
			if !e.replicateKillMidApply() {
				continue
			}
			// The round counts only if the cycle of the interrupted apply
			// is in the inbox now (else there is nothing to leave behind).
			n, b := inboxFiles(e.RStore, e.Group, ".cyc")
			held = n > 0
			t.Logf("round %d attempt %d: killed mid-apply, inbox has %d cycle files (%d bytes)", k, attempt, n, b)
			e.Rep.Restart()
			// Recovery completed the apply; the primary's retry is answered
			// "applied" and the file must not stay behind.
			e.now()
		}
		if held {
			caught++
		} else {
			t.Logf("round %d: never caught the replica mid-apply with the cycle in its inbox", k)
		}
	}
	if caught == 0 {
		t.Fatal("never caught the replica mid-apply with the cycle in its inbox")
	}
	e.now()
	if n, b := inboxFiles(e.RStore, e.Group, ""); n != 0 {
		files, _ := filepath.Glob(filepath.Join(e.RStore, "inbox", e.Group, "*"))
		t.Fatalf("after %d kills mid-apply the inbox holds %d files (%d bytes): %v", caught, n, b, files)
	}
	for _, p := range listPoints(t, e.RStore, e.Group) {
		verifyPoint(t, e.RStore, e.Group, p.Point)
	}
	t.Logf("%d kills mid-apply; inbox empty", caught)
}

// TestReplRepairDropPending: the replica is killed mid-apply and the cycle
// files of the committed apply are damaged in its inbox, with the primary
// paused (it cannot send them again): recovery cannot finish. Health is
// Critical and names the repair command; 'replicate repair' shows the
// pending apply (through the daemon and directly on the store) and
// --drop-pending rolls it back to the last point: every point verifies, the
// latest is the cut before, and replication then catches up.
func TestReplRepairDropPending(t *testing.T) {
	e := newReplEnv(t, "vm10", imgSpec{"a.img", 64 * mib}, imgSpec{"b.img", 16 * mib})
	e.start("--interval", "5m", "--any-point-window", "1h")
	var prev map[string]string
	wedged := false
	for attempt := 1; attempt <= 4 && !wedged; attempt++ {
		prev = e.frozen()
		e.writeSeq("a.img", 0, 48*mib)
		e.writeSeq("b.img", 0, 8*mib)
		if !e.replicateKillMidApply() {
			continue
		}
		mustStandin(t, "replicate", "pause", "--store", e.PStore, "--group", e.Group)
		files, _ := filepath.Glob(filepath.Join(e.RStore, "inbox", e.Group, "*.cyc"))
		for _, f := range files {
			fh, err := os.OpenFile(f, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			fi, _ := fh.Stat()
			fh.WriteAt([]byte("damage!"), fi.Size()/2)
			fh.Close()
		}
		e.Rep.Restart()
		health, reasons := replicaHealth(t, e.RStore, e.Group)
		if health == "Critical" {
			wedged = true
			if !strings.Contains(strings.Join(reasons, ";"), "standin replicate repair --store "+e.RStore+" --group "+e.Group) {
				t.Fatalf("health reasons do not name the repair command: %q", reasons)
			}
			break
		}
		t.Logf("attempt %d: the apply finished before the kill (health %s %q); again", attempt, health, reasons)
		mustStandin(t, "replicate", "resume", "--store", e.PStore, "--group", e.Group)
		e.now()
	}
	if !wedged {
		t.Fatal("never wedged the replica (the apply always finished before the kill)")
	}
	before := listPoints(t, e.RStore, e.Group)
	// Show, through the daemon.
	out := mustStandin(t, "replicate", "repair", "--store", e.RStore, "--group", e.Group).Stdout
	if !strings.Contains(out, "cannot finish") || !strings.Contains(out, "--drop-pending") {
		t.Fatalf("repair (daemon) output:\n%s", out)
	}
	// Show, directly on the store.
	e.Rep.Stop()
	var rep struct {
		Pending   bool   `json:"pending"`
		Kind      string `json:"kind"`
		Droppable bool   `json:"droppable"`
		LastPoint string `json:"last_point"`
	}
	if err := json.Unmarshal([]byte(mustStandin(t, "replicate", "repair", "--store", e.RStore, "--group", e.Group, "--json").Stdout), &rep); err != nil {
		t.Fatal(err)
	}
	if !rep.Pending || rep.Kind != "apply" || !rep.Droppable || rep.LastPoint != before[len(before)-1].Point {
		t.Fatalf("repair (direct) report %+v, last point %s", rep, before[len(before)-1].Point)
	}
	// Drop, through the daemon.
	e.Rep.Restart()
	out = mustStandin(t, "replicate", "repair", "--store", e.RStore, "--group", e.Group, "--drop-pending").Stdout
	if !strings.Contains(out, "dropped") {
		t.Fatalf("drop output:\n%s", out)
	}
	if health, reasons := replicaHealth(t, e.RStore, e.Group); strings.Contains(strings.Join(reasons, ";"), "repair") {
		t.Fatalf("after the drop: health %s %q", health, reasons)
	}
	after := listPoints(t, e.RStore, e.Group)
	if fmt.Sprint(pointIDs(after)) != fmt.Sprint(pointIDs(before)) {
		t.Fatalf("points %v after the drop, %v before", pointIDs(after), pointIDs(before))
	}
	for _, p := range after {
		verifyPoint(t, e.RStore, e.Group, p.Point)
	}
	e.checkPoint("latest", prev, "after the drop")
	// Replication catches up.
	mustStandin(t, "replicate", "resume", "--store", e.PStore, "--group", e.Group)
	want := e.frozen()
	// The damaged inbox files are refused and removed by the first commit;
	// the primary then sends them again.
	ok := waitFor(3*time.Minute, time.Second, func() bool {
		r := standin(2*time.Minute, "replicate", "now", "--store", e.PStore, "--group", e.Group, "--wait", "--timeout", "90s")
		if r.Code != 0 {
			t.Logf("replicate now after the drop: %s", strings.TrimSpace(r.Stderr))
		}
		return r.Code == 0
	})
	if !ok {
		t.Fatal("replication did not catch up after the drop")
	}
	e.checkPoint("latest", want, "after the drop and a new cycle")
	if n, b := inboxFiles(e.RStore, e.Group, ""); n != 0 {
		t.Errorf("inbox holds %d files (%d bytes) after catching up", n, b)
	}
	for _, p := range listPoints(t, e.RStore, e.Group) {
		verifyPoint(t, e.RStore, e.Group, p.Point)
	}
}
