package format

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"
	"unicode/utf8"
)

// Format constants.
const (
	// BlockSize is the size of one block in bytes. Version 1 files must use it.
	BlockSize = 4096
	// MaxExtentBlocks is the maximum number of blocks in one data extent.
	MaxExtentBlocks = 256
	// MaxZeroExtentBlocks is the maximum number of blocks in one zero extent.
	MaxZeroExtentBlocks = 1<<32 - 1
	// Version is the cycle file version written by default (no ref extents).
	Version = 1
	// VersionRefs is the version of files that may hold ref extents
	// (WriterOptions.Refs); its footer also counts ref blocks. Readers of
	// this package read both versions.
	VersionRefs = 2
	// NoParent is the Parent value of a base cycle that does not continue a chain.
	NoParent = ^uint64(0)
	// FlagBase marks a cycle that defines the whole image: the target is
	// emptied before the extents are applied.
	FlagBase uint32 = 1
	// FlagAppConsistent marks a cycle cut while the group's applications
	// were quiesced (freeze command before the cut, thaw after its barrier).
	FlagAppConsistent uint32 = 2
	// MaxNameLen is the maximum length of Header.Name in bytes.
	MaxNameLen = 1024
)

// Sizes of the fixed structures, in bytes.
const (
	// HeaderFixedSize is the size of the header before the name.
	HeaderFixedSize = 94
	// HashSize is the size of a BLAKE3-256 hash.
	HashSize = 32
	// ExtentEntrySize is the size of one extent table entry.
	ExtentEntrySize = 32
	// FooterSize is the size of the footer of a version 1 file.
	FooterSize = 80
	// FooterSizeRefs is the size of the footer of a version 2 file (VersionRefs).
	FooterSizeRefs = 88
)

const (
	magic       = "STANDCYC"
	footerMagic = "STANDEND"
	knownFlags  = FlagBase | FlagAppConsistent
)

// Comp values of a data extent.
const (
	CompNone uint8 = 0 // stored raw
	CompZstd uint8 = 1 // one zstd frame
)

// Header is the identity part of a cycle file.
type Header struct {
	Flags      uint32
	ImageID    [16]byte
	Generation uint64
	Seq        uint64
	Parent     uint64 // the cycle this delta applies on: Seq-1, an earlier seq (a merged delta, forwarded by extended replication), or NoParent (base cycles only)
	CutTime    time.Time
	ImageSize  uint64 // bytes; need not be a multiple of BlockSize
	GroupCut   [16]byte
	Name       string // image path relative to the mount; UTF-8, at most MaxNameLen bytes
}

// Base reports whether the cycle defines the whole image (FlagBase).
func (h Header) Base() bool { return h.Flags&FlagBase != 0 }

// AppConsistent reports whether the cycle was cut app-consistent (FlagAppConsistent).
func (h Header) AppConsistent() bool { return h.Flags&FlagAppConsistent != 0 }

// Blocks returns the number of blocks of the image: ceil(ImageSize/BlockSize).
func (h Header) Blocks() uint64 { return blocksOf(h.ImageSize) }

func blocksOf(size uint64) uint64 {
	return size/BlockSize + min(size%BlockSize, 1)
}

// Kind is the kind of an extent.
type Kind uint8

// Extent kinds.
const (
	KindData Kind = 1 // blocks with stored data
	KindZero Kind = 2 // blocks that read as zero (no data stored)
	// KindRef (version 2 only): blocks whose content is not stored, only its
	// BLAKE3 block hashes; the receiver already holds that content (at the
	// same position or elsewhere) and resolves it by hash.
	KindRef Kind = 3
)

