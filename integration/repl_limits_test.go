package integration

// Resource limits of the replica daemon against the real binary: clients
// without credentials cannot exhaust its file descriptors (a paired primary
// keeps replicating), slow clients are cut, and per-primary quotas refuse
// one tenant over its quota while another keeps replicating.

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
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
	// The replica starts with 256 file descriptors, like a small container:
	// it serves at most 128 connections at once (half the limit, read at
	// start), whatever --max-conns says.
	e.Rep.Stop()
	e.Rep.NoFile = 256
	e.Rep.Restart()
	if out := e.Rep.out.String(); !strings.Contains(out, "connection limit lowered") || !strings.Contains(out, "max_conns=128") {
		t.Fatalf("replica started with 256 file descriptors did not lower its connection limit to 128:\n%s", out)
	}
	e.start("--interval", "5m")
	pid := e.Rep.cmd.Process.Pid
	dialFrom := func(ip string) *net.Dialer {
		return &net.Dialer{Timeout: 2 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}}
	}

	t.Run("one address", func(t *testing.T) {
		// 260 clients without certificates from one other address: 240 are
		// refused 401, 20 never speak; the per-address limit (64) keeps the
		// paired primary's slots free.
		d := dialFrom("127.0.0.2")
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
			t.Fatalf("replicate now with 260 connections from one address on the replica (256 fds): %s\nreplica fds: %d", r, openFDs(pid))
		}
		t.Logf("replicated in %v with the connections around; replica holds %d fds", time.Since(start).Round(time.Millisecond), openFDs(pid))
		e.checkPoint("latest", e.frozen(), "after the one-address flood")
		if n := openFDs(pid); n > 200 {
			t.Errorf("replica holds %d fds with the idle clients connected", n)
		}
	})

	t.Run("many addresses", func(t *testing.T) {
		// 300 silent clients from 5 addresses, 60 each (under the
		// per-address limit): the replica holds at most 128 of them, the
		// others wait to be accepted, and its store keeps descriptors.
		base := 1 << 30 // fds of the replica once the last flood's connections are gone
		waitFor(time.Second, 100*time.Millisecond, func() bool {
			base = min(base, openFDs(pid))
			return false
		})
		var conns []net.Conn
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		for a := 3; a <= 7; a++ {
			d := dialFrom(fmt.Sprintf("127.0.0.%d", a))
			for i := 0; i < 60; i++ {
				c, err := d.Dial("tcp", e.Rep.Addr)
				if err != nil {
					t.Fatalf("connection %d from 127.0.0.%d: %v", i, a, err)
				}
				conns = append(conns, c)
			}
		}
		peak := 0
		waitFor(3*time.Second, 100*time.Millisecond, func() bool {
			peak = max(peak, openFDs(pid))
			return false
		})
		t.Logf("replica holds %d fds (%d before) with %d silent connections", peak, base, len(conns))
		if peak > base+128+16 || peak >= 256 {
			t.Fatalf("replica holds %d fds with %d connections waiting (%d before, connection cap 128, limit 256)", peak, len(conns), base)
		}
		if peak < base+100 {
			t.Fatalf("replica holds only %d fds (%d before): the flood did not reach the connection cap, so it was not tested", peak, base)
		}
		// The store still opens its files: verify the latest point now.
		verifyPoint(t, e.RStore, e.Group, "latest")
		for _, c := range conns {
			c.Close()
		}
		conns = nil
		e.writeRandom("a.img", 20, 8, 0, 8*mib)
		e.now()
		e.checkPoint("latest", e.frozen(), "after the many-address flood")
	})

	t.Run("slow clients", func(t *testing.T) {
		e.Rep.Stop()
		e.Rep.Args = append(e.Rep.Args, "--header-timeout", "2s", "--body-timeout", "2s", "--max-conns-per-ip", "8")
		e.Rep.Restart()
		// closedWithin: c is closed by the replica within d (read concurrently).
		closedWithin := func(c net.Conn, d time.Duration) <-chan bool {
			ch := make(chan bool, 1)
			go func() {
				c.SetReadDeadline(time.Now().Add(d))
				buf := make([]byte, 512)
				for {
					if _, err := c.Read(buf); err != nil {
						ne, ok := err.(net.Error)
						ch <- !ok || !ne.Timeout()
						return
					}
				}
			}()
			return ch
		}

		// --header-timeout 2s: unfinished headers are cut.
		c, err := tls.Dial("tcp", e.Rep.Addr, &tls.Config{InsecureSkipVerify: true})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		start := time.Now()
		fmt.Fprintf(c, "GET /v1/groups/vmL HTTP/1.1\r\nHost: x\r\nX-Slow: ") // headers never finished
		if !<-closedWithin(c, 6*time.Second) {
			t.Fatalf("unfinished headers: connection still open after 6 s (--header-timeout 2s)")
		}
		t.Logf("unfinished headers cut after %v", time.Since(start).Round(10*time.Millisecond))

		// --body-timeout 2s: a stalled body of the paired primary is refused.
		tc := primaryClient(t, e.PStore).Transport.(*http.Transport).TLSClientConfig
		bc, err := tls.Dial("tcp", e.Rep.Addr, tc)
		if err != nil {
			t.Fatal(err)
		}
		defer bc.Close()
		id := mustImage(t, getStatus(t, e.PStore, false), "a.img").ID
		start = time.Now()
		fmt.Fprintf(bc, "POST /v1/groups/vmL/images/%s/held?blocks=%d&name=a.img HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n", id, 8*mib/blockSize, 1<<20)
		bc.Write(make([]byte, 1000)) // then nothing
		bc.SetReadDeadline(time.Now().Add(6 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(bc), nil)
		if err != nil {
			t.Fatalf("stalled body: no answer after %v (--body-timeout 2s): %v", time.Since(start).Round(10*time.Millisecond), err)
		}
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode == http.StatusOK || !strings.Contains(string(b), "too slow") {
			t.Fatalf("stalled body: %d %s, want a refusal saying the body is too slow", resp.StatusCode, b)
		}
		t.Logf("stalled body refused after %v: %d %s", time.Since(start).Round(10*time.Millisecond), resp.StatusCode, strings.TrimSpace(string(b)))

		// --max-conns-per-ip 8: of 12 silent connections from one address,
		// 4 are closed at once (the others only at the header timeout).
		d := dialFrom("127.0.0.8")
		var closedNow []<-chan bool
		refusedAtDial := 0
		for i := 0; i < 12; i++ {
			c, err := d.Dial("tcp", e.Rep.Addr)
			if err != nil {
				refusedAtDial++
				continue
			}
			defer c.Close()
			closedNow = append(closedNow, closedWithin(c, time.Second))
		}
		n := refusedAtDial
		for _, ch := range closedNow {
			if <-ch {
				n++
			}
		}
		if n != 4 {
			t.Fatalf("%d of 12 connections from one address closed within 1 s, want 4 (--max-conns-per-ip 8)", n)
		}

		e.writeRandom("a.img", 20, 8, 0, 8*mib)
		e.now()
		e.checkPoint("latest", e.frozen(), "after the slow clients")
	})
}

func TestReplQuota(t *testing.T) {
	e := newReplEnv(t, "vmA", imgSpec{"a.img", 8 * mib})
	// Tenant A: a held quota smaller than its base.
	e.pair("vmA/*", e.Rep.Addr, "--quota-held", "2M")
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
	rs := getReplicaStatus(t, e.RStore)
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
	mustStandin(t, "pair", "quota", "--store", e.RStore, "--held", "1G", "pri-"+e.Group)
	e.now()
	e.checkPoint("latest", e.frozen(), "tenant A after its quota was raised")
	if sa := e.status(); sa.Health != "Normal" {
		t.Fatalf("tenant A after the quota was raised: %s %q", sa.Health, sa.Reasons)
	}
}
