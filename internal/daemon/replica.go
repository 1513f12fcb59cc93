package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/standin/standin/applier"
	"github.com/standin/standin/fusefs"
	"github.com/standin/standin/internal/fsutil"
	"github.com/standin/standin/internal/netlimit"
	"github.com/standin/standin/internal/pki"
)

// ReplicaOptions configure the replica daemon (standin serve).
type ReplicaOptions struct {
	Store   string
	Listen  string
	Metrics string // Prometheus listen address, "" = off
	Version string
	// Enterprise PKI instead of the self-signed CA.
	CertFile, KeyFile, ClientCAFile string
	Logger                          *slog.Logger
	// PointsMount, if set, is where every recovery point is exposed
	// read-only through FUSE (failover.go).
	PointsMount string
	// PointsAccess: who besides the daemon's user may read PointsMount.
	PointsAccess fusefs.Access
	// PrimaryStore is this host's primary store (its mount daemon tracks
	// images promoted by a failover); "" = this host cannot take over.
	PrimaryStore string
	// WarmStandby keeps a promotion copy of every group in PrimaryStore,
	// brought forward after each apply (twice the disk space; a failover
	// then copies nothing).
	WarmStandby bool
	// Limits bound the HTTPS listener: connections in total and per remote
	// address, header, idle, body-progress and response timeouts (zero
	// fields: netlimit.Default).
	Limits netlimit.Limits
	// ScrubInterval is the period of the scrub (scrub.go; 0 = no periodic
	// scrub); ScrubRate its read limit in bytes/s (0 = unlimited).
	ScrubInterval time.Duration
	ScrubRate     int64
}

// OpenAuthority opens the replica's PKI state in STORE/pki.
func OpenAuthority(o ReplicaOptions) (*pki.Authority, error) {
	dir := filepath.Join(o.Store, "pki")
	if o.CertFile != "" || o.KeyFile != "" || o.ClientCAFile != "" {
		if o.CertFile == "" || o.KeyFile == "" || o.ClientCAFile == "" {
			return nil, errors.New("--cert, --key and --client-ca go together")
		}
		return pki.OpenAuthorityWithCerts(dir, o.CertFile, o.KeyFile, o.ClientCAFile)
	}
	var hosts []string
	if h, _, err := net.SplitHostPort(o.Listen); err == nil && h != "" && h != "0.0.0.0" && h != "::" {
		hosts = append(hosts, h)
	}
	return pki.OpenAuthority(dir, hosts)
}

// RunReplica serves the replica until SIGTERM/SIGINT or ctx ends.
func RunReplica(ctx context.Context, o ReplicaOptions, ready func()) error {
	TuneGOMAXPROCS()
	log := o.Logger
	if log == nil {
		log = slog.Default()
	}
	if err := os.MkdirAll(o.Store, 0o700); err != nil {
		return err
	}
	// OpenReplica takes the store's lock: one daemon per store.
	rep, err := applier.OpenReplica(o.Store, applier.ReplicaOptions{Logger: log})
	if err != nil {
		return err
	}
	defer rep.Close()
	auth, err := OpenAuthority(o)
	if err != nil {
		return err
	}
	srv, err := applier.NewServer(rep, auth, filepath.Join(o.Store, "inbox"), log)
	if err != nil {
		return err
	}
	// Cycles applied by the recovery above, and older leftovers, leave the inbox.
	if _, err := srv.CollectInbox(""); err != nil {
		log.Warn("inbox collection", "err", err)
	}
	m := newReplicaMetrics()
	srv.OnReceive = func(group string, n int64) { m.received.WithLabelValues(group).Add(float64(n)) }
	rf := newReplicaFailover(rep, o.PrimaryStore, o.WarmStandby, log)
	defer rf.stop()
	srv.OnFailover = rf.handle
	srv.OnApply = func(group string, res applier.ApplyResult, err error) {
		if err != nil {
			m.failures.WithLabelValues(group).Inc()
			return
		}
		m.applied.WithLabelValues(group).Inc()
		rf.applied(group)
		m.lastApply.WithLabelValues(group).SetToCurrentTime()
	}

	lim := effectiveLimits(o.Limits, log)
	srv.BodyTimeout, srv.WriteTimeout = lim.BodyTimeout, lim.WriteTimeout
	tcp, err := net.Listen("tcp", o.Listen)
	if err != nil {
		return fmt.Errorf("listen %s: %w", o.Listen, err)
	}
	ln := lim.Listener(tcp)
	m.reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "standin_replica_connections_open", Help: "HTTPS connections open."},
			func() float64 { n, _ := ln.Open(); return float64(n) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "standin_replica_connections_refused_total", Help: "HTTPS connections closed at accept for the per-address limit."},
			func() float64 { return float64(ln.Refused()) }))
	hs := lim.Server(srv.Handler())
	hs.TLSConfig = auth.ServerTLS()
	hs.ErrorLog = slog.NewLogLogger(log.Handler(), slog.LevelWarn)
	go func() {
		if err := hs.ServeTLS(ln, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("https server", "err", err)
		}
	}()
	defer hs.Close()

	if o.Metrics != "" {
		stop, err := serveMetrics(o.Metrics, m.reg)
		if err != nil {
			return fmt.Errorf("metrics listen %s: %w", o.Metrics, err)
		}
		defer stop()
	}

	// Points mount and test failovers (re-mounted from the store).
	fm, err := startFailover(rep, o.Store, o.PointsMount, o.PointsAccess, log)
	if err != nil {
		return err
	}
	defer fm.close()

	sock := SocketPath(o.Store)
	os.Remove(sock)
	cln, err := net.Listen("unix", sock)
	if err != nil {
		return fmt.Errorf("control socket %s: %w", sock, err)
	}
	os.Chmod(sock, 0o600)
	cmux := replicaControl(rep, srv, auth, o, ln.Addr().String())
	repairControl(cmux, rep)
	rf.control(cmux)
	// Extended replication: forwards of groups to third hosts (forward.go).
	fw, err := startForwarder(ctx, rep, srv, o.Store, log)
	if err != nil {
		return err
	}
	defer fw.stop()
	fw.control(cmux)
	sc := newScrubber(rep, o, log, m.reg)
	sc.control(cmux)
	scrubCtx, scrubCancel := context.WithCancel(ctx)
	defer scrubCancel()
	go sc.run(scrubCtx)
	cs := controlServer(fm.handler(cmux))
	go cs.Serve(cln)
	defer func() { cs.Close(); os.Remove(sock) }()

	log.Info("replica serving", "store", o.Store, "listen", ln.Addr().String(), "pid", os.Getpid())
	if ready != nil {
		ready()
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sig)
	select {
	case s := <-sig:
		log.Info("signal; stopping", "signal", s.String())
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	hs.Shutdown(sctx)
	return nil
}

