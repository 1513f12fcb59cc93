package shipper

// Dedup-aware base cycles. A base cycle (the first of a relationship, a new
// generation after lost tracking state, a resync) carries every allocated
// block. Before it is uploaded the shipper asks the replica what it already
// holds and uploads a thinned copy whose held blocks are ref extents
// (internal/format KindRef: the block hash only):
//
//  1. region hashes (wire.RegionBlocks blocks each) of the replica's copy of
//     the image, if it has one, are compared with those computed from the
//     cycle's block hashes: every data block of an equal region is a ref
//     (kept in place on the replica);
//  2. the data blocks of the other regions are sent as hashes (held query,
//     wire.MaxHeldBlocks per request); held blocks (same position or
//     anywhere the primary may access) become refs;
//  3. the thinned cycle is written to STORE/thin/ID-gG-sS.cyc (durable, so
//     an interrupted upload resumes it) and uploaded under the cycle's
//     id/gen/seq with its file hash naming the variant.
//
// If the commit answers missing_chunks (a held block changed meanwhile), the
// thinned cycle is rebuilt with those blocks as data and sent again (at most
// twice), then the original cycle is sent. A replica without the chunk
// endpoints gets the original cycle.

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/google/uuid"

	"github.com/standin/standin/internal/format"
	"github.com/standin/standin/internal/fsutil"
	"github.com/standin/standin/internal/wire"
	"github.com/standin/standin/tracker"
)

// errNoChunkAPI: the replica does not answer chunk queries (older version).
var errNoChunkAPI = errors.New("the replica does not support chunk queries")

// errNoImage: the replica does not hold the image (no region hashes).
var errNoImage = errors.New("the replica does not hold the image")

func (c *client) imagePath(group, id, what, name string, nblocks uint64, extra string) string {
	return fmt.Sprintf("%s/groups/%s/images/%s/%s?name=%s&blocks=%d%s", c.base, url.PathEscape(group), url.PathEscape(id), what, url.QueryEscape(name), nblocks, extra)
}

// doBinary sends req and returns the binary body of a 2xx reply (at most max bytes).
func (c *client) doBinary(req *http.Request, max int64) ([]byte, error) {
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
		var e wire.Error
		if jerr := json.Unmarshal(b, &e); jerr != nil || e.Code == "" {
			if resp.StatusCode == http.StatusNotFound || resp.StatusCode == http.StatusMethodNotAllowed {
				return nil, errNoChunkAPI // a replica that predates the endpoints
			}
			e = wire.Error{Error: strings.TrimSpace(string(b)), Code: "failure"}
		}
		if e.Code == "no_image" {
			return nil, errNoImage
		}
		return nil, &RemoteError{Status: resp.StatusCode, Msg: e.Error, Code: e.Code}
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, max+1))
	if err == nil && int64(len(b)) > max {
		err = fmt.Errorf("reply of more than %d bytes", max)
	}
	return b, err
}

// held asks which blocks of runs the replica holds: one status byte per block.
func (c *client) held(ctx context.Context, group, name, id string, nblocks uint64, runs []wire.HeldRun) ([]byte, int64, error) {
	body := wire.EncodeHeld(runs)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.imagePath(group, id, "held", name, nblocks, ""), bytes.NewReader(body))
	if err != nil {
		return nil, 0, err
	}
	req.Header.Set("Content-Type", "application/octet-stream")
	n := 0
	for _, r := range runs {
		n += r.Blocks()
	}
	out, err := c.doBinary(req, int64(n))
	if err == nil && len(out) != n {
		err = fmt.Errorf("held query: %d answers for %d blocks", len(out), n)
	}
	return out, int64(len(body)), err
}

// regions returns the replica's region hashes [from, from+count).
func (c *client) regions(ctx context.Context, group, name, id string, nblocks, from, count uint64) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.imagePath(group, id, "regions", name, nblocks, fmt.Sprintf("&from=%d&count=%d", from, count)), nil)
	if err != nil {
		return nil, err
	}
	out, err := c.doBinary(req, int64(count)*wire.HashSize)
	if err == nil && uint64(len(out)) != count*wire.HashSize {
		err = fmt.Errorf("regions query: %d bytes for %d regions", len(out), count)
	}
	return out, err
}

