package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/urfave/cli/v2"
	"golang.org/x/crypto/argon2"
	"golang.org/x/term"

	"github.com/standin/standin/applier"
	"github.com/standin/standin/dedup"
	"github.com/standin/standin/internal/daemon"
	"github.com/standin/standin/internal/exitcode"
	"github.com/standin/standin/internal/fsutil"
	"github.com/standin/standin/internal/units"
)

func init() {
	exitcode.Register(func(err error) (int, bool) {
		switch {
		case errors.Is(err, dedup.ErrUnrepairable):
			return exitcode.Corrupt, true
		case errors.Is(err, dedup.ErrWrongKey), errors.Is(err, dedup.ErrKeyRequired), errors.Is(err, applier.ErrWrongSeed):
			return exitcode.Refused, true
		}
		return 0, false
	})
}

var keyFlags = []cli.Flag{
	&cli.StringFlag{Name: "key-file", Usage: "seed key `FILE` (32 bytes, raw or 64 hex digits)"},
	&cli.StringFlag{Name: "passphrase-env", Usage: "derive the seed key from the passphrase in environment variable `VAR` (Argon2id)"},
}

func seedCommand() *cli.Command {
	return &cli.Command{
		Name:  "seed",
		Usage: "out-of-band initial replication: export a deduplicated seed to removable media, verify it, import it on the replica",
		Subcommands: []*cli.Command{
			{
				Name:  "export",
				Usage: "write a seed of replication groups (on the primary; needs its daemon)",
				Description: `Takes one crash-consistent cut of the groups' images (the seed's cut becomes the
relationship's base), chunks them into 4 KiB blocks, deduplicates across all images,
compresses, protects with Reed-Solomon parity and writes the seed to --to. Replication
of the groups waits for the replica to import the seed; changes after the cut are
queued and ship as one catch-up cycle. Run the same command again to resume an
interrupted export.`,
				Flags: append([]cli.Flag{
					storeFlag, jsonFlag,
					&cli.StringFlag{Name: "group", Usage: "comma-separated group `NAMES` or globs (the VMs)"},
					&cli.BoolFlag{Name: "all", Usage: "every replication group"},
					&cli.StringFlag{Name: "to", Required: true, Usage: "seed `DIR`; several comma-separated directories are written at once (one volume each)"},
					&cli.StringFlag{Name: "volume-size", Usage: "split the seed into volumes of at most `SIZE` (e.g. 64G)"},
					&cli.StringFlag{Name: "parity", Value: "10%", Usage: "Reed-Solomon parity per group of packs, e.g. 10% (0 = none)"},
					&cli.BoolFlag{Name: "survive-volume-loss", Usage: "place enough parity that losing one whole volume is repairable"},
					&cli.StringFlag{Name: "next-volume-cmd", Usage: "shell `CMD` run when a volume is full; gets STANDIN_VOLUME=N and prints the next volume's directory"},
					&cli.BoolFlag{Name: "encrypt", Usage: "encrypt the seed (AES-256-GCM) with --key-file or --passphrase-env"},
					&cli.StringFlag{Name: "mode", Value: "0600", Usage: "file `MODE` of the seed's files (octal; directories it creates get the matching search bits, e.g. 0640 gives 0750)"},
				}, keyFlags...),
				OnUsageError: onUsageError,
				Action:       runSeedExport,
			},
			{
				Name:      "verify",
				Usage:     "check every shard of a seed and say whether damage is repairable (any machine)",
				ArgsUsage: "DIR...",
				Flags:     append([]cli.Flag{jsonFlag}, keyFlags...),
				Action:    runSeedVerify,
			},
			{
				Name:      "import",
				Usage:     "verify, repair and import a seed into the replica store",
				ArgsUsage: "DIR...",
				Description: `Checks every image of the seed against the replication relationship (the
identity, generation and cut the primary announced, or the images the replica already
holds) and refuses a wrong seed before writing anything. Damaged shards are repaired
from parity. Each group becomes one recovery point at the seed's cut; the primary's
next cycle continues from it. Uses the replica's daemon when it runs. Run the same
command again to resume an interrupted import.`,
				Flags: append([]cli.Flag{storeFlag, jsonFlag,
					&cli.BoolFlag{Name: "dry-run", Usage: "show what would be imported (and verify the shards) without writing"},
				}, keyFlags...),
				OnUsageError: onUsageError,
				Action:       runSeedImport,
			},
		},
	}
}

