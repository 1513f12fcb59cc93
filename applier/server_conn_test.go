package applier

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/standin/standin/internal/netlimit"
	"github.com/standin/standin/internal/wire"
)

// limitedServe serves the API like the replica daemon does (netlimit
// listener and server, body-progress and response deadlines).
func limitedServe(lim netlimit.Limits, out **netlimit.Listener) func(s *Server, ln net.Listener) *http.Server {
	return func(s *Server, ln net.Listener) *http.Server {
		l := lim.Listener(ln)
		*out = l
		s.BodyTimeout, s.WriteTimeout = lim.BodyTimeout, lim.WriteTimeout
		hs := lim.Server(s.Handler())
		hs.TLSConfig = s.auth.ServerTLS()
		hs.ErrorLog = log.New(io.Discard, "", 0)
		go hs.ServeTLS(l, "", "")
		return hs
	}
}

var testLimits = netlimit.Limits{MaxConns: 40, MaxConnsPerIP: 8, HeaderTimeout: time.Second, IdleTimeout: 2 * time.Second,
	BodyTimeout: time.Second, WriteTimeout: 5 * time.Second}

// from dials addr from another loopback address (127.0.0.2), as a second host.
func from(ip string) *net.Dialer {
	return &net.Dialer{Timeout: 2 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}}
}

// expectClosed waits for the server to close c (EOF or reset) within d.
func expectClosed(t *testing.T, c net.Conn, d time.Duration, what string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(d))
	buf := make([]byte, 4096)
	for {
		_, err := c.Read(buf)
		if err == nil {
			continue // an answer (e.g. 408/400) before the close
		}
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			t.Fatalf("%s: connection still open after %v", what, d)
		}
		return
	}
}

