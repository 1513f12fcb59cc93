package dedup

import (
	"context"
	"os"
	"testing"
	"time"
)

// TestThroughput measures export/import speed on a larger version of the
// test set. It is not a timed assertion; run with STANDIN_DEDUP_PERF=1.
func TestThroughput(t *testing.T) {
	if os.Getenv("STANDIN_DEDUP_PERF") == "" {
		t.Skip("set STANDIN_DEDUP_PERF=1")
	}
	var ims []*memImage
	for i := 0; i < 16; i++ { // 16 rounds of the 3-image set = 48 images, ~190 MiB
		for _, im := range testImages(uint64(100 + i%distinct())) {
			im.name = im.name + string(rune('a'+i))
			ims = append(ims, im)
		}
	}
	for _, key := range [][]byte{nil, testKey} {
		dir := t.TempDir()
		start := time.Now()
		sum, err := Export(context.Background(), []string{dir}, sources(ims), ExportOptions{Parity: 0.1, Key: key})
		if err != nil {
			t.Fatal(err)
		}
		el := time.Since(start)
		t.Logf("encrypted=%v export: %d MiB allocated, %d MiB data, %d MiB seed, ratio %.2f (data/seed %.2f), %.0f MB/s allocated, %.0f MB/s data",
			key != nil, sum.Allocated>>20, int64(sum.Chunks)*chunkSize>>20, sum.SeedBytes>>20, sum.Ratio,
			float64(sum.Chunks)*chunkSize/float64(sum.SeedBytes), float64(sum.Allocated)/el.Seconds()/1e6, float64(sum.Chunks)*chunkSize/el.Seconds()/1e6)
		start = time.Now()
		_, isum, err := importAll(t, dir, key, ImportOptions{})
		if err != nil {
			t.Fatal(err)
		}
		el = time.Since(start)
		t.Logf("import: %d MiB written at %.0f MB/s", isum.Allocated>>20, float64(isum.Allocated)/el.Seconds()/1e6)
	}
}

func distinct() int {
	if os.Getenv("STANDIN_DEDUP_PERF") == "unique" {
		return 16
	}
	return 4
}
