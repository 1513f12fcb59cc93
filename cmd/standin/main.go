// Command standin replicates VM disk images served through a tracked FUSE
// mount to a replica host. See README.md and docs/cli.md.
package main

import (
	"fmt"
	"os"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/standin/standin/internal/exitcode"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func newApp() *cli.App {
	return &cli.App{
		Name:                 "standin",
		Usage:                "asynchronous replication of VM disk images (Hyper-V Replica for Linux/KVM)",
		Version:              version,
		EnableBashCompletion: true,
		HideHelpCommand:      false,
		Commands: []*cli.Command{
			mountCommand(),
			unmountCommand(),
			cycleCommand(),
			statusCommand(),
			serveCommand(),
			pairCommand(),
			replicateCommand(),
			pointsCommand(),
			failoverCommand(),
			seedCommand(),
			debugCommand(),
		},
		ExitErrHandler: func(*cli.Context, error) {}, // main prints and exits
	}
}

func main() {
	app := newApp()
	err := app.Run(permuteArgs(app, os.Args))
	if err != nil && strings.HasPrefix(err.Error(), "Required flag") {
		err = exitcode.With(exitcode.Usage, err)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "standin: %v\n", err)
		os.Exit(exitcode.Code(err))
	}
}

// permuteArgs moves flags that follow positional arguments in front of them,
// so "standin mount --store S MNT --background" works: urfave/cli stops
// parsing flags at the first positional argument.
func permuteArgs(app *cli.App, args []string) []string {
	if len(args) < 2 {
		return args
	}
	out := []string{args[0]}
	cmds := app.Commands
	var cmd *cli.Command
	i := 1
	for ; i < len(args); i++ { // the command path: standin cycle cut ...
		var next *cli.Command
		for _, c := range cmds {
			if c.HasName(args[i]) {
				next = c
			}
		}
		if next == nil {
			break
		}
		cmd, cmds = next, next.Subcommands
		out = append(out, args[i])
	}
	if cmd == nil || len(cmd.Subcommands) > 0 {
		return args
	}
	takesValue := map[string]bool{}
	for _, f := range cmd.Flags {
		_, isBool := f.(*cli.BoolFlag)
		for _, n := range f.Names() {
			takesValue[n] = !isBool
		}
	}
	var flags, pos []string
	for ; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			pos = append(pos, args[i+1:]...)
			break
		}
		if !strings.HasPrefix(a, "-") || a == "-" {
			pos = append(pos, a)
			continue
		}
		flags = append(flags, a)
		name := strings.TrimLeft(a, "-")
		if !strings.Contains(name, "=") && takesValue[name] && i+1 < len(args) {
			i++
			flags = append(flags, args[i])
		}
	}
	out = append(out, flags...)
	if len(pos) > 0 {
		out = append(out, "--")
		out = append(out, pos...)
	}
	return out
}
