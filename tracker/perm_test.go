package tracker

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// A store found with group/other access is tightened to owner-only when it
// is opened: an unprivileged local user can no longer list or read it.
func TestOpenTightensStoreRoot(t *testing.T) {
	base := t.TempDir()
	os.Chmod(base, 0o755)
	dir := filepath.Join(base, "store")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o775)
	s, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	st, err := os.Stat(dir)
	if err != nil || st.Mode().Perm() != 0o700 {
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
	fresh := filepath.Join(base, "fresh")
	s2, err := Open(fresh, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if st, _ := os.Stat(fresh); st.Mode().Perm() != 0o700 {
		t.Fatalf("new store mode %04o, want 0700", st.Mode().Perm())
	}
}
