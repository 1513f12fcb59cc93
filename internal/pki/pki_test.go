package pki

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/standin/standin/internal/exitcode"
)

// ---- test server: a pairing endpoint and an authorized endpoint ------------

type pairReq struct {
	Secret []byte `json:"secret"`
	CSR    []byte `json:"csr"`
	Name   string `json:"name"`
}

type pairReply struct {
	Cert, CA  []byte
	PrimaryID string
}

type errReply struct{ Error, Code string }

type server struct {
	a    *Authority
	addr string
}

func serve(t *testing.T, a *Authority) *server {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	fail := func(w http.ResponseWriter, err error) {
		w.WriteHeader(http.StatusForbidden)
		json.NewEncoder(w).Encode(errReply{Error: err.Error(), Code: Code(err)})
	}
	mux.HandleFunc("POST /v1/pair", func(w http.ResponseWriter, r *http.Request) {
		var req pairReq
		if err := json.NewDecoder(io.LimitReader(r.Body, 64<<10)).Decode(&req); err != nil {
			fail(w, err)
			return
		}
		cert, ca, p, err := a.Join(req.Secret, req.CSR, req.Name)
		if err != nil {
			fail(w, err)
			return
		}
		json.NewEncoder(w).Encode(pairReply{Cert: cert, CA: ca, PrimaryID: p.ID})
	})
	mux.HandleFunc("GET /v1/whoami", func(w http.ResponseWriter, r *http.Request) {
		p, err := a.Authorize(r.TLS)
		if err != nil {
			fail(w, err)
			return
		}
		json.NewEncoder(w).Encode(p)
	})
	srv := &http.Server{Handler: mux, TLSConfig: a.ServerTLS(), ErrorLog: log.New(io.Discard, "", 0)}
	go srv.ServeTLS(ln, "", "")
	t.Cleanup(func() { srv.Close() })
	return &server{a: a, addr: ln.Addr().String()}
}

func client(cfg *tls.Config) *http.Client {
	return &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{TLSClientConfig: cfg}}
}

