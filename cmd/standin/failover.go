package main

import (
	"errors"
	"fmt"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/standin/standin/internal/daemon"
	"github.com/standin/standin/internal/units"
)

func failoverCommand() *cli.Command {
	// The flags of 'failover test' are not Required: urfave/cli would demand
	// them also for its subcommands (list, stop).
	store := &cli.StringFlag{Name: "store", Usage: "replica store directory `DIR`", EnvVars: []string{"STANDIN_STORE"}}
	groups := &cli.StringFlag{Name: "group", Usage: "group `NAMES` (comma-separated)"}
	all := &cli.BoolFlag{Name: "all", Usage: "every group"}
	return &cli.Command{
		Name:  "failover",
		Usage: "test, planned and unplanned failover, failback (needs the daemons)",
		Subcommands: append(failoverRoleCommands(), []*cli.Command{
			{
				Name:  "test",
				Usage: "start a test failover: writable copy-on-write images over a recovery point, replication continues",
				Description: `Creates, per group, writable images over the chosen point in O(1) (nothing is copied:
reads fall through to the point, writes go to a sparse delta in RSTORE/failover-tests/ID) and
exposes them through FUSE at DIR/IMAGE (default RSTORE/failover-tests/ID/mnt; with several
groups DIR/GROUP/IMAGE). The point is pinned against retention until the test is stopped.
Several test failovers (of different points, same or different groups) may exist at once.
--point takes a point ID, latest, or a time: the newest point cut at or before it.
--boot-check runs CMD with sh -c once the images are mounted, with STANDIN_TEST_IMAGES (the
image paths, space-separated), STANDIN_TEST_GROUP, STANDIN_TEST_POINT, STANDIN_TEST_POINT_TIME,
STANDIN_TEST_ID and STANDIN_TEST_MOUNT in its environment; the result (exit status, time,
output tail) is recorded and shown by 'failover test list'; a failed check exits 1 and keeps
the test failover for inspection. Test failovers survive a daemon restart (re-mounted).`,
				Flags: append([]cli.Flag{store, groups, all, jsonFlag,
					&cli.StringFlag{Name: "point", Value: "latest", Usage: "point `ID`, latest, or a TIME (RFC 3339 or 2006-01-02 15:04:05)"},
					&cli.StringFlag{Name: "mount", Usage: "expose the images in `DIR` (default under RSTORE)"},
					&cli.StringFlag{Name: "boot-check", Usage: "run `CMD` (sh -c) against the mounted test images and record pass/fail"},
					&cli.DurationFlag{Name: "boot-timeout", Value: 10 * time.Minute, Usage: "kill the boot check after this long (fails)"},
					&cli.BoolFlag{Name: "dry-run", Usage: "show the plan (point, images, mount directories) and change nothing"},
				}, accessFlags("")...),
				OnUsageError: onUsageError,
				Action:       failoverTestAction,
				Subcommands: []*cli.Command{
					{
						Name:         "list",
						Usage:        "list test failovers with their state and boot check result",
						Flags:        []cli.Flag{storeFlag, jsonFlag, &cli.StringFlag{Name: "group", Usage: "only group `NAME`"}},
						OnUsageError: onUsageError,
						Action:       failoverTestListAction,
					},
					{
						Name:  "stop",
						Usage: "stop test failovers: unmount, unpin the point, delete every file",
						Flags: []cli.Flag{storeFlag,
							&cli.StringFlag{Name: "group", Usage: "every test failover of group `NAMES` (comma-separated)"},
							&cli.BoolFlag{Name: "all", Usage: "every test failover"},
							&cli.StringFlag{Name: "id", Usage: "only test failover `ID` (from 'failover test list')"},
							&cli.BoolFlag{Name: "force", Usage: "detach a mount still in use (open files, loop devices) lazily instead of refusing"},
						},
						OnUsageError: onUsageError,
						Action:       failoverTestStopAction,
					},
				},
			},
		}...),
	}
}

