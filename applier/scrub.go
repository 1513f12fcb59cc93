package applier

// Scrub: a periodic, throttled re-read of everything the replica would ever
// hand out, so bit rot is found while a good copy (the primary) still exists,
// not at failover.
//
// Per group it covers every retained point without reading each point in
// full: the latest point is verified block by block (VerifyPoint: latest.img
// against hashes.bin, through the undo logs where an apply is under way); an
// image no longer in the latest point (retired) is verified at the newest
// point that holds it; every undo log is re-read completely and checked
// against its file hash (what older points read from them). Blocks of an
// older point come either from latest.img (checked) or from an undo log
// (checked), so this is equivalent to verifying every point, at the cost of
// one read of the images plus the undo logs.
//
// The prepared promotion copy (warm standby or a prepared planned failover)
// is re-read and every block compared with the hash file written with it
// (VerifyPrepared). A damaged copy is dropped, so the next promotion copies
// the point in full from the store (checked block by block).
//
// Findings become health reasons (Critical: the latest point or a promotion
// copy is damaged; Warning: an older point) until the next scrub of the group
// finds the group clean.

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/zeebo/blake3"

	"github.com/standin/standin/internal/format"
	"github.com/standin/standin/internal/fsutil"
)

// scrubState holds the last scrub findings (persisted in scrub.json, so
// they survive a restart) and the running prepared-copy verification.
type scrubState struct {
	mu  sync.Mutex
	rec scrubFile
	// prepGen counts the changes of the prepared copy in each directory
	// (preparedChanging); verifying: the running VerifyPrepared calls.
	prepGen   map[string]uint64
	verifying map[uint64]verifying
	nextVer   uint64
}

type verifying struct {
	dir    string
	cancel context.CancelFunc
}

// scrubFile is STORE/scrub.json: when the scrubs ran and what they found.
type scrubFile struct {
	// Since: when the periodic scrub first saw the store (its first run is
	// due an interval later).
	Since time.Time `json:"since,omitzero"`
	// Last: end of the last complete scrub.
	Last   time.Time                 `json:"last,omitzero"`
	Groups map[string]scrubGroupFile `json:"groups,omitempty"`
}

type scrubGroupFile struct {
	Last     time.Time      `json:"last"` // end of its last scrub
	Findings []ScrubFinding `json:"findings,omitempty"`
}

const scrubFileName = "scrub.json"

// loadScrub reads scrub.json at open; a damaged one is reported and
// replaced by the next scrub.
func (r *Replica) loadScrub() {
	var rec scrubFile
	if err := fsutil.ReadJSON(filepath.Join(r.dir, scrubFileName), &rec); err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			r.o.Logger.Error("scrub record unreadable: earlier findings and the scrub schedule are lost (the next scrub rewrites it)", "err", err)
		}
		return
	}
	r.scrub.rec = rec
}

// saveScrub writes scrub.json durably. Called with r.scrub.mu held.
func (r *Replica) saveScrub() error {
	return fsutil.WriteJSON(filepath.Join(r.dir, scrubFileName), r.scrub.rec)
}

// ScrubDue returns when the next periodic scrub (every interval) is due: an
// interval after the end of the last complete scrub, whenever that was
// (also before a restart). A store never scrubbed is due an interval after
// the first call.
func (r *Replica) ScrubDue(interval time.Duration) (time.Time, error) {
	r.scrub.mu.Lock()
	defer r.scrub.mu.Unlock()
	rec := &r.scrub.rec
	if rec.Last.IsZero() && rec.Since.IsZero() {
		rec.Since = time.Now()
		if err := r.saveScrub(); err != nil {
			return rec.Since.Add(interval), err
		}
	}
	base := rec.Last
	if base.IsZero() {
		base = rec.Since
	}
	return base.Add(interval), nil
}

// LastScrub returns the end of the last complete scrub (zero: none yet).
func (r *Replica) LastScrub() time.Time {
	r.scrub.mu.Lock()
	defer r.scrub.mu.Unlock()
	return r.scrub.rec.Last
}

// ScrubFindings returns the findings of every group's last scrub.
func (r *Replica) ScrubFindings() []ScrubFinding {
	r.scrub.mu.Lock()
	defer r.scrub.mu.Unlock()
	var out []ScrubFinding
	for _, n := range slices.Sorted(maps.Keys(r.scrub.rec.Groups)) {
		out = append(out, r.scrub.rec.Groups[n].Findings...)
	}
	return out
}

