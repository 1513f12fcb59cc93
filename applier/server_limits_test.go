package applier

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/standin/standin/internal/pki"
	"github.com/standin/standin/internal/wire"
)

// srvEnv is a replica API server over real TLS on loopback, with primaries
// paired through real tokens.
type srvEnv struct {
	t    *testing.T
	rep  *Replica
	auth *pki.Authority
	srv  *Server
	addr string
	cyc  string
	rng  *rand.Rand
	gc   int
}

// newSrvEnv starts the server; serve, if set, starts it on the listener
// instead of a plain http.Server.
func newSrvEnv(t *testing.T, serve func(s *Server, ln net.Listener) *http.Server) *srvEnv {
	t.Helper()
	dir := t.TempDir()
	rep, err := OpenReplica(dir, ReplicaOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rep.Close() })
	srv, auth := newTestServer(t, rep, dir+"/inbox")
	ln := listenLoopback(t)
	if serve != nil {
		hs := serve(srv, ln)
		t.Cleanup(func() { hs.Close() })
	} else {
		serveTLSOn(t, srv, auth, ln)
	}
	return &srvEnv{t: t, rep: rep, auth: auth, srv: srv, addr: ln.Addr().String(), cyc: t.TempDir(), rng: rand.New(rand.NewPCG(1, 2))}
}

// pair pairs a primary named name and returns its client and ID.
func (e *srvEnv) pair(name string) (*http.Client, string) {
	e.t.Helper()
	c := pairTLS(e.t, e.auth, e.addr, "*", name)
	return c.hc, c.id
}

func (e *srvEnv) do(hc *http.Client, method, path string, body io.Reader, n int64) (*http.Response, wire.Error) {
	e.t.Helper()
	req, err := http.NewRequest(method, "https://"+e.addr+wire.Prefix+path, body)
	if err != nil {
		e.t.Fatal(err)
	}
	if n >= 0 {
		req.ContentLength = n
	}
	resp, err := hc.Do(req)
	if err != nil {
		e.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var we wire.Error
	if resp.StatusCode != http.StatusOK {
		json.Unmarshal(b, &we)
	}
	return resp, we
}

// cycle writes the next cycle of ti (a base first) and returns its path.
func (e *srvEnv) cycle(ti *tImage) (string, *tImage) {
	e.gc++
	return ti.cycle(e.t, e.cyc, e.rng, [16]byte{byte(e.gc), 0xc0}, time.Now().Add(-time.Minute), cycOpt{nOps: 8})
}

func uploadPath(group string, ti *tImage, off, total int64) string {
	return fmt.Sprintf("/groups/%s/uploads/%s/%d/%d?offset=%d&total=%d&name=%s", group, ti.idString(), ti.gen, ti.seq, off, total, ti.name)
}

// ship uploads the cycle at path (whole) and commits it.
func (e *srvEnv) ship(hc *http.Client, group, path string, ti *tImage) (int, wire.Error) {
	e.t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		e.t.Fatal(err)
	}
	resp, we := e.do(hc, "PUT", uploadPath(group, ti, 0, int64(len(b))), bytes.NewReader(b), int64(len(b)))
	if resp.StatusCode != http.StatusOK {
		return resp.StatusCode, we
	}
	cr, _ := json.Marshal(wire.CommitRequest{GroupCut: "x", Cycles: []wire.CycleRef{{ID: ti.idString(), Gen: ti.gen, Seq: ti.seq}},
		Policy: wire.Policy{Interval: time.Minute, Points: 4, PointEvery: time.Hour}})
	resp, we = e.do(hc, "POST", "/groups/"+group+"/commit", bytes.NewReader(cr), -1)
	return resp.StatusCode, we
}

func (e *srvEnv) lockEntries() int {
	e.srv.mu.Lock()
	defer e.srv.mu.Unlock()
	return len(e.srv.locks)
}

