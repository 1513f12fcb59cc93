package pki

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/standin/standin/internal/fsutil"
	"golang.org/x/sys/unix"
)

// File names inside the authority directory.
const (
	caCertFile    = "ca.pem"
	caKeyFile     = "ca.key"
	serverCert    = "server.pem"
	serverKey     = "server.key"
	hostsFile     = "hosts.json"
	tokensFile    = "tokens.json"
	primariesFile = "primaries.json"
	lockFile      = ".lock"
)

// Validity periods.
const (
	caValidity     = 10 * 365 * 24 * time.Hour
	serverValidity = 2 * 365 * 24 * time.Hour
	clientValidity = 5 * 365 * 24 * time.Hour
	renewBefore    = 30 * 24 * time.Hour // server certificate is re-issued this long before it expires
	backdate       = 5 * time.Minute     // NotBefore slack for clocks that are slightly behind
	DefaultTTL     = time.Hour           // token lifetime when NewToken gets ttl <= 0
)

// Authority is the replica's CA and pairing state, kept in one directory.
// All methods are safe for concurrent use.
type Authority struct {
	// Now is the clock used for token expiry, certificate validity and
	// verification; time.Now when nil. Set it before sharing the Authority.
	Now func() time.Time

	dir string
	mu  *sync.Mutex // per directory, see doc.go for the lock order

	enterprise                bool
	certFile, keyFile, caFile string // enterprise mode sources
	hosts                     []string
	caCert                    *x509.Certificate // own CA; nil in enterprise mode
	caKey                     *ecdsa.PrivateKey
	caPEM                     []byte
	clientPool                *x509.CertPool
	server                    *tls.Certificate
	serverLeaf                *x509.Certificate
	serverStamp               [2]fileStamp // server cert and key files when loaded
	primaries                 []Primary
	primStamp                 fileStamp
}

var dirLocks sync.Map // absolute dir -> *sync.Mutex

