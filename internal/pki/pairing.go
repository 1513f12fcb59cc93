package pki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"path"
	"slices"
	"strings"
	"time"

	"github.com/standin/standin/internal/fsutil"
)

// Primary is a primary host allowed to replicate to this replica.
type Primary struct {
	ID          string    `json:"id"`          // "p-…" for paired primaries (the certificate CN); the CN in enterprise mode
	Name        string    `json:"name"`        // the primary's name (its host name), for people
	Pattern     string    `json:"pattern"`     // images it may send: comma-separated path.Match globs over "GROUP/IMAGE"
	Serial      string    `json:"serial"`      // client certificate serial (hex), if known
	Fingerprint string    `json:"fingerprint"` // hex SHA-256 of the client certificate; "" = identified by CN (ID)
	Paired      time.Time `json:"paired"`
	Revoked     bool      `json:"revoked"`
	Quota       Quota     `json:"quota,omitzero"` // storage limits on the replica (quota.go); zero = unlimited
}

// TokenInfo describes an issued token for "pair list"; it never holds the secret.
type TokenInfo struct {
	ID      string    `json:"id"` // first 16 hex digits of the SHA-256 of the secret
	Addr    string    `json:"addr"`
	Pattern string    `json:"pattern"`
	Created time.Time `json:"created"`
	Expires time.Time `json:"expires"`
	Used    bool      `json:"used"`
	UsedAt  time.Time `json:"used_at"`
	UsedBy  string    `json:"used_by"` // primary ID
	Quota   Quota     `json:"quota,omitzero"`
}

type tokenRecord struct {
	Hash    string     `json:"hash"` // hex SHA-256 of the secret
	Addr    string     `json:"addr"`
	Pattern string     `json:"pattern"`
	Created time.Time  `json:"created"`
	Expires time.Time  `json:"expires"`
	UsedAt  *time.Time `json:"used_at,omitempty"`
	UsedBy  string     `json:"used_by,omitempty"`
	// Replaces: the name of the primary the pairing replaces (revokes);
	// only a pairing under this name is accepted (TokenOptions.Replaces).
	Replaces string `json:"replaces_name,omitempty"`
	Quota    Quota  `json:"quota,omitzero"` // given to the primary that joins with it
}

type tokensState struct {
	Version int           `json:"version"`
	Tokens  []tokenRecord `json:"tokens"`
}

type primariesState struct {
	Version   int       `json:"version"`
	Primaries []Primary `json:"primaries"`
}

// keepTokens is how long used or expired tokens stay listed.
const keepTokens = 30 * 24 * time.Hour

// ---- tokens -----------------------------------------------------------------

// TokenOptions describe what a pairing token grants.
type TokenOptions struct {
	// Pattern: the images the joining primary may send ("" or "*" = all;
	// otherwise comma-separated path.Match globs over "GROUP/IMAGE", e.g.
	// "db/*,web/root").
	Pattern string
	// TTL: how long the token is valid (DefaultTTL if <= 0).
	TTL time.Duration
	// Quota: given to the primary that joins with it (zero = unlimited, or
	// the replaced primary's quota with Replaces).
	Quota Quota
	// Replaces: the token re-pairs the primary of this name (a failover
	// pairs the peer host again under its name): only a pairing under this
	// name is accepted, and it revokes the primary of the name, whose
	// certificate it replaces, and keeps the name (a pairing with an
	// ordinary token under a name in use gets NAME-2, NAME-3, …).
	Replaces string
}

// NewToken issues a one-time pairing token valid for ttl that lets the
// joining primary send the images matching pattern (see TokenOptions).
func (a *Authority) NewToken(addr, pattern string, ttl time.Duration) (string, error) {
	return a.NewTokenWith(addr, TokenOptions{Pattern: pattern, TTL: ttl})
}

