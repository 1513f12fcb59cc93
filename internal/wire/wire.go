// Package wire holds the replication protocol shared by shipper (primary)
// and applier (replica): paths, request and reply bodies. HTTPS with mutual
// TLS; every body is JSON except cycle uploads (raw bytes).
//
//	POST /v1/pair                                   PairRequest → PairReply (no client cert; token-authenticated)
//	GET  /v1/groups/{group}/uploads/{id}/{gen}/{seq}   → UploadState  (durable bytes of a cycle upload)
//	PUT  /v1/groups/{group}/uploads/{id}/{gen}/{seq}?offset=N&total=T&name=IMAGE   body: bytes [N, N+len)
//	                                                → UploadState; 409 Conflict with the durable offset if N is wrong
//	POST /v1/groups/{group}/commit                  CommitRequest → CommitReply (apply a cut's cycles as one point)
//	GET  /v1/groups/{group}                          → GroupState
//	POST /v1/groups/{group}/seed                    SeedExpect → GroupState (the seed the relationship starts from)
//	DELETE /v1/groups/{group}/uploads/{id}/{gen}/{seq}?name=IMAGE  discard an unapplied upload (another variant follows)
//	POST /v1/groups/{group}/images/{id}/held?name=IMAGE   body: block hashes (EncodeHeld) → 1 status byte per block
//	GET  /v1/groups/{group}/images/{id}/regions?name=IMAGE&blocks=N&from=R&count=C  → 32-byte region hashes
//
// The last two serve dedup-aware initial replication and hash-compare resync
// (see chunks.go).
package wire

import "time"

// Version prefix of every path.
const Prefix = "/v1"

// PairRequest asks the replica for a client certificate.
type PairRequest struct {
	Secret []byte `json:"secret"` // the token's secret
	CSR    []byte `json:"csr"`    // PEM
	Name   string `json:"name"`   // the primary's name (hostname)
}

// PairReply carries the primary's client certificate and the replica CA.
type PairReply struct {
	Cert      []byte `json:"cert"`
	CA        []byte `json:"ca"`
	PrimaryID string `json:"primary_id"`
}

// UploadState is how much of a cycle upload is durable on the replica.
type UploadState struct {
	// FileHash is the whole-file hash (hex, from the cycle footer) of the
	// variant being received or complete, when the uploader named it (PUT
	// ?hash=): a thinned and a full cycle share id/gen/seq.
	FileHash string `json:"file_hash,omitempty"`
	Offset   int64  `json:"offset"`   // durable bytes received
	Complete bool   `json:"complete"` // all bytes received and the file verified
	Applied  bool   `json:"applied"`  // already applied (a replay of an applied cycle)
	Error    string `json:"error,omitempty"`
}

// CycleRef names one uploaded cycle.
type CycleRef struct {
	ID  string `json:"id"`
	Gen uint64 `json:"generation"`
	Seq uint64 `json:"seq"`
}

// CommitRequest applies the uploaded cycles of one cut (all images of the
// group cut under one barrier) and records one recovery point.
type CommitRequest struct {
	GroupCut string     `json:"group_cut"`
	Cycles   []CycleRef `json:"cycles"`
	Policy   Policy     `json:"policy"`
	// AppConsistent: the cut was taken while the group's applications were
	// quiesced. Its cycles carry the same flag in their (verified) headers,
	// which is what the replica records.
	AppConsistent bool `json:"app_consistent,omitempty"`
}

// Policy is the group's retention, sent with every commit so the replica
// follows changes made on the primary.
type Policy struct {
	Interval       time.Duration `json:"interval"`
	Points         int           `json:"points"`
	PointEvery     time.Duration `json:"point_every"`
	AnyPointWindow time.Duration `json:"any_point_window"`
}

// CommitReply says which point the commit produced.
type CommitReply struct {
	Point   string    `json:"point"`
	Time    time.Time `json:"time"`
	Skipped bool      `json:"skipped"` // already applied
	// AppConsistent: the point was recorded app-consistent.
	AppConsistent bool `json:"app_consistent,omitempty"`
}

// ImageState is the replica's state of one image.
type ImageState struct {
	ID         string `json:"id"`
	Name       string `json:"name"`
	Generation uint64 `json:"generation"`
	Seq        uint64 `json:"seq"`
}

// GroupState is the replica's state of a group.
type GroupState struct {
	Group  string       `json:"group"`
	Images []ImageState `json:"images"`
}

// Error is the body of every non-2xx reply.
type Error struct {
	Error string `json:"error"`
	Code  string `json:"code"` // "unpaired", "revoked", "forbidden", "corrupt", "refused", "conflict", "bad_request", "failure", "missing_chunks", "variant", "no_image", "failed_over"
	// Missing lists, with code "missing_chunks", the ref blocks of a commit
	// that the replica could not resolve (nothing was applied).
	Missing []MissingBlocks `json:"missing,omitempty"`
}

// MissingBlocks are the unresolvable ref blocks of one cycle, as [start,
// count] runs of 4 KiB blocks.
type MissingBlocks struct {
	CycleRef
	Runs [][2]uint64 `json:"runs"`
}

// SeedExpect announces, after 'standin seed export', the seed a group's
// relationship starts from: the replica checks a seed import against it
// (identity, generation and cut of every image, and its content).
type SeedExpect struct {
	GroupCut string       `json:"group_cut"`
	Time     time.Time    `json:"time"`
	Images   []ImageState `json:"images"` // Seq = the seed's cut
	// Roots maps every image id to the root of its seed manifest (hex
	// BLAKE3 over the image's chunk list, dedup.Manifest.Root): a seed
	// with the right ids but other content has another root. Absent from
	// primaries older than the check.
	Roots map[string]string `json:"roots,omitempty"`
}
