package integration

// Resource limits of the replica daemon against the real binary: clients
// without credentials cannot exhaust its file descriptors (a paired primary
// keeps replicating), slow clients are cut, and per-primary quotas refuse
// one tenant over its quota while another keeps replicating.

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

func openFDs(pid int) int {
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	return len(ents)
}

func TestReplLimits(t *testing.T) {
	requireTools(t, "prlimit")
	e := newReplEnv(t, "vmL", imgSpec{"a.img", 8 * mib})
	e.start("--interval", "5m")
	pid := e.Rep.cmd.Process.Pid
	// The replica runs with 256 file descriptors, like a small container.
	mustRun(t, cmdTimeout, "prlimit", "--pid", strconv.Itoa(pid), "--nofile=256:256")

	t.Run("idle connections", func(t *testing.T) {
		// 240 clients without certificates from another address: each is
		// refused 401 and keeps its connection; 20 more never speak.
		d := &net.Dialer{Timeout: 2 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.2")}}
		var conns []net.Conn
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		refused := 0
		for i := 0; i < 260; i++ {
			c, err := d.Dial("tcp", e.Rep.Addr)
			if err != nil {
				refused++
				continue
			}
			conns = append(conns, c)
			if i >= 240 {
				continue
			}
			tc := tls.Client(c, &tls.Config{InsecureSkipVerify: true})
			tc.SetDeadline(time.Now().Add(2 * time.Second))
			fmt.Fprintf(tc, "GET /v1/groups/vmL HTTP/1.1\r\nHost: x\r\n\r\n")
			buf := make([]byte, 512)
			tc.Read(buf) // the 401
			tc.SetDeadline(time.Time{})
		}
		t.Logf("%d connections made (%d refused at connect); replica holds %d fds", len(conns), refused, openFDs(pid))
		e.writeRandom("a.img", 20, 8, 0, 8*mib)
		start := time.Now()
		r := standin(time.Minute, "replicate", "now", "--store", e.PStore, "--group", e.Group, "--wait", "--timeout", "20s")
		if r.Code != 0 {
			t.Fatalf("replicate now with 260 idle connections on the replica (256 fds): %s\nreplica fds: %d", r, openFDs(pid))
		}
		t.Logf("replicated in %v with the idle connections around; replica holds %d fds", time.Since(start).Round(time.Millisecond), openFDs(pid))
		e.checkPoint("latest", e.frozen(), "after the idle-connection flood")
		if n := openFDs(pid); n > 200 {
			t.Errorf("replica holds %d fds with the idle clients connected", n)
		}
	})

	t.Run("slow clients", func(t *testing.T) {
		e.Rep.Stop()
		e.Rep.Args = append(e.Rep.Args, "--header-timeout", "2s", "--body-timeout", "2s", "--max-conns-per-ip", "8")
		e.Rep.Restart()
		c, err := tls.Dial("tcp", e.Rep.Addr, &tls.Config{InsecureSkipVerify: true})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		start := time.Now()
		fmt.Fprintf(c, "GET /v1/groups/vmL HTTP/1.1\r\nHost: x\r\nX-Slow: ") // headers never finished
		c.SetReadDeadline(time.Now().Add(6 * time.Second))
		buf := make([]byte, 512)
		for {
			if _, err := c.Read(buf); err != nil {
				if ne, ok := err.(net.Error); ok && ne.Timeout() {
					t.Fatalf("unfinished headers: connection still open after 6 s (--header-timeout 2s)")
				}
				break
			}
		}
		t.Logf("unfinished headers cut after %v", time.Since(start).Round(10*time.Millisecond))
		e.writeRandom("a.img", 20, 8, 0, 8*mib)
		e.now()
		e.checkPoint("latest", e.frozen(), "after the slow clients")
	})
}

// replicaStatusJSON is the part of 'standin status --json' on a replica the
// quota test reads.
type replicaStatusJSON struct {
	Groups []struct {
		Group   string   `json:"group"`
		Health  string   `json:"health"`
		Reasons []string `json:"reasons"`
	} `json:"groups"`
	Usage []struct {
		Name  string `json:"name"`
		Usage struct {
			Held int64 `json:"held"`
		} `json:"usage"`
		Groups []string `json:"groups"`
	} `json:"usage"`
}

func TestReplQuota(t *testing.T) {
	e := newReplEnv(t, "vmA", imgSpec{"a.img", 8 * mib})
	// Tenant A: a held quota smaller than its base.
	r := mustStandin(t, "pair", "token", "--store", e.RStore, "--images", "vmA/*", "--quota-held", "2M", "--json")
	var tok map[string]string
	if err := json.Unmarshal([]byte(r.Stdout), &tok); err != nil {
		t.Fatal(err)
	}
	mustStandin(t, "pair", "join", "--store", e.PStore, "--token", tok["token"], "--replica", e.Rep.Addr, "--name", "tenant-a")
	e.enable(e.Rep.Addr, "--interval", "5m")

	// Tenant B: a second primary host (own store and mount), no quota.
	b := e.otherHost(e.dir, filepath.Join(e.dir, "pstoreB"), filepath.Join(e.dir, "mntB"), "vmB", e.rng, imgSpec{"b.img", 8 * mib})
	b.pair("vmB/*", e.Rep.Addr)
	b.enable(e.Rep.Addr, "--interval", "5m")

	// A is refused with the reason; B replicates.
	ra := standin(time.Minute, "replicate", "now", "--store", e.PStore, "--group", "vmA", "--wait", "--timeout", "30s")
	t.Logf("A over quota: exit %d: %s", ra.Code, strings.TrimSpace(ra.Stderr))
	if ra.Code == 0 {
		t.Fatalf("tenant A replicated 8 MiB with a 2 MiB quota")
	}
	b.now()
	b.checkPoint("latest", b.frozen(), "tenant B while A is over quota")
	sa := e.status()
	if sa.Health != "Critical" || !strings.Contains(strings.Join(sa.Reasons, ";"), "quota") || !strings.Contains(sa.LastError, "2.0 MiB") {
		t.Fatalf("tenant A's group: health %s, reasons %q, last error %q; want Critical naming the quota", sa.Health, sa.Reasons, sa.LastError)
	}
	if sb := b.status(); sb.Health != "Normal" {
		t.Fatalf("tenant B's group: %s %q", sb.Health, sb.Reasons)
	}
	var rs replicaStatusJSON
	if err := json.Unmarshal([]byte(mustStandin(t, "status", "--store", e.RStore, "--json").Stdout), &rs); err != nil {
		t.Fatal(err)
	}
	healthOf := map[string]string{}
	for _, g := range rs.Groups {
		healthOf[g.Group] = g.Health + " " + strings.Join(g.Reasons, ";")
	}
	if !strings.HasPrefix(healthOf["vmA"], "Critical") || !strings.Contains(healthOf["vmA"], "quota") || !strings.HasPrefix(healthOf["vmB"], "Normal") {
		t.Fatalf("replica status: %v", healthOf)
	}
	if len(rs.Usage) != 2 {
		t.Fatalf("replica status usage: %+v", rs.Usage)
	}
	t.Logf("replica status:\n%s", mustStandin(t, "status", "--store", e.RStore).Stdout)

	// The administrator raises A's quota: A replicates and is Normal again.
	mustStandin(t, "pair", "quota", "--store", e.RStore, "--held", "1G", "tenant-a")
	e.now()
	e.checkPoint("latest", e.frozen(), "tenant A after its quota was raised")
	if sa := e.status(); sa.Health != "Normal" {
		t.Fatalf("tenant A after the quota was raised: %s %q", sa.Health, sa.Reasons)
	}
}
