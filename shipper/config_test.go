package shipper

import (
	"testing"
	"time"
)

func TestParseBandwidth(t *testing.T) {
	for in, want := range map[string]int64{"8Mbit": 1_000_000, "500kbit": 62_500, "2MB": 2_000_000, "": 0, "1gbit": 125_000_000} {
		got, err := ParseBandwidth(in)
		if err != nil || got != want {
			t.Errorf("ParseBandwidth(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"fast", "-1Mbit", "8Mbps"} {
		if _, err := ParseBandwidth(bad); err == nil {
			t.Errorf("ParseBandwidth(%q) accepted", bad)
		}
	}
}

func TestScheduleRate(t *testing.T) {
	w, err := ParseSchedule("08:00-18:00=2Mbit, 22:00-06:00=0")
	if err != nil {
		t.Fatal(err)
	}
	g := Group{Bandwidth: 1000, Schedule: w}
	day := time.Date(2026, 11, 22, 0, 0, 0, 0, time.Local)
	for h, want := range map[int]int64{9: 250_000, 7: 1000, 18: 1000, 23: 0, 3: 0, 20: 1000} {
		if got := g.Rate(day.Add(time.Duration(h) * time.Hour)); got != want {
			t.Errorf("%02d:00: rate %d, want %d", h, got, want)
		}
	}
	if _, err := ParseSchedule("8-18=2Mbit"); err == nil {
		t.Error("bad clock accepted")
	}
}

func TestValidate(t *testing.T) {
	ok := Group{Name: "vm1", Images: []string{"a.img", "d/b.img"}, Replica: "r:7443", Interval: 30 * time.Second}
	if err := ok.Validate(); err != nil || ok.Points != 24 || ok.PointEvery != time.Hour {
		t.Fatalf("%v %+v", err, ok)
	}
	for _, g := range []Group{
		{Name: "../x", Images: []string{"a"}, Replica: "r:1", Interval: time.Minute},
		{Name: "vm", Images: []string{"../a"}, Replica: "r:1", Interval: time.Minute},
		{Name: "vm", Images: []string{"a"}, Replica: "", Interval: time.Minute},
		{Name: "vm", Images: nil, Replica: "r:1", Interval: time.Minute},
		{Name: "vm", Images: []string{"a"}, Replica: "r:1", Interval: time.Millisecond},
	} {
		if err := g.Validate(); err == nil {
			t.Errorf("accepted %+v", g)
		}
	}
}
