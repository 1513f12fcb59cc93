// Package applier is the replica side of standin: it receives cycle files,
// verifies them and turns them into point-in-time recovery points.
//
// # Store
//
// A replica store (OpenReplica) holds, per replication group, the latest
// image of every disk as a plain sparse raw file plus undo logs for older
// points (undo.go): reading point P means the undo logs after P, then the
// image. An apply (replica.go) verifies every cycle of a cut, checks what can
// be checked before anything changes (validate.go), writes a durable commit
// record, saves the old content of overwritten blocks and applies; a crash at
// any step is finished or rolled back at the next open, so every shown point
// is complete. An apply that cannot finish is dropped by hand (repair.go).
// Retention and pins decide which points are kept (points.go, pins.go); a disk
// re-created on the primary retires the old image (retire.go); the scrub
// re-reads points and promotion copies against their hashes (scrub.go).
//
// # Receiver
//
// Server (server.go) is the HTTPS API primaries talk to over mutual TLS:
// pairing, resumable uploads into a durable inbox (inbox.go cleans it), and
// commits that apply a cut as one recovery point. Every request is authorized
// once, against the group and the held image (server_authz.go); per-primary
// quotas and connection limits bound what one tenant can take (quota.go,
// server_limits.go). Chunk queries (held.go, chunks.go, refs.go) let a
// primary send only blocks the replica lacks.
//
// # Failover
//
// Test failover overlays a writable copy on a point (testfailover.go);
// promotion copies a point into a primary store, prepared ahead of time
// where possible (failover.go, prepare.go); Adopt takes a demoted primary's
// images as the newest point; ForwardCut builds merged deltas for a third
// host (forward.go).
//
// ApplyFiles (file.go) brings a plain image file to a cut without a store
// (standin cycle apply).
package applier
