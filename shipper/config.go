package shipper

import (
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/standin/standin/internal/fsutil"
)

// Group is one replication relationship: the disks of one VM, cut together
// and shipped to one replica.
type Group struct {
	Name           string        `json:"name"`
	Images         []string      `json:"images"` // paths relative to the mount
	Replica        string        `json:"replica"`
	Interval       time.Duration `json:"interval"`
	Points         int           `json:"points"`
	PointEvery     time.Duration `json:"point_every"`
	AnyPointWindow time.Duration `json:"any_point_window"`
	Bandwidth      int64         `json:"bandwidth"` // bytes per second, 0 = unlimited
	Schedule       []Window      `json:"schedule,omitempty"`
	Paused         bool          `json:"paused"`
	Initial        string        `json:"initial"`  // "network" or "seed"
	Compress       string        `json:"compress"` // "zstd" (default) or "none"
	// Seed is the last seed exported of the group (standin seed export):
	// the relationship continues from its cut once the replica imported it.
	Seed *SeedState `json:"seed,omitempty"`
	// Resync asks for a hash-compare resync (standin replicate resync): the
	// next round in its window cuts a full base continuing the chain, which
	// ships thinned — only blocks that differ on the replica travel.
	Resync *Resync `json:"resync,omitempty"`
	// AppConsistent configures app-consistent points: freeze and thaw
	// commands run around some cuts (appconsistent.go).
	AppConsistent *AppConsistent `json:"app_consistent,omitempty"`
	// Reconcile is a pending failback hash check (failback.go): the first
	// round sends only the candidate blocks that differ on the replica.
	Reconcile *Reconcile `json:"reconcile,omitempty"`
}

// Resync is a requested hash-compare resync.
type Resync struct {
	Requested time.Time `json:"requested"`
	Window    string    `json:"window,omitempty"` // "HH:MM-HH:MM" local time (may wrap midnight); "" = the next round
}

// Due reports whether the resync may run at t.
func (r *Resync) Due(t time.Time) bool {
	if r == nil {
		return false
	}
	if r.Window == "" {
		return true
	}
	from, to, err := ParseWindow(r.Window)
	if err != nil {
		return true // validated when requested; never block a resync forever
	}
	return Window{From: from, To: to}.Contains(t)
}

// String describes the request for status output.
func (r *Resync) String() string {
	if r == nil {
		return ""
	}
	if r.Window == "" {
		return fmt.Sprintf("hash-compare resync requested %s: at the next round", r.Requested.Local().Format(time.DateTime))
	}
	return fmt.Sprintf("hash-compare resync requested %s: scheduled in the window %s", r.Requested.Local().Format(time.DateTime), r.Window)
}

// ParseWindow parses a daily time window "HH:MM-HH:MM" (local time; the end
// may be before the start, wrapping midnight).
func ParseWindow(s string) (from, to time.Duration, err error) {
	a, b, ok := strings.Cut(strings.TrimSpace(s), "-")
	if !ok {
		return 0, 0, fmt.Errorf("window %q: want HH:MM-HH:MM", s)
	}
	if from, err = parseClock(a); err != nil {
		return 0, 0, fmt.Errorf("window %q: %w", s, err)
	}
	if to, err = parseClock(b); err != nil {
		return 0, 0, fmt.Errorf("window %q: %w", s, err)
	}
	if from == to {
		return 0, 0, fmt.Errorf("window %q is empty", s)
	}
	return from, to, nil
}

// SeedState records a seed exported for a group.
type SeedState struct {
	GroupCut string      `json:"group_cut"`
	Time     time.Time   `json:"time"`
	To       []string    `json:"to"`
	Images   []SeedImage `json:"images"`
	Imported bool        `json:"imported"` // the replica holds the seed's cut (or later)
}

// SeedImage is one image of an exported seed.
type SeedImage struct {
	Name       string `json:"name"`
	ID         string `json:"id"`
	Generation uint64 `json:"generation"`
	Seq        uint64 `json:"seq"`
	// Root is the seed manifest's root (hex; dedup.Manifest.Root), announced
	// so the replica refuses a seed of other content.
	Root string `json:"root,omitempty"`
}

// Window is a time-of-day bandwidth limit, e.g. 08:00-18:00=2Mbit.
type Window struct {
	From, To  time.Duration // since midnight, local time; To < From wraps midnight
	Bandwidth int64         // bytes per second
}

// Rate returns the bandwidth limit in force at t (0 = unlimited).
func (g *Group) Rate(t time.Time) int64 {
	for _, w := range g.Schedule {
		if w.Contains(t) {
			return w.Bandwidth
		}
	}
	return g.Bandwidth
}