func decodeReply(resp *http.Response, v any) error {
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		var e errReply
		json.NewDecoder(resp.Body).Decode(&e)
		if s := CodeError(e.Code); s != nil {
			return fmt.Errorf("replica: %w", s)
		}
		return fmt.Errorf("replica: %s %s", resp.Status, e.Error)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

type creds struct {
	key, cert, ca []byte
	id            string
}

// pair is what "standin pair join TOKEN" does on the primary.
func pair(tok, name string) (creds, error) {
	t, err := ParseToken(tok)
	if err != nil {
		return creds{}, err
	}
	key, csr, err := NewCSR(name)
	if err != nil {
		return creds{}, err
	}
	body, _ := json.Marshal(pairReq{Secret: t.Secret, CSR: csr, Name: name})
	resp, err := client(PinnedClientTLS(t.CAFingerprint, t.ServerName())).Post("https://"+t.Addr+"/v1/pair", "application/json", bytes.NewReader(body))
	if err != nil {
		return creds{}, err
	}
	var r pairReply
	if err := decodeReply(resp, &r); err != nil {
		return creds{}, err
	}
	id, err := CheckJoinReply(t, key, r.Cert, r.CA)
	if err != nil {
		return creds{}, err
	}
	if id != r.PrimaryID {
		return creds{}, fmt.Errorf("primary id %q != %q", id, r.PrimaryID)
	}
	return creds{key: key, cert: r.Cert, ca: r.CA, id: id}, nil
}

func whoami(c *http.Client, addr string) (Primary, error) {
	resp, err := c.Get("https://" + addr + "/v1/whoami")
	if err != nil {
		return Primary{}, err
	}
	var p Primary
	return p, decodeReply(resp, &p)
}

func mtls(t *testing.T, c creds) *http.Client {
	t.Helper()
	cfg, err := ClientTLS(c.ca, c.cert, c.key, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	return client(cfg)
}

func open(t *testing.T, dir string, hosts ...string) *Authority {
	t.Helper()
	a, err := OpenAuthority(dir, hosts)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func mustPair(t *testing.T, s *server, pattern, name string) creds {
	t.Helper()
	tok, err := s.a.NewToken(s.addr, pattern, 0)
	if err != nil {
		t.Fatal(err)
	}
	c, err := pair(tok, name)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// ---- tests ------------------------------------------------------------------

func TestPairThenMutualTLS(t *testing.T) {
	a := open(t, t.TempDir())
	s := serve(t, a)
	tok, err := a.NewToken(s.addr, "db/*, web/root", 0)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(tok, TokenPrefix) {
		t.Fatalf("token %q", tok)
	}
	pt, err := ParseToken(tok)
	if err != nil {
		t.Fatal(err)
	}
	if pt.Addr != s.addr || pt.CAFingerprint != a.CAFingerprint() || len(pt.Secret) != 32 {
		t.Fatalf("token %+v", pt)
	}
	if d := time.Until(pt.Expires); d < 59*time.Minute || d > time.Hour {
		t.Fatalf("default ttl: expires in %v", d)
	}
	c, err := pair(tok, "prim1")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(c.id, "p-") {
		t.Fatalf("id %q", c.id)
	}
	p, err := whoami(mtls(t, c), s.addr)
	if err != nil {
		t.Fatal(err)
	}
	if p.ID != c.id || p.Name != "prim1" || p.Pattern != "db/*,web/root" || p.Revoked || p.Serial == "" {
		t.Fatalf("authorized as %+v", p)
	}
	if !p.Allowed("db", "vm1") || !p.Allowed("web", "root") || p.Allowed("web", "other") {
		t.Fatal("Allowed does not follow the token's pattern")
	}
	ps := a.Primaries()
	if len(ps) != 1 || ps[0] != p {
		t.Fatalf("Primaries %+v", ps)
	}
	// Client certificate: CN = ID, client auth only, 5 years, P-256.
	cert, _ := parseCertPEM(c.cert)
	if cert.Subject.CommonName != c.id || !slices.Equal(cert.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}) ||
		cert.NotAfter.Sub(cert.NotBefore) < clientValidity || Fingerprint(cert) != p.Fingerprint {
		t.Fatalf("client certificate %+v", cert)
	}
	ti := a.Tokens()
	if len(ti) != 1 || !ti[0].Used || ti[0].UsedBy != c.id || ti[0].Pattern != "db/*,web/root" {
		t.Fatalf("Tokens %+v", ti)
	}
	// The secret is not stored anywhere in the directory.
	secretHex := fmt.Sprintf("%x", pt.Secret)
	filepath.Walk(a.Dir(), func(path string, fi os.FileInfo, err error) error {
		if b, _ := os.ReadFile(path); bytes.Contains(b, pt.Secret) || bytes.Contains(b, []byte(secretHex)) {
			t.Errorf("%s holds the token secret", path)
		}
		return nil
	})
}

func TestTokenSingleUse(t *testing.T) {
	a := open(t, t.TempDir())
	s := serve(t, a)
	tok, _ := a.NewToken(s.addr, "", time.Hour)
	if _, err := pair(tok, "first"); err != nil {
		t.Fatal(err)
	}
	if _, err := pair(tok, "second"); !errors.Is(err, ErrTokenUsed) {
		t.Fatalf("reused token: %v", err)
	}
	// Concurrent joins with one token: exactly one wins.
	tok, _ = a.NewToken(s.addr, "", time.Hour)
	pt, _ := ParseToken(tok)
	_, csr, _ := NewCSR("x")
	var wg sync.WaitGroup
	var mu sync.Mutex
	wins := 0
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, _, _, err := a.Join(pt.Secret, csr, "racer"); err == nil {
				mu.Lock()
				wins++
				mu.Unlock()
			} else if !errors.Is(err, ErrTokenUsed) {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if wins != 1 {
		t.Fatalf("%d joins succeeded with one token", wins)
	}
	if n := len(a.Primaries()); n != 2 {
		t.Fatalf("%d primaries", n)
	}
}

func TestTokenExpiredAndUnknown(t *testing.T) {
	a := open(t, t.TempDir())
	now := time.Now()
	var mu sync.Mutex
	a.Now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	s := serve(t, a)
	tok, _ := a.NewToken(s.addr, "", 10*time.Minute)
	mu.Lock()
	now = now.Add(11 * time.Minute)
	mu.Unlock()
	pt, _ := ParseToken(tok) // the primary's clock still says valid
	_, csr, _ := NewCSR("late")
	if _, _, _, err := a.Join(pt.Secret, csr, "late"); !errors.Is(err, ErrTokenExpired) {
		t.Fatalf("expired token: %v", err)
	}
	if _, err := pair(tok, "late"); !errors.Is(err, ErrTokenExpired) {
		t.Fatalf("expired token over TLS: %v", err)
	}
	// A token already expired on the primary's clock is refused before dialing.
	mu.Lock()
	now = time.Now().Add(-2 * time.Hour)
	mu.Unlock()
	old, _ := a.NewToken(s.addr, "", time.Hour)
	if _, err := ParseToken(old); !errors.Is(err, ErrTokenExpired) {
		t.Fatalf("ParseToken of expired token: %v", err)
	}
	// Unknown secret, wrong length.
	secret := make([]byte, 32)
	rand.Read(secret)
	for _, sec := range [][]byte{secret, nil, secret[:16]} {
		if _, _, _, err := a.Join(sec, csr, "x"); !errors.Is(err, ErrTokenInvalid) {
			t.Fatalf("unknown secret: %v", err)
		}
	}
}

func TestBadCSRDoesNotConsumeToken(t *testing.T) {
	a := open(t, t.TempDir())
	tok, _ := a.NewToken("127.0.0.1:1", "", 0)
	pt, _ := ParseToken(tok)
	rsaKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	rsaDER, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, rsaKey)
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	p384DER, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, p384)
	_, good, _ := NewCSR("x")
	tampered := bytes.Clone(good)
	blk, _ := pem.Decode(tampered)
	blk.Bytes[len(blk.Bytes)-5] ^= 1
	for name, csr := range map[string][]byte{
		"rsa":      pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: rsaDER}),
		"p384":     pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: p384DER}),
		"garbage":  []byte("hello"),
		"tampered": pem.EncodeToMemory(blk),
	} {
		if _, _, _, err := a.Join(pt.Secret, csr, "x"); !errors.Is(err, ErrBadCSR) {
			t.Errorf("%s CSR: %v", name, err)
		}
	}
	for _, bad := range []string{"", "a/b", "../x", strings.Repeat("n", 65), "a b"} {
		if _, _, _, err := a.Join(pt.Secret, good, bad); err == nil {
			t.Errorf("primary name %q accepted", bad)
		}
	}
	if _, _, _, err := a.Join(pt.Secret, good, "x"); err != nil {
		t.Fatalf("token consumed by bad requests: %v", err)
	}
}

