package applier

// Authorization of replica API requests (invariant I6). Every request passes
// the same two points, judged by what is actually read or written:
//
//  1. authed (server.go): the client certificate maps to a paired, not
//     revoked primary, the group name is valid and the group is within the
//     primary's allow-list at all (pki.Primary.AllowedGroup) — else 403
//     before anything of the group is looked up.
//  2. images (here): every image the request addresses — by id in the path
//     or in a JSON body, with the name the sender claims for it, and for
//     uploads and commits the name in the cycle header already in the inbox
//     — is checked against what the replica holds (authorizeImages): a held
//     id counts by its recorded name, which must be allowed for the sender
//     and equal to the claimed one (a cycle never renames a held image); a
//     new id must have an allowed name that no other held image of the group
//     has. Failover requests take over the whole group, so every held image
//     of it must be allowed for the sender.
//
// Commits are checked once more with the group's writer lock held, against
// the headers of the cycles that will be written (AdmitFunc), so that an
// apply racing with the check cannot slip a renamed or foreign image in.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"slices"

	"github.com/google/uuid"

	"github.com/standin/standin/internal/format"
	"github.com/standin/standin/internal/pki"
	"github.com/standin/standin/internal/wire"
)

// AdmitFunc authorizes an apply with the group's writer lock held, before
// anything changes: held maps the id of every image the group holds to its
// recorded name, hdrs are the headers of the cycles to apply. An error
// refuses the apply and changes nothing.
type AdmitFunc func(held map[string]string, hdrs []format.Header) error

// heldNames maps the id of every image g holds to its recorded name.
func (g *group) heldNames() map[string]string {
	g.mu.RLock()
	defer g.mu.RUnlock()
	out := make(map[string]string, len(g.images))
	for id, im := range g.images {
		if im.st.Name != "" {
			out[id] = im.st.Name
		}
	}
	return out
}

// HeldNames maps the id of every image group holds to its recorded name
// (empty if the group does not exist).
func (r *Replica) HeldNames(group string) (map[string]string, error) {
	g, err := r.group(group)
	if errors.Is(err, ErrNoGroup) {
		return map[string]string{}, nil
	}
	if err != nil {
		return nil, err
	}
	return g.heldNames(), nil
}

// admitCycles runs admit (if any) on the cycles of an apply. Called with
// g.wmu held.
func admitCycles(g *group, cs []*openedCycle, admit AdmitFunc) error {
	if admit == nil {
		return nil
	}
	hdrs := make([]format.Header, len(cs))
	for i, c := range cs {
		hdrs[i] = c.r.Header()
	}
	return admit(g.heldNames(), hdrs)
}

// ApplyVerifiedAs is ApplyVerifiedFrom that first passes the cycles to
// admit, with the group's writer lock held.
func (r *Replica) ApplyVerifiedAs(ctx context.Context, groupName string, paths []string, sources SourceFunc, admit AdmitFunc) (ApplyResult, error) {
	return r.applyGroup(ctx, groupName, paths, false, sources, admit)
}

// imageClaim is an image a request addresses: its id, and the name the
// sender gives it ("" = none given).
type imageClaim struct {
	id, name string
	// inbox: name is what the replica recorded for the id before this
	// request (the header of a complete upload of the cycle in the inbox,
	// the name recorded when a partial one began, the group's earlier seed
	// announcement). For an id the group does not
	// hold it must be allowed (another primary's pending upload or seed
	// announcement is neither read, discarded nor replaced); for a held id
	// the recorded name decides.
	inbox bool
}

// claimsFunc returns the images request r addresses in group, and whether
// it acts on the whole group (every held image must be allowed).
type claimsFunc func(s *Server, r *http.Request, p pki.Primary, group string) (imgs []imageClaim, whole bool, err error)

// images authorizes the images a request addresses (see the top of this
// file) before h runs.
func (s *Server) images(claims claimsFunc, h authedFunc) authedFunc {
	return func(w http.ResponseWriter, r *http.Request, p pki.Primary) {
		group := r.PathValue("group")
		imgs, whole, err := claims(s, r, p, group)
		if err == nil {
			var held map[string]string
			if held, err = s.rep.HeldNames(group); err == nil {
				err = authorizeImages(p, group, held, imgs, whole)
			}
		}
		if err != nil {
			s.reply(w, r, nil, err)
			return
		}
		h(w, r, p)
	}
}

// checkGroupAllowed refuses a group outside p's allow-list.
func checkGroupAllowed(p pki.Primary, group string) error {
	if p.AllowedGroup(group) {
		return nil
	}
	return fail(http.StatusForbidden, "forbidden", "primary %s (%s) may not reach group %s: its allow-list is %s (the replica admin sets it with standin pair token --images)", p.Name, p.ID, group, p.Pattern)
}

