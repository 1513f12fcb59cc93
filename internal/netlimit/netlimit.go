// Package netlimit bounds what a network listener lets clients hold: the
// number of open connections (in total and per remote IP address) and how
// long a connection may sit idle or trickle its request headers. It is used
// by every TCP listener of the replica daemon (HTTPS and metrics), so that
// clients without credentials cannot exhaust its file descriptors.
package netlimit

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// Limits of one listener. Zero fields take the defaults (Default).
type Limits struct {
	// MaxConns is the number of connections served at once; further
	// connections wait in the kernel's accept queue until one closes.
	MaxConns int
	// MaxConnsPerIP is the number of connections one remote IP address may
	// hold; further connections from it are closed at once.
	MaxConnsPerIP int
	// HeaderTimeout bounds the TLS handshake and the reading of a request's
	// headers.
	HeaderTimeout time.Duration
	// IdleTimeout closes a keep-alive connection that sends no next request.
	IdleTimeout time.Duration
	// BodyTimeout is the minimum-progress window for request bodies: a body
	// read that brings less than MinProgress bytes within it fails (a slow
	// but moving upload is never cut; see ProgressReader).
	BodyTimeout time.Duration
	// WriteTimeout bounds writing one response (set right before the
	// response is written, so a long-running request is not cut).
	WriteTimeout time.Duration
}

// MinProgress is the number of body bytes that must arrive within each
// BodyTimeout window (64 KiB per minute by default: 1 KiB/s).
const MinProgress = 64 << 10

// Default are the limits used for zero fields.
var Default = Limits{
	MaxConns:      512,
	MaxConnsPerIP: 64,
	HeaderTimeout: 30 * time.Second,
	IdleTimeout:   2 * time.Minute,
	BodyTimeout:   time.Minute,
	WriteTimeout:  time.Minute,
}

// WithDefaults fills zero fields from Default.
func (l Limits) WithDefaults() Limits {
	if l.MaxConns <= 0 {
		l.MaxConns = Default.MaxConns
	}
	if l.MaxConnsPerIP <= 0 {
		l.MaxConnsPerIP = Default.MaxConnsPerIP
	}
	l.MaxConnsPerIP = min(l.MaxConnsPerIP, l.MaxConns)
	if l.HeaderTimeout <= 0 {
		l.HeaderTimeout = Default.HeaderTimeout
	}
	if l.IdleTimeout <= 0 {
		l.IdleTimeout = Default.IdleTimeout
	}
	if l.BodyTimeout <= 0 {
		l.BodyTimeout = Default.BodyTimeout
	}
	if l.WriteTimeout <= 0 {
		l.WriteTimeout = Default.WriteTimeout
	}
	return l
}

// Server returns an http.Server for h with the limits' timeouts. The TLS
// handshake is bounded by ReadHeaderTimeout (net/http applies the shortest
// read/write timeout to it). There is deliberately no ReadTimeout or
// WriteTimeout: they would cut long uploads and long-running requests;
// bodies are bounded by ProgressReader, responses by a write deadline set
// before they are written. HTTP/2 is off: one request at a time per
// connection, so MaxConns also bounds the requests in progress.
func (l Limits) Server(h http.Handler) *http.Server {
	l = l.WithDefaults()
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: l.HeaderTimeout,
		IdleTimeout:       l.IdleTimeout,
		MaxHeaderBytes:    64 << 10,
		TLSNextProto:      map[string]func(*http.Server, *tls.Conn, http.Handler){},
	}
}

// Listener wraps ln so that at most MaxConns connections are open at once
// (Accept waits for a free slot) and at most MaxConnsPerIP per remote IP
// (more are closed right after accept).
func (l Limits) Listener(ln net.Listener) *Listener {
	l = l.WithDefaults()
	return &Listener{Listener: ln, sem: make(chan struct{}, l.MaxConns), perIP: l.MaxConnsPerIP, byIP: map[string]int{}, done: make(chan struct{})}
}