// NewTokenWith issues a one-time pairing token with options o. addr is the
// replica address the primary dials (host:port) and is put into the token as
// given; its host is added to the server certificate if missing. Only the
// SHA-256 of the secret is stored.
func (a *Authority) NewTokenWith(addr string, o TokenOptions) (string, error) {
	pattern, ttl, q := o.Pattern, o.TTL, o.Quota
	if o.Replaces != "" {
		if err := checkPrimaryName(o.Replaces); err != nil {
			return "", err
		}
	}
	if err := q.check(); err != nil {
		return "", err
	}
	if a.enterprise {
		return "", ErrEnterprise
	}
	addr = strings.TrimSpace(addr)
	if addr == "" || len(addr) > 512 || strings.ContainsAny(addr, " \t\r\n/") {
		return "", fmt.Errorf("pki: replica address %q: give host:port as the primary reaches the replica", addr)
	}
	host, err := normalizeHost(addr)
	if err != nil {
		return "", err
	}
	pattern, err = NormalizePattern(pattern)
	if err != nil {
		return "", err
	}
	if ttl <= 0 {
		ttl = DefaultTTL
	}
	secret := make([]byte, 32)
	if _, err := rand.Read(secret); err != nil {
		return "", fmt.Errorf("pki: %w", err)
	}
	now := a.now()
	expires := time.Unix(now.Add(ttl).Unix(), 0).UTC() // the token carries whole seconds
	sum := sha256.Sum256(secret)

	a.mu.Lock()
	defer a.mu.Unlock()
	unlock, err := a.flock()
	if err != nil {
		return "", err
	}
	defer unlock()
	if err := a.addServerHost(host); err != nil {
		return "", err
	}
	st, err := a.readTokens()
	if err != nil {
		return "", err
	}
	st.Tokens = slices.DeleteFunc(st.Tokens, func(t tokenRecord) bool {
		end := t.Expires
		if t.UsedAt != nil {
			end = *t.UsedAt
		}
		return now.Sub(end) > keepTokens
	})
	st.Tokens = append(st.Tokens, tokenRecord{
		Hash: hex.EncodeToString(sum[:]), Addr: addr, Pattern: pattern,
		Created: now.UTC(), Expires: expires, Replaces: o.Replaces, Quota: q,
	})
	if err := a.writeTokens(st); err != nil {
		return "", err
	}
	return Token{Addr: addr, CAFingerprint: a.CAFingerprint(), Secret: secret, Expires: expires}.String(), nil
}

// addServerHost makes sure host is a SAN of the server certificate, so that
// the primary can verify the name it dials. Call with a.mu and flock held.
func (a *Authority) addServerHost(host string) error {
	if host == "" || slices.Contains(a.wantHosts(), host) {
		return nil
	}
	var st hostsState
	if err := fsutil.ReadJSON(a.path(hostsFile), &st); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("pki: %w", err)
	}
	st.Extra = append(st.Extra, host)
	if err := fsutil.WriteJSON(a.path(hostsFile), st); err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	return a.ensureServerCert()
}

// Tokens lists the issued tokens (used and expired ones for 30 days).
func (a *Authority) Tokens() []TokenInfo {
	a.mu.Lock()
	defer a.mu.Unlock()
	st, _ := a.readTokens()
	out := make([]TokenInfo, 0, len(st.Tokens))
	for _, t := range st.Tokens {
		ti := TokenInfo{ID: tokenID(t.Hash), Addr: t.Addr, Pattern: t.Pattern, Created: t.Created,
			Expires: t.Expires, Used: t.UsedAt != nil, UsedBy: t.UsedBy, Quota: t.Quota}
		if t.UsedAt != nil {
			ti.UsedAt = *t.UsedAt
		}
		out = append(out, ti)
	}
	return out
}

// DeleteToken withdraws an issued token by its TokenInfo.ID (or a prefix of
// at least 6 hex digits that matches one token).
func (a *Authority) DeleteToken(id string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	unlock, err := a.flock()
	if err != nil {
		return err
	}
	defer unlock()
	st, err := a.readTokens()
	if err != nil {
		return err
	}
	n := 0
	if len(id) >= 6 {
		st.Tokens = slices.DeleteFunc(st.Tokens, func(t tokenRecord) bool {
			m := strings.HasPrefix(t.Hash, strings.ToLower(id))
			if m {
				n++
			}
			return m
		})
	}
	if n != 1 {
		return fmt.Errorf("pki: token %q: %d tokens match (see standin pair list)", id, n)
	}
	return a.writeTokens(st)
}

func tokenID(hash string) string { return hash[:min(16, len(hash))] }

func (a *Authority) readTokens() (tokensState, error) {
	st := tokensState{Version: 1}
	return st, readState(a.path(tokensFile), &st)
}

func (a *Authority) writeTokens(st tokensState) error {
	st.Version = 1
	return writeState(a.path(tokensFile), st)
}

