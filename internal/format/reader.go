package format

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/klauspost/compress/zstd"
	"github.com/zeebo/blake3"
)

// Reader reads a cycle file through an io.ReaderAt. Its methods are safe for
// concurrent use.
type Reader struct {
	r       io.ReaderAt
	size    int64
	hdr     Header
	hdrLen  int64
	version uint16
	footLen int64 // footer size of this version
	foot    Footer
	ext     []Extent
	hashIdx []uint64 // index of the first block hash of each data or ref extent
}

var (
	decOnce sync.Once
	dec     *zstd.Decoder
	decErr  error
	// scratch buffers for stored bytes and block hashes
	scratchPool = sync.Pool{New: func() any { return new([]byte) }}
)

const maxExtentBytes = MaxExtentBlocks * BlockSize

func decoder() (*zstd.Decoder, error) {
	decOnce.Do(func() {
		dec, decErr = zstd.NewReader(nil,
			zstd.WithDecoderConcurrency(0),
			zstd.WithDecoderMaxMemory(maxExtentBytes),
			zstd.WithDecoderMaxWindow(maxExtentBytes),
			zstd.WithDecodeAllCapLimit(true),
			zstd.WithDecoderLowmem(true),
		)
	})
	return dec, decErr
}

// readAt reads exactly len(b) bytes at off; a short read is reported as truncation.
func (r *Reader) readAt(b []byte, off int64, what string) error {
	return readFull(r.r, b, off, what)
}

func readFull(ra io.ReaderAt, b []byte, off int64, what string) error {
	n, err := ra.ReadAt(b, off)
	if n == len(b) {
		return nil
	}
	if err == nil || err == io.EOF || errors.Is(err, io.ErrUnexpectedEOF) {
		return truncated(off+int64(n), "%s: read %d of %d bytes", what, n, len(b))
	}
	return fmt.Errorf("cycle file: reading %s at byte %d: %w", what, off, err)
}

// Open reads and structurally checks the header, footer, extent table and the
// placement of the block hashes of a cycle file of the given size. It does not
// read the data area (see Verify). Every length and count taken from the input
// is bounded by size before it is used, so memory use is O(size of the table).
func Open(ra io.ReaderAt, size int64) (*Reader, error) {
	r, err := openHeader(ra, size)
	if err != nil {
		return nil, err
	}
	if err := r.parseTable(); err != nil {
		return nil, err
	}
	return r, nil
}

// ReadInfo reads and checks only the header (with its hash) and the footer:
// enough to list a cycle file without reading its extent table and block
// hashes (0.8% of the data). It verifies nothing else; use Open and Verify
// before trusting the content.
func ReadInfo(ra io.ReaderAt, size int64) (Header, Footer, error) {
	r, err := openHeader(ra, size)
	if err != nil {
		return Header{}, Footer{}, err
	}
	return r.hdr, r.foot, nil
}

// openHeader parses and checks the header and the footer.
func openHeader(ra io.ReaderAt, size int64) (*Reader, error) {
	r := &Reader{r: ra, size: size}
	if size < 0 {
		return nil, fmt.Errorf("cycle file: negative size %d", size)
	}
	// Magic and version.
	var fixed [HeaderFixedSize]byte
	n := int(min(size, HeaderFixedSize))
	if err := r.readAt(fixed[:n], 0, "header"); err != nil {
		return nil, err
	}
	m := min(n, len(magic))
	if string(fixed[:m]) != magic[:m] {
		return nil, ErrNotCycle
	}
	if n < hoVersion+2 {
		return nil, truncated(size, "file is %d bytes, shorter than the header", size)
	}
	switch v := le.Uint16(fixed[hoVersion:]); v {
	case Version, VersionRefs:
		r.version = v
		r.footLen = int64(footerSize(v))
	default:
		return nil, fmt.Errorf("%w %d (this build reads versions %d and %d)", ErrVersion, v, Version, VersionRefs)
	}
	if n < HeaderFixedSize {
		return nil, truncated(size, "file is %d bytes, shorter than the header", size)
	}
	if err := r.parseHeader(fixed[:]); err != nil {
		return nil, err
	}
	if err := r.parseFooter(); err != nil {
		return nil, err
	}
	return r, nil
}