// ScrubFinding is one damage the scrub found.
type ScrubFinding struct {
	Group    string `json:"group"`
	Severity string `json:"severity"` // "Critical" or "Warning"
	What     string `json:"what"`     // "latest", "point", "undo", "prepared"
	Message  string `json:"message"`
}

// ScrubReport is the outcome of one scrub.
type ScrubReport struct {
	Groups   int            `json:"groups"`
	Bytes    int64          `json:"bytes"` // bytes read
	Findings []ScrubFinding `json:"findings,omitempty"`
	Seconds  float64        `json:"seconds"`
}

// ScrubOptions tune Scrub.
type ScrubOptions struct {
	// Rate limits the bytes read per second (0 = unlimited).
	Rate int64
	// PreparedDir returns where group's prepared promotion copy lives (""
	// = none is kept).
	PreparedDir func(group string) string
}

// pacer keeps reads at rate bytes/s on average.
type pacer struct {
	rate  int64
	start time.Time
	n     int64
}

func newPacer(rate int64) *pacer {
	return &pacer{rate: rate, start: time.Now()}
}

func (p *pacer) pace(ctx context.Context, n int64) error {
	p.n += n
	if p.rate > 0 {
		want := time.Duration(float64(p.n) / float64(p.rate) * float64(time.Second))
		if d := want - time.Since(p.start); d > 0 {
			t := time.NewTimer(d)
			defer t.Stop()
			select {
			case <-t.C:
			case <-ctx.Done():
			}
		}
	}
	return ctx.Err()
}

// Scrub verifies every group of the store (see the file comment) and records
// the findings for Health. Damage is reported in the findings, not as an
// error; the error is for a scrub that could not run (ctx ended, I/O).
func (r *Replica) Scrub(ctx context.Context, o ScrubOptions) (ScrubReport, error) {
	start := time.Now()
	var rep ScrubReport
	r.mu.Lock()
	names := make([]string, 0, len(r.groups))
	for n := range r.groups {
		names = append(names, n)
	}
	r.mu.Unlock()
	sort.Strings(names)
	p := newPacer(o.Rate)
	for _, name := range names {
		dir := ""
		if o.PreparedDir != nil {
			dir = o.PreparedDir(name)
		}
		fs, err := r.scrubGroup(ctx, name, dir, p)
		if err != nil {
			if ctx.Err() != nil {
				return rep, ctx.Err()
			}
			if errors.Is(err, ErrNoGroup) {
				continue
			}
			fs = append(fs, ScrubFinding{Group: name, Severity: "Warning", What: "point", Message: "scrub could not read the group: " + err.Error()})
		}
		rep.Groups++
		rep.Findings = append(rep.Findings, fs...)
		r.scrub.mu.Lock()
		if r.scrub.rec.Groups == nil {
			r.scrub.rec.Groups = map[string]scrubGroupFile{}
		}
		r.scrub.rec.Groups[name] = scrubGroupFile{Last: time.Now(), Findings: fs}
		err = r.saveScrub()
		r.scrub.mu.Unlock()
		if err != nil {
			return rep, fmt.Errorf("recording the scrub findings: %w", err)
		}
	}
	rep.Bytes, rep.Seconds = p.n, time.Since(start).Seconds()
	r.scrub.mu.Lock()
	defer r.scrub.mu.Unlock()
	for n := range r.scrub.rec.Groups {
		if !slices.Contains(names, n) {
			delete(r.scrub.rec.Groups, n) // the group is gone
		}
	}
	r.scrub.rec.Last = time.Now()
	if err := r.saveScrub(); err != nil {
		return rep, fmt.Errorf("recording the scrub: %w", err)
	}
	return rep, nil
}

