package dedup

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/zeebo/blake3"

	"github.com/standin/standin/internal/fsutil"
)

// ImageSource is one image at a crash-consistent cut.
type ImageSource interface {
	Name() string
	ID() [16]byte
	Generation() uint64
	Seq() uint64
	// CutTime is the time of the crash-consistent cut.
	CutTime() time.Time
	// GroupCut is the id shared by all images of one cut.
	GroupCut() [16]byte
	Size() int64
	ReadAt(p []byte, off int64) (int, error)
	// DataExtents returns the allocated byte ranges as {offset, length}
	// pairs. Bytes outside them are read as zeros and not read at all.
	DataExtents() ([][2]int64, error)
}

// DefaultParity is the parity fraction the CLI should use when none is given.
const DefaultParity = 0.10

// DefaultPackSize is the compressed size a pack does not exceed.
const DefaultPackSize = 4 << 20

// ErrVolumeFull: a volume reached VolumeSize (and no next volume could be
// had) or its medium ran out of space. The export stays resumable.
var ErrVolumeFull = errors.New("dedup: volume full")

// ExportOptions tune Export.
type ExportOptions struct {
	// Parity is the fraction of parity shards per group of packs: each group
	// of up to 10 data shards gets ceil(10*Parity) parity shards (manifest
	// groups: ceil(n*Parity)). 0 = none.
	Parity float64
	// Key, when set (32 bytes), encrypts packs and manifests (AES-256-GCM)
	// and keys the chunk ids (keyed BLAKE3).
	Key []byte
	// Progress is called from the exporting goroutine after each read batch.
	Progress func(Progress)
	// PackSize is the compressed size a pack does not exceed (default 4 MiB;
	// a pack always holds at least one frame of 64 chunks).
	PackSize int
	// VolumeSize is the number of bytes a volume may hold, its share of
	// parity and both index copies included. 0 = unlimited.
	VolumeSize int64
	// NextVolume is called when the volumes given to Export (and those
	// returned earlier) are full; n is the 1-based number of the volume
	// wanted (volume 1 is vols[0]). It returns the directory of volume n
	// (after prompting the user to swap media or running a command). With
	// several vols, a new set of len(vols) volumes is asked for, one call per
	// volume. It is also called on a resumed export for a volume that was
	// being written and is not among vols. It may be called from a goroutine
	// other than Export's caller. nil: a full volume ends the export with
	// ErrVolumeFull.
	NextVolume func(n int) (dir string, err error)
	// SurviveVolumeLoss raises the parity of every group so that losing any
	// one whole volume can be repaired. With several vols the shards of each
	// group are striped across them (shard i on vol i mod len(vols)).
	SurviveVolumeLoss bool
	// ScratchDir holds the export's journal and working files (the chunk id
	// store, 32 bytes per unique chunk). It must survive a restart for the
	// export to be resumable, and should be on local storage. Default: the
	// first volume (not counted in VolumeSize). Required with NextVolume.
	ScratchDir string
	// Mode is the mode of the seed's files (0: DefaultMode, owner only);
	// directories the export creates get DirMode(Mode). The export's
	// working files in ScratchDir are always 0600.
	Mode os.FileMode
}

// Progress reports an export or import under way.
type Progress struct {
	Images, Image          int   // number of images, index of the current one
	BytesRead, BytesTotal  int64 // allocated bytes read / to read (import: written / to write)
	UniqueBytes, SeedBytes int64 // unique chunk bytes so far, seed bytes written (import: read)
}

// Summary is the outcome of Export or Import.
type Summary struct {
	Images       int
	Allocated    int64 // bytes in the images' data extents (import: bytes written)
	Unique       int64 // bytes of unique chunks
	SeedBytes    int64 // bytes of all seed files, parity and index included
	Chunks       int   // stored (non-zero) chunk references
	UniqueChunks int
	Ratio        float64 // Allocated / SeedBytes
	ResumedPacks int     // packs reused from an interrupted export
	SeedID       [16]byte
	Volumes      int   // volumes written (export) or of the seed (import)
	IDTableBytes int64 // export: memory of the chunk id table at the end
	// Roots (export) is the manifest root (Manifest.Root, hex) of every
	// image, in the order of the images given: what the primary announces to
	// the replica, so an import can refuse a seed whose content is not the
	// one exported.
	Roots []string
}

func packName(n uint64) string     { return fmt.Sprintf("packs/%08d.pack", n) }
func manifestName(n uint64) string { return fmt.Sprintf("manifests/%08d.man", n) }
func parityName(g, p int) string   { return fmt.Sprintf("parity/%08d-%02d.par", g, p) }

