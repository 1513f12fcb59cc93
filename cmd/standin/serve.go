package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"

	"github.com/urfave/cli/v2"

	"github.com/standin/standin/internal/daemon"
	"github.com/standin/standin/internal/netlimit"
)

func serveCommand() *cli.Command {
	return &cli.Command{
		Name:  "serve",
		Usage: "run the replica daemon: receive cycles over mutual TLS, apply them, keep recovery points",
		Description: `Foreground. A self-signed CA and server certificate are created in STORE/pki at the first
start; pair primaries with 'standin pair token'. Give --cert/--key/--client-ca to use
enterprise PKI instead.`,
		Flags: append([]cli.Flag{
			storeFlag,
			&cli.StringFlag{Name: "listen", Value: ":7443", Usage: "HTTPS listen address `HOST:PORT`"},
			&cli.StringFlag{Name: "metrics", Usage: "serve Prometheus metrics on `ADDR` (e.g. 127.0.0.1:9443)"},
			&cli.StringFlag{Name: "cert", Usage: "server certificate `PEM` (enterprise PKI)"},
			&cli.StringFlag{Name: "key", Usage: "server key `PEM` (enterprise PKI)"},
			&cli.StringFlag{Name: "client-ca", Usage: "CA bundle `PEM` that signs primaries' client certificates (enterprise PKI)"},
			&cli.StringFlag{Name: "log-level", Value: "info", Usage: "debug, info, warn or error"},
			&cli.StringFlag{Name: "points-mount", Usage: "expose every recovery point read-only through FUSE at `DIR` (see 'standin points mount')"},
			&cli.StringFlag{Name: "primary-store", Usage: "this host's primary store `DIR`: a failover promotes groups into it (its 'standin mount' daemon must run)"},
		}, append(accessFlags("points-"),
			&cli.DurationFlag{Name: "scrub-interval", Value: daemon.DefaultScrubInterval, Usage: "re-read every recovery point, undo log and prepared promotion copy against their recorded hashes every `DURATION` (0 = never; 'standin points scrub' runs one now)"},
			&cli.StringFlag{Name: "scrub-rate", Value: "50MB/s", Usage: "read at most `RATE` while scrubbing (0 = unlimited)"},
			&cli.BoolFlag{Name: "warm-standby", Usage: "keep a promotion copy of every group in the primary store, brought forward after each apply: a failover (also unplanned) then copies nothing (needs --primary-store; twice the disk space)"},
			&cli.IntFlag{Name: "max-conns", Value: netlimit.Default.MaxConns, Usage: "HTTPS connections served at once (at most half the open-file limit); more wait to be accepted"},
			&cli.IntFlag{Name: "max-conns-per-ip", Value: netlimit.Default.MaxConnsPerIP, Usage: "HTTPS connections one remote IP address may hold; more are closed at once"},
			&cli.DurationFlag{Name: "header-timeout", Value: netlimit.Default.HeaderTimeout, Usage: "time for the TLS handshake and a request's headers"},
			&cli.DurationFlag{Name: "idle-timeout", Value: netlimit.Default.IdleTimeout, Usage: "close keep-alive connections idle this long"},
			&cli.DurationFlag{Name: "body-timeout", Value: netlimit.Default.BodyTimeout, Usage: "a request body must bring 64 KiB within each such window (uploads of any length and speed above ~1 KiB/s pass)"},
			&cli.DurationFlag{Name: "write-timeout", Value: netlimit.Default.WriteTimeout, Usage: "time to write one response"},
		)...),
		OnUsageError: onUsageError,
		Action: func(c *cli.Context) error {
			var lvl slog.Level
			if err := lvl.UnmarshalText([]byte(c.String("log-level"))); err != nil {
				return usageErr("--log-level %q: %v", c.String("log-level"), err)
			}
			log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
			slog.SetDefault(log)
			pointsMount := c.String("points-mount")
			if pointsMount != "" {
				var err error
				if pointsMount, err = absPath(pointsMount); err != nil {
					return err
				}
			}
			pointsAcc, err := accessFrom(c, "points-")
			if err != nil {
				return err
			}
			if c.Bool("warm-standby") && c.String("primary-store") == "" {
				return usageErr("--warm-standby keeps its copies in this host's primary store: give --primary-store DIR")
			}
			for _, f := range []string{"max-conns", "max-conns-per-ip"} {
				if c.Int(f) <= 0 {
					return usageErr("--%s %d: give a positive number", f, c.Int(f))
				}
			}
			if err := positiveDurations(c, "header-timeout", "idle-timeout", "body-timeout", "write-timeout"); err != nil {
				return err
			}
			primaryStore := c.String("primary-store")
			if primaryStore != "" {
				var err error
				if primaryStore, err = absPath(primaryStore); err != nil {
					return err
				}
			}
			scrubRate, err := parseRate(c.String("scrub-rate"))
			if err != nil {
				return usageErr("--scrub-rate: %v", err)
			}
			if c.Duration("scrub-interval") < 0 {
				return usageErr("--scrub-interval must not be negative")
			}
			return daemon.RunReplica(context.Background(), daemon.ReplicaOptions{
				ScrubInterval: c.Duration("scrub-interval"), ScrubRate: scrubRate,
				Store: c.String("store"), Listen: c.String("listen"), Metrics: c.String("metrics"), Version: version,
				CertFile: c.String("cert"), KeyFile: c.String("key"), ClientCAFile: c.String("client-ca"), Logger: log,
				PointsMount: pointsMount, PointsAccess: pointsAcc, PrimaryStore: primaryStore, WarmStandby: c.Bool("warm-standby"),
				Limits: netlimit.Limits{MaxConns: c.Int("max-conns"), MaxConnsPerIP: c.Int("max-conns-per-ip"),
					HeaderTimeout: c.Duration("header-timeout"), IdleTimeout: c.Duration("idle-timeout"),
					BodyTimeout: c.Duration("body-timeout"), WriteTimeout: c.Duration("write-timeout")},
			}, func() {
				fmt.Printf("standin: replica %s listening on %s (pid %d)\n", c.String("store"), c.String("listen"), os.Getpid())
			})
		},
	}
}
