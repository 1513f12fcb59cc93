package main

import (
	"fmt"
	"path"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/standin/standin/internal/daemon"
	"github.com/standin/standin/internal/exitcode"
	"github.com/standin/standin/internal/units"
	"github.com/standin/standin/shipper"
)

func replicateCommand() *cli.Command {
	groupSel := []cli.Flag{
		storeFlag,
		&cli.StringFlag{Name: "group", Usage: "group `NAME` or glob (e.g. 'web*')"},
		&cli.BoolFlag{Name: "all", Usage: "every group"},
	}
	simple := func(name, usage, path string, body func(string) daemon.ReplicateRequest) *cli.Command {
		return &cli.Command{
			Name: name, Usage: usage, Flags: groupSel, OnUsageError: onUsageError,
			Action: func(c *cli.Context) error {
				names, err := selectGroups(c)
				if err != nil {
					return err
				}
				cl := daemon.NewClient(c.String("store"))
				for _, n := range names {
					if err := cl.Call(c.Context, path, body(n), nil); err != nil {
						return fmt.Errorf("group %s: %w", n, err)
					}
					fmt.Printf("%s: %s\n", n, name)
				}
				return nil
			},
		}
	}
	return &cli.Command{
		Name:  "replicate",
		Usage: "replication relationships on the primary (needs its daemon)",
		Subcommands: []*cli.Command{
			{
				Name:  "enable",
				Usage: "replicate a group of images (the disks of one VM) to a paired replica",
				Flags: append([]cli.Flag{
					storeFlag,
					&cli.StringFlag{Name: "group", Required: true, Usage: "group `NAME` (the VM)"},
					&cli.StringFlag{Name: "images", Required: true, Usage: "comma-separated image `NAMES` relative to the mount"},
					&cli.StringFlag{Name: "exclude", Usage: "comma-separated images to leave out (e.g. a swap disk)"},
					&cli.StringFlag{Name: "replica", Required: true, Usage: "replica `HOST:PORT` (paired with 'standin pair join')"},
					&cli.DurationFlag{Name: "interval", Value: 5 * time.Minute, Usage: "cycle interval: 30s, 5m or 15m"},
					&cli.IntFlag{Name: "points", Value: 24, Usage: "recovery points to keep besides the latest"},
					&cli.DurationFlag{Name: "point-every", Value: time.Hour, Usage: "spacing of the kept points"},
					&cli.DurationFlag{Name: "any-point-window", Usage: "also keep every cycle's point younger than this"},
					&cli.StringFlag{Name: "bandwidth", Usage: "limit, e.g. 8Mbit (default unlimited)"},
					&cli.StringFlag{Name: "bandwidth-schedule", Usage: `time-of-day limits, e.g. "08:00-18:00=2Mbit"`},
					&cli.StringFlag{Name: "initial", Value: "network", Usage: "initial replication: network (the first cycle carries the whole image) or seed (then 'standin seed export')"},
					&cli.StringFlag{Name: "compress", Value: "zstd", Usage: "cycle data on the wire: zstd or none"},
				}, appConsistentFlags()...),
				OnUsageError: onUsageError,
				Action: func(c *cli.Context) error {
					if err := positiveDurations(c, "interval", "point-every", "freeze-timeout"); err != nil {
						return err
					}
					bw, err := shipper.ParseBandwidth(c.String("bandwidth"))
					if err != nil {
						return usageErr("--bandwidth: %v", err)
					}
					sched, err := shipper.ParseSchedule(c.String("bandwidth-schedule"))
					if err != nil {
						return usageErr("--bandwidth-schedule: %v", err)
					}
					excl := map[string]bool{}
					for _, e := range splitList(c.String("exclude")) {
						excl[e] = true
					}
					var imgs []string
					for _, im := range splitList(c.String("images")) {
						if !excl[im] {
							imgs = append(imgs, im)
						}
					}
					g := shipper.Group{Name: c.String("group"), Images: imgs, Replica: c.String("replica"),
						Interval: c.Duration("interval"), Points: c.Int("points"), PointEvery: c.Duration("point-every"),
						AnyPointWindow: c.Duration("any-point-window"), Bandwidth: bw, Schedule: sched, Initial: c.String("initial"),
						Compress: c.String("compress")}
					g.AppConsistent = appConsistentFromFlags(c)
					if err := g.Validate(); err != nil {
						return exitcode.With(exitcode.Usage, err)
					}
					if err := daemon.NewClient(c.String("store")).Call(c.Context, "/replicate/enable", daemon.ReplicateRequest{Group: g}, nil); err != nil {
						return err
					}
					fmt.Printf("%s: replicating %s to %s every %s\n", g.Name, strings.Join(g.Images, ","), g.Replica, g.Interval)
					return nil
				},
			},
			simple("disable", "stop replicating a group (unshipped cycle files stay on disk)", "/replicate/disable",
				func(n string) daemon.ReplicateRequest { return daemon.ReplicateRequest{Name: n} }),
			simple("pause", "pause a group (changes keep being tracked; one catch-up cycle ships on resume)", "/replicate/pause",
				func(n string) daemon.ReplicateRequest { return daemon.ReplicateRequest{Name: n, Paused: true} }),
			simple("resume", "resume a paused group", "/replicate/pause",
				func(n string) daemon.ReplicateRequest { return daemon.ReplicateRequest{Name: n, Paused: false} }),
			{
				Name:  "now",
				Usage: "cut and ship at once; with --wait return when the replica has applied it",
				Flags: append(append([]cli.Flag{}, groupSel...), &cli.BoolFlag{Name: "wait", Usage: "wait until applied (non-zero exit if it could not be)"},
					&cli.DurationFlag{Name: "timeout", Value: 30 * time.Minute, Usage: "give up waiting after this"},
					&cli.BoolFlag{Name: "app-consistent", Usage: "freeze, cut, thaw (the group's --freeze-cmd/--thaw-cmd); with --wait a crash-consistent result is an error"}),
				OnUsageError: onUsageError,
				Action: func(c *cli.Context) error {
					names, err := selectGroups(c)
					if err != nil {
						return err
					}
					ctx, cancel := contextWithTimeout(c, c.Duration("timeout"))
					defer cancel()
					cl := daemon.NewClient(c.String("store"))
					for _, n := range names {
						if err := cl.Call(ctx, "/replicate/now", daemon.ReplicateRequest{Name: n, Wait: c.Bool("wait"), AppConsistent: c.Bool("app-consistent")}, nil); err != nil {
							return fmt.Errorf("group %s: %w", n, err)
						}
						if c.Bool("wait") && c.Bool("app-consistent") {
							fmt.Printf("%s: replicated an app-consistent point\n", n)
						} else if c.Bool("wait") {
							fmt.Printf("%s: replicated\n", n)
						} else {
							fmt.Printf("%s: cut requested\n", n)
						}
					}
					return nil
				},
			},
			{
				Name:  "resync",
				Usage: "hash-compare resync: ship only the blocks that differ on the replica (when tracking cannot say what changed)",
				Flags: append(append([]cli.Flag{}, groupSel...),
					&cli.StringFlag{Name: "window", Usage: "run it only in this daily time window, e.g. 18:30-06:00 (local time; default: the next round)"}),
				OnUsageError: onUsageError,
				Action: func(c *cli.Context) error {
					w := c.String("window")
					if w != "" {
						if _, _, err := shipper.ParseWindow(w); err != nil {
							return usageErr("--window: %v", err)
						}
					}
					names, err := selectGroups(c)
					if err != nil {
						return err
					}
					cl := daemon.NewClient(c.String("store"))
					for _, n := range names {
						if err := cl.Call(c.Context, "/replicate/resync", daemon.ReplicateRequest{Name: n, Window: w}, nil); err != nil {
							return fmt.Errorf("group %s: %w", n, err)
						}
						if w == "" {
							fmt.Printf("%s: resync requested (next round)\n", n)
						} else {
							fmt.Printf("%s: resync scheduled in the window %s\n", n, w)
						}
					}
					return nil
				},
			},
			extendCommand(),
			repairCommand(),
			{
				Name:         "list",
				Usage:        "list replication groups with their health",
				Flags:        []cli.Flag{storeFlag, jsonFlag},
				OnUsageError: onUsageError,
				Action: func(c *cli.Context) error {
					var gs []shipper.GroupStatus
					if err := daemon.NewClient(c.String("store")).Call(c.Context, "/replicate", nil, &gs); err != nil {
						return err
					}
					if c.Bool("json") {
						return printJSON(gs)
					}
					printGroups(gs)
					return nil
				},
			},
		},
	}
}