func (r *Reader) parseHeader(fixed []byte) error {
	hl := int64(le.Uint16(fixed[hoHdrLen:]))
	nl := int64(le.Uint16(fixed[hoNameLen:]))
	if nl > MaxNameLen {
		return corrupt(hoNameLen, "name length %d exceeds %d", nl, MaxNameLen)
	}
	if hl != HeaderFixedSize+nl+HashSize {
		return corrupt(hoHdrLen, "header length %d does not match name length %d (want %d)", hl, nl, HeaderFixedSize+nl+HashSize)
	}
	if hl > r.size {
		return truncated(r.size, "file is %d bytes, header claims %d", r.size, hl)
	}
	b := make([]byte, hl)
	copy(b, fixed)
	if err := r.readAt(b[HeaderFixedSize:], HeaderFixedSize, "header"); err != nil {
		return err
	}
	if sum := hashSum(b[:hl-HashSize]); !bytes.Equal(sum[:], b[hl-HashSize:]) {
		return corrupt(hl-HashSize, "header hash mismatch")
	}
	h := &r.hdr
	h.Flags = le.Uint32(b[hoFlags:])
	copy(h.ImageID[:], b[hoImageID:])
	h.Generation = le.Uint64(b[hoGen:])
	h.Seq = le.Uint64(b[hoSeq:])
	h.Parent = le.Uint64(b[hoParent:])
	h.CutTime = time.Unix(0, int64(le.Uint64(b[hoCutTime:]))).UTC()
	h.ImageSize = le.Uint64(b[hoImgSize:])
	copy(h.GroupCut[:], b[hoGroupCut:])
	h.Name = string(b[HeaderFixedSize : HeaderFixedSize+nl])
	if bs := le.Uint32(b[hoBlkSize:]); bs != BlockSize {
		return corrupt(hoBlkSize, "block size %d (version 1 requires %d)", bs, BlockSize)
	}
	if f := h.Flags &^ knownFlags; f != 0 {
		return corrupt(hoFlags, "unknown flags %#x", f)
	}
	if !utf8.ValidString(h.Name) {
		return corrupt(HeaderFixedSize, "name is not valid UTF-8")
	}
	if err := validateHeader(h); err != nil {
		return corrupt(hoParent, "%v", err)
	}
	r.hdrLen = hl
	return nil
}

func (r *Reader) parseFooter() error {
	fl := r.footLen
	if r.size < r.hdrLen+fl {
		return truncated(r.size, "file is %d bytes, too short for header (%d) and footer (%d)", r.size, r.hdrLen, fl)
	}
	fo := r.size - fl
	b := make([]byte, fl)
	if err := r.readAt(b, fo, "footer"); err != nil {
		return err
	}
	shift := int64(0)
	if r.version >= VersionRefs {
		shift = 8
	}
	if string(b[foMagic+shift:]) != footerMagic {
		return truncated(fo+foMagic+shift, "footer magic missing (file truncated or incomplete)")
	}
	f := &r.foot
	f.TableOff = le.Uint64(b[foTableOff:])
	f.Extents = le.Uint64(b[foExtents:])
	f.HashesOff = le.Uint64(b[foHashesOff:])
	f.DataBlocks = le.Uint64(b[foDataBlocks:])
	f.ZeroBlocks = le.Uint64(b[foZeroBlocks:])
	if shift != 0 {
		f.RefBlocks = le.Uint64(b[foRefBlocks:])
	}
	copy(f.FileHash[:], b[foFileHash+shift:])

	end := uint64(fo) // everything below must lie in [hdrLen, end)
	if f.TableOff < uint64(r.hdrLen) {
		return corrupt(fo+foTableOff, "table offset %d inside the header (%d bytes)", f.TableOff, r.hdrLen)
	}
	if f.TableOff > end {
		return truncated(fo+foTableOff, "table offset %d beyond the footer at %d", f.TableOff, end)
	}
	if f.Extents > (end-f.TableOff)/ExtentEntrySize {
		return truncated(fo+foExtents, "%d extents at %d do not fit before the footer at %d", f.Extents, f.TableOff, end)
	}
	if want := f.TableOff + f.Extents*ExtentEntrySize; f.HashesOff != want {
		return corrupt(fo+foHashesOff, "hashes offset %d, want %d (end of extent table)", f.HashesOff, want)
	}
	room := (end - f.HashesOff) / HashSize
	if f.DataBlocks > room {
		return truncated(fo+foDataBlocks, "%d block hashes at %d do not fit before the footer at %d", f.DataBlocks, f.HashesOff, end)
	}
	if f.RefBlocks > room-f.DataBlocks {
		return truncated(fo+foRefBlocks, "%d data and %d ref block hashes at %d do not fit before the footer at %d", f.DataBlocks, f.RefBlocks, f.HashesOff, end)
	}
	if n := f.DataBlocks + f.RefBlocks; f.HashesOff+n*HashSize != end {
		return corrupt(fo+foDataBlocks, "%d block hashes at %d end at %d, but the footer starts at %d", n, f.HashesOff, f.HashesOff+n*HashSize, end)
	}
	return nil
}

