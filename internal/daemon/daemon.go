// Package daemon runs the primary's mount daemon: the tracker store, the
// FUSE mount and the control socket the CLI talks to.
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
	"runtime"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/standin/standin/fusefs"
	"github.com/standin/standin/shipper"
	"github.com/standin/standin/tracker"
)

// Options configure the daemon.
type Options struct {
	Store      string
	Mountpoint string
	Version    string
	Compress   bool
	DenyOthers bool
	Debug      bool
	Metrics    string // Prometheus listen address, "" = off
	Logger     *slog.Logger
}

// SocketPath is the control socket of the store's daemon.
func SocketPath(store string) string { return filepath.Join(store, "control.sock") }

// Run serves until SIGTERM/SIGINT or until the mount is unmounted, then
// shuts down cleanly (final checkpoint, clean flags). ready is called once the
// mount and the control socket are up.
func Run(ctx context.Context, o Options, ready func()) error {
	TuneGOMAXPROCS()
	log := o.Logger
	if log == nil {
		log = slog.Default()
	}
	topts := tracker.Options{Compress: o.Compress, Logger: log}
	if d := os.Getenv("STANDIN_TEST_STAGE_DELAY"); d != "" {
		v, err := time.ParseDuration(d)
		if err != nil {
			return fmt.Errorf("STANDIN_TEST_STAGE_DELAY=%q: %w", d, err)
		}
		topts.StageDelay = v
	}
	if v := os.Getenv("STANDIN_TEST_CHECKPOINT_INTERVAL"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			return fmt.Errorf("STANDIN_TEST_CHECKPOINT_INTERVAL=%q: %w", v, err)
		}
		topts.CheckpointInterval = d
	}
	st, err := tracker.Open(o.Store, topts)
	if err != nil {
		return err
	}
	defer func() {
		if err := st.Close(); err != nil {
			log.Error("closing store", "err", err)
		}
	}()
	mnt, err := filepath.Abs(o.Mountpoint)
	if err != nil {
		return err
	}
	if fi, err := os.Stat(mnt); err != nil || !fi.IsDir() {
		return fmt.Errorf("mountpoint %s: not a directory (create it first)", mnt)
	}

	fo := fusefs.Options{DenyOthers: o.DenyOthers, Debug: o.Debug, Logger: log}
	if v := os.Getenv("STANDIN_TEST_CRASH_AFTER_WRITES"); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n <= 0 {
			return fmt.Errorf("STANDIN_TEST_CRASH_AFTER_WRITES=%q: want a positive count", v)
		}
		var count atomic.Int64
		fo.AfterWrite = func() {
			if count.Add(1) == n {
				// A simulated power cut: the backing write returned,
				// nothing else happens.
				syscall.Kill(os.Getpid(), syscall.SIGKILL)
				select {}
			}
		}
	}
	srv, err := fusefs.Mount(st.ImagesDir(), mnt, adapter{st}, fo)
	if err != nil {
		return err
	}
	unmounted := make(chan struct{})
	go func() { srv.Wait(); close(unmounted) }()

	sock := SocketPath(st.Dir())
	os.Remove(sock)
	ln, err := net.Listen("unix", sock)
	if err != nil {
		srv.Unmount()
		return fmt.Errorf("control socket %s: %w", sock, err)
	}
	os.Chmod(sock, 0o600)
	sh, err := shipper.New(st, log)
	if err != nil {
		srv.Unmount()
		return err
	}
	sh.SetMountpoint(mnt) // freeze/thaw commands get the images' paths on the mount
	sh.Start(ctx)
	defer sh.Stop()
	if o.Metrics != "" {
		reg := prometheus.NewRegistry()
		reg.MustRegister(primaryCollector{st, sh}, prometheus.NewGoCollector(), prometheus.NewProcessCollector(prometheus.ProcessCollectorOpts{}))
		stop, err := serveMetrics(o.Metrics, reg)
		if err != nil {
			srv.Unmount()
			return fmt.Errorf("metrics listen %s: %w", o.Metrics, err)
		}
		defer stop()
	}
	hs := controlServer(newControl(st, sh, mnt, o.Version, log))
	go hs.Serve(ln)
	defer func() {
		hs.Close()
		os.Remove(sock)
	}()

	log.Info("serving", "store", st.Dir(), "mountpoint", mnt, "pid", os.Getpid())
	if ready != nil {
		ready()
	}
	sig := make(chan os.Signal, 2)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sig)
	select {
	case <-unmounted:
		log.Info("unmounted")
	case s := <-sig:
		log.Info("signal; unmounting", "signal", s.String())
		if err := srv.Unmount(); err != nil {
			log.Error("unmount", "err", err)
		}
		select {
		case <-unmounted:
		case <-sig:
			log.Warn("second signal: exiting with files still open")
		}
	case <-ctx.Done():
		srv.Unmount()
		<-unmounted
	}
	return nil
}

// adapter makes *tracker.Store a fusefs.Tracker.
type adapter struct{ s *tracker.Store }

func (a adapter) Image(rel string) (fusefs.Image, error) {
	im, err := a.s.Image(rel)
	if err != nil {
		return nil, err
	}
	return im, nil
}
func (a adapter) Unlinking(rel string) func(bool) { return a.s.Unlinking(rel) }
func (a adapter) Renamed(o, n string)             { a.s.Renamed(o, n) }

// StatusReply is the daemon's answer to GET /status.
type StatusReply struct {
	Role       string                `json:"role"`
	PID        int                   `json:"pid"`
	Version    string                `json:"version"`
	Store      string                `json:"store"`
	Mountpoint string                `json:"mountpoint"`
	Started    time.Time             `json:"started"`
	Images     []tracker.Status      `json:"images"`
	Groups     []shipper.GroupStatus `json:"groups"`
}

// CutRequest is the body of POST /cut.
type CutRequest struct {
	Images []string `json:"images"` // empty: all images
}

type apiError struct {
	Error string `json:"error"`
	Code  string `json:"code"`
}

func newControl(st *tracker.Store, sh *shipper.Shipper, mnt, version string, log *slog.Logger) http.Handler {
	started := time.Now()
	mux := http.NewServeMux()
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		reply(w, http.StatusOK, StatusReply{
			Role: "primary", PID: os.Getpid(), Version: version, Store: st.Dir(), Mountpoint: mnt, Started: started,
			Images: st.Status(r.URL.Query().Get("blocks") != ""),
			Groups: sh.Status(),
		})
	})
	replicationControl(mux, sh)
	seedControl(mux, st, sh)
	failoverControl(mux, st, sh, log)
	mux.HandleFunc("POST /cut", func(w http.ResponseWriter, r *http.Request) {
		var req CutRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			reply(w, http.StatusBadRequest, apiError{Error: "bad request: " + err.Error(), Code: "usage"})
			return
		}
		infos, err := st.Cut(r.Context(), req.Images)
		if err != nil {
			code, status := "failure", http.StatusInternalServerError
			if errors.Is(err, tracker.ErrNoImage) {
				code, status = "not_found", http.StatusNotFound
			}
			reply(w, status, apiError{Error: err.Error(), Code: code})
			return
		}
		reply(w, http.StatusOK, infos)
	})
	return mux
}

func reply(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

// TuneGOMAXPROCS raises GOMAXPROCS to at least 8 unless the environment sets
// it: FUSE handlers block in syscalls, and more Ps than cores gave 1.2–2× the
// 4 KiB IOPS on a 2-core box (make bench).
func TuneGOMAXPROCS() {
	if os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(max(8, runtime.NumCPU()))
	}
}