func (k Kind) String() string {
	switch k {
	case KindData:
		return "data"
	case KindZero:
		return "zero"
	case KindRef:
		return "ref"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// Extent is one entry of the extent table.
type Extent struct {
	Start uint64 // first block
	Count uint32 // number of blocks
	Kind  Kind
	Comp  uint8  // CompNone or CompZstd (data extents); 0 for zero and ref extents
	Off   uint64 // absolute file offset of the stored bytes (0 for zero and ref extents)
	Len   uint64 // stored length in bytes (0 for zero and ref extents)
}

// End returns the block after the last block of the extent.
func (e Extent) End() uint64 { return e.Start + uint64(e.Count) }

// Footer is the fixed-size trailer of a cycle file.
type Footer struct {
	TableOff   uint64   // file offset of the extent table
	Extents    uint64   // number of extent table entries
	HashesOff  uint64   // file offset of the block hashes
	DataBlocks uint64   // number of blocks in data extents
	ZeroBlocks uint64   // number of blocks in zero extents
	RefBlocks  uint64   // number of blocks in ref extents (version 2; 0 in version 1)
	FileHash   [32]byte // BLAKE3-256 of every byte before the footer
}

// Errors.
var (
	// ErrNotCycle means the input does not start with the cycle file magic.
	ErrNotCycle = errors.New("not a standin cycle file")
	// ErrVersion means the file has a version this package cannot read.
	ErrVersion = errors.New("unsupported cycle file version")
	// ErrCorrupt is matched (errors.Is) by every structural or integrity error,
	// including ErrTruncated.
	ErrCorrupt = errors.New("cycle file corrupt")
	// ErrTruncated means the file is shorter than its structures claim (or its
	// footer is missing). errors.Is(ErrTruncated, ErrCorrupt) is true.
	ErrTruncated = fmt.Errorf("%w: truncated", ErrCorrupt)
	// ErrOrder is returned by Writer.WriteBlocks and Writer.WriteZero when
	// blocks are not written in strictly ascending, non-overlapping order.
	ErrOrder = errors.New("cycle writer: blocks out of order")
	// ErrRange is returned by the writer for blocks beyond the image size.
	ErrRange = errors.New("cycle writer: block beyond image size")
)

// CorruptError describes what is wrong in a cycle file and where.
// It matches ErrCorrupt with errors.Is, and ErrTruncated if the file is short.
type CorruptError struct {
	Offset int64  // file offset of the offending structure or field
	What   string // description
	Err    error  // ErrCorrupt or ErrTruncated; nil means ErrCorrupt
}

func (e *CorruptError) Error() string {
	if e.Err == ErrTruncated {
		return fmt.Sprintf("cycle file truncated at byte %d: %s", e.Offset, e.What)
	}
	return fmt.Sprintf("cycle file corrupt at byte %d: %s", e.Offset, e.What)
}

func (e *CorruptError) Unwrap() error {
	if e.Err == nil {
		return ErrCorrupt
	}
	return e.Err
}

func corrupt(off int64, format string, args ...any) error {
	return &CorruptError{Offset: off, What: fmt.Sprintf(format, args...)}
}

func truncated(off int64, format string, args ...any) error {
	return &CorruptError{Offset: off, What: fmt.Sprintf(format, args...), Err: ErrTruncated}
}

// Field offsets inside the fixed header.
const (
	hoMagic    = 0
	hoVersion  = 8
	hoHdrLen   = 10
	hoFlags    = 12
	hoBlkSize  = 16
	hoImageID  = 20
	hoGen      = 36
	hoSeq      = 44
	hoParent   = 52
	hoCutTime  = 60
	hoImgSize  = 68
	hoGroupCut = 76
	hoNameLen  = 92
)

// Field offsets inside the footer (version 1; version 2 inserts the ref
// block count at foRefBlocks and shifts the file hash and magic by 8).
const (
	foTableOff   = 0
	foExtents    = 8
	foHashesOff  = 16
	foDataBlocks = 24
	foZeroBlocks = 32
	foFileHash   = 40
	foMagic      = 72
	foRefBlocks  = 40
)

// footerSize returns the footer size of a file of version v.
func footerSize(v uint16) int {
	if v >= VersionRefs {
		return FooterSizeRefs
	}
	return FooterSize
}

var le = binary.LittleEndian

// validateHeader checks the header fields that the writer controls.
func validateHeader(h *Header) error {
	if h.Flags&^knownFlags != 0 {
		return fmt.Errorf("unknown flags %#x", h.Flags&^knownFlags)
	}
	if len(h.Name) > MaxNameLen {
		return fmt.Errorf("name is %d bytes, more than %d", len(h.Name), MaxNameLen)
	}
	if !utf8.ValidString(h.Name) {
		return errors.New("name is not valid UTF-8")
	}
	if h.Base() {
		if h.Parent != NoParent && (h.Seq == 0 || h.Parent != h.Seq-1) {
			return fmt.Errorf("base cycle %d has parent %d (want NoParent or seq-1)", h.Seq, h.Parent)
		}
	} else {
		// A delta applies on cycle Parent: normally Seq-1; a merged delta
		// (extended replication forwards several cycles as one) names an
		// earlier cycle.
		if h.Seq == 0 || h.Parent >= h.Seq {
			return fmt.Errorf("cycle %d has parent %s (want an earlier cycle, normally seq-1; only base cycles may have no parent)", h.Seq, parentString(h.Parent))
		}
	}
	return nil
}

func parentString(p uint64) string {
	if p == NoParent {
		return "NoParent"
	}
	return fmt.Sprint(p)
}

// encodeHeader returns the encoded header (of version v) including its hash.
func encodeHeader(h *Header, v uint16) []byte {
	n := HeaderFixedSize + len(h.Name) + HashSize
	b := make([]byte, n)
	copy(b[hoMagic:], magic)
	le.PutUint16(b[hoVersion:], v)
	le.PutUint16(b[hoHdrLen:], uint16(n))
	le.PutUint32(b[hoFlags:], h.Flags)
	le.PutUint32(b[hoBlkSize:], BlockSize)
	copy(b[hoImageID:], h.ImageID[:])
	le.PutUint64(b[hoGen:], h.Generation)
	le.PutUint64(b[hoSeq:], h.Seq)
	le.PutUint64(b[hoParent:], h.Parent)
	le.PutUint64(b[hoCutTime:], uint64(h.CutTime.UnixNano()))
	le.PutUint64(b[hoImgSize:], h.ImageSize)
	copy(b[hoGroupCut:], h.GroupCut[:])
	le.PutUint16(b[hoNameLen:], uint16(len(h.Name)))
	copy(b[HeaderFixedSize:], h.Name)
	sum := hashSum(b[:n-HashSize])
	copy(b[n-HashSize:], sum[:])
	return b
}

func encodeExtent(b []byte, e *Extent) {
	le.PutUint64(b[0:], e.Start)
	le.PutUint32(b[8:], e.Count)
	b[12] = byte(e.Kind)
	b[13] = e.Comp
	le.PutUint16(b[14:], 0)
	le.PutUint64(b[16:], e.Off)
	le.PutUint64(b[24:], e.Len)
}

func encodeFooter(f *Footer, v uint16) []byte {
	b := make([]byte, footerSize(v))
	le.PutUint64(b[foTableOff:], f.TableOff)
	le.PutUint64(b[foExtents:], f.Extents)
	le.PutUint64(b[foHashesOff:], f.HashesOff)
	le.PutUint64(b[foDataBlocks:], f.DataBlocks)
	le.PutUint64(b[foZeroBlocks:], f.ZeroBlocks)
	shift := 0
	if v >= VersionRefs {
		le.PutUint64(b[foRefBlocks:], f.RefBlocks)
		shift = 8
	}
	copy(b[foFileHash+shift:], f.FileHash[:])
	copy(b[foMagic+shift:], footerMagic)
	return b
}