func (r *Reader) parseTable() error {
	f := &r.foot
	// f.Extents*ExtentEntrySize is bounded by the file size (parseFooter).
	tb := make([]byte, f.Extents*ExtentEntrySize)
	if err := r.readAt(tb, int64(f.TableOff), "extent table"); err != nil {
		return err
	}
	r.ext = make([]Extent, f.Extents)
	r.hashIdx = make([]uint64, f.Extents)
	blocks := r.hdr.Blocks()
	dataOff := uint64(r.hdrLen)
	var nextBlock, dataBlocks, zeroBlocks, refBlocks uint64
	for i := range r.ext {
		b := tb[i*ExtentEntrySize:]
		at := int64(f.TableOff) + int64(i)*ExtentEntrySize
		e := Extent{
			Start: le.Uint64(b[0:]),
			Count: le.Uint32(b[8:]),
			Kind:  Kind(b[12]),
			Comp:  b[13],
			Off:   le.Uint64(b[16:]),
			Len:   le.Uint64(b[24:]),
		}
		if rsv := le.Uint16(b[14:]); rsv != 0 {
			return corrupt(at+14, "extent %d: reserved field is %#x, want 0", i, rsv)
		}
		if e.Count == 0 {
			return corrupt(at+8, "extent %d: zero block count", i)
		}
		if i > 0 && e.Start < nextBlock {
			return corrupt(at, "extent %d: starts at block %d, before the end (%d) of extent %d", i, e.Start, nextBlock, i-1)
		}
		if e.Start > blocks || uint64(e.Count) > blocks-e.Start {
			return corrupt(at, "extent %d: blocks %d..%d beyond the image end (%d blocks)", i, e.Start, e.Start+uint64(e.Count)-1, blocks)
		}
		switch e.Kind {
		case KindData:
			raw := uint64(e.Count) * BlockSize
			if e.Count > MaxExtentBlocks {
				return corrupt(at+8, "extent %d: data extent of %d blocks (max %d)", i, e.Count, MaxExtentBlocks)
			}
			switch e.Comp {
			case CompNone:
				if e.Len != raw {
					return corrupt(at+24, "extent %d: raw extent of %d blocks has stored length %d, want %d", i, e.Count, e.Len, raw)
				}
			case CompZstd:
				if e.Len == 0 || e.Len >= raw {
					return corrupt(at+24, "extent %d: compressed length %d not in 1..%d", i, e.Len, raw-1)
				}
			default:
				return corrupt(at+13, "extent %d: unknown compression %d", i, e.Comp)
			}
			if e.Off != dataOff {
				return corrupt(at+16, "extent %d: data offset %d, want %d (data must be contiguous, in table order)", i, e.Off, dataOff)
			}
			if e.Len > f.TableOff-dataOff {
				return corrupt(at+24, "extent %d: stored bytes %d..%d overlap the extent table at %d", i, e.Off, e.Off+e.Len, f.TableOff)
			}
			dataOff += e.Len
			r.hashIdx[i] = dataBlocks + refBlocks
			dataBlocks += uint64(e.Count)
		case KindZero:
			if e.Comp != 0 || e.Off != 0 || e.Len != 0 {
				return corrupt(at+13, "extent %d: zero extent with comp/offset/length set", i)
			}
			if i > 0 && r.ext[i-1].Kind == KindZero && r.ext[i-1].End() == e.Start && r.ext[i-1].Count != MaxZeroExtentBlocks {
				return corrupt(at, "extent %d: zero run adjacent to the previous one (must be merged)", i)
			}
			zeroBlocks += uint64(e.Count)
		case KindRef:
			if r.version < VersionRefs {
				return corrupt(at+12, "extent %d: ref extent in a version %d file", i, r.version)
			}
			if e.Count > MaxExtentBlocks {
				return corrupt(at+8, "extent %d: ref extent of %d blocks (max %d)", i, e.Count, MaxExtentBlocks)
			}
			if e.Comp != 0 || e.Off != 0 || e.Len != 0 {
				return corrupt(at+13, "extent %d: ref extent with comp/offset/length set", i)
			}
			r.hashIdx[i] = dataBlocks + refBlocks
			refBlocks += uint64(e.Count)
		default:
			return corrupt(at+12, "extent %d: unknown kind %d", i, uint8(e.Kind))
		}
		nextBlock = e.End()
		r.ext[i] = e
	}
	fo := r.size - r.footLen
	if dataOff != f.TableOff {
		return corrupt(int64(dataOff), "data area ends at %d, but the extent table starts at %d", dataOff, f.TableOff)
	}
	if dataBlocks != f.DataBlocks {
		return corrupt(fo+foDataBlocks, "footer counts %d data blocks, table has %d", f.DataBlocks, dataBlocks)
	}
	if zeroBlocks != f.ZeroBlocks {
		return corrupt(fo+foZeroBlocks, "footer counts %d zero blocks, table has %d", f.ZeroBlocks, zeroBlocks)
	}
	if refBlocks != f.RefBlocks {
		return corrupt(fo+foRefBlocks, "footer counts %d ref blocks, table has %d", f.RefBlocks, refBlocks)
	}
	return nil
}

