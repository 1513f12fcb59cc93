package applier

import (
	"bytes"
	"encoding/json"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/standin/standin/internal/pki"
	"github.com/standin/standin/internal/wire"
)

// serveTLSOn serves srv's handler over real mutual TLS (auth's server
// certificate) on ln until the test ends.
func serveTLSOn(t testing.TB, srv *Server, auth *pki.Authority, ln net.Listener) *http.Server {
	t.Helper()
	hs := &http.Server{Handler: srv.Handler(), TLSConfig: auth.ServerTLS(), ErrorLog: log.New(io.Discard, "", 0)}
	go hs.ServeTLS(ln, "", "")
	t.Cleanup(func() { hs.Close() })
	return hs
}

// listenLoopback listens on a free loopback port.
func listenLoopback(t testing.TB) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

// tlsServer opens a fresh authority for 127.0.0.1, a Server for rep with
// its inbox at inbox, and serves it over mutual TLS on loopback; it returns
// the server, the authority and the listening address.
func tlsServer(t testing.TB, rep *Replica, inbox string) (*Server, *pki.Authority, string) {
	t.Helper()
	srv, auth := newTestServer(t, rep, inbox)
	ln := listenLoopback(t)
	serveTLSOn(t, srv, auth, ln)
	return srv, auth, ln.Addr().String()
}

// newTestServer opens a fresh authority for 127.0.0.1 and a Server for rep
// with its inbox at inbox (not serving yet).
func newTestServer(t testing.TB, rep *Replica, inbox string) (*Server, *pki.Authority) {
	t.Helper()
	auth, err := pki.OpenAuthority(t.TempDir(), []string{"127.0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := NewServer(rep, auth, inbox, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	return srv, auth
}

// tokenCSR parses the pairing token tok and makes a key and CSR for a
// primary named name.
func tokenCSR(t testing.TB, tok, name string) (pt pki.Token, key, csr []byte) {
	t.Helper()
	pt, err := pki.ParseToken(tok)
	if err != nil {
		t.Fatal(err)
	}
	key, csr, err = pki.NewCSR(name)
	if err != nil {
		t.Fatal(err)
	}
	return pt, key, csr
}

// joinPEM pairs a primary named name for the group pattern directly with
// auth (token for addr, ParseToken, NewCSR, Join) and returns its key,
// certificate and CA in PEM, and the paired primary.
func joinPEM(t testing.TB, auth *pki.Authority, addr, pattern, name string) (key, cert, ca []byte, p pki.Primary) {
	t.Helper()
	tok, err := auth.NewToken(addr, pattern, 0)
	if err != nil {
		t.Fatal(err)
	}
	pt, key, csr := tokenCSR(t, tok, name)
	cert, ca, p, err = auth.Join(pt.Secret, csr, name)
	if err != nil {
		t.Fatal(err)
	}
	return key, cert, ca, p
}

// mtlsClient returns an HTTPS client presenting cert (signed by ca) to the
// replica at 127.0.0.1.
func mtlsClient(t testing.TB, key, cert, ca []byte) *http.Client {
	t.Helper()
	cfg, err := pki.ClientTLS(ca, cert, key, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	return &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{TLSClientConfig: cfg}}
}

// tlsClient is a primary paired with a test replica over mutual TLS.
type tlsClient struct {
	t    testing.TB
	hc   *http.Client
	base string
	id   string
}

// pairTLS pairs a primary named name for pattern with the replica served at
// addr under auth and returns its client.
func pairTLS(t testing.TB, auth *pki.Authority, addr, pattern, name string) *tlsClient {
	t.Helper()
	key, cert, ca, p := joinPEM(t, auth, addr, pattern, name)
	return &tlsClient{t: t, hc: mtlsClient(t, key, cert, ca), base: "https://" + addr + wire.Prefix, id: p.ID}
}

// do sends one request to the replica API (path under wire.Prefix) and
// returns the status and, on a refusal, the JSON error.
func (c *tlsClient) do(method, path string, body []byte) (int, wire.Error) {
	c.t.Helper()
	req, _ := http.NewRequest(method, c.base+path, bytes.NewReader(body))
	resp, err := c.hc.Do(req)
	if err != nil {
		c.t.Fatal(err)
	}
	defer resp.Body.Close()
	var we wire.Error
	if resp.StatusCode != http.StatusOK {
		json.NewDecoder(resp.Body).Decode(&we)
	}
	return resp.StatusCode, we
}
