package applier

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/google/uuid"

	"github.com/standin/standin/internal/format"
	"github.com/standin/standin/internal/fsutil"
	"github.com/standin/standin/internal/pki"
	"github.com/standin/standin/internal/wire"
)

// Server is the replica's HTTPS API: pairing, resumable cycle uploads into a
// durable inbox, and commits that apply a cut as one recovery point.
type Server struct {
	rep   *Replica
	auth  *pki.Authority
	inbox string
	log   *slog.Logger

	mu     sync.Mutex
	locks  map[string]*uploadLock // per upload file, removed when unused
	health map[string]*groupHealth
	quota  *quotas // per-primary quotas (quota.go)

	// MaxCycleBytes bounds one upload (default 4 TiB).
	MaxCycleBytes int64
	// Metrics, if set, is told about bytes received and applies.
	OnReceive func(group string, n int64)
	OnApply   func(group string, res ApplyResult, err error)
	// OnFailover, if set, serves failover requests (server_failover.go).
	OnFailover FailoverFunc
	// BodyTimeout: a request body must bring 64 KiB within each such window
	// (0 = no bound); WriteTimeout bounds writing one response (0 = none).
	// See server_limits.go.
	BodyTimeout, WriteTimeout time.Duration
}

// NewServer serves rep with auth; uploads are kept in inbox until applied.
func NewServer(rep *Replica, auth *pki.Authority, inbox string, log *slog.Logger) (*Server, error) {
	if err := os.MkdirAll(inbox, 0o700); err != nil {
		return nil, err
	}
	return &Server{rep: rep, auth: auth, inbox: inbox, log: log, locks: map[string]*uploadLock{}, health: map[string]*groupHealth{}, MaxCycleBytes: 4 << 40,
		quota: newQuotas(rep, inbox)}, nil
}

// Handler returns the HTTP handler (serve it with auth.ServerTLS()).
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+wire.Prefix+"/pair", s.pair)
	mux.HandleFunc("GET "+wire.Prefix+"/groups/{group}/uploads/{id}/{gen}/{seq}", s.authed(s.replicating(s.images(uploadClaims(true), s.uploadState))))
	mux.HandleFunc("PUT "+wire.Prefix+"/groups/{group}/uploads/{id}/{gen}/{seq}", s.authed(s.replicating(s.images(uploadClaims(false), s.upload))))
	mux.HandleFunc("POST "+wire.Prefix+"/groups/{group}/commit", s.authed(s.replicating(s.images(commitClaims, s.commit))))
	mux.HandleFunc("GET "+wire.Prefix+"/groups/{group}", s.authed(s.groupState))
	mux.HandleFunc("POST "+wire.Prefix+"/groups/{group}/seed", s.authed(s.replicating(s.images(seedClaims, s.seedExpect))))
	mux.HandleFunc("DELETE "+wire.Prefix+"/groups/{group}/uploads/{id}/{gen}/{seq}", s.authed(s.replicating(s.images(uploadClaims(false), s.discard))))
	mux.HandleFunc("POST "+wire.Prefix+"/groups/{group}/images/{id}/held", s.authed(s.replicating(s.images(queryClaims, s.held))))
	mux.HandleFunc("GET "+wire.Prefix+"/groups/{group}/images/{id}/regions", s.authed(s.replicating(s.images(queryClaims, s.regions))))
	mux.HandleFunc("POST "+wire.Prefix+"/groups/{group}/failover", s.authed(s.images(failoverClaims, s.failover)))
	return s.limited(mux)
}

type httpErr struct {
	status int
	code   string
	err    error
}

func (e *httpErr) Error() string { return e.err.Error() }

func fail(status int, code string, f string, a ...any) *httpErr {
	return &httpErr{status, code, fmt.Errorf(f, a...)}
}

func (s *Server) reply(w http.ResponseWriter, r *http.Request, v any, err error) {
	w.Header().Set("Content-Type", "application/json")
	s.writeDeadline(w)
	if err != nil {
		he := classify(err)
		s.log.Warn("request refused", "method", r.Method, "path", r.URL.Path, "remote", r.RemoteAddr, "status", he.status, "err", err)
		if closeAfter(he.status) {
			w.Header().Set("Connection", "close")
		}
		w.WriteHeader(he.status)
		msg := he.Error() // classify's wording (a full store)
		if errors.As(err, new(*httpErr)) {
			msg = err.Error() // with the context around the refusal
		}
		we := wire.Error{Error: msg, Code: he.code}
		var me *MissingChunksError
		if errors.As(err, &me) {
			we.Missing = me.Missing
		}
		json.NewEncoder(w).Encode(we)
		return
	}
	json.NewEncoder(w).Encode(v)
}

