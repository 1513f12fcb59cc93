package daemon

// The replica's periodic scrub (applier.Scrub): every ScrubInterval, a
// throttled re-read of every group's points, undo logs and prepared
// promotion copy. Findings show in 'standin status' health and as metrics.

import (
	"context"
	"encoding/json"
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

type scrubber struct {
	rep      *applier.Replica
	log      *slog.Logger
	interval time.Duration
	rate     int64
	prepared func(group string) string
	mu       sync.Mutex // one scrub at a time

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
	return s
}

// run scrubs every interval until ctx ends (interval ≤ 0: never).
func (s *scrubber) run(ctx context.Context) {
	if s.interval <= 0 {
		return
	}
	t := time.NewTicker(s.interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if _, err := s.once(ctx, s.rate); err != nil && ctx.Err() == nil {
			s.log.Warn("scrub failed", "err", err)
		}
	}
}

// once runs one scrub (rate 0 = unthrottled).
func (s *scrubber) once(ctx context.Context, rate int64) (applier.ScrubReport, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.log.Info("scrub starting", "rate_bytes_per_s", rate)
	rep, err := s.rep.Scrub(ctx, applier.ScrubOptions{Rate: rate, PreparedDir: s.prepared})
	s.bytes.Add(float64(rep.Bytes))
	if err != nil {
		return rep, err
	}
	s.findings.Reset()
	for _, f := range rep.Findings {
		s.findings.WithLabelValues(f.Group, f.Severity, f.What).Inc()
		s.log.Error("scrub found damage", "group", f.Group, "severity", f.Severity, "what", f.What, "msg", f.Message)
	}
	s.last.SetToCurrentTime()
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
			reply(w, http.StatusInternalServerError, apiError{Error: err.Error(), Code: "failure"})
			return
		}
		reply(w, http.StatusOK, rep)
	})
}