func failoverTestAction(c *cli.Context) error {
	if c.NArg() > 0 {
		return usageErr("failover test: unexpected argument %q (subcommands: list, stop)", c.Args().First())
	}
	if c.String("store") == "" {
		return usageErr("failover test: --store is required")
	}
	req := daemon.FailoverTestRequest{Groups: splitList(c.String("group")), All: c.Bool("all"), Point: c.String("point"),
		BootCheck: c.String("boot-check"), BootTimeout: c.Duration("boot-timeout"), DryRun: c.Bool("dry-run")}
	if len(req.Groups) == 0 && !req.All {
		return usageErr("failover test: name --group VM[,VM...] or --all")
	}
	if err := positiveDurations(c, "boot-timeout"); err != nil {
		return err
	}
	var err error
	if req.Access, err = accessFrom(c, ""); err != nil {
		return err
	}
	if len(req.Groups) > 0 && req.All {
		return usageErr("failover test: --group and --all exclude each other")
	}
	if m := c.String("mount"); m != "" {
		var err error
		if req.Mount, err = absPath(m); err != nil {
			return err
		}
	}
	t0 := time.Now()
	var out []daemon.FailoverTest
	if err := daemon.NewClient(c.String("store")).Call(c.Context, "/failover/test", req, &out); err != nil {
		return err
	}
	elapsed := time.Since(t0)
	if c.Bool("json") {
		if err := printJSON(out); err != nil {
			return err
		}
	} else {
		if req.DryRun {
			fmt.Println("plan (dry run: nothing was changed):")
		}
		for _, ft := range out {
			when := ft.PointTime.UTC().Format(time.RFC3339)
			if req.DryRun {
				fmt.Printf("%s: test failover of point %s (%s), images in %s\n", ft.Group, ft.Point, when, ft.Mount)
			} else {
				fmt.Printf("%s: test failover %s of point %s (%s) mounted at %s in %.3f s\n", ft.Group, ft.ID, ft.Point, when, ft.Mount, ft.CreateSeconds)
			}
			for i, im := range ft.Images {
				fmt.Printf("  %s (%s)\n", ft.Paths[i], units.Bytes(im.Size))
			}
			if bc := ft.BootCheck; bc != nil {
				if req.DryRun {
					fmt.Printf("  boot check: sh -c %q\n", bc.Command)
				} else {
					fmt.Printf("  boot check: %s\n", bootCheckSummary(bc.Passed, bc.ExitCode, bc.TimedOut, bc.Seconds))
					if !bc.Passed && bc.Output != "" {
						fmt.Printf("  output (tail):\n%s\n", indent(bc.Output, "    "))
					}
				}
			}
		}
		if !req.DryRun {
			fmt.Printf("(%d test failover(s) in %.3f s; stop with 'standin failover test stop --store %s --group GROUP')\n", len(out), elapsed.Seconds(), c.String("store"))
		}
	}
	var failed []string
	for _, ft := range out {
		if ft.BootCheck != nil && !req.DryRun && !ft.BootCheck.Passed {
			failed = append(failed, ft.ID)
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("boot check failed for %s (the test failover is kept for inspection)", strings.Join(failed, ", "))
	}
	return nil
}

func bootCheckSummary(passed bool, code int, timedOut bool, secs float64) string {
	switch {
	case passed:
		return fmt.Sprintf("PASSED (exit 0, %.1f s)", secs)
	case timedOut:
		return fmt.Sprintf("FAILED (timed out after %.1f s)", secs)
	default:
		return fmt.Sprintf("FAILED (exit %d, %.1f s)", code, secs)
	}
}

func indent(s, pre string) string {
	s = strings.TrimRight(s, "\n")
	return pre + strings.ReplaceAll(s, "\n", "\n"+pre)
}

func failoverTestListAction(c *cli.Context) error {
	path := "/failover/tests"
	if g := c.String("group"); g != "" {
		path += "?group=" + url.QueryEscape(g)
	}
	var out []daemon.FailoverTest
	if err := daemon.NewClient(c.String("store")).Call(c.Context, path, nil, &out); err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(out)
	}
	w := table()
	fmt.Fprintln(w, "ID\tGROUP\tPOINT\tPOINT TIME\tSTATE\tWRITTEN\tBOOT CHECK\tMOUNT")
	for _, ft := range out {
		bc := "-"
		if b := ft.BootCheck; b != nil {
			bc = bootCheckSummary(b.Passed, b.ExitCode, b.TimedOut, b.Seconds) + " at " + b.Started.Local().Format(time.DateTime)
		}
		state := ft.State
		if ft.Reason != "" {
			state += " (" + ft.Reason + ")"
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", ft.ID, ft.Group, ft.Point, ft.PointTime.Local().Format(time.DateTime),
			state, units.Bytes(ft.Written), bc, ft.Mount)
	}
	if err := w.Flush(); err != nil {
		return err
	}
	if len(out) == 0 {
		fmt.Fprintln(os.Stderr, "no test failover")
	}
	return nil
}

func failoverTestStopAction(c *cli.Context) error {
	req := daemon.FailoverStopRequest{Groups: splitList(c.String("group")), All: c.Bool("all"), ID: c.String("id"), Force: c.Bool("force")}
	if len(req.Groups) == 0 && !req.All && req.ID == "" {
		return usageErr("failover test stop: name --group VM[,VM...], --id ID or --all")
	}
	if req.All && (len(req.Groups) > 0 || req.ID != "") {
		return usageErr("failover test stop: --all excludes --group and --id")
	}
	var done []string
	err := daemon.NewClient(c.String("store")).Call(c.Context, "/failover/test/stop", req, &done)
	for _, id := range done {
		fmt.Printf("stopped test failover %s\n", id)
	}
	if err != nil {
		return err
	}
	if len(done) == 0 {
		return errors.New("no test failover was stopped")
	}
	return nil
}