func TestWrongPinRefusedAtTLS(t *testing.T) {
	a := open(t, t.TempDir())
	s := serve(t, a)
	tok, _ := a.NewToken(s.addr, "", 0)
	pt, _ := ParseToken(tok)

	other := open(t, t.TempDir())
	leaf := a.serverLeaf
	for name, pin := range map[string][32]byte{
		"other CA":    other.CAFingerprint(),
		"server leaf": sha256.Sum256(leaf.Raw), // pinning a non-CA certificate is refused too
		"zero":        {},
	} {
		_, err := client(PinnedClientTLS(pin, "127.0.0.1")).Get("https://" + s.addr + "/v1/whoami")
		if !errors.Is(err, ErrPinMismatch) {
			t.Errorf("%s pin: %v", name, err)
		}
	}
	// A token of another replica pointed at this one: refused before the secret is sent.
	otok, _ := other.NewToken(s.addr, "", 0)
	if _, err := pair(otok, "x"); !errors.Is(err, ErrPinMismatch) {
		t.Fatalf("other replica's token: %v", err)
	}
	// Wrong server name with the right pin.
	if _, err := client(PinnedClientTLS(pt.CAFingerprint, "evil.example")).Get("https://" + s.addr + "/v1/whoami"); !errors.Is(err, ErrPinMismatch) {
		t.Fatalf("wrong server name: %v", err)
	}
	if ti := a.Tokens(); ti[0].Used {
		t.Fatal("token used")
	}
}

func TestNoClientCertUnpaired(t *testing.T) {
	a := open(t, t.TempDir())
	s := serve(t, a)
	tok, _ := a.NewToken(s.addr, "", 0)
	pt, _ := ParseToken(tok)
	if _, err := whoami(client(PinnedClientTLS(pt.CAFingerprint, "127.0.0.1")), s.addr); !errors.Is(err, ErrUnpaired) {
		t.Fatalf("no client cert: %v", err)
	}
	for _, st := range []*tls.ConnectionState{nil, {}} {
		if _, err := a.Authorize(st); !errors.Is(err, ErrUnpaired) {
			t.Fatalf("Authorize(%v): %v", st, err)
		}
	}
}

