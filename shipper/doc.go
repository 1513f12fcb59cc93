// Package shipper is the primary side of replication: it sends the tracker's
// staged cycle files to a replica over mutually authenticated TLS.
//
// # Groups and schedule
//
// A replication group (Group, kept in STORE/replication.json) is the disks of
// one VM, cut together under one barrier every interval and shipped to one
// replica. Shipper runs one loop per group: cut (optionally app-consistent,
// with freeze/thaw hooks around the cut), thin base cycles against what the
// replica already holds (dedup-aware initial replication and hash-compare
// resync), upload, commit. A round that fails is retried with backoff; the
// dirty maps keep merging meanwhile, so a catch-up cycle carries the union.
//
// # Uploads
//
// Uploads are resumable from the replica's durable offset, compressed on the
// wire and throttled by a bandwidth limit with an optional time-of-day window.
// A commit turns a cut's uploaded cycles into one recovery point on the
// replica. Seeds are announced to the replica before the first catch-up.
//
// # Failover roles
//
// FinalCut ships the last cycle of a fenced group for a planned failover;
// failback.go's first round after a failback hash-checks candidate blocks and
// ships only those that differ; Relay forwards a group to a third host
// (extended replication).
//
// # Health
//
// Each group reports Hyper-V style health (Normal, Warning, Critical) with
// reasons: lag against the interval, missed cycles, refusals by the replica
// (for example "failed_over" when the group was promoted elsewhere).
package shipper
