package main

import (
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/standin/standin/internal/daemon"
	"github.com/standin/standin/internal/units"
)

func statusCommand() *cli.Command {
	return &cli.Command{
		Name:  "status",
		Usage: "show a daemon's view: images, dirty bytes, last cut and replication health (primary) or groups, points and health (replica)",
		Flags: []cli.Flag{
			storeFlag, jsonFlag,
			&cli.BoolFlag{Name: "blocks", Usage: "primary: include the dirty block ranges ([start, count] in 4 KiB blocks)"},
		},
		OnUsageError: onUsageError,
		Action: func(c *cli.Context) error {
			path := "/status"
			if c.Bool("blocks") {
				path += "?blocks=1"
			}
			var raw json.RawMessage
			if err := daemon.NewClient(c.String("store")).Call(c.Context, path, nil, &raw); err != nil {
				return err
			}
			if c.Bool("json") {
				var v any
				json.Unmarshal(raw, &v)
				return printJSON(v)
			}
			var role struct {
				Role string `json:"role"`
			}
			json.Unmarshal(raw, &role)
			if role.Role == "replica" {
				var st daemon.ReplicaStatus
				if err := json.Unmarshal(raw, &st); err != nil {
					return err
				}
				printReplicaStatus(st)
				return nil
			}
			var st daemon.StatusReply
			if err := json.Unmarshal(raw, &st); err != nil {
				return err
			}
			printPrimaryStatus(st)
			return nil
		},
	}
}

func printPrimaryStatus(st daemon.StatusReply) {
	fmt.Printf("primary store %s mounted at %s (pid %d, up %s)\n", st.Store, st.Mountpoint, st.PID, time.Since(st.Started).Round(time.Second))
	w := table()
	fmt.Fprintln(w, "IMAGE\tSIZE\tDIRTY\tNEXT SEQ\tLAST CUT\tTRACKER")
	for _, im := range st.Images {
		last := "never"
		if im.LastCut != nil {
			last = im.LastCut.Local().Format(time.DateTime)
		}
		health := im.Health
		if len(im.Reasons) > 0 {
			health += ": " + strings.Join(im.Reasons, "; ")
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%s\t%s\n", im.Name, units.Bytes(im.Size), units.Bytes(int64(im.DirtyBytes)), im.NextSeq, last, health)
	}
	w.Flush()
	if len(st.Groups) > 0 {
		fmt.Println()
		printGroups(st.Groups)
	}
}

func printReplicaStatus(st daemon.ReplicaStatus) {
	fmt.Printf("replica store %s listening on %s (pid %d), %d paired primaries\n", st.Store, st.Listen, st.PID, len(st.Primaries))
	w := table()
	fmt.Fprintln(w, "GROUP\tIMAGES\tPOINTS\tLATEST\tUNDO\tHEALTH")
	for _, g := range st.Groups {
		latest := "-"
		if g.Latest != nil {
			latest = g.Latest.Time.Local().Format(time.DateTime)
		}
		var names []string
		for _, im := range g.Images {
			names = append(names, im.Name)
		}
		health := g.Health
		if len(g.Reasons) > 0 {
			health += ": " + strings.Join(g.Reasons, "; ")
		}
		fmt.Fprintf(w, "%s\t%s\t%d\t%s\t%s\t%s\n", g.Group, strings.Join(names, ","), g.Points, latest, units.Bytes(g.UndoBytes), health)
	}
	w.Flush()
	if len(st.Usage) > 0 {
		fmt.Println()
		w = table()
		fmt.Fprintln(w, "PRIMARY\tGROUPS\tHELD\tIN FLIGHT\tQUOTA")
		for _, u := range st.Usage {
			quota := "held " + quotaString(u.Quota.Held) + ", in flight " + quotaString(u.Quota.Inflight)
			if u.Over != "" {
				quota += ": OVER QUOTA, " + u.Over
			}
			fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", u.Name, strings.Join(u.Groups, ","), units.Bytes(u.Usage.Held), units.Bytes(u.Usage.Inflight), quota)
		}
		w.Flush()
	}
}
