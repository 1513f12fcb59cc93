package dedup

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/zeebo/blake3"
)

// KeySize is the length of a seed key.
const KeySize = 32

var (
	// ErrWrongKey: the key does not open this seed.
	ErrWrongKey = errors.New("dedup: wrong key for this seed")
	// ErrKeyRequired: the seed is encrypted and no key was given.
	ErrKeyRequired = errors.New("dedup: seed is encrypted, a key is required")
	// ErrNotEncrypted: a key was given for a seed that is not encrypted.
	ErrNotEncrypted = errors.New("dedup: a key was given but the seed is not encrypted")
)

const encMagic = "SDENC001"

// sealOverhead is what sealing adds to a file: magic, nonce, GCM tag.
const sealOverhead = len(encMagic) + 12 + 16

// keys holds the subkeys derived from the user's master key. A nil *keys
// means "not encrypted".
type keys struct {
	chunk [32]byte // keyed BLAKE3 for chunk ids (stable across seeds)
	check [32]byte // stored in the index to recognise the right key
	mac   [32]byte // keyed BLAKE3 over the index body
	aead  cipher.AEAD
	blk   cipher.Block // the AEAD's block cipher, for range decryption
}

func deriveKeys(master, salt []byte) (*keys, error) {
	if master == nil {
		return nil, nil
	}
	if len(master) != KeySize {
		return nil, fmt.Errorf("dedup: key must be %d bytes, got %d", KeySize, len(master))
	}
	k := &keys{}
	blake3.DeriveKey("standin seed v1 chunk id", master, k.chunk[:])
	blake3.DeriveKey("standin seed v1 key check", master, k.check[:])
	blake3.DeriveKey("standin seed v1 index mac", master, k.mac[:])
	var ak [32]byte
	blake3.DeriveKey("standin seed v1 aead", append(append([]byte{}, master...), salt...), ak[:])
	blk, err := aes.NewCipher(ak[:])
	if err != nil {
		return nil, err
	}
	if k.aead, err = cipher.NewGCM(blk); err != nil {
		return nil, err
	}
	k.blk = blk
	return k, nil
}

// chunkHasher returns a function computing chunk ids: plain BLAKE3 without a
// key, keyed BLAKE3 with one. The returned function is not safe for
// concurrent use.
func (k *keys) chunkHasher() func([]byte) [32]byte {
	if k == nil {
		return blake3.Sum256
	}
	h, _ := blake3.NewKeyed(k.chunk[:])
	var out [32]byte
	return func(b []byte) [32]byte {
		h.Reset()
		h.Write(b)
		h.Sum(out[:0])
		return out
	}
}

func (k *keys) indexMAC(body []byte) [32]byte {
	var out [32]byte
	if k == nil {
		return out
	}
	h, _ := blake3.NewKeyed(k.mac[:])
	h.Write(body)
	h.Sum(out[:0])
	return out
}

// ad binds a sealed file to its role and number, so files cannot be swapped.
func sealAD(kind byte, num uint64) []byte {
	ad := make([]byte, 9+8)
	copy(ad, "standinv1")
	ad[8] = kind
	binary.LittleEndian.PutUint64(ad[9:], num)
	return ad
}

func (k *keys) seal(kind byte, num uint64, plain []byte) []byte {
	if k == nil {
		return plain
	}
	ns := k.aead.NonceSize()
	out := make([]byte, len(encMagic)+ns, len(encMagic)+ns+len(plain)+k.aead.Overhead())
	copy(out, encMagic)
	if _, err := rand.Read(out[len(encMagic):]); err != nil {
		panic(err)
	}
	return k.aead.Seal(out, out[len(encMagic):], plain, sealAD(kind, num))
}

func (k *keys) open(kind byte, num uint64, data []byte) ([]byte, error) {
	if k == nil {
		if len(data) >= len(encMagic) && string(data[:len(encMagic)]) == encMagic {
			return nil, ErrKeyRequired
		}
		return data, nil
	}
	ns := k.aead.NonceSize()
	if len(data) < len(encMagic)+ns+k.aead.Overhead() || string(data[:len(encMagic)]) != encMagic {
		return nil, errors.New("dedup: sealed file too short or not sealed")
	}
	p, err := k.aead.Open(nil, data[len(encMagic):len(encMagic)+ns], data[len(encMagic)+ns:], sealAD(kind, num))
	if err != nil {
		return nil, fmt.Errorf("dedup: authentication failed (damaged or foreign file): %w", err)
	}
	return p, nil
}

// plainLen is the plaintext length of a stored file of n bytes.
func (k *keys) plainLen(n int64) int64 {
	if k == nil {
		return n
	}
	return n - int64(sealOverhead)
}

// readRange returns plaintext bytes [off, off+n) of a stored (sealed) file
// without reading or authenticating the rest: GCM encrypts with AES-CTR
// starting at counter nonce||2, so a range decrypts on its own. This is not
// authenticated by the GCM tag; callers check what they read otherwise (the
// whole file's hash was checked against the authenticated index before, and
// every chunk read is checked against its keyed id).
func (k *keys) readRange(r io.ReaderAt, off, n int64) ([]byte, error) {
	if k == nil {
		b := make([]byte, n)
		if _, err := r.ReadAt(b, off); err != nil && !(err == io.EOF && n == 0) {
			return nil, err
		}
		return b, nil
	}
	hdr := make([]byte, len(encMagic)+12)
	if _, err := r.ReadAt(hdr, 0); err != nil {
		return nil, err
	}
	if string(hdr[:len(encMagic)]) != encMagic {
		return nil, errors.New("dedup: file is not sealed")
	}
	first := off / 16
	skip := off - first*16
	ct := make([]byte, skip+n)
	if _, err := r.ReadAt(ct[skip:], int64(len(hdr))+off); err != nil {
		return nil, err
	}
	var iv [16]byte
	copy(iv[:], hdr[len(encMagic):])
	binary.BigEndian.PutUint32(iv[12:], uint32(2+first))
	cipher.NewCTR(k.blk, iv[:]).XORKeyStream(ct, ct)
	return ct[skip:], nil
}
