package applier

import (
	"context"
	"encoding/json"
	"io"
	"net/http"

	"github.com/standin/standin/internal/pki"
	"github.com/standin/standin/internal/wire"
)

// FailoverFunc carries out a failover request of a group's primary (see
// wire.FailoverRequest); the replica daemon provides it, since promotion
// involves the host's primary store.
type FailoverFunc func(ctx context.Context, group string, p pki.Primary, req wire.FailoverRequest) (wire.FailoverReply, error)

// failover serves POST /v1/groups/{group}/failover.
func (s *Server) failover(w http.ResponseWriter, r *http.Request, p pki.Primary) {
	group := r.PathValue("group")
	var req wire.FailoverRequest
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&req); err != nil || len(req.Images) == 0 {
		s.reply(w, r, nil, fail(http.StatusBadRequest, "bad_request", "failover request: %v (want a JSON body with images)", err))
		return
	}
	switch req.Kind {
	case "planned", "reverse", "prepare", "cancel":
	default:
		s.reply(w, r, nil, fail(http.StatusBadRequest, "bad_request", "failover kind %q: want planned, reverse, prepare or cancel", req.Kind))
		return
	}
	if s.OnFailover == nil {
		s.reply(w, r, nil, Refuse("this replica daemon cannot take over group %s: it was started without --primary-store (the primary store of this host that the promoted images go to)", group))
		return
	}
	s.log.Info("failover requested", "group", group, "kind", req.Kind, "primary", p.Name, "dry_run", req.DryRun)
	rep, err := s.OnFailover(r.Context(), group, p, req)
	s.reply(w, r, rep, err)
}

// Refuse is an error the HTTP API answers with 409 and code "refused": the
// request was understood and declined, and nothing changed.
func Refuse(format string, a ...any) error {
	return fail(http.StatusConflict, "refused", format, a...)
}