func parityCount(n int, f float64) int {
	if f <= 0 {
		return 0
	}
	p := int(math.Ceil(float64(n)*f - 1e-9))
	return min(max(p, 1), 256-n)
}

// surviveParity is the least parity p >= base with which a group of n data
// shards striped over v volumes loses at most p shards with any one volume.
func surviveParity(n, v, base int) int {
	if v < 2 {
		return base
	}
	for p := max(base, 1); n+p <= 256; p++ {
		if (n+p+v-1)/v <= p {
			return p
		}
	}
	return 256 - n
}

type exporter struct {
	ctx    context.Context
	o      ExportOptions
	vols   []string
	images []ImageSource
	k      *keys
	salt   [32]byte
	seed   [16]byte
	state  string
	jf     *journalFile
	ids    *idStore
	tab    *idTable
	lay    *layout

	nextPack  uint64 // writer goroutine
	nextID    uint64 // exporting goroutine
	storedIDs uint64
	seedBytes atomic.Int64
	sum       Summary
	dataDone  *jEntry    // seq survive mode: the data volumes are complete
	doneRoots [][32]byte // with dataDone: the manifests' roots, journaled
}

// finishParity completes a sequential survive export whose data volumes were
// complete when it was interrupted: only parity volumes remain.
func (e *exporter) finishParity() error {
	b, err := readFileLimited(filepath.Join(e.state, finalIdxName), maxIndexSize)
	if err != nil {
		return fmt.Errorf("dedup: resume: %w", err)
	}
	ix, err := decodeIndex(b)
	if err != nil {
		return fmt.Errorf("dedup: resume: %s: %w", finalIdxName, err)
	}
	first := ix.Volumes + 1
	for _, g := range ix.Groups {
		first = min(first, g.Shards[len(g.Shards)-1].Vol)
	}
	if err := e.lay.writeParityVolumes(ix, first); err != nil {
		return err
	}
	e.jf.Close()
	e.ids.Close()
	cleanState(e.state)
	syncDir(e.state)
	d := e.dataDone.data
	e.sum.Images = ix.Images
	for _, r := range e.doneRoots {
		e.sum.Roots = append(e.sum.Roots, hex.EncodeToString(r[:]))
	}
	e.sum.Allocated, e.sum.Chunks, e.sum.UniqueChunks = d[0], int(d[1]), int(d[2])
	e.sum.Unique = d[2] * chunkSize
	e.sum.SeedID = e.seed
	e.sum.Volumes = ix.Volumes
	var total int64
	for _, g := range ix.Groups {
		for _, s := range g.Shards {
			total += s.Len
		}
	}
	e.sum.SeedBytes = total + int64(len(b))*2*int64(ix.Volumes)
	if e.sum.SeedBytes > 0 {
		e.sum.Ratio = float64(e.sum.Allocated) / float64(e.sum.SeedBytes)
	}
	return nil
}

// Export writes a seed of images onto the volume directories vols (volume
// 1, 2, ... in that order; more through o.NextVolume). It is resumable: packs
// finished by an earlier, interrupted Export of the same images with the same
// options are kept (as content-addressed chunks: the images may have changed
// since, the manifests describe the content read by this run).
func Export(ctx context.Context, vols []string, images []ImageSource, o ExportOptions) (Summary, error) {
	e := &exporter{ctx: ctx, o: o, vols: vols, images: images, tab: &idTable{}}
	if err := e.validate(); err != nil {
		return Summary{}, err
	}
	defer func() {
		e.jf.Close()
		e.ids.Close()
	}()
	if err := e.setup(); err != nil {
		return e.sum, err
	}
	if e.dataDone != nil {
		return e.sum, e.finishParity()
	}
	if err := e.run(); err != nil {
		return e.sum, err
	}
	return e.sum, nil
}