func classify(err error) *httpErr {
	var he *httpErr
	switch {
	case errors.As(err, &he):
		return he
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		return fail(http.StatusInsufficientStorage, "store_full", "replica store full: %v (the replica admin must free space on the replica store or lower the retention; the primary keeps its cycles and retries)", err)
	case errors.Is(err, pki.ErrUnpaired):
		return &httpErr{http.StatusUnauthorized, pki.Code(err), err}
	case pki.Code(err) == "bad_request", pki.Code(err) == "bad_name":
		return &httpErr{http.StatusBadRequest, pki.Code(err), err}
	case pki.Code(err) != "" && pki.Code(err) != "failure":
		return &httpErr{http.StatusForbidden, pki.Code(err), err}
	case errors.Is(err, ErrPending):
		return &httpErr{http.StatusConflict, "pending", err}
	case errors.Is(err, format.ErrCorrupt), errors.Is(err, format.ErrNotCycle), errors.Is(err, format.ErrVersion):
		return &httpErr{http.StatusUnprocessableEntity, "corrupt", err}
	case errors.Is(err, ErrQuota):
		return &httpErr{http.StatusInsufficientStorage, "quota", err}
	case errors.Is(err, ErrUnholdable):
		return &httpErr{http.StatusUnprocessableEntity, "refused", err}
	case errors.Is(err, ErrMissingChunks):
		return &httpErr{http.StatusConflict, "missing_chunks", err}
	case errors.Is(err, ErrFailedOver):
		return &httpErr{http.StatusConflict, "failed_over", err}
	case errors.Is(err, ErrForeign), errors.Is(err, ErrGap), errors.Is(err, ErrReplay), errors.Is(err, ErrNoBase), errors.Is(err, ErrBadName):
		return &httpErr{http.StatusConflict, "refused", err}
	}
	return &httpErr{http.StatusInternalServerError, "failure", err}
}

func (s *Server) pair(w http.ResponseWriter, r *http.Request) {
	var req wire.PairRequest
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<16)).Decode(&req); err != nil {
		s.reply(w, r, nil, fail(http.StatusBadRequest, "bad_request", "pairing request: %v", err))
		return
	}
	cert, ca, p, err := s.auth.Join(req.Secret, req.CSR, req.Name)
	if err != nil {
		s.reply(w, r, nil, err)
		return
	}
	s.log.Info("primary paired", "name", p.Name, "id", p.ID, "pattern", p.Pattern, "remote", r.RemoteAddr)
	s.reply(w, r, wire.PairReply{Cert: cert, CA: ca, PrimaryID: p.ID}, nil)
}

type authedFunc func(w http.ResponseWriter, r *http.Request, p pki.Primary)

// replicating refuses replication requests for a group that failed over to
// this host (409, code "failed_over"; see Replica.Promote).
func (s *Server) replicating(h authedFunc) authedFunc {
	return func(w http.ResponseWriter, r *http.Request, p pki.Primary) {
		group := r.PathValue("group")
		if st, ok, err := s.rep.Failover(group); err != nil {
			s.reply(w, r, nil, err)
			return
		} else if ok {
			s.reply(w, r, nil, &FailedOverError{Group: group, State: st})
			return
		}
		h(w, r, p)
	}
}

// authed admits only paired, non-revoked primaries (mutual TLS) and checks
// the group name, and that the group is within the primary's allow-list,
// before anything touches the disk (see server_authz.go).
func (s *Server) authed(h authedFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.TLS == nil {
			s.reply(w, r, nil, fail(http.StatusUnauthorized, "unpaired", "TLS required"))
			return
		}
		p, err := s.auth.Authorize(r.TLS)
		if err != nil {
			s.reply(w, r, nil, err)
			return
		}
		if g := r.PathValue("group"); g != "" && !validName(g) {
			s.reply(w, r, nil, fmt.Errorf("group %q: %w", g, ErrBadName))
			return
		} else if g != "" {
			if err := checkGroupAllowed(p, g); err != nil {
				s.reply(w, r, nil, err)
				return
			}
		}
		h(w, r, p)
	}
}

var uploadRE = regexp.MustCompile(`^[0-9]+$`)