type replicaMetrics struct {
	reg                         *prometheus.Registry
	received, applied, failures *prometheus.CounterVec
	lastApply                   *prometheus.GaugeVec
}

func newReplicaMetrics() *replicaMetrics {
	m := &replicaMetrics{reg: prometheus.NewRegistry()}
	m.received = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "standin_replica_received_bytes_total", Help: "Cycle bytes received."}, []string{"group"})
	m.applied = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "standin_replica_applied_cuts_total", Help: "Cuts applied as recovery points."}, []string{"group"})
	m.failures = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "standin_replica_apply_failures_total", Help: "Commits refused or failed."}, []string{"group"})
	m.lastApply = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "standin_replica_last_apply_timestamp_seconds", Help: "Time of the last applied cut."}, []string{"group"})
	m.reg.MustRegister(m.received, m.applied, m.failures, m.lastApply, prometheus.NewGoCollector(), prometheus.NewProcessCollector(prometheus.ProcessCollectorOpts{}))
	return m
}

// TokenRequest is the body of POST /pair/token on the replica control socket.
type TokenRequest struct {
	Pattern string        `json:"pattern"`
	TTL     time.Duration `json:"ttl"`
	Addr    string        `json:"addr"`
	// Replaces: the name of the primary the pairing replaces (revokes); only
	// a pairing under this name is accepted (a failover pairs the peer host
	// again; pki.TokenOptions.Replaces).
	Replaces string    `json:"replaces,omitempty"`
	Quota    pki.Quota `json:"quota,omitzero"`
}

// ReplicaStatus is the replica daemon's GET /status.
type ReplicaStatus struct {
	Role      string                `json:"role"`
	PID       int                   `json:"pid"`
	Version   string                `json:"version"`
	Store     string                `json:"store"`
	Listen    string                `json:"listen"`
	Groups    []applier.GroupHealth `json:"groups"`
	Primaries []pki.Primary         `json:"primaries"`
	// Usage is every paired primary's quota and what its groups take.
	Usage []applier.PrimaryUsage `json:"usage,omitempty"`
}

