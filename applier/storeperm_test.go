package applier

import (
	"os"
	"testing"

	"github.com/standin/standin/internal/testutil"
)

// A replica store found with group/other access is tightened to
// owner-only when it is opened.
func TestOpenReplicaTightensStoreRoot(t *testing.T) {
	_, dir := testutil.LooseStoreDir(t, "rstore")
	os.Chmod(dir, 0o755)
	rep, err := OpenReplica(dir, ReplicaOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer rep.Close()
	testutil.CheckOwnerOnly(t, dir)
}
