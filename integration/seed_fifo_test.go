package integration

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestSeedFIFO: a FIFO in place of a seed file makes 'seed verify' and
// 'seed import' (in the replica daemon) report it by name at once instead of
// hanging on it; damage within parity is still repaired and imported.
func TestSeedFIFO(t *testing.T) {
	requireRoot(t)
	tmpl := filepath.Join(testDir(t), "tmpl.img")
	prefill(t, tmpl, 24*mib, rand.New(rand.NewPCG(3, 9)))
	e := newSeedEnv(t, tmpl, "vm1")
	seed := filepath.Join(e.dir, "usb")
	e.export(seed, "--all", "--parity", "50%")
	atCut := e.primaryHashes()
	packs, _ := filepath.Glob(filepath.Join(seed, "packs", "*.pack"))
	if len(packs) == 0 {
		t.Fatal("no packs")
	}
	fifo := packs[0]
	os.Remove(fifo)
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	const prompt = 60 * time.Second
	r := standin(prompt, "seed", "verify", seed)
	if r.Code != 0 || !strings.Contains(r.Stdout, fifo) || !strings.Contains(r.Stdout, "FIFO") {
		t.Fatalf("seed verify with a FIFO shard: %s; want exit 0 (repairable) naming %s as a FIFO", r, fifo)
	}
	standin(time.Minute, "replicate", "now", "--store", e.PStore, "--all", "--wait") // announce the seed
	r = standin(prompt, "seed", "import", "--store", e.RStore, seed)
	if r.Code != 0 {
		t.Fatalf("seed import (daemon) with a FIFO shard: %s", r)
	}
	if got := exportHashes(t, e.RStore, "vm1", "latest"); got["vm1.img"] != atCut["vm1"] {
		t.Fatalf("after the import: replica %v, primary at the cut %s", got, atCut["vm1"])
	}
	// Both index copies FIFOs: a clear error, at once.
	for _, n := range []string{"index.0", "index.1"} {
		p := filepath.Join(seed, n)
		os.Remove(p)
		if err := syscall.Mkfifo(p, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	r = standin(prompt, "seed", "verify", seed)
	if r.Code == 0 || r.Code == -1 || !strings.Contains(r.Stderr, "FIFO") {
		t.Fatalf("seed verify with FIFO index copies: %s", r)
	}
	r = standin(prompt, "seed", "import", "--store", e.RStore, seed, "--dry-run")
	if r.Code == 0 || r.Code == -1 || !strings.Contains(r.Stderr, "FIFO") {
		t.Fatalf("seed import with FIFO index copies: %s", r)
	}
	if !e.Rep.running() {
		t.Fatal("the replica daemon died")
	}
}
