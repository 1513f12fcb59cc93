// Package format implements the standin cycle file, version 1: the versioned
// encoding of the changed 4 KiB blocks of one disk image between two
// crash-consistent cuts. docs/format.md is the byte-level specification.
//
// A cycle file is
//
//	header | data area | extent table | block hashes | footer
//
// The header identifies the image (UUID, generation, name), the cycle (seq,
// parent, cut time, group cut ID) and the image size, and carries its own
// BLAKE3 hash. The extent table lists sorted, non-overlapping runs of blocks:
// data extents (at most MaxExtentBlocks blocks, stored as one zstd frame or
// raw) and zero extents (blocks that read as zero; nothing stored). Every
// stored block has a BLAKE3-256 hash, and the footer holds a BLAKE3-256 of the
// whole file before it, plus the offsets needed to find the table.
//
// Writing is a single sequential pass (NewWriter, WriteBlocks/WriteZero in
// ascending block order, Close), so a cycle can be staged to a pipe or a file
// that is never seeked. Hashing and compression run on WriterOptions.Workers
// goroutines.
//
// Reading uses an io.ReaderAt: Open checks the structure without reading the
// data area, Verify checks all hashes, ReadExtent returns the verified raw
// bytes of one data extent. The reader never trusts a length or offset from
// the file before bounding it by the file size. Every integrity problem is
// reported as a *CorruptError matching ErrCorrupt (and ErrTruncated for short
// files); a wrong magic is ErrNotCycle and an unknown version ErrVersion.
//
// testdata/golden-v1.cyc must keep decoding with every future build. It (and
// testdata/example-v1.cyc, the worked example of docs/format.md) can be
// regenerated after a deliberate format change with go generate.
package format

//go:generate go test -run ^(TestGolden|TestDocExample)$ -update .
