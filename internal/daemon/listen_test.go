package daemon

import (
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// The metrics listener cuts a client that never finishes its request and
// closes connections over its per-address limit.
func TestMetricsListenerLimits(t *testing.T) {
	old := metricsLimits
	metricsLimits.HeaderTimeout = time.Second
	t.Cleanup(func() { metricsLimits = old })
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
	for i := 0; i < 10; i++ {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			continue
		}
		conns = append(conns, c)
		fmt.Fprintf(c, "GET /metrics HTTP/1.1\r\nHost: x\r\n") // never finished
	}
	start := time.Now()
	closed := 0
	buf := make([]byte, 1024)
	for _, c := range conns {
		c.SetReadDeadline(time.Now().Add(4 * time.Second))
		for {
			_, err := c.Read(buf)
			if err == nil {
				continue
			}
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				t.Fatalf("a metrics connection with unfinished headers is still open after %v", time.Since(start))
			}
			closed++
			break
		}
	}
	t.Logf("%d slow connections closed within %v", closed, time.Since(start).Round(10*time.Millisecond))
}
