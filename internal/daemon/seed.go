package daemon

// Seeds: 'standin seed export' runs in the primary's daemon (which owns the
// tracker, so the seed's cut is crash-consistent and replication keeps
// running), 'standin seed import' in the replica's daemon or, when none
// runs, in the CLI. Both stream NDJSON events (SeedEvent) to the CLI.

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/standin/standin/applier"
	"github.com/standin/standin/dedup"
	"github.com/standin/standin/internal/exitcode"
	"github.com/standin/standin/shipper"
	"github.com/standin/standin/tracker"
)

// SeedExportRequest asks the primary's daemon for a seed.
type SeedExportRequest struct {
	Groups            []string `json:"groups"` // group names or globs
	All               bool     `json:"all"`
	To                []string `json:"to"` // volume directories written at once
	VolumeSize        int64    `json:"volume_size"`
	Parity            float64  `json:"parity"`
	SurviveVolumeLoss bool     `json:"survive_volume_loss"`
	Key               []byte   `json:"key,omitempty"`
	// Mode is the mode of the seed's files (0: owner only, 0600).
	Mode   uint32 `json:"mode,omitempty"`
	Prompt bool   `json:"prompt"` // the client answers "volume" events (sequential volumes)
	// SlowForTest sleeps this long per progress report (tests interrupt
	// exports with it; STANDIN_TEST_SEED_DELAY in the CLI).
	SlowForTest time.Duration `json:"slow_for_test,omitempty"`
}

// SeedImportRequest asks for a seed import on the replica.
type SeedImportRequest struct {
	Paths  []string `json:"paths"`
	Key    []byte   `json:"key,omitempty"`
	DryRun bool     `json:"dry_run"`
	// SlowForTest: see SeedExportRequest.
	SlowForTest time.Duration `json:"slow_for_test,omitempty"`
}

// SeedEvent is one line of a seed operation's event stream.
type SeedEvent struct {
	Type     string             `json:"type"` // progress, volume, message, done, error
	Session  string             `json:"session,omitempty"`
	Progress *dedup.Progress    `json:"progress,omitempty"`
	Volume   int                `json:"volume,omitempty"` // "volume": the next volume's number (1-based)
	Message  string             `json:"message,omitempty"`
	Export   *SeedExportSummary `json:"export,omitempty"`
	Import   *SeedImportSummary `json:"import,omitempty"`
	Error    string             `json:"error,omitempty"`
	Code     int                `json:"code,omitempty"` // exit code of the error
}

// SeedVolumeAnswer answers a "volume" event.
type SeedVolumeAnswer struct {
	Session string `json:"session"`
	Dir     string `json:"dir"`
	Error   string `json:"error,omitempty"`
}

// SeedExportSummary is the completion summary of an export.
type SeedExportSummary struct {
	Groups       []string      `json:"groups"`
	Images       int           `json:"images"`
	Allocated    int64         `json:"allocated_bytes"`
	Unique       int64         `json:"unique_bytes"`
	SeedBytes    int64         `json:"seed_bytes"`
	Ratio        float64       `json:"ratio"`
	Seconds      float64       `json:"seconds"`
	CutTime      time.Time     `json:"cut_time"`
	To           []string      `json:"to"`
	ResumedPacks int           `json:"resumed_packs"`
	CBWBlocks    uint64        `json:"cbw_blocks"`
	Summary      dedup.Summary `json:"detail"`
}

// SeedImportSummary is the outcome (or, for a dry run, the plan) of an import.
type SeedImportSummary struct {
	DryRun    bool                `json:"dry_run"`
	Images    []applier.SeedImage `json:"images"`
	Checks    []applier.SeedCheck `json:"checks"`
	Verify    *dedup.Report       `json:"verify,omitempty"`
	Written   int64               `json:"written_bytes"`
	Allocated int64               `json:"allocated_bytes"`
	Seconds   float64             `json:"seconds"`
	Resumed   int64               `json:"resumed_bytes"`    // image bytes an interrupted run had written already
	Points    map[string]string   `json:"points,omitempty"` // group → recovery point
}

// seedImage names a tracker seed image GROUP/IMAGE in the seed.
type seedImage struct {
	*tracker.SeedImage
	name string
}

