package integration

// Extended replication: host B, the replica of A, forwards
// the group onward to a third host C from its recovery points, also across a
// planned failover to B and back. Every step is checked by BLAKE3 of whole
// images and the bytes each forward sends are bounded.

import (
	"encoding/json"
	"os"
	"strings"
	"testing"
	"time"
)

type forwardStatusJSON struct {
	Group       string   `json:"group"`
	To          string   `json:"to"`
	Health      string   `json:"health"`
	Reasons     []string `json:"reasons"`
	LastPoint   string   `json:"last_point"`
	TargetPoint string   `json:"target_point"`
	BytesSent   int64    `json:"bytes_sent"`
	LastBytes   int64    `json:"last_bytes"`
	LastBase    bool     `json:"last_base"`
	Forwards    int      `json:"forwards"`
	FailedOver  bool     `json:"failed_over"`
	Relay       string   `json:"relay"`
	Staged      string   `json:"staged"`
}

type forwardNowJSON struct {
	Group       string `json:"group"`
	To          string `json:"to"`
	Point       string `json:"point"`
	TargetPoint string `json:"target_point"`
	Bytes       int64  `json:"bytes"`
	Base        bool   `json:"base"`
	UpToDate    bool   `json:"up_to_date"`
	Error       string `json:"error"`
}

func forwardList(t *testing.T, rstore string) []forwardStatusJSON {
	t.Helper()
	r := mustStandin(t, "replicate", "extend", "list", "--store", rstore, "--json")
	var out []forwardStatusJSON
	if err := json.Unmarshal([]byte(r.Stdout), &out); err != nil {
		t.Fatalf("replicate extend list --json: %v\n%s", err, r.Stdout)
	}
	return out
}