// seedKey reads the key from --key-file or --passphrase-env; create makes a
// new key file when it does not exist (export with --encrypt).
func seedKey(c *cli.Context, create bool) ([]byte, error) {
	kf, pe := c.String("key-file"), c.String("passphrase-env")
	switch {
	case kf != "" && pe != "":
		return nil, usageErr("give either --key-file or --passphrase-env, not both")
	case pe != "":
		pass, ok := os.LookupEnv(pe)
		if !ok || pass == "" {
			return nil, usageErr("--passphrase-env %s: the environment variable is not set or empty", pe)
		}
		// A fixed salt on purpose: the same passphrase must give the same key,
		// so seeds made with it dedup against each other (chunk ids are keyed).
		return argon2.IDKey([]byte(pass), []byte("standin seed key v1"), 3, 64<<10, 2, 32), nil
	case kf != "":
		b, err := os.ReadFile(kf)
		if errors.Is(err, os.ErrNotExist) && create {
			key := make([]byte, 32)
			if _, err := rand.Read(key); err != nil {
				return nil, err
			}
			err := fsutil.WriteFileAtomicNew(kf, []byte(hex.EncodeToString(key)+"\n"), 0o600)
			if err != nil {
				return nil, fmt.Errorf("writing the new key to %s: %w", kf, err)
			}
			fmt.Fprintf(os.Stderr, "standin: a new seed key was written to %s — keep it safe and away from the seed: the seed cannot be imported without it\n", kf)
			return key, nil
		}
		if err != nil {
			return nil, fmt.Errorf("--key-file: %w", err)
		}
		if s := strings.TrimSpace(string(b)); len(s) == 64 {
			if k, err := hex.DecodeString(s); err == nil {
				return k, nil
			}
		}
		if len(b) == 32 {
			return b, nil
		}
		return nil, usageErr("--key-file %s: want 32 raw bytes or 64 hex digits, found %d bytes", kf, len(b))
	}
	return nil, nil
}

// parseMode parses an octal file mode such as 0600 or 640 (permission bits
// only; the owner must be able to read).
func parseMode(s string) (os.FileMode, error) {
	v, err := strconv.ParseUint(strings.TrimSpace(s), 8, 32)
	if err != nil || v > 0o777 {
		return 0, fmt.Errorf("%q is not an octal file mode such as 0600 or 0640", s)
	}
	if v&0o400 == 0 {
		return 0, fmt.Errorf("%q: the owner must be able to read (e.g. 0600)", s)
	}
	return os.FileMode(v), nil
}

// parseSize parses 64G, 500M, 1T, 4096 (bytes, powers of 1024).
func parseSize(s string) (int64, error) {
	s = strings.TrimSpace(strings.ToUpper(s))
	if s == "" {
		return 0, nil
	}
	mul := int64(1)
	s = strings.TrimSuffix(strings.TrimSuffix(s, "B"), "I")
	if n := len(s); n > 0 {
		switch s[n-1] {
		case 'K':
			mul = 1 << 10
		case 'M':
			mul = 1 << 20
		case 'G':
			mul = 1 << 30
		case 'T':
			mul = 1 << 40
		}
		if mul > 1 {
			s = s[:n-1]
		}
	}
	v, err := strconv.ParseFloat(s, 64)
	if err != nil || v < 0 {
		return 0, fmt.Errorf("size %q: use e.g. 64G, 500M or a number of bytes", s)
	}
	return int64(v * float64(mul)), nil
}

func parseParity(s string) (float64, error) {
	s = strings.TrimSpace(s)
	pct := strings.HasSuffix(s, "%")
	v, err := strconv.ParseFloat(strings.TrimSuffix(s, "%"), 64)
	if err != nil || v < 0 {
		return 0, fmt.Errorf("parity %q: use a percentage such as 10%%", s)
	}
	if pct || v > 1 {
		v /= 100
	}
	if v > 1 {
		return 0, fmt.Errorf("parity %q: at most 100%%", s)
	}
	return v, nil
}

