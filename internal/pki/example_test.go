package pki_test

import (
	"fmt"
	"net/http"
	"os"

	"github.com/standin/standin/internal/pki"
)

// The whole pairing, both sides. The HTTP routes live with the replica daemon
// (internal/wire names them); this shows which pki call goes where.
func Example() {
	// Replica, at start: the CA and the listener.
	dir, _ := os.MkdirTemp("", "pki")
	defer os.RemoveAll(dir)
	a, err := pki.OpenAuthority(dir, []string{"replica.example"})
	if err != nil {
		panic(err)
	}
	srv := &http.Server{TLSConfig: a.ServerTLS()} // POST /v1/pair calls a.Join; every other handler calls a.Authorize
	_ = srv

	// Replica admin: "standin pair token --store RSTORE --addr replica.example:8443 --images 'db/*'".
	tok, _ := a.NewToken("replica.example:8443", "db/*", 0)

	// Primary: "standin pair join TOKEN".
	t, _ := pki.ParseToken(tok)
	keyPEM, csrPEM, _ := pki.NewCSR("primary1")
	_ = pki.PinnedClientTLS(t.CAFingerprint, t.ServerName()) // dial t.Addr with this, send t.Secret and csrPEM

	// Replica, in the pairing handler.
	certPEM, caPEM, p, _ := a.Join(t.Secret, csrPEM, "primary1")

	// Primary: check the reply, keep ca.pem, client.pem, client.key; use ClientTLS from now on.
	id, _ := pki.CheckJoinReply(t, keyPEM, certPEM, caPEM)
	_, _ = pki.ClientTLS(caPEM, certPEM, keyPEM, t.ServerName())

	fmt.Println(id == p.ID, p.Allowed("db", "vm1"), p.Allowed("web", "vm1"))
	// Output: true true false
}