func (r *Replica) scrubGroup(ctx context.Context, name, preparedDir string, p *pacer) ([]ScrubFinding, error) {
	g, err := r.group(name)
	if err != nil {
		return nil, err
	}
	var out []ScrubFinding
	add := func(sev, what, f string, a ...any) {
		out = append(out, ScrubFinding{Group: name, Severity: sev, What: what, Message: fmt.Sprintf(f, a...)})
	}
	g.mu.RLock()
	loadErr := g.loadErr
	var pts []pointRec
	if loadErr == nil {
		pts = slices.Clone(g.pts.Points)
	}
	type ulog struct {
		image, path string
		from, to    uint64
	}
	var logs []ulog
	for id, im := range g.images {
		for _, l := range im.logs {
			logs = append(logs, ulog{id, l.path, l.from, l.to})
		}
	}
	g.mu.RUnlock()
	if loadErr != nil {
		add("Critical", "latest", "group %s does not load: %v", name, loadErr)
		return out, nil
	}
	// Latest point, then the newest point of every image not in it.
	covered := map[string]bool{}
	for i := len(pts) - 1; i >= 0; i-- {
		pt := pts[i]
		need := false
		for id := range pt.Seqs {
			if !covered[id] {
				need = true
			}
		}
		if !need {
			continue
		}
		vr, err := r.verifyPoint(ctx, name, pointID(pt.N), p.pace)
		switch {
		case errors.Is(err, ErrMismatch) && i == len(pts)-1:
			add("Critical", "latest", "latest point %s is damaged: image %s block %d reads %.16s…, recorded %.16s… (restore from the primary: 'standin replicate resync')", vr.Point, vr.Mismatch.Image, vr.Mismatch.Block, vr.Mismatch.Got, vr.Mismatch.Want)
		case errors.Is(err, ErrMismatch):
			add("Warning", "point", "point %s is damaged: image %s block %d reads %.16s…, recorded %.16s…", vr.Point, vr.Mismatch.Image, vr.Mismatch.Block, vr.Mismatch.Got, vr.Mismatch.Want)
		case errors.Is(err, ErrPointGone) || errors.Is(err, ErrNoPoint):
			// expired meanwhile
		case err != nil:
			if ctx.Err() != nil {
				return out, ctx.Err()
			}
			add("Warning", "point", "point %s could not be verified: %v", pointID(pt.N), err)
		}
		for id := range pt.Seqs {
			covered[id] = true
		}
	}
	// Undo logs: every byte against the file hash.
	for _, l := range logs {
		err := checkUndoFile(ctx, l.path, p.pace)
		if errors.Is(err, os.ErrNotExist) {
			continue // merged or expired meanwhile
		}
		if err != nil && ctx.Err() != nil {
			return out, ctx.Err()
		}
		if err != nil {
			if _, serr := os.Stat(l.path); serr != nil {
				continue // gone meanwhile
			}
			add("Warning", "undo", "undo log %s of image %s (points before %d) is damaged: %v", filepath.Base(l.path), l.image, l.to+1, err)
		}
	}
	if preparedDir != "" {
		pr, err := r.VerifyPrepared(ctx, name, preparedDir, p.pace, true)
		switch {
		case errors.Is(err, ErrMismatch):
			add("Critical", "prepared", "the promotion copy prepared at point %s is damaged (%v); it was dropped — the next promotion copies the point from the store", pr.Point, err)
		case err != nil && !errors.Is(err, errNotPrepared) && !errors.Is(err, errPreparedChanged):
			if ctx.Err() != nil {
				return out, ctx.Err()
			}
			add("Warning", "prepared", "the promotion copy could not be verified: %v", err)
		}
	}
	return out, nil
}

// checkUndoFile re-reads the undo log at path and checks it against the
// file hash in its footer (its entry table is in memory, checked at load),
// paced per chunk read.
func checkUndoFile(ctx context.Context, path string, pace func(context.Context, int64) error) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	size := st.Size()
	if size < undoHeaderSize+undoFooterSize {
		return fmt.Errorf("%w: %d bytes, too short", errUndoCorrupt, size)
	}
	var ft [undoFooterSize]byte
	if err := readFullAt(f, ft[:], size-undoFooterSize); err != nil {
		return err
	}
	le := binary.LittleEndian
	end := uint64(size - undoFooterSize)
	if string(ft[56:]) != undoEndMagic || le.Uint64(ft[0:])+le.Uint64(ft[8:])*undoEntrySize != end {
		return fmt.Errorf("%w: footer damaged", errUndoCorrupt)
	}
	h := blake3.New()
	buf := make([]byte, 1<<20)
	for off := int64(0); off < int64(end); {
		n := min(int64(len(buf)), int64(end)-off)
		if err := pace(ctx, n); err != nil {
			return err
		}
		if err := readFullAt(f, buf[:n], off); err != nil {
			return err
		}
		h.Write(buf[:n])
		off += n
	}
	if !bytes.Equal(h.Sum(nil), ft[24:56]) {
		return fmt.Errorf("%w: file hash mismatch", errUndoCorrupt)
	}
	return nil
}

// ScrubHealth returns the health and reasons of group's last scrub findings
// (health "Normal" and no reasons when it found nothing or never ran) and
// when that scrub of the group ended (zero: never).
func (r *Replica) ScrubHealth(group string) (health string, reasons []string, last time.Time) {
	r.scrub.mu.Lock()
	defer r.scrub.mu.Unlock()
	health = "Normal"
	gr := r.scrub.rec.Groups[group]
	for _, f := range gr.Findings {
		health = maxHealth(health, f.Severity)
		reasons = append(reasons, "scrub: "+f.Message)
	}
	return health, reasons, gr.Last
}

