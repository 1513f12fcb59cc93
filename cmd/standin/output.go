package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/standin/standin/applier"
	"github.com/standin/standin/internal/exitcode"
	"github.com/standin/standin/internal/format"
	"github.com/standin/standin/tracker"
)

func init() {
	exitcode.Register(func(err error) (int, bool) {
		switch {
		case errors.Is(err, format.ErrNotCycle), errors.Is(err, format.ErrVersion),
			errors.Is(err, format.ErrCorrupt), errors.Is(err, format.ErrTruncated):
			return exitcode.Corrupt, true
		case errors.Is(err, applier.ErrForeign), errors.Is(err, applier.ErrGap),
			errors.Is(err, applier.ErrReplay), errors.Is(err, applier.ErrNoBase), errors.Is(err, applier.ErrRefs):
			return exitcode.Refused, true
		case errors.Is(err, tracker.ErrBusy):
			return exitcode.Busy, true
		case errors.Is(err, tracker.ErrNoImage), errors.Is(err, fs.ErrNotExist):
			return exitcode.NotFound, true
		}
		return 0, false
	})
}

var jsonFlag = &cli.BoolFlag{Name: "json", Usage: "print machine-readable JSON"}

var storeFlag = &cli.StringFlag{Name: "store", Usage: "store directory `DIR`", Required: true, EnvVars: []string{"STANDIN_STORE"}}

func printJSON(v any) error {
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func table() *tabwriter.Writer { return tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0) }

// usageErr marks err as a usage error (exit 2).
func usageErr(format string, a ...any) error {
	return exitcode.With(exitcode.Usage, fmt.Errorf(format, a...))
}

// onUsageError makes flag parsing errors exit 2 with one line.
func onUsageError(c *cli.Context, err error, isSub bool) error {
	return exitcode.With(exitcode.Usage, fmt.Errorf("%v (see 'standin %s --help')", err, c.Command.FullName()))
}

func refusedErr(err error) error { return exitcode.With(exitcode.Refused, err) }
func corruptErr(err error) error { return exitcode.With(exitcode.Corrupt, err) }

func absPath(p string) (string, error) { return filepath.Abs(p) }

func contextWithTimeout(c *cli.Context, d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(c.Context, d)
}
