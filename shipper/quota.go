package shipper

import "errors"

// ErrQuota: the replica refused an upload because the primary's groups would
// exceed its storage quota there (code "quota"); the group is Critical until
// the replica's administrator raises the quota or space is freed.
var ErrQuota = errors.New("the replica refused: over this primary's storage quota")