func (e *exporter) validate() error {
	o := &e.o
	if o.PackSize <= 0 {
		o.PackSize = DefaultPackSize
	}
	if o.PackSize > 256<<20 {
		return errors.New("dedup: pack size above 256 MiB")
	}
	if o.Parity < 0 || o.Parity > 10 || math.IsNaN(o.Parity) {
		return fmt.Errorf("dedup: bad parity fraction %v", o.Parity)
	}
	if o.Key != nil && len(o.Key) != KeySize {
		return fmt.Errorf("dedup: key must be %d bytes", KeySize)
	}
	if len(e.vols) == 0 {
		return errors.New("dedup: no volume directory given")
	}
	if len(e.vols) > 255 {
		return errors.New("dedup: more than 255 volumes at once")
	}
	seenDir := map[string]bool{}
	for _, v := range e.vols {
		a, err := filepath.Abs(v)
		if err != nil {
			return err
		}
		if seenDir[a] {
			return fmt.Errorf("dedup: volume directory %s given twice", v)
		}
		seenDir[a] = true
	}
	if o.VolumeSize < 0 {
		return errors.New("dedup: negative volume size")
	}
	if o.NextVolume != nil && o.ScratchDir == "" {
		return errors.New("dedup: NextVolume needs a ScratchDir (the journal must not leave with a volume)")
	}
	if o.SurviveVolumeLoss && len(e.vols) == 1 && (o.VolumeSize == 0 || o.NextVolume == nil) {
		return errors.New("dedup: SurviveVolumeLoss with one volume at a time needs a VolumeSize and NextVolume (the parity volume comes last); or give several volumes at once")
	}
	seen := map[string]bool{}
	for _, im := range e.images {
		if err := ValidImageName(im.Name()); err != nil {
			return err
		}
		if seen[im.Name()] {
			return fmt.Errorf("dedup: image %q given twice", im.Name())
		}
		seen[im.Name()] = true
		if im.Size() < 0 {
			return fmt.Errorf("dedup: image %q: negative size", im.Name())
		}
	}
	return nil
}

// ---- setup and resume ----

func (e *exporter) setup() error {
	e.state = e.o.ScratchDir
	if e.state == "" {
		e.state = e.vols[0]
	}
	if err := fsutil.MkdirNew(e.state, DirMode(e.mode())); err != nil {
		return err
	}
	var allocated int64
	for _, im := range e.images {
		x, err := chunkExtents(im)
		if err != nil {
			return fmt.Errorf("dedup: image %q: %w", im.Name(), err)
		}
		for _, r := range x {
			allocated += r[1] - r[0]
		}
	}
	if j := readJournal(e.state); j != nil {
		k, err := deriveKeys(e.o.Key, j.salt[:])
		if err != nil {
			return err
		}
		if journalHeader(k, e.images, &e.o, len(e.vols)) == j.header {
			e.k, e.salt, e.seed = k, j.salt, j.seed
			e.lay = newLayout(e, allocated)
			return e.resume(j)
		}
	}
	// Fresh export.
	if _, err := rand.Read(e.salt[:]); err != nil {
		return err
	}
	if _, err := rand.Read(e.seed[:]); err != nil {
		return err
	}
	k, err := deriveKeys(e.o.Key, e.salt[:])
	if err != nil {
		return err
	}
	e.k = k
	e.lay = newLayout(e, allocated)
	if err := e.lay.check(); err != nil {
		return err
	}
	cleanState(e.state)
	if e.jf, err = writeJournal(e.state, &journal{header: journalHeader(k, e.images, &e.o, len(e.vols)), salt: e.salt, seed: e.seed}); err != nil {
		return err
	}
	if e.ids, err = openIDStore(filepath.Join(e.state, idsName), 0); err != nil {
		return err
	}
	for i, d := range e.vols {
		if err := e.lay.startVolume(i+1, d); err != nil {
			return err
		}
	}
	return nil
}

// findVolume returns the directory of volume n for a resumed export: a
// given directory labelled as that volume, else vols[n-1] unless it is
// another volume of this seed, else what NextVolume returns.
func (e *exporter) findVolume(n int) (string, error) {
	for _, d := range e.vols {
		if s, v, ok := identifyVolume(d); ok && s == e.seed && v == n {
			return d, nil
		}
	}
	if n <= len(e.vols) {
		d := e.vols[n-1]
		if s, v, ok := identifyVolume(d); !ok || s != e.seed {
			return d, nil
		} else {
			return "", fmt.Errorf("dedup: resuming needs volume %d in %s, but it holds volume %d of this seed", n, d, v)
		}
	}
	if e.o.NextVolume == nil {
		return "", fmt.Errorf("dedup: resuming needs volume %d, which is not among the directories given", n)
	}
	d, err := e.o.NextVolume(n)
	if err != nil {
		return "", err
	}
	if s, v, ok := identifyVolume(d); ok && s == e.seed && v != n {
		return "", fmt.Errorf("dedup: %s holds volume %d of this seed, volume %d is needed", d, v, n)
	}
	return d, nil
}

