package integration

// I6 for local users: an unprivileged user on the primary or replica host
// reads nothing of a store through the points mount, a test failover mount,
// a seed, an exported point or the store directories; --allow-other with a
// group mode opens a mount to that group only. Pairing tokens stay out of
// argv (ps, /proc/PID/cmdline).

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/standin/standin/internal/testutil"
)

// readerGid is a group given with --file-group.
const readerGid = 4242

// denied fails the test unless nobody is refused every path.
func denied(t *testing.T, what string, paths ...string) {
	t.Helper()
	for _, p := range paths {
		if out := testutil.ReadAs(t, testutil.Nobody, testutil.Nobody, p); !strings.Contains(out, "Permission denied") {
			t.Errorf("%s: an unprivileged user reading %s: %q, want permission denied", what, p, out)
		}
	}
}

// readable fails the test unless a member of readerGid reads every path.
func readable(t *testing.T, what string, paths ...string) {
	t.Helper()
	for _, p := range paths {
		if out := testutil.ReadAs(t, testutil.Nobody, readerGid, p); out != "" {
			t.Errorf("%s: a member of group %d reading %s: %q", what, readerGid, p, out)
		}
	}
}

// traversable opens dir and its parents up to the test root to everyone,
// so that only the modes under test decide who reads what.
func traversable(t *testing.T, dir string) {
	t.Helper()
	for d := dir; d != filepath.Dir(testRoot); d = filepath.Dir(d) {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
		if d == "/" {
			break
		}
	}
}