// Contains reports whether the time of day of t (its location) is in the
// window; a window whose end is not after its start wraps midnight.
func (w Window) Contains(t time.Time) bool {
	y, m, d := t.Date()
	since := t.Sub(time.Date(y, m, d, 0, 0, 0, 0, t.Location()))
	if w.To <= w.From {
		return since >= w.From || since < w.To
	}
	return since >= w.From && since < w.To
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// ValidName reports whether s may name a group (it becomes a directory on the replica).
func ValidName(s string) bool { return nameRE.MatchString(s) && !strings.Contains(s, "..") }

// Validate checks a group and fills defaults.
func (g *Group) Validate() error {
	if !ValidName(g.Name) {
		return fmt.Errorf("group name %q: use letters, digits, '.', '_' or '-' (at most 128)", g.Name)
	}
	if len(g.Images) == 0 {
		return fmt.Errorf("group %s: no images (give --images)", g.Name)
	}
	for _, im := range g.Images {
		c := filepath.Clean(im)
		if c != im || filepath.IsAbs(im) || strings.HasPrefix(c, "..") {
			return fmt.Errorf("group %s: image %q must be a clean path relative to the mount", g.Name, im)
		}
	}
	if g.Replica == "" {
		return fmt.Errorf("group %s: no replica (give --replica HOST:PORT)", g.Name)
	}
	switch g.Interval {
	case 30 * time.Second, 5 * time.Minute, 15 * time.Minute:
	default:
		if g.Interval < time.Second {
			return fmt.Errorf("group %s: interval %s: use 30s, 5m or 15m", g.Name, g.Interval)
		}
	}
	if g.Points <= 0 {
		g.Points = 24
	}
	if g.PointEvery <= 0 {
		g.PointEvery = time.Hour
	}
	switch g.Compress {
	case "":
		g.Compress = "zstd"
	case "zstd", "none":
	default:
		return fmt.Errorf("group %s: --compress %q: use zstd or none", g.Name, g.Compress)
	}
	if g.Initial == "" {
		g.Initial = "network"
	}
	if g.Initial != "network" && g.Initial != "seed" {
		return fmt.Errorf("group %s: --initial %q: use network (the first cycle carries the whole image) or seed (standin seed export / seed import)", g.Name, g.Initial)
	}
	return g.AppConsistent.validate(g)
}

// Config is the primary's replication configuration (STORE/replication.json).
type Config struct {
	Groups []Group `json:"groups"`
}

func configPath(store string) string { return filepath.Join(store, "replication.json") }

// LoadConfig reads the configuration (empty if none).
func LoadConfig(store string) (Config, error) {
	var c Config
	err := fsutil.ReadJSON(configPath(store), &c)
	if errors.Is(err, fs.ErrNotExist) {
		return Config{}, nil
	}
	return c, err
}

// SaveConfig writes the configuration atomically.
func SaveConfig(store string, c Config) error { return fsutil.WriteJSON(configPath(store), c) }

// Find returns the group named name.
func (c *Config) Find(name string) *Group {
	for i := range c.Groups {
		if c.Groups[i].Name == name {
			return &c.Groups[i]
		}
	}
	return nil
}

// ParseBandwidth parses "8Mbit", "500kbit", "2MB" (bytes), "0"/"" (unlimited)
// into bytes per second.
func ParseBandwidth(s string) (int64, error) {
	s = strings.TrimSpace(strings.ToLower(s))
	if s == "" || s == "0" || s == "unlimited" {
		return 0, nil
	}
	units := []struct {
		suffix string
		mul    float64
	}{
		{"gbit", 1e9 / 8}, {"mbit", 1e6 / 8}, {"kbit", 1e3 / 8}, {"bit", 1.0 / 8},
		{"gb", 1e9}, {"mb", 1e6}, {"kb", 1e3}, {"b", 1},
	}
	for _, u := range units {
		if strings.HasSuffix(s, u.suffix) {
			v, err := strconv.ParseFloat(strings.TrimSuffix(s, u.suffix), 64)
			if err != nil || v < 0 {
				break
			}
			return int64(v * u.mul), nil
		}
	}
	return 0, fmt.Errorf("bandwidth %q: use e.g. 8Mbit, 500kbit or 2MB (bytes per second)", s)
}

// ParseSchedule parses "08:00-18:00=2Mbit,18:00-08:00=20Mbit".
func ParseSchedule(s string) ([]Window, error) {
	var out []Window
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	for _, part := range strings.Split(s, ",") {
		span, bw, ok := strings.Cut(strings.TrimSpace(part), "=")
		from, to, ok2 := strings.Cut(span, "-")
		if !ok || !ok2 {
			return nil, fmt.Errorf("bandwidth schedule %q: want HH:MM-HH:MM=RATE", part)
		}
		f, err1 := parseClock(from)
		t, err2 := parseClock(to)
		b, err3 := ParseBandwidth(bw)
		if err := errors.Join(err1, err2, err3); err != nil {
			return nil, fmt.Errorf("bandwidth schedule %q: %w", part, err)
		}
		out = append(out, Window{From: f, To: t, Bandwidth: b})
	}
	return out, nil
}

func parseClock(s string) (time.Duration, error) {
	t, err := time.Parse("15:04", strings.TrimSpace(s))
	if err != nil {
		return 0, fmt.Errorf("time %q: want HH:MM", s)
	}
	return time.Duration(t.Hour())*time.Hour + time.Duration(t.Minute())*time.Minute, nil
}
