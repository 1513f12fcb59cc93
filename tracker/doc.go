// Package tracker records which 4 KiB blocks of each image changed, keeps
// that knowledge crash-safe, and cuts crash-consistent cycles.
//
// Per image it keeps, in memory, a roaring bitmap of dirty blocks and, on
// disk (STORE/state/ID/):
//   - active: the write-intent bitmap, one bit per extent (4 MiB). Before the
//     first mutation of an extent whose bit is not durable, the bit is written
//     and fdatasynced (concurrent requests are group-committed). So no data
//     can reach the image in an extent the tracker could forget.
//   - dirty: a checkpoint of the dirty map (plus a frozen set still being
//     staged), written atomically every CheckpointInterval, after each cut
//     and at shutdown; after it is durable, extents not touched during the
//     last whole interval are cleared from active. The first checkpoint
//     after blocks left the dirty map (staged by a cut or a seed, or clipped
//     past a shrunken end) fdatasyncs the image before it writes: a block
//     leaves the recovery sets only once its data is durable in the image.
//   - clean: present only after a clean shutdown; removed before the first
//     write is accepted.
//
// After a crash: dirty = checkpoint ∪ every block of every active extent —
// never fewer than were written, bounded by the extents touched in the last
// two CheckpointIntervals (not the disk). See docs/design.md for the ordering
// rules.
//
// A cut takes every named image's write barrier (a RWMutex each mutation
// holds shared while it marks and performs its backing operation), swaps the
// dirty map for an empty one and releases the barrier; staging then reads the
// frozen blocks into a cycle file. A mutation that hits a frozen, not yet
// staged block first saves its old content (copy-before-write), so the cycle
// is exactly the image at the cut.
package tracker