func TestForeignCertRefused(t *testing.T) {
	a := open(t, t.TempDir())
	s := serve(t, a)
	mine := mustPair(t, s, "", "mine")

	b := open(t, t.TempDir())
	sb := serve(t, b)
	foreign := mustPair(t, sb, "", "foreign")

	// Present b's client certificate to a (trusting a's CA for the server).
	cfg, err := ClientTLS(mine.ca, foreign.cert, foreign.key, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	if p, err := whoami(client(cfg), s.addr); err == nil {
		t.Fatalf("foreign certificate authorized as %+v", p)
	}
	fc, _ := parseCertPEM(foreign.cert)
	if _, err := a.Authorize(&tls.ConnectionState{PeerCertificates: []*x509.Certificate{fc}}); !errors.Is(err, ErrUnpaired) {
		t.Fatalf("Authorize foreign: %v", err)
	}
	// A self-made certificate copying a paired primary's CN, with b's CA as "intermediate".
	mc, _ := parseCertPEM(mine.cert)
	fake := selfSigned(t, mc.Subject.CommonName, false)
	bca, _ := parseCertPEM(b.CAPEM())
	if _, err := a.Authorize(&tls.ConnectionState{PeerCertificates: []*x509.Certificate{fake, bca}}); !errors.Is(err, ErrUnpaired) {
		t.Fatalf("Authorize fake: %v", err)
	}
	// The replica's own server certificate is not a client certificate.
	if _, err := a.Authorize(&tls.ConnectionState{PeerCertificates: []*x509.Certificate{a.serverLeaf}}); !errors.Is(err, ErrUnpaired) {
		t.Fatalf("Authorize server cert: %v", err)
	}
	// A certificate issued by a's CA but not on the list (e.g. removed primaries.json entry).
	_, csr, _ := NewCSR("ghost")
	tok, _ := a.NewToken(s.addr, "", 0)
	pt, _ := ParseToken(tok)
	gc, _, gp, err := a.Join(pt.Secret, csr, "ghost")
	if err != nil {
		t.Fatal(err)
	}
	a.mu.Lock()
	unlock, _ := a.flock()
	st, _ := a.readPrimaries()
	st.Primaries = slices.DeleteFunc(st.Primaries, func(p Primary) bool { return p.ID == gp.ID })
	a.writePrimaries(st)
	unlock()
	a.mu.Unlock()
	g, _ := parseCertPEM(gc)
	if _, err := a.Authorize(&tls.ConnectionState{PeerCertificates: []*x509.Certificate{g}}); !errors.Is(err, ErrUnpaired) {
		t.Fatalf("Authorize unlisted: %v", err)
	}
}

func TestRevoke(t *testing.T) {
	dir := t.TempDir()
	a := open(t, dir)
	s := serve(t, a)
	c1 := mustPair(t, s, "", "prim1")
	c2 := mustPair(t, s, "", "prim2")
	hc := mtls(t, c1) // keep-alive: the revocation must hit an open connection too
	if _, err := whoami(hc, s.addr); err != nil {
		t.Fatal(err)
	}
	if err := a.Revoke("prim1"); err != nil {
		t.Fatal(err)
	}
	if _, err := whoami(hc, s.addr); !errors.Is(err, ErrRevoked) {
		t.Fatalf("revoked on open connection: %v", err)
	}
	if _, err := whoami(mtls(t, c1), s.addr); !errors.Is(err, ErrRevoked) {
		t.Fatalf("revoked on new connection: %v", err)
	}
	if _, err := whoami(mtls(t, c2), s.addr); err != nil {
		t.Fatalf("other primary: %v", err)
	}
	if err := a.Revoke(c2.id); err != nil {
		t.Fatal(err)
	}
	if err := a.Revoke("nobody"); !errors.Is(err, ErrNoSuchPrimary) || exitcode.Code(err) != exitcode.NotFound {
		t.Fatalf("revoke unknown: %v", err)
	}
	// Durable: a reopened authority (and another Authority sharing the files) agrees.
	b := open(t, dir)
	for _, c := range []creds{c1, c2} {
		cert, _ := parseCertPEM(c.cert)
		p, err := b.Authorize(&tls.ConnectionState{PeerCertificates: []*x509.Certificate{cert}})
		if !errors.Is(err, ErrRevoked) || exitcode.Code(err) != exitcode.Refused {
			t.Fatalf("after reopen: %v", err)
		}
		if p.Allowed("g", "i") {
			t.Fatal("revoked primary allowed")
		}
	}
}

func TestAllowed(t *testing.T) {
	cases := []struct {
		pattern, group, image string
		want                  bool
	}{
		{"", "g", "i", true},
		{"*", "g", "i", true},
		{"db/*", "db", "vm1", true},
		{"db/*", "web", "vm1", false},
		{"db/*,web/root", "web", "root", true},
		{"db/*, web/root", "web", "root", true},
		{"db/*,web/root", "web", "root2", false},
		{"*/vm?", "any", "vm7", true},
		{"*/vm?", "any", "vm10", false},
		{"db/[a-c]*", "db", "beta", true},
		{"db/[a-c]*", "db", "delta", false},
		{"db/*", "db", "", false},
		{"*", "..", "x", false},
		{"*", "g", "a/b", false},
		{"*/*", "db/x", "y", false},
		{"db/*,*", "web", "x", true},
	}
	for _, c := range cases {
		if got := (Primary{Pattern: c.pattern}).Allowed(c.group, c.image); got != c.want {
			t.Errorf("%q allows %s/%s = %v, want %v", c.pattern, c.group, c.image, got, c.want)
		}
	}
	for _, bad := range []string{"db", "db/[", "a,,b", "a/b/c"} {
		if _, err := NormalizePattern(bad); err == nil {
			t.Errorf("pattern %q accepted", bad)
		}
	}
	a := open(t, t.TempDir())
	if _, err := a.NewToken("127.0.0.1:1", "db/[", 0); err == nil {
		t.Fatal("NewToken accepted a bad pattern")
	}
}

func TestRestartKeepsEverything(t *testing.T) {
	dir := t.TempDir()
	a := open(t, dir, "replica.example")
	s := serve(t, a)
	c := mustPair(t, s, "db/*", "prim1")
	pending, _ := a.NewToken(s.addr, "web/*", time.Hour)
	fp, serial := a.CAFingerprint(), a.serverLeaf.SerialNumber

	b := open(t, dir, "replica.example")
	if b.CAFingerprint() != fp {
		t.Fatal("CA changed on restart")
	}
	if b.serverLeaf.SerialNumber.Cmp(serial) != 0 {
		t.Fatal("server certificate re-issued although hosts did not change")
	}
	sb := serve(t, b)
	p, err := whoami(mtls(t, c), sb.addr)
	if err != nil || p.ID != c.id || p.Pattern != "db/*" {
		t.Fatalf("after restart: %+v %v", p, err)
	}
	if ps := b.Primaries(); len(ps) != 1 {
		t.Fatalf("primaries after restart: %+v", ps)
	}
	if ti := b.Tokens(); len(ti) != 2 || ti[1].Used {
		t.Fatalf("tokens after restart: %+v", ti)
	}
	// The pending token works against the restarted replica (same address here
	// is not needed: dial the new server directly).
	pt, _ := ParseToken(pending)
	pt.Addr = sb.addr
	c2, err := pair(pt.String(), "prim2")
	if err != nil {
		t.Fatal(err)
	}
	if p, err := whoami(mtls(t, c2), sb.addr); err != nil || p.Pattern != "web/*" {
		t.Fatalf("%+v %v", p, err)
	}
	// Missing CA with paired primaries: refuse to create a new one.
	os.Remove(filepath.Join(dir, caCertFile))
	if _, err := OpenAuthority(dir, nil); err == nil {
		t.Fatal("opened without ca.pem although primaries are paired")
	}
}

func TestServerCertReissuedWhenHostsChange(t *testing.T) {
	dir := t.TempDir()
	a := open(t, dir, "a.example", "10.0.0.1:8443")
	var skew atomic.Int64 // the clock is read by server goroutines
	a.Now = func() time.Time { return time.Now().Add(time.Duration(skew.Load())) }
	leaf := a.serverLeaf
	host, _ := os.Hostname()
	want := []string{"a.example", "localhost", strings.ToLower(host)}
	for _, h := range want {
		if leaf.VerifyHostname(h) != nil {
			t.Errorf("server certificate lacks %s", h)
		}
	}
	for _, ip := range []string{"127.0.0.1", "::1", "10.0.0.1"} {
		if leaf.VerifyHostname(ip) != nil {
			t.Errorf("server certificate lacks %s", ip)
		}
	}
	if !slices.Equal(leaf.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}) {
		t.Fatal("server EKU")
	}
	same := open(t, dir, "10.0.0.1", "A.example.")
	if same.serverLeaf.SerialNumber.Cmp(leaf.SerialNumber) != 0 {
		t.Fatal("re-issued for an equivalent host list")
	}
	b := open(t, dir, "b.example")
	if b.serverLeaf.SerialNumber.Cmp(leaf.SerialNumber) == 0 || b.serverLeaf.VerifyHostname("b.example") != nil ||
		b.serverLeaf.VerifyHostname("a.example") == nil {
		t.Fatal("not re-issued for new hosts")
	}
	if b.CAFingerprint() != a.CAFingerprint() {
		t.Fatal("CA changed")
	}
	// The running server picks up a re-issue made by another Authority of the dir.
	s := serve(t, a)
	got := func() *x509.Certificate {
		conn, err := tls.Dial("tcp", s.addr, &tls.Config{InsecureSkipVerify: true})
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		return conn.ConnectionState().PeerCertificates[0]
	}
	if got().SerialNumber.Cmp(b.serverLeaf.SerialNumber) != 0 {
		t.Fatal("running server does not serve the re-issued certificate")
	}
	// NewToken adds the host of the address the primary dials.
	if _, err := b.NewToken("replica.example:8443", "", 0); err != nil {
		t.Fatal(err)
	}
	if b.serverLeaf.VerifyHostname("replica.example") != nil || b.serverLeaf.VerifyHostname("b.example") != nil {
		t.Fatal("token host not added")
	}
	if c := open(t, dir, "b.example"); c.serverLeaf.VerifyHostname("replica.example") != nil {
		t.Fatal("token host lost on restart")
	}
	// Renewal 30 days before expiry.
	skew.Store(int64(serverValidity - 20*24*time.Hour))
	if got().NotAfter.Before(time.Now().Add(serverValidity)) {
		t.Fatal("server certificate not renewed before expiry")
	}
}

