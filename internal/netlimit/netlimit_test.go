package netlimit

import (
	"net"
	"testing"
	"time"
)

// The listener admits at most MaxConnsPerIP connections per remote address
// (more are closed at once), at most MaxConns in all (more wait), and its
// per-address table is empty again when the connections are closed.
func TestListenerLimits(t *testing.T) {
	tcp, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := Limits{MaxConns: 6, MaxConnsPerIP: 4}.Listener(tcp)
	defer l.Close()
	accepted := make(chan net.Conn, 100)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				close(accepted)
				return
			}
			accepted <- c
		}
	}()
	dial := func(ip string, n int) []net.Conn {
		var out []net.Conn
		d := &net.Dialer{Timeout: time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}}
		for i := 0; i < n; i++ {
			if c, err := d.Dial("tcp", tcp.Addr().String()); err == nil {
				out = append(out, c)
			}
		}
		return out
	}
	var clients []net.Conn
	defer func() {
		for _, c := range clients {
			c.Close()
		}
	}()
	clients = append(clients, dial("127.0.0.2", 10)...)
	var served []net.Conn
	wait := func(n int) {
		t.Helper()
		deadline := time.After(3 * time.Second)
		for len(served) < n {
			select {
			case c := <-accepted:
				served = append(served, c)
			case <-deadline:
				t.Fatalf("%d connections served, want %d", len(served), n)
			}
		}
	}
	wait(4)
	time.Sleep(100 * time.Millisecond)
	if open, addrs := l.Open(); open != 4 || addrs != 1 {
		t.Fatalf("open %d from %d addresses, want 4 from 1", open, addrs)
	}
	if l.Refused() < 6 {
		t.Fatalf("%d refused, want the 6 over the per-address limit", l.Refused())
	}
	// Another address gets the 2 slots left of MaxConns; a third waits.
	clients = append(clients, dial("127.0.0.3", 3)...)
	wait(6)
	select {
	case <-accepted:
		t.Fatalf("a 7th connection was served with MaxConns 6")
	case <-time.After(200 * time.Millisecond):
	}
	served[0].Close()
	wait(7) // the waiting one gets the freed slot
	for _, c := range served {
		c.Close()
	}
	if open, addrs := l.Open(); open != 0 || addrs != 0 {
		t.Fatalf("after closing: open %d from %d addresses, want an empty table", open, addrs)
	}
}