func (e *exporter) resume(j *journal) error {
	l := e.lay
	V := len(e.vols)
	maxVol := 0
	closed := map[int]bool{}
	for _, en := range j.entries {
		switch en.kind {
		case 'v':
			maxVol = en.vol
		case 'c':
			closed[en.vol] = true
		}
	}
	// Volumes of the last set that are open must be at hand.
	dirs := map[int]string{}
	lastSet := 1
	if maxVol > 0 {
		lastSet = (maxVol-1)/V*V + 1
	}
	for n := lastSet; n <= maxVol; n++ {
		if !closed[n] {
			d, err := e.findVolume(n)
			if err != nil {
				return err
			}
			dirs[n] = d
		}
	}
	open := func(v int) bool { _, ok := dirs[v]; return ok }
	// Keep the journal up to the first entry whose files are not intact.
	idsFile, err := os.Open(filepath.Join(e.state, idsName))
	if err != nil {
		idsFile, _ = os.Open(os.DevNull)
	}
	cut := len(j.entries)
	buf := make([]byte, 0, maxPackChunks*32)
check:
	for i, en := range j.entries {
		switch en.kind {
		case 'p':
			p := en.pack
			buf = buf[:p.count*32]
			_, rerr := idsFile.ReadAt(buf, int64(p.first)*32)
			if rerr != nil || blake3.Sum256(buf) != p.idHash {
				if !open(p.vol) {
					idsFile.Close()
					return fmt.Errorf("dedup: the journal's chunk ids (%s) are damaged for a pack on closed volume %d; remove %s to start the export over",
						filepath.Join(e.state, idsName), p.vol, filepath.Join(e.state, journalName))
				}
				cut = i
				break check
			}
			if open(p.vol) {
				if _, prob := checkShard(filepath.Join(dirs[p.vol], packName(p.num)), shardEntry{Len: p.length, Hash: p.hash}); prob != "" {
					cut = i
					break check
				}
			}
		case 'g':
			for _, s := range en.group.par {
				if open(s.Vol) {
					if _, prob := checkShard(filepath.Join(dirs[s.Vol], s.Name()), s); prob != "" {
						cut = i
						break check
					}
				}
			}
		}
	}
	idsFile.Close()
	j.entries = j.entries[:cut]
	// Rebuild the layout from what is kept.
	var packs []jPack
	l.all = nil
	for _, en := range j.entries {
		switch en.kind {
		case 'v':
			l.all = append(l.all, &volState{n: en.vol, dir: dirs[en.vol]})
		case 'c':
			l.all[en.vol-1].closed = true
		case 'p':
			packs = append(packs, en.pack)
			l.all[en.pack.vol-1].used += en.pack.length
		case 'g':
			g := groupEntry{Data: en.group.data, Parity: en.group.parity}
			for _, p := range packs {
				if p.group == en.group.g {
					g.Shards = append(g.Shards, shardEntry{Kind: kindPack, Vol: p.vol, Num: p.num, Len: p.length, Hash: p.hash, First: p.first, Count: p.count})
					g.ShardSize = max(g.ShardSize, p.length)
				}
			}
			if len(g.Shards) != g.Data {
				return fmt.Errorf("dedup: journal: group %d lists %d data shards, %d found; remove %s to start over", en.group.g, g.Data, len(g.Shards), filepath.Join(e.state, journalName))
			}
			for _, s := range en.group.par {
				g.Shards = append(g.Shards, s)
				l.all[s.Vol-1].used += s.Len
			}
			l.groups = append(l.groups, g)
		}
	}
	if e.jf, err = writeJournal(e.state, j); err != nil {
		return err
	}
	if n := len(packs); n > 0 {
		e.nextPack = packs[n-1].num + 1
		e.storedIDs = packs[n-1].first + uint64(packs[n-1].count)
	}
	e.nextID = e.storedIDs
	e.sum.ResumedPacks = len(packs)
	for _, v := range l.all {
		e.seedBytes.Add(v.used)
	}
	// Chunk ids of the kept packs: the id table.
	if e.ids, err = openIDStore(filepath.Join(e.state, idsName), e.storedIDs); err != nil {
		return err
	}
	if err := e.loadIDs(); err != nil {
		return err
	}
	if l.seq {
		if err := e.resumeSeq(j, packs); err != nil {
			return err
		}
	}
	// The open group: its packs are on open volumes; fold them again.
	for _, p := range packs {
		if !l.seq && p.group == len(l.groups) {
			if l.cur == nil {
				l.cur = &curGroup{p: l.pPacks, n: groupData, acc: newParityAcc(l.pPacks)}
			}
			b, err := readFileLimited(filepath.Join(dirs[p.vol], packName(p.num)), p.length)
			if err != nil || blake3.Sum256(b) != p.hash {
				return fmt.Errorf("dedup: resume: pack %d changed while resuming", p.num)
			}
			if err := l.cur.acc.add(b); err != nil {
				return err
			}
			l.cur.shards = append(l.cur.shards, shardEntry{Kind: kindPack, Vol: p.vol, Num: p.num, Len: p.length, Hash: p.hash, First: p.first, Count: p.count})
			l.cur.maxLen = max(l.cur.maxLen, p.length)
		}
	}
	// The current set: complete or close it.
	var openVols, setVols []*volState
	for _, v := range l.all {
		if v.n >= lastSet {
			setVols = append(setVols, v)
			if !v.closed {
				openVols = append(openVols, v)
			}
		}
	}
	switch {
	case len(l.all) == 0:
		for i, d := range e.vols {
			if err := l.startVolume(i+1, d); err != nil {
				return err
			}
		}
	case len(openVols) == 0:
		l.set = nil
	case len(openVols) < len(setVols):
		// Interrupted while closing the set: finish closing it.
		l.set = openVols
		if err := l.closeSet(); err != nil {
			return err
		}
	default:
		l.set = setVols
		for n := setVols[len(setVols)-1].n + 1; len(l.set) < V; n++ {
			d, err := e.findVolume(n)
			if err != nil {
				return err
			}
			if err := l.startVolume(n, d); err != nil {
				return err
			}
		}
		for _, v := range l.set {
			if err := writeLabel(v.dir, e.seed, v.n, e.mode()); err != nil {
				return l.volErr(v, "label", err)
			}
		}
	}
	return nil
}

