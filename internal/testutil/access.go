package testutil

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// Nobody is the uid (and gid) of the unprivileged user the access checks
// run as.
const Nobody = 65534

// NeedRoot skips the test unless it runs as root (it runs a reader as
// another user).
func NeedRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (runs a reader as another user)")
	}
}

// ReadAs reads path (a file: its first byte; a directory: its listing) as
// uid/gid without supplementary groups; it returns what the reader printed
// on failure ("" if it could read).
func ReadAs(t testing.TB, uid, gid uint32, path string) string {
	t.Helper()
	cmd := exec.Command("sh", "-c", `if [ -d "$1" ]; then ls "$1"; else head -c1 "$1"; fi`, "sh", path)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid, Groups: []uint32{}}}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		if out.Len() == 0 {
			return err.Error()
		}
		return out.String()
	}
	return ""
}

// LooseStoreDir makes a directory name, mode 0755, in a fresh temporary
// directory everyone may traverse, and returns both: a store found with
// group/other access.
func LooseStoreDir(t testing.TB, name string) (base, dir string) {
	t.Helper()
	base = t.TempDir()
	os.Chmod(base, 0o755)
	dir = filepath.Join(base, name)
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return base, dir
}

// CheckOwnerOnly fails unless dir has mode 0700 and (when running as root)
// nobody cannot list it.
func CheckOwnerOnly(t testing.TB, dir string) {
	t.Helper()
	if st, err := os.Stat(dir); err != nil {
		t.Fatalf("store: %v", err)
	} else if st.Mode().Perm() != 0o700 {
		t.Fatalf("store mode %04o, want 0700", st.Mode().Perm())
	}
	if os.Geteuid() == 0 {
		if out := ReadAs(t, Nobody, Nobody, dir); !strings.Contains(out, "Permission denied") {
			t.Fatalf("nobody listing the store: %q, want permission denied", out)
		}
	}
}