func TestExtendedReplication(t *testing.T) {
	requireRoot(t)
	start := time.Now()
	const size = 64 << 20
	ab, base, hs := twoHosts(t, size, 15, "a", "b", "c")
	a, b, c := hs[0], hs[1], hs[2]
	names := ab.Names
	ab.now()

	// B forwards to C, paired with a token of C's replica store.
	r := mustStandin(t, "pair", "token", "--store", c.RStore, "--images", "vm1/*", "--json")
	var tok map[string]string
	if err := json.Unmarshal([]byte(r.Stdout), &tok); err != nil || tok["token"] == "" {
		t.Fatalf("pair token --json: %v: %s", err, r.Stdout)
	}
	if r := standin(cmdTimeout, "replicate", "extend", "--store", b.RStore, "--group", "vm1", "--to", c.Rep.Addr, "--token", tok["token"], "--interval", "10s"); r.Code != 2 {
		t.Errorf("an interval shorter than the first hop's: exit %d, want 2: %s", r.Code, r)
	}
	mustStandin(t, "replicate", "extend", "--store", b.RStore, "--group", "vm1", "--to", c.Rep.Addr, "--token", tok["token"],
		"--interval", "1h", "--any-point-window", "1h")
	sent := func() int64 {
		t.Helper()
		for _, f := range forwardList(t, b.RStore) {
			if f.Group == "vm1" && f.To == c.Rep.Addr {
				return f.BytesSent
			}
		}
		t.Fatal("replicate extend list has no forward of vm1")
		return 0
	}
	extendNow := func() forwardNowJSON {
		t.Helper()
		r := mustStandin(t, "replicate", "extend", "now", "--store", b.RStore, "--group", "vm1", "--wait", "--timeout", "90s", "--json")
		var out []forwardNowJSON
		if err := json.Unmarshal([]byte(r.Stdout), &out); err != nil || len(out) != 1 || out[0].Error != "" {
			t.Fatalf("replicate extend now: %v %s", err, r)
		}
		return out[0]
	}
	checkC := func(what string) {
		t.Helper()
		want := b3File(t, a.image("disk.img"))
		if got := exportHashes(t, c.RStore, "vm1", "latest")["disk.img"]; got != want {
			t.Fatalf("%s: C's latest point %.16s, A's image %.16s", what, got, want)
		}
	}

	// 1. The first forward is the whole image (a base): enabling forwards at once.
	fw := extendNow()
	checkC("first forward")
	s0 := sent()
	t.Logf("first forward (base of a new group on C): %d bytes sent for a %d-byte image (%d allocated)", s0, size, allocatedBytes(t, a.image("disk.img")))

	// 2. One cycle, one forward: a delta.
	w := ab.writeRandom("disk.img", 40, 8, 0, size)
	ab.now()
	fw = extendNow()
	checkC("delta")
	if fw.Base || fw.UpToDate {
		t.Errorf("forward after one cycle: %+v, want a delta", fw)
	}
	s1 := sent()
	if d := s1 - s0; d > int64(len(w))*blockSize*11/10+64<<10 {
		t.Errorf("delta forward sent %d bytes for %d blocks written", d, len(w))
	}

	// 3. Two cycles, one forward: one merged delta per image.
	w = ab.writeRandom("disk.img", 40, 8, 0, size)
	ab.now()
	mergeBlocks(w, ab.writeRandom("disk.img", 40, 8, 0, size))
	ab.now()
	fw = extendNow()
	checkC("merged delta")
	s2 := sent()
	if fw.Base || s2-s1 > int64(len(w))*blockSize*11/10+64<<10 {
		t.Errorf("merged forward of two cycles (%+v) sent %d bytes for %d distinct blocks (%d bytes)", fw, s2-s1, len(w), len(w)*blockSize)
	} else {
		t.Logf("merged delta of two cycles: %d bytes sent for %d distinct blocks (%d bytes)", s2-s1, len(w), len(w)*blockSize)
	}
	if ps := listPoints(t, c.RStore, "vm1"); len(ps) != 3 {
		t.Errorf("C has points %v, want 3 (one per forward)", pointIDs(ps))
	}
	if fw2 := extendNow(); !fw2.UpToDate || fw2.Bytes != 0 {
		t.Errorf("forward without a new point: %+v", fw2)
	}

	// C is down: the cut stays staged on B; B's replica daemon is killed
	// (-9) meanwhile; once both are back the staged cut is shipped and
	// recorded.
	c.Rep.Stop()
	w = ab.writeRandom("disk.img", 20, 8, 0, size)
	ab.now()
	if r := standin(cmdTimeout, "replicate", "extend", "now", "--store", b.RStore, "--group", "vm1", "--wait"); r.Code == 0 {
		t.Errorf("extend now with C down succeeded: %s", r)
	}
	if fl := forwardList(t, b.RStore); len(fl) != 1 || fl[0].Staged == "" || fl[0].Health == "Normal" {
		t.Errorf("replicate extend list with C down: %+v", fl)
	}
	b.Rep.Kill()
	b.Rep.Restart()
	c.Rep.Restart()
	fw = extendNow() // the daemon's first round after the restart may have shipped it already
	checkC("staged cut shipped after the restarts")
	if s := sent(); fw.Base || s-s2 > int64(len(w))*blockSize*11/10+64<<10 {
		t.Errorf("forward of the staged cut (%+v) sent %d bytes for %d blocks written", fw, s-s2, len(w))
	} else {
		s2 = s
	}
	histC := history(t, c.RStore, "vm1")

	// 4. Planned failover to B: B is the primary, its forward waits.
	failoverCmd(t, "planned", "--store", a.PStore, "--replica-store", a.RStore, "--group", "vm1")
	fl := forwardList(t, b.RStore)
	if len(fl) != 1 || !fl[0].FailedOver || !strings.Contains(strings.Join(fl[0].Reasons, " "), "failed over to this host") {
		t.Errorf("replicate extend list while B is the primary: %+v", fl)
	}
	if r := standin(cmdTimeout, "replicate", "extend", "now", "--store", b.RStore, "--group", "vm1", "--wait"); r.Code == 0 || !strings.Contains(r.Stderr, "failed over") {
		t.Errorf("extend now while failed over: %s", r)
	}
	ba := b.env(t, "vm1", names, a.Rep, base)
	ba.writeRandom("disk.img", 60, 8, 0, size)
	ba.now()

	// The chain follows the failover at the middle host: A, now B's replica,
	// forwards to C as well (set up on both hosts, whichever is the replica
	// forwards). Its first forward is a base thinned against C's copy.
	r = mustStandin(t, "pair", "token", "--store", c.RStore, "--images", "vm1/*", "--json")
	var tok2 map[string]string
	if err := json.Unmarshal([]byte(r.Stdout), &tok2); err != nil || tok2["token"] == "" {
		t.Fatalf("pair token --json: %v: %s", err, r.Stdout)
	}
	mustStandin(t, "replicate", "extend", "--store", a.RStore, "--group", "vm1", "--to", c.Rep.Addr, "--token", tok2["token"],
		"--interval", "1h", "--any-point-window", "1h")
	r = mustStandin(t, "replicate", "extend", "now", "--store", a.RStore, "--group", "vm1", "--wait", "--timeout", "90s", "--json")
	var fa []forwardNowJSON
	if err := json.Unmarshal([]byte(r.Stdout), &fa); err != nil || len(fa) != 1 || fa[0].Error != "" {
		t.Fatalf("replicate extend now on A: %v %s", err, r)
	}
	if got, want := exportHashes(t, c.RStore, "vm1", "latest")["disk.img"], b3File(t, b.image("disk.img")); got != want {
		t.Fatalf("C after A forwarded the new primary's data: %.16s, B has %.16s", got, want)
	}
	// (enabling forwards at once, so 'now' may find it done)
	if fl := forwardList(t, a.RStore); len(fl) != 1 || !fl[0].LastBase || fl[0].BytesSent > size/4 {
		t.Errorf("A's first forward (%+v): want a thinned base of at most 25%% of the image", fl)
	} else {
		t.Logf("A's first forward after the failover at the middle host (thinned base): %d bytes", fl[0].BytesSent)
	}
	ba.writeRandom("disk.img", 20, 4, 0, size)

	// 5. Planned failover back to A: B is a replica again and forwards again.
	// The generation changed twice, so the forward is a base, thinned
	// against what C holds.
	failoverCmd(t, "planned", "--store", b.PStore, "--replica-store", b.RStore, "--group", "vm1")
	if fl := forwardList(t, a.RStore); len(fl) != 1 || !fl[0].FailedOver {
		t.Errorf("A's forward while A is the primary again: %+v", fl)
	}
	fw = extendNow()
	checkC("after failing over and back")
	s3 := sent()
	if !fw.Base || s3-s2 > size/4 {
		t.Errorf("forward after the failovers (%+v) sent %d bytes, want a base of at most 25%% of the %d-byte image", fw, s3-s2, size)
	} else {
		t.Logf("forward after failing over and back (thinned base): %d bytes sent for a %d-byte image", s3-s2, size)
	}
	verifyPoint(t, c.RStore, "vm1", "latest")
	checkHistory(t, c.RStore, "vm1", histC, "C's older points after the base")

	// 6. A replicates to B again, B forwards deltas again.
	ab.Pri = a.Pri
	w = ab.writeRandom("disk.img", 30, 8, 0, size)
	ab.now()
	fw = extendNow()
	checkC("delta after the round trip")
	if s4 := sent(); fw.Base || s4-s3 > int64(len(w))*blockSize*11/10+64<<10 {
		t.Errorf("forward after the round trip (%+v) sent %d bytes for %d blocks written", fw, s4-s3, len(w))
	}

	// 7. Disable: the pin and the relay directory go.
	relay := forwardList(t, b.RStore)[0].Relay
	mustStandin(t, "replicate", "extend", "disable", "--store", b.RStore, "--group", "vm1", "--to", c.Rep.Addr)
	if _, err := os.Stat(relay); !os.IsNotExist(err) {
		t.Errorf("relay directory %s after disable: %v", relay, err)
	}
	if r := mustStandin(t, "points", "pins", "--store", b.RStore, "--json"); strings.Contains(r.Stdout, "forward") {
		t.Errorf("forward pins left after disable: %s", r.Stdout)
	}
	if fl := forwardList(t, b.RStore); len(fl) != 0 {
		t.Errorf("forwards after disable: %+v", fl)
	}
	t.Logf("took %s", time.Since(start).Round(time.Millisecond))
}
