package daemon

import (
	"net"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/standin/standin/shipper"
	"github.com/standin/standin/tracker"
)

// primaryCollector exports the primary's status on every scrape.
type primaryCollector struct {
	st *tracker.Store
	sh *shipper.Shipper
}

var (
	descDirty   = prometheus.NewDesc("standin_image_dirty_bytes", "Bytes changed since the last cut (incl. a cut being staged).", []string{"image"}, nil)
	descWrites  = prometheus.NewDesc("standin_image_writes_total", "WRITE requests tracked.", []string{"image"}, nil)
	descTrack   = prometheus.NewDesc("standin_image_tracking_bytes_written_total", "Bytes written for tracking state.", []string{"image"}, nil)
	descHealthy = prometheus.NewDesc("standin_image_tracker_ok", "1 if the image's tracker is healthy.", []string{"image"}, nil)
	descLag     = prometheus.NewDesc("standin_group_lag_seconds", "Time since the last cut applied on the replica.", []string{"group"}, nil)
	descSent    = prometheus.NewDesc("standin_group_sent_bytes_total", "Bytes sent to the replica (cycle uploads and dedup queries).", []string{"group"}, nil)
	descSaved   = prometheus.NewDesc("standin_group_dedup_saved_bytes_total", "Cycle bytes not sent because the replica already held the blocks.", []string{"group"}, nil)
	descPending = prometheus.NewDesc("standin_group_pending_bytes", "Cycle bytes waiting to be shipped.", []string{"group"}, nil)
	descHealth  = prometheus.NewDesc("standin_group_health", "0 Normal, 1 Warning, 2 Critical.", []string{"group"}, nil)
)

func (c primaryCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descDirty, descWrites, descTrack, descHealthy, descLag, descSent, descSaved, descPending, descHealth} {
		ch <- d
	}
}

func (c primaryCollector) Collect(ch chan<- prometheus.Metric) {
	for _, im := range c.st.Status(false) {
		ch <- prometheus.MustNewConstMetric(descDirty, prometheus.GaugeValue, float64(im.DirtyBytes), im.Name)
		ch <- prometheus.MustNewConstMetric(descWrites, prometheus.CounterValue, float64(im.Writes), im.Name)
		ch <- prometheus.MustNewConstMetric(descTrack, prometheus.CounterValue, float64(im.TrackingBytes), im.Name)
		ok := 0.0
		if im.Health == "ok" {
			ok = 1
		}
		ch <- prometheus.MustNewConstMetric(descHealthy, prometheus.GaugeValue, ok, im.Name)
	}
	for _, g := range c.sh.Status() {
		ch <- prometheus.MustNewConstMetric(descLag, prometheus.GaugeValue, g.LagSeconds, g.Group)
		ch <- prometheus.MustNewConstMetric(descSent, prometheus.CounterValue, float64(g.BytesSent), g.Group)
		ch <- prometheus.MustNewConstMetric(descSaved, prometheus.CounterValue, float64(g.DedupSaved), g.Group)
		ch <- prometheus.MustNewConstMetric(descPending, prometheus.GaugeValue, float64(g.PendingBytes), g.Group)
		ch <- prometheus.MustNewConstMetric(descHealth, prometheus.GaugeValue, float64(map[string]int{"Normal": 0, "Warning": 1, "Critical": 2}[g.Health]), g.Group)
	}
}

// serveMetrics serves reg on addr until the returned stop is called.
func serveMetrics(addr string, reg *prometheus.Registry) (stop func(), err error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	s, lln := metricsServer(ln, promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	go s.Serve(lln)
	return func() { s.Close() }, nil
}