// uploadFile returns the inbox path of an upload after validating every
// component that came from the wire.
func (s *Server) uploadFile(r *http.Request) (group, path string, ref wire.CycleRef, err error) {
	group = r.PathValue("group")
	id, err := uuid.Parse(r.PathValue("id"))
	if err != nil || id.String() != r.PathValue("id") {
		return "", "", ref, fmt.Errorf("image id %q: %w", r.PathValue("id"), ErrBadName)
	}
	gs, ss := r.PathValue("gen"), r.PathValue("seq")
	if !uploadRE.MatchString(gs) || !uploadRE.MatchString(ss) {
		return "", "", ref, fmt.Errorf("generation/seq %q/%q: %w", gs, ss, ErrBadName)
	}
	gen, err1 := strconv.ParseUint(gs, 10, 64)
	seq, err2 := strconv.ParseUint(ss, 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return "", "", ref, fmt.Errorf("%v: %w", err, ErrBadName)
	}
	ref = wire.CycleRef{ID: id.String(), Gen: gen, Seq: seq}
	path = filepath.Join(s.inbox, group, fmt.Sprintf("%s-g%d-s%d.cyc", ref.ID, gen, seq))
	return group, path, ref, nil
}

// uploadLock serialises the requests on one upload file; refs counts the
// requests holding or waiting for it, and the entry is removed at zero so
// the map holds only uploads in progress.
type uploadLock struct {
	mu   sync.Mutex
	refs int
}

func (s *Server) lock(path string) func() {
	s.mu.Lock()
	l := s.locks[path]
	if l == nil {
		l = &uploadLock{}
		s.locks[path] = l
	}
	l.refs++
	s.mu.Unlock()
	l.mu.Lock()
	return func() {
		l.mu.Unlock()
		s.mu.Lock()
		if l.refs--; l.refs == 0 {
			delete(s.locks, path)
		}
		s.mu.Unlock()
	}
}

func (s *Server) state(group, path string, ref wire.CycleRef) (wire.UploadState, error) {
	if st, ok, err := s.rep.ImageState(group, ref.ID); err != nil {
		return wire.UploadState{}, err
	} else if ok && st.Generation == ref.Gen && st.Seq >= ref.Seq && !st.Applying {
		return wire.UploadState{Applied: true, Complete: true}, nil
	}
	if f, err := os.Open(path); err == nil {
		defer f.Close()
		fi, err := f.Stat()
		if err != nil {
			return wire.UploadState{}, err
		}
		st := wire.UploadState{Offset: fi.Size(), Complete: true}
		if _, ft, err := format.ReadInfo(f, fi.Size()); err == nil {
			st.FileHash = hex.EncodeToString(ft.FileHash[:])
		}
		return st, nil
	}
	if fi, err := os.Stat(path + ".part"); err == nil {
		return wire.UploadState{Offset: fi.Size(), FileHash: partHash(path)}, nil
	}
	return wire.UploadState{}, nil
}

func (s *Server) uploadState(w http.ResponseWriter, r *http.Request, p pki.Primary) {
	group, path, ref, err := s.uploadFile(r)
	if err != nil {
		s.reply(w, r, nil, err)
		return
	}
	defer s.lock(path)()
	st, err := s.state(group, path, ref)
	s.reply(w, r, st, err)
}