// Listener is a connection-limited net.Listener (see Limits.Listener).
type Listener struct {
	net.Listener
	sem   chan struct{}
	perIP int

	mu      sync.Mutex
	byIP    map[string]int // open connections per remote IP; entries removed at 0
	refused atomic.Int64
	once    sync.Once
	done    chan struct{}
}

// Accept waits for a free slot, then for a connection from an address that
// is under its per-IP limit.
func (l *Listener) Accept() (net.Conn, error) {
	select {
	case l.sem <- struct{}{}:
	case <-l.done:
		return nil, net.ErrClosed
	}
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			<-l.sem
			return nil, err
		}
		ip := remoteIP(c)
		l.mu.Lock()
		if l.byIP[ip] >= l.perIP {
			l.mu.Unlock()
			l.refused.Add(1)
			if tc, ok := c.(*net.TCPConn); ok {
				tc.SetLinger(0) // reset: nothing is kept for it
			}
			c.Close()
			continue
		}
		l.byIP[ip]++
		l.mu.Unlock()
		return &conn{Conn: c, l: l, ip: ip}, nil
	}
}

// Close closes the listener and wakes a waiting Accept.
func (l *Listener) Close() error {
	l.once.Do(func() { close(l.done) })
	return l.Listener.Close()
}

// Open is the number of connections open now; PerIP the number of remote
// addresses holding connections (for tests and metrics).
func (l *Listener) Open() (open, addrs int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, n := range l.byIP {
		open += n
	}
	return open, len(l.byIP)
}

// Refused is the number of connections closed for the per-IP limit.
func (l *Listener) Refused() int64 { return l.refused.Load() }

func (l *Listener) release(ip string) {
	l.mu.Lock()
	if l.byIP[ip]--; l.byIP[ip] <= 0 {
		delete(l.byIP, ip)
	}
	l.mu.Unlock()
	<-l.sem
}

func remoteIP(c net.Conn) string {
	a := c.RemoteAddr()
	if ta, ok := a.(*net.TCPAddr); ok {
		return ta.IP.String()
	}
	if a == nil {
		return ""
	}
	if h, _, err := net.SplitHostPort(a.String()); err == nil {
		return h
	}
	return a.String()
}

type conn struct {
	net.Conn
	l    *Listener
	ip   string
	once sync.Once
}

func (c *conn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { c.l.release(c.ip) })
	return err
}

// ErrNoProgress is returned by a ProgressReader whose body stalled.
var ErrNoProgress = errors.New("request body too slow: less than 64 KiB arrived within the body timeout")

// ProgressReader enforces a minimum rate on a request body without bounding
// its total time: before the first read the connection's read deadline is
// set Window ahead, and it is moved Window ahead again each time another
// MinProgress bytes arrived. A body at 10 Mbit/s moves it ~20 times a
// second; one that trickles a few bytes a minute fails with ErrNoProgress.
// The deadline is only moved after reads that returned no error, so it is
// never set once the body has been read to its end (net/http then clears it
// for its own background read).
type ProgressReader struct {
	R           io.Reader
	SetDeadline func(time.Time) error
	Window      time.Duration

	started bool
	got     int64
}

func (p *ProgressReader) Read(b []byte) (int, error) {
	if !p.started {
		p.started = true
		if err := p.SetDeadline(time.Now().Add(p.Window)); err != nil {
			p.SetDeadline = func(time.Time) error { return nil } // not supported: no bound
		}
	}
	n, err := p.R.Read(b)
	p.got += int64(n)
	if err == nil && p.got >= MinProgress {
		p.got = 0
		p.SetDeadline(time.Now().Add(p.Window))
	}
	if err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
		err = fmt.Errorf("%w (%v)", ErrNoProgress, err)
	}
	return n, err
}

func (p *ProgressReader) Close() error {
	if c, ok := p.R.(io.Closer); ok {
		return c.Close()
	}
	return nil
}
