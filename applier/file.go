package applier

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/google/uuid"
	"golang.org/x/sys/unix"

	"github.com/standin/standin/internal/format"
	"github.com/standin/standin/internal/fsutil"
)

// Errors for refused (well-formed but unacceptable) input.
var (
	ErrForeign = errors.New("cycle belongs to another image or generation")
	ErrGap     = errors.New("cycle sequence has a gap")
	ErrReplay  = errors.New("cycle is older than what the target already holds")
	ErrNoBase  = errors.New("target has no standin state and the cycle is not a base cycle")
	// ErrRefs: a cycle with ref extents (a thinned cycle) can only be applied
	// by a replica store, which resolves the refs from the blocks it holds.
	ErrRefs = errors.New("cycle has ref extents (blocks sent as hashes only); only a replica store can apply it")
)

// State is what a target image holds, kept in TARGET.standin beside it.
type State struct {
	ID         string `json:"id"`
	Generation uint64 `json:"generation"`
	Seq        uint64 `json:"seq"`
	// Applying is true while cycle Seq is being applied; the target may then
	// be a mix of Seq-1 and Seq, and only cycle Seq may be (re-)applied.
	Applying bool   `json:"applying"`
	Name     string `json:"name,omitempty"`
}

// StatePath returns the sidecar state file of target.
func StatePath(target string) string { return target + ".standin" }

// ReadState reads the target's state; ok is false when there is none.
func ReadState(target string) (st State, ok bool, err error) {
	err = fsutil.ReadJSON(StatePath(target), &st)
	if errors.Is(err, fs.ErrNotExist) {
		return st, false, nil
	}
	return st, err == nil, err
}

// Result says what happened to one cycle.
type Result struct {
	Path    string `json:"path"`
	Seq     uint64 `json:"seq"`
	Skipped bool   `json:"skipped"` // already applied (idempotent)
	Blocks  uint64 `json:"data_blocks"`
	Zeroes  uint64 `json:"zero_blocks"`
	Refs    uint64 `json:"ref_blocks,omitempty"` // ref blocks (kept in place or copied from blocks the replica held)
}

// ApplyFiles verifies every cycle completely and checks that they form an
// unbroken sequence on top of the target's state before touching the target,
// then applies them in order. Re-applying the last applied cycle is a no-op;
// re-applying a cycle interrupted mid-apply completes it.
func ApplyFiles(target string, paths []string) ([]Result, error) {
	cs, err := openCycles(paths, true)
	defer closeCycles(cs)
	if err != nil {
		return nil, err
	}
	state, have, err := ReadState(target)
	if err != nil {
		return nil, fmt.Errorf("target state %s: %w (the file is damaged; restore it or re-seed the target)", StatePath(target), err)
	}
	if !have {
		if _, err := os.Stat(target); err == nil {
			// An existing file without state is only acceptable for a base
			// cycle, which overwrites it completely.
			if len(cs) > 0 && !cs[0].r.Header().Base() {
				return nil, fmt.Errorf("%s: %w", target, ErrNoBase)
			}
		}
	}
	for _, c := range cs {
		if n := c.r.Footer().RefBlocks; n > 0 {
			return nil, fmt.Errorf("%s: %w (%d ref blocks)", c.path, ErrRefs, n)
		}
	}
	// Plan: decide per cycle apply/skip, refusing anything out of order.
	plan := make([]bool, len(cs))
	sim, simHave := state, have
	for i, c := range cs {
		h := c.r.Header()
		id := uuid.UUID(h.ImageID).String()
		switch {
		case !simHave:
			if !h.Base() {
				return nil, fmt.Errorf("%s (seq %d): %w; apply the image's base cycle (seq 0) first", c.path, h.Seq, ErrNoBase)
			}
			plan[i] = true
		case id != sim.ID:
			return nil, fmt.Errorf("%s: %w: cycle is for image %s (%q), target holds image %s (%q)", c.path, ErrForeign, id, h.Name, sim.ID, sim.Name)
		case h.Generation != sim.Generation:
			if h.Base() && h.Generation > sim.Generation {
				plan[i] = true // a new generation starts with a full base
				break
			}
			return nil, fmt.Errorf("%s: %w: cycle generation %d, target holds generation %d", c.path, ErrForeign, h.Generation, sim.Generation)
		case h.Seq == sim.Seq && !sim.Applying:
			plan[i] = false // idempotent re-apply
		case h.Seq == sim.Seq && sim.Applying:
			plan[i] = true
		case h.Seq < sim.Seq:
			return nil, fmt.Errorf("%s: %w: cycle %d, target is at cycle %d", c.path, ErrReplay, h.Seq, sim.Seq)
		case sim.Applying:
			return nil, fmt.Errorf("%s: %w: cycle %d, target is at cycle %d and its apply was interrupted (re-apply cycle %d first)", c.path, ErrGap, h.Seq, sim.Seq, sim.Seq)
		case h.Base():
			plan[i] = true // a later base of the same generation needs no parent
		case h.Parent != sim.Seq:
			// A delta applies on its parent (seq-1, or an earlier cycle for
			// a merged delta of extended replication).
			return nil, fmt.Errorf("%s: %w: cycle %d applies on cycle %d, target is at cycle %d (missing %d..%d)", c.path, ErrGap, h.Seq, h.Parent, sim.Seq, sim.Seq+1, h.Parent)
		default:
			plan[i] = true
		}
		sim = State{ID: id, Generation: h.Generation, Seq: h.Seq, Name: h.Name}
		simHave = true
	}
	// A size the target's filesystem cannot hold would fail after the state
	// says "applying": refuse it before.
	dir := filepath.Dir(target)
	if err := sizeCacheOf(dir).check(dir, largestImage(cs, func(i int) bool { return plan[i] })); err != nil {
		return nil, fmt.Errorf("%s: %w", target, err)
	}
	var results []Result
	for i, c := range cs {
		h, ft := c.r.Header(), c.r.Footer()
		res := Result{Path: c.path, Seq: h.Seq, Skipped: !plan[i], Blocks: ft.DataBlocks, Zeroes: ft.ZeroBlocks}
		if plan[i] {
			if err := applyOne(target, c.r); err != nil {
				return results, fmt.Errorf("applying %s to %s: %w", c.path, target, err)
			}
		}
		results = append(results, res)
	}
	return results, nil
}