func TestStateFilesPrivate(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pki")
	a := open(t, dir)
	s := serve(t, a)
	mustPair(t, s, "", "p")
	a.NewToken("replica.example:1", "", 0)
	fi, _ := os.Stat(dir)
	if fi.Mode().Perm() != 0o700 {
		t.Errorf("dir mode %v", fi.Mode())
	}
	ents, _ := os.ReadDir(dir)
	var names []string
	for _, e := range ents {
		fi, _ := e.Info()
		names = append(names, e.Name())
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s mode %v", e.Name(), fi.Mode())
		}
	}
	for _, f := range []string{caCertFile, caKeyFile, serverCert, serverKey, tokensFile, primariesFile, hostsFile} {
		if !slices.Contains(names, f) {
			t.Errorf("%s missing (have %v)", f, names)
		}
	}
}

func TestConcurrentOpen(t *testing.T) {
	dir := t.TempDir()
	var wg sync.WaitGroup
	fps := make([][32]byte, 8)
	for i := range fps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			a, err := OpenAuthority(dir, []string{fmt.Sprintf("h%d.example", i%2)})
			if err != nil {
				t.Error(err)
				return
			}
			fps[i] = a.CAFingerprint()
			a.Primaries()
			a.ServerTLS()
		}()
	}
	wg.Wait()
	for _, fp := range fps {
		if fp != fps[0] {
			t.Fatal("concurrent opens created different CAs")
		}
	}
}

