package applier

import (
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"

	"github.com/google/uuid"

	"github.com/standin/standin/internal/fsutil"
	"github.com/standin/standin/internal/pki"
	"github.com/standin/standin/internal/wire"
)

// Chunk queries and upload variants (see internal/wire chunks.go): the
// same authentication and allow-list as uploads.

// imageQuery validates the image id and name of a chunk query.
func (s *Server) imageQuery(r *http.Request, p pki.Primary) (group, id string, nblocks uint64, err error) {
	group = r.PathValue("group")
	u, err := uuid.Parse(r.PathValue("id"))
	if err != nil || u.String() != r.PathValue("id") {
		return "", "", 0, fmt.Errorf("image id %q: %w", r.PathValue("id"), ErrBadName)
	}
	nblocks, err = strconv.ParseUint(r.URL.Query().Get("blocks"), 10, 64)
	if err != nil || nblocks == 0 || nblocks > 1<<40 {
		return "", "", 0, fail(http.StatusBadRequest, "bad_request", "blocks %q: want the image size in 4 KiB blocks", r.URL.Query().Get("blocks"))
	}
	return group, u.String(), nblocks, nil
}

func (s *Server) sources(p pki.Primary) SourceFunc {
	return func(group, name string) bool { return p.Allowed(group, name) }
}

func (s *Server) replyBinary(w http.ResponseWriter, b []byte) {
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.Write(b)
}

// held answers which of the posted block hashes the replica holds.
func (s *Server) held(w http.ResponseWriter, r *http.Request, p pki.Primary) {
	group, id, nblocks, err := s.imageQuery(r, p)
	if err != nil {
		s.reply(w, r, nil, err)
		return
	}
	limit := int64(wire.MaxHeldBlocks)*(wire.HashSize+12) + 1
	body, err := io.ReadAll(io.LimitReader(r.Body, limit))
	if err != nil || int64(len(body)) >= limit {
		s.reply(w, r, nil, fail(http.StatusBadRequest, "bad_request", "held query: body too large or unreadable (%v)", err))
		return
	}
	runs, _, err := wire.DecodeHeld(body, nblocks)
	if err != nil {
		s.reply(w, r, nil, fail(http.StatusBadRequest, "bad_request", "%v", err))
		return
	}
	if s.OnReceive != nil {
		s.OnReceive(group, int64(len(body)))
	}
	out, err := s.rep.Held(group, id, runs, s.sources(p))
	if err != nil {
		s.reply(w, r, nil, err)
		return
	}
	s.replyBinary(w, out)
}

// regions returns region hashes of an image the replica holds.
func (s *Server) regions(w http.ResponseWriter, r *http.Request, p pki.Primary) {
	group, id, nblocks, err := s.imageQuery(r, p)
	if err != nil {
		s.reply(w, r, nil, err)
		return
	}
	from, err1 := strconv.ParseUint(r.URL.Query().Get("from"), 10, 64)
	count, err2 := strconv.ParseUint(r.URL.Query().Get("count"), 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		s.reply(w, r, nil, fail(http.StatusBadRequest, "bad_request", "from/count: %v", err))
		return
	}
	out, err := s.rep.RegionHashes(group, id, nblocks, from, count, s.sources(p))
	switch {
	case errors.Is(err, ErrNoImageHeld):
		s.reply(w, r, nil, fail(http.StatusNotFound, "no_image", "%v", err))
	case err != nil && !errors.Is(err, ErrBadName):
		s.reply(w, r, nil, fail(http.StatusBadRequest, "bad_request", "%v", err))
	case err != nil:
		s.reply(w, r, nil, err)
	default:
		s.replyBinary(w, out)
	}
}

// discard deletes an unapplied upload (complete or partial) so that another
// variant of the same cycle (thinned or full) can be sent.
func (s *Server) discard(w http.ResponseWriter, r *http.Request, p pki.Primary) {
	group, path, ref, err := s.uploadFile(r)
	if err != nil {
		s.reply(w, r, nil, err)
		return
	}
	defer s.lock(path)()
	st, err := s.state(group, path, ref)
	if err != nil || st.Applied {
		s.reply(w, r, st, err)
		return
	}
	for _, f := range []string{path, path + ".part", path + ".part.hash", path + ".part.name"} {
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			s.reply(w, r, nil, err)
			return
		}
	}
	if err := fsutil.SyncDir(filepath.Dir(path)); err != nil && !errors.Is(err, os.ErrNotExist) {
		s.reply(w, r, nil, err)
		return
	}
	s.reply(w, r, wire.UploadState{}, nil)
}

// validFileHash reports whether s is empty or 64 hex digits.
func validFileHash(s string) bool {
	if s == "" {
		return true
	}
	b, err := hex.DecodeString(s)
	return err == nil && len(b) == 32
}

// partName returns the image name recorded for a partial upload ("" if
// none).
func partName(path string) string {
	b, err := os.ReadFile(path + ".part.name")
	if err != nil || checkImageName(string(b)) != nil {
		return ""
	}
	return string(b)
}

// partHash returns the variant hash recorded for a partial upload.
func partHash(path string) string {
	b, err := os.ReadFile(path + ".part.hash")
	if err != nil || !validFileHash(string(b)) {
		return ""
	}
	return string(b)
}