// Many idle connections from one address — TCP that never speaks, TLS that
// never sends a request, clients refused 401 that stay — neither exhaust
// the replica nor keep a paired primary on another address out.
func TestIdleConnectionsDoNotStarve(t *testing.T) {
	t.Parallel()
	var ln *netlimit.Listener
	e := newSrvEnv(t, limitedServe(testLimits, &ln))
	hc, _ := e.pair("prim")
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	d := from("127.0.0.2")
	for i := 0; i < 60; i++ { // more than MaxConns in total
		c, err := d.Dial("tcp", e.addr)
		if err != nil {
			continue // refused at once (reset): over the per-address limit
		}
		conns = append(conns, c)
		switch i % 3 {
		case 1: // TLS, then nothing
			tc := tls.Client(c, &tls.Config{InsecureSkipVerify: true})
			tc.SetDeadline(time.Now().Add(300 * time.Millisecond))
			tc.Handshake()
		case 2: // a refused request, then idle
			tc := tls.Client(c, &tls.Config{InsecureSkipVerify: true})
			tc.SetDeadline(time.Now().Add(300 * time.Millisecond))
			fmt.Fprintf(tc, "GET %s/groups/vm1 HTTP/1.1\r\nHost: x\r\n\r\n", wire.Prefix)
		}
	}
	if open, _ := ln.Open(); open > testLimits.MaxConnsPerIP {
		t.Fatalf("%d connections open from one address, limit %d", open, testLimits.MaxConnsPerIP)
	}
	if ln.Refused() == 0 {
		t.Fatalf("no connection refused for the per-address limit")
	}
	// The primary replicates meanwhile.
	ti := newTImage(0x71, "a.img")
	start := time.Now()
	for i := 0; i < 3; i++ {
		p, next := e.cycle(ti)
		if code, we := e.ship(hc, "vm1", p, next); code != http.StatusOK {
			t.Fatalf("cycle %d with 60 idle connections around: %d %+v", i, code, we)
		}
		ti = next
	}
	t.Logf("3 cycles shipped in %v with idle connections open", time.Since(start))
	// The idle ones are gone after the header timeout.
	deadline := time.Now().Add(5 * time.Second)
	for {
		hc.CloseIdleConnections()
		open, _ := ln.Open()
		if open == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d connections still open 5 s after the last request (header timeout 1 s, idle 2 s)", open)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Slow clients are cut: headers never finished (after HeaderTimeout), a
// request body that stalls (after BodyTimeout without 64 KiB). A body that
// keeps coming, even for longer than BodyTimeout, is not cut.
func TestSlowClientsCut(t *testing.T) {
	t.Parallel()
	var ln *netlimit.Listener
	e := newSrvEnv(t, limitedServe(testLimits, &ln))
	hc, _ := e.pair("prim")
	cfg := hc.Transport.(*http.Transport).TLSClientConfig

	t.Run("headers", func(t *testing.T) {
		c, err := tls.Dial("tcp", e.addr, cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		start := time.Now()
		fmt.Fprintf(c, "GET %s/groups/vm1 HTTP/1.1\r\nHost: x\r\n", wire.Prefix) // no end of headers
		expectClosed(t, c, 4*time.Second, "unfinished headers")
		t.Logf("unfinished headers cut after %v", time.Since(start).Round(10*time.Millisecond))
	})
	t.Run("handshake", func(t *testing.T) {
		c, err := net.Dial("tcp", e.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write([]byte{0x16, 0x03, 0x01}) // the start of a ClientHello
		expectClosed(t, c, 4*time.Second, "unfinished TLS handshake")
	})
	ti := newTImage(0x72, "a.img")
	t.Run("stalled body", func(t *testing.T) {
		c, err := tls.Dial("tcp", e.addr, cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		start := time.Now()
		fmt.Fprintf(c, "PUT %s%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n", wire.Prefix, uploadPath("vm1", ti, 0, 1<<20), 1<<20)
		c.Write(make([]byte, 1000))
		c.SetReadDeadline(time.Now().Add(4 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				t.Fatalf("stalled body: no answer after 4 s (body timeout 1 s)")
			}
			t.Logf("stalled body: connection ended after %v: %v", time.Since(start), err)
			return
		}
		b, _ := io.ReadAll(resp.Body)
		t.Logf("stalled body: %d %s after %v", resp.StatusCode, strings.TrimSpace(string(b)), time.Since(start).Round(10*time.Millisecond))
		if resp.StatusCode == http.StatusOK || !strings.Contains(string(b), "too slow") {
			t.Fatalf("stalled body: %d %s, want a refusal saying the body is too slow", resp.StatusCode, b)
		}
	})
	t.Run("slow but moving body", func(t *testing.T) {
		ti := newTImage(0x73, "a.img")
		// 640 KiB at ~200 KiB/s: 3 s in all, three times the body timeout.
		// The upload is partial (total 1 MiB), so it is kept, not verified.
		const n = 640 << 10
		body := &throttled{left: n, chunk: 20 << 10, every: 100 * time.Millisecond}
		start := time.Now()
		resp, we := e.do(hc, "PUT", uploadPath("vm1", ti, 0, 1<<20), body, n)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("slow upload cut after %v: %d %+v", time.Since(start), resp.StatusCode, we)
		}
		if el := time.Since(start); el < 2*testLimits.BodyTimeout {
			t.Fatalf("slow upload took only %v; the test needs it to outlast the body timeout", el)
		}
		st, we := e.do(hc, "GET", fmt.Sprintf("/groups/vm1/uploads/%s/%d/%d", ti.idString(), ti.gen, ti.seq), nil, -1)
		if st.StatusCode != http.StatusOK {
			t.Fatalf("upload state: %d %+v", st.StatusCode, we)
		}
	})
}

// throttled yields left bytes, chunk bytes per every.
type throttled struct {
	left, chunk int
	every       time.Duration
	sent        bool
}

func (r *throttled) Read(p []byte) (int, error) {
	if r.left == 0 {
		return 0, io.EOF
	}
	if r.sent {
		time.Sleep(r.every)
	}
	r.sent = true
	n := min(len(p), r.chunk, r.left)
	clear(p[:n])
	r.left -= n
	return n, nil
}