// discard deletes the replica's unapplied upload of a cycle (another variant follows).
func (c *client) discard(ctx context.Context, group, name string, r wire.CycleRef) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodDelete, c.uploadPath(group, r)+"?name="+url.QueryEscape(name), nil)
	if err != nil {
		return err
	}
	return doJSON(c.hc, req, nil)
}

// fileHash returns the whole-file hash (hex) of a cycle file from its footer.
func fileHash(path string) (string, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return "", 0, err
	}
	_, ft, err := format.ReadInfo(f, st.Size())
	if err != nil {
		return "", 0, fmt.Errorf("%s: %w", path, err)
	}
	return hex.EncodeToString(ft.FileHash[:]), st.Size(), nil
}

func (s *Shipper) thinDir() string { return filepath.Join(s.dir, "thin") }

func (s *Shipper) thinPath(ci tracker.CycleInfo) string {
	return filepath.Join(s.thinDir(), fmt.Sprintf("%s-g%d-s%d.cyc", ci.ID, ci.Generation, ci.Seq))
}

// thinned is what a base cycle is uploaded as.
type thinned struct {
	path       string // the file to upload
	thin       bool   // path is a thinned copy
	refs, data uint64 // blocks of the thinned copy
	query      int64  // bytes sent for queries
}

// thinBase writes (or reuses) the thinned copy of base cycle ci; blocks in
// force are sent as data whatever the replica says. It returns the original
// when nothing is held or the replica cannot answer.
func (s *Shipper) thinBase(ctx context.Context, c *client, g Group, ci tracker.CycleInfo, force map[uint64]bool) (thinned, error) {
	out := thinned{path: ci.Path}
	tp := s.thinPath(ci)
	if force == nil {
		if ft, ok := readThin(tp, ci); ok {
			return thinned{path: tp, thin: true, refs: ft.RefBlocks, data: ft.DataBlocks}, nil
		}
	}
	f, err := os.Open(ci.Path)
	if err != nil {
		return out, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return out, err
	}
	cr, err := format.Open(f, st.Size())
	if err != nil {
		return out, fmt.Errorf("%s: %w", ci.Path, err)
	}
	h := cr.Header()
	nblocks := h.Blocks()
	if nblocks == 0 || cr.Footer().DataBlocks == 0 {
		return out, nil
	}
	// 1. Regions equal on both sides.
	equal, err := s.equalRegions(ctx, c, g, ci, cr)
	switch {
	case errors.Is(err, errNoChunkAPI):
		s.log.Info("the replica does not support dedup queries; sending the whole base cycle", "group", g.Name, "image", ci.Image)
		return out, nil
	case err != nil:
		return out, err
	}
	if err := os.MkdirAll(s.thinDir(), 0o700); err != nil {
		return out, err
	}
	tmp := tp + ".tmp"
	tf, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return out, err
	}
	defer func() {
		if tf != nil {
			tf.Close()
			os.Remove(tmp)
		}
	}()
	w, err := format.NewWriter(tf, h, format.WriterOptions{Compress: g.Compress != "none", Refs: true})
	if err != nil {
		return out, err
	}
	defer w.Abort()
	tb := &thinBuilder{ctx: ctx, c: c, g: g, ci: ci, cr: cr, w: w, equal: equal, force: force, nblocks: nblocks}
	err = tb.run()
	out.query += tb.query
	if err != nil {
		return out, err
	}
	sum, err := w.Close()
	if err != nil {
		return out, err
	}
	if sum.RefBlocks == 0 {
		return out, nil // nothing held: send the original
	}
	if err := tf.Sync(); err != nil {
		return out, err
	}
	if err := tf.Close(); err != nil {
		return out, err
	}
	tf = nil
	if err := os.Rename(tmp, tp); err != nil {
		os.Remove(tmp)
		return out, err
	}
	if err := fsutil.SyncDir(s.thinDir()); err != nil {
		return out, err
	}
	out.path, out.thin, out.refs, out.data = tp, true, sum.RefBlocks, sum.DataBlocks
	s.log.Info("thinned base cycle", "group", g.Name, "image", ci.Image, "seq", ci.Seq,
		"bytes", sum.Bytes, "original_bytes", ci.Bytes, "ref_blocks", sum.RefBlocks, "data_blocks", sum.DataBlocks, "query_bytes", out.query)
	return out, nil
}