// applyOne applies one verified cycle. The state file says "applying" while
// the target is being changed, so an interrupted apply can only be completed
// by the same cycle.
func applyOne(target string, r *format.Reader) error {
	h := r.Header()
	st := State{ID: uuid.UUID(h.ImageID).String(), Generation: h.Generation, Seq: h.Seq, Applying: true, Name: h.Name}
	if err := fsutil.WriteJSON(StatePath(target), st); err != nil {
		return err
	}
	flags := os.O_RDWR | os.O_CREATE
	f, err := os.OpenFile(target, flags, 0o600)
	if err != nil {
		return err
	}
	defer f.Close()
	if h.Base() {
		if err := f.Truncate(0); err != nil {
			return err
		}
	}
	if err := ApplyExtents(f, r); err != nil {
		return err
	}
	if err := unix.Fdatasync(int(f.Fd())); err != nil {
		return err
	}
	st.Applying = false
	return fsutil.WriteJSON(StatePath(target), st)
}

// ApplyExtents writes a verified cycle's extents into f and sets its size:
// data extents are written, zero extents are punched (so sparse images stay
// sparse), and the file ends at the cycle's image size.
func ApplyExtents(f *os.File, r *format.Reader) error {
	h := r.Header()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	// Grow first so punches inside the new size keep it; shrink last.
	if int64(h.ImageSize) > st.Size() {
		if err := f.Truncate(int64(h.ImageSize)); err != nil {
			return err
		}
	}
	var buf []byte
	for i, e := range r.Extents() {
		off := int64(e.Start) * format.BlockSize
		n := int64(e.Count) * format.BlockSize
		switch e.Kind {
		case format.KindData:
			buf, err = r.ReadExtent(i, buf)
			if err != nil {
				return err
			}
			if _, err := f.WriteAt(buf, off); err != nil {
				return err
			}
		case format.KindZero:
			if err := punch(f, off, n); err != nil {
				return err
			}
		}
	}
	return f.Truncate(int64(h.ImageSize))
}

var zeroBlock = make([]byte, 1<<20)

func punch(f *os.File, off, n int64) error {
	err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
	if err == nil || !(errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS)) {
		return err
	}
	for n > 0 { // no hole support: write zeros
		c := min(n, int64(len(zeroBlock)))
		if _, err := f.WriteAt(zeroBlock[:c], off); err != nil {
			return err
		}
		off, n = off+c, n-c
	}
	return nil
}
