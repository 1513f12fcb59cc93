package fusefs

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/standin/standin/internal/testutil"
)

const nobody = testutil.Nobody

// accessMounts mounts a points mount and a test failover mount with acc,
// in directories everyone may traverse, and returns the paths to read.
func accessMounts(t *testing.T, acc Access) []string {
	testutil.NeedRoot(t)
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	src := &memSource{points: []memPoint{{"1", t0, pattern(64<<10, 1)}}}
	pm := mountTemp(t, func(m string) (*Server, error) { return MountPoints(m, src, Options{Access: acc}) })
	tm := mountTemp(t, func(m string) (*Server, error) {
		return MountImages(m, []NamedImage{{"a.img", &memImage{data: pattern(64<<10, 5)}}}, Options{Access: acc})
	})
	for _, m := range []string{pm, tm} {
		if err := os.Chmod(filepath.Dir(m), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return []string{pm, pm + "/vm1", pm + "/vm1/latest/disk.img", pm + "/vm1/disk.img@" + t0.Format(time.RFC3339), tm, tm + "/a.img"}
}

// Points and test failover mounts serve the mounting user only by default:
// an unprivileged local user reads nothing, neither listings nor data.
func TestMountsOwnerOnlyByDefault(t *testing.T) {
	for _, p := range accessMounts(t, Access{}) {
		if out := testutil.ReadAs(t, nobody, nobody, p); !strings.Contains(out, "Permission denied") {
			t.Errorf("nobody reading %s: %q, want permission denied", p, out)
		}
		if out := testutil.ReadAs(t, 0, 0, p); out != "" {
			t.Errorf("root reading %s: %q", p, out)
		}
	}
}

// With AllowOther the kernel checks the modes: the chosen group reads,
// everybody else still gets nothing.
func TestMountsAllowOtherGroup(t *testing.T) {
	const group = 4242
	paths := accessMounts(t, Access{AllowOther: true, Gid: group, Mode: 0o640})
	for _, p := range paths {
		if out := testutil.ReadAs(t, nobody, group, p); out != "" {
			t.Errorf("group member reading %s: %q", p, out)
		}
		if out := testutil.ReadAs(t, nobody, nobody, p); !strings.Contains(out, "Permission denied") {
			t.Errorf("nobody reading %s: %q, want permission denied", p, out)
		}
	}
	// Others cannot even stat a point (its size, whether it exists).
	for _, p := range paths[1:4] {
		if out := statAs(t, nobody, nobody, p); !strings.Contains(out, "Permission denied") {
			t.Errorf("nobody stating %s: %q, want permission denied", p, out)
		}
	}
	var st syscall.Stat_t
	if err := syscall.Stat(paths[2], &st); err != nil || st.Mode&0o777 != 0o440 || st.Gid != group {
		t.Errorf("points file: mode %04o gid %d (%v), want 0440 and %d", st.Mode&0o777, st.Gid, err, group)
	}
	if err := syscall.Stat(paths[5], &st); err != nil || st.Mode&0o777 != 0o640 || st.Gid != group {
		t.Errorf("test image: mode %04o gid %d (%v), want 0640 and %d", st.Mode&0o777, st.Gid, err, group)
	}
}

// statAs stats path as uid:gid and returns the output of a failure ("" on
// success).
func statAs(t *testing.T, uid, gid uint32, path string) string {
	t.Helper()
	cmd := exec.Command("stat", "-c", "%s", path)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid, Groups: []uint32{}}}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out) + err.Error()
	}
	return ""
}