func replicaControl(rep *applier.Replica, srv *applier.Server, auth *pki.Authority, o ReplicaOptions, listen string) *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		gs, err := srv.Health()
		if err != nil {
			reply(w, http.StatusInternalServerError, apiError{Error: err.Error(), Code: "failure"})
			return
		}
		us, err := srv.Usage()
		if err != nil {
			reply(w, http.StatusInternalServerError, apiError{Error: err.Error(), Code: "failure"})
			return
		}
		reply(w, http.StatusOK, ReplicaStatus{Role: "replica", PID: os.Getpid(), Version: o.Version, Store: o.Store, Listen: listen, Groups: gs, Primaries: auth.Primaries(), Usage: us})
	})
	mux.HandleFunc("POST /pair/token", func(w http.ResponseWriter, r *http.Request) {
		var req TokenRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			reply(w, http.StatusBadRequest, apiError{Error: err.Error(), Code: "usage"})
			return
		}
		if req.Addr == "" {
			req.Addr = listen
		}
		tok, err := auth.NewTokenWith(req.Addr, pki.TokenOptions{Pattern: req.Pattern, TTL: req.TTL, Quota: req.Quota, Replaces: req.Replaces})
		if err != nil {
			reply(w, http.StatusInternalServerError, apiError{Error: err.Error(), Code: "failure"})
			return
		}
		reply(w, http.StatusOK, map[string]string{"token": tok})
	})
	mux.HandleFunc("GET /points", func(w http.ResponseWriter, r *http.Request) {
		ps, err := rep.Points(r.URL.Query().Get("group"))
		if err != nil {
			reply(w, http.StatusNotFound, apiError{Error: err.Error(), Code: "not_found"})
			return
		}
		reply(w, http.StatusOK, ps)
	})
	mux.HandleFunc("POST /points/export", func(w http.ResponseWriter, r *http.Request) {
		var req ExportRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			reply(w, http.StatusBadRequest, apiError{Error: err.Error(), Code: "usage"})
			return
		}
		files, err := ExportPoint(r.Context(), rep, req)
		if err != nil {
			reply(w, http.StatusInternalServerError, apiError{Error: err.Error(), Code: "failure"})
			return
		}
		reply(w, http.StatusOK, files)
	})
	mux.HandleFunc("POST /seed/import", func(w http.ResponseWriter, r *http.Request) {
		var req SeedImportRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			reply(w, http.StatusBadRequest, apiError{Error: "bad request: " + err.Error(), Code: "usage"})
			return
		}
		s := newStreamer(w)
		sum, err := SeedImport(r.Context(), rep, req, s.emit)
		if err != nil {
			s.emit(errEvent(err))
			return
		}
		s.emit(SeedEvent{Type: "done", Import: &sum})
	})
	mux.HandleFunc("POST /points/verify", func(w http.ResponseWriter, r *http.Request) {
		var req ExportRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			reply(w, http.StatusBadRequest, apiError{Error: err.Error(), Code: "usage"})
			return
		}
		if req.Prepared {
			if o.PrimaryStore == "" {
				reply(w, http.StatusNotFound, apiError{Error: "this replica keeps no promotion copies (serve has no --primary-store)", Code: "not_found"})
				return
			}
			pr, err := rep.VerifyPrepared(r.Context(), req.Group, filepath.Join(o.PrimaryStore, "failover", req.Group), nil, false)
			switch {
			case errors.Is(err, applier.ErrNotPrepared):
				reply(w, http.StatusNotFound, apiError{Error: err.Error(), Code: "not_found"})
			case err != nil && !errors.Is(err, applier.ErrMismatch):
				reply(w, http.StatusInternalServerError, apiError{Error: err.Error(), Code: "failure"})
			default:
				reply(w, http.StatusOK, pr) // a mismatch is in the report
			}
			return
		}
		rep2, err := rep.VerifyPoint(r.Context(), req.Group, req.Point)
		if err != nil {
			reply(w, http.StatusInternalServerError, apiError{Error: err.Error(), Code: "failure"})
			return
		}
		reply(w, http.StatusOK, rep2)
	})
	return mux
}

// ExportRequest names a point (and optionally one image) to export or verify.
type ExportRequest struct {
	Group string `json:"group"`
	Point string `json:"point"`
	Image string `json:"image"`
	To    string `json:"to"`
	// Replace lets an export replace existing files (refused otherwise).
	Replace bool `json:"replace,omitempty"`
	// Prepared (verify): check the group's prepared promotion copy instead
	// of a point.
	Prepared bool `json:"prepared,omitempty"`
}

// ExportPoint writes one image of a point to req.To, or every image of the
// group into the directory req.To.
// The files are 0600 and a directory it creates 0700; an existing file is
// replaced only with req.Replace (a symlink there is replaced, never
// followed).
func ExportPoint(ctx context.Context, rep *applier.Replica, req ExportRequest) ([]string, error) {
	exists := func(dst string) error {
		if _, err := os.Lstat(dst); err == nil && !req.Replace {
			return fmt.Errorf("%s already exists: %w (remove it, or --force to replace it)", dst, errBusy)
		}
		return nil
	}
	if req.Image != "" {
		if err := exists(req.To); err != nil {
			return nil, err
		}
		return []string{req.To}, rep.Export(ctx, req.Group, req.Point, req.Image, req.To)
	}
	// The images of that point (a disk deleted and re-created on the
	// primary is a retired image at later points, the new one at earlier
	// ones), pinned while they are written.
	pin, err := rep.PinPoint(req.Group, req.Point)
	if err != nil {
		return nil, err
	}
	defer pin.Release()
	imgs, err := rep.PointImages(req.Group, pin.Point())
	if err != nil {
		return nil, err
	}
	if err := fsutil.MkdirNew(req.To, 0o700); err != nil {
		return nil, err
	}
	dsts := make([]string, len(imgs))
	for i, im := range imgs {
		dsts[i] = filepath.Join(req.To, im.File)
		if err := exists(dsts[i]); err != nil {
			return nil, err
		}
	}
	var out []string
	for i, im := range imgs {
		dst := dsts[i]
		if err := rep.Export(ctx, req.Group, pin.Point(), im.ID, dst); err != nil {
			return out, err
		}
		out = append(out, dst)
	}
	return out, nil
}
