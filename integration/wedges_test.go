package integration

import (
	"os"
	"path/filepath"
	"strconv"
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
	e.pair("vm9/*", e.Rep.Addr)
	e.enable(e.Rep.Addr, "--interval", "5m", "--any-point-window", "1h")
	e.now()
	journal := filepath.Join(e.RStore, "groups", e.Group, "apply.json")
	caught := 0
	for k := 0; k < kills; k++ {
		killed := false
		for attempt := 1; attempt <= 4 && !killed; attempt++ {
			e.writeSeq("a.img", int64(k%2)*16*mib, 48*mib)
			e.writeSeq("b.img", 0, 8*mib)
			c0 := e.status().Cycles
			mustStandin(t, "replicate", "now", "--store", e.PStore, "--group", e.Group)
			deadline := time.Now().Add(60 * time.Second)
			for i := 0; time.Now().Before(deadline); i++ {
				if _, err := os.Stat(journal); err == nil {
					e.Rep.Kill()
					killed = true
					break
				}
				if i%500 == 499 && e.status().Cycles > c0 {
					break
				}
				time.Sleep(time.Millisecond)
			}
		}
		if !killed {
			t.Logf("round %d: never caught the replica mid-apply", k)
			continue
		}
		caught++
		// The cycle of the interrupted apply is in the inbox now.
		if n, b := inboxFiles(e.RStore, e.Group, ".cyc"); n == 0 {
			t.Logf("round %d: killed mid-apply, inbox has %d cycle files (%d bytes)", k, n, b)
		}
		e.Rep.Restart()
		// Recovery completed the apply; the primary's retry is answered
		// "applied" and the file must not stay behind.
		e.now()
	}
	if caught == 0 {
		t.Fatal("never caught the replica mid-apply")
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
