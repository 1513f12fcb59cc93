package shipper

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path/filepath"

	"github.com/standin/standin/internal/wire"
)

// ErrFailedOver: the replica refused because the group failed over to it —
// this primary is stale (split brain avoided: nothing was overwritten).
var ErrFailedOver = errors.New("the replica took over this group: this primary is stale")

// RequestFailover sends a failover request for group to the replica (see
// wire.FailoverRequest) with this primary's credentials.
func RequestFailover(ctx context.Context, store, replica, group string, req wire.FailoverRequest) (wire.FailoverReply, error) {
	var rep wire.FailoverReply
	c, err := newClient(store, replica)
	if err != nil {
		return rep, err
	}
	b, _ := json.Marshal(req)
	hr, err := http.NewRequestWithContext(ctx, http.MethodPost, fmt.Sprintf("%s/groups/%s/failover", c.base, url.PathEscape(group)), bytes.NewReader(b))
	if err != nil {
		return rep, err
	}
	return rep, doJSON(c.hc, hr, &rep)
}

// Paired reports whether this store holds credentials for replica.
func Paired(store, replica string) bool {
	_, err := os.Stat(filepath.Join(credDir(store, replica), "client.pem"))
	return err == nil
}

// Group returns the configuration of the named group.
func (s *Shipper) Group(name string) (Group, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if g := s.cfg.Find(name); g != nil {
		return *g, true
	}
	return Group{}, false
}

// FinalCut pauses the group's schedule (persisted: a daemon restart keeps it
// paused) and then cuts and ships once more, returning when the replica has
// applied the cut — the last cut of a planned failover, taken after the
// images were fenced, so it carries every write. It returns the bytes sent
// (uploads and queries).
func (s *Shipper) FinalCut(ctx context.Context, name string) (int64, error) {
	if err := s.Update(name, func(g *Group) { g.Paused = true }); err != nil {
		return 0, err
	}
	s.mu.Lock()
	r := s.runs[name]
	s.mu.Unlock()
	if r == nil {
		return 0, fmt.Errorf("no replication group %q: %w", name, ErrNoGroup)
	}
	before := r.status().BytesSent
	err := s.round(ctx, r, true)
	return r.status().BytesSent - before, err
}
