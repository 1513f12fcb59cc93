package daemon

import (
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/uuid"
)

// TestExportPointKeepsExistingFile: an image whose name is no valid file
// name is exported under its id; an existing file of that name is refused
// without Replace, like any other, and replaced with it.
func TestExportPointKeepsExistingFile(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	rep := openGroupVM1(t, dir)
	id := [16]byte{7}
	id[6], id[8] = 0x40, 0x80
	p := writeCycle(t, t.TempDir(), rand.New(rand.NewPCG(1, 2)), id, "my disk.img", 0, [16]byte{1}, time.Now(), 256<<10)
	if _, err := rep.ApplyGroup(ctx, "vm1", []string{p}); err != nil {
		t.Fatal(err)
	}
	to := filepath.Join(dir, "out")
	if err := os.Mkdir(to, 0o700); err != nil {
		t.Fatal(err)
	}
	mine := filepath.Join(to, uuid.UUID(id).String())
	if err := os.WriteFile(mine, []byte("mine"), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := ExportPoint(ctx, rep, ExportRequest{Group: "vm1", Point: "latest", To: to}); !errors.Is(err, errBusy) {
		t.Fatalf("export over an existing file: %v %v, want errBusy", out, err)
	}
	if b, _ := os.ReadFile(mine); string(b) != "mine" {
		t.Fatalf("existing file replaced without Replace")
	}
	out, err := ExportPoint(ctx, rep, ExportRequest{Group: "vm1", Point: "latest", To: to, Replace: true})
	if err != nil || len(out) != 1 || out[0] != mine {
		t.Fatalf("export with Replace: %v %v", out, err)
	}
	if st, err := os.Stat(mine); err != nil || st.Size() != 256<<10 {
		t.Fatalf("exported file: %v %v", st, err)
	}
}