// PreparedReport is the outcome of VerifyPrepared.
type PreparedReport struct {
	Group    string         `json:"group"`
	Point    string         `json:"point"` // the point the copy holds
	Images   int            `json:"images"`
	Blocks   uint64         `json:"blocks"`
	Mismatch *BlockMismatch `json:"mismatch,omitempty"`
	Dropped  bool           `json:"dropped,omitempty"`
}

var errPreparedChanged = errors.New("the prepared copy changed while it was verified (promoted, dropped or refreshed): no verdict (verify again)")

// ErrNotPrepared: there is no prepared promotion copy to verify.
var ErrNotPrepared = errNotPrepared

// VerifyPrepared re-reads the prepared promotion copy of group in dstDir and
// compares every block with the hash recorded when it was written (sizes
// included). A mismatch is ErrMismatch; with drop, the damaged copy and its
// pin are removed, so the next preparation or promotion copies anew. pace
// (nil = unthrottled) is called with the bytes about to be read.
//
// It reads without holding the prepared copies' lock, so neither a
// promotion nor a preparation (planned failover, warm standby refresh)
// waits for it (preparedChanging): a promotion or drop of the copy stops
// it, and a finding made while the copy was refreshed gives no verdict
// (errPreparedChanged); a finding is acted on only if the copy did not
// change while it was read.
func (r *Replica) VerifyPrepared(ctx context.Context, groupName, dstDir string, pace func(context.Context, int64) error, drop bool) (PreparedReport, error) {
	rep := PreparedReport{Group: groupName}
	g, err := r.group(groupName)
	if err != nil {
		return rep, err
	}
	vctx, cancel := context.WithCancel(ctx)
	defer cancel()
	r.prepMu.Lock()
	var rec preparedRec
	rerr := fsutil.ReadJSON(filepath.Join(dstDir, preparedFile), &rec)
	dir := filepath.Clean(dstDir)
	r.scrub.mu.Lock()
	gen := r.scrub.prepGen[dir]
	key := r.scrub.nextVer
	r.scrub.nextVer++
	if r.scrub.verifying == nil {
		r.scrub.verifying = map[uint64]verifying{}
	}
	r.scrub.verifying[key] = verifying{dir, cancel}
	r.scrub.mu.Unlock()
	r.prepMu.Unlock()
	defer func() {
		r.scrub.mu.Lock()
		delete(r.scrub.verifying, key)
		r.scrub.mu.Unlock()
	}()
	if rerr != nil {
		return rep, fmt.Errorf("group %s: %w in %s", groupName, errNotPrepared, dstDir)
	}
	rep.Point = pointID(rec.Point)
	verr := verifyPreparedFiles(vctx, rec, dstDir, pace, &rep)
	if ctx.Err() != nil {
		return rep, ctx.Err()
	}
	r.prepMu.Lock()
	defer r.prepMu.Unlock()
	r.scrub.mu.Lock()
	changed := r.scrub.prepGen[dir] != gen
	r.scrub.mu.Unlock()
	if vctx.Err() != nil || (changed && verr != nil) {
		// Stopped, or a finding that may come from a block read while a
		// refresh rewrote it: no verdict. (A clean read stays one: each
		// block matched its hash when it was read.)
		return rep, errPreparedChanged
	}
	if errors.Is(verr, ErrMismatch) && drop {
		r.o.Logger.Warn("prepared promotion copy damaged; dropped", "group", groupName, "point", rec.Point, "err", verr)
		r.dropPrepared(g, dstDir)
		rep.Dropped = true
	}
	return rep, verr
}

// preparedChanging is called, with r.prepMu held, before the prepared copy
// in dstDir changes. stop (the copy is promoted or dropped): a running
// VerifyPrepared of it stops, without a verdict; else (a refresh rewrites
// changed blocks in place) it goes on, and a finding it then makes gives no
// verdict either.
func (r *Replica) preparedChanging(dstDir string, stop bool) {
	dir := filepath.Clean(dstDir)
	r.scrub.mu.Lock()
	defer r.scrub.mu.Unlock()
	if r.scrub.prepGen == nil {
		r.scrub.prepGen = map[string]uint64{}
	}
	r.scrub.prepGen[dir]++
	if !stop {
		return
	}
	for _, v := range r.scrub.verifying {
		if v.dir == dir {
			v.cancel()
		}
	}
}

