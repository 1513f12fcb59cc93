package main

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/standin/standin/internal/daemon"
	"github.com/standin/standin/internal/units"
	"github.com/standin/standin/shipper"
)

// extendCommand is 'standin replicate extend': extended replication, run by
// the replica daemon of the middle host.
func extendCommand() *cli.Command {
	// Not Required: urfave/cli checks a parent's required flags before it
	// dispatches to a subcommand ('extend list').
	store := &cli.StringFlag{Name: "store", Usage: "replica store `DIR` (its daemon forwards)", EnvVars: []string{"STANDIN_STORE"}}
	needStore := func(c *cli.Context) error {
		if c.String("store") == "" {
			return usageErr("give --store DIR (the replica store whose daemon forwards)")
		}
		return nil
	}
	return &cli.Command{
		Name:      "extend",
		Usage:     "extended replication: forward a group this replica receives onward to a third host (on the replica; needs its daemon)",
		UsageText: "standin replicate extend --store RSTORE --group VM --to HOST:PORT [--token-file FILE|-] [--interval 15m] [--bandwidth 8Mbit] [--points 24 --point-every 1h] [--any-point-window D]",
		Flags: append([]cli.Flag{
			store,
			&cli.StringFlag{Name: "group", Usage: "group `NAME` (as the primary replicates it here)"},
			&cli.StringFlag{Name: "to", Usage: "the third host's replica daemon `HOST:PORT`"},
		}, append(tokenFlags("pairing `TOKEN` from 'standin pair token' on the third host (not needed when paired already)"),
			&cli.DurationFlag{Name: "interval", Value: 15 * time.Minute, Usage: "forward interval (at least 30s and at least the interval the group arrives at)"},
			&cli.StringFlag{Name: "bandwidth", Usage: "limit, e.g. 8Mbit (default unlimited)"},
			&cli.IntFlag{Name: "points", Value: 24, Usage: "recovery points the third host keeps besides the latest"},
			&cli.DurationFlag{Name: "point-every", Value: time.Hour, Usage: "spacing of the kept points"},
			&cli.DurationFlag{Name: "any-point-window", Usage: "also keep every forwarded point younger than this"},
		)...),
		OnUsageError: onUsageError,
		Action: func(c *cli.Context) error {
			if err := needStore(c); err != nil {
				return err
			}
			if c.Args().Present() {
				return usageErr("unknown subcommand %q (see 'standin replicate extend --help')", c.Args().First())
			}
			if c.String("group") == "" || c.String("to") == "" {
				return usageErr("give --group NAME and --to HOST:PORT")
			}
			bw, err := shipper.ParseBandwidth(c.String("bandwidth"))
			if err != nil {
				return usageErr("--bandwidth: %v", err)
			}
			if err := positiveDurations(c, "interval", "point-every"); err != nil {
				return err
			}
			token, err := pairToken(c, os.Stdin)
			if err != nil {
				return err
			}
			req := daemon.ForwardRequest{Group: c.String("group"), To: c.String("to"), Token: token, Interval: c.Duration("interval"),
				Bandwidth: bw, Points: c.Int("points"), PointEvery: c.Duration("point-every"), AnyPointWindow: c.Duration("any-point-window")}
			var e daemon.Forward
			if err := daemon.NewClient(c.String("store")).Call(c.Context, "/forward/enable", req, &e); err != nil {
				return err
			}
			fmt.Printf("%s: forwarding to %s every %s\n", e.Group, e.To, e.Interval)
			return nil
		},
		Subcommands: []*cli.Command{
			{
				Name:         "list",
				Usage:        "list forwards with their health",
				Flags:        []cli.Flag{storeFlag, jsonFlag},
				OnUsageError: onUsageError,
				Action: func(c *cli.Context) error {
					var fs []daemon.ForwardStatus
					if err := daemon.NewClient(c.String("store")).Call(c.Context, "/forward", nil, &fs); err != nil {
						return err
					}
					if c.Bool("json") {
						return printJSON(fs)
					}
					w := table()
					fmt.Fprintln(w, "GROUP\tTO\tINTERVAL\tHEALTH\tLAG\tFORWARDED\tLAST SENT\tSENT")
					for _, f := range fs {
						health := f.Health
						if len(f.Reasons) > 0 {
							health += ": " + strings.Join(f.Reasons, "; ")
						}
						fwd := "-"
						if f.LastPoint != "" {
							fwd = fmt.Sprintf("point %s → %s", f.LastPoint, f.TargetPoint)
							if f.LastBase {
								fwd += " (base)"
							}
						}
						fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", f.Group, f.To, f.Interval, health, f.Lag, fwd,
							units.Bytes(f.LastBytes), units.Bytes(f.BytesSent))
					}
					return w.Flush()
				},
			},
			{
				Name:  "now",
				Usage: "forward the group's latest point at once; with --wait return when the third host committed it",
				Flags: []cli.Flag{storeFlag, jsonFlag,
					&cli.StringFlag{Name: "group", Required: true, Usage: "group `NAME`"},
					&cli.StringFlag{Name: "to", Usage: "only to this `HOST:PORT` (default every target of the group)"},
					&cli.BoolFlag{Name: "wait", Usage: "wait until committed (non-zero exit if it could not be)"},
					&cli.DurationFlag{Name: "timeout", Value: 30 * time.Minute, Usage: "give up waiting after this"}},
				OnUsageError: onUsageError,
				Action: func(c *cli.Context) error {
					ctx, cancel := contextWithTimeout(c, c.Duration("timeout"))
					defer cancel()
					var out []daemon.ForwardNowResult
					req := daemon.ForwardRequest{Group: c.String("group"), To: c.String("to"), Wait: c.Bool("wait")}
					if err := daemon.NewClient(c.String("store")).Call(ctx, "/forward/now", req, &out); err != nil {
						return err
					}
					if c.Bool("json") {
						if err := printJSON(out); err != nil {
							return err
						}
					}
					var errs []error
					for _, r := range out {
						switch {
						case r.Error != "":
							errs = append(errs, fmt.Errorf("group %s to %s: %s", r.Group, r.To, r.Error))
						case c.Bool("json"):
						case !req.Wait:
							fmt.Printf("%s: forward to %s requested\n", r.Group, r.To)
						case r.UpToDate:
							fmt.Printf("%s: %s holds point %s already (its point %s)\n", r.Group, r.To, r.Point, r.TargetPoint)
						default:
							kind := "delta"
							if r.Base {
								kind = "base, thinned"
							}
							fmt.Printf("%s: forwarded point %s to %s as its point %s (%s, %s sent)\n", r.Group, r.Point, r.To, r.TargetPoint, kind, units.Bytes(r.Bytes))
						}
					}
					return errors.Join(errs...)
				},
			},
			{
				Name:  "disable",
				Usage: "stop forwarding a group to a host (releases the pinned point, removes the relay directory and its credentials)",
				Flags: []cli.Flag{storeFlag,
					&cli.StringFlag{Name: "group", Required: true, Usage: "group `NAME`"},
					&cli.StringFlag{Name: "to", Required: true, Usage: "the third host `HOST:PORT`"}},
				OnUsageError: onUsageError,
				Action: func(c *cli.Context) error {
					req := daemon.ForwardRequest{Group: c.String("group"), To: c.String("to")}
					if err := daemon.NewClient(c.String("store")).Call(c.Context, "/forward/disable", req, nil); err != nil {
						return err
					}
					fmt.Printf("%s: no longer forwarded to %s\n", req.Group, req.To)
					return nil
				},
			},
		},
	}
}
