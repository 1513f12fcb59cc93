package pki

import (
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"strings"
	"time"
	"unicode/utf8"
)

// TokenPrefix starts every pairing token of format version 1.
const TokenPrefix = "standin1:"

// Token is a decoded pairing token.
//
// Encoding (docs/security.md): TokenPrefix + base64url without padding of
//
//	CAFingerprint [32] | Secret [32] | Expires int64 big-endian Unix seconds [8] | Addr [n ≥ 1] | CRC-32 (IEEE) of the preceding bytes [4]
type Token struct {
	Addr          string   // replica address as given to NewToken (host:port)
	CAFingerprint [32]byte // SHA-256 of the replica CA certificate (DER)
	Secret        []byte   // 32 random bytes
	Expires       time.Time
}

const tokenFixed = 32 + 32 + 8

// String encodes the token.
func (t Token) String() string {
	b := make([]byte, 0, tokenFixed+len(t.Addr)+4)
	b = append(b, t.CAFingerprint[:]...)
	b = append(b, t.Secret...)
	b = binary.BigEndian.AppendUint64(b, uint64(t.Expires.Unix()))
	b = append(b, t.Addr...)
	b = binary.BigEndian.AppendUint32(b, crc32.ChecksumIEEE(b))
	return TokenPrefix + base64.RawURLEncoding.EncodeToString(b)
}

// ServerName is the host part of Addr, the name the replica certificate is
// verified against.
func (t Token) ServerName() string { return hostOf(t.Addr) }

// ParseToken decodes a token and checks that it has not expired (by this
// host's clock). Errors wrap ErrTokenMalformed or ErrTokenExpired.
func ParseToken(tok string) (Token, error) {
	t, err := decodeToken(tok)
	if err != nil {
		return Token{}, err
	}
	if !time.Now().Before(t.Expires) {
		return t, fmt.Errorf("%w (expired %s)", ErrTokenExpired, t.Expires.Local().Format(time.RFC3339))
	}
	return t, nil
}

func decodeToken(tok string) (Token, error) {
	tok = strings.Join(strings.Fields(tok), "") // tolerate line breaks from copy-paste
	if !strings.HasPrefix(tok, TokenPrefix) {
		if strings.HasPrefix(tok, "standin") && strings.Contains(tok, ":") {
			return Token{}, fmt.Errorf("%w: token version %q is not supported by this standin (upgrade standin on this host)",
				ErrTokenMalformed, tok[:strings.Index(tok, ":")])
		}
		return Token{}, fmt.Errorf("%w: it must start with %q", ErrTokenMalformed, TokenPrefix)
	}
	b, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(tok[len(TokenPrefix):], "="))
	if err != nil {
		return Token{}, fmt.Errorf("%w: bad encoding (incomplete copy?): %v", ErrTokenMalformed, err)
	}
	if len(b) < tokenFixed+1+4 {
		return Token{}, fmt.Errorf("%w: too short (incomplete copy?)", ErrTokenMalformed)
	}
	body, sum := b[:len(b)-4], binary.BigEndian.Uint32(b[len(b)-4:])
	if crc32.ChecksumIEEE(body) != sum {
		return Token{}, fmt.Errorf("%w: checksum mismatch (damaged or incomplete copy?)", ErrTokenMalformed)
	}
	var t Token
	copy(t.CAFingerprint[:], body[:32])
	t.Secret = append([]byte(nil), body[32:64]...)
	t.Expires = time.Unix(int64(binary.BigEndian.Uint64(body[64:72])), 0).UTC()
	t.Addr = string(body[tokenFixed:])
	if !utf8.ValidString(t.Addr) || strings.ContainsAny(t.Addr, " \t\r\n/\x00") {
		return Token{}, fmt.Errorf("%w: bad replica address", ErrTokenMalformed)
	}
	return t, nil
}
