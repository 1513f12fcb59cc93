package tracker

import (
	"math/rand/v2"
	"sync"
	"testing"
)

// TestIntentGroupCommit: concurrent first writes to distinct extents share
// fdatasyncs (group commit) instead of paying one each.
func TestIntentGroupCommit(t *testing.T) {
	s, dir := newStore(t, Options{})
	createImage(t, dir, "a.img", 1<<40)
	im, err := s.Image("a.img")
	if err != nil {
		t.Fatal(err)
	}
	const writers, perWriter = 32, 64
	var wg sync.WaitGroup
	for g := 0; g < writers; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 1))
			for i := 0; i < perWriter; i++ {
				off := int64(rng.Uint64N(1<<40-4096)) &^ 4095
				end, err := im.BeginWrite(off, 4096)
				if err != nil {
					t.Error(err)
					return
				}
				end()
			}
		}(g)
	}
	wg.Wait()
	st := im.Status(false)
	t.Logf("%d extents activated with %d intent commits", st.ActiveExtents, st.IntentCommits)
	if st.IntentCommits*4 > uint64(st.ActiveExtents) {
		t.Fatalf("%d commits for %d extents: concurrent intents are not group-committed", st.IntentCommits, st.ActiveExtents)
	}
}
