package dedup

import (
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"
)

// Ids that agree in the 44 bits the table keeps are told apart by the full
// id from the store; nothing is deduplicated wrongly.
func TestIDTableCollisions(t *testing.T) {
	st, err := openIDStore(filepath.Join(t.TempDir(), "ids"), 0)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	tab := &idTable{}
	r := rand.New(rand.NewPCG(5, 6))
	var ids [][32]byte
	for i := 0; i < 20000; i++ {
		var id [32]byte
		if i%3 == 1 {
			id = ids[i-1] // same first 8 bytes as the previous id, other tail
			binary.LittleEndian.PutUint64(id[24:], r.Uint64())
		} else {
			for j := 0; j < 32; j += 8 {
				binary.LittleEndian.PutUint64(id[j:], r.Uint64())
			}
		}
		ids = append(ids, id)
	}
	for n, id := range ids {
		if _, found, err := tab.lookup(&id, st.get); err != nil || found {
			t.Fatalf("id %d found before insertion (%v)", n, err)
		}
		if err := tab.insert(&id, uint64(n)); err != nil {
			t.Fatal(err)
		}
		st.add(id)
		if n%1000 == 999 { // move part of the ids to the file, as the pack writer does
			d := st.durable.Load()
			if err := st.write(d, st.recent[d-st.base:uint64(n+1)-st.base]); err != nil {
				t.Fatal(err)
			}
			st.trim()
		}
	}
	for n, id := range ids {
		got, found, err := tab.lookup(&id, st.get)
		if err != nil || !found || got != uint64(n) {
			t.Fatalf("id %d: got %d %v %v", n, got, found, err)
		}
	}
}

// TestIDTableScale measures the table's memory per unique chunk and its
// speed at a larger scale (STANDIN_DEDUP_PERF=1; STANDIN_DEDUP_IDS=N ids,
// default 20M).
func TestIDTableScale(t *testing.T) {
	if os.Getenv("STANDIN_DEDUP_PERF") == "" {
		t.Skip("set STANDIN_DEDUP_PERF=1")
	}
	n := 20_000_000
	if v := os.Getenv("STANDIN_DEDUP_IDS"); v != "" {
		fmt.Sscan(v, &n)
	}
	// ids are BLAKE3 outputs: uniform. The full-id check reads a
	// deterministic function of the number.
	idOf := func(i uint64) (id [32]byte) {
		x := rand.New(rand.NewPCG(i, 77))
		for j := 0; j < 32; j += 8 {
			binary.LittleEndian.PutUint64(id[j:], x.Uint64())
		}
		return
	}
	full := func(i uint64) ([32]byte, error) { return idOf(i), nil }
	runtime.GC()
	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	tab := &idTable{}
	start := time.Now()
	for i := uint64(0); i < uint64(n); i++ {
		id := idOf(i)
		if _, found, _ := tab.lookup(&id, full); found {
			t.Fatal("false hit")
		}
		tab.insert(&id, i)
	}
	ins := time.Since(start)
	runtime.GC()
	runtime.ReadMemStats(&m1)
	start = time.Now()
	for i := uint64(0); i < uint64(n); i += 7 {
		id := idOf(i)
		if got, found, _ := tab.lookup(&id, full); !found || got != i {
			t.Fatal("lost id")
		}
	}
	look := time.Since(start)
	t.Logf("%d ids: table %.1f MiB = %.2f B/id (slots), heap growth %.2f B/id; lookup+insert %.0f ns/id, hit lookup %.0f ns/id (incl. id generation)",
		n, float64(tab.bytes())/(1<<20), float64(tab.bytes())/float64(n), float64(m1.HeapInuse-m0.HeapInuse)/float64(n),
		float64(ins.Nanoseconds())/float64(n), float64(look.Nanoseconds())/float64(n/7))
}
