package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/urfave/cli/v2"

	"github.com/standin/standin/fusefs"
	"github.com/standin/standin/internal/daemon"
)

func debugCommand() *cli.Command {
	return &cli.Command{
		Name:   "debug",
		Usage:  "tools for benchmarks and diagnosis",
		Hidden: true,
		Subcommands: []*cli.Command{
			{
				Name:         "loopback",
				Usage:        "serve DIR at MOUNTPOINT with a plain, untracked go-fuse loopback tuned like 'standin mount' (benchmark baseline)",
				ArgsUsage:    "DIR MOUNTPOINT",
				OnUsageError: onUsageError,
				Action: func(c *cli.Context) error {
					if c.NArg() != 2 {
						return usageErr("debug loopback: want DIR MOUNTPOINT")
					}
					daemon.TuneGOMAXPROCS() // the same as 'standin mount', so the two compare fairly
					srv, err := fusefs.MountLoopback(c.Args().Get(0), c.Args().Get(1))
					if err != nil {
						return err
					}
					fmt.Printf("standin: loopback %s at %s (pid %d)\n", c.Args().Get(0), c.Args().Get(1), os.Getpid())
					sig := make(chan os.Signal, 1)
					signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
					done := make(chan struct{})
					go func() { srv.Wait(); close(done) }()
					select {
					case <-sig:
						srv.Unmount()
						<-done
					case <-done:
					}
					return nil
				},
			},
		},
	}
}