// readState loads a JSON state file into st; a missing file leaves st as is.
func readState(path string, st any) error {
	err := fsutil.ReadJSON(path, st)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("pki: %w", err)
	}
	return nil
}

// writeState replaces a JSON state file atomically.
func writeState(path string, st any) error {
	if err := fsutil.WriteJSON(path, st); err != nil {
		return fmt.Errorf("pki: %w", err)
	}
	return nil
}

// ---- join -------------------------------------------------------------------

// Join is the replica's handling of a pairing request. It checks the token
// secret (constant time), that the token is unused and not expired, and the
// CSR (ECDSA P-256 only); marks the token used durably; signs a client
// certificate (CN = new primary ID "p-…", client-auth only, 5 years); records
// the primary in primaries.json, under a name no other primary that is not
// revoked has (NAME-2, NAME-3, … if NAME is taken; see TokenOptions.Replaces); and
// returns the certificate and CA PEM. A token is consumed only by a request
// that passes every check, so a bad CSR or name can be retried with the same
// token.
func (a *Authority) Join(secret []byte, csrPEM []byte, primaryName string) (certPEM, caPEM []byte, p Primary, err error) {
	if a.enterprise {
		return nil, nil, Primary{}, ErrEnterprise
	}
	if err := checkPrimaryName(primaryName); err != nil {
		return nil, nil, Primary{}, err
	}
	csr, err := parseCSR(csrPEM)
	if err != nil {
		return nil, nil, Primary{}, err
	}
	sum := sha256.Sum256(secret)

	a.mu.Lock()
	defer a.mu.Unlock()
	unlock, err := a.flock()
	if err != nil {
		return nil, nil, Primary{}, err
	}
	defer unlock()
	now := a.now()
	st, err := a.readTokens()
	if err != nil {
		return nil, nil, Primary{}, err
	}
	idx := -1
	for i, t := range st.Tokens { // no early exit: time does not depend on which token matches
		h, _ := hex.DecodeString(t.Hash)
		if subtle.ConstantTimeCompare(h, sum[:]) == 1 && len(secret) == 32 {
			idx = i
		}
	}
	if idx < 0 {
		return nil, nil, Primary{}, ErrTokenInvalid
	}
	tok := &st.Tokens[idx]
	if tok.UsedAt != nil {
		return nil, nil, Primary{}, fmt.Errorf("%w (used %s by %s)", ErrTokenUsed, tok.UsedAt.Format(time.RFC3339), tok.UsedBy)
	}
	if !now.Before(tok.Expires) {
		return nil, nil, Primary{}, fmt.Errorf("%w (expired %s)", ErrTokenExpired, tok.Expires.Format(time.RFC3339))
	}
	if tok.Replaces != "" && primaryName != tok.Replaces {
		return nil, nil, Primary{}, fmt.Errorf("%w: this token re-pairs the primary %q, not %q", ErrTokenName, tok.Replaces, primaryName)
	}
	ps, err := a.readPrimaries()
	if err != nil {
		return nil, nil, Primary{}, err
	}
	if tok.Replaces == "" {
		// Names identify primaries (pair list, revoke): a host that pairs
		// again under a name in use (a second address, a new extension)
		// becomes NAME-2, NAME-3, …
		primaryName = uniqueName(ps, primaryName)
	}

	p = Primary{ID: "p-" + randHex(8), Name: primaryName, Pattern: tok.Pattern, Paired: now.UTC(), Quota: tok.Quota}
	tmpl := &x509.Certificate{
		SerialNumber: randSerial(),
		Subject:      pkix.Name{Organization: []string{"standin"}, OrganizationalUnit: []string{"primary"}, CommonName: p.ID},
		NotBefore:    now.Add(-backdate),
		NotAfter:     now.Add(clientValidity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.caCert, csr.PublicKey, a.caKey)
	if err != nil {
		return nil, nil, Primary{}, fmt.Errorf("pki: sign client certificate: %w", err)
	}
	fp := sha256.Sum256(der)
	p.Serial = tmpl.SerialNumber.Text(16)
	p.Fingerprint = hex.EncodeToString(fp[:])

	// Single use: the token is marked used durably before anything is returned.
	used := now.UTC()
	tok.UsedAt, tok.UsedBy = &used, p.ID
	if err := a.writeTokens(st); err != nil {
		return nil, nil, Primary{}, err
	}
	if tok.Replaces != "" {
		for i := range ps.Primaries {
			if ps.Primaries[i].Name == primaryName {
				if !ps.Primaries[i].Revoked && p.Quota == (Quota{}) {
					p.Quota = ps.Primaries[i].Quota // the replacement keeps the replaced primary's quota
				}
				ps.Primaries[i].Revoked = true // replaced by p
			}
		}
	}
	ps.Primaries = append(ps.Primaries, p)
	if err := a.writePrimaries(ps); err != nil {
		return nil, nil, Primary{}, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), a.CAPEM(), p, nil
}

func parseCSR(csrPEM []byte) (*x509.CertificateRequest, error) {
	blk, _ := pem.Decode(csrPEM)
	if blk == nil || blk.Type != "CERTIFICATE REQUEST" {
		return nil, fmt.Errorf("%w: no PEM CERTIFICATE REQUEST", ErrBadCSR)
	}
	csr, err := x509.ParseCertificateRequest(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadCSR, err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadCSR, err)
	}
	k, ok := csr.PublicKey.(*ecdsa.PublicKey)
	if !ok || k.Curve != elliptic.P256() {
		return nil, fmt.Errorf("%w: key is %T, not ECDSA P-256", ErrBadCSR, csr.PublicKey)
	}
	return csr, nil
}