// authorizeImages checks imgs against held (id → recorded name) for p.
func authorizeImages(p pki.Primary, group string, held map[string]string, imgs []imageClaim, whole bool) error {
	names, ids := map[string]string{}, map[string]string{}
	for _, c := range imgs {
		if !imageIDOK(c.id) {
			return fmt.Errorf("image id %q: %w", c.id, ErrBadName)
		}
		if c.name == "" || c.inbox {
			continue
		}
		if err := checkImageName(c.name); err != nil {
			return fail(http.StatusBadRequest, "bad_request", "%v", err)
		}
		if other, ok := names[c.name]; ok && other != c.id {
			return fail(http.StatusConflict, "name_taken", "group %s: the request gives the name %q to two images (%s and %s)", group, c.name, other, c.id)
		}
		if other, ok := ids[c.id]; ok && other != c.name {
			return fail(http.StatusConflict, "renamed", "group %s: the request names image %s both %q and %q", group, c.id, other, c.name)
		}
		names[c.name], ids[c.id] = c.id, c.name
	}
	for _, c := range imgs {
		if rec, ok := held[c.id]; ok {
			if !p.Allowed(group, rec) {
				return fail(http.StatusForbidden, "forbidden", "primary %s (%s) may not touch image %s of group %s: the replica holds it as %q, which its allow-list (%s) does not admit", p.Name, p.ID, c.id, group, rec, p.Pattern)
			}
			if c.name != "" && c.name != rec {
				return fail(http.StatusConflict, "renamed", "image %s of group %s is held as %q, the request names it %q: the replica does not rename a held image (give the disk its old name on the primary again)", c.id, group, rec, c.name)
			}
			continue
		}
		if c.name == "" {
			continue // nothing held, nothing claimed: nothing to reach
		}
		if c.inbox {
			if !p.Allowed(group, c.name) {
				return fail(http.StatusForbidden, "forbidden", "primary %s (%s) may not touch image %s of group %s: the replica has an upload or seed announcement of it named %q, which its allow-list (%s) does not admit", p.Name, p.ID, c.id, group, c.name, p.Pattern)
			}
			continue
		}
		if !p.Allowed(group, c.name) {
			return fail(http.StatusForbidden, "forbidden", "primary %s (%s) may not send image %s/%s (allowed: %s)", p.Name, p.ID, group, c.name, p.Pattern)
		}
		// A new id under the name of a held image is that disk deleted and
		// re-created on the primary: the name is allowed for p, so the held
		// image is p's as well, and the apply retires it (retire.go).
	}
	if whole {
		ids := make([]string, 0, len(held))
		for id := range held {
			ids = append(ids, id)
		}
		slices.Sort(ids)
		for _, id := range ids {
			if !p.Allowed(group, held[id]) {
				return fail(http.StatusForbidden, "forbidden", "primary %s (%s) may not act on all of group %s: it holds image %q (%s), which its allow-list (%s) does not admit", p.Name, p.ID, group, held[id], id, p.Pattern)
			}
		}
	}
	return nil
}

// admit is the commit's AdmitFunc: the header of every cycle to apply (what
// is actually written) is authorized for p against what is held now.
func (s *Server) admit(p pki.Primary, group string) AdmitFunc {
	return func(held map[string]string, hdrs []format.Header) error {
		imgs := make([]imageClaim, len(hdrs))
		for i, h := range hdrs {
			if err := checkImageName(h.Name); err != nil {
				return fail(http.StatusBadRequest, "bad_request", "cycle of image %s: %v", uuid.UUID(h.ImageID), err)
			}
			imgs[i] = imageClaim{id: uuid.UUID(h.ImageID).String(), name: h.Name}
		}
		return authorizeImages(p, group, held, imgs, false)
	}
}

// admitCommit is admit, and then (admitted) records p as the group's owner
// if it has none: a refused commit records nothing.
func (s *Server) admitCommit(p pki.Primary, group string) AdmitFunc {
	admit := s.admit(p, group)
	return func(held map[string]string, hdrs []format.Header) error {
		if err := admit(held, hdrs); err != nil {
			return err
		}
		return s.claimGroup(group, p)
	}
}

// visible returns the images of imgs that p may see.
func visible(p pki.Primary, group string, imgs []wire.ImageState) []wire.ImageState {
	out := make([]wire.ImageState, 0, len(imgs))
	for _, im := range imgs {
		if p.Allowed(group, im.Name) {
			out = append(out, im)
		}
	}
	return out
}

// inboxName returns the image name of the upload at path: the name in the
// header of the complete upload, else the name recorded when the partial
// upload began ("" if there is neither, or the header is unreadable: the
// apply verifies it).
func inboxName(path, id string) string {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return partName(path)
	}
	if err != nil {
		return ""
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return ""
	}
	h, _, err := format.ReadInfo(f, fi.Size())
	if err != nil || uuid.UUID(h.ImageID).String() != id {
		return ""
	}
	return h.Name
}