// upload appends the body at offset to the upload's .part file, fsyncing as
// it goes so the durable offset only grows; when the file is complete it is
// verified (every hash, identity against the URL) and renamed into the inbox.
func (s *Server) upload(w http.ResponseWriter, r *http.Request, p pki.Primary) {
	group, path, ref, err := s.uploadFile(r)
	if err != nil {
		s.reply(w, r, nil, err)
		return
	}
	name := r.URL.Query().Get("name") // authorized by s.images
	off, err1 := strconv.ParseInt(r.URL.Query().Get("offset"), 10, 64)
	total, err2 := strconv.ParseInt(r.URL.Query().Get("total"), 10, 64)
	if err := errors.Join(err1, err2); err != nil || off < 0 || total <= 0 || off > total {
		s.reply(w, r, nil, fail(http.StatusBadRequest, "bad_request", "offset %q / total %q out of range", r.URL.Query().Get("offset"), r.URL.Query().Get("total")))
		return
	}
	if err := s.checkBodySize(r, off, total); err != nil {
		s.reply(w, r, nil, err)
		return
	}
	// hash names the variant (thinned or full cycle share id/gen/seq).
	hash := r.URL.Query().Get("hash")
	if !validFileHash(hash) {
		s.reply(w, r, nil, fail(http.StatusBadRequest, "bad_request", "hash %q: want 64 hex digits", hash))
		return
	}
	defer s.lock(path)()
	st, err := s.state(group, path, ref)
	if err == nil && hash != "" && st.FileHash != "" && st.FileHash != hash && !st.Applied && (st.Complete || off > 0) {
		s.reply(w, r, nil, fail(http.StatusConflict, "variant", "the replica holds another variant of cycle %s gen %d seq %d (discard it first)", ref.ID, ref.Gen, ref.Seq))
		return
	}
	if err != nil || st.Complete {
		s.reply(w, r, st, err)
		return
	}
	if st.Offset != off {
		s.writeDeadline(w)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusConflict)
		json.NewEncoder(w).Encode(wire.Error{Error: fmt.Sprintf("durable offset is %d, not %d", st.Offset, off), Code: "conflict"})
		return
	}
	// Quota before anything of the upload reaches the disk.
	release, err := s.admitUpload(group, p, path, off, total)
	s.noteQuota(group, err)
	if err != nil {
		s.reply(w, r, nil, err)
		return
	}
	defer release()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		s.reply(w, r, nil, err)
		return
	}
	if off == 0 {
		// The name claimed for the upload, recorded before its first byte:
		// a partial upload is then as much the claimant's as a complete
		// one (uploadClaims), so nobody else appends to, reads or discards
		// it.
		err := fsutil.WriteFileAtomic(path+".part.name", []byte(name), 0o600)
		if err != nil {
			s.reply(w, r, nil, err)
			return
		}
		if hash != "" {
			err = fsutil.WriteFileAtomic(path+".part.hash", []byte(hash), 0o600)
		} else if err = os.Remove(path + ".part.hash"); errors.Is(err, os.ErrNotExist) {
			err = nil
		}
		if err != nil {
			s.reply(w, r, nil, err)
			return
		}
	}
	f, err := os.OpenFile(path+".part", os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		s.reply(w, r, nil, err)
		return
	}
	n, copyErr := s.appendDurably(f, off, io.LimitReader(r.Body, total-off))
	if s.OnReceive != nil {
		s.OnReceive(group, n)
	}
	closeErr := f.Close()
	if copyErr != nil || closeErr != nil {
		// What reached the disk is fsynced; the primary resumes from there.
		// A full store is 507 (classify); anything else broke the body off.
		err := fmt.Errorf("upload interrupted at byte %d: %w", off+n, errors.Join(copyErr, closeErr))
		if classify(err).status == http.StatusInternalServerError {
			err = fail(http.StatusBadRequest, "bad_request", "%v", err)
		}
		s.reply(w, r, nil, err)
		return
	}
	if off+n < total {
		s.reply(w, r, wire.UploadState{Offset: off + n}, nil)
		return
	}
	if err := s.finishUpload(group, path, name, ref, p); err != nil {
		s.reply(w, r, nil, err)
		return
	}
	s.reply(w, r, wire.UploadState{Offset: total, Complete: true}, nil)
}

// appendDurably copies src into f at off, fsyncing every 8 MiB and at the
// end, and truncates to what was written on error.
func (s *Server) appendDurably(f *os.File, off int64, src io.Reader) (int64, error) {
	if err := f.Truncate(off); err != nil {
		return 0, err
	}
	buf := make([]byte, 1<<20)
	var n, unsynced int64
	for {
		k, rerr := src.Read(buf)
		if k > 0 {
			if _, err := f.WriteAt(buf[:k], off+n); err != nil {
				return n, err
			}
			n += int64(k)
			unsynced += int64(k)
			if unsynced >= 8<<20 {
				if err := f.Sync(); err != nil {
					return n, err
				}
				unsynced = 0
			}
		}
		if rerr == io.EOF {
			return n, f.Sync()
		}
		if rerr != nil {
			f.Sync()
			return n, rerr
		}
	}
}

