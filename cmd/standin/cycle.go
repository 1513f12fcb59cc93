package main

import (
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/urfave/cli/v2"

	"github.com/standin/standin/applier"
	"github.com/standin/standin/internal/daemon"
	"github.com/standin/standin/internal/format"
	"github.com/standin/standin/internal/units"
	"github.com/standin/standin/tracker"
)

func cycleCommand() *cli.Command {
	return &cli.Command{
		Name:  "cycle",
		Usage: "cut, list, inspect and apply cycle files",
		Subcommands: []*cli.Command{
			{
				Name:  "cut",
				Usage: "freeze the changes of the named images under one write barrier and stage a cycle file each",
				Description: `The images named in one cut (the disks of one VM) are consistent with each other.
Returns once every cycle file is durable. Needs the store's daemon ('standin mount').`,
				Flags: []cli.Flag{
					storeFlag, jsonFlag,
					&cli.StringFlag{Name: "images", Usage: "comma-separated image `NAMES` (paths relative to the mount)"},
					&cli.BoolFlag{Name: "all", Usage: "every image of the store"},
				},
				OnUsageError: onUsageError,
				Action:       runCut,
			},
			{
				Name:         "list",
				Usage:        "list the staged cycle files of a store",
				Flags:        []cli.Flag{storeFlag, jsonFlag, &cli.StringFlag{Name: "image", Usage: "only cycles of image `NAME`"}},
				OnUsageError: onUsageError,
				Action: func(c *cli.Context) error {
					cs, err := tracker.Cycles(c.String("store"), c.String("image"))
					if err != nil {
						return err
					}
					if c.Bool("json") {
						return printJSON(cs)
					}
					printCycles(cs)
					return nil
				},
			},
			{
				Name:         "inspect",
				Usage:        "show a cycle file's header and extents and verify every hash (exit 3 if corrupt)",
				ArgsUsage:    "FILE",
				Flags:        []cli.Flag{jsonFlag, &cli.BoolFlag{Name: "extents", Usage: "list every extent"}},
				OnUsageError: onUsageError,
				Action:       runInspect,
			},
			{
				Name:      "apply",
				Usage:     "apply cycle files in order to a plain image file",
				ArgsUsage: "FILE...",
				Description: `Verifies every cycle completely and checks the sequence (identity, generation,
no gaps, no replays) before touching the target. The first cycle of an image is its
base (seq 0) and creates the target. Re-applying the last applied cycle does nothing.
The target's state is kept in TARGET.standin.`,
				Flags:        []cli.Flag{&cli.StringFlag{Name: "to", Usage: "target image `FILE`", Required: true}, jsonFlag},
				OnUsageError: onUsageError,
				Action: func(c *cli.Context) error {
					if c.NArg() == 0 {
						return usageErr("cycle apply: name at least one cycle FILE")
					}
					res, err := applier.ApplyFiles(c.String("to"), c.Args().Slice())
					if c.Bool("json") && err == nil {
						return printJSON(res)
					}
					for _, r := range res {
						what := "applied"
						if r.Skipped {
							what = "already applied, skipped"
						}
						fmt.Printf("cycle %d (%s): %s, %d data blocks, %d zero blocks\n", r.Seq, r.Path, what, r.Blocks, r.Zeroes)
					}
					return err
				},
			},
		},
	}
}

func runCut(c *cli.Context) error {
	var names []string
	switch {
	case c.Bool("all") && c.String("images") != "":
		return usageErr("cycle cut: give --images or --all, not both")
	case c.Bool("all"):
	case c.String("images") != "":
		for _, n := range strings.Split(c.String("images"), ",") {
			if n = strings.TrimSpace(n); n != "" {
				names = append(names, n)
			}
		}
	default:
		return usageErr("cycle cut: name the images with --images a.img,b.img or use --all")
	}
	var cs []tracker.CycleInfo
	if err := daemon.NewClient(c.String("store")).Cut(c.Context, names, &cs); err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(cs)
	}
	printCycles(cs)
	return nil
}

