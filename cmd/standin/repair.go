package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/urfave/cli/v2"

	"github.com/standin/standin/applier"
	"github.com/standin/standin/internal/daemon"
	"github.com/standin/standin/internal/exitcode"
)

// repairCommand is 'standin replicate repair' (replica side): show an apply
// that cannot finish and, with --drop-pending, roll it back.
func repairCommand() *cli.Command {
	return &cli.Command{
		Name:  "repair",
		Usage: "on the replica: show why a group's interrupted apply cannot finish; --drop-pending rolls it back to the last good point",
		Description: `Works through the running replica daemon, or directly on the store (taking its lock)
when no daemon runs. Without --drop-pending nothing changes. --drop-pending restores every
image the apply touched to the group's last recorded point from the apply's undo logs and
removes its commit record; the primary's next cycle then applies again or is refused with a
clear error. Every recovery point stays complete throughout.`,
		Flags: []cli.Flag{storeFlag, jsonFlag,
			&cli.StringFlag{Name: "group", Required: true, Usage: "group `NAME` (the VM)"},
			&cli.BoolFlag{Name: "drop-pending", Usage: "roll the pending apply back to the last good point"}},
		OnUsageError: onUsageError,
		Action: func(c *cli.Context) error {
			store := c.String("store")
			req := daemon.RepairRequest{Group: c.String("group"), Drop: c.Bool("drop-pending")}
			var rep applier.PendingReport
			err := daemon.NewClient(store).Call(c.Context, "/replica/repair", req, &rep)
			if exitcode.Code(err) == exitcode.NoDaemon {
				// No replica daemon: work on the store directly (only on
				// an existing replica store: opening one creates it).
				if fi, serr := os.Stat(filepath.Join(store, "groups")); serr != nil || !fi.IsDir() {
					return exitcode.With(exitcode.NotFound, fmt.Errorf("%s is not a replica store (no groups directory) and no replica daemon answers for it", store))
				}
				r, oerr := applier.OpenReplica(store, applier.ReplicaOptions{})
				if oerr != nil {
					return fmt.Errorf("replica store %s: %w", store, oerr)
				}
				rep, err = daemon.Repair(r, req)
				if cerr := r.Close(); err == nil {
					err = cerr
				}
				if errors.Is(err, applier.ErrNoGroup) || errors.Is(err, applier.ErrBadName) {
					return exitcode.With(exitcode.NotFound, err)
				}
				if err != nil && !rep.Pending {
					return err
				}
			}
			if c.Bool("json") {
				if perr := printJSON(rep); perr != nil {
					return perr
				}
				return err
			}
			if rep.Group != "" {
				printPending(store, rep)
			}
			return err
		},
	}
}

func printPending(store string, rep applier.PendingReport) {
	switch {
	case rep.Dropped:
		fmt.Printf("%s: the pending apply of point %s was dropped; the group is back at point %s (%s)\n", rep.Group, rep.Point, orNone(rep.LastPoint), rep.Reason)
		fmt.Println("the primary's next cycle applies again (or is refused with a clear error)")
		return
	case !rep.Pending:
		fmt.Printf("%s: nothing pending (latest point %s)\n", rep.Group, orNone(rep.LastPoint))
		return
	}
	fmt.Printf("%s: pending %s", rep.Group, rep.Kind)
	if rep.Point != "" {
		fmt.Printf(" of point %s (last good point %s)", rep.Point, orNone(rep.LastPoint))
	}
	fmt.Printf("\n  cannot finish: %s\n", rep.Reason)
	if len(rep.Items) > 0 {
		w := table()
		fmt.Fprintln(w, "  IMAGE\tID\tGEN\tSEQ\tDONE\tCYCLE FILE\tSTATE")
		for _, it := range rep.Items {
			fmt.Fprintf(w, "  %s\t%s\t%d\t%d\t%v\t%s\t%s\n", it.Name, it.ID, it.Generation, it.Seq, it.Done, it.Path, it.Cycle)
		}
		w.Flush()
	}
	if rep.Droppable {
		fmt.Printf("  to roll back to point %s: standin replicate repair --store %s --group %s --drop-pending\n", orNone(rep.LastPoint), store, rep.Group)
	} else if rep.WhyNot != "" {
		fmt.Printf("  cannot be dropped: %s\n", rep.WhyNot)
	}
}

func orNone(s string) string {
	if s == "" {
		return "(none)"
	}
	return s
}
