package pki

import (
	"bytes"
	"testing"
	"time"
)

// FuzzToken decodes pairing tokens (pasted by an admin). An accepted token
// re-encodes to the same token.
func FuzzToken(f *testing.F) {
	t0 := Token{Addr: "replica.example:7450", Secret: bytes.Repeat([]byte{7}, 32), Expires: time.Unix(1767225600, 0).UTC()}
	t0.CAFingerprint[3] = 9
	f.Add(t0.String())
	f.Add(TokenPrefix)
	f.Add("standin2:abc")
	f.Fuzz(func(t *testing.T, s string) {
		tok, err := decodeToken(s)
		if err != nil {
			return
		}
		if len(tok.Secret) != 32 || tok.Addr == "" {
			t.Fatalf("token with a %d-byte secret and address %q accepted", len(tok.Secret), tok.Addr)
		}
		t2, err := decodeToken(tok.String())
		if err != nil || t2.Addr != tok.Addr || !bytes.Equal(t2.Secret, tok.Secret) || !t2.Expires.Equal(tok.Expires) || t2.CAFingerprint != tok.CAFingerprint {
			t.Fatalf("token round trip: %v", err)
		}
	})
}

// FuzzParseCSR parses the certificate request of a pairing request (from
// the network, before the token is checked).
func FuzzParseCSR(f *testing.F) {
	_, csr, err := NewCSR("prim")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(csr)
	f.Add([]byte("-----BEGIN CERTIFICATE REQUEST-----\n-----END CERTIFICATE REQUEST-----\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := parseCSR(data)
		if err == nil && c == nil {
			t.Fatal("nil request without an error")
		}
	})
}