func runSeedExport(c *cli.Context) error {
	if c.NArg() > 0 {
		return usageErr("seed export takes no arguments (got %q); name groups with --group", c.Args().First())
	}
	req := daemon.SeedExportRequest{Groups: splitList(c.String("group")), All: c.Bool("all"), SurviveVolumeLoss: c.Bool("survive-volume-loss")}
	if req.All == (len(req.Groups) > 0) {
		return usageErr("give either --group VM[,VM...] or --all")
	}
	for _, d := range splitList(c.String("to")) {
		a, err := absPath(d)
		if err != nil {
			return err
		}
		req.To = append(req.To, a)
	}
	var err error
	if req.VolumeSize, err = parseSize(c.String("volume-size")); err != nil {
		return usageErr("--volume-size: %v", err)
	}
	if req.Parity, err = parseParity(c.String("parity")); err != nil {
		return usageErr("--parity: %v", err)
	}
	if c.Bool("encrypt") {
		if c.String("key-file") == "" && c.String("passphrase-env") == "" {
			return usageErr("--encrypt needs --key-file FILE (created if missing) or --passphrase-env VAR")
		}
		if req.Key, err = seedKey(c, true); err != nil {
			return err
		}
	} else if c.String("key-file") != "" || c.String("passphrase-env") != "" {
		return usageErr("a key was given without --encrypt; add --encrypt to encrypt the seed")
	}
	mode, err := parseMode(c.String("mode"))
	if err != nil {
		return usageErr("--mode: %v", err)
	}
	req.Mode = uint32(mode)
	req.Prompt = req.VolumeSize > 0
	req.SlowForTest = testDelay()
	nextCmd := c.String("next-volume-cmd")
	pv := newProgressView("seed export", true)
	cl := daemon.NewClient(c.String("store"))
	var sum *daemon.SeedExportSummary
	err = cl.Stream(c.Context, "/seed/export", req, func(raw json.RawMessage) error {
		var e daemon.SeedEvent
		if err := json.Unmarshal(raw, &e); err != nil {
			return err
		}
		switch e.Type {
		case "progress":
			pv.update(*e.Progress)
		case "message":
			pv.message(e.Message)
		case "volume":
			pv.pause()
			a := daemon.SeedVolumeAnswer{Session: e.Session}
			dir, err := nextVolume(c.Context, nextCmd, e.Volume)
			if err != nil {
				a.Error = err.Error()
			} else {
				a.Dir = dir
			}
			if err := cl.Call(c.Context, "/seed/volume", a, nil); err != nil {
				return err
			}
		case "done":
			sum = e.Export
		case "error":
			return exitcode.With(max(e.Code, exitcode.Failure), errors.New(e.Error))
		}
		return nil
	})
	pv.finish()
	if err != nil {
		return err
	}
	if sum == nil {
		return errors.New("seed export: the daemon ended without a result (see its log)")
	}
	if c.Bool("json") {
		return printJSON(sum)
	}
	fmt.Printf("seed of %s written to %s\n", strings.Join(sum.Groups, ", "), strings.Join(sum.To, ", "))
	fmt.Printf("  images     %d, cut at %s\n", sum.Images, sum.CutTime.Local().Format(time.DateTime))
	fmt.Printf("  allocated  %s\n", units.Bytes(sum.Allocated))
	fmt.Printf("  unique     %s (after dedup)\n", units.Bytes(sum.Unique))
	fmt.Printf("  seed       %s (compressed, with parity and index)\n", units.Bytes(sum.SeedBytes))
	fmt.Printf("  ratio      %.2f× (allocated / seed)\n", sum.Ratio)
	fmt.Printf("  time       %s (%.0f MB/s)", time.Duration(sum.Seconds*float64(time.Second)).Round(100*time.Millisecond), float64(sum.Allocated)/1e6/max(sum.Seconds, 1e-3))
	if sum.ResumedPacks > 0 {
		fmt.Printf(", %d packs kept from the interrupted run", sum.ResumedPacks)
	}
	fmt.Println()
	fmt.Printf("next: carry the seed to the replica and run 'standin seed import --store REPLICA_STORE %s'\n", strings.Join(sum.To, " "))
	return nil
}

// nextVolume asks for the directory of volume n: --next-volume-cmd, or a
// prompt on the terminal.
func nextVolume(ctx context.Context, cmd string, n int) (string, error) {
	if cmd != "" {
		x := exec.CommandContext(ctx, "/bin/sh", "-c", cmd)
		x.Env = append(os.Environ(), fmt.Sprintf("STANDIN_VOLUME=%d", n))
		x.Stderr = os.Stderr
		out, err := x.Output()
		if err != nil {
			return "", fmt.Errorf("--next-volume-cmd for volume %d: %w", n, err)
		}
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		dir := strings.TrimSpace(lines[len(lines)-1])
		if dir == "" {
			return "", fmt.Errorf("--next-volume-cmd for volume %d printed no directory", n)
		}
		return absPath(dir)
	}
	if !term.IsTerminal(int(os.Stdin.Fd())) {
		return "", fmt.Errorf("volume %d is needed but there is no terminal to ask on: give --next-volume-cmd, or several --to directories written at once", n)
	}
	fmt.Fprintf(os.Stderr, "\nvolume %d is full. Connect the next medium and enter the directory for volume %d: ", n-1, n)
	line, err := bufio.NewReader(os.Stdin).ReadString('\n')
	if err != nil {
		return "", err
	}
	if strings.TrimSpace(line) == "" {
		return "", fmt.Errorf("no directory given for volume %d", n)
	}
	return absPath(strings.TrimSpace(line))
}

