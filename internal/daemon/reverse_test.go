package daemon

import (
	"os"
	"path/filepath"
	"testing"
)

// TestReverseRecordDamaged: a damaged record of groups that failed over
// elsewhere is reported and kept as it is; rewriting it as empty would drop
// the other groups' entries (and their place in the next failover token).
func TestReverseRecordDamaged(t *testing.T) {
	p := filepath.Join(t.TempDir(), "reverse.json")
	if back, err := readReverse(p); err != nil || len(back) != 0 {
		t.Fatalf("missing record: %v %v, want empty", back, err)
	}
	if err := rememberReverseAt(p, "vm1", "b:7443"); err != nil {
		t.Fatal(err)
	}
	if err := rememberReverseAt(p, "vm2", "c:7443"); err != nil {
		t.Fatal(err)
	}
	back, err := readReverse(p)
	if err != nil || len(back) != 2 || back["vm1"] != "b:7443" || back["vm2"] != "c:7443" {
		t.Fatalf("record: %v %v", back, err)
	}
	damaged := []byte(`{"vm1":"b:7443","vm2":`)
	if err := os.WriteFile(p, damaged, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := readReverse(p); err == nil {
		t.Fatal("a damaged record read as valid")
	}
	if err := rememberReverseAt(p, "vm3", "d:7443"); err == nil {
		t.Fatal("a damaged record was rewritten")
	}
	if b, _ := os.ReadFile(p); string(b) != string(damaged) {
		t.Fatalf("the damaged record changed: %q", b)
	}
}