func TestLocalExposure(t *testing.T) {
	requireRoot(t)
	tmpl := extTemplate(t, testDir(t))
	e := newSeedEnv(t, tmpl, "vm1")
	traversable(t, e.dir)

	// The seed: owner-only by default, every file and directory (packs/,
	// parity/, manifests/ too); --mode gives the mode asked, with the
	// matching search bits on directories.
	seedModes := func(seed string, file, dir os.FileMode) []string {
		t.Helper()
		var files []string
		dirs := map[string]bool{}
		filepath.Walk(seed, func(p string, fi os.FileInfo, err error) error {
			if err != nil {
				t.Errorf("seed %s: %v", p, err)
				return nil
			}
			want := file
			if fi.IsDir() {
				want = dir
				dirs[filepath.Base(p)] = true
			} else {
				files = append(files, p)
			}
			if fi.Mode().Perm() != want {
				t.Errorf("seed %s: mode %04o, want %04o", p, fi.Mode().Perm(), want)
			}
			return nil
		})
		for _, d := range []string{"packs", "parity", "manifests"} {
			if !dirs[d] {
				t.Errorf("seed %s has no %s directory", seed, d)
			}
		}
		if len(files) < 3 {
			t.Fatalf("seed %s has %d files", seed, len(files))
		}
		return files
	}
	seed := filepath.Join(e.dir, "seed")
	e.export(seed, "--group", "vm1")
	seedFiles := seedModes(seed, 0o600, 0o700)
	denied(t, "seed", seed, filepath.Join(seed, "index.0"), seedFiles[0])
	seedGrp := filepath.Join(e.dir, "seed-0640")
	e.export(seedGrp, "--group", "vm1", "--mode", "0640")
	grpFiles := seedModes(seedGrp, 0o640, 0o750)
	denied(t, "seed --mode 0640", seedGrp, grpFiles[0])
	for _, p := range []string{seedGrp, filepath.Join(seedGrp, "packs"), grpFiles[0]} {
		if out := testutil.ReadAs(t, testutil.Nobody, 0, p); out != "" {
			t.Errorf("seed --mode 0640: a member of the seed's group reading %s: %q", p, out)
		}
	}
	// A symlink planted where the export creates a directory is refused.
	planted := filepath.Join(e.dir, "seed-planted")
	victim := filepath.Join(e.dir, "victim")
	os.MkdirAll(planted, 0o700)
	os.MkdirAll(victim, 0o700)
	os.Symlink(victim, filepath.Join(planted, "packs"))
	if r := standin(cmdTimeout, "seed", "export", "--store", e.PStore, "--group", "vm1", "--to", planted); r.Code == 0 || !strings.Contains(r.Stderr, "symbolic link") {
		t.Errorf("seed export through a planted symlink: %s", r)
	}
	if ents, _ := os.ReadDir(victim); len(ents) > 0 {
		t.Errorf("seed export wrote %d file(s) through a planted symlink", len(ents))
	}
	mustStandin(t, "seed", "import", "--store", e.RStore, seedGrp) // the latest seed exported
	if ps := listPoints(t, e.RStore, "vm1"); len(ps) == 0 {
		t.Fatal("no point after the seed import")
	}

	// The stores.
	denied(t, "stores", e.RStore, e.PStore)

	// The points mount.
	pm := filepath.Join(e.dir, "points")
	latest := filepath.Join(pm, "vm1", "latest", "vm1.img")
	mustStandin(t, "points", "mount", "--store", e.RStore, pm)
	denied(t, "points mount", pm, filepath.Join(pm, "vm1"), latest)
	if out := testutil.ReadAs(t, 0, 0, latest); out != "" {
		t.Errorf("root reading %s: %s", latest, out)
	}
	mustStandin(t, "points", "unmount", "--store", e.RStore, pm)
	if r := standin(cmdTimeout, "points", "mount", "--store", e.RStore, "--file-mode", "0440", pm); r.Code != 2 || !strings.Contains(r.Stderr, "allow-other") {
		t.Errorf("--mode without --allow-other: want a usage error naming --allow-other: %s", r)
	}
	mustStandin(t, "points", "mount", "--store", e.RStore, "--allow-other", "--file-group", "4242", "--file-mode", "0440", pm)
	readable(t, "points mount --allow-other --file-group --file-mode 0440", pm, filepath.Join(pm, "vm1"), latest)
	denied(t, "points mount --allow-other --file-group --file-mode 0440", latest)
	mustStandin(t, "points", "unmount", "--store", e.RStore, pm)

	// Test failover mounts.
	tm := filepath.Join(e.dir, "test")
	mustStandin(t, "failover", "test", "--store", e.RStore, "--group", "vm1", "--mount", tm)
	denied(t, "test failover", tm, filepath.Join(tm, "vm1.img"))
	mustStandin(t, "failover", "test", "stop", "--store", e.RStore, "--group", "vm1")
	mustStandin(t, "failover", "test", "--store", e.RStore, "--group", "vm1", "--mount", tm, "--allow-other", "--file-group", "4242", "--file-mode", "0660")
	readable(t, "test failover --allow-other", tm, filepath.Join(tm, "vm1.img"))
	denied(t, "test failover --allow-other", filepath.Join(tm, "vm1.img"))
	// Kept across a daemon restart.
	e.Rep.Stop()
	e.Rep.Restart()
	readable(t, "test failover --allow-other after a restart", filepath.Join(tm, "vm1.img"))
	mustStandin(t, "failover", "test", "stop", "--store", e.RStore, "--group", "vm1")

	// Exported points.
	out := filepath.Join(e.dir, "export")
	mustStandin(t, "points", "export", "--store", e.RStore, "--group", "vm1", "--to", out)
	denied(t, "points export", out, filepath.Join(out, "vm1.img"))
	if st, err := os.Stat(filepath.Join(out, "vm1.img")); err != nil {
		t.Errorf("exported image: %v", err)
	} else if st.Mode().Perm() != 0o600 {
		t.Errorf("exported image: mode %v, want 0600", st.Mode())
	}
	if r := standin(cmdTimeout, "points", "export", "--store", e.RStore, "--group", "vm1", "--to", out); r.Code == 0 || !strings.Contains(r.Stderr, "already exists") {
		t.Errorf("export over an existing file without --force: %s", r)
	}
	mustStandin(t, "points", "export", "--store", e.RStore, "--group", "vm1", "--to", out, "--force")
}

