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
	Code  string `json:"code"` // "unpaired", "revoked", "forbidden", "corrupt", "refused", "conflict", "bad_request", "failure"
}

// SeedExpect announces, after 'standin seed export', the seed a group's
// relationship starts from: the replica checks a seed import against it
// (identity, generation and cut of every image).
type SeedExpect struct {
	GroupCut string       `json:"group_cut"`
	Time     time.Time    `json:"time"`
	Images   []ImageState `json:"images"` // Seq = the seed's cut
}