// Header returns the file's header.
func (r *Reader) Header() Header { return r.hdr }

// Extents returns the extent table. The slice must not be modified.
func (r *Reader) Extents() []Extent { return r.ext }

// Footer returns the file's footer.
func (r *Reader) Footer() Footer { return r.foot }

// Size returns the file size given to Open.
func (r *Reader) Size() int64 { return r.size }

// Version returns the file's format version (Version or VersionRefs).
func (r *Reader) Version() int { return int(r.version) }

// ExtentHashes returns the stored block hashes (32 bytes per block) of data
// or ref extent i, read into buf if it is large enough. For a data extent
// they are not checked against the data here (ReadExtentHashes does that);
// for a ref extent they are the content: the whole-file hash covers them.
func (r *Reader) ExtentHashes(i int, buf []byte) ([]byte, error) {
	if i < 0 || i >= len(r.ext) {
		return nil, fmt.Errorf("cycle file: extent %d out of range (%d extents)", i, len(r.ext))
	}
	e := r.ext[i]
	if e.Kind != KindData && e.Kind != KindRef {
		return nil, fmt.Errorf("cycle file: extent %d is a %v extent, it has no block hashes", i, e.Kind)
	}
	n := int(e.Count) * HashSize // ≤ 8 KiB, checked by Open
	if cap(buf) < n {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	hoff := int64(r.foot.HashesOff + r.hashIdx[i]*HashSize)
	if err := r.readAt(buf, hoff, fmt.Sprintf("block hashes of extent %d (blocks %d..%d)", i, e.Start, e.End()-1)); err != nil {
		return nil, err
	}
	return buf, nil
}

// VerifyFile reads the whole file and checks the BLAKE3 hash in the footer.
func (r *Reader) VerifyFile() error {
	h := blake3.New()
	body := r.size - r.footLen
	n, err := io.Copy(h, io.NewSectionReader(r.r, 0, body))
	if err != nil {
		return fmt.Errorf("cycle file: %w", err)
	}
	if n != body {
		return truncated(n, "read %d of %d bytes", n, body)
	}
	var sum [HashSize]byte
	h.Sum(sum[:0])
	if sum != r.foot.FileHash {
		return corrupt(body+r.footLen-HashSize-8, "file hash mismatch")
	}
	return nil
}

// ReadExtent returns the raw bytes (Count*BlockSize) of data extent i,
// decompressing them if needed and checking every block hash. The result is
// stored in buf if it is large enough. ReadExtent of a zero extent is an error.
func (r *Reader) ReadExtent(i int, buf []byte) ([]byte, error) {
	buf, _, err := r.ReadExtentHashes(i, buf)
	return buf, err
}

// ReadExtentHashes is ReadExtent that also returns the extent's block hashes
// (32 bytes per block, verified against the returned data).
func (r *Reader) ReadExtentHashes(i int, buf []byte) ([]byte, []byte, error) {
	if i < 0 || i >= len(r.ext) {
		return nil, nil, fmt.Errorf("cycle file: extent %d out of range (%d extents)", i, len(r.ext))
	}
	e := r.ext[i]
	if e.Kind != KindData {
		return nil, nil, fmt.Errorf("cycle file: extent %d is a %v extent, it has no stored data", i, e.Kind)
	}
	raw := int(e.Count) * BlockSize // ≤ 1 MiB, checked by Open
	if cap(buf) < raw {
		buf = make([]byte, raw)
	}
	buf = buf[:raw]
	what := func() string {
		return fmt.Sprintf("extent %d (blocks %d..%d)", i, e.Start, e.End()-1)
	}
	if e.Comp == CompNone {
		if err := r.readAt(buf, int64(e.Off), "data of "+what()); err != nil {
			return nil, nil, err
		}
	} else {
		// Len < raw ≤ 1 MiB (checked by Open) and within the file.
		sp := scratchPool.Get().(*[]byte)
		defer scratchPool.Put(sp)
		if uint64(cap(*sp)) < e.Len {
			*sp = make([]byte, e.Len)
		}
		src := (*sp)[:e.Len]
		if err := r.readAt(src, int64(e.Off), "data of "+what()); err != nil {
			return nil, nil, err
		}
		var zh zstd.Header
		if err := zh.Decode(src); err != nil {
			return nil, nil, corrupt(int64(e.Off), "zstd frame header of %s: %v", what(), err)
		}
		if zh.Skippable || (zh.HasFCS && zh.FrameContentSize != uint64(raw)) {
			return nil, nil, corrupt(int64(e.Off), "zstd frame of %s declares %d bytes, want %d", what(), zh.FrameContentSize, raw)
		}
		d, err := decoder()
		if err != nil {
			return nil, nil, err
		}
		out, err := d.DecodeAll(src, buf[:0:raw])
		if err != nil {
			return nil, nil, corrupt(int64(e.Off), "decompressing %s: %v", what(), err)
		}
		if len(out) != raw {
			return nil, nil, corrupt(int64(e.Off), "%s decompresses to %d bytes, want %d", what(), len(out), raw)
		}
		if &out[0] != &buf[0] {
			copy(buf, out)
		}
	}
	hb := make([]byte, int(e.Count)*HashSize)
	hoff := int64(r.foot.HashesOff + r.hashIdx[i]*HashSize)
	if err := r.readAt(hb, hoff, "block hashes of "+what()); err != nil {
		return nil, nil, err
	}
	for b := 0; b < int(e.Count); b++ {
		sum := blake3.Sum256(buf[b*BlockSize : (b+1)*BlockSize])
		if !bytes.Equal(sum[:], hb[b*HashSize:(b+1)*HashSize]) {
			return nil, nil, corrupt(int64(e.Off), "block hash mismatch in %s, block %d", what(), e.Start+uint64(b))
		}
	}
	if tail := r.hdr.ImageSize % BlockSize; tail != 0 && e.End() == r.hdr.Blocks() {
		if !bytes.Equal(buf[raw-BlockSize+int(tail):], zeroBlock[tail:]) {
			return nil, nil, corrupt(int64(e.Off), "%s: bytes past the image end are not zero", what())
		}
	}
	return buf, hb, nil
}

// Verify checks the whole file: VerifyFile, and ReadExtent of every data
// extent (ref extents have no data; their hashes are covered by the file hash). The whole-file hash and the extents are checked in parallel; the
// first error in file order is returned (a whole-file mismatch first).
func (r *Reader) Verify() error {
	errs := make([]error, len(r.ext)+1)
	var next atomic.Int64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		errs[len(r.ext)] = r.VerifyFile()
	}()
	for w := 0; w < min(4, max(1, runtime.GOMAXPROCS(0))); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var buf []byte
			for {
				i := int(next.Add(1) - 1)
				if i >= len(r.ext) {
					return
				}
				if r.ext[i].Kind != KindData {
					continue
				}
				var err error
				if buf, err = r.ReadExtent(i, buf); err != nil {
					errs[i] = err
					next.Store(int64(len(r.ext))) // stop early
					return
				}
			}
		}()
	}
	wg.Wait()
	if err := errs[len(r.ext)]; err != nil {
		return err
	}
	for _, err := range errs[:len(r.ext)] {
		if err != nil {
			return err
		}
	}
	return nil
}

func hashSum(b []byte) [32]byte { return blake3.Sum256(b) }