func checkPrimaryName(name string) error {
	if name == "" || len(name) > 64 {
		return fmt.Errorf("%w: %q must be 1 to 64 characters", ErrBadPrimaryName, name)
	}
	for _, c := range name {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune("._-@", c)) {
			return fmt.Errorf("%w: %q: use letters, digits and . _ - @ only", ErrBadPrimaryName, name)
		}
	}
	return nil
}

// uniqueName returns name, or name-N with the smallest N ≥ 2 that no
// primary of st has, if a primary that is not revoked has name.
func uniqueName(st primariesState, name string) string {
	if nameTaken(st, name, -1) == nil {
		return name
	}
	used := map[string]bool{}
	for _, p := range st.Primaries {
		used[p.Name] = true
	}
	for n := 2; ; n++ {
		suf := fmt.Sprintf("-%d", n)
		c := name[:min(len(name), 64-len(suf))] + suf
		if !used[c] {
			return c
		}
	}
}

// nameTaken refuses name if a primary of st other than the one at skip
// (-1: none) that is not revoked already has it.
func nameTaken(st primariesState, name string, skip int) error {
	for i, p := range st.Primaries {
		if i != skip && !p.Revoked && p.Name == name {
			return fmt.Errorf("%w: %q is primary %s (pattern %s, paired %s)", ErrNameTaken, name, p.ID, p.Pattern, p.Paired.Format(time.RFC3339))
		}
	}
	return nil
}

// ---- primaries ------------------------------------------------------------

func (a *Authority) readPrimaries() (primariesState, error) {
	st := primariesState{Version: 1}
	return st, readState(a.path(primariesFile), &st)
}

// writePrimaries stores st and updates the cache. Call with a.mu and flock held.
func (a *Authority) writePrimaries(st primariesState) error {
	st.Version = 1
	if err := writeState(a.path(primariesFile), st); err != nil {
		return err
	}
	a.primaries, a.primStamp = st.Primaries, stampOf(a.path(primariesFile))
	return nil
}

// reloadPrimaries refreshes the cache if primaries.json changed (another
// Authority or process wrote it). Call with a.mu held.
func (a *Authority) reloadPrimaries() error {
	s := stampOf(a.path(primariesFile))
	if s == a.primStamp && a.primStamp != (fileStamp{}) {
		return nil
	}
	st, err := a.readPrimaries()
	if err != nil {
		return err
	}
	a.primaries, a.primStamp = st.Primaries, s
	return nil
}

// Primaries lists the primaries, revoked ones included.
func (a *Authority) Primaries() []Primary {
	a.mu.Lock()
	defer a.mu.Unlock()
	_ = a.reloadPrimaries() // on error keep the last good list
	return slices.Clone(a.primaries)
}