// resumeSeq rebuilds the transposed groups of sequential survive mode and
// drops accumulator versions beyond the journal.
func (e *exporter) resumeSeq(j *journal, packs []jPack) error {
	l := e.lay
	for _, en := range j.entries {
		switch en.kind {
		case 'r':
			e.doneRoots = append(e.doneRoots, en.root)
		case 'd':
			c := en
			e.dataDone = &c
		}
	}
	if e.dataDone != nil && len(e.doneRoots) != len(e.images) {
		return fmt.Errorf("dedup: journal: %d manifest roots for %d images; remove %s to start over", len(e.doneRoots), len(e.images), filepath.Join(e.state, journalName))
	}
	for _, p := range packs {
		v := l.all[p.vol-1]
		if p.group != v.count {
			return fmt.Errorf("dedup: journal: pack %d at position %d of volume %d, expected %d; remove %s to start over", p.num, p.group, p.vol, v.count, filepath.Join(e.state, journalName))
		}
		v.count++
		for len(l.sg) <= p.group {
			l.sg = append(l.sg, seqGroup{})
		}
		g := &l.sg[p.group]
		g.shards = append(g.shards, shardEntry{Kind: kindPack, Vol: p.vol, Num: p.num, Len: p.length, Hash: p.hash, First: p.first, Count: p.count})
		g.maxLen = max(g.maxLen, p.length)
	}
	if e.dataDone != nil {
		return nil
	}
	ents, _ := os.ReadDir(filepath.Join(e.state, accDir))
	for _, de := range ents {
		if g, c, ok := parseAccName(de.Name()); !ok || g >= len(l.sg) || c > len(l.sg[g].shards) {
			os.Remove(filepath.Join(e.state, accDir, de.Name()))
		}
	}
	for gi, g := range l.sg {
		if _, err := l.readAcc(gi, len(g.shards)); err != nil {
			return fmt.Errorf("%w; remove %s to start over", err, filepath.Join(e.state, journalName))
		}
	}
	return nil
}

// loadIDs fills the id table from the id store (resume).
func (e *exporter) loadIDs() error {
	const step = 1 << 16
	buf := make([]byte, step*32)
	for first := uint64(0); first < e.storedIDs; first += step {
		n := min(step, e.storedIDs-first)
		if _, err := e.ids.f.ReadAt(buf[:n*32], int64(first)*32); err != nil {
			return err
		}
		for i := uint64(0); i < n; i++ {
			var id [32]byte
			copy(id[:], buf[i*32:])
			if _, found, err := e.tab.lookup(&id, e.ids.get); err != nil {
				return err
			} else if found {
				continue // a chunk stored twice (cannot happen in one run); keep the first
			}
			if err := e.tab.insert(&id, first+i); err != nil {
				return err
			}
		}
	}
	return nil
}

// ---- reading, dedup, compression ----

