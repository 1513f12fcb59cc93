package shipper

import (
	"testing"
	"time"
)

func TestResyncWindow(t *testing.T) {
	at := func(h, m int) time.Time { return time.Date(2026, 6, 1, h, m, 0, 0, time.Local) }
	for _, c := range []struct {
		window string
		t      time.Time
		due    bool
	}{
		{"", at(12, 0), true},
		{"18:30-06:00", at(23, 0), true},
		{"18:30-06:00", at(3, 0), true},
		{"18:30-06:00", at(12, 0), false},
		{"18:30-06:00", at(6, 0), false},
		{"18:30-06:00", at(18, 30), true},
		{"01:00-02:00", at(1, 59), true},
		{"01:00-02:00", at(2, 1), false},
	} {
		r := &Resync{Window: c.window}
		if got := r.Due(c.t); got != c.due {
			t.Errorf("window %q at %s: due %v, want %v", c.window, c.t.Format("15:04"), got, c.due)
		}
	}
	var none *Resync
	if none.Due(at(1, 0)) || none.String() != "" {
		t.Error("no resync requested is never due")
	}
	for _, bad := range []string{"18:30", "25:00-01:00", "01:00-01:00", "a-b", "18:30-06:00-07:00"} {
		if _, _, err := ParseWindow(bad); err == nil {
			t.Errorf("window %q accepted", bad)
		}
	}
}
