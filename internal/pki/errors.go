package pki

import (
	"errors"

	"github.com/standin/standin/internal/exitcode"
)

// Sentinel errors. Callers branch with errors.Is; the messages say what to do.
var (
	ErrUnpaired = errors.New("pki: primary is not paired with this replica " +
		"(ask the replica admin for a token: standin pair token --store RSTORE, then on the primary: standin pair join TOKEN)")
	ErrRevoked = errors.New("pki: this primary's pairing was revoked on the replica " +
		"(to pair again ask the replica admin for a new token: standin pair token --store RSTORE)")
	ErrTokenExpired = errors.New("pki: pairing token expired " +
		"(ask the replica admin for a new token: standin pair token --store RSTORE)")
	ErrTokenUsed = errors.New("pki: pairing token was already used; tokens work once " +
		"(ask the replica admin for a new token: standin pair token --store RSTORE)")
	ErrTokenInvalid = errors.New("pki: pairing token is not known to this replica (wrong replica, or the token was deleted) " +
		"(ask the replica admin for a new token: standin pair token --store RSTORE)")
	ErrTokenMalformed = errors.New("pki: not a standin pairing token " +
		"(copy the whole standin1:… line printed by standin pair token)")
	ErrBadCSR = errors.New("pki: bad certificate request; the replica signs only ECDSA P-256 requests " +
		"(pair with the standin binary: standin pair join TOKEN)")
	ErrBadPrimaryName = errors.New("pki: bad primary name " +
		"(use 1 to 64 letters, digits and . _ - @: standin pair join --name NAME)")
	ErrNameTaken = errors.New("pki: a primary that is not revoked already has this name; names identify primaries for revocation " +
		"(choose another name, or revoke the other one first: standin pair revoke --store RSTORE ID)")
	ErrTokenName     = errors.New("pki: this pairing token re-pairs a primary of another name (a failover's token: the other host joins under its own name)")
	ErrAmbiguousName = errors.New("pki: several primaries have this name (revoke by ID; standin pair list --store RSTORE shows the IDs)")
	ErrNoSuchPrimary = errors.New("pki: no such primary (list them with standin pair list --store RSTORE)")
	ErrEnterprise    = errors.New("pki: the replica uses enterprise certificates, so it issues no tokens " +
		"(allow the primary's certificate with standin pair add --store RSTORE)")
)

// Code is the wire error code for err ("" when err is not a pki error).
// CodeError maps it back on the other side.
func Code(err error) string {
	for _, c := range codes {
		if errors.Is(err, c.err) {
			return c.code
		}
	}
	return ""
}

// CodeError returns the sentinel for a wire error code, or nil if code is not
// a pki code.
func CodeError(code string) error {
	for _, c := range codes {
		if c.code == code {
			return c.err
		}
	}
	return nil
}

var codes = []struct {
	err  error
	code string
	exit int
}{
	{ErrUnpaired, "unpaired", exitcode.Refused},
	{ErrRevoked, "revoked", exitcode.Refused},
	{ErrTokenExpired, "token_expired", exitcode.Refused},
	{ErrTokenUsed, "token_used", exitcode.Refused},
	{ErrTokenInvalid, "token_invalid", exitcode.Refused},
	{ErrTokenMalformed, "token_malformed", exitcode.Usage},
	{ErrBadCSR, "bad_request", exitcode.Refused},
	{ErrNoSuchPrimary, "not_found", exitcode.NotFound},
	{ErrBadPrimaryName, "bad_name", exitcode.Usage},
	{ErrNameTaken, "name_taken", exitcode.Refused},
	{ErrTokenName, "token_name", exitcode.Refused},
	{ErrAmbiguousName, "ambiguous", exitcode.Usage},
	{ErrEnterprise, "refused", exitcode.Refused},
}

func init() {
	exitcode.Register(func(err error) (int, bool) {
		for _, c := range codes {
			if errors.Is(err, c.err) {
				return c.exit, true
			}
		}
		return 0, false
	})
}
