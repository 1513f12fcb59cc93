package daemon

import (
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// The metrics listener closes connections over its per-address limit at
// once, and cuts a client that never finishes its request after the header
// timeout.
func TestMetricsListenerLimits(t *testing.T) {
	old := metricsLimits
	const headerTimeout = 3 * time.Second
	metricsLimits.HeaderTimeout = headerTimeout
	t.Cleanup(func() { metricsLimits = old })
	perIP := metricsLimits.MaxConnsPerIP
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	stop, err := serveMetrics(addr, prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	const n = 10
	start := time.Now()
	refusedAtDial := 0
	for i := 0; i < n; i++ {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			refusedAtDial++ // closed by the server before the dial returned
			continue
		}
		conns = append(conns, c)
		fmt.Fprintf(c, "GET /metrics HTTP/1.1\r\nHost: x\r\n") // never finished
	}
	// Each connection is read until the server closes it; when it did.
	closedAfter := make([]time.Duration, len(conns))
	var wg sync.WaitGroup
	for i, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.SetReadDeadline(start.Add(headerTimeout + 3*time.Second))
			buf := make([]byte, 1024)
			for {
				_, err := c.Read(buf)
				if err == nil {
					continue
				}
				if ne, ok := err.(net.Error); ok && ne.Timeout() {
					closedAfter[i] = -1
				} else {
					closedAfter[i] = time.Since(start)
				}
				return
			}
		}()
	}
	wg.Wait()
	early, late := refusedAtDial, 0
	for _, d := range closedAfter {
		switch {
		case d < 0:
			t.Fatalf("a metrics connection with unfinished headers is still open after %v (header timeout %v)", headerTimeout+3*time.Second, headerTimeout)
		case d < headerTimeout/2:
			early++
		default:
			late++
		}
	}
	// The connections over the per-address limit are closed at once, the
	// others when the header timeout expires.
	if early != n-perIP || late != perIP {
		t.Fatalf("of %d connections from one address %d were closed at once and %d after the header timeout (%v), want %d and %d (per-address limit %d): %v",
			n, early, late, headerTimeout, n-perIP, perIP, perIP, closedAfter)
	}
	t.Logf("%d connections over the limit closed at once, %d slow ones after the header timeout: %v", early, late, closedAfter)
}