func runSeedVerify(c *cli.Context) error {
	if c.NArg() == 0 {
		return usageErr("seed verify: name the seed's directories (all volumes)")
	}
	key, err := seedKey(c, false)
	if err != nil {
		return err
	}
	rep, err := dedup.Verify(c.Context, c.Args().Slice(), key)
	if err != nil {
		return err
	}
	if c.Bool("json") {
		if err := printJSON(rep); err != nil {
			return err
		}
	} else {
		printVerify(rep)
	}
	if !rep.Repairable {
		return corruptErr(fmt.Errorf("the seed is damaged beyond its parity; lost: %s", strings.Join(rep.Lost, ", ")))
	}
	return nil
}

func printVerify(rep dedup.Report) {
	for _, g := range rep.Groups {
		for _, d := range g.Damaged {
			state := "repairable"
			if !g.Repairable {
				state = "NOT repairable"
			}
			fmt.Printf("damaged  %s (%s): %s — group %d, %d of %d parity used, %s\n", d.Name, d.Kind, d.Problem, g.Group, len(g.Damaged), g.Parity, state)
		}
	}
	switch {
	case rep.OK():
		fmt.Printf("seed OK: %d shards (%s) and both index copies intact\n", rep.Shards, units.Bytes(rep.Bytes))
	case rep.Repairable:
		fmt.Printf("seed damaged but repairable: %d of %d shards bad, %d of 2 index copies intact; import repairs it from parity\n", rep.DamagedShards, rep.Shards, rep.IndexCopies)
	default:
		fmt.Printf("seed NOT repairable: %d of %d shards bad; lost beyond parity: %s\n", rep.DamagedShards, rep.Shards, strings.Join(rep.Lost, ", "))
	}
}

func runSeedImport(c *cli.Context) error {
	if c.NArg() == 0 {
		return usageErr("seed import: name the seed's directories (all volumes)")
	}
	key, err := seedKey(c, false)
	if err != nil {
		return err
	}
	req := daemon.SeedImportRequest{DryRun: c.Bool("dry-run"), Key: key, SlowForTest: testDelay()}
	for _, p := range c.Args().Slice() {
		a, err := absPath(p)
		if err != nil {
			return err
		}
		if _, err := os.Stat(a); err != nil {
			return exitcode.With(exitcode.NotFound, fmt.Errorf("seed directory %s: %w", a, err))
		}
		req.Paths = append(req.Paths, a)
	}
	pv := newProgressView("seed import", false)
	var sum *daemon.SeedImportSummary
	store := c.String("store")
	handle := func(e daemon.SeedEvent) error {
		switch e.Type {
		case "progress":
			pv.update(*e.Progress)
		case "message":
			pv.message(e.Message)
		case "done":
			sum = e.Import
		case "error":
			return exitcode.With(max(e.Code, exitcode.Failure), errors.New(e.Error))
		}
		return nil
	}
	err = daemon.NewClient(store).Stream(c.Context, "/seed/import", req, func(raw json.RawMessage) error {
		var e daemon.SeedEvent
		if err := json.Unmarshal(raw, &e); err != nil {
			return err
		}
		return handle(e)
	})
	if exitcode.Code(err) == exitcode.NoDaemon {
		// No replica daemon: import into the store directly.
		rep, oerr := applier.OpenReplica(store, applier.ReplicaOptions{})
		if oerr != nil {
			pv.finish()
			return fmt.Errorf("replica store %s: %w", store, oerr)
		}
		var s daemon.SeedImportSummary
		s, err = daemon.SeedImport(c.Context, rep, req, func(e daemon.SeedEvent) { handle(e) })
		rep.Close()
		if err == nil {
			sum = &s
		}
	}
	pv.finish()
	if err != nil {
		return err
	}
	if sum == nil {
		return errors.New("seed import: the daemon ended without a result (see its log)")
	}
	if c.Bool("json") {
		return printJSON(sum)
	}
	if sum.DryRun {
		return printImportPlan(sum)
	}
	fmt.Printf("seed imported: %d image(s), %s written in %s (%.0f MB/s)\n", len(sum.Images), units.Bytes(sum.Written),
		time.Duration(sum.Seconds*float64(time.Second)).Round(100*time.Millisecond), float64(sum.Written)/1e6/max(sum.Seconds, 1e-3))
	for g, p := range sum.Points {
		fmt.Printf("  group %s: recovery point %s at the seed's cut; replication continues with the primary's next cycle\n", g, p)
	}
	return nil
}