func (s *Server) finishUpload(group, path, name string, ref wire.CycleRef, p pki.Primary) error {
	part := path + ".part"
	bad := func(err error) error {
		os.Remove(part) // unverifiable: the primary sends it again from byte 0
		os.Remove(part + ".hash")
		os.Remove(part + ".name")
		return err
	}
	f, err := os.Open(part)
	if err != nil {
		return err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	rd, err := format.Open(f, fi.Size())
	if err == nil {
		err = rd.Verify()
	}
	if err != nil {
		return bad(fmt.Errorf("cycle %s gen %d seq %d: %w", ref.ID, ref.Gen, ref.Seq, err))
	}
	h := rd.Header()
	if uuid.UUID(h.ImageID).String() != ref.ID || h.Generation != ref.Gen || h.Seq != ref.Seq {
		return bad(fmt.Errorf("cycle file is image %s gen %d seq %d, uploaded as %s gen %d seq %d: %w",
			uuid.UUID(h.ImageID), h.Generation, h.Seq, ref.ID, ref.Gen, ref.Seq, ErrForeign))
	}
	if h.Name != name || !p.Allowed(group, h.Name) {
		return bad(fail(http.StatusForbidden, "forbidden", "primary %s may not send image %s/%s", p.Name, group, h.Name))
	}
	if fh := rd.Footer().FileHash; partHash(path) != "" && partHash(path) != hex.EncodeToString(fh[:]) {
		return bad(fmt.Errorf("cycle %s gen %d seq %d: %w: the upload mixes two variants of the cycle", ref.ID, ref.Gen, ref.Seq, format.ErrCorrupt))
	}
	if err := os.Rename(part, path); err != nil {
		return err
	}
	os.Remove(part + ".hash")
	os.Remove(part + ".name")
	return fsutil.SyncDir(filepath.Dir(path))
}

// commit applies a cut's uploaded cycles as one recovery point.
func (s *Server) commit(w http.ResponseWriter, r *http.Request, p pki.Primary) {
	group := r.PathValue("group")
	defer s.afterCommit(group)()
	var req wire.CommitRequest
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&req); err != nil || len(req.Cycles) == 0 {
		s.reply(w, r, nil, fail(http.StatusBadRequest, "bad_request", "commit request: %v", err))
		return
	}
	var paths []string
	for _, ref := range req.Cycles {
		id, err := uuid.Parse(ref.ID)
		if err != nil || id.String() != ref.ID {
			s.reply(w, r, nil, fmt.Errorf("image id %q: %w", ref.ID, ErrBadName))
			return
		}
		path := filepath.Join(s.inbox, group, fmt.Sprintf("%s-g%d-s%d.cyc", ref.ID, ref.Gen, ref.Seq))
		if st, ok, err := s.rep.ImageState(group, ref.ID); err == nil && ok && st.Generation == ref.Gen && st.Seq >= ref.Seq && !st.Applying {
			continue // already applied: idempotent
		}
		if _, err := os.Stat(path); err != nil {
			s.reply(w, r, nil, fail(http.StatusConflict, "refused", "cycle %s gen %d seq %d was not uploaded completely", ref.ID, ref.Gen, ref.Seq))
			return
		}
		paths = append(paths, path)
	}
	if len(paths) == 0 {
		s.reply(w, r, wire.CommitReply{Skipped: true, Point: "latest"}, nil)
		return
	}
	ret := Retention{Points: req.Policy.Points, Every: req.Policy.PointEvery, AnyPointWindow: req.Policy.AnyPointWindow}
	if err := s.rep.EnsureGroup(group, ret); err != nil {
		s.reply(w, r, nil, err)
		return
	}
	res, err := s.rep.ApplyVerifiedAs(r.Context(), group, paths, s.sources(p), s.admitCommit(p, group))
	s.noteCommit(group, req.Policy.Interval, err)
	if s.OnApply != nil {
		s.OnApply(group, res, err)
	}
	if err != nil {
		if errors.Is(err, format.ErrCorrupt) {
			s.discardCorrupt(group, paths)
		}
		s.reply(w, r, nil, err)
		return
	}
	for _, p := range paths {
		os.Remove(p)
	}
	if req.AppConsistent != res.AppConsistent && !res.Skipped {
		s.log.Warn("commit: the primary's app-consistent flag differs from its cycles' headers; the point records the headers", "group", group, "point", res.Point, "request", req.AppConsistent, "cycles", res.AppConsistent)
	}
	s.reply(w, r, commitReply(res), nil)
}

func (s *Server) groupState(w http.ResponseWriter, r *http.Request, p pki.Primary) {
	imgs, err := s.rep.GroupImages(r.PathValue("group"))
	s.reply(w, r, wire.GroupState{Group: r.PathValue("group"), Images: visible(p, r.PathValue("group"), imgs)}, err)
}

