package shipper

// Relay ships cycle files staged in a directory that is not a tracker store:
// extended replication, where a replica host forwards a group onward to a
// third host from its recovery points (applier.Replica.ForwardCut stages the
// cuts). The directory is laid out like a store for what the shipper needs:
//
//	DIR/replicas/HOST_PORT/   credentials for the target (Join with DIR as the store)
//	DIR/cycles/ID/*.cyc       staged cuts (tracker.Cycles lists them)
//	DIR/thin/                 thinned copies of base cycles
//
// Every pending cut is shipped exactly like the primary's: oldest first,
// uploads resumable and throttled, base cycles thinned against what the
// target holds (so a first forward of a group the target already has costs
// little), one commit per cut; files are deleted once committed.

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
)

// Relay ships the staged cuts of one directory (see above).
type Relay struct {
	sh *Shipper
	mu sync.Mutex // one Ship at a time
}

// ShipStats is what one Relay.Ship did.
type ShipStats struct {
	Bytes int64  `json:"bytes"`             // sent: cycle uploads and dedup queries
	Saved int64  `json:"dedup_saved_bytes"` // cycle bytes not sent because the target held the blocks
	Point string `json:"point,omitempty"`   // the target's point of the last cut committed ("" = none shipped)
	Cuts  int    `json:"cuts"`              // cuts committed
}

// NewRelay returns a relay for dir (created if needed when shipping).
func NewRelay(dir string, log *slog.Logger) *Relay {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Relay{sh: &Shipper{dir: dir, log: log, runs: map[string]*run{}}}
}

// Dir is the relay's directory.
func (r *Relay) Dir() string { return r.sh.dir }

// Ship ships every cut staged in the directory to g.Replica (paired with
// Join(ctx, dir, …)), under g's name, bandwidth, schedule and retention
// policy; g.Images is not used. It returns what it sent, also on error (a
// later Ship resumes the uploads).
func (r *Relay) Ship(ctx context.Context, g Group) (ShipStats, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.sh
	if g.Compress == "" {
		g.Compress = "zstd"
	}
	if err := os.MkdirAll(filepath.Join(s.dir, "cycles"), 0o700); err != nil {
		return ShipStats{}, err
	}
	pending, err := s.pending(nil)
	if err != nil {
		return ShipStats{}, err
	}
	// Thinned copies of cuts that are no longer pending go.
	ids := map[string]bool{}
	for _, cut := range pending {
		for _, ci := range cut {
			ids[ci.ID] = true
		}
	}
	if ents, err := os.ReadDir(s.thinDir()); err == nil {
		for _, e := range ents {
			id, _, _ := strings.Cut(e.Name(), "-g")
			ids[id] = true
		}
	}
	s.cleanThin(ids, pending)
	if len(pending) == 0 {
		return ShipStats{}, nil
	}
	c, err := newClient(s.dir, g.Replica)
	if err != nil {
		return ShipStats{}, err
	}
	ru := &run{g: g, st: GroupStatus{Group: g.Name, Replica: g.Replica}}
	err = s.ship(ctx, ru, c, newLimiter(&ru.g), pending)
	ru.mu.Lock()
	st := ShipStats{Bytes: ru.st.BytesSent, Saved: ru.st.DedupSaved, Point: ru.st.LastPoint, Cuts: ru.st.Cycles}
	ru.mu.Unlock()
	return st, err
}