func (e *exporter) run() error {
	o := &e.o
	ctx, cancel := context.WithCancel(e.ctx)
	defer cancel()

	workers := min(runtime.GOMAXPROCS(0), 8)
	jobs := make(chan *frame, workers*2)
	ordered := make(chan *frame, workers*4)
	var rawPool sync.Pool
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		win := zstd.MinWindowSize
		for win < frameLen(o.PackSize)*chunkSize {
			win <<= 1
		}
		enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedDefault), zstd.WithEncoderConcurrency(1), zstd.WithWindowSize(win))
		if err != nil {
			return err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for f := range jobs {
				f.comp = enc.EncodeAll(f.raw, make([]byte, 0, len(f.raw)/2))
				raw := f.raw
				f.raw = nil
				rawPool.Put(raw[:0])
				close(f.done)
			}
		}()
	}
	var werr error
	wdone := make(chan struct{})
	go func() {
		defer close(wdone)
		werr = e.writer(ctx, ordered)
		if werr != nil {
			cancel()
			for range ordered {
			}
		}
	}()
	stop := func() error {
		close(jobs)
		close(ordered)
		wg.Wait()
		<-wdone
		return werr
	}
	newFrame := func(first uint64) *frame {
		raw, _ := rawPool.Get().([]byte)
		if raw == nil {
			raw = make([]byte, 0, frameChunks*chunkSize)
		}
		return &frame{first: first, raw: raw, done: make(chan struct{})}
	}
	submit := func(f *frame) {
		ordered <- f
		jobs <- f
	}
	fc := frameLen(o.PackSize)
	cf := newFrame(e.nextID)

	prog := Progress{Images: len(e.images)}
	extents := make([][][2]int64, len(e.images))
	for i, im := range e.images {
		x, err := chunkExtents(im)
		if err != nil {
			stop()
			return fmt.Errorf("dedup: image %q: %w", im.Name(), err)
		}
		extents[i] = x
		for _, r := range x {
			prog.BytesTotal += r[1] - r[0]
		}
	}
	hashers := make([]func([]byte) [32]byte, workers)
	for i := range hashers {
		hashers[i] = e.k.chunkHasher()
	}
	const batch = 1024 // chunks per read (4 MiB)
	rd := newReadAhead(batch * chunkSize)
	hs := make([][32]byte, batch)
	zero := make([]bool, batch)
	manifests := make([]*Manifest, len(e.images))
	fail := func(err error) error {
		rd.close()
		werr := stop()
		if werr != nil {
			return werr
		}
		return err
	}

	for ii, im := range e.images {
		prog.Image = ii
		m := &Manifest{Name: im.Name(), ID: im.ID(), Generation: im.Generation(), Seq: im.Seq(), CutTime: im.CutTime(), GroupCut: im.GroupCut(), Size: im.Size()}
		root := newRootHasher()
		rd.start(im, extents[ii])
		for {
			if err := ctx.Err(); err != nil {
				return fail(err)
			}
			b, off, err := rd.next()
			if err == io.EOF {
				break
			}
			if err != nil {
				return fail(fmt.Errorf("dedup: image %q at %d: %w", im.Name(), off, err))
			}
			n := int64(len(b))
			nc := int((n + chunkSize - 1) / chunkSize)
			hashBatch(b, nc, hs, zero, hashers)
			for c := 0; c < nc; c++ {
				if zero[c] {
					continue
				}
				idx := uint64(off/chunkSize) + uint64(c)
				id, found, err := e.tab.lookup(&hs[c], e.ids.get)
				if err != nil {
					return fail(err)
				}
				if !found {
					id = e.nextID
					if err := e.tab.insert(&hs[c], id); err != nil {
						return fail(err)
					}
					e.nextID++
					e.ids.add(hs[c])
					cf.ids = append(cf.ids, hs[c])
					cf.raw = append(cf.raw, b[c*chunkSize:(c+1)*chunkSize]...)
					if len(cf.ids) == fc {
						submit(cf)
						cf = newFrame(e.nextID)
					}
				}
				m.runs = appendRun(m.runs, idx, id)
				m.Chunks++
				root.add(idx, short(&hs[c]))
			}
			rd.release(b)
			e.ids.trim()
			prog.BytesRead += n
			prog.UniqueBytes = int64(e.nextID) * chunkSize
			prog.SeedBytes = e.seedBytes.Load()
			if o.Progress != nil {
				o.Progress(prog)
			}
		}
		m.Root = root.sum()
		m.Allocated = allocated(m.runs, m.Size)
		manifests[ii] = m
		e.sum.Roots = append(e.sum.Roots, hex.EncodeToString(m.Root[:]))
		e.sum.Chunks += int(m.Chunks)
	}
	rd.close()
	if len(cf.ids) > 0 {
		submit(cf)
	}
	if err := stop(); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	e.sum.IDTableBytes = e.tab.bytes()
	e.sum.Allocated = prog.BytesTotal
	if err := e.finish(manifests); err != nil {
		return err
	}
	e.sum.Images = len(e.images)
	e.sum.Allocated = prog.BytesTotal
	e.sum.UniqueChunks = int(e.nextID)
	e.sum.Unique = int64(e.nextID) * chunkSize
	e.sum.SeedBytes = e.seedBytes.Load()
	e.sum.SeedID = e.seed
	e.sum.Volumes = len(e.lay.all)
	if e.sum.SeedBytes > 0 {
		e.sum.Ratio = float64(e.sum.Allocated) / float64(e.sum.SeedBytes)
	}
	if o.Progress != nil {
		prog.Image = len(e.images)
		prog.SeedBytes = e.sum.SeedBytes
		o.Progress(prog)
	}
	return nil
}

