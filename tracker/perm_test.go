package tracker

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/standin/standin/internal/testutil"
)

// A store found with group/other access is tightened to owner-only when it
// is opened: an unprivileged local user can no longer list or read it.
func TestOpenTightensStoreRoot(t *testing.T) {
	base, dir := testutil.LooseStoreDir(t, "store")
	os.Chmod(dir, 0o775)
	s, err := Open(dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	testutil.CheckOwnerOnly(t, dir)
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