// verifyPreparedFiles checks the files of rec in dstDir.
func verifyPreparedFiles(ctx context.Context, rec preparedRec, dstDir string, pace func(context.Context, int64) error, rep *PreparedReport) error {
	const chunk = 256
	buf := make([]byte, chunk*format.BlockSize)
	hb := make([]byte, chunk*32)
	for _, im := range rec.Images {
		rep.Images++
		mismatch := func(b uint64, want, got []byte) error {
			rep.Mismatch = &BlockMismatch{Image: im.ID, Block: b, Want: hex.EncodeToString(want), Got: hex.EncodeToString(got)}
			return fmt.Errorf("group %s: prepared copy %s.img.pre block %d: %w", rec.Group, im.ID, b, ErrMismatch)
		}
		f, err := os.Open(filepath.Join(dstDir, im.ID+".img.pre"))
		if err != nil {
			return fmt.Errorf("group %s: prepared copy of %s: %w: %v", rec.Group, im.ID, ErrMismatch, err)
		}
		hf, err := os.Open(filepath.Join(dstDir, im.ID+".hashes.pre"))
		if err != nil {
			f.Close()
			return fmt.Errorf("group %s: prepared hashes of %s: %w: %v", rec.Group, im.ID, ErrMismatch, err)
		}
		err = func() error {
			defer f.Close()
			defer hf.Close()
			nb := blocksOf(uint64(im.Size))
			fst, err1 := f.Stat()
			hst, err2 := hf.Stat()
			if err := errors.Join(err1, err2); err != nil {
				return err
			}
			if fst.Size() != im.Size || hst.Size() != int64(nb)*32 {
				return fmt.Errorf("group %s: prepared copy of %s is %d bytes (hashes %d), recorded %d: %w", rec.Group, im.ID, fst.Size(), hst.Size(), im.Size, ErrMismatch)
			}
			for b := uint64(0); b < nb; b += chunk {
				if err := ctx.Err(); err != nil {
					return err
				}
				n := min(chunk, nb-b)
				if pace != nil {
					if err := pace(ctx, int64(n)*format.BlockSize); err != nil {
						return err
					}
				}
				clear(buf[:n*format.BlockSize])
				end := min(int64(b+n)*format.BlockSize, im.Size)
				if err := readFullAt(f, buf[:end-int64(b)*format.BlockSize], int64(b)*format.BlockSize); err != nil {
					return err
				}
				if err := readFullAt(hf, hb[:n*32], int64(b)*32); err != nil {
					return err
				}
				for i := uint64(0); i < n; i++ {
					got := blockHash(buf[i*format.BlockSize : (i+1)*format.BlockSize])
					rep.Blocks++
					if string(got[:]) != string(hb[i*32:(i+1)*32]) {
						return mismatch(b+i, hb[i*32:(i+1)*32], got[:])
					}
				}
			}
			return nil
		}()
		if err != nil {
			return err
		}
	}
	return nil
}

// PreparePromoteChecked is PreparePromote for a coming planned failover: the
// copy (brought forward or copied) is then re-read completely and every
// block compared with its recorded hash, while the VM still runs on the
// primary. A damaged copy is dropped and the point copied anew from the
// store. The promotion itself then only re-reads (and checks against the
// store's recorded hashes) the blocks changed after the prepared point.
// blocks: the blocks verified.
func (r *Replica) PreparePromoteChecked(ctx context.Context, groupName, dstDir string) (point string, refreshed bool, blocks uint64, err error) {
	for attempt := 0; ; attempt++ {
		point, refreshed, err = r.PreparePromote(ctx, groupName, dstDir)
		if err != nil {
			return point, refreshed, blocks, err
		}
		g, err := r.group(groupName)
		if err != nil {
			return point, refreshed, blocks, err
		}
		r.prepMu.Lock()
		r.preparedChanging(dstDir, true) // a damaged copy is dropped below
		var rec preparedRec
		rep := PreparedReport{Group: groupName}
		verr := fsutil.ReadJSON(filepath.Join(dstDir, preparedFile), &rec)
		if verr == nil {
			verr = verifyPreparedFiles(ctx, rec, dstDir, nil, &rep)
		}
		blocks += rep.Blocks
		if verr != nil && errors.Is(verr, ErrMismatch) {
			r.o.Logger.Warn("prepared promotion copy damaged; copying the point anew", "group", groupName, "err", verr)
			r.dropPrepared(g, dstDir)
		}
		r.prepMu.Unlock()
		switch {
		case verr == nil:
			return point, refreshed, blocks, nil
		case !errors.Is(verr, ErrMismatch) || attempt > 0:
			return point, refreshed, blocks, fmt.Errorf("verifying the prepared copy: %w", verr)
		}
	}
}