func (s seedImage) Name() string { return s.name }

// sessions of running exports waiting for volume answers.
type seedSessions struct {
	mu sync.Mutex
	m  map[string]chan SeedVolumeAnswer
}

var sessions = &seedSessions{m: map[string]chan SeedVolumeAnswer{}}

func (s *seedSessions) open() (string, chan SeedVolumeAnswer) {
	var b [8]byte
	rand.Read(b[:])
	id := hex.EncodeToString(b[:])
	ch := make(chan SeedVolumeAnswer, 1)
	s.mu.Lock()
	s.m[id] = ch
	s.mu.Unlock()
	return id, ch
}

func (s *seedSessions) close(id string) {
	s.mu.Lock()
	delete(s.m, id)
	s.mu.Unlock()
}

func (s *seedSessions) answer(a SeedVolumeAnswer) error {
	s.mu.Lock()
	ch := s.m[a.Session]
	s.mu.Unlock()
	if ch == nil {
		return fmt.Errorf("no seed export %q is waiting for a volume", a.Session)
	}
	select {
	case ch <- a:
		return nil
	default:
		return fmt.Errorf("seed export %q already has an answer", a.Session)
	}
}

// streamer writes NDJSON events and flushes each.
type streamer struct {
	mu sync.Mutex
	w  http.ResponseWriter
	bw *bufio.Writer
}

func newStreamer(w http.ResponseWriter) *streamer {
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	return &streamer{w: w, bw: bufio.NewWriter(w)}
}

func (s *streamer) emit(e SeedEvent) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, _ := json.Marshal(e)
	s.bw.Write(append(b, '\n'))
	s.bw.Flush()
	if f, ok := s.w.(http.Flusher); ok {
		f.Flush()
	}
}

func errEvent(err error) SeedEvent {
	return SeedEvent{Type: "error", Error: err.Error(), Code: exitcode.Code(err)}
}

// throttle passes at most one progress event per interval (and the last).
func throttle(emit func(SeedEvent), every, slow time.Duration) func(dedup.Progress) {
	var last time.Time
	return func(p dedup.Progress) {
		if slow > 0 {
			time.Sleep(slow)
		}
		if now := time.Now(); now.Sub(last) >= every || (p.BytesTotal > 0 && p.BytesRead >= p.BytesTotal) {
			last = now
			emit(SeedEvent{Type: "progress", Progress: &p})
		}
	}
}

func seedControl(mux *http.ServeMux, st *tracker.Store, sh *shipper.Shipper) {
	mux.HandleFunc("POST /seed/export", func(w http.ResponseWriter, r *http.Request) {
		var req SeedExportRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			reply(w, http.StatusBadRequest, apiError{Error: "bad request: " + err.Error(), Code: "usage"})
			return
		}
		s := newStreamer(w)
		sum, err := SeedExport(r.Context(), st, sh, req, s.emit)
		if err != nil {
			s.emit(errEvent(err))
			return
		}
		s.emit(SeedEvent{Type: "done", Export: &sum})
	})
	mux.HandleFunc("POST /seed/volume", func(w http.ResponseWriter, r *http.Request) {
		var a SeedVolumeAnswer
		if err := json.NewDecoder(r.Body).Decode(&a); err != nil {
			reply(w, http.StatusBadRequest, apiError{Error: "bad request: " + err.Error(), Code: "usage"})
			return
		}
		if err := sessions.answer(a); err != nil {
			reply(w, http.StatusNotFound, apiError{Error: err.Error(), Code: "not_found"})
			return
		}
		reply(w, http.StatusOK, map[string]bool{"ok": true})
	})
}