// readThin reuses a thinned copy written earlier for the same cycle.
func readThin(path string, ci tracker.CycleInfo) (format.Footer, bool) {
	f, err := os.Open(path)
	if err != nil {
		return format.Footer{}, false
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return format.Footer{}, false
	}
	h, ft, err := format.ReadInfo(f, st.Size())
	if err != nil || h.Generation != ci.Generation || h.Seq != ci.Seq || !h.CutTime.Equal(ci.Time) || h.ImageSize != ci.Size || h.GroupCut != mustGroupCut(ci) {
		return format.Footer{}, false
	}
	return ft, true
}

func mustGroupCut(ci tracker.CycleInfo) [16]byte {
	u, _ := uuid.Parse(ci.GroupCut)
	return u
}

// equalRegions compares region hashes with the replica's copy of the image:
// equal[r] is true when region r holds the same blocks on both sides.
func (s *Shipper) equalRegions(ctx context.Context, c *client, g Group, ci tracker.CycleInfo, cr *format.Reader) ([]bool, error) {
	nblocks := cr.Header().Blocks()
	nreg := (nblocks + wire.RegionBlocks - 1) / wire.RegionBlocks
	equal := make([]bool, nreg)
	local, err := regionHashes(cr)
	if err != nil {
		return nil, err
	}
	for from := uint64(0); from < nreg; from += wire.MaxRegions {
		n := min(uint64(wire.MaxRegions), nreg-from)
		remote, err := c.regions(ctx, g.Name, ci.Image, ci.ID, nblocks, from, n)
		if errors.Is(err, errNoImage) {
			return equal, nil // a new image: nothing is equal in place
		}
		if err != nil {
			return nil, err
		}
		for i := uint64(0); i < n; i++ {
			equal[from+i] = bytes.Equal(remote[i*32:(i+1)*32], local[(from+i)*32:(from+i+1)*32])
		}
	}
	return equal, nil
}

// regionHashes computes the region hashes of the image a base cycle
// defines (data blocks: their hash; zero extents, gaps: 32 zero bytes).
func regionHashes(cr *format.Reader) ([]byte, error) {
	nblocks := cr.Header().Blocks()
	nreg := (nblocks + wire.RegionBlocks - 1) / wire.RegionBlocks
	out := make([]byte, 0, nreg*32)
	ent := make([]byte, wire.RegionBlocks*32)
	cur := uint64(0) // region being filled
	clear(ent)
	emit := func(upTo uint64) { // finish regions [cur, upTo)
		for ; cur < upTo; cur++ {
			n := min(uint64(wire.RegionBlocks), nblocks-cur*wire.RegionBlocks)
			s := wire.RegionHash(ent[:n*32])
			out = append(out, s[:]...)
			clear(ent)
		}
	}
	var hb []byte
	for i, e := range cr.Extents() {
		if e.Kind != format.KindData {
			continue
		}
		var err error
		if hb, err = cr.ExtentHashes(i, hb); err != nil {
			return nil, err
		}
		for k := uint64(0); k < uint64(e.Count); k++ {
			b := e.Start + k
			emit(b / wire.RegionBlocks)
			copy(ent[(b%wire.RegionBlocks)*32:], hb[k*32:(k+1)*32])
		}
	}
	emit(nreg)
	return out, nil
}

// thinBuilder writes the thinned cycle in one pass, querying the replica
// in batches of up to wire.MaxHeldBlocks blocks.
type thinBuilder struct {
	ctx     context.Context
	c       *client
	g       Group
	ci      tracker.CycleInfo
	cr      *format.Reader
	w       *format.Writer
	equal   []bool
	force   map[uint64]bool
	nblocks uint64
	query   int64

	items []thinItem // extents waiting for a held answer, in order
	runs  []wire.HeldRun
	asked int // blocks in runs
}

// thinItem is one extent of the original: ref[k] says block k becomes a
// ref; ask[k] that it waits for the held answer at answer index ans[k].
type thinItem struct {
	i      int
	hashes []byte
	ref    []bool
	ans    []int // -1: decided already
}

