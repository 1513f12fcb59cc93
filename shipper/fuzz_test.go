package shipper

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/RoaringBitmap/roaring/v2"

	"github.com/standin/standin/internal/wire"
)

// FuzzParseCandidates decodes candidate block bitmaps (a failover request's
// candidates, the files of a pending failback hash check). An accepted
// bitmap is consistent: using it does not panic, and it round-trips.
func FuzzParseCandidates(f *testing.F) {
	for _, b := range []*roaring.Bitmap{roaring.New(), roaring.BitmapOf(1, 2, 3, 1<<20), func() *roaring.Bitmap {
		b := roaring.New()
		b.AddRange(100, 70000)
		for i := uint32(0); i < 5000; i += 7 {
			b.Add(1<<24 + i)
		}
		b.RunOptimize()
		return b
	}()} {
		data, err := b.ToBytes()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		b, err := ParseCandidates(bytes.Clone(data))
		if err != nil {
			return
		}
		b.GetCardinality()
		o := b.Clone()
		o.Or(roaring.BitmapOf(5, 1<<22))
		o.RunOptimize()
		it := b.Iterator()
		for i := 0; it.HasNext() && i < 1000; i++ {
			it.Next()
		}
		enc, err := b.ToBytes()
		if err != nil {
			t.Fatal(err)
		}
		b2, err := ParseCandidates(enc)
		if err != nil || !b2.Equals(b) {
			t.Fatalf("candidates round trip: %v", err)
		}
	})
}

// fakeReplica answers every request with one status and body.
type fakeReplica struct {
	status int
	body   io.Reader
}

func (f *fakeReplica) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.Body != nil {
		io.Copy(io.Discard, req.Body)
		req.Body.Close()
	}
	return &http.Response{StatusCode: f.status, Body: io.NopCloser(f.body), Header: http.Header{}, Request: req}, nil
}

// FuzzReplicaReply parses replica replies (status and body) the way the
// shipper's client does for state, commit, seed announcement, held and
// regions queries.
func FuzzReplicaReply(f *testing.F) {
	js := func(v any) []byte {
		b, _ := json.Marshal(v)
		return b
	}
	f.Add(uint8(0), uint16(200), js(wire.UploadState{Offset: 4096, Complete: true}))
	f.Add(uint8(1), uint16(200), js(wire.CommitReply{Point: "3"}))
	f.Add(uint8(2), uint16(200), js(wire.GroupState{Group: "vm1", Images: []wire.ImageState{{ID: "x", Name: "d", Generation: 1, Seq: 2}}}))
	f.Add(uint8(3), uint16(200), []byte{1, 0, 2})
	f.Add(uint8(4), uint16(200), bytes.Repeat([]byte{7}, 64))
	f.Add(uint8(1), uint16(409), js(wire.Error{Error: "missing", Code: "missing_chunks", Missing: []wire.MissingBlocks{{Runs: [][2]uint64{{1, 2}}}}}))
	f.Add(uint8(3), uint16(404), []byte("not found"))
	f.Fuzz(func(t *testing.T, which uint8, status uint16, body []byte) {
		if status < 100 || status > 999 {
			status = 200
		}
		c := &client{base: "https://replica.invalid/v1", hc: &http.Client{Transport: &fakeReplica{int(status), bytes.NewReader(body)}}}
		ctx := context.Background()
		ref := wire.CycleRef{ID: "11420707-0707-4007-8007-070707070711", Gen: 1, Seq: 3}
		runs := []wire.HeldRun{{Start: 0, Hashes: make([]byte, 64)}, {Start: 9, Hashes: make([]byte, 32)}}
		switch which % 6 {
		case 0:
			c.state(ctx, "vm1", ref)
		case 1:
			c.commit(ctx, "vm1", wire.CommitRequest{Cycles: []wire.CycleRef{ref}})
		case 2:
			c.announceSeed(ctx, "vm1", wire.SeedExpect{})
		case 3:
			out, _, err := c.held(ctx, "vm1", "d", ref.ID, 12, runs)
			if err == nil && len(out) != 3 {
				t.Fatalf("held: %d answers for 3 blocks accepted", len(out))
			}
		case 4:
			out, err := c.regions(ctx, "vm1", "d", ref.ID, 512, 0, 2)
			if err == nil && len(out) != 2*wire.HashSize {
				t.Fatalf("regions: %d bytes for 2 regions accepted", len(out))
			}
		case 5:
			c.discard(ctx, "vm1", "d", ref)
		}
	})
}

// endless is an endless JSON string: `{"group":"aaaa...`.
type endless struct{ started bool }

func (e *endless) Read(p []byte) (int, error) {
	n := 0
	if !e.started {
		n = copy(p, `{"group":"`)
		e.started = true
	}
	for i := n; i < len(p); i++ {
		p[i] = 'a'
	}
	return len(p), nil
}

// TestReplyBodyBounded: an endless reply is refused after a bounded read,
// not decoded until memory runs out.
func TestReplyBodyBounded(t *testing.T) {
	c := &client{base: "https://replica.invalid/v1", hc: &http.Client{Transport: &fakeReplica{200, &endless{}}}}
	_, err := c.announceSeed(context.Background(), "vm1", wire.SeedExpect{})
	if err == nil || !strings.Contains(err.Error(), "more than") {
		t.Fatalf("endless reply: %v", err)
	}
	t.Log(err)
}
