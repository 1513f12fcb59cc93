package applier

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/RoaringBitmap/roaring/v2"

	"github.com/standin/standin/internal/testutil"
	"github.com/standin/standin/internal/wire"
)

// FuzzServer sends request bodies to the replica's HTTP handler as a
// really paired primary (its client certificate from a real pairing) would:
// commit, seed announcement, held query (binary), regions query, failover
// request, cycle upload, and the unauthenticated pairing request. Every
// refusal must be a JSON error with a message; nothing may panic.
func FuzzServer(f *testing.F) {
	src := fuzzReplicaDir(f)
	dir := f.TempDir()
	copyTree(f, src, dir)
	now := time.Date(2025, 6, 1, 13, 0, 0, 0, time.UTC)
	rep, err := OpenReplica(dir, ReplicaOptions{Now: func() time.Time { return now }})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { rep.Close() })
	srv, auth := newTestServer(f, rep, f.TempDir())
	tok, err := auth.NewToken("127.0.0.1:1", "*", 0)
	if err != nil {
		f.Fatal(err)
	}
	pt, _, csr := tokenCSR(f, tok, "prim")
	certPEM, _, _, err := auth.Join(pt.Secret, csr, "prim")
	if err != nil {
		f.Fatal(err)
	}
	blk, _ := pem.Decode(certPEM)
	cert, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		f.Fatal(err)
	}
	tlsState := &tls.ConnectionState{PeerCertificates: []*x509.Certificate{cert}}
	h := srv.Handler()
	id := fuzzImageUUID

	hashes, err := os.ReadFile(filepath.Join(src, fuzzImageDir, "hashes.bin"))
	if err != nil {
		f.Fatal(err)
	}
	cand := roaring.BitmapOf(1, 2, 7, 100000)
	cb, _ := cand.ToBytes()
	f.Add(uint8(0), fuzzJSON(f, wire.CommitRequest{GroupCut: "03f0", Cycles: []wire.CycleRef{{ID: id, Gen: 1, Seq: 3}}, Policy: wire.Policy{Points: 4}}))
	f.Add(uint8(1), fuzzJSON(f, wire.SeedExpect{GroupCut: "00", Time: now, Images: []wire.ImageState{{ID: id, Name: "disk0.img", Generation: 2, Seq: 5}}}))
	f.Add(uint8(2), wire.EncodeHeld([]wire.HeldRun{{Start: 0, Hashes: hashes[:64]}, {Start: 5, Hashes: hashes[5*32 : 7*32]}}))
	f.Add(uint8(3), binary.LittleEndian.AppendUint64(binary.LittleEndian.AppendUint64(binary.LittleEndian.AppendUint64(nil, 12), 0), 1))
	f.Add(uint8(4), fuzzJSON(f, wire.FailoverRequest{Kind: "reverse", Images: []wire.FailoverImage{{ID: id, Name: "disk0.img", Generation: 1, Seq: 2, Size: 4096, Candidates: cb}}}))
	f.Add(uint8(5), fuzzCycleBytes(f, 3))
	f.Add(uint8(6), fuzzJSON(f, wire.PairRequest{Secret: pt.Secret, CSR: csr, Name: "other"}))

	f.Add(uint8(7), append(binary.LittleEndian.AppendUint64(binary.LittleEndian.AppendUint64(nil, 0), 1000), fuzzCycleBytes(f, 3)[:100]...))
	f.Add(uint8(8), []byte("vm1\x00"+id+"\x001\x003"))
	f.Fuzz(func(t *testing.T, which uint8, body []byte) {
		var req *http.Request
		p := wire.Prefix + "/groups/vm1"
		switch which % 9 {
		case 7: // a part of an upload: offset and total from the input
			var off, total uint64
			if len(body) >= 16 {
				off, total, body = binary.LittleEndian.Uint64(body), binary.LittleEndian.Uint64(body[8:]), body[16:]
			}
			req = httptest.NewRequest("PUT", fmt.Sprintf("%s/uploads/%s/1/4?offset=%d&total=%d&name=disk0.img", p, id, off, total), bytes.NewReader(body))
			defer func() {
				del := httptest.NewRequest("DELETE", p+"/uploads/"+id+"/1/4?name=disk0.img", nil)
				del.TLS = tlsState
				h.ServeHTTP(httptest.NewRecorder(), del)
			}()
		case 8: // upload state and discard with path components from the input
			c := strings.SplitN(string(body), "\x00", 4)
			for len(c) < 4 {
				c = append(c, "")
			}
			method := "GET"
			if len(body) > 0 && body[len(body)-1]&1 == 1 {
				method = "DELETE"
			}
			req = httptest.NewRequest(method, wire.Prefix+"/groups/"+url.PathEscape(c[0])+"/uploads/"+url.PathEscape(c[1])+"/"+url.PathEscape(c[2])+"/"+url.PathEscape(c[3])+"?name=disk0.img", nil)
		case 0:
			req = httptest.NewRequest("POST", p+"/commit", bytes.NewReader(body))
		case 1:
			req = httptest.NewRequest("POST", p+"/seed", bytes.NewReader(body))
		case 2:
			req = httptest.NewRequest("POST", p+"/images/"+id+"/held?name=disk0.img&blocks=12", bytes.NewReader(body))
		case 3:
			var q [3]uint64
			for i := range q {
				if len(body) >= 8*(i+1) {
					q[i] = binary.LittleEndian.Uint64(body[8*i:])
				}
			}
			req = httptest.NewRequest("GET", fmt.Sprintf("%s/images/%s/regions?name=disk0.img&blocks=%d&from=%d&count=%d", p, id, q[0], q[1], q[2]), nil)
		case 4:
			req = httptest.NewRequest("POST", p+"/failover", bytes.NewReader(body))
		case 5:
			req = httptest.NewRequest("PUT", fmt.Sprintf("%s/uploads/%s/1/3?offset=0&total=%d&name=disk0.img", p, id, len(body)), bytes.NewReader(body))
			defer func() { // the next upload starts afresh
				del := httptest.NewRequest("DELETE", p+"/uploads/"+id+"/1/3?name=disk0.img", nil)
				del.TLS = tlsState
				h.ServeHTTP(httptest.NewRecorder(), del)
			}()
		case 6:
			req = httptest.NewRequest("POST", wire.Prefix+"/pair", bytes.NewReader(body))
		}
		if which%9 != 6 {
			req.TLS = tlsState
		}
		w := httptest.NewRecorder()
		testutil.Deadline(t, 20*time.Second, func() { h.ServeHTTP(w, req) })
		// 3xx, 404 and 405 of unmatched paths come from http.ServeMux.
		if w.Code >= 400 && w.Code != http.StatusNotFound && w.Code != http.StatusMethodNotAllowed {
			var e wire.Error
			if err := json.Unmarshal(w.Body.Bytes(), &e); err != nil || e.Error == "" || e.Code == "" {
				t.Fatalf("%s %s: status %d without a JSON error: %q", req.Method, req.URL, w.Code, w.Body.Bytes())
			}
		}
	})
}

// fuzzCycleBytes is a real cycle file of the fuzz image (seq, generation 1).
func fuzzCycleBytes(tb testing.TB, seq uint64) []byte {
	tb.Helper()
	p := fuzzCycle(tb, tb.TempDir(), seq, 12*4096-100, map[uint64]byte{1: 3, 4: 0})
	b, err := os.ReadFile(p)
	if err != nil {
		tb.Fatal(err)
	}
	return b
}