func newAuthority(dir string) (*Authority, error) {
	if dir == "" {
		return nil, errors.New("pki: empty authority directory")
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	if err := os.MkdirAll(abs, 0o700); err != nil {
		return nil, fmt.Errorf("pki: create %s: %w", abs, err)
	}
	if err := os.Chmod(abs, 0o700); err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	mu, _ := dirLocks.LoadOrStore(abs, new(sync.Mutex))
	return &Authority{dir: abs, mu: mu.(*sync.Mutex)}, nil
}

func (a *Authority) now() time.Time {
	if a.Now != nil {
		return a.Now()
	}
	return time.Now()
}

func (a *Authority) path(name string) string { return filepath.Join(a.dir, name) }

// flock takes the cross-process lock of the directory. Call with a.mu held.
func (a *Authority) flock() (unlock func(), err error) {
	f, err := os.OpenFile(a.path(lockFile), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("pki: lock %s: %w", a.dir, err)
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("pki: lock %s: %w", a.dir, err)
	}
	return func() { f.Close() }, nil // closing releases the flock
}

// OpenAuthority loads or creates (at first start) the replica's own CA
// (ECDSA P-256, 10 years) in dir and a server certificate signed by it whose
// SANs are hosts plus 127.0.0.1, ::1, localhost, os.Hostname() and the
// server names added by NewToken. Hosts may carry a port ("host:8443"), which is
// ignored. The server certificate is re-issued when that set changes, when it
// expires within 30 days, or when it does not match the CA or its key.
func OpenAuthority(dir string, hosts []string) (*Authority, error) {
	a, err := newAuthority(dir)
	if err != nil {
		return nil, err
	}
	a.hosts, err = normalizeHosts(defaultHosts(hosts))
	if err != nil {
		return nil, err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	unlock, err := a.flock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := a.loadOrCreateCA(); err != nil {
		return nil, err
	}
	if err := a.ensureServerCert(); err != nil {
		return nil, err
	}
	if err := a.reloadPrimaries(); err != nil {
		return nil, err
	}
	return a, nil
}

// OpenAuthorityWithCerts is enterprise mode: the server presents certFile
// (PEM chain, leaf first) with keyFile, and client certificates must chain to
// a CA in clientCAFile. The files are used in place; a changed certFile/keyFile
// is picked up on the next handshake (the client CA bundle is read once).
// dir keeps primaries.json; tokens are not available (ErrEnterprise).
func OpenAuthorityWithCerts(dir, certFile, keyFile, clientCAFile string) (*Authority, error) {
	a, err := newAuthority(dir)
	if err != nil {
		return nil, err
	}
	a.enterprise = true
	for _, p := range []*string{&certFile, &keyFile, &clientCAFile} {
		if *p, err = filepath.Abs(*p); err != nil {
			return nil, fmt.Errorf("pki: %w", err)
		}
	}
	a.certFile, a.keyFile, a.caFile = certFile, keyFile, clientCAFile
	caPEM, err := os.ReadFile(clientCAFile)
	if err != nil {
		return nil, fmt.Errorf("pki: client CA bundle: %w", err)
	}
	a.clientPool = x509.NewCertPool()
	if !a.clientPool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("pki: client CA bundle %s holds no PEM certificate", clientCAFile)
	}
	a.caPEM = caPEM
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.loadServerCert(); err != nil {
		return nil, err
	}
	if err := a.reloadPrimaries(); err != nil {
		return nil, err
	}
	return a, nil
}

// Dir is the authority directory.
func (a *Authority) Dir() string { return a.dir }

// Enterprise reports whether the authority uses enterprise certificates.
func (a *Authority) Enterprise() bool { return a.enterprise }

// CAPEM is the replica CA certificate (own mode) or the client CA bundle
// (enterprise mode).
func (a *Authority) CAPEM() []byte { return bytes.Clone(a.caPEM) }

// CAFingerprint is the SHA-256 of the own CA certificate (zero in enterprise mode).
func (a *Authority) CAFingerprint() [32]byte {
	if a.caCert == nil {
		return [32]byte{}
	}
	return sha256.Sum256(a.caCert.Raw)
}

// ServerTLS is the replica's listener configuration: TLS 1.3 only, a client
// certificate is verified against the CA if one is given (the pairing
// endpoint is reached without one; every other endpoint must call Authorize),
// and the server presents its certificate followed by the CA certificate so
// that a primary can pin the CA.
func (a *Authority) ServerTLS() *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS13,
		ClientAuth:     tls.VerifyClientCertIfGiven,
		ClientCAs:      a.clientPool,
		GetCertificate: a.getCertificate,
		Time:           a.now,
	}
}

func (a *Authority) getCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	// Pick up a certificate replaced by another process (or by the enterprise
	// PKI's renewal); keep serving the old one if the new files do not load.
	if a.serverChanged() {
		_ = a.loadServerCert()
	}
	if !a.enterprise && a.now().After(a.serverLeaf.NotAfter.Add(-renewBefore)) {
		if unlock, err := a.flock(); err == nil {
			_ = a.ensureServerCert()
			unlock()
		}
	}
	return a.server, nil
}

// ---- CA -------------------------------------------------------------------

func (a *Authority) loadOrCreateCA() error {
	certPEM, err := os.ReadFile(a.path(caCertFile))
	if errors.Is(err, fs.ErrNotExist) {
		// ca.pem is the commit point of CA creation: without it no token and
		// no client certificate can exist, unless primaries.json says otherwise.
		var st primariesState
		if err := fsutil.ReadJSON(a.path(primariesFile), &st); err == nil && len(st.Primaries) > 0 {
			return fmt.Errorf("pki: %s is missing but %s lists paired primaries; restore the CA from backup "+
				"(a new CA would cut off every paired primary)", a.path(caCertFile), a.path(primariesFile))
		}
		return a.createCA()
	}
	if err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	cert, err := parseCertPEM(certPEM)
	if err != nil {
		return fmt.Errorf("pki: %s: %w", a.path(caCertFile), err)
	}
	if !cert.IsCA {
		return fmt.Errorf("pki: %s is not a CA certificate", a.path(caCertFile))
	}
	keyPEM, err := os.ReadFile(a.path(caKeyFile))
	if err != nil {
		return fmt.Errorf("pki: CA key: %w", err)
	}
	key, err := parseKeyPEM(keyPEM)
	if err != nil {
		return fmt.Errorf("pki: %s: %w", a.path(caKeyFile), err)
	}
	if !key.PublicKey.Equal(cert.PublicKey) {
		return fmt.Errorf("pki: %s does not belong to %s", a.path(caKeyFile), a.path(caCertFile))
	}
	a.setCA(cert, key)
	return nil
}