func printCycles(cs []tracker.CycleInfo) {
	w := table()
	fmt.Fprintln(w, "IMAGE\tGEN\tSEQ\tKIND\tCUT\tDATA\tZERO\tBYTES\tPATH")
	for _, ci := range cs {
		kind := "delta"
		if ci.Base {
			kind = "base"
		}
		fmt.Fprintf(w, "%s\t%d\t%d\t%s\t%s\t%s\t%s\t%s\t%s\n", ci.Image, ci.Generation, ci.Seq, kind,
			ci.Time.Local().Format(time.DateTime), units.Bytes(int64(ci.DataBlocks)*format.BlockSize),
			units.Bytes(int64(ci.ZeroBlocks)*format.BlockSize), units.Bytes(ci.Bytes), ci.Path)
	}
	w.Flush()
}

type inspectReply struct {
	Path       string          `json:"path"`
	Bytes      int64           `json:"bytes"`
	Image      string          `json:"image"`
	ID         string          `json:"id"`
	Generation uint64          `json:"generation"`
	Seq        uint64          `json:"seq"`
	Parent     *uint64         `json:"parent"`
	Base       bool            `json:"base"`
	Time       time.Time       `json:"time"`
	ImageSize  uint64          `json:"image_size"`
	GroupCut   string          `json:"group_cut"`
	DataBlocks uint64          `json:"data_blocks"`
	ZeroBlocks uint64          `json:"zero_blocks"`
	RefBlocks  uint64          `json:"ref_blocks"` // version 2: blocks sent as hashes only
	Version    int             `json:"version"`
	Extents    []format.Extent `json:"extents,omitempty"`
	NExtents   int             `json:"extent_count"`
	Verified   bool            `json:"verified"`
	Error      string          `json:"error,omitempty"`
}

func runInspect(c *cli.Context) error {
	if c.NArg() != 1 {
		return usageErr("cycle inspect: want exactly one FILE")
	}
	p := c.Args().First()
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	r, err := format.Open(f, st.Size())
	if err != nil {
		return fmt.Errorf("%s: %w", p, err)
	}
	h, ft := r.Header(), r.Footer()
	rep := inspectReply{Path: p, Bytes: st.Size(), Image: h.Name, ID: uuid.UUID(h.ImageID).String(),
		Generation: h.Generation, Seq: h.Seq, Base: h.Base(), Time: h.CutTime, ImageSize: h.ImageSize,
		GroupCut: uuid.UUID(h.GroupCut).String(), DataBlocks: ft.DataBlocks, ZeroBlocks: ft.ZeroBlocks,
		RefBlocks: ft.RefBlocks, Version: r.Version(), NExtents: len(r.Extents())}
	if h.Parent != format.NoParent {
		p := h.Parent
		rep.Parent = &p
	}
	if c.Bool("extents") {
		rep.Extents = r.Extents()
	}
	verr := r.Verify()
	rep.Verified = verr == nil
	if verr != nil {
		rep.Error = verr.Error()
	}
	if c.Bool("json") {
		if err := printJSON(rep); err != nil {
			return err
		}
	} else {
		kind := "delta"
		if rep.Base {
			kind = "base"
		}
		fmt.Printf("file        %s (%s)\nimage       %s (id %s, generation %d)\ncycle       %d (%s)\ncut         %s (group %s)\nimage size  %s\nextents     %d: %s data, %s zero\n",
			p, units.Bytes(rep.Bytes), rep.Image, rep.ID, rep.Generation, rep.Seq, kind,
			rep.Time.Local().Format(time.RFC3339Nano), rep.GroupCut, units.Bytes(int64(rep.ImageSize)),
			rep.NExtents, units.Bytes(int64(rep.DataBlocks)*format.BlockSize), units.Bytes(int64(rep.ZeroBlocks)*format.BlockSize))
		if rep.RefBlocks > 0 {
			fmt.Printf("refs        %s held by the replica (sent as block hashes only; format version %d)\n", units.Bytes(int64(rep.RefBlocks)*format.BlockSize), rep.Version)
		}
		for _, e := range rep.Extents {
			fmt.Printf("  %-4s blocks %d..%d (%d) stored %d bytes at %d\n", e.Kind, e.Start, e.Start+uint64(e.Count)-1, e.Count, e.Len, e.Off)
		}
		if verr == nil {
			fmt.Println("verified    every block hash and the file hash match")
		}
	}
	if verr != nil {
		return fmt.Errorf("%s: %w", p, verr)
	}
	return nil
}
