package applier

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// A replica store found with group/other access is tightened to
// owner-only when it is opened.
func TestOpenReplicaTightensStoreRoot(t *testing.T) {
	base := t.TempDir()
	os.Chmod(base, 0o755)
	dir := filepath.Join(base, "rstore")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	rep, err := OpenReplica(dir, ReplicaOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer rep.Close()
	if st, err := os.Stat(dir); err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("store mode %04o (%v), want 0700", st.Mode().Perm(), err)
	}
	if os.Geteuid() == 0 {
		cmd := exec.Command("ls", dir)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534, Groups: []uint32{}}}
		out, err := cmd.CombinedOutput()
		if err == nil || !strings.Contains(string(out), "Permission denied") {
			t.Fatalf("nobody listing the store: %v %q, want permission denied", err, out)
		}
	}
}
