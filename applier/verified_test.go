package applier

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/standin/standin/internal/format"
)

// TestApplyVerifiedRefusesChangedFile: the server's commit path re-checks
// only the whole-file hash; a cycle changed in the inbox after its upload was
// verified must still be refused before anything is applied (I5).
func TestApplyVerifiedRefusesChangedFile(t *testing.T) {
	dir := t.TempDir()
	r, err := OpenReplica(filepath.Join(dir, "rstore"), ReplicaOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if err := r.EnsureGroup("vm", Retention{}); err != nil {
		t.Fatal(err)
	}
	id := [16]byte{7}
	c0 := writeCycle(t, dir, id, 1, 0, 16384, blocks{0: 1})
	c1 := writeCycle(t, dir, id, 1, 1, 16384, blocks{1: 2})
	if _, err := r.ApplyVerified(context.Background(), "vm", []string{c0}); err != nil {
		t.Fatal(err)
	}
	before, _ := r.Points("vm")
	b, _ := os.ReadFile(c1)
	b[200] ^= 0x40 // in the data area
	os.WriteFile(c1, b, 0o600)
	if _, err := r.ApplyVerified(context.Background(), "vm", []string{c1}); !errors.Is(err, format.ErrCorrupt) {
		t.Fatalf("changed cycle: got %v, want ErrCorrupt", err)
	}
	after, _ := r.Points("vm")
	if len(after) != len(before) {
		t.Fatalf("points changed: %d -> %d", len(before), len(after))
	}
	st, ok, err := r.ImageState("vm", "07000000-0000-0000-0000-000000000000")
	if err != nil || !ok || st.Seq != 0 || st.Applying {
		t.Fatalf("image state after refusal: %+v %v %v", st, ok, err)
	}
}
