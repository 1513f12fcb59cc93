package main

import (
	"fmt"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/standin/standin/applier"
	"github.com/standin/standin/internal/daemon"
	"github.com/standin/standin/shipper"
)

// parseRate parses a scrub rate: "50MB/s", "200MB", "0" (unlimited).
func parseRate(s string) (int64, error) {
	r, err := shipper.ParseBandwidth(strings.TrimSuffix(strings.TrimSpace(s), "/s"))
	if err != nil {
		return 0, fmt.Errorf("rate %q: use e.g. 50MB/s (bytes per second) or 0 for unlimited", s)
	}
	return r, nil
}

func verifyPrepared(c *cli.Context) error {
	var rep applier.PreparedReport
	req := daemon.ExportRequest{Group: c.String("group"), Prepared: true}
	if err := callVerify(c, req, &rep); err != nil {
		return err
	}
	what := fmt.Sprintf("prepared promotion copy of %s (point %s)", rep.Group, rep.Point)
	if rep.Mismatch != nil {
		return printVerified(c, &rep, what, fmt.Sprintf("MISMATCH %+v", *rep.Mismatch),
			corruptErr(fmt.Errorf("the prepared promotion copy of %s does not verify: a promotion would not use it; drop it with 'standin failover cancel' or let the scrub drop it", rep.Group)))
	}
	return printVerified(c, &rep, what, fmt.Sprintf("%d blocks in %d image(s) match the hashes recorded with it", rep.Blocks, rep.Images), nil)
}

// callVerify asks the daemon to verify req; the answer goes to rep.
func callVerify(c *cli.Context, req daemon.ExportRequest, rep any) error {
	return daemon.NewClient(c.String("store")).Call(c.Context, "/points/verify", req, rep)
}

// printVerified prints a verify's outcome, rep as JSON or "what: line", and
// returns bad (the error for a mismatch, nil if none).
func printVerified(c *cli.Context, rep any, what, line string, bad error) error {
	if c.Bool("json") {
		if err := printJSON(rep); err != nil {
			return err
		}
	} else {
		fmt.Printf("%s: %s\n", what, line)
	}
	return bad
}

func pointsScrubCommand() *cli.Command {
	return &cli.Command{
		Name:  "scrub",
		Usage: "scrub the replica store now: re-read every group's points, undo logs and prepared promotion copy against their recorded hashes",
		Description: `Runs in the replica daemon (the one 'standin serve --scrub-interval' runs periodically).
Damage is reported and shows in 'standin status' health until a later scrub finds the group
clean; a damaged prepared promotion copy is dropped (the next promotion copies in full).`,
		Flags: []cli.Flag{storeFlag, jsonFlag,
			&cli.StringFlag{Name: "rate", Value: "0", Usage: "read at most `RATE` (e.g. 50MB/s; 0 = unlimited)"}},
		OnUsageError: onUsageError,
		Action: func(c *cli.Context) error {
			rate, err := parseRate(c.String("rate"))
			if err != nil {
				return usageErr("--rate: %v", err)
			}
			var rep applier.ScrubReport
			if err := daemon.NewClient(c.String("store")).Call(c.Context, "/scrub", daemon.ScrubRequest{Rate: rate}, &rep); err != nil {
				return err
			}
			if c.Bool("json") {
				if err := printJSON(rep); err != nil {
					return err
				}
			} else {
				fmt.Printf("scrubbed %d group(s), %d bytes read in %.1f s: %d finding(s)\n", rep.Groups, rep.Bytes, rep.Seconds, len(rep.Findings))
				for _, f := range rep.Findings {
					fmt.Printf("  %s %s: %s\n", f.Severity, f.Group, f.Message)
				}
			}
			if len(rep.Findings) > 0 {
				return corruptErr(fmt.Errorf("the scrub found %d damaged item(s)", len(rep.Findings)))
			}
			return nil
		},
	}
}
