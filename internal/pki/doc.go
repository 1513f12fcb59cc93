// Package pki is standin's pairing and TLS layer (design section 7, invariant I6:
// nobody unauthenticated gets in).
//
// The replica owns a small private certificate authority (Authority, kept in
// RSTORE/pki/). Pairing is one copy-paste: the replica admin runs
// "standin pair token", which calls NewToken and prints a self-contained token
// "standin1:…" that carries the replica address, the SHA-256 fingerprint of the
// replica CA, a 32-byte random secret and the expiry. On the primary,
// ParseToken decodes it, NewCSR makes a key, and the pairing request is sent
// over a connection configured by PinnedClientTLS, which trusts only a CA with
// exactly the pinned fingerprint. The replica's pairing handler calls Join,
// which checks the secret (constant time, single use, expiry), signs the CSR as
// a client certificate for a new primary ID and records the primary. From then
// on the primary talks mutual TLS with ClientTLS, and every replica endpoint
// except pairing calls Authorize and Primary.Allowed.
//
// Enterprise PKI: OpenAuthorityWithCerts serves a given certificate and accepts
// client certificates that chain to a given CA bundle; a primary is identified
// by its subject CN (or certificate fingerprint) and must be on the allow-list
// (AddPrimary). Tokens are not used in that mode.
//
// Files in the authority directory (all 0600, directory 0700, every change
// written tmp + fsync + rename + fsync(dir)): ca.pem, ca.key, server.pem (leaf
// followed by the CA), server.key, hosts.json (extra server names added by
// NewToken), tokens.json (SHA-256 of each secret, never the secret),
// primaries.json, and the lock file .lock.
//
// Lock order: Authority.mu (one mutex per directory, shared by every
// Authority of that directory in the process) before the flock on dir/.lock
// (taken by every operation that writes state, so the daemon and a CLI that
// opens the same directory do not lose each other's updates). Readers
// (Authorize, Primaries, the TLS certificate callback) take only mu and reload
// a file when its inode, size or mtime changed.
//
// docs/security.md has the threat model.
package pki