// seedExpect records the seed a primary's relationship starts from.
func (s *Server) seedExpect(w http.ResponseWriter, r *http.Request, p pki.Primary) {
	group := r.PathValue("group")
	var req wire.SeedExpect
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&req); err != nil || len(req.Images) == 0 {
		s.reply(w, r, nil, fail(http.StatusBadRequest, "bad_request", "seed announcement: %v", err))
		return
	}
	if err := s.claimGroup(group, p); err != nil {
		s.reply(w, r, nil, err)
		return
	}
	if err := s.rep.ExpectSeed(group, req); err != nil {
		s.reply(w, r, nil, err)
		return
	}
	s.log.Info("primary announced a seed", "group", group, "primary", p.Name, "images", len(req.Images), "cut", req.Time)
	imgs, err := s.rep.GroupImages(group)
	s.reply(w, r, wire.GroupState{Group: group, Images: visible(p, group, imgs)}, err)
}

func validName(s string) bool { return storeNameOK(s) }

func commitReply(res ApplyResult) wire.CommitReply {
	return wire.CommitReply{Point: res.Point, Time: res.Time, Skipped: res.Skipped, AppConsistent: res.AppConsistent}
}

type groupHealth struct {
	interval  time.Duration
	lastErr   string
	errTime   time.Time
	quotaErr  string    // the last upload was refused for the owner's quota
	quotaTime time.Time // when
}

func (s *Server) noteCommit(group string, interval time.Duration, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	h := s.health[group]
	if h == nil {
		h = &groupHealth{}
		s.health[group] = h
	}
	if interval > 0 {
		h.interval = interval
	}
	if err != nil {
		h.lastErr, h.errTime = err.Error(), time.Now()
	} else {
		h.lastErr = ""
	}
}

// GroupHealth is the replica's Hyper-V style health of one group.
type GroupHealth struct {
	GroupStatus
	Health     string   `json:"health"` // Normal, Warning, Critical
	Reasons    []string `json:"reasons,omitempty"`
	LagSeconds float64  `json:"lag_seconds"`
	Interval   string   `json:"interval,omitempty"`
}

// Health reports every group with lag against the interval the primary
// announced, pending applies and the last refused commit.
func (s *Server) Health() ([]GroupHealth, error) {
	gs, err := s.rep.Status()
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]GroupHealth, 0, len(gs))
	for _, g := range gs {
		gh := GroupHealth{GroupStatus: g, Health: "Normal"}
		h := s.health[g.Group]
		var interval time.Duration
		if h != nil {
			interval = h.interval
			gh.Interval = interval.String()
		}
		if g.FailedOver != nil {
			// Not replicating on purpose: no lag is measured.
			gh.Health = "Warning"
			gh.Reasons = append(gh.Reasons, fmt.Sprintf("failed over to this host at point %s (%s, %s); replication from the old primary is refused",
				g.FailedOver.Point, g.FailedOver.Kind, g.FailedOver.Time.UTC().Format(time.RFC3339)))
		} else if g.Latest != nil {
			lag := time.Since(g.Latest.Time)
			gh.LagSeconds = lag.Seconds()
			switch {
			case interval > 0 && lag > 6*interval && lag > time.Minute:
				gh.Health = "Critical"
				gh.Reasons = append(gh.Reasons, fmt.Sprintf("latest point is %s old (interval %s)", lag.Round(time.Second), interval))
			case interval > 0 && lag > 2*interval+30*time.Second:
				gh.Health = "Warning"
				gh.Reasons = append(gh.Reasons, fmt.Sprintf("latest point is %s old (interval %s)", lag.Round(time.Second), interval))
			}
		}
		if g.Pending != "" {
			gh.Health = maxHealth(gh.Health, "Critical")
			gh.Reasons = append(gh.Reasons, pendingReason(s.rep.dir, g.Group, g.Pending))
		}
		if h != nil && h.lastErr != "" {
			gh.Health = maxHealth(gh.Health, "Warning")
			gh.Reasons = append(gh.Reasons, "last commit refused: "+h.lastErr)
		}
		if h != nil && h.quotaErr != "" {
			gh.Health = maxHealth(gh.Health, "Critical")
			gh.Reasons = append(gh.Reasons, "last upload refused: "+h.quotaErr)
		}
		if sh, rs, _ := s.rep.ScrubHealth(g.Group); len(rs) > 0 { // scrub.go
			gh.Health = maxHealth(gh.Health, sh)
			gh.Reasons = append(gh.Reasons, rs...)
		}
		out = append(out, gh)
	}
	return s.quotaOnlyHealth(out), nil
}

func maxHealth(a, b string) string {
	rank := map[string]int{"Normal": 0, "Warning": 1, "Critical": 2}
	if rank[b] > rank[a] {
		return b
	}
	return a
}