// writer assembles compressed frames, in order, into packs and places them.
func (e *exporter) writer(ctx context.Context, ordered chan *frame) error {
	var cur []*frame
	var chunks int
	emit := func() error {
		if len(cur) == 0 {
			return nil
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		num := e.nextPack
		first := cur[0].first
		var ids [][32]byte
		for _, f := range cur {
			ids = append(ids, f.ids...)
		}
		data := e.k.seal(kindPack, num, encodePack(num, cur))
		if err := e.ids.write(first, ids); err != nil {
			return fmt.Errorf("dedup: scratch: %w", err)
		}
		if err := e.ids.f.Sync(); err != nil {
			return fmt.Errorf("dedup: scratch: %w", err)
		}
		idb := make([]byte, 0, len(ids)*32)
		for i := range ids {
			idb = append(idb, ids[i][:]...)
		}
		jp := jPack{num: num, first: first, count: uint32(len(ids)), length: int64(len(data)), hash: blake3.Sum256(data), idHash: blake3.Sum256(idb)}
		if err := e.lay.placePack(data, jp); err != nil {
			return err
		}
		e.nextPack++
		cur, chunks = nil, 0
		return nil
	}
	for f := range ordered {
		<-f.done
		if len(cur) > 0 && (packLen(append(cur, f)) > e.o.PackSize || chunks+len(f.ids) > maxPackChunks) {
			if err := emit(); err != nil {
				return err
			}
		}
		cur = append(cur, f)
		chunks += len(f.ids)
	}
	return emit()
}

// finish writes the manifests, closes the groups and writes the index onto
// the volumes at hand.
func (e *exporter) finish(ms []*Manifest) error {
	l := e.lay
	if !l.seq {
		if err := l.closeGroup(); err != nil {
			return err
		}
	}
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedBetterCompression), zstd.WithEncoderConcurrency(1))
	if err != nil {
		return err
	}
	data := make([][]byte, len(ms))
	for i, m := range ms {
		data[i] = e.k.seal(kindManifest, uint64(i), encodeManifest(m, enc))
		if len(data[i]) > maxShardSize {
			return fmt.Errorf("dedup: manifest of %q too large", m.Name)
		}
	}
	if l.seq {
		roots := make([][32]byte, len(ms))
		for i, m := range ms {
			roots[i] = m.Root
		}
		if err := l.finishSeq(data, [3]int64{e.sum.Allocated, int64(e.sum.Chunks), int64(e.nextID)}, roots); err != nil {
			return err
		}
		e.jf.Close()
		e.ids.Close()
		cleanState(e.state)
		syncDir(e.state)
		return nil
	}
	for i := range ms {
		rem := len(ms) - i
		var bound int64
		for _, d := range data[i : i+min(groupData, rem)] {
			bound = max(bound, int64(len(d)))
		}
		mk := func() *curGroup {
			n := min(groupData, rem)
			p := parityCount(n, e.o.Parity)
			if e.o.SurviveVolumeLoss {
				p = surviveParity(n, len(e.vols), p)
			}
			return &curGroup{p: p, n: n, acc: newParityAcc(p)}
		}
		if err := l.place(kindManifest, uint64(i), data[i], bound, nil, mk); err != nil {
			return err
		}
	}
	if err := l.closeGroup(); err != nil {
		return err
	}
	ix := l.index(false)
	ix.Images = len(ms)
	for _, v := range l.set {
		if err := l.writeIndex(v, ix); err != nil {
			return err
		}
	}
	for _, v := range l.set {
		os.Remove(filepath.Join(v.dir, labelName))
		removeStale(v, ix)
		syncDir(v.dir)
	}
	e.jf.Close()
	e.ids.Close()
	cleanState(e.state)
	syncDir(e.state)
	return nil
}

// removeStale deletes shard files on v that the index does not list (left by
// an interrupted run whose journal was cut).
func removeStale(v *volState, ix *seedIndex) {
	keep := map[string]bool{}
	for _, g := range ix.Groups {
		for _, s := range g.Shards {
			if s.Vol == v.n {
				keep[filepath.Join(v.dir, s.Name())] = true
			}
		}
	}
	for _, n := range indexNames {
		keep[filepath.Join(v.dir, n)] = true
	}
	for _, pat := range seedFilePatterns {
		m, _ := filepath.Glob(filepath.Join(v.dir, pat))
		for _, f := range m {
			if !keep[f] {
				os.Remove(f)
			}
		}
	}
}

// ---- helpers ----

// readAhead reads the extents of one image in batches on a goroutine, one
// batch ahead of the hashing.
type readAhead struct {
	size int
	out  chan raBatch
	free chan []byte
	quit chan struct{}
	wg   sync.WaitGroup
}

