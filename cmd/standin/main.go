// Command standin replicates VM disk images served through a tracked FUSE
// mount to a replica host. See README.md and docs/cli.md.
package main

import (
	"fmt"
	"os"

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
			debugCommand(),
		},
		ExitErrHandler: func(*cli.Context, error) {}, // main prints and exits
	}
}

func main() {
	err := newApp().Run(os.Args)
	if err != nil {
		fmt.Fprintf(os.Stderr, "standin: %v\n", err)
		os.Exit(exitcode.Code(err))
	}
}
