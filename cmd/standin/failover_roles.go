package main

import (
	"fmt"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/standin/standin/internal/daemon"
	"github.com/standin/standin/internal/units"
)

// Planned and unplanned failover and failback (docs/design.md, Failover).
func failoverRoleCommands() []*cli.Command {
	groups := &cli.StringFlag{Name: "group", Usage: "group `NAMES` (comma-separated)"}
	all := &cli.BoolFlag{Name: "all", Usage: "every group"}
	dry := &cli.BoolFlag{Name: "dry-run", Usage: "show the plan and change nothing"}
	pstore := &cli.StringFlag{Name: "store", Usage: "this host's primary store `DIR` (its mount daemon must run)", Required: true, EnvVars: []string{"STANDIN_STORE"}}
	rstore := &cli.StringFlag{Name: "replica-store", Usage: "this host's replica store `DIR` (its 'standin serve' daemon must run): it receives the reverse direction", EnvVars: []string{"STANDIN_REPLICA_STORE"}}
	raddr := &cli.StringFlag{Name: "replica-addr", Usage: "`HOST:PORT` of this host's replica store as the other host reaches it (default: its listen address)"}
	force := &cli.BoolFlag{Name: "force", Usage: "fence images that are still open for writing (the VM's writes then fail with EROFS)"}
	return []*cli.Command{
		{
			Name:  "planned",
			Usage: "on the primary: hand the groups over to their replica (both hosts up), then replicate back without a full copy",
			Description: `Fences the groups' images (refused while they are open for writing, unless --force), ships
a final cycle, proves the replica equal by BLAKE3 roots, promotes the replica's copy to a tracked
primary on the replica host (its 'standin serve --primary-store' and 'standin mount' must run),
and moves this host's images into its replica store (--replica-store), which the new primary
replicates to from the same point on: nothing is copied over the network. Recovery points on
both hosts are kept. Repeat the command after an interruption: every step is idempotent.`,
			Flags:        []cli.Flag{pstore, rstore, raddr, groups, all, force, dry, jsonFlag},
			OnUsageError: onUsageError,
			Action:       func(c *cli.Context) error { return failoverRoleAction(c, "planned") },
		},
		{
			Name:  "unplanned",
			Usage: "on the replica: the primary is gone — promote a recovery point to a tracked primary",
			Description: `Marks the groups failed over (their old primary is refused from now on, so a stale primary
that comes back cannot overwrite anything), materialises the chosen point (--point: ID, latest or
a time) into this host's primary store (--primary-store, or the daemon's) and tracks the images
there: start the VM from this host's mount. When the old primary is back, run 'standin failover
reverse' on it: only the blocks that differ travel.`,
			Flags: []cli.Flag{
				&cli.StringFlag{Name: "store", Usage: "replica store `DIR` (its daemon must run)", Required: true},
				&cli.StringFlag{Name: "primary-store", Usage: "this host's primary store `DIR` (default: the daemon's --primary-store)"},
				&cli.StringFlag{Name: "point", Value: "latest", Usage: "point `ID`, latest, or a TIME"},
				groups, all, dry, jsonFlag},
			OnUsageError: onUsageError,
			Action:       func(c *cli.Context) error { return failoverRoleAction(c, "unplanned") },
		},
		{
			Name:  "reverse",
			Usage: "on the old primary after an unplanned failover: become the replica of the new primary (failback, no full copy)",
			Description: `Fences this host's images of the groups, moves them into this host's replica store as they
are (what only this host had stays recoverable there as a point) and asks the new primary to
replicate back with a hash-compare base: only blocks that differ travel. Then, to move the VM
back, run 'standin failover planned' on the new primary.`,
			Flags:        []cli.Flag{pstore, rstore, raddr, groups, all, force, dry, jsonFlag},
			OnUsageError: onUsageError,
			Action:       func(c *cli.Context) error { return failoverRoleAction(c, "reverse") },
		},
	}
}

func failoverRoleAction(c *cli.Context, kind string) error {
	if c.NArg() > 0 {
		return usageErr("failover %s: unexpected argument %q", kind, c.Args().First())
	}
	gs, all := splitList(c.String("group")), c.Bool("all")
	if len(gs) == 0 && !all {
		return usageErr("failover %s: name --group VM[,VM...] or --all", kind)
	}
	if len(gs) > 0 && all {
		return usageErr("failover %s: --group and --all exclude each other", kind)
	}
	var out []daemon.FailoverResult
	var err error
	if kind == "unplanned" {
		req := daemon.UnplannedRequest{Groups: gs, All: all, Point: c.String("point"), DryRun: c.Bool("dry-run")}
		if p := c.String("primary-store"); p != "" {
			if req.PrimaryStore, err = absPath(p); err != nil {
				return err
			}
		}
		err = daemon.NewClient(c.String("store")).Call(c.Context, "/failover/unplanned", req, &out)
	} else {
		req := daemon.FailoverRequest{Groups: gs, All: all, Force: c.Bool("force"), DryRun: c.Bool("dry-run"), ReplicaAddr: c.String("replica-addr")}
		if p := c.String("replica-store"); p != "" {
			if req.ReplicaStore, err = absPath(p); err != nil {
				return err
			}
		} else if !req.DryRun {
			return usageErr("failover %s: --replica-store DIR is required (this host's replica store, which receives the reverse direction)", kind)
		}
		err = daemon.NewClient(c.String("store")).Call(c.Context, "/failover/"+kind, req, &out)
	}
	if err != nil {
		return err
	}
	if c.Bool("json") {
		if err := printJSON(out); err != nil {
			return err
		}
	} else {
		printFailover(out)
	}
	var failed []string
	for _, r := range out {
		if r.Error != "" {
			failed = append(failed, r.Group)
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("failover %s failed for %s", kind, strings.Join(failed, ", "))
	}
	return nil
}

func printFailover(out []daemon.FailoverResult) {
	for _, r := range out {
		if r.DryRun {
			fmt.Printf("%s: %s failover plan (dry run: nothing was changed):\n", r.Group, r.Kind)
			for _, p := range r.Plan {
				fmt.Printf("  - %s\n", p)
			}
			if r.Error != "" {
				fmt.Printf("  ERROR: %s\n", r.Error)
			}
			continue
		}
		total := 0.0
		for _, s := range r.Steps {
			total += s.Seconds
		}
		state := "done"
		if r.Error != "" {
			state = "FAILED"
		}
		fmt.Printf("%s: %s failover %s in %.2f s\n", r.Group, r.Kind, state, total)
		for _, s := range r.Steps {
			line := fmt.Sprintf("  %-36s %8.3f s", s.Step, s.Seconds)
			if s.Bytes > 0 {
				line += "  " + units.Bytes(s.Bytes)
			}
			if s.Detail != "" {
				line += "  " + s.Detail
			}
			fmt.Println(line)
		}
		for _, im := range r.Images {
			fmt.Printf("  image %s: generation %d from cut %d, BLAKE3 root %.16s…\n", im.Name, im.Generation, im.Seq, im.Root)
		}
		if r.Message != "" {
			fmt.Printf("  %s\n", r.Message)
		}
		if r.Error != "" {
			fmt.Printf("  ERROR: %s\n", r.Error)
		}
	}
}