func (tb *thinBuilder) run() error {
	for i, e := range tb.cr.Extents() {
		if err := tb.ctx.Err(); err != nil {
			return err
		}
		if e.Kind != format.KindData {
			tb.items = append(tb.items, thinItem{i: i})
			continue
		}
		hb, err := tb.cr.ExtentHashes(i, nil)
		if err != nil {
			return err
		}
		it := thinItem{i: i, hashes: hb, ref: make([]bool, e.Count), ans: make([]int, e.Count)}
		for k := uint64(0); k < uint64(e.Count); k++ {
			b := e.Start + k
			it.ans[k] = -1
			switch {
			case tb.force[b]:
			case tb.equal[b/wire.RegionBlocks]:
				it.ref[k] = true
			default:
				it.ans[k] = tb.asked
				h := hb[k*32 : (k+1)*32]
				if n := len(tb.runs); n > 0 && tb.runs[n-1].Start+uint64(tb.runs[n-1].Blocks()) == b {
					tb.runs[n-1].Hashes = append(tb.runs[n-1].Hashes, h...)
				} else {
					tb.runs = append(tb.runs, wire.HeldRun{Start: b, Hashes: append([]byte(nil), h...)})
				}
				tb.asked++
			}
		}
		tb.items = append(tb.items, it)
		if tb.asked >= wire.MaxHeldBlocks-format.MaxExtentBlocks {
			if err := tb.flush(); err != nil {
				return err
			}
		}
	}
	return tb.flush()
}

// flush asks about the queued blocks and writes the queued extents.
func (tb *thinBuilder) flush() error {
	var answers []byte
	if tb.asked > 0 {
		var n int64
		var err error
		answers, n, err = tb.c.held(tb.ctx, tb.g.Name, tb.ci.Image, tb.ci.ID, tb.nblocks, tb.runs)
		tb.query += n
		if errors.Is(err, errNoChunkAPI) {
			answers = make([]byte, tb.asked) // nothing held
		} else if err != nil {
			return fmt.Errorf("asking the replica which blocks it holds: %w", err)
		}
	}
	var buf []byte
	for _, it := range tb.items {
		e := tb.cr.Extents()[it.i]
		if e.Kind == format.KindZero {
			if err := tb.w.WriteZero(e.Start, uint64(e.Count)); err != nil {
				return err
			}
			continue
		}
		for k := range it.ans {
			if a := it.ans[k]; a >= 0 && answers[a] != wire.HeldNone {
				it.ref[k] = true
			}
		}
		var data []byte
		for k := 0; k < int(e.Count); {
			j := k + 1
			for j < int(e.Count) && it.ref[j] == it.ref[k] {
				j++
			}
			b := e.Start + uint64(k)
			var err error
			if it.ref[k] {
				err = tb.w.WriteRef(b, it.hashes[k*32:j*32])
			} else {
				if data == nil {
					if data, _, err = tb.cr.ReadExtentHashes(it.i, buf); err != nil {
						return err
					}
					buf = data
				}
				err = tb.w.WriteBlocks(b, data[k*format.BlockSize:j*format.BlockSize])
			}
			if err != nil {
				return err
			}
			k = j
		}
	}
	tb.items, tb.runs, tb.asked = tb.items[:0], tb.runs[:0], 0
	return nil
}