// SeedExport takes one crash-consistent cut of the selected groups, writes
// their seed and makes it the base each relationship continues from.
func SeedExport(ctx context.Context, st *tracker.Store, sh *shipper.Shipper, req SeedExportRequest, emit func(SeedEvent)) (SeedExportSummary, error) {
	var sum SeedExportSummary
	if len(req.To) == 0 {
		return sum, exitcode.With(exitcode.Usage, errors.New("seed export: no destination (--to DIR)"))
	}
	groups, err := selectSeedGroups(sh.Groups(), req.Groups, req.All)
	if err != nil {
		return sum, err
	}
	var names []string
	groupOf := map[string]string{}
	for _, g := range groups {
		sum.Groups = append(sum.Groups, g.Name)
		for _, im := range g.Images {
			names = append(names, im)
			groupOf[im] = g.Name
		}
	}
	start := time.Now()
	sd, err := st.SeedCut(names)
	// An export whose client just went away may still be stopping: give it
	// a moment before calling the images busy.
	for wait := 0; errors.Is(err, tracker.ErrSeeding) && wait < 100; wait++ {
		select {
		case <-ctx.Done():
			return sum, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		sd, err = st.SeedCut(names)
	}
	if err != nil {
		if errors.Is(err, tracker.ErrSeeding) {
			return sum, exitcode.With(exitcode.Busy, fmt.Errorf("%w: another seed export of these images is running", err))
		}
		return sum, err
	}
	committed := false
	defer func() {
		if !committed {
			sd.Abort()
		}
	}()
	emit(SeedEvent{Type: "message", Message: fmt.Sprintf("cut %d image(s) of %d group(s) at %s; replication of other groups goes on, changes after the cut are queued", len(sd.Images), len(groups), sd.Time.Format(time.RFC3339))})
	srcs := make([]dedup.ImageSource, len(sd.Images))
	for i, si := range sd.Images {
		srcs[i] = seedImage{SeedImage: si, name: groupOf[si.Name()] + "/" + si.Name()}
	}
	o := dedup.ExportOptions{
		Parity: req.Parity, Key: req.Key, VolumeSize: req.VolumeSize, SurviveVolumeLoss: req.SurviveVolumeLoss, Mode: fs.FileMode(req.Mode),
		Progress: throttle(emit, time.Second, req.SlowForTest),
	}
	if req.Prompt {
		// Sequential volumes: the journal and parity accumulators stay on
		// the primary, so the export resumes after any volume.
		o.ScratchDir = filepath.Join(st.Dir(), "seed-scratch")
		id, ch := sessions.open()
		defer sessions.close(id)
		o.NextVolume = func(n int) (string, error) {
			emit(SeedEvent{Type: "volume", Session: id, Volume: n})
			select {
			case a := <-ch:
				if a.Error != "" {
					return "", errors.New(a.Error)
				}
				return a.Dir, nil
			case <-ctx.Done():
				return "", ctx.Err()
			}
		}
	}
	ds, err := dedup.Export(ctx, req.To, srcs, o)
	if err != nil {
		return sum, fmt.Errorf("seed export to %v: %w (run the same command again to resume)", req.To, err)
	}
	if len(ds.Roots) != len(srcs) {
		return sum, fmt.Errorf("seed export to %v: %d manifest roots for %d images", req.To, len(ds.Roots), len(srcs))
	}
	roots := map[string]string{} // image name on the mount → manifest root
	for i, si := range sd.Images {
		roots[si.Name()] = ds.Roots[i]
	}
	for _, si := range sd.Images {
		sum.CBWBlocks += si.CBWBlocks()
	}
	if err := sd.Commit(); err != nil {
		return sum, fmt.Errorf("seed written, but recording it as the replication base failed: %w", err)
	}
	committed = true
	for _, g := range groups {
		ss := shipper.SeedState{GroupCut: sd.GroupCut.String(), Time: sd.Time, To: req.To}
		for _, si := range sd.Images {
			if groupOf[si.Name()] == g.Name {
				ss.Images = append(ss.Images, shipper.SeedImage{Name: si.Name(), ID: applier.SeedImageID(si.ID()), Generation: si.Generation(), Seq: si.Seq(),
					Root: roots[si.Name()]})
			}
		}
		if err := sh.SeedExported(g.Name, ss); err != nil {
			return sum, fmt.Errorf("seed written, but recording it for group %s failed: %w", g.Name, err)
		}
	}
	sum.Images, sum.Allocated, sum.Unique, sum.SeedBytes = ds.Images, ds.Allocated, ds.Unique, ds.SeedBytes
	sum.Ratio, sum.ResumedPacks, sum.Summary = ds.Ratio, ds.ResumedPacks, ds
	sum.Seconds, sum.CutTime, sum.To = time.Since(start).Seconds(), sd.Time, req.To
	return sum, nil
}

func selectSeedGroups(all []shipper.Group, sel []string, every bool) ([]shipper.Group, error) {
	if every {
		if len(all) == 0 {
			return nil, exitcode.With(exitcode.NotFound, errors.New("no replication groups are configured: 'standin replicate enable --group VM --images ... --replica HOST:PORT --initial seed' first"))
		}
		return all, nil
	}
	if len(sel) == 0 {
		return nil, exitcode.With(exitcode.Usage, errors.New("name the groups to seed (--group VM[,VM...]) or --all"))
	}
	var out []shipper.Group
	seen := map[string]bool{}
	for _, pat := range sel {
		n := 0
		for _, g := range all {
			if ok, _ := path.Match(pat, g.Name); ok {
				n++
				if !seen[g.Name] {
					seen[g.Name] = true
					out = append(out, g)
				}
			}
		}
		if n == 0 {
			return nil, exitcode.With(exitcode.NotFound, fmt.Errorf("no replication group matches %q: a seed starts a relationship, so enable it first ('standin replicate enable --group %s --images ... --replica HOST:PORT --initial seed')", pat, pat))
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// SeedImport verifies, repairs and imports a seed into the replica store
// (or, with DryRun, reports what it would do).
func SeedImport(ctx context.Context, rep *applier.Replica, req SeedImportRequest, emit func(SeedEvent)) (SeedImportSummary, error) {
	sum := SeedImportSummary{DryRun: req.DryRun, Points: map[string]string{}}
	start := time.Now()
	ms, err := dedup.ReadManifests(req.Paths, req.Key)
	if err != nil {
		return sum, fmt.Errorf("reading the seed in %v: %w", req.Paths, err)
	}
	byName := map[string]applier.SeedImage{}
	for _, m := range ms {
		si, err := seedImageOf(m)
		if err != nil {
			return sum, exitcode.With(exitcode.Corrupt, err)
		}
		sum.Images = append(sum.Images, si)
		byName[m.Name] = si
		sum.Allocated += m.Allocated
	}
	sum.Checks = rep.CheckSeed(sum.Images)
	action := map[string]string{}
	var refused []string
	for _, c := range sum.Checks {
		action[c.Group] = c.Action
		if c.Action == "refuse" {
			refused = append(refused, fmt.Sprintf("group %s: %s", c.Group, c.Reason))
		}
		if c.Warning != "" && c.Action == "import" {
			emit(SeedEvent{Type: "message", Message: fmt.Sprintf("group %s: warning: %s", c.Group, c.Warning)})
		}
	}
	if req.DryRun {
		vr, err := dedup.Verify(ctx, req.Paths, req.Key)
		if err != nil {
			return sum, err
		}
		sum.Verify = &vr
		sum.Seconds = time.Since(start).Seconds()
		return sum, nil
	}
	if len(refused) > 0 {
		return sum, exitcode.With(exitcode.Refused, fmt.Errorf("%w; nothing was imported:\n  %s", applier.ErrWrongSeed, joinLines(refused)))
	}
	sinks := map[string]*applier.SeedSink{}
	defer func() {
		for _, s := range sinks {
			s.Close()
		}
	}()
	o := dedup.ImportOptions{
		Progress: throttle(emit, time.Second, req.SlowForTest),
		// The manifests read now must be exactly the ones checked above
		// (the volumes could have been swapped meanwhile): an image missing
		// now would leave its staged sink unwritten, an extra or changed
		// one was never checked.
		Accept: func(ms []dedup.Manifest) error {
			changed := func(f string, a ...any) error {
				return exitcode.With(exitcode.Refused, fmt.Errorf("%w: the seed changed since it was checked (%s); nothing was imported", applier.ErrWrongSeed, fmt.Sprintf(f, a...)))
			}
			seen := map[string]bool{}
			for _, m := range ms {
				si, err := seedImageOf(m)
				want, ok := byName[m.Name]
				switch {
				case err != nil || !ok:
					return changed("image %s was not in it", m.Name)
				case !sameSeedImage(si, want):
					return changed("image %s: id %s generation %d cut %d root %.16s…, checked id %s generation %d cut %d root %.16s…",
						m.Name, si.ID, si.Generation, si.Seq, si.Root, want.ID, want.Generation, want.Seq, want.Root)
				}
				seen[m.Name] = true
			}
			for name := range byName {
				if !seen[name] {
					return changed("image %s is missing now", name)
				}
			}
			return nil
		},
		ResumeAt: func(m dedup.Manifest) uint64 {
			if s := sinks[m.Name]; s != nil {
				n := s.ResumeAt()
				sum.Resumed += min(int64(n)*4096, m.Size)
				return n
			}
			return 0
		},
		Checkpoint: func(m dedup.Manifest, next uint64) error {
			if s := sinks[m.Name]; s != nil {
				return s.Checkpoint(next)
			}
			return nil
		},
	}
	if seedImportChecked != nil {
		seedImportChecked()
	}
	// Open every sink first, so ResumeAt sees the staging of an earlier run.
	for name, si := range byName {
		if action[si.Group] != "import" {
			continue
		}
		s, err := rep.StageSeedImage(si)
		if err != nil {
			return sum, err
		}
		sinks[name] = s
	}
	ds, err := dedup.Import(ctx, req.Paths, req.Key, func(m dedup.Manifest) (dedup.ImageSink, error) {
		if s := sinks[m.Name]; s != nil {
			return s, nil
		}
		return discardSink{}, nil
	}, o)
	if err != nil {
		return sum, fmt.Errorf("importing the seed: %w (nothing was registered; run the same command again to resume)", err)
	}
	sum.Written = ds.Allocated
	groups := map[string][]applier.SeedImage{}
	for _, si := range sum.Images {
		if action[si.Group] == "import" {
			groups[si.Group] = append(groups[si.Group], si)
		}
	}
	names := make([]string, 0, len(groups))
	for g := range groups {
		names = append(names, g)
	}
	sort.Strings(names)
	for _, g := range names {
		for _, s := range sinks {
			s.Close()
		}
		res, err := rep.CommitSeed(g, groups[g], applier.Retention{})
		if err != nil {
			return sum, fmt.Errorf("registering group %s: %w", g, err)
		}
		sum.Points[g] = res.Point
		for _, im := range groups[g] {
			// The chunk index lets later network initial replications of
			// clones send only what the replica lacks; losing it costs only bytes.
			if err := rep.IndexImage(g, im.ID); err != nil {
				emit(SeedEvent{Type: "message", Message: fmt.Sprintf("group %s: indexing the chunks of %s failed (dedup of later network replications only): %v", g, im.Name, err)})
			}
		}
		emit(SeedEvent{Type: "message", Message: fmt.Sprintf("group %s: %d image(s) registered at the seed's cut (point %s); the primary's next cycle continues from it", g, len(groups[g]), res.Point)})
	}
	sinks = nil
	sum.Seconds = time.Since(start).Seconds()
	return sum, nil
}

// seedImportChecked, when set (tests), runs between the seed's check and
// its import.
var seedImportChecked func()

// seedImageOf is the replica's view of one image of a seed.
func seedImageOf(m dedup.Manifest) (applier.SeedImage, error) {
	g, n, err := applier.SplitSeedName(m.Name)
	if err != nil {
		return applier.SeedImage{}, err
	}
	return applier.SeedImage{Group: g, Name: n, ID: applier.SeedImageID(m.ID), Generation: m.Generation, Seq: m.Seq,
		Size: m.Size, Allocated: m.Allocated, CutTime: m.CutTime, Root: hex.EncodeToString(m.Root[:])}, nil
}

// sameSeedImage: a and b describe the same image content at the same cut.
func sameSeedImage(a, b applier.SeedImage) bool {
	return a.Group == b.Group && a.Name == b.Name && a.ID == b.ID && a.Generation == b.Generation && a.Seq == b.Seq &&
		a.Size == b.Size && a.Allocated == b.Allocated && a.CutTime.Equal(b.CutTime) && a.Root == b.Root
}

type discardSink struct{}

func (discardSink) WriteAt(p []byte, off int64) (int, error) { return len(p), nil }
func (discardSink) Truncate(int64) error                     { return nil }
func (discardSink) Sync() error                              { return nil }

func joinLines(s []string) string { return strings.Join(s, "\n  ") }