func (a *Authority) createCA() error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	host, _ := os.Hostname()
	suffix := make([]byte, 4)
	rand.Read(suffix)
	now := a.now()
	tmpl := &x509.Certificate{
		SerialNumber: randSerial(),
		Subject: pkix.Name{
			Organization: []string{"standin"},
			// Unique per replica: clients choose their certificate by issuer name.
			CommonName: fmt.Sprintf("standin replica CA %s %x", host, suffix),
		},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(caValidity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return fmt.Errorf("pki: create CA: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	keyPEM, err := marshalKeyPEM(key)
	if err != nil {
		return err
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	if err := fsutil.WriteFileAtomic(a.path(caKeyFile), keyPEM, 0o600); err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	if err := fsutil.WriteFileAtomic(a.path(caCertFile), certPEM, 0o600); err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	a.setCA(cert, key)
	return nil
}

func (a *Authority) setCA(cert *x509.Certificate, key *ecdsa.PrivateKey) {
	a.caCert, a.caKey = cert, key
	a.caPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})
	a.clientPool = x509.NewCertPool()
	a.clientPool.AddCert(cert)
}

// ---- server certificate -----------------------------------------------------

// wantHosts is the SAN set the server certificate must have. Call with a.mu held.
func (a *Authority) wantHosts() []string {
	var st hostsState
	_ = fsutil.ReadJSON(a.path(hostsFile), &st) // missing or bad file: no extra hosts
	extra, _ := normalizeHosts(st.Extra)
	out := append(slices.Clone(a.hosts), extra...)
	slices.Sort(out)
	return slices.Compact(out)
}

type hostsState struct {
	Extra []string `json:"extra"` // server names added by NewToken
}

// ensureServerCert loads the server certificate and re-issues it if needed.
// Call with a.mu and the flock held.
func (a *Authority) ensureServerCert() error {
	if err := a.loadServerCert(); err == nil && a.serverOK() {
		return nil
	}
	return a.issueServerCert()
}

func (a *Authority) serverOK() bool {
	leaf := a.serverLeaf
	if leaf.CheckSignatureFrom(a.caCert) != nil {
		return false
	}
	if a.now().After(leaf.NotAfter.Add(-renewBefore)) {
		return false
	}
	return slices.Equal(certHosts(leaf), a.wantHosts())
}

func (a *Authority) issueServerCert() error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	hosts := a.wantHosts()
	now := a.now()
	tmpl := &x509.Certificate{
		SerialNumber: randSerial(),
		Subject:      pkix.Name{Organization: []string{"standin"}, CommonName: "standin replica"},
		NotBefore:    now.Add(-backdate),
		NotAfter:     now.Add(serverValidity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.caCert, &key.PublicKey, a.caKey)
	if err != nil {
		return fmt.Errorf("pki: issue server certificate: %w", err)
	}
	keyPEM, err := marshalKeyPEM(key)
	if err != nil {
		return err
	}
	// server.pem is the full chain, leaf then CA, so that primaries can pin the CA.
	chain := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	chain = append(chain, a.caPEM...)
	// Key first: a crash in between leaves a mismatching pair, which the next
	// open detects and re-issues.
	if err := fsutil.WriteFileAtomic(a.path(serverKey), keyPEM, 0o600); err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	if err := fsutil.WriteFileAtomic(a.path(serverCert), chain, 0o600); err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	return a.loadServerCert()
}

func (a *Authority) serverFiles() (certFile, keyFile string) {
	if a.enterprise {
		return a.certFile, a.keyFile
	}
	return a.path(serverCert), a.path(serverKey)
}

// loadServerCert (re)loads the server key pair. Call with a.mu held.
func (a *Authority) loadServerCert() error {
	cf, kf := a.serverFiles()
	s0, s1 := stampOf(cf), stampOf(kf)
	cert, err := tls.LoadX509KeyPair(cf, kf)
	if err != nil {
		return fmt.Errorf("pki: server certificate: %w", err)
	}
	if cert.Leaf == nil {
		if cert.Leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return fmt.Errorf("pki: server certificate: %w", err)
		}
	}
	a.server, a.serverLeaf, a.serverStamp = &cert, cert.Leaf, [2]fileStamp{s0, s1}
	return nil
}

