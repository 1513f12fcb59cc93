package main

// Local exposure: who on this host may read mounts, and secrets kept out of
// argv (which every local user can read in /proc/PID/cmdline).

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/user"
	"strconv"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/standin/standin/fusefs"
)

// accessFlags are the flags of a points or test failover mount that let
// other users in; prefix is "" or "points-" (serve).
func accessFlags(prefix string) []cli.Flag {
	return []cli.Flag{
		&cli.BoolFlag{Name: prefix + "allow-other", Usage: "let other local users in as far as the files' modes allow (FUSE allow_other + default_permissions; needed when QEMU runs as another user, e.g. libvirt's qemu user). Default: only the daemon's user"},
		&cli.StringFlag{Name: prefix + "file-group", Usage: "with --" + prefix + "allow-other: the files' `GROUP` (name or number)"},
		&cli.StringFlag{Name: prefix + "file-mode", Usage: "with --" + prefix + "allow-other: the files' `MODE` (octal, e.g. 0640 lets --" + prefix + "file-group read)"},
	}
}

// accessFrom reads the accessFlags.
func accessFrom(c *cli.Context, prefix string) (fusefs.Access, error) {
	a := fusefs.Access{AllowOther: c.Bool(prefix + "allow-other")}
	g, m := c.String(prefix+"file-group"), c.String(prefix+"file-mode")
	if !a.AllowOther {
		if g != "" || m != "" {
			return a, usageErr("--%sfile-group and --%sfile-mode need --%sallow-other: without it only the daemon's user can use the mount, whatever the modes", prefix, prefix, prefix)
		}
		return a, nil
	}
	if g != "" {
		gid, err := lookupGroup(g)
		if err != nil {
			return a, usageErr("--%sfile-group: %v", prefix, err)
		}
		a.Gid = gid
	}
	if m != "" {
		mode, err := parseMode(m)
		if err != nil {
			return a, usageErr("--%sfile-mode: %v", prefix, err)
		}
		a.Mode = uint32(mode)
	}
	return a, nil
}

// lookupGroup resolves a group name or number to a gid.
func lookupGroup(s string) (int, error) {
	if n, err := strconv.Atoi(s); err == nil {
		if n < 0 {
			return 0, fmt.Errorf("group %q: not a group number", s)
		}
		return n, nil
	}
	g, err := user.LookupGroup(s)
	if err != nil {
		return 0, fmt.Errorf("group %q: %w", s, err)
	}
	return strconv.Atoi(g.Gid)
}

// positiveDurations refuses duration flags given as 0 or negative (they
// would otherwise mean "the default" without saying so).
func positiveDurations(c *cli.Context, names ...string) error {
	for _, n := range names {
		if c.IsSet(n) && c.Duration(n) <= 0 {
			return usageErr("--%s %s: must be more than 0 (the default is %s)", n, c.Duration(n), defaultDuration(c, n))
		}
	}
	return nil
}

func defaultDuration(c *cli.Context, name string) string {
	for _, f := range c.Command.Flags {
		if df, ok := f.(*cli.DurationFlag); ok && df.Name == name {
			return df.Value.String()
		}
	}
	return "unset"
}

// tokenEnv is the environment variable a pairing token may be passed in.
const tokenEnv = "STANDIN_PAIR_TOKEN"

// tokenFlags are the ways to give a pairing token; required makes one of
// them mandatory.
func tokenFlags(usage string) []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "token-file", Usage: "read the pairing token from `FILE` (- : standard input); or set " + tokenEnv},
		&cli.StringFlag{Name: "token", Usage: usage + " (visible to every local user in the process list: prefer --token-file or " + tokenEnv + ")"},
	}
}

// pairToken returns the token from --token-file, $STANDIN_PAIR_TOKEN or
// --token (with a warning: argv is world-readable), "" if none is given.
func pairToken(c *cli.Context, stdin io.Reader) (string, error) {
	var srcs []string
	for _, n := range []string{"token-file", "token"} {
		if c.String(n) != "" {
			srcs = append(srcs, "--"+n)
		}
	}
	env, haveEnv := os.LookupEnv(tokenEnv)
	if haveEnv && env != "" {
		srcs = append(srcs, tokenEnv)
	}
	if len(srcs) > 1 {
		return "", usageErr("give the pairing token one way, not %s", strings.Join(srcs, " and "))
	}
	switch {
	case c.String("token-file") != "":
		f := c.String("token-file")
		r := stdin
		if f != "-" {
			fh, err := os.Open(f)
			if err != nil {
				return "", usageErr("--token-file: %v", err)
			}
			defer fh.Close()
			r = fh
		}
		line, err := bufio.NewReader(io.LimitReader(r, 64<<10)).ReadString('\n')
		if err != nil && err != io.EOF {
			return "", usageErr("--token-file %s: %v", f, err)
		}
		tok := strings.TrimSpace(line)
		if tok == "" {
			return "", usageErr("--token-file %s: no token in it (the first line should hold the token from 'standin pair token')", f)
		}
		return tok, nil
	case haveEnv && env != "":
		return strings.TrimSpace(env), nil
	case c.String("token") != "":
		fmt.Fprintf(os.Stderr, "standin: warning: --token on the command line is visible to every local user (ps, /proc/PID/cmdline) while this runs; use --token-file FILE, --token-file - (standard input) or %s\n", tokenEnv)
		return c.String("token"), nil
	}
	return "", nil
}
