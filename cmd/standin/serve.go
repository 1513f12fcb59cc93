package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"

	"github.com/urfave/cli/v2"

	"github.com/standin/standin/internal/daemon"
)

func serveCommand() *cli.Command {
	return &cli.Command{
		Name:  "serve",
		Usage: "run the replica daemon: receive cycles over mutual TLS, apply them, keep recovery points",
		Description: `Foreground. A self-signed CA and server certificate are created in STORE/pki at the first
start; pair primaries with 'standin pair token'. Give --cert/--key/--client-ca to use
enterprise PKI instead.`,
		Flags: []cli.Flag{
			storeFlag,
			&cli.StringFlag{Name: "listen", Value: ":7443", Usage: "HTTPS listen address `HOST:PORT`"},
			&cli.StringFlag{Name: "metrics", Usage: "serve Prometheus metrics on `ADDR` (e.g. 127.0.0.1:9443)"},
			&cli.StringFlag{Name: "cert", Usage: "server certificate `PEM` (enterprise PKI)"},
			&cli.StringFlag{Name: "key", Usage: "server key `PEM` (enterprise PKI)"},
			&cli.StringFlag{Name: "client-ca", Usage: "CA bundle `PEM` that signs primaries' client certificates (enterprise PKI)"},
			&cli.StringFlag{Name: "log-level", Value: "info", Usage: "debug, info, warn or error"},
			&cli.StringFlag{Name: "points-mount", Usage: "expose every recovery point read-only through FUSE at `DIR` (see 'standin points mount')"},
			&cli.StringFlag{Name: "primary-store", Usage: "this host's primary store `DIR`: a failover promotes groups into it (its 'standin mount' daemon must run)"},
			&cli.DurationFlag{Name: "scrub-interval", Value: daemon.DefaultScrubInterval, Usage: "re-read every recovery point, undo log and prepared promotion copy against their recorded hashes every `DURATION` (0 = never; 'standin points scrub' runs one now)"},
			&cli.StringFlag{Name: "scrub-rate", Value: "50MB/s", Usage: "read at most `RATE` while scrubbing (0 = unlimited)"},
			&cli.BoolFlag{Name: "warm-standby", Usage: "keep a promotion copy of every group in the primary store, brought forward after each apply: a failover (also unplanned) then copies nothing (needs --primary-store; twice the disk space)"},
		},
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
			if c.Bool("warm-standby") && c.String("primary-store") == "" {
				return usageErr("--warm-standby keeps its copies in this host's primary store: give --primary-store DIR")
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
				PointsMount: pointsMount, PrimaryStore: primaryStore, WarmStandby: c.Bool("warm-standby"),
			}, func() {
				fmt.Printf("standin: replica %s listening on %s (pid %d)\n", c.String("store"), c.String("listen"), os.Getpid())
			})
		},
	}
}