func (a *Authority) serverChanged() bool {
	cf, kf := a.serverFiles()
	return stampOf(cf) != a.serverStamp[0] || stampOf(kf) != a.serverStamp[1]
}

// ---- helpers ----------------------------------------------------------------

// fileStamp identifies one version of a file written by rename.
type fileStamp struct {
	ino, size int64
	mod       int64
}

func stampOf(path string) fileStamp {
	fi, err := os.Stat(path)
	if err != nil {
		return fileStamp{ino: -1}
	}
	s := fileStamp{size: fi.Size(), mod: fi.ModTime().UnixNano()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		s.ino = int64(st.Ino)
	}
	return s
}

func defaultHosts(hosts []string) []string {
	out := append(slices.Clone(hosts), "127.0.0.1", "::1", "localhost")
	if h, err := os.Hostname(); err == nil && h != "" {
		out = append(out, h)
	}
	return out
}

// normalizeHosts canonicalises host names and IPs (port stripped, lower case,
// IPv4-mapped IPv6 as IPv4), sorted and without duplicates.
func normalizeHosts(hosts []string) ([]string, error) {
	var out []string
	for _, h := range hosts {
		h, err := normalizeHost(h)
		if err != nil {
			return nil, err
		}
		if h != "" {
			out = append(out, h)
		}
	}
	slices.Sort(out)
	return slices.Compact(out), nil
}

func normalizeHost(h string) (string, error) {
	h = strings.TrimSpace(h)
	if host, _, err := net.SplitHostPort(h); err == nil {
		h = host
	}
	h = strings.TrimSuffix(strings.TrimPrefix(h, "["), "]")
	if h == "" {
		return "", nil
	}
	if ip := net.ParseIP(h); ip != nil {
		if v4 := ip.To4(); v4 != nil {
			ip = v4
		}
		return ip.String(), nil
	}
	h = strings.ToLower(strings.TrimSuffix(h, "."))
	if len(h) > 253 {
		return "", fmt.Errorf("pki: host name %.40q… is too long", h)
	}
	for _, c := range h {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '.' || c == '_' || c == '*') {
			return "", fmt.Errorf("pki: %q is neither an IP address nor a DNS name", h)
		}
	}
	return h, nil
}

func certHosts(c *x509.Certificate) []string {
	hs := slices.Clone(c.DNSNames)
	for _, ip := range c.IPAddresses {
		hs = append(hs, ip.String())
	}
	out, _ := normalizeHosts(hs)
	return out
}

func randSerial() *big.Int {
	b := make([]byte, 16)
	rand.Read(b)
	b[0] &= 0x7f // positive
	b[0] |= 0x40 // and never short
	return new(big.Int).SetBytes(b)
}

func randHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func marshalKeyPEM(key *ecdsa.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

func parseKeyPEM(b []byte) (*ecdsa.PrivateKey, error) {
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			return nil, errors.New("no PEM private key")
		}
		switch blk.Type {
		case "PRIVATE KEY":
			k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
			if err != nil {
				return nil, err
			}
			ek, ok := k.(*ecdsa.PrivateKey)
			if !ok {
				return nil, errors.New("not an ECDSA key")
			}
			return ek, nil
		case "EC PRIVATE KEY":
			return x509.ParseECPrivateKey(blk.Bytes)
		}
	}
}

func parseCertPEM(b []byte) (*x509.Certificate, error) {
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			return nil, errors.New("no PEM certificate")
		}
		if blk.Type == "CERTIFICATE" {
			return x509.ParseCertificate(blk.Bytes)
		}
	}
}

// Fingerprint is the lower-case hex SHA-256 of a certificate's DER bytes.
func Fingerprint(c *x509.Certificate) string {
	s := sha256.Sum256(c.Raw)
	return hex.EncodeToString(s[:])
}
