package dedup

import "github.com/klauspost/compress/zstd"

func newTestEncoder() (*zstd.Encoder, error) { return zstd.NewWriter(nil) }
