package main

import (
	"time"

	"github.com/urfave/cli/v2"

	"github.com/standin/standin/shipper"
)

// Flags of 'replicate enable' for app-consistent points.
func appConsistentFlags() []cli.Flag {
	return []cli.Flag{
		&cli.DurationFlag{Name: "app-consistent-every", Usage: "take an app-consistent point (freeze, cut, thaw) this often, e.g. 4h (≥ the interval; 0 = only with 'replicate now --app-consistent')"},
		&cli.StringFlag{Name: "freeze-cmd", Usage: "`CMD` (sh -c) that quiesces the guest before an app-consistent cut, e.g. 'virsh domfsfreeze VM' or 'fsfreeze -f DIR'; env STANDIN_GROUP, STANDIN_IMAGES (image paths on the mount, one per line)"},
		&cli.StringFlag{Name: "thaw-cmd", Usage: "`CMD` (sh -c) run right after the cut's write barrier, always (also after a failed or timed-out freeze), e.g. 'virsh domfsthaw VM'"},
		&cli.DurationFlag{Name: "freeze-timeout", Value: shipper.DefaultFreezeTimeout, Usage: "limit for each of the freeze and thaw commands (killed with their process group)"},
	}
}

// appConsistentFromFlags builds the group's app-consistent settings (nil
// when none of the flags is given; Group.Validate checks them).
func appConsistentFromFlags(c *cli.Context) *shipper.AppConsistent {
	if !c.IsSet("app-consistent-every") && !c.IsSet("freeze-cmd") && !c.IsSet("thaw-cmd") && !c.IsSet("freeze-timeout") {
		return nil
	}
	return &shipper.AppConsistent{Every: c.Duration("app-consistent-every"), FreezeCmd: c.String("freeze-cmd"),
		ThawCmd: c.String("thaw-cmd"), Timeout: c.Duration("freeze-timeout")}
}

// appColumn is the APP-CONSISTENT column of 'replicate list'.
func appColumn(g shipper.GroupStatus) string {
	if g.AppConsistent == "" {
		return "-"
	}
	s := "never"
	if g.LastAppConsistent != nil {
		s = g.LastAppConsistent.Local().Format(time.DateTime)
	}
	s += " (" + g.AppConsistent
	if f := g.FreezeThaw; f != nil {
		switch {
		case f.Thaw != "ok":
			s += ", THAW FAILED"
		case f.Freeze != "ok":
			s += ", last freeze failed"
		case f.Cut != "ok":
			s += ", last cut failed"
		default:
			s += ", frozen " + time.Duration(f.FrozenSeconds*float64(time.Second)).Round(time.Millisecond).String()
		}
	}
	return s + ")"
}
