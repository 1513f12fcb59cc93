// Package fusefs is the FUSE glue of the primary: it serves the image tree of
// a store through a go-fuse loopback whose every mutating operation is first
// recorded by a Tracker (an interface this package defines; package tracker
// satisfies it). Only this package imports go-fuse.
//
// Interception is at node level (fs/bridge.go consults node methods before
// handle methods), so every handle is covered, also the nil handle of
// truncate(2) and O_TRUNC, which arrive as SETATTR without a file handle.
//
// Decisions, each measured with go-fuse v2.12 on Linux 6.x:
//   - FUSE passthrough is disabled (CAP_PASSTHROUGH masked). As root on Linux
//     ≥ 6.9 go-fuse would otherwise register the backing fd and reads and
//     writes would bypass the server: nothing would be tracked. Handles are
//     our own type and never implement PassthroughFd.
//   - Direct I/O: opens with O_DIRECT keep O_DIRECT on the backing fd and
//     reply FOPEN_DIRECT_IO|FOPEN_PARALLEL_DIRECT_WRITES; CAP_ASYNC_DIO,
//     MaxWrite 1 MiB and MaxBackground 64 let QEMU keep several requests in
//     flight per image. Requests the backing filesystem rejects as unaligned
//     (EINVAL) are retried on a lazily opened buffered twin descriptor.
//   - Caching: buffered opens use the kernel page cache in the normal
//     (write-through) mode; writeback cache is not negotiated. Attribute and
//     entry timeouts are 1 s: the server owns the backing files.
//   - Splice is off and reads are pread into the request buffer (splice from
//     an O_DIRECT backing with dirty page cache collapsed to 5 IOPS).
//   - Xattrs are disabled: it removes a GETXATTR round trip per write and
//     keeps the image identity (user.standin.id on the backing file) out of
//     clients' reach.
//   - copy_file_range answers ENOSYS (the kernel falls back to tracked
//     READ+WRITE); ioctls answer ENOTTY; O_TMPFILE, hard links, symlinks and
//     device nodes are refused.
//   - FSYNC syncs the backing file, then checks the tracking state, then
//     replies; it never answers ENOSYS. Write intents are durable before each
//     backing write, so FSYNC has no tracking state to flush.
//   - Locks: EnableLocks is off, so the kernel keeps POSIX/OFD locks on the
//     FUSE inode itself; QEMU's byte-range locks work between every user of
//     the mount. Nobody else may touch the backing files.
//
// Interrupts: handlers ignore ctx cancellation once a mutation is recorded;
// a change is never dropped because the client was interrupted.
//
// Deadlocks: never access the mount from the serving process (go-fuse
// fs/api.go); tests run the daemon as a subprocess.
package fusefs
