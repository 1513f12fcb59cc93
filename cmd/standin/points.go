package main

import (
	"fmt"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/standin/standin/applier"
	"github.com/standin/standin/internal/daemon"
)

func pointsCommand() *cli.Command {
	sel := []cli.Flag{storeFlag, &cli.StringFlag{Name: "group", Required: true, Usage: "group `NAME` (the VM)"}}
	return &cli.Command{
		Name:  "points",
		Usage: "recovery points on the replica (needs its daemon)",
		Subcommands: []*cli.Command{
			{
				Name:         "list",
				Usage:        "list a group's recovery points",
				Flags:        append(append([]cli.Flag{}, sel...), jsonFlag),
				OnUsageError: onUsageError,
				Action: func(c *cli.Context) error {
					var ps []applier.Point
					if err := daemon.NewClient(c.String("store")).Call(c.Context, "/points?group="+c.String("group"), nil, &ps); err != nil {
						return err
					}
					if c.Bool("json") {
						return printJSON(ps)
					}
					w := table()
					fmt.Fprintln(w, "POINT\tTIME\tCYCLE\tKIND\tBYTES")
					for _, p := range ps {
						fmt.Fprintf(w, "%s\t%s\t%d\t%s\t%s\n", p.ID, p.Time.Local().Format(time.DateTime), p.Cycle, p.Kind, humanBytes(p.Bytes))
					}
					return w.Flush()
				},
			},
			{
				Name:  "export",
				Usage: "write a point as sparse raw images: a file for one --image, a directory for the whole group",
				Flags: append(append([]cli.Flag{}, sel...),
					&cli.StringFlag{Name: "point", Value: "latest", Usage: "point `ID` (from points list) or latest"},
					&cli.StringFlag{Name: "image", Usage: "one image `NAME`"},
					&cli.StringFlag{Name: "to", Required: true, Usage: "destination `PATH`"}),
				OnUsageError: onUsageError,
				Action: func(c *cli.Context) error {
					to, err := absPath(c.String("to"))
					if err != nil {
						return err
					}
					var files []string
					req := daemon.ExportRequest{Group: c.String("group"), Point: c.String("point"), Image: c.String("image"), To: to}
					if err := daemon.NewClient(c.String("store")).Call(c.Context, "/points/export", req, &files); err != nil {
						return err
					}
					for _, f := range files {
						fmt.Println(f)
					}
					return nil
				},
			},
			{
				Name:         "verify",
				Usage:        "re-hash a point against the hashes recorded when its data arrived",
				Flags:        append(append([]cli.Flag{}, sel...), jsonFlag, &cli.StringFlag{Name: "point", Value: "latest", Usage: "point `ID` or latest"}),
				OnUsageError: onUsageError,
				Action: func(c *cli.Context) error {
					var rep applier.VerifyReport
					req := daemon.ExportRequest{Group: c.String("group"), Point: c.String("point")}
					if err := daemon.NewClient(c.String("store")).Call(c.Context, "/points/verify", req, &rep); err != nil {
						return err
					}
					if c.Bool("json") {
						if err := printJSON(rep); err != nil {
							return err
						}
					} else if rep.Mismatch == nil {
						fmt.Printf("point %s of %s: %d blocks in %d image(s) match the hashes recorded when they arrived\n", rep.Point, rep.Group, rep.Blocks, rep.Images)
					} else {
						fmt.Printf("point %s of %s: MISMATCH %+v\n", rep.Point, rep.Group, *rep.Mismatch)
					}
					if rep.Mismatch != nil {
						return corruptErr(fmt.Errorf("point %s of %s does not verify", c.String("point"), c.String("group")))
					}
					return nil
				},
			},
		},
	}
}
