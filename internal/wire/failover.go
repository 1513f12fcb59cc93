package wire

import (
	"encoding/hex"
	"fmt"
	"time"
)

// POST /v1/groups/{group}/failover, sent by the group's (old) primary to its
// replica:
//
//   - Kind "planned": the primary has fenced the group's images and shipped a
//     final cycle; Images carry its final state and BLAKE3 roots. The replica
//     checks that its latest point is that state, promotes it to a tracked
//     primary in its host's primary store (verifying the roots on the bytes it
//     writes), joins the requester's replica store with Token and starts
//     replicating back. The old primary then adopts its images as that
//     replica store's copy: nothing is copied over the network.
//
//   - Kind "reverse": failback after an unplanned failover. The replica was
//     promoted already (standin failover unplanned); the old primary has
//     fenced its images and becomes the replica: the new primary joins with
//     Token and starts a hash-compare resync, so only differing blocks travel.
//
//   - Kind "prepare": before a planned failover (the VM still runs), the
//     replica copies its latest point into its host's primary store, so the
//     promotion only brings that copy forward by the blocks changed since.
//     "cancel" drops such a copy (a failover that was given up).
//
// Both are idempotent: a repeated request finds the promotion done and only
// (re)does what is missing.
type FailoverRequest struct {
	Kind   string          `json:"kind"`
	Images []FailoverImage `json:"images"`
	// Token pairs the new primary with the requester's replica store (the
	// reverse direction); Replica is that store's HOST:PORT as the new
	// primary reaches it ("" = the address in the token).
	Token   string `json:"token"`
	Replica string `json:"replica,omitempty"`
	Peer    string `json:"peer"` // the requester's name (host name)
	// Settings of the relationship, taken over by the reverse direction.
	Interval       time.Duration `json:"interval"`
	Points         int           `json:"points"`
	PointEvery     time.Duration `json:"point_every"`
	AnyPointWindow time.Duration `json:"any_point_window"`
	Bandwidth      int64         `json:"bandwidth"`
	Compress       string        `json:"compress"`
	DryRun         bool          `json:"dry_run,omitempty"`
}

// FailoverImage is one image's state on one side.
type FailoverImage struct {
	ID         string `json:"id"`
	Name       string `json:"name"`
	Generation uint64 `json:"generation"`
	Seq        uint64 `json:"seq"` // planned: the final cut; reverse: the last cut the old primary took
	Size       int64  `json:"size"`
	Root       string `json:"root,omitempty"` // hex BLAKE3 root (root.go)
	// Candidates (reverse): the blocks the old primary changed that the
	// replica may not have applied — its dirty map and its staged cycles —
	// as a serialized roaring bitmap.
	Candidates []byte `json:"candidates,omitempty"`
}

// FailoverReply is the new primary's state.
type FailoverReply struct {
	Point    string          `json:"point"` // the recovery point promoted
	Time     time.Time       `json:"time"`  // its cut time
	Images   []FailoverImage `json:"images"`
	Promoted time.Time       `json:"promoted"`
	Message  string          `json:"message,omitempty"`
	Plan     []string        `json:"plan,omitempty"` // dry run: what would happen
	// Host: the host name of the replica that answers, the name it pairs
	// back under (the old primary's replacing token is tied to it).
	Host string `json:"host,omitempty"`
}

// RootHex spells a root for FailoverImage.Root.
func RootHex(r [32]byte) string { return hex.EncodeToString(r[:]) }

// ParseRoot parses FailoverImage.Root.
func ParseRoot(s string) ([32]byte, error) {
	var r [32]byte
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != 32 {
		return r, fmt.Errorf("root %q: want 64 hex digits", s)
	}
	copy(r[:], b)
	return r, nil
}
