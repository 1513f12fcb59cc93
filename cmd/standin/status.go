package main

import (
	"fmt"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/standin/standin/internal/daemon"
)

func statusCommand() *cli.Command {
	return &cli.Command{
		Name:  "status",
		Usage: "show the daemon's view of every image: size, dirty bytes, last cut, tracker health",
		Flags: []cli.Flag{
			storeFlag, jsonFlag,
			&cli.BoolFlag{Name: "blocks", Usage: "include the dirty block ranges ([start, count] in 4 KiB blocks)"},
		},
		OnUsageError: onUsageError,
		Action: func(c *cli.Context) error {
			st, err := daemon.NewClient(c.String("store")).Status(c.Context, c.Bool("blocks"))
			if err != nil {
				return err
			}
			if c.Bool("json") {
				return printJSON(st)
			}
			fmt.Printf("store %s mounted at %s (pid %d, up %s)\n", st.Store, st.Mountpoint, st.PID, time.Since(st.Started).Round(time.Second))
			w := table()
			fmt.Fprintln(w, "IMAGE\tSIZE\tDIRTY\tNEXT SEQ\tLAST CUT\tHEALTH")
			for _, im := range st.Images {
				last := "never"
				if im.LastCut != nil {
					last = im.LastCut.Local().Format(time.DateTime)
				}
				health := im.Health
				if len(im.Reasons) > 0 {
					health += ": " + strings.Join(im.Reasons, "; ")
				}
				fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%s\t%s\n", im.Name, humanBytes(im.Size), humanBytes(int64(im.DirtyBytes)), im.NextSeq, last, health)
			}
			return w.Flush()
		},
	}
}
