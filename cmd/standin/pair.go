package main

import (
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/standin/standin/internal/daemon"
	"github.com/standin/standin/internal/pki"
	"github.com/standin/standin/internal/units"
	"github.com/standin/standin/shipper"
)

func pairCommand() *cli.Command {
	return &cli.Command{
		Name:  "pair",
		Usage: "pair primaries with a replica (one token, no certificate files to copy)",
		Subcommands: []*cli.Command{
			{
				Name:  "token",
				Usage: "on the replica: print a one-time pairing token",
				Flags: []cli.Flag{
					storeFlag, jsonFlag,
					&cli.StringFlag{Name: "images", Value: "*", Usage: "what the primary may send: comma-separated `GLOBS` over GROUP/IMAGE"},
					&cli.DurationFlag{Name: "ttl", Value: time.Hour, Usage: "token lifetime"},
					&cli.StringFlag{Name: "addr", Usage: "replica `HOST:PORT` as the primary reaches it (default: the daemon's listen address)"},
					&cli.StringFlag{Name: "quota-held", Usage: "bytes the primary's groups may hold on the replica (images, undo logs, uploads), e.g. 500G (default unlimited)"},
					&cli.StringFlag{Name: "quota-inflight", Usage: "bytes of unfinished uploads the primary may have, e.g. 20G (default unlimited)"},
				},
				OnUsageError: onUsageError,
				Action: func(c *cli.Context) error {
					if err := positiveDurations(c, "ttl"); err != nil {
						return err
					}
					q, err := quotaFlags(c, "quota-held", "quota-inflight")
					if err != nil {
						return err
					}
					var rep map[string]string
					err = daemon.NewClient(c.String("store")).Call(c.Context, "/pair/token",
						daemon.TokenRequest{Pattern: c.String("images"), TTL: c.Duration("ttl"), Addr: c.String("addr"), Quota: q}, &rep)
					if err != nil {
						return err
					}
					if c.Bool("json") {
						return printJSON(rep)
					}
					fmt.Println(rep["token"])
					fmt.Fprintf(os.Stderr, "one-time token, valid %s; on the primary run (the token on standard input, out of the process list):\n  standin pair join --store PRIMARY_STORE --token-file -\n", c.Duration("ttl"))
					return nil
				},
			},
			{
				Name:  "join",
				Usage: "on the primary: pair with a replica using its token",
				Flags: append([]cli.Flag{
					storeFlag,
					&cli.StringFlag{Name: "replica", Usage: "replica `HOST:PORT` (default: the address in the token)"},
					&cli.StringFlag{Name: "name", Usage: "this primary's name (default: hostname)"},
				}, tokenFlags("the `TOKEN` from 'standin pair token'")...),
				OnUsageError: onUsageError,
				Action: func(c *cli.Context) error {
					name := c.String("name")
					if name == "" {
						name, _ = os.Hostname()
					}
					token, err := pairToken(c, os.Stdin)
					if err != nil {
						return err
					}
					if token == "" {
						return usageErr("pair join needs the token from 'standin pair token': --token-file FILE, --token-file - (standard input) or %s", tokenEnv)
					}
					tok, err := pki.ParseToken(token)
					if errors.Is(err, pki.ErrTokenExpired) {
						return refusedErr(fmt.Errorf("pairing token: %w", err))
					}
					if err != nil {
						return usageErr("pairing token: %v", err)
					}
					replica := c.String("replica")
					if replica == "" {
						replica = tok.Addr
					}
					if err := os.MkdirAll(c.String("store"), 0o700); err != nil {
						return err
					}
					rep, err := shipper.Join(c.Context, c.String("store"), replica, token, name)
					if err != nil {
						if errors.Is(err, shipper.ErrNotPaired) || errors.Is(err, shipper.ErrRefused) {
							return refusedErr(err)
						}
						return err
					}
					fmt.Printf("paired with %s as %s (%s)\n", replica, name, rep.PrimaryID)
					return nil
				},
			},
			{
				Name:         "list",
				Usage:        "on the replica: list paired primaries and outstanding tokens",
				Flags:        []cli.Flag{storeFlag, jsonFlag},
				OnUsageError: onUsageError,
				Action: func(c *cli.Context) error {
					auth, err := daemon.OpenAuthority(daemon.ReplicaOptions{Store: c.String("store")})
					if err != nil {
						return err
					}
					ps, ts := auth.Primaries(), auth.Tokens()
					if c.Bool("json") {
						return printJSON(map[string]any{"primaries": ps, "tokens": ts})
					}
					w := table()
					fmt.Fprintln(w, "PRIMARY\tID\tALLOWED\tPAIRED\tREVOKED\tQUOTA HELD\tQUOTA IN FLIGHT")
					for _, p := range ps {
						fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%v\t%s\t%s\n", p.Name, p.ID, p.Pattern, p.Paired.Local().Format(time.DateTime), p.Revoked,
							quotaString(p.Quota.Held), quotaString(p.Quota.Inflight))
					}
					w.Flush()
					fmt.Printf("%d token(s) issued\n", len(ts))
					return nil
				},
			},
			{
				Name:      "quota",
				Usage:     "on the replica: set a paired primary's storage quota (by name or id); takes effect on its next upload",
				ArgsUsage: "PRIMARY",
				Flags: []cli.Flag{
					storeFlag,
					&cli.StringFlag{Name: "held", Required: true, Usage: "bytes its groups may hold (images, undo logs, uploads), e.g. 500G; 0 = unlimited"},
					&cli.StringFlag{Name: "inflight", Usage: "bytes of unfinished uploads, e.g. 20G; 0 = unlimited (default: keep the current value)"},
				},
				OnUsageError: onUsageError,
				Action: func(c *cli.Context) error {
					if c.NArg() != 1 {
						return usageErr("pair quota: name one PRIMARY")
					}
					q, err := quotaFlags(c, "held", "inflight")
					if err != nil {
						return err
					}
					auth, err := daemon.OpenAuthority(daemon.ReplicaOptions{Store: c.String("store")})
					if err != nil {
						return err
					}
					change, inflight := pki.QuotaChange{Held: &q.Held}, "unchanged"
					if c.IsSet("inflight") {
						change.Inflight, inflight = &q.Inflight, quotaString(q.Inflight)
					}
					if err := auth.ChangeQuota(c.Args().First(), change); err != nil {
						if errors.Is(err, pki.ErrNoSuchPrimary) {
							return usageErr("%v (see standin pair list)", err)
						}
						return err
					}
					fmt.Printf("quota of %s: held %s, in flight %s\n", c.Args().First(), quotaString(q.Held), inflight)
					return nil
				},
			},
			{
				Name:         "revoke",
				Usage:        "on the replica: revoke a primary (by name or id); takes effect for new connections",
				ArgsUsage:    "PRIMARY",
				Flags:        []cli.Flag{storeFlag},
				OnUsageError: onUsageError,
				Action: func(c *cli.Context) error {
					if c.NArg() != 1 {
						return usageErr("pair revoke: name one PRIMARY")
					}
					auth, err := daemon.OpenAuthority(daemon.ReplicaOptions{Store: c.String("store")})
					if err != nil {
						return err
					}
					return auth.Revoke(c.Args().First())
				},
			},
		},
	}
}

// quotaFlags parses two size flags into a quota (absent = 0 = unlimited).
func quotaFlags(c *cli.Context, held, inflight string) (pki.Quota, error) {
	var q pki.Quota
	var err error
	if q.Held, err = parseSize(c.String(held)); err != nil {
		return q, usageErr("--%s: %v", held, err)
	}
	if q.Inflight, err = parseSize(c.String(inflight)); err != nil {
		return q, usageErr("--%s: %v", inflight, err)
	}
	return q, nil
}

func quotaString(n int64) string {
	if n <= 0 {
		return "unlimited"
	}
	return units.Bytes(n)
}
