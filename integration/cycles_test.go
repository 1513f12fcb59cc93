package integration

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// premadeImage creates STORE/images/name before the first mount: a sparse
// file of size bytes with random data in the given [off,len) regions.
func premadeImage(t testing.TB, store, name string, size int64, regions [][2]int64) string {
	t.Helper()
	dir := filepath.Join(store, "images")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, name)
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for i, r := range regions {
		b := make([]byte, r[1])
		fillPattern(b, r[0], uint64(100+i))
		if _, err := f.WriteAt(b, r[0]); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	return p
}

// workload mutates a file through the mount: concurrent random pwrites of
// random sizes through buffered and O_DIRECT fds, a few punched holes and
// optionally a resize. It returns the byte ranges it touched.
func workload(t testing.TB, p string, rng *rand.Rand, writes, punches int, resize int64) [][2]int64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	size := st.Size
	type op struct {
		off, n int64
		punch  bool
		direct bool
		seed   uint64
	}
	var ops []op
	for i := 0; i < writes; i++ {
		o := op{seed: rng.Uint64(), direct: rng.IntN(2) == 0}
		if o.direct {
			o.n = blockSize * (1 + rng.Int64N(64))
			o.off = blockSize * rng.Int64N((size-o.n)/blockSize)
		} else {
			o.n = 1 + rng.Int64N(256<<10)
			o.off = rng.Int64N(size - o.n)
		}
		ops = append(ops, o)
	}
	for i := 0; i < punches; i++ {
		n := 1 + rng.Int64N(512<<10)
		ops = append(ops, op{off: rng.Int64N(size - n), n: n, punch: true})
	}
	rng.Shuffle(len(ops), func(i, j int) { ops[i], ops[j] = ops[j], ops[i] })

	const workers = 4
	var wg sync.WaitGroup
	errCh := make(chan error, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			bfd, err := unix.Open(p, unix.O_RDWR|unix.O_CLOEXEC, 0)
			if err != nil {
				errCh <- err
				return
			}
			defer unix.Close(bfd)
			dfd, err := unix.Open(p, unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
			if err != nil {
				errCh <- err
				return
			}
			defer unix.Close(dfd)
			dbuf, err := unix.Mmap(-1, 0, 64*blockSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
			if err != nil {
				errCh <- err
				return
			}
			defer unix.Munmap(dbuf)
			for i := w; i < len(ops); i += workers {
				o := ops[i]
				switch {
				case o.punch:
					err = unix.Fallocate(bfd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, o.off, o.n)
				case o.direct:
					b := dbuf[:o.n]
					fillPattern(b, o.off, o.seed)
					_, err = unix.Pwrite(dfd, b, o.off)
				default:
					b := make([]byte, o.n)
					fillPattern(b, o.off, o.seed)
					_, err = unix.Pwrite(bfd, b, o.off)
				}
				if err != nil {
					errCh <- fmt.Errorf("op %+v: %w", o, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errCh)
	for err := range errCh {
		t.Fatalf("workload: %v", err)
	}
	var touched [][2]int64
	for _, o := range ops {
		touched = append(touched, [2]int64{o.off, o.n})
	}
	if resize > 0 {
		if err := unix.Truncate(p, resize); err != nil {
			t.Fatalf("truncate %d: %v", resize, err)
		}
		touched = append(touched, [2]int64{min(size, resize), max(size, resize) - min(size, resize)})
	}
	return touched
}

// TestCyclesI2: applying cycles 0..k to an empty replica yields exactly the
// primary image as of cut k, for every k.
func TestCyclesI2(t *testing.T) {
	requireRoot(t)
	base := testDir(t)
	store, mnt := filepath.Join(base, "store"), filepath.Join(base, "mnt")
	const size = 64 << 20
	primary := premadeImage(t, store, "a.img", size, [][2]int64{{0, 1 << 20}, {10 << 20, 2 << 20}, {size - 64<<10, 64 << 10}})
	startDaemon(t, store, mnt)

	st := getStatus(t, store, false)
	im := mustImage(t, st, "a.img")
	if im.Size != size || im.ID == "" || im.NextSeq != 0 {
		t.Errorf("pre-made image in status: %+v (want size %d, an id, next_seq 0)", im, size)
	}

	replica := filepath.Join(base, "replica.img")
	c0 := cutOne(t, store, "a.img")
	frozen := []string{b3File(t, primary)}
	if c0.Seq != 0 {
		t.Errorf("first cycle of a pre-made image has seq %d, want 0 (base)", c0.Seq)
	}
	alloc := allocatedBytes(t, primary)
	t.Logf("cycle 0: %d bytes for an image with %d bytes allocated", c0.Bytes, alloc)
	if c0.Bytes > 2*alloc+(1<<20) {
		t.Errorf("base cycle is %d bytes for %d allocated bytes: holes shipped as data?", c0.Bytes, alloc)
	}
	applyCycles(t, replica, c0.Path)
	if got := b3File(t, replica); got != frozen[0] {
		t.Fatalf("replica after base cycle: b3 %s, primary %s", got, frozen[0])
	}
	if ra := allocatedBytes(t, replica); ra > 2*alloc+(1<<20) {
		t.Errorf("replica allocates %d bytes, primary %d: sparseness lost", ra, alloc)
	}

	rng := rand.New(rand.NewPCG(1, 2))
	cycles := []cutEntry{c0}
	p := filepath.Join(mnt, "a.img")
	for round := 1; round <= 4; round++ {
		var resize int64
		switch round {
		case 2:
			resize = size + 3<<20 + 1234 // grow, unaligned
		case 4:
			resize = size - 5<<20 // shrink
		}
		workload(t, p, rng, 60, 4, resize)
		// Writers are quiescent: this is the image as of the cut.
		frozen = append(frozen, b3File(t, primary))
		c := cutOne(t, store, "a.img")
		if c.Seq != uint64(round) {
			t.Errorf("round %d: cut seq %d, want %d", round, c.Seq, round)
		}
		cycles = append(cycles, c)
		t.Logf("round %d: cycle %d bytes", round, c.Bytes)
		// The next round's writes must not leak into this cycle.
	}
	if im := mustImage(t, getStatus(t, store, false), "a.img"); im.DirtyBlocks != 0 {
		t.Errorf("dirty_blocks=%d right after a cut with no writes", im.DirtyBlocks)
	}

	list := listCycles(t, store, "a.img")
	if len(list) != len(cycles) {
		t.Errorf("cycle list shows %d cycles, cut %d", len(list), len(cycles))
	}
	for i, l := range list {
		if i < len(cycles) && (l.Seq != cycles[i].Seq || l.Path != cycles[i].Path || l.ID != im.ID) {
			t.Errorf("cycle list entry %d: %+v, cut returned %+v (id %s)", i, l, cycles[i], im.ID)
		}
	}
	for i, c := range cycles[1:] {
		k := i + 1
		mustStandin(t, "cycle", "inspect", "--json", c.Path)
		applyCycles(t, replica, c.Path)
		if got := b3File(t, replica); got != frozen[k] {
			t.Errorf("replica after cycle %d: b3 %s, primary at cut %d %s; differing blocks %v",
				k, got[:16], k, frozen[k][:16], firstN(diffBlocksAgainstHash(t, replica, frozen[k], primary, k == len(cycles)-1), 10))
		}
	}
}

// diffBlocksAgainstHash only can list differing blocks against the live
// primary when the primary still is at that cut (the last one).
func diffBlocksAgainstHash(t testing.TB, replica, _ string, primary string, last bool) []int64 {
	if !last {
		return nil
	}
	return diffBlocks(t, replica, primary)
}

func firstN(b []int64, n int) []int64 {
	if len(b) > n {
		return b[:n]
	}
	return b
}

// TestCycleGroup cuts two images under one barrier. A writer alternately
// bumps a counter in a.img and then in b.img, so any consistent cut has
// counter(a) - counter(b) in {0, 1}.
func TestCycleGroup(t *testing.T) {
	requireRoot(t)
	base := testDir(t)
	store, mnt := filepath.Join(base, "store"), filepath.Join(base, "mnt")
	premadeImage(t, store, "a.img", 8<<20, [][2]int64{{1 << 20, 1 << 20}})
	premadeImage(t, store, "b.img", 8<<20, [][2]int64{{2 << 20, 1 << 20}})
	startDaemon(t, store, mnt)

	cuts := [][]cutEntry{cutCycles(t, store, "a.img", "b.img")}
	if cuts[0][0].Seq != 0 || cuts[0][1].Seq != 0 {
		t.Errorf("first group cut: %+v, want seq 0 for both", cuts[0])
	}

	// A quiescent group cut, checked by hash.
	workload(t, filepath.Join(mnt, "a.img"), rand.New(rand.NewPCG(3, 1)), 20, 1, 0)
	workload(t, filepath.Join(mnt, "b.img"), rand.New(rand.NewPCG(3, 2)), 20, 1, 0)
	frozenA := b3File(t, filepath.Join(store, "images", "a.img"))
	frozenB := b3File(t, filepath.Join(store, "images", "b.img"))
	cuts = append(cuts, cutCycles(t, store, "a.img", "b.img"))

	// Cuts under a running writer.
	fa, err := unix.Open(filepath.Join(mnt, "a.img"), unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fa)
	fb, err := unix.Open(filepath.Join(mnt, "b.img"), unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fb)
	var stop atomic.Bool
	var counter atomic.Uint64
	werr := make(chan error, 1)
	go func() {
		buf := alignedBuf(t, blockSize)
		for k := uint64(1); !stop.Load(); k++ {
			binary.LittleEndian.PutUint64(buf, k)
			for _, fd := range []int{fa, fb} {
				if _, err := unix.Pwrite(fd, buf, 0); err != nil {
					werr <- err
					return
				}
			}
			counter.Store(k)
		}
		werr <- nil
	}()
	for i := 0; i < 4; i++ {
		time.Sleep(time.Duration(50+rand.IntN(150)) * time.Millisecond)
		cuts = append(cuts, cutCycles(t, store, "a.img", "b.img"))
	}
	stop.Store(true)
	if err := <-werr; err != nil {
		t.Fatalf("writer: %v", err)
	}
	t.Logf("writer reached counter %d", counter.Load())
	if counter.Load() < 10 {
		t.Fatalf("writer made only %d rounds", counter.Load())
	}

	ra, rb := filepath.Join(base, "ra.img"), filepath.Join(base, "rb.img")
	readCounter := func(p string) uint64 {
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		b := make([]byte, 8)
		if _, err := f.ReadAt(b, 0); err != nil {
			t.Fatal(err)
		}
		return binary.LittleEndian.Uint64(b)
	}
	for i, cut := range cuts {
		byImage := map[string]cutEntry{}
		for _, c := range cut {
			byImage[c.Image] = c
		}
		ca, cb := byImage["a.img"], byImage["b.img"]
		if ca.Path == "" || cb.Path == "" || ca.Seq != uint64(i) || cb.Seq != uint64(i) {
			t.Fatalf("group cut %d: %+v", i, cut)
		}
		applyCycles(t, ra, ca.Path)
		applyCycles(t, rb, cb.Path)
		if i == 1 {
			if h := b3File(t, ra); h != frozenA {
				t.Errorf("a.img replica after group cut 1 differs from the frozen primary")
			}
			if h := b3File(t, rb); h != frozenB {
				t.Errorf("b.img replica after group cut 1 differs from the frozen primary")
			}
		}
		if i >= 2 {
			a, b := readCounter(ra), readCounter(rb)
			t.Logf("group cut %d: counter a=%d b=%d", i, a, b)
			if a != b && a != b+1 {
				t.Errorf("group cut %d is not consistent across images: a=%d b=%d (want a-b in {0,1})", i, a, b)
			}
		}
	}
}

// TestCopyBeforeWrite overwrites most frozen blocks while the cut is still
// staging them; the cycle must still be the image as of the cut.
func TestCopyBeforeWrite(t *testing.T) {
	requireRoot(t)
	base := testDir(t)
	store, mnt := filepath.Join(base, "store"), filepath.Join(base, "mnt")
	startDaemon(t, store, mnt, "STANDIN_TEST_STAGE_DELAY=20ms")
	const name, size, dirty = "cbw.img", 80 << 20, 64 << 20
	p, primary := filepath.Join(mnt, name), filepath.Join(store, "images", name)
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	c0 := cutOne(t, store, name)
	replica := filepath.Join(base, "replica.img")
	applyCycles(t, replica, c0.Path)

	fd, err := unix.Open(p, unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	buf := alignedBuf(t, 1<<20)
	for off := int64(0); off < dirty; off += 1 << 20 {
		fillPattern(buf, off, 20)
		if _, err := unix.Pwrite(fd, buf, off); err != nil {
			t.Fatal(err)
		}
	}
	frozen := b3File(t, primary)
	before := mustImage(t, getStatus(t, store, false), name)

	type cutRes struct {
		r    result
		done time.Time
	}
	cutCh := make(chan cutRes, 1)
	start := time.Now()
	go func() {
		r := standin(cmdTimeout, "cycle", "cut", "--store", store, "--images", name, "--json")
		cutCh <- cutRes{r, time.Now()}
	}()
	// Wait until the cut has taken its barrier: the frozen set shows up as
	// staging_blocks (next_seq only moves once the cycle file is durable).
	var cr *cutRes
	for cr == nil {
		select {
		case res := <-cutCh:
			cr = &res
		default:
		}
		if cr != nil {
			break
		}
		r := standin(5*time.Second, "status", "--store", store, "--json")
		if s, ok := parseStatus(r); ok {
			if im, ok := s.image(name); ok && (im.StagingBlocks > 0 || im.NextSeq > before.NextSeq) {
				break
			}
		}
		if time.Since(start) > time.Minute {
			t.Fatal("cut neither finished nor showed up in status within a minute")
		}
		time.Sleep(2 * time.Millisecond)
	}
	overwriteStart := time.Now()
	// Overwrite 7 of every 8 MiB with new data, from the end backwards, so the
	// writes hit blocks the stager has not reached yet.
	for off := int64(dirty - 1<<20); off >= 0; off -= 1 << 20 {
		if off%(8<<20) == 0 {
			continue
		}
		for sub := int64(0); sub < 1<<20; sub += 256 << 10 {
			b := buf[:256<<10]
			fillPattern(b, off+sub, 21)
			if _, err := unix.Pwrite(fd, b, off+sub); err != nil {
				t.Fatal(err)
			}
		}
	}
	overwriteEnd := time.Now()
	if cr == nil {
		res := <-cutCh
		cr = &res
	}
	if cr.r.Code != 0 {
		t.Fatalf("cut during overwrites: %s", cr.r)
	}
	t.Logf("cut took %v; overwrites ran %v..%v after the cut started, cut returned at %v",
		cr.done.Sub(start).Round(time.Millisecond), overwriteStart.Sub(start).Round(time.Millisecond),
		overwriteEnd.Sub(start).Round(time.Millisecond), cr.done.Sub(start).Round(time.Millisecond))
	if !cr.done.After(overwriteStart) {
		t.Errorf("the cut finished before the overwrites began: copy-before-write not exercised "+
			"(status did not show staging_blocks while staging; staging %v)", cr.done.Sub(start))
	}
	var cuts []cutEntry
	if err := jsonUnmarshal(cr.r.Stdout, &cuts); err != nil || len(cuts) != 1 {
		t.Fatalf("cut output: %v %s", err, cr.r.Stdout)
	}
	applyCycles(t, replica, cuts[0].Path)
	if got := b3File(t, replica); got != frozen {
		t.Fatalf("cycle staged under concurrent overwrites is not the image as of the cut: b3 %s want %s", got[:16], frozen[:16])
	}
	// The overwrites are in the next cycle.
	now := b3File(t, primary)
	c2 := cutOne(t, store, name)
	applyCycles(t, replica, c2.Path)
	if got := b3File(t, replica); got != now {
		t.Fatalf("replica after the next cycle differs from the primary")
	}
	if c2.Bytes < 32<<20 {
		t.Errorf("next cycle has %d bytes; it should carry the ~56 MiB of overwrites", c2.Bytes)
	}
}

func parseStatus(r result) (daemonStatus, bool) {
	var s daemonStatus
	if r.Code != 0 {
		return s, false
	}
	return s, jsonUnmarshal(r.Stdout, &s) == nil
}

// TestCycleBadInput (I5): corrupted, truncated, out-of-order, foreign and
// replayed cycles are refused with a clear message and the replica keeps its
// last good state; re-applying the last cycle is idempotent.
func TestCycleBadInput(t *testing.T) {
	requireRoot(t)
	base := testDir(t)
	store, mnt := filepath.Join(base, "store"), filepath.Join(base, "mnt")
	primary := premadeImage(t, store, "a.img", 16<<20, [][2]int64{{0, 2 << 20}})
	premadeImage(t, store, "b.img", 16<<20, [][2]int64{{0, 1 << 20}})
	startDaemon(t, store, mnt)

	writeRand := func(name string, off, n int64, seed uint64) {
		b := make([]byte, n)
		fillPattern(b, off, seed)
		f, err := os.OpenFile(filepath.Join(mnt, name), os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
	a0 := cutOne(t, store, "a.img")
	b0 := cutOne(t, store, "b.img")
	writeRand("a.img", 4<<20, 4<<20, 30) // a big data area to corrupt
	a1 := cutOne(t, store, "a.img")
	writeRand("a.img", 12<<20, 64<<10, 31)
	a2 := cutOne(t, store, "a.img")
	frozen2 := b3File(t, primary)
	writeRand("b.img", 4<<20, 1<<20, 32)
	b1 := cutOne(t, store, "b.img")

	replica := filepath.Join(base, "replica.img")
	applyCycles(t, replica, a0.Path)
	for _, c := range []cutEntry{a0, a1, a2, b0, b1} {
		if r := standin(cmdTimeout, "cycle", "inspect", c.Path); r.Code != 0 {
			t.Errorf("inspect of a good cycle: %s", r)
		}
	}

	scratch := filepath.Join(base, "bad")
	if err := os.Mkdir(scratch, 0o755); err != nil {
		t.Fatal(err)
	}
	mutate := func(name string, src string, f func([]byte) []byte) string {
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(scratch, name)
		if err := os.WriteFile(p, f(bytes.Clone(b)), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	flip := func(at func(n int) int) func([]byte) []byte {
		return func(b []byte) []byte { b[at(len(b))] ^= 0x40; return b }
	}
	reCorrupt := regexp.MustCompile(`(?i)hash|checksum|corrupt|mismatch|verif|integrity|truncat|short|eof|magic|invalid|malformed|not a standin cycle`)
	reGap := regexp.MustCompile(`(?i)gap|sequence|seq|order|expect|parent`)
	reForeign := regexp.MustCompile(`(?i)identity|foreign|uuid|image id|different image|wrong image|another image|mismatch`)
	reReplay := regexp.MustCompile(`(?i)replay|already|older|stale|sequence|seq`)

	type bad struct {
		name        string
		file        string
		inspectCode int // expected exit of inspect; 0 = valid file
		applyCode   int
		re          *regexp.Regexp
	}
	cases := []bad{
		{"data byte flipped", mutate("data.cyc", a1.Path, flip(func(n int) int { return n / 2 })), 3, 3, reCorrupt},
		{"last byte flipped", mutate("last.cyc", a1.Path, flip(func(n int) int { return n - 1 })), 3, 3, reCorrupt},
		{"first byte flipped", mutate("first.cyc", a1.Path, flip(func(int) int { return 0 })), 3, 3, reCorrupt},
		{"header byte flipped", mutate("hdr.cyc", a1.Path, flip(func(int) int { return 24 })), 3, 3, reCorrupt},
		{"truncated by 1000", mutate("trunc1.cyc", a1.Path, func(b []byte) []byte { return b[:len(b)-1000] }), 3, 3, reCorrupt},
		{"truncated to half", mutate("trunc2.cyc", a1.Path, func(b []byte) []byte { return b[:len(b)/2] }), 3, 3, reCorrupt},
		{"empty", mutate("empty.cyc", a1.Path, func(b []byte) []byte { return nil }), 3, 3, reCorrupt},
		{"gap (cycle 2 on replica at 0)", a2.Path, 0, 4, reGap},
		{"foreign image (b cycle 1)", b1.Path, 0, 4, reForeign},
		{"foreign base (b cycle 0)", b0.Path, 0, 4, reForeign},
	}
	check := func(c bad, applyArgs ...string) {
		t.Run(c.name, func(t *testing.T) {
			before := b3File(t, replica)
			r := standin(cmdTimeout, "cycle", "inspect", c.file)
			if (c.inspectCode == 0) != (r.Code == 0) || (c.inspectCode != 0 && r.Code != c.inspectCode) {
				t.Errorf("inspect: exit %d, want %d: %s", r.Code, c.inspectCode, r)
			}
			args := append([]string{"cycle", "apply", "--to", replica}, applyArgs...)
			r = standin(cmdTimeout, append(args, c.file)...)
			if r.Code != c.applyCode {
				t.Errorf("apply: exit %d, want %d: %s", r.Code, c.applyCode, r)
			}
			if !c.re.MatchString(r.Stderr) {
				t.Errorf("apply stderr does not say why (want %v): %q", c.re, r.Stderr)
			}
			if after := b3File(t, replica); after != before {
				t.Errorf("replica changed by a refused apply")
			}
		})
	}
	for _, c := range cases {
		check(c)
	}
	// A bad cycle after a good one in the same call: nothing may be left
	// half-applied in a way that breaks the next good apply; the good one may
	// or may not have been applied, but order errors are refused outright.
	check(bad{"out of order in one call (2 then 1)", a1.Path, 0, 4, reGap}, a2.Path)

	// The real next cycles still apply.
	applyCycles(t, replica, a1.Path, a2.Path)
	if got := b3File(t, replica); got != frozen2 {
		t.Fatalf("replica after cycles 1,2: %s, want %s", got[:16], frozen2[:16])
	}
	check(bad{"replay of older cycle 1", a1.Path, 0, 4, reReplay})
	check(bad{"replay of base cycle 0", a0.Path, 0, 4, reReplay})

	// Re-applying the last applied cycle is idempotent.
	r := standin(cmdTimeout, "cycle", "apply", "--to", replica, a2.Path)
	if r.Code != 0 {
		t.Errorf("re-apply of the last applied cycle: %s", r)
	}
	if got := b3File(t, replica); got != frozen2 {
		t.Errorf("re-apply of the last cycle changed the replica")
	}
	// Inspect --json of a corrupt file must not claim success either.
	if r := standin(cmdTimeout, "cycle", "inspect", "--json", cases[0].file); r.Code != 3 {
		t.Errorf("inspect --json of a corrupt cycle: exit %d, want 3", r.Code)
	}
	// A missing file is "not found".
	if r := standin(cmdTimeout, "cycle", "inspect", filepath.Join(scratch, "nope.cyc")); r.Code != 6 {
		t.Errorf("inspect of a missing file: exit %d, want 6: %s", r.Code, r)
	}
}