func TestParseTokenGarbage(t *testing.T) {
	a := open(t, t.TempDir())
	tok, _ := a.NewToken("replica.example:8443", "", 0)
	pt, err := ParseToken(" " + tok[:20] + "\n" + tok[20:] + "\n") // pasted with a line break
	if err != nil || pt.Addr != "replica.example:8443" || pt.ServerName() != "replica.example" {
		t.Fatalf("%+v %v", pt, err)
	}
	flip := []byte(tok)
	flip[len(TokenPrefix)+10] ^= 0x01
	for _, bad := range []string{"", "hello", "standin1:", "standin1:AAAA", "standin1:!!!!", tok[:len(tok)-3], string(flip),
		"x" + tok, strings.Replace(tok, "standin1:", "standin1x", 1)} {
		if _, err := ParseToken(bad); !errors.Is(err, ErrTokenMalformed) {
			t.Errorf("ParseToken(%q): %v", bad, err)
		}
	}
	if _, err := ParseToken("standin2:" + tok[len(TokenPrefix):]); !errors.Is(err, ErrTokenMalformed) || !strings.Contains(err.Error(), "standin2") {
		t.Errorf("future version: %v", err)
	}
	if exitcode.Code(fmt.Errorf("x: %w", ErrTokenMalformed)) != exitcode.Usage {
		t.Error("exit code")
	}
	for _, addr := range []string{"", "a b:1", "x/y:1"} {
		if _, err := a.NewToken(addr, "", 0); err == nil {
			t.Errorf("NewToken(%q) accepted", addr)
		}
	}
}

func TestCodes(t *testing.T) {
	for _, e := range []error{ErrUnpaired, ErrRevoked, ErrTokenExpired, ErrTokenUsed, ErrTokenInvalid, ErrTokenMalformed, ErrBadCSR, ErrNoSuchPrimary, ErrEnterprise} {
		if CodeError(Code(fmt.Errorf("wrapped: %w", e))) != e {
			t.Errorf("code round trip of %v", e)
		}
	}
	if Code(errors.New("x")) != "" || CodeError("nope") != nil {
		t.Error("non-pki error")
	}
}

func FuzzParseToken(f *testing.F) {
	f.Add(Token{Addr: "h:1", Secret: make([]byte, 32), Expires: time.Now().Add(time.Hour)}.String())
	f.Add("standin1:")
	f.Add("garbage")
	f.Fuzz(func(t *testing.T, s string) {
		tok, err := decodeToken(s)
		if err != nil {
			return
		}
		back, err := decodeToken(tok.String())
		if err != nil || back.Addr != tok.Addr || back.CAFingerprint != tok.CAFingerprint ||
			!bytes.Equal(back.Secret, tok.Secret) || !back.Expires.Equal(tok.Expires) {
			t.Fatalf("round trip of %q: %+v %v", s, back, err)
		}
	})
}

// ---- enterprise mode ----------------------------------------------------------

type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

func newTestCA(t *testing.T) testCA {
	c := selfSigned(t, "Example Corp Root", true)
	return testCA{c, testKeys[c]}
}

var (
	testKeysMu sync.Mutex
	testKeys   = map[*x509.Certificate]*ecdsa.PrivateKey{}
)

