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
)

// NewCSR makes a P-256 key and a certificate request for the primary. The
// replica ignores the request's subject (it assigns the primary ID); name is
// put in it for people reading the request.
func NewCSR(name string) (keyPEM, csrPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("pki: %w", err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{Organization: []string{"standin"}, CommonName: name},
	}, key)
	if err != nil {
		return nil, nil, fmt.Errorf("pki: certificate request: %w", err)
	}
	if keyPEM, err = marshalKeyPEM(key); err != nil {
		return nil, nil, err
	}
	return keyPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), nil
}

// ErrPinMismatch is returned by the pinned handshake when the server does not
// present a CA with the token's fingerprint.
var ErrPinMismatch = errors.New("pki: the replica's certificate does not match the CA fingerprint in the token " +
	"(the address reaches a different server, or someone is intercepting; check the address in the token)")

// PinnedClientTLS is the primary's configuration for the pairing request,
// before it has the replica CA: it trusts only a CA certificate whose SHA-256
// equals pin, which the server must send in its chain (ServerTLS does). The
// server certificate must chain to that CA, be valid for server auth, and, if
// serverName is not empty, be valid for serverName. System roots are never used.
func PinnedClientTLS(pin [32]byte, serverName string) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		ServerName: serverName,
		// The standard verification (system roots) is replaced by
		// VerifyConnection, which runs on every handshake, resumed ones too.
		InsecureSkipVerify: true,
		VerifyConnection: func(cs tls.ConnectionState) error {
			return verifyPinned(cs.PeerCertificates, pin, serverName)
		},
	}
}

func verifyPinned(chain []*x509.Certificate, pin [32]byte, serverName string) error {
	if len(chain) == 0 {
		return fmt.Errorf("%w: no certificate", ErrPinMismatch)
	}
	roots := x509.NewCertPool()
	inter := x509.NewCertPool()
	found := false
	for _, c := range chain[1:] {
		if sha256.Sum256(c.Raw) == pin && c.IsCA && c.BasicConstraintsValid {
			roots.AddCert(c)
			found = true
		} else {
			inter.AddCert(c)
		}
	}
	if !found {
		return fmt.Errorf("%w: want CA %s", ErrPinMismatch, hex.EncodeToString(pin[:8]))
	}
	_, err := chain[0].Verify(x509.VerifyOptions{
		Roots: roots, Intermediates: inter, DNSName: serverName,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	if err != nil {
		return fmt.Errorf("%w: %v", ErrPinMismatch, err)
	}
	return nil
}

// ClientTLS is the primary's configuration after pairing: it trusts only the
// CAs in caPEM (verifying serverName; when empty, net/http fills it in from
// the URL) and always presents certPEM/keyPEM.
func ClientTLS(caPEM, certPEM, keyPEM []byte, serverName string) (*tls.Config, error) {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, errors.New("pki: the replica CA file holds no PEM certificate (pair again: standin pair join TOKEN)")
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("pki: client certificate: %w", err)
	}
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		RootCAs:    pool,
		ServerName: serverName,
		// Always present our certificate; Go's default selection would drop it
		// when the chain in certPEM does not name one of the server's CAs.
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil },
	}, nil
}

// CheckJoinReply verifies on the primary what the replica returned from Join:
// caPEM is the CA the token pinned, certPEM chains to it and holds the public
// key of keyPEM. It returns the primary ID (the certificate CN).
func CheckJoinReply(t Token, keyPEM, certPEM, caPEM []byte) (primaryID string, err error) {
	ca, err := parseCertPEM(caPEM)
	if err != nil || sha256.Sum256(ca.Raw) != t.CAFingerprint {
		return "", fmt.Errorf("%w: the CA returned by the replica", ErrPinMismatch)
	}
	cert, err := parseCertPEM(certPEM)
	if err != nil {
		return "", fmt.Errorf("pki: client certificate from the replica: %w", err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	if _, err := cert.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		return "", fmt.Errorf("pki: client certificate from the replica: %w", err)
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return "", fmt.Errorf("pki: client certificate from the replica does not match our key: %w", err)
	}
	if !bytes.Equal(pair.Certificate[0], cert.Raw) {
		return "", errors.New("pki: client certificate from the replica: unexpected chain")
	}
	return cert.Subject.CommonName, nil
}