// Revoke revokes the primary with this ID, or else the one primary with this
// name (ErrAmbiguousName if several primaries that are not revoked have it:
// revoke by ID). It is durable and takes effect at once for Authorize (every request,
// also on open connections). Revoking a revoked primary is not an error.
func (a *Authority) Revoke(idOrName string) error {
	byName := func(ps []Primary) (func(Primary) bool, error) {
		// By name: the one primary of that name that is not revoked (if
		// every one is, revoking them again changes nothing).
		var live []string
		for _, p := range ps {
			if p.Name == idOrName && !p.Revoked {
				live = append(live, p.ID)
			}
		}
		switch {
		case len(live) > 1:
			return nil, fmt.Errorf("%w: %q is %s", ErrAmbiguousName, idOrName, strings.Join(live, ", "))
		case len(live) == 1:
			return func(p Primary) bool { return p.ID == live[0] }, nil
		default:
			return func(p Primary) bool { return p.Name == idOrName }, nil
		}
	}
	return a.updatePrimaries(idOrName, byName, func(p *Primary) { p.Revoked = true })
}

// updatePrimaries applies update to the primary with this ID, or else to
// those byName picks (given the whole list), and stores the list durably.
// ErrNoSuchPrimary if none matches.
func (a *Authority) updatePrimaries(idOrName string, byName func([]Primary) (func(Primary) bool, error), update func(*Primary)) error {
	if idOrName == "" {
		return fmt.Errorf("%w: give a primary ID or name", ErrNoSuchPrimary)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	unlock, err := a.flock()
	if err != nil {
		return err
	}
	defer unlock()
	st, err := a.readPrimaries()
	if err != nil {
		return err
	}
	match := func(p Primary) bool { return p.ID == idOrName }
	if !slices.ContainsFunc(st.Primaries, match) {
		if match, err = byName(st.Primaries); err != nil {
			return err
		}
	}
	n := 0
	for i := range st.Primaries {
		if match(st.Primaries[i]) {
			update(&st.Primaries[i])
			n++
		}
	}
	if n == 0 {
		return fmt.Errorf("%w: %q", ErrNoSuchPrimary, idOrName)
	}
	return a.writePrimaries(st)
}

// AddPrimary puts a primary on the allow-list without pairing: the enterprise
// mode entry, also accepted in own-CA mode for a certificate issued by the
// replica CA. certFingerprintOrCN is either the SHA-256 fingerprint of the
// client certificate (64 hex digits, colons and a "sha256:" prefix allowed)
// or its subject CN. An existing entry for the same certificate or CN is
// updated and un-revoked.
func (a *Authority) AddPrimary(name, pattern, certFingerprintOrCN string) error {
	if err := checkPrimaryName(name); err != nil {
		return err
	}
	pattern, err := NormalizePattern(pattern)
	if err != nil {
		return err
	}
	fp, cn := parseFingerprint(certFingerprintOrCN), ""
	if fp == "" {
		cn = strings.TrimSpace(certFingerprintOrCN)
		if cn == "" {
			return errors.New("pki: give the primary certificate's SHA-256 fingerprint or subject CN")
		}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	unlock, err := a.flock()
	if err != nil {
		return err
	}
	defer unlock()
	st, err := a.readPrimaries()
	if err != nil {
		return err
	}
	i := slices.IndexFunc(st.Primaries, func(p Primary) bool {
		if fp != "" {
			return p.Fingerprint == fp
		}
		return p.Fingerprint == "" && p.ID == cn
	})
	if i < 0 {
		id := cn
		if fp != "" {
			id = "p-" + randHex(8)
		}
		st.Primaries = append(st.Primaries, Primary{ID: id, Fingerprint: fp, Paired: a.now().UTC()})
		i = len(st.Primaries) - 1
	}
	if err := nameTaken(st, name, i); err != nil {
		return err
	}
	st.Primaries[i].Name, st.Primaries[i].Pattern, st.Primaries[i].Revoked = name, pattern, false
	return a.writePrimaries(st)
}

func parseFingerprint(s string) string {
	s = strings.ToLower(strings.TrimSpace(s))
	s = strings.TrimPrefix(s, "sha256:")
	s = strings.ReplaceAll(s, ":", "")
	if len(s) != 64 {
		return ""
	}
	if _, err := hex.DecodeString(s); err != nil {
		return ""
	}
	return s
}

// Authorize maps the verified peer of a connection to a paired, non-revoked
// primary. The client certificate is verified again here against the client
// CA (client-auth usage), so Authorize does not depend on how the listener was
// configured. A primary matches by certificate fingerprint, or by subject CN
// for entries without a fingerprint (enterprise mode). Errors: ErrUnpaired
// (no certificate, one that does not verify, or one not on the list),
// ErrRevoked.
func (a *Authority) Authorize(state *tls.ConnectionState) (Primary, error) {
	if state == nil || len(state.PeerCertificates) == 0 {
		return Primary{}, fmt.Errorf("%w (no client certificate)", ErrUnpaired)
	}
	leaf := state.PeerCertificates[0]
	inter := x509.NewCertPool()
	for _, c := range state.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{
		Roots: a.clientPool, Intermediates: inter, CurrentTime: a.now(),
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}); err != nil {
		return Primary{}, fmt.Errorf("%w (client certificate: %v)", ErrUnpaired, err)
	}
	fp, cn := Fingerprint(leaf), leaf.Subject.CommonName

	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.reloadPrimaries(); err != nil && a.primaries == nil {
		return Primary{}, err
	}
	var found *Primary
	for i := range a.primaries {
		p := &a.primaries[i]
		if p.Fingerprint != "" && p.Fingerprint == fp || p.Fingerprint == "" && cn != "" && p.ID == cn {
			if p.Revoked { // any revoked entry for this certificate wins
				return *p, fmt.Errorf("%w (primary %s %s)", ErrRevoked, p.ID, p.Name)
			}
			if found == nil {
				found = p
			}
		}
	}
	if found == nil {
		return Primary{}, fmt.Errorf("%w (certificate %s, CN %q is not on the allow-list)", ErrUnpaired, fp[:16], cn)
	}
	return *found, nil
}

// ---- patterns ---------------------------------------------------------------

// NormalizePattern checks an image pattern and returns its canonical form:
// "*" for everything ("" or any "*" element), else the trimmed globs joined by
// ",". Each glob must be a valid path.Match pattern with one "/", matched
// against "GROUP/IMAGE".
func NormalizePattern(pattern string) (string, error) {
	if strings.TrimSpace(pattern) == "" {
		return "*", nil
	}
	var out []string
	for _, g := range strings.Split(pattern, ",") {
		g = strings.TrimSpace(g)
		if g == "*" {
			return "*", nil
		}
		if g == "" {
			return "", fmt.Errorf("pki: pattern %q has an empty element", pattern)
		}
		if _, err := path.Match(g, ""); err != nil {
			return "", fmt.Errorf("pki: pattern %q: %w", g, err)
		}
		if strings.Count(g, "/") != 1 {
			return "", fmt.Errorf("pki: pattern %q: use GROUP/IMAGE globs such as db/* or */web (or * for all)", g)
		}
		out = append(out, g)
	}
	return strings.Join(out, ","), nil
}

// Allowed reports whether p may send image IMAGE of group GROUP: p is not
// revoked, both names are plain names (no "/", not "." or ".."), and
// "GROUP/IMAGE" matches one of p's globs ("" and "*" allow everything).
func (p Primary) Allowed(group, image string) bool {
	if p.Revoked || !plainName(group) || !plainName(image) {
		return false
	}
	name := group + "/" + image
	if strings.TrimSpace(p.Pattern) == "" {
		return true
	}
	for _, g := range strings.Split(p.Pattern, ",") {
		g = strings.TrimSpace(g)
		if g == "*" {
			return true
		}
		if ok, _ := path.Match(g, name); ok {
			return true
		}
	}
	return false
}

// AllowedGroup reports whether p may send some image of group GROUP at all:
// p is not revoked, the group is a plain name, and the group part of one of
// p's globs matches it ("" and "*" allow every group). A request about a
// group outside every glob is refused before anything of it is looked up.
func (p Primary) AllowedGroup(group string) bool {
	if p.Revoked || !plainName(group) {
		return false
	}
	if strings.TrimSpace(p.Pattern) == "" {
		return true
	}
	for _, g := range strings.Split(p.Pattern, ",") {
		g = strings.TrimSpace(g)
		if g == "*" {
			return true
		}
		gp, _, ok := strings.Cut(g, "/")
		if !ok {
			continue
		}
		if m, _ := path.Match(gp, group); m {
			return true
		}
	}
	return false
}

func plainName(s string) bool {
	return s != "" && s != "." && s != ".." && !strings.ContainsAny(s, "/\x00")
}

// hostOf is the host part of addr ("host:port", "[v6]:port" or a bare host).
func hostOf(addr string) string {
	if h, _, err := net.SplitHostPort(addr); err == nil {
		return h
	}
	return strings.TrimSuffix(strings.TrimPrefix(addr, "["), "]")
}