// pathImage parses the image id in the request path.
func pathImage(r *http.Request) (string, error) {
	u, err := uuid.Parse(r.PathValue("id"))
	if err != nil || u.String() != r.PathValue("id") {
		return "", fmt.Errorf("image id %q: %w", r.PathValue("id"), ErrBadName)
	}
	return u.String(), nil
}

func needName(r *http.Request) (string, error) {
	name := r.URL.Query().Get("name")
	if name == "" {
		return "", fail(http.StatusBadRequest, "bad_request", "the image name is missing (query parameter name)")
	}
	return name, nil
}

// uploadClaims: the image of an upload URL, with the name given (required
// unless optional) and the name of the upload of the cycle already in the
// inbox (complete or partial, see inboxName).
func uploadClaims(optional bool) claimsFunc {
	return func(s *Server, r *http.Request, _ pki.Primary, group string) ([]imageClaim, bool, error) {
		_, path, ref, err := s.uploadFile(r)
		if err != nil {
			return nil, false, err
		}
		name := r.URL.Query().Get("name")
		if !optional {
			if name, err = needName(r); err != nil {
				return nil, false, err
			}
		}
		imgs := []imageClaim{{id: ref.ID, name: name}}
		if n := inboxName(path, ref.ID); n != "" {
			imgs = append(imgs, imageClaim{ref.ID, n, true})
		}
		return imgs, false, nil
	}
}

// queryClaims: the image of a chunk query (held, regions).
func queryClaims(s *Server, r *http.Request, _ pki.Primary, group string) ([]imageClaim, bool, error) {
	id, err := pathImage(r)
	if err != nil {
		return nil, false, err
	}
	name, err := needName(r)
	return []imageClaim{{id: id, name: name}}, false, err
}

// jsonBody reads a JSON request body of at most limit bytes into v and
// puts it back for the handler. A body that does not decode is left to the
// handler to refuse (it addresses no image).
func jsonBody(r *http.Request, limit int64, v any) (bool, error) {
	b, err := io.ReadAll(io.LimitReader(r.Body, limit))
	if err != nil {
		return false, fail(http.StatusBadRequest, "bad_request", "reading the request body: %v", err)
	}
	r.Body = io.NopCloser(bytes.NewReader(b))
	return json.Unmarshal(b, v) == nil, nil
}

// commitClaims: every cycle of a commit, named as in the header of its
// upload in the inbox.
func commitClaims(s *Server, r *http.Request, _ pki.Primary, group string) ([]imageClaim, bool, error) {
	var req wire.CommitRequest
	if ok, err := jsonBody(r, 1<<20, &req); !ok || err != nil {
		return nil, false, err
	}
	var imgs []imageClaim
	for _, ref := range req.Cycles {
		if !imageIDOK(ref.ID) {
			return nil, false, fmt.Errorf("image id %q: %w", ref.ID, ErrBadName)
		}
		path := filepath.Join(s.inbox, group, fmt.Sprintf("%s-g%d-s%d.cyc", ref.ID, ref.Gen, ref.Seq))
		imgs = append(imgs, imageClaim{id: ref.ID, name: inboxName(path, ref.ID)})
	}
	return imgs, false, nil
}

// seedClaims: the images of a seed announcement. It replaces the group's
// earlier announcement, so each image of that one must be allowed too.
func seedClaims(s *Server, r *http.Request, _ pki.Primary, group string) ([]imageClaim, bool, error) {
	var req wire.SeedExpect
	if ok, err := jsonBody(r, 1<<20, &req); !ok || err != nil {
		return nil, false, err
	}
	imgs, err := bodyClaims(req.Images)
	if err != nil {
		return nil, false, err
	}
	old, ok, err := s.rep.SeedExpectation(group)
	if err != nil || !ok {
		return imgs, false, err
	}
	for _, im := range old.Images {
		imgs = append(imgs, imageClaim{id: im.ID, name: im.Name, inbox: true})
	}
	return imgs, false, nil
}

// failoverClaims: the images of a failover request, which acts on the
// whole group.
func failoverClaims(s *Server, r *http.Request, _ pki.Primary, group string) ([]imageClaim, bool, error) {
	var req wire.FailoverRequest
	if ok, err := jsonBody(r, 1<<20, &req); !ok || err != nil {
		return nil, true, err
	}
	ims := make([]wire.ImageState, len(req.Images))
	for i, im := range req.Images {
		ims[i] = wire.ImageState{ID: im.ID, Name: im.Name}
	}
	imgs, err := bodyClaims(ims)
	return imgs, true, err
}

// bodyClaims: images named in a JSON body; each needs an id and a name.
func bodyClaims(ims []wire.ImageState) ([]imageClaim, error) {
	out := make([]imageClaim, len(ims))
	for i, im := range ims {
		if im.Name == "" {
			return nil, fail(http.StatusBadRequest, "bad_request", "image %q: the name is missing", im.ID)
		}
		out[i] = imageClaim{id: im.ID, name: im.Name}
	}
	return out, nil
}