func selfSigned(t *testing.T, cn string, isCA bool) *x509.Certificate {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: randSerial(), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: isCA, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	if !isCA {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	testKeysMu.Lock()
	testKeys[c] = key
	testKeysMu.Unlock()
	return c
}

func (ca testCA) issue(t *testing.T, cn string, server bool) (certPEM, keyPEM []byte) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: randSerial(), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	if server {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		tmpl.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	keyPEM, _ = marshalKeyPEM(key)
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), keyPEM
}

func (ca testCA) pem() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.cert.Raw})
}

func TestEnterprise(t *testing.T) {
	ca := newTestCA(t)
	tmp := t.TempDir()
	write := func(name string, b []byte) string {
		p := filepath.Join(tmp, name)
		os.WriteFile(p, b, 0o600)
		return p
	}
	sc, sk := ca.issue(t, "replica", true)
	a, err := OpenAuthorityWithCerts(filepath.Join(tmp, "pki"), write("s.pem", sc), write("s.key", sk), write("ca.pem", ca.pem()))
	if err != nil {
		t.Fatal(err)
	}
	s := serve(t, a)
	cc, ck := ca.issue(t, "primary-1.corp", false)
	cfg, err := ClientTLS(ca.pem(), cc, ck, "127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	hc := client(cfg)
	if _, err := whoami(hc, s.addr); !errors.Is(err, ErrUnpaired) {
		t.Fatalf("not on allow-list: %v", err)
	}
	if err := a.AddPrimary("primary-1", "db/*", "primary-1.corp"); err != nil {
		t.Fatal(err)
	}
	p, err := whoami(hc, s.addr)
	if err != nil || p.ID != "primary-1.corp" || p.Name != "primary-1" || !p.Allowed("db", "x") || p.Allowed("web", "x") {
		t.Fatalf("%+v %v", p, err)
	}
	// By fingerprint (openssl style).
	c2, k2 := ca.issue(t, "primary-2.corp", false)
	cert2, _ := parseCertPEM(c2)
	fp := strings.ToUpper(Fingerprint(cert2))
	var colon []string
	for i := 0; i < len(fp); i += 2 {
		colon = append(colon, fp[i:i+2])
	}
	if err := a.AddPrimary("primary-2", "", "sha256:"+strings.Join(colon, ":")); err != nil {
		t.Fatal(err)
	}
	cfg2, _ := ClientTLS(ca.pem(), c2, k2, "127.0.0.1")
	if p, err := whoami(client(cfg2), s.addr); err != nil || p.Name != "primary-2" || p.Fingerprint != Fingerprint(cert2) {
		t.Fatalf("%+v %v", p, err)
	}
	if err := a.Revoke("primary-1"); err != nil {
		t.Fatal(err)
	}
	if _, err := whoami(hc, s.addr); !errors.Is(err, ErrRevoked) {
		t.Fatalf("revoked: %v", err)
	}
	// A certificate from another CA with an allowed CN is refused.
	other := newTestCA(t)
	oc, ok := other.issue(t, "primary-2.corp", false)
	ocfg, _ := ClientTLS(ca.pem(), oc, ok, "127.0.0.1")
	if p, err := whoami(client(ocfg), s.addr); err == nil {
		t.Fatalf("other CA authorized as %+v", p)
	}
	if _, err := a.NewToken(s.addr, "", 0); !errors.Is(err, ErrEnterprise) {
		t.Fatalf("NewToken in enterprise mode: %v", err)
	}
	if _, _, _, err := a.Join(nil, nil, "x"); !errors.Is(err, ErrEnterprise) {
		t.Fatalf("Join in enterprise mode: %v", err)
	}
	// Certificate rotation is picked up without a restart.
	sc2, sk2 := ca.issue(t, "replica-rotated", true)
	write("s.key.new", sk2)
	write("s.pem.new", sc2)
	os.Rename(filepath.Join(tmp, "s.key.new"), filepath.Join(tmp, "s.key"))
	os.Rename(filepath.Join(tmp, "s.pem.new"), filepath.Join(tmp, "s.pem"))
	conn, err := tls.Dial("tcp", s.addr, cfg2)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if cn := conn.ConnectionState().PeerCertificates[0].Subject.CommonName; cn != "replica-rotated" {
		t.Fatalf("served %q after rotation", cn)
	}
}

// TestUniquePrimaryNames: a name identifies one live primary. A pairing
// under a name in use gets NAME-2 (a host pairing again through a second
// address or for a new extension keeps working); a bad name is refused
// without consuming the token; revoking by name hits only the live primary
// of that name; a name shared by several live primaries (an older
// primaries.json) is refused for revocation, which then goes by ID;
// AddPrimary refuses a name in use.
func TestUniquePrimaryNames(t *testing.T) {
	a := open(t, t.TempDir())
	s := serve(t, a)
	first := mustPair(t, s, "vm1/*", "dup")
	tok, err := a.NewToken(s.addr, "vm2/*", 0)
	if err != nil {
		t.Fatal(err)
	}
	pt, _ := ParseToken(tok)
	_, csr, _ := NewCSR("x")
	if _, _, _, err := a.Join(pt.Secret, csr, "bad name"); !errors.Is(err, ErrBadPrimaryName) || Code(err) != "bad_name" {
		t.Fatalf("bad name: %v", err)
	}
	second := mustPairToken(t, tok, "dup") // the refused join did not use the token
	names := map[string]string{}
	for _, p := range a.Primaries() {
		names[p.ID] = p.Name
	}
	if names[first.id] != "dup" || names[second.id] != "dup-2" {
		t.Fatalf("names after pairing dup twice: %v", names)
	}
	if err := a.Revoke("dup"); err != nil {
		t.Fatal(err)
	}
	if _, err := whoami(mtls(t, second), s.addr); err != nil {
		t.Fatalf("revoking dup hit dup-2: %v", err)
	}
	// A revoked name may be paired again; revoking by name then hits the new one only.
	again := mustPair(t, s, "vm1/*", "dup")
	if err := a.Revoke("dup"); err != nil {
		t.Fatal(err)
	}
	if _, err := whoami(mtls(t, again), s.addr); !errors.Is(err, ErrRevoked) {
		t.Fatalf("revoke by name of the re-paired dup: %v", err)
	}
	if _, err := whoami(mtls(t, second), s.addr); err != nil {
		t.Fatalf("dup-2 after revoking dup: %v", err)
	}
	if err := a.AddPrimary("dup-2", "*", "some-cn"); !errors.Is(err, ErrNameTaken) || !strings.Contains(err.Error(), second.id) {
		t.Fatalf("AddPrimary with a name in use: %v", err)
	}
	// Two live primaries of one name (written by an older version).
	a.mu.Lock()
	unlock, _ := a.flock()
	st, _ := a.readPrimaries()
	for i := range st.Primaries {
		st.Primaries[i].Name, st.Primaries[i].Revoked = "legacy", false
	}
	if err := a.writePrimaries(st); err != nil {
		t.Fatal(err)
	}
	unlock()
	a.mu.Unlock()
	if err := a.Revoke("legacy"); !errors.Is(err, ErrAmbiguousName) || !strings.Contains(err.Error(), second.id) {
		t.Fatalf("revoke of an ambiguous name: %v", err)
	}
	for _, p := range a.Primaries() {
		if p.Revoked {
			t.Fatalf("an ambiguous revoke revoked %s", p.ID)
		}
	}
	if err := a.Revoke(second.id); err != nil {
		t.Fatal(err)
	}
	if _, err := whoami(mtls(t, second), s.addr); !errors.Is(err, ErrRevoked) {
		t.Fatalf("revoked by ID: %v", err)
	}
	if _, err := whoami(mtls(t, first), s.addr); err != nil {
		t.Fatalf("the other primary of that name: %v", err)
	}
}

func mustPairToken(t *testing.T, tok, name string) creds {
	t.Helper()
	c, err := pair(tok, name)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestReplacingToken: a failover pairs the peer host again under its name;
// that pairing revokes the earlier primary of the name instead of being
// refused, and the token pairs under that name only.
func TestReplacingToken(t *testing.T) {
	a := open(t, t.TempDir())
	s := serve(t, a)
	old := mustPair(t, s, "vm1/*", "host1")
	other := mustPair(t, s, "vm2/*", "host2")
	tok, err := a.NewTokenWith(s.addr, TokenOptions{Pattern: "vm1/*", Replaces: "host1"})
	if err != nil {
		t.Fatal(err)
	}
	// The token re-pairs host1 only: joining under another primary's name
	// neither revokes it nor uses up the token.
	if _, err := pair(tok, "host2"); !errors.Is(err, ErrTokenName) {
		t.Fatalf("a replacing token used under another name: %v", err)
	}
	if p, err := whoami(mtls(t, other), s.addr); err != nil || p.Name != "host2" {
		t.Fatalf("host2 after the refused pairing: %+v %v", p, err)
	}
	c := mustPairToken(t, tok, "host1")
	if _, err := whoami(mtls(t, old), s.addr); !errors.Is(err, ErrRevoked) {
		t.Fatalf("the replaced primary: %v", err)
	}
	if p, err := whoami(mtls(t, c), s.addr); err != nil || p.ID != c.id {
		t.Fatalf("the replacing primary: %+v %v", p, err)
	}
	if err := a.Revoke("host1"); err != nil {
		t.Fatal(err)
	}
	if _, err := whoami(mtls(t, c), s.addr); !errors.Is(err, ErrRevoked) {
		t.Fatalf("revoke by name after a replacement: %v", err)
	}
}