type raBatch struct {
	b   []byte
	off int64
	err error
}

func newReadAhead(size int) *readAhead {
	r := &readAhead{size: size, free: make(chan []byte, 3)}
	for i := 0; i < 3; i++ {
		r.free <- make([]byte, size)
	}
	return r
}

func (r *readAhead) start(im ImageSource, ext [][2]int64) {
	r.close()
	r.out = make(chan raBatch, 2)
	r.quit = make(chan struct{})
	r.wg.Add(1)
	go func(out chan raBatch, quit chan struct{}) {
		defer r.wg.Done()
		defer close(out)
		for _, x := range ext {
			for off := x[0]; off < x[1]; {
				var buf []byte
				select {
				case buf = <-r.free:
				case <-quit:
					return
				}
				n := min(int64(r.size), x[1]-off)
				b := buf[:n]
				err := readFull(im, b, off)
				select {
				case out <- raBatch{b, off, err}:
				case <-quit:
					return
				}
				if err != nil {
					return
				}
				off += n
			}
		}
	}(r.out, r.quit)
}

// next returns the next batch and its offset, io.EOF at the image's end.
func (r *readAhead) next() ([]byte, int64, error) {
	b, ok := <-r.out
	if !ok {
		return nil, 0, io.EOF
	}
	return b.b, b.off, b.err
}

func (r *readAhead) release(b []byte) { r.free <- b[:cap(b)] }

func (r *readAhead) close() {
	if r.quit == nil {
		return
	}
	close(r.quit)
	for b := range r.out {
		if b.b != nil {
			r.free <- b.b[:cap(b.b)]
		}
	}
	r.wg.Wait()
	r.quit = nil
}

// hashBatch hashes nc chunks of b in parallel and marks all-zero chunks.
func hashBatch(b []byte, nc int, hs [][32]byte, zero []bool, hashers []func([]byte) [32]byte) {
	// Pad a short last chunk with zeros (image end): b has room up to
	// nc*chunkSize because buf is chunk-aligned.
	if tail := len(b) % chunkSize; tail != 0 {
		b = b[:nc*chunkSize]
		clear(b[len(b)-chunkSize+tail:])
	}
	w := len(hashers)
	per := (nc + w - 1) / w
	var wg sync.WaitGroup
	for i := 0; i < w; i++ {
		lo, hi := i*per, min((i+1)*per, nc)
		if lo >= hi {
			break
		}
		wg.Add(1)
		go func(h func([]byte) [32]byte) {
			defer wg.Done()
			for c := lo; c < hi; c++ {
				ch := b[c*chunkSize : (c+1)*chunkSize]
				if zero[c] = isZero(ch); !zero[c] {
					hs[c] = h(ch)
				}
			}
		}(hashers[i])
	}
	wg.Wait()
}

// chunkExtents turns the image's data extents into sorted, merged,
// chunk-aligned [start, end) byte ranges clipped to the image (end may be the
// image size when it is not chunk-aligned).
func chunkExtents(im ImageSource) ([][2]int64, error) {
	ext, err := im.DataExtents()
	if err != nil {
		return nil, err
	}
	size := im.Size()
	var out [][2]int64
	for _, e := range ext {
		s, l := e[0], e[1]
		if s < 0 || l < 0 || s > size {
			return nil, fmt.Errorf("extent {%d,%d} outside image of %d bytes", s, l, size)
		}
		end := min(s+l, size)
		s = s / chunkSize * chunkSize
		end = min((end+chunkSize-1)/chunkSize*chunkSize, size)
		if end > s {
			out = append(out, [2]int64{s, end})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i][0] < out[j][0] })
	merged := out[:0]
	for _, e := range out {
		if n := len(merged); n > 0 && e[0] <= merged[n-1][1] {
			merged[n-1][1] = max(merged[n-1][1], e[1])
			continue
		}
		merged = append(merged, e)
	}
	return merged, nil
}

func readFull(r io.ReaderAt, b []byte, off int64) error {
	n, err := r.ReadAt(b, off)
	if n == len(b) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}

func padTo(b []byte, n int64) []byte {
	if int64(len(b)) == n {
		return b
	}
	if int64(cap(b)) >= n {
		b = b[:n]
		clear(b[len(b):n])
		return b
	}
	p := make([]byte, n)
	copy(p, b)
	return p
}

// mode is the mode of the seed's files.
func (e *exporter) mode() os.FileMode {
	if e.o.Mode == 0 {
		return DefaultMode
	}
	return e.o.Mode.Perm()
}

func syncDir(dir string) {
	if f, err := os.Open(dir); err == nil {
		f.Sync()
		f.Close()
	}
}
