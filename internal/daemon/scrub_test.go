package daemon

import (
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/standin/standin/applier"
)

func scrubStore(t *testing.T) (*applier.Replica, string) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "r")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	// Last complete scrub two hours ago (before a restart).
	if err := os.WriteFile(filepath.Join(dir, "scrub.json"), []byte(`{"last":"`+time.Now().Add(-2*time.Hour).Format(time.RFC3339Nano)+`"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	rep, err := applier.OpenReplica(dir, applier.ReplicaOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rep.Close() })
	if err := rep.EnsureGroup("vm1", applier.Retention{}); err != nil {
		t.Fatal(err)
	}
	id := [16]byte{9}
	id[6], id[8] = 0x40, 0x80
	p := writeCycle(t, t.TempDir(), rand.New(rand.NewPCG(1, 2)), id, "a.img", 0, [16]byte{1}, time.Now(), 256<<10)
	if _, err := rep.ApplyGroup(context.Background(), "vm1", []string{p}); err != nil {
		t.Fatal(err)
	}
	return rep, dir
}

// TestScrubOverdueRunsAtStart: a scrub due while the daemon was down (the
// last one ended more than an interval ago) runs right after start, not an
// interval later.
func TestScrubOverdueRunsAtStart(t *testing.T) {
	old := scrubStartDelay
	scrubStartDelay = 10 * time.Millisecond
	defer func() { scrubStartDelay = old }()
	rep, _ := scrubStore(t)
	last := rep.LastScrub()
	if last.IsZero() {
		t.Fatal("scrub.json not read")
	}
	s := newScrubber(rep, ReplicaOptions{ScrubInterval: time.Hour}, slog.New(slog.DiscardHandler), prometheus.NewRegistry())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	for deadline := time.Now().Add(20 * time.Second); !rep.LastScrub().After(last); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the overdue scrub did not run after start")
		}
	}
}

// TestScrubRefusesWhileRunning: a scrub asked for while one runs is refused
// at once (errBusy), not queued behind it.
func TestScrubRefusesWhileRunning(t *testing.T) {
	rep, _ := scrubStore(t)
	s := newScrubber(rep, ReplicaOptions{}, slog.New(slog.DiscardHandler), prometheus.NewRegistry())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { _, err := s.once(ctx, 1); done <- err }() // 1 byte/s: runs until cancelled
	for {
		s.mu.Lock()
		r := !s.running.IsZero()
		s.mu.Unlock()
		if r {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	t0 := time.Now()
	if _, err := s.once(context.Background(), 0); !errors.Is(err, errBusy) {
		t.Errorf("second scrub: %v, want errBusy", err)
	}
	if d := time.Since(t0); d > 2*time.Second {
		t.Errorf("second scrub waited %s", d)
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled scrub: %v", err)
	}
}