// TestPairTokenOutOfArgv: pair join reads the token from standard input or
// the environment, so it never shows in the process list; --token still
// works with a warning; token lifetimes must be positive.
func TestPairTokenOutOfArgv(t *testing.T) {
	requireRoot(t)
	dir := testDir(t)
	rstore := filepath.Join(dir, "rstore")
	rep := startReplica(t, rstore)
	token := func() string {
		r := mustStandin(t, "pair", "token", "--store", rstore, "--json")
		var tok map[string]string
		if err := json.Unmarshal([]byte(r.Stdout), &tok); err != nil || tok["token"] == "" {
			t.Fatalf("pair token --json: %v: %s", err, r)
		}
		return tok["token"]
	}
	for _, ttl := range []string{"0", "-1h", "0s"} {
		if r := standin(cmdTimeout, "pair", "token", "--store", rstore, "--ttl", ttl); r.Code != 2 || !strings.Contains(r.Stderr, "--ttl") {
			t.Errorf("pair token --ttl %s: want a usage error: %s", ttl, r)
		}
	}

	// --token-file -: the process waits for its token on stdin; its argv
	// (what ps shows) holds no token.
	tok := token()
	cmd := exec.Command(standinBin, "pair", "join", "--store", filepath.Join(dir, "p1"), "--token-file", "-", "--replica", rep.Addr, "--name", "p1")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	var so, se bytes.Buffer
	cmd.Stdout, cmd.Stderr = &so, &se
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var argv []byte
	if !waitFor(time.Second, 20*time.Millisecond, func() bool { // the exec may not have happened yet
		argv, _ = os.ReadFile("/proc/" + strconv.Itoa(cmd.Process.Pid) + "/cmdline")
		return bytes.Contains(argv, []byte("pair"))
	}) {
		t.Fatal("could not read the argv of pair join")
	}
	if bytes.Contains(argv, []byte(tok)) {
		t.Errorf("the token is in /proc/PID/cmdline: %q", argv)
	}
	stdin.Write([]byte(tok + "\n"))
	stdin.Close()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("pair join --token-file -: %v\n%s%s", err, so.String(), se.String())
	}
	if !strings.Contains(so.String(), "paired with") || strings.Contains(se.String(), "warning") {
		t.Errorf("pair join --token-file -: stdout %q stderr %q", so.String(), se.String())
	}

	// STANDIN_PAIR_TOKEN.
	r := execCmd(cmdTimeout, []string{"STANDIN_PAIR_TOKEN=" + token()}, standinBin, "pair", "join", "--store", filepath.Join(dir, "p2"), "--replica", rep.Addr, "--name", "p2")
	if r.Code != 0 || strings.Contains(r.Stderr, "warning") {
		t.Errorf("pair join with STANDIN_PAIR_TOKEN: %s", r)
	}
	// A token file.
	tf := filepath.Join(dir, "token")
	os.WriteFile(tf, []byte(token()+"\n"), 0o600)
	mustStandin(t, "pair", "join", "--store", filepath.Join(dir, "p3"), "--token-file", tf, "--replica", rep.Addr, "--name", "p3")
	// --token on the command line: works, with a warning.
	r = mustStandin(t, "pair", "join", "--store", filepath.Join(dir, "p4"), "--token", token(), "--replica", rep.Addr, "--name", "p4")
	if !strings.Contains(r.Stderr, "visible to every local user") {
		t.Errorf("pair join --token: no warning about the process list: %s", r)
	}
	// Two ways at once, or none: usage errors.
	r = execCmd(cmdTimeout, []string{"STANDIN_PAIR_TOKEN=x"}, standinBin, "pair", "join", "--store", filepath.Join(dir, "p5"), "--token-file", tf)
	if r.Code != 2 {
		t.Errorf("pair join with --token-file and STANDIN_PAIR_TOKEN: want exit 2: %s", r)
	}
	if r := standin(cmdTimeout, "pair", "join", "--store", filepath.Join(dir, "p6")); r.Code != 2 || !strings.Contains(r.Stderr, "--token-file") {
		t.Errorf("pair join without a token: %s", r)
	}
}
