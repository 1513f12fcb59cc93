package main

import (
	"fmt"
	"net/url"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/standin/standin/applier"
	"github.com/standin/standin/internal/daemon"
	"github.com/standin/standin/internal/units"
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
					fmt.Fprintln(w, "POINT\tTIME\tCYCLE\tKIND\tBYTES\tCONSISTENCY")
					for _, p := range ps {
						cons := "crash"
						if p.AppConsistent {
							cons = "app"
						}
						fmt.Fprintf(w, "%s\t%s\t%d\t%s\t%s\t%s\n", p.ID, p.Time.Local().Format(time.DateTime), p.Cycle, p.Kind, units.Bytes(p.Bytes), cons)
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
					&cli.StringFlag{Name: "to", Required: true, Usage: "destination `PATH` (files are written 0600, a directory created 0700)"},
					&cli.BoolFlag{Name: "force", Usage: "replace existing files at --to (refused otherwise)"}),
				OnUsageError: onUsageError,
				Action: func(c *cli.Context) error {
					to, err := absPath(c.String("to"))
					if err != nil {
						return err
					}
					var files []string
					req := daemon.ExportRequest{Group: c.String("group"), Point: c.String("point"), Image: c.String("image"), To: to, Replace: c.Bool("force")}
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
				Name:  "verify",
				Usage: "re-hash a point against the hashes recorded when its data arrived",
				Flags: append(append([]cli.Flag{}, sel...), jsonFlag, &cli.StringFlag{Name: "point", Value: "latest", Usage: "point `ID` or latest"},
					&cli.BoolFlag{Name: "prepared", Usage: "verify the group's prepared promotion copy (warm standby or prepared planned failover) against the hashes recorded with it, instead of a point"}),
				OnUsageError: onUsageError,
				Action: func(c *cli.Context) error {
					if c.Bool("prepared") {
						return verifyPrepared(c)
					}
					var rep applier.VerifyReport
					req := daemon.ExportRequest{Group: c.String("group"), Point: c.String("point")}
					if err := callVerify(c, req, &rep); err != nil {
						return err
					}
					what := fmt.Sprintf("point %s of %s", rep.Point, rep.Group)
					if rep.Mismatch != nil {
						return printVerified(c, &rep, what, fmt.Sprintf("MISMATCH %+v", *rep.Mismatch),
							corruptErr(fmt.Errorf("point %s of %s does not verify", c.String("point"), c.String("group"))))
					}
					return printVerified(c, &rep, what, fmt.Sprintf("%d blocks in %d image(s) match the hashes recorded when they arrived", rep.Blocks, rep.Images), nil)
				},
			},
			pointsScrubCommand(),
			pointsMountCommand(),
			pointsUnmountCommand(),
			pointsPinsCommand(),
		},
	}
}

// mountDirArg returns the one DIR argument as an absolute path.
func mountDirArg(c *cli.Context) (string, error) {
	if c.NArg() != 1 {
		return "", usageErr("standin %s: name one mount directory DIR", c.Command.FullName())
	}
	return absPath(c.Args().First())
}

func pointsMountCommand() *cli.Command {
	return &cli.Command{
		Name:      "mount",
		Usage:     "expose every recovery point read-only through FUSE at DIR (in the running replica daemon)",
		ArgsUsage: "DIR",
		Description: `DIR/GROUP/IMAGE@TIME is an image at one point (TIME: the cut time in UTC, RFC 3339),
DIR/GROUP/latest/IMAGE the latest point. A file once opened keeps reading the point it was
opened at (the point is pinned against retention until it is closed), also while cycles are
applied. The mount lasts until 'standin points unmount' or the daemon stops; use
'standin serve --points-mount DIR' to mount at every start.
Only the daemon's user (root) can read the mount unless --allow-other is given; then the
kernel checks the files' group and mode (--file-group, --file-mode; default 0400: still nobody else).`,
		Flags:        append([]cli.Flag{storeFlag}, accessFlags("")...),
		OnUsageError: onUsageError,
		Action: func(c *cli.Context) error {
			dir, err := mountDirArg(c)
			if err != nil {
				return err
			}
			acc, err := accessFrom(c, "")
			if err != nil {
				return err
			}
			var pm daemon.PointsMount
			if err := daemon.NewClient(c.String("store")).Call(c.Context, "/points/mount", daemon.PointsMountRequest{Dir: dir, Access: acc}, &pm); err != nil {
				return err
			}
			fmt.Printf("recovery points of %s mounted read-only at %s\n", c.String("store"), pm.Dir)
			return nil
		},
	}
}

func pointsUnmountCommand() *cli.Command {
	return &cli.Command{
		Name:         "unmount",
		Usage:        "remove a points mount (refused while files are open)",
		ArgsUsage:    "DIR",
		Flags:        []cli.Flag{storeFlag},
		OnUsageError: onUsageError,
		Action: func(c *cli.Context) error {
			dir, err := mountDirArg(c)
			if err != nil {
				return err
			}
			if err := daemon.NewClient(c.String("store")).Call(c.Context, "/points/unmount", daemon.PointsMountRequest{Dir: dir}, nil); err != nil {
				return err
			}
			fmt.Printf("%s unmounted\n", dir)
			return nil
		},
	}
}

func pointsPinsCommand() *cli.Command {
	return &cli.Command{
		Name:         "pins",
		Usage:        "list pinned points (held by open point files or test failovers; retention keeps them)",
		Flags:        []cli.Flag{storeFlag, jsonFlag, &cli.StringFlag{Name: "group", Usage: "only group `NAME`"}},
		OnUsageError: onUsageError,
		Action: func(c *cli.Context) error {
			var ps []applier.PinInfo
			path := "/points/pins"
			if g := c.String("group"); g != "" {
				path += "?group=" + url.QueryEscape(g)
			}
			if err := daemon.NewClient(c.String("store")).Call(c.Context, path, nil, &ps); err != nil {
				return err
			}
			if c.Bool("json") {
				return printJSON(ps)
			}
			w := table()
			fmt.Fprintln(w, "GROUP\tPOINT\tOPEN FILES\tTEST FAILOVERS")
			for _, p := range ps {
				fmt.Fprintf(w, "%s\t%s\t%d\t%s\n", p.Group, p.Point, p.Open, strings.Join(p.Owners, ","))
			}
			return w.Flush()
		},
	}
}
