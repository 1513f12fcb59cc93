package daemon

// The replica's periodic scrub (applier.Scrub): every ScrubInterval, a
// throttled re-read of every group's points, undo logs and prepared
// promotion copy. Findings show in 'standin status' health and as metrics;
// they and the schedule are kept in the store (scrub.json), so a restart
// neither forgets them nor postpones the next scrub.

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"path/filepath"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/standin/standin/applier"
)

// DefaultScrubInterval and DefaultScrubRate are serve's defaults.
const (
	DefaultScrubInterval = 7 * 24 * time.Hour
	DefaultScrubRate     = 50 << 20 // bytes/s
)

// scrubStartDelay is the least wait before a scrub that was due while the
// daemon was down (it starts once the daemon is up, not while it starts).
var scrubStartDelay = time.Minute

type scrubber struct {
	rep      *applier.Replica
	log      *slog.Logger
	interval time.Duration
	rate     int64
	prepared func(group string) string

	mu      sync.Mutex // guards running
	running time.Time  // start of the running scrub (zero: none)

	findings *prometheus.GaugeVec
	last     prometheus.Gauge
	bytes    prometheus.Counter
}

func newScrubber(rep *applier.Replica, o ReplicaOptions, log *slog.Logger, reg *prometheus.Registry) *scrubber {
	s := &scrubber{rep: rep, log: log, interval: o.ScrubInterval, rate: o.ScrubRate}
	if o.PrimaryStore != "" {
		s.prepared = func(g string) string { return filepath.Join(o.PrimaryStore, "failover", g) }
	}
	s.findings = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "standin_replica_scrub_findings",
		Help: "Damage found by the last scrub of the group (what: latest, point, undo, prepared)."}, []string{"group", "severity", "what"})
	s.last = prometheus.NewGauge(prometheus.GaugeOpts{Name: "standin_replica_scrub_last_timestamp_seconds", Help: "End of the last complete scrub."})
	s.bytes = prometheus.NewCounter(prometheus.CounterOpts{Name: "standin_replica_scrub_read_bytes_total", Help: "Bytes re-read by scrubs."})
	reg.MustRegister(s.findings, s.last, s.bytes)
	s.updateGauges() // the findings and time recorded before a restart
	return s
}

// updateGauges sets the metrics from the store's scrub record (the findings
// health shows: each group's last scrub).
func (s *scrubber) updateGauges() {
	s.findings.Reset()
	for _, f := range s.rep.ScrubFindings() {
		s.findings.WithLabelValues(f.Group, f.Severity, f.What).Inc()
	}
	if t := s.rep.LastScrub(); !t.IsZero() {
		s.last.Set(float64(t.UnixNano()) / 1e9)
	}
}

// run scrubs every interval until ctx ends (interval ≤ 0: never). The
// schedule is the store's (ScrubDue): an interval after the last complete
// scrub, before a restart too; one overdue runs scrubStartDelay after start.
func (s *scrubber) run(ctx context.Context) {
	if s.interval <= 0 {
		return
	}
	first := true
	var notBefore time.Time // after a failed scrub: no retry before then
	for {
		due, err := s.rep.ScrubDue(s.interval)
		if err != nil {
			s.log.Warn("recording the scrub schedule failed", "err", err)
		}
		if due.Before(notBefore) {
			due = notBefore
		}
		wait := time.Until(due)
		if first && wait < scrubStartDelay {
			wait = scrubStartDelay
		}
		first = false
		t := time.NewTimer(max(wait, 0))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		if d, _ := s.rep.ScrubDue(s.interval); time.Now().Before(d) {
			continue // a scrub ran meanwhile ('standin points scrub')
		}
		notBefore = time.Now().Add(min(s.interval, time.Hour))
		if _, err := s.once(ctx, s.rate); err != nil && ctx.Err() == nil {
			s.log.Warn("scrub failed", "err", err)
		}
	}
}

// once runs one scrub (rate 0 = unthrottled); while one runs, it refuses
// (errBusy) rather than queue behind it.
func (s *scrubber) once(ctx context.Context, rate int64) (applier.ScrubReport, error) {
	s.mu.Lock()
	if !s.running.IsZero() {
		started := s.running
		s.mu.Unlock()
		return applier.ScrubReport{}, fmt.Errorf("%w: a scrub is running (started %s); its findings show in 'standin status' when it ends", errBusy, started.Format(time.RFC3339))
	}
	s.running = time.Now()
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.running = time.Time{}
		s.mu.Unlock()
	}()
	s.log.Info("scrub starting", "rate_bytes_per_s", rate)
	rep, err := s.rep.Scrub(ctx, applier.ScrubOptions{Rate: rate, PreparedDir: s.prepared})
	s.bytes.Add(float64(rep.Bytes))
	s.updateGauges() // also after an interrupted scrub: the groups it finished
	if err != nil {
		return rep, err
	}
	for _, f := range rep.Findings {
		s.log.Error("scrub found damage", "group", f.Group, "severity", f.Severity, "what", f.What, "msg", f.Message)
	}
	s.log.Info("scrub done", "groups", rep.Groups, "bytes", rep.Bytes, "findings", len(rep.Findings), "seconds", rep.Seconds)
	return rep, nil
}

// ScrubRequest is the body of POST /scrub on the replica control socket.
type ScrubRequest struct {
	Rate int64 `json:"rate"` // bytes/s, 0 = unthrottled
}

func (s *scrubber) control(mux *http.ServeMux) {
	mux.HandleFunc("POST /scrub", func(w http.ResponseWriter, r *http.Request) {
		var req ScrubRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			reply(w, http.StatusBadRequest, apiError{Error: err.Error(), Code: "usage"})
			return
		}
		rep, err := s.once(r.Context(), req.Rate)
		if err != nil {
			replyErr(w, err)
			return
		}
		reply(w, http.StatusOK, rep)
	})
}