func printGroups(gs []shipper.GroupStatus) {
	w := table()
	fmt.Fprintln(w, "GROUP\tREPLICA\tIMAGES\tINTERVAL\tHEALTH\tLAG\tLAST POINT\tSENT\tPENDING\tAPP-CONSISTENT")
	for _, g := range gs {
		health := g.Health
		if len(g.Reasons) > 0 {
			health += ": " + strings.Join(g.Reasons, "; ")
		}
		if g.Resync != "" {
			health += " (" + g.Resync + ")"
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", g.Group, g.Replica, strings.Join(g.Images, ","), g.Interval,
			health, g.Lag, g.LastPoint, units.Bytes(g.BytesSent), units.Bytes(g.PendingBytes), appColumn(g))
	}
	w.Flush()
}

// selectGroups resolves --group NAME|GLOB or --all against the daemon's groups.
func selectGroups(c *cli.Context) ([]string, error) {
	pat, all := c.String("group"), c.Bool("all")
	if (pat == "") == !all {
		return nil, usageErr("give --group NAME (or a glob) or --all")
	}
	var gs []shipper.Group
	if err := daemon.NewClient(c.String("store")).Call(c.Context, "/replicate/config", nil, &gs); err != nil {
		return nil, err
	}
	var out []string
	for _, g := range gs {
		if ok, _ := path.Match(pat, g.Name); all || ok {
			out = append(out, g.Name)
		}
	}
	if len(out) == 0 {
		return nil, exitcode.With(exitcode.NotFound, fmt.Errorf("no replication group matches %q", pat))
	}
	return out, nil
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}
