package integration

// Replication end to end with real processes: a replica daemon (standin
// serve) on 127.0.0.1 with mutual TLS, a primary mount daemon replicating a
// group of images to it, recovery points exported and compared by BLAKE3 with
// the primary's backing files frozen at the cut (I1, I2, I3, I4).

import (
	"testing"
	"time"
)

const (
	mib = int64(1 << 20)
)

func TestReplEndToEnd(t *testing.T) {
	e := newReplEnv(t, "vm1", imgSpec{"a.img", 64 * mib}, imgSpec{"b.img", 32 * mib})
	e.pair("vm1/*", e.Rep.Addr)
	e.enable(e.Rep.Addr, "--interval", "2s")

	// Base: the whole allocated images (prefilled with random data).
	want := e.frozen()
	e.now()
	e.checkPoint("latest", want, "base")
	verifyPoint(t, e.RStore, e.Group, "latest")
	st := e.status()
	allocated := allocatedBytes(t, e.PStore+"/images/a.img") + allocatedBytes(t, e.PStore+"/images/b.img")
	t.Logf("base: bytes_sent %d (allocated %d, image size %d), health %s", st.BytesSent, allocated, 96*mib, st.Health)
	if st.BytesSent < allocated*9/10 || st.BytesSent > allocated*11/10+mib {
		t.Errorf("base: bytes_sent %d, want about the allocated %d bytes (random data)", st.BytesSent, allocated)
	}
	if st.Health != "Normal" {
		t.Errorf("base: health %s %v, want Normal", st.Health, st.Reasons)
	}
	prevPoints := len(listPoints(t, e.RStore, e.Group))

	for round := 1; round <= 4; round++ {
		before := e.status().BytesSent
		ba := e.writeRandom("a.img", 200, 16, 0, 64*mib)
		bb := e.writeRandom("b.img", 100, 16, 0, 32*mib)
		dirty := int64(len(ba)+len(bb)) * blockSize
		want := e.frozen()
		e.now()
		e.checkPoint("latest", want, "round")
		verifyPoint(t, e.RStore, e.Group, "latest")
		st := e.status()
		sent := st.BytesSent - before
		t.Logf("round %d: dirty %d bytes, bytes_sent %d (%.2f× dirty), cycles %d, point %s, health %s",
			round, dirty, sent, float64(sent)/float64(dirty), st.Cycles, st.LastPoint, st.Health)
		// Random data: every dirty block ships at least once (zstd cannot
		// shrink it); automatic 2 s rounds may split the writes over two cuts,
		// so a block can ship twice, but never the whole image.
		if sent < dirty*9/10 {
			t.Errorf("round %d: bytes_sent %d < 0.9 × dirty %d: dirty blocks did not ship", round, sent, dirty)
		}
		if sent > 2*dirty+mib {
			t.Errorf("round %d: bytes_sent %d > 2 × dirty %d + 1 MiB (image size %d)", round, sent, dirty, 96*mib)
		}
		if st.Health != "Normal" || st.LastError != "" {
			t.Errorf("round %d: health %s %v last_error %q, want Normal", round, st.Health, st.Reasons, st.LastError)
		}
		ps := listPoints(t, e.RStore, e.Group)
		if len(ps) == 0 || ps[len(ps)-1].Kind != "latest" {
			t.Errorf("round %d: points %v: last one is not kind latest", round, pointIDs(ps))
		} else if len(ps) < prevPoints {
			t.Errorf("round %d: points shrank from %d to %d with the default retention", round, prevPoints, len(ps))
		}
		prevPoints = len(ps)
		if st.LastPoint == "" {
			t.Errorf("round %d: replicate list has no last_point", round)
		}
	}
	// Every point the replica shows verifies.
	for _, p := range listPoints(t, e.RStore, e.Group) {
		verifyPoint(t, e.RStore, e.Group, p.Point)
	}
	if n, _ := stagedFiles(e.PStore); n != 0 {
		// The automatic round may have cut meanwhile; wait for it to ship.
		if !waitFor(10*time.Second, 100*time.Millisecond, func() bool { n, _ := stagedFiles(e.PStore); return n == 0 }) {
			t.Errorf("shipped cycle files are not deleted from the primary: %d left", n)
		}
	}
}