func printImportPlan(sum *daemon.SeedImportSummary) error {
	w := table()
	fmt.Fprintln(w, "GROUP\tIMAGE\tID\tGEN\tCUT\tCUT TIME\tSIZE\tALLOCATED")
	for _, im := range sum.Images {
		fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%d\t%s\t%s\t%s\n", im.Group, im.Name, im.ID, im.Generation, im.Seq,
			im.CutTime.Local().Format(time.DateTime), units.Bytes(im.Size), units.Bytes(im.Allocated))
	}
	w.Flush()
	refused := false
	for _, ch := range sum.Checks {
		what := map[string]string{"import": "would import", "skip": "would skip", "refuse": "REFUSED"}[ch.Action]
		fmt.Printf("group %s: %s", ch.Group, what)
		if ch.Reason != "" {
			fmt.Printf(" — %s", ch.Reason)
		}
		if ch.Expected {
			fmt.Print(" (matches the seed the primary announced)")
		}
		fmt.Println()
		refused = refused || ch.Action == "refuse"
	}
	if sum.Verify != nil {
		printVerify(*sum.Verify)
	}
	fmt.Println("dry run: nothing was written")
	if refused {
		return refusedErr(errors.New("the seed would be refused"))
	}
	if sum.Verify != nil && !sum.Verify.Repairable {
		return corruptErr(errors.New("the seed is damaged beyond its parity"))
	}
	return nil
}

// progressView shows progress: a bar on a terminal, plain lines otherwise.
type progressView struct {
	what   string
	export bool
	bar    *progressbar.ProgressBar
	tty    bool
	start  time.Time
	last   time.Time
	p      dedup.Progress
	shown  bool
}

func newProgressView(what string, export bool) *progressView {
	return &progressView{what: what, export: export, tty: term.IsTerminal(int(os.Stderr.Fd())), start: time.Now()}
}

func (v *progressView) ratio() string {
	if !v.export || v.p.SeedBytes == 0 {
		return ""
	}
	return fmt.Sprintf(", dedup+compression %.1f×", float64(v.p.BytesRead)/float64(v.p.SeedBytes))
}

func (v *progressView) update(p dedup.Progress) {
	v.p = p
	if v.tty {
		if v.bar == nil {
			v.bar = progressbar.NewOptions64(p.BytesTotal,
				progressbar.OptionSetWriter(os.Stderr), progressbar.OptionShowBytes(true),
				progressbar.OptionSetWidth(30), progressbar.OptionThrottle(200*time.Millisecond),
				progressbar.OptionShowElapsedTimeOnFinish(), progressbar.OptionSetPredictTime(true),
				progressbar.OptionSetDescription(v.what))
		}
		v.bar.Describe(fmt.Sprintf("%s%s", v.what, v.ratio()))
		v.bar.Set64(p.BytesRead)
		return
	}
	now := time.Now()
	if now.Sub(v.last) < 5*time.Second && p.BytesRead < p.BytesTotal {
		return
	}
	v.last = now
	el := now.Sub(v.start).Seconds()
	rate := float64(p.BytesRead) / max(el, 1e-3)
	eta := "?"
	if rate > 0 && p.BytesTotal >= p.BytesRead {
		eta = time.Duration(float64(p.BytesTotal-p.BytesRead) / rate * float64(time.Second)).Round(time.Second).String()
	}
	pct := 0.0
	if p.BytesTotal > 0 {
		pct = 100 * float64(p.BytesRead) / float64(p.BytesTotal)
	}
	fmt.Fprintf(os.Stderr, "%s: %s of %s (%.0f%%), %.0f MB/s, ETA %s%s\n", v.what, units.Bytes(p.BytesRead), units.Bytes(p.BytesTotal), pct, rate/1e6, eta, v.ratio())
	v.shown = true
}

func (v *progressView) message(m string) {
	v.pause()
	fmt.Fprintf(os.Stderr, "%s: %s\n", v.what, m)
}

func (v *progressView) pause() {
	if v.bar != nil {
		v.bar.Clear()
	}
}

func (v *progressView) finish() {
	if v.bar != nil {
		v.bar.Finish()
		fmt.Fprintln(os.Stderr)
	}
}

// testDelay slows seed operations down for tests that interrupt them.
func testDelay() time.Duration {
	d, _ := time.ParseDuration(os.Getenv("STANDIN_TEST_SEED_DELAY"))
	return d
}
