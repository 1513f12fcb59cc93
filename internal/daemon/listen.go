package daemon

import (
	"log/slog"
	"net"
	"net/http"
	"time"

	"golang.org/x/sys/unix"

	"github.com/standin/standin/internal/netlimit"
)

// Listener limits of the daemons (see internal/netlimit). The replica's
// HTTPS listener takes ReplicaOptions.Limits (standin serve flags); the
// metrics listeners and the control sockets use fixed ones below.

// effectiveLimits fills defaults and keeps the connection cap under half the
// process's file descriptor limit, so that images, undo logs and the store
// always have descriptors left.
func effectiveLimits(l netlimit.Limits, log *slog.Logger) netlimit.Limits {
	l = l.WithDefaults()
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err == nil && rl.Cur > 0 && rl.Cur < 1<<30 {
		if room := max(8, int(rl.Cur/2)); l.MaxConns > room {
			log.Warn("connection limit lowered to half the open-file limit", "max_conns", room, "asked", l.MaxConns, "nofile", rl.Cur)
			l.MaxConns = room
		}
	}
	l.MaxConnsPerIP = min(l.MaxConnsPerIP, l.MaxConns)
	return l
}

// metricsLimits: a scrape is one short request; a few scrapers at most.
var metricsLimits = netlimit.Limits{MaxConns: 16, MaxConnsPerIP: 4, HeaderTimeout: 10 * time.Second,
	IdleTimeout: time.Minute, BodyTimeout: 10 * time.Second, WriteTimeout: 30 * time.Second}

// metricsServer serves h on ln with the metrics limits: every response is
// short, so a whole-request read and write timeout applies too.
func metricsServer(ln net.Listener, h http.Handler) (*http.Server, net.Listener) {
	s := metricsLimits.Server(h)
	s.ReadTimeout = metricsLimits.HeaderTimeout
	s.WriteTimeout = metricsLimits.WriteTimeout
	return s, metricsLimits.Listener(ln)
}

// controlServer is the HTTP server of a control socket (a Unix socket only
// root can reach). Requests must arrive promptly; responses are not bounded,
// since some (replicate now --wait, seed import) run for a long time.
func controlServer(h http.Handler) *http.Server {
	return &http.Server{Handler: h, ReadHeaderTimeout: 30 * time.Second, IdleTimeout: 2 * time.Minute}
}