// The per-upload lock map holds only uploads in progress: after uploads,
// state queries and discards it is empty again.
func TestUploadLocksShrink(t *testing.T) {
	t.Parallel()
	e := newSrvEnv(t, nil)
	hc, _ := e.pair("prim")
	ti := newTImage(0x51, "a.img")
	for i := 0; i < 5; i++ {
		p, next := e.cycle(ti)
		if code, we := e.ship(hc, "vm1", p, next); code != http.StatusOK {
			t.Fatalf("cycle %d: %d %+v", i, code, we)
		}
		ti = next
		e.do(hc, "GET", fmt.Sprintf("/groups/vm1/uploads/%s/%d/%d", ti.idString(), ti.gen, ti.seq+1), nil, -1)
		e.do(hc, "DELETE", fmt.Sprintf("/groups/vm1/uploads/%s/%d/%d?name=a.img", ti.idString(), ti.gen, ti.seq+1), nil, -1)
	}
	if n := e.lockEntries(); n != 0 {
		t.Fatalf("%d upload lock entries left after the uploads finished, want 0", n)
	}
}

// An upload body longer than the cycle bytes it claims to carry is refused
// 413 before it is read, and nothing reaches the inbox.
func TestUploadBodyTooLarge(t *testing.T) {
	t.Parallel()
	e := newSrvEnv(t, nil)
	hc, _ := e.pair("prim")
	ti := newTImage(0x52, "a.img")
	p, next := e.cycle(ti)
	b, _ := os.ReadFile(p)
	total := int64(len(b))
	// Claims 1 TiB of body for a cycle of a few KiB and sends only the
	// cycle: a server that believed the length would wait for the rest.
	cfg := hc.Transport.(*http.Transport).TLSClientConfig
	conn, err := tls.Dial("tcp", e.addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "PUT %s%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n", wire.Prefix, uploadPath("vm1", next, 0, total), int64(1)<<40)
	conn.Write(b)
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("body of 1 TiB for a %d-byte cycle: %v, want a 413 answer at once", total, err)
	}
	var we wire.Error
	json.NewDecoder(resp.Body).Decode(&we)
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestEntityTooLarge || we.Code != "too_large" || !strings.Contains(we.Error, "longer than") {
		t.Fatalf("body of 1 TiB for a %d-byte cycle: %d %+v, want 413 too_large", total, resp.StatusCode, we)
	}
	// Same for a resumed upload: offset 10 of total leaves total-10 bytes.
	resp2, we := e.do(hc, "PUT", uploadPath("vm1", next, 10, total), bytes.NewReader(b), total)
	if resp2.StatusCode != http.StatusRequestEntityTooLarge && resp2.StatusCode != http.StatusConflict {
		t.Fatalf("body of %d bytes at offset 10 of %d: %d %+v, want 413 (or 409 for the offset)", total, total, resp2.StatusCode, we)
	}
	if n, _ := inboxBytes(e.rep.dir + "/inbox"); n != 0 {
		t.Fatalf("%d bytes reached the inbox from refused uploads", n)
	}
}

func inboxBytes(dir string) (int64, error) {
	var n int64
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			fi, err := d.Info()
			if err == nil {
				n += fi.Size()
			}
		}
		return nil
	})
	return n, err
}

// A request refused for lack of credentials closes its connection: an
// unauthenticated client cannot park keep-alive connections on the replica.
func TestRefusedRequestClosesConnection(t *testing.T) {
	t.Parallel()
	e := newSrvEnv(t, nil)
	conn, err := tls.Dial("tcp", e.addr, &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "GET %s/groups/vm1 HTTP/1.1\r\nHost: x\r\n\r\n", wire.Prefix)
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("unauthenticated GET: %d, want 401", resp.StatusCode)
	}
	if !resp.Close {
		t.Errorf("401 answer without Connection: close")
	}
	// The server must close its side: the next read sees EOF, not a timeout.
	if _, err := br.ReadByte(); err != io.EOF {
		t.Fatalf("after the 401 the connection stays open (read: %v), want EOF", err)
	}
}