// shipCut uploads the cycles of one cut (base cycles thinned) and commits
// them; a commit that reports missing chunks is retried with those blocks
// as data, and in the end with the original cycles.
func (s *Shipper) shipCut(ctx context.Context, r *run, c *client, lim *limiter, cut []tracker.CycleInfo, cr wire.CommitRequest) (wire.CommitReply, error) {
	g := r.g
	force := map[string]map[uint64]bool{} // image id → blocks to send as data
	full := map[string]bool{}             // image id → send the original
	sentFor := map[string]int64{}         // image id → bytes sent for its cycle
	thin := map[string]bool{}             // image id → a thinned copy was sent
	for attempt := 0; ; attempt++ {
		cr.Cycles = cr.Cycles[:0]
		for _, ci := range cut {
			ref := wire.CycleRef{ID: ci.ID, Gen: ci.Generation, Seq: ci.Seq}
			up := thinned{path: ci.Path}
			if ci.Base && !full[ci.ID] {
				t, err := s.thinBase(ctx, c, g, ci, force[ci.ID])
				r.addSent(t.query, 0)
				if err != nil {
					if ctx.Err() != nil {
						return wire.CommitReply{}, err
					}
					var re *RemoteError
					if errors.As(err, &re) || isNetErr(err) {
						return wire.CommitReply{}, fmt.Errorf("preparing %s cycle %d: %w", ci.Image, ci.Seq, err)
					}
					s.log.Warn("thinning a base cycle failed; sending it whole", "group", g.Name, "image", ci.Image, "err", err)
				} else {
					up = t
				}
			}
			n, err := c.upload(ctx, g.Name, ci.Image, ref, up.path, lim)
			r.addSent(n, 0)
			sentFor[ci.ID] += n + up.query
			thin[ci.ID] = thin[ci.ID] || up.thin
			if err != nil {
				return wire.CommitReply{}, fmt.Errorf("uploading %s cycle %d: %w", ci.Image, ci.Seq, err)
			}
			cr.Cycles = append(cr.Cycles, ref)
		}
		rep, err := c.commit(ctx, g.Name, cr)
		var re *RemoteError
		if err == nil || !errors.As(err, &re) || re.Code != "missing_chunks" || attempt >= 3 {
			if err != nil {
				return rep, fmt.Errorf("committing cut %s: %w", cr.GroupCut, err)
			}
			for _, ci := range cut {
				os.Remove(s.thinPath(ci))
				if thin[ci.ID] && sentFor[ci.ID] < ci.Bytes {
					r.addSent(0, ci.Bytes-sentFor[ci.ID])
				}
			}
			return rep, nil
		}
		// Some held blocks changed on the replica meanwhile: send them.
		for _, m := range re.Missing {
			for _, ci := range cut {
				if ci.ID != m.ID || ci.Generation != m.Gen || ci.Seq != m.Seq {
					continue
				}
				var n uint64
				if force[ci.ID] == nil {
					force[ci.ID] = map[uint64]bool{}
				}
				nb := (ci.Size + format.BlockSize - 1) / format.BlockSize
				for _, run := range m.Runs {
					if run[0] >= nb {
						continue
					}
					end := nb
					if run[1] < nb-run[0] {
						end = run[0] + run[1]
					}
					for b := run[0]; b < end; b++ {
						force[ci.ID][b] = true
						n++
					}
				}
				if attempt >= 2 {
					full[ci.ID] = true
				}
				s.log.Warn("the replica no longer holds blocks of a thinned cycle; sending their data", "group", g.Name, "image", ci.Image, "blocks", n, "whole", full[ci.ID])
				os.Remove(s.thinPath(ci))
				if err := c.discard(ctx, g.Name, ci.Image, wire.CycleRef{ID: ci.ID, Gen: ci.Generation, Seq: ci.Seq}); err != nil {
					return wire.CommitReply{}, fmt.Errorf("discarding the thinned upload of %s: %w", ci.Image, err)
				}
			}
		}
	}
}

// cleanThin removes thinned copies of the group's images (ids) whose cycle
// is no longer pending (shipped, or superseded).
func (s *Shipper) cleanThin(ids map[string]bool, pending [][]tracker.CycleInfo) {
	ents, err := os.ReadDir(s.thinDir())
	if err != nil {
		return
	}
	keep := map[string]bool{}
	for _, cut := range pending {
		for _, ci := range cut {
			keep[filepath.Base(s.thinPath(ci))] = true
		}
	}
	for _, e := range ents {
		id, _, _ := strings.Cut(e.Name(), "-g")
		if ids[id] && !keep[e.Name()] {
			os.Remove(filepath.Join(s.thinDir(), e.Name()))
		}
	}
}

// addSent accounts bytes sent to the replica and bytes a thinned upload saved.
func (r *run) addSent(n, saved int64) {
	r.mu.Lock()
	r.st.BytesSent += n
	r.st.DedupSaved += saved
	r.mu.Unlock()
}

func isNetErr(err error) bool {
	var ue *url.Error
	return errors.As(err, &ue)
}

// Resync requests a hash-compare resync of a group (in window, if given):
// a full base cut continuing the chain, shipped thinned, so only blocks that
// differ on the replica travel. It persists with the group's configuration.
func (s *Shipper) Resync(name, window string) error {
	if window != "" {
		if _, _, err := ParseWindow(window); err != nil {
			return err
		}
	}
	return s.Update(name, func(g *Group) {
		g.Resync = &Resync{Requested: time.Now().UTC(), Window: window}
	})
}

// resyncCut records that the requested resync's base cut is staged,
// without restarting the group's run.
func (s *Shipper) resyncCut(r *run) error {
	err := s.persist(r.g.Name, func(x *Group) bool {
		if x.Resync == nil {
			return false
		}
		x.Resync = nil
		return true
	})
	if err != nil {
		return err
	}
	s.log.Info("hash-compare resync: full base cut staged; it ships thinned", "group", r.g.Name)
	r.g.Resync = nil
	r.mu.Lock()
	r.st.Resync = ""
	r.mu.Unlock()
	return nil
}
