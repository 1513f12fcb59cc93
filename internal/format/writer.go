package format

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"runtime"
	"sync"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/zeebo/blake3"
)

// WriterOptions configure a Writer.
type WriterOptions struct {
	// Compress stores each data extent as a zstd frame (SpeedFastest) when
	// that saves at least 1/16 of its size. The zero value stores raw data.
	Compress bool
	// Workers is the number of parallel hashing/compression goroutines;
	// 0 means runtime.GOMAXPROCS(0).
	Workers int
	// Refs allows ref extents (WriteRef): the file is written as version 2
	// (VersionRefs), which readers before version 2 refuse. Without it the
	// file is version 1.
	Refs bool
}

// Summary describes a finished cycle file.
type Summary struct {
	Bytes      int64  // total file size
	DataBlocks uint64 // blocks stored in data extents
	ZeroBlocks uint64 // blocks in zero extents
	RefBlocks  uint64 // blocks in ref extents
	Extents    int    // number of extent table entries
}

// Writer writes one cycle file sequentially to an io.Writer (it never seeks).
// Its methods must not be called concurrently. Close must be called to
// finish the file; the underlying writer is not closed.
type Writer struct {
	out     io.Writer
	hdr     Header
	version uint16
	blocks  uint64 // image size in blocks
	opts    WriterOptions
	sem     chan struct{} // limits concurrent workers
	workq   chan *job     // dispatched data extents not yet picked up, FIFO
	maxQ    int
	hasher  *blake3.Hasher
	outq    chan outChunk // to the output goroutine: hashing + writing overlap the workers
	outDone chan error
	off     uint64 // bytes written so far (handed to the output goroutine)
	next    uint64 // lowest block the next call may use
	err     error  // sticky write error
	closed  bool
	queue   []*job // dispatched extents, in file order
	table   []byte // encoded extent table
	hashes  []byte // block hashes of written data extents
	nExt    int
	dataBlk uint64
	zeroBlk uint64
	refBlk  uint64

	pend     *job   // data extent being filled (not yet dispatched)
	pendRef  *job   // ref extent being filled (not yet queued)
	zeroOn   bool   // a zero run is pending
	zeroFrom uint64 // pending zero run start
	zeroN    uint64 // pending zero run length

	last []byte // scratch for the partial last block
}

// job is one extent on its way to the file.
type job struct {
	ext    Extent
	raw    *[]byte // MaxExtentBlocks*BlockSize buffer; raw data in (*raw)[:Count*BlockSize]
	comp   *[]byte // compressed frame, if used
	hashes [MaxExtentBlocks * HashSize]byte
	done   chan struct{}
}

var (
	zeroBlock [BlockSize]byte

	rawPool  = sync.Pool{New: func() any { b := make([]byte, MaxExtentBlocks*BlockSize); return &b }}
	compPool = sync.Pool{New: func() any { b := make([]byte, 0, MaxExtentBlocks*BlockSize); return &b }}
	jobPool  = sync.Pool{New: func() any { return new(job) }}
	encPool  = sync.Pool{New: func() any {
		e, err := zstd.NewWriter(nil,
			zstd.WithEncoderLevel(zstd.SpeedFastest),
			zstd.WithEncoderConcurrency(1),
			zstd.WithEncoderCRC(false), // every block has a BLAKE3 hash
			zstd.WithWindowSize(1<<20),
			zstd.WithLowerEncoderMem(true),
		)
		if err != nil {
			panic(err) // static options
		}
		return e
	}}

	minTime = time.Unix(0, math.MinInt64)
	maxTime = time.Unix(0, math.MaxInt64)
)

// NewWriter validates h and writes the header to w immediately.
// h.CutTime must be representable as int64 Unix nanoseconds (years 1678..2262).
func NewWriter(w io.Writer, h Header, o WriterOptions) (*Writer, error) {
	if err := validateHeader(&h); err != nil {
		return nil, fmt.Errorf("cycle writer: %w", err)
	}
	if h.CutTime.Before(minTime) || h.CutTime.After(maxTime) {
		return nil, fmt.Errorf("cycle writer: cut time %v not representable in Unix nanoseconds", h.CutTime)
	}
	if o.Workers <= 0 {
		o.Workers = runtime.GOMAXPROCS(0)
	}
	version := uint16(Version)
	if o.Refs {
		version = VersionRefs
	}
	cw := &Writer{
		out:     w,
		hdr:     h,
		version: version,
		blocks:  h.Blocks(),
		opts:    o,
		sem:     make(chan struct{}, o.Workers),
		workq:   make(chan *job, 2*o.Workers+4),
		maxQ:    2*o.Workers + 2,
		hasher:  blake3.New(),
		outq:    make(chan outChunk, 8),
		outDone: make(chan error, 1),
	}
	go cw.output(cw.outq)
	if err := cw.write(encodeHeader(&h, version)); err != nil {
		return nil, err
	}
	return cw, nil
}

// outChunk is a piece of the file for the output goroutine; release (if
// set) returns its buffer once written.
type outChunk struct {
	data    []byte
	release func()
}

// output hashes and writes the file in order on its own goroutine, so the
// whole-file BLAKE3 and the write syscalls run beside the block hashing and
// compression workers. The first error is reported on outDone; later chunks
// are only released.
func (w *Writer) output(outq <-chan outChunk) {
	var err error
	for c := range outq {
		if err == nil {
			var n int
			n, err = w.out.Write(c.data)
			w.hasher.Write(c.data[:n])
			if err == nil && n != len(c.data) {
				err = io.ErrShortWrite
			}
		}
		if c.release != nil {
			c.release()
		}
	}
	w.outDone <- err
}

// write queues a copy of b (for small metadata).
func (w *Writer) write(b []byte) error {
	return w.writeOwned(append([]byte(nil), b...), nil)
}

// writeOwned queues b, which the output goroutine releases when written.
func (w *Writer) writeOwned(b []byte, release func()) error {
	if w.err != nil {
		if release != nil {
			release()
		}
		return w.err
	}
	w.outq <- outChunk{b, release}
	w.off += uint64(len(b))
	return nil
}

// Abort stops a Writer that will not be closed (after an error), releasing
// its goroutine and buffers. The output is incomplete.
func (w *Writer) Abort() {
	if w.closed {
		return
	}
	w.closed = true
	for _, j := range w.queue {
		if j.done != nil {
			<-j.done
		}
	}
	w.queue = nil
	w.finish()
}

// finish waits for the output goroutine and returns its error.
func (w *Writer) finish() error {
	if w.outq == nil {
		return w.err
	}
	close(w.outq)
	w.outq = nil
	if err := <-w.outDone; err != nil && w.err == nil {
		w.err = fmt.Errorf("cycle writer: %w", err)
	}
	return w.err
}

func (w *Writer) check(start, count uint64) error {
	if w.closed {
		return errors.New("cycle writer: already closed")
	}
	if w.err != nil {
		return w.err
	}
	if count == 0 {
		return errors.New("cycle writer: empty write")
	}
	if start < w.next {
		return fmt.Errorf("%w: write at block %d, but blocks up to %d were already written", ErrOrder, start, w.next)
	}
	if start >= w.blocks || count > w.blocks-start {
		return fmt.Errorf("%w: blocks %d..%d, image has %d blocks", ErrRange, start, start+count-1, w.blocks)
	}
	return nil
}

// WriteBlocks adds blocks [start, start+len(data)/BlockSize). len(data) must be
// a positive multiple of BlockSize. Calls (including WriteZero) must be in
// strictly ascending, non-overlapping block order; gaps are allowed and mean
// "unchanged". All-zero blocks become zero extents. Bytes of the last block
// beyond the image size are stored as zero. data is copied; the caller may
// reuse it when WriteBlocks returns.
func (w *Writer) WriteBlocks(start uint64, data []byte) error {
	if len(data)%BlockSize != 0 {
		return fmt.Errorf("cycle writer: data length %d is not a multiple of %d", len(data), BlockSize)
	}
	n := uint64(len(data) / BlockSize)
	if err := w.check(start, n); err != nil {
		return err
	}
	// Clear the bytes past the image end in the last block.
	if tail := w.hdr.ImageSize % BlockSize; tail != 0 && start+n == w.blocks {
		lb := data[len(data)-BlockSize:]
		if !bytes.Equal(lb[tail:], zeroBlock[tail:]) {
			if w.last == nil {
				w.last = make([]byte, BlockSize)
			}
			clear(w.last)
			copy(w.last, lb[:tail])
			if n > 1 {
				if err := w.writeBlocks(start, data[:len(data)-BlockSize]); err != nil {
					return err
				}
			}
			return w.writeBlocks(start+n-1, w.last)
		}
	}
	return w.writeBlocks(start, data)
}

func (w *Writer) writeBlocks(start uint64, data []byte) error {
	for i := 0; i < len(data); {
		blk := start + uint64(i/BlockSize)
		if bytes.Equal(data[i:i+BlockSize], zeroBlock[:]) {
			j := i + BlockSize
			for j < len(data) && bytes.Equal(data[j:j+BlockSize], zeroBlock[:]) {
				j += BlockSize
			}
			if err := w.addZero(blk, uint64((j-i)/BlockSize)); err != nil {
				return err
			}
			i = j
			continue
		}
		// A run of non-zero blocks, at most up to the free room in the pending extent.
		if err := w.flushZero(); err != nil {
			return err
		}
		if err := w.flushRef(); err != nil {
			return err
		}
		if w.pend != nil && w.pend.ext.End() != blk {
			if err := w.dispatch(); err != nil {
				return err
			}
		}
		if w.pend == nil {
			j := jobPool.Get().(*job)
			j.ext = Extent{Start: blk, Kind: KindData}
			j.raw = rawPool.Get().(*[]byte)
			w.pend = j
		}
		room := (MaxExtentBlocks - int(w.pend.ext.Count)) * BlockSize
		j := i + BlockSize
		for j < len(data) && j-i < room && !bytes.Equal(data[j:j+BlockSize], zeroBlock[:]) {
			j += BlockSize
		}
		copy((*w.pend.raw)[int(w.pend.ext.Count)*BlockSize:], data[i:j])
		w.pend.ext.Count += uint32((j - i) / BlockSize)
		if w.pend.ext.Count == MaxExtentBlocks {
			if err := w.dispatch(); err != nil {
				return err
			}
		}
		i = j
	}
	w.next = start + uint64(len(data)/BlockSize)
	return nil
}

// WriteZero adds a run of count zero blocks starting at start (for example
// discarded blocks). The ordering rules of WriteBlocks apply.
func (w *Writer) WriteZero(start, count uint64) error {
	if err := w.check(start, count); err != nil {
		return err
	}
	if err := w.addZero(start, count); err != nil {
		return err
	}
	w.next = start + count
	return nil
}

func (w *Writer) addZero(start, count uint64) error {
	if w.pend != nil {
		if err := w.dispatch(); err != nil {
			return err
		}
	}
	if err := w.flushRef(); err != nil {
		return err
	}
	if w.zeroOn && w.zeroFrom+w.zeroN == start {
		w.zeroN += count
		return nil
	}
	if err := w.flushZero(); err != nil {
		return err
	}
	w.zeroOn, w.zeroFrom, w.zeroN = true, start, count
	return nil
}

// flushZero queues the pending zero run, split into extents of at most
// MaxZeroExtentBlocks blocks.
func (w *Writer) flushZero() error {
	if !w.zeroOn {
		return nil
	}
	w.zeroOn = false
	for w.zeroN > 0 {
		n := min(w.zeroN, MaxZeroExtentBlocks)
		j := jobPool.Get().(*job)
		j.ext = Extent{Start: w.zeroFrom, Count: uint32(n), Kind: KindZero}
		j.raw, j.comp, j.done = nil, nil, nil
		w.queue = append(w.queue, j)
		w.zeroFrom += n
		w.zeroN -= n
	}
	return w.drain(false)
}

// WriteRef adds ref blocks [start, start+len(hashes)/HashSize): blocks whose
// content is not stored, only its BLAKE3-256 hash (32 bytes per block, in
// block order), for a receiver that already holds that content. The writer
// must have been created with WriterOptions.Refs. The ordering rules of
// WriteBlocks apply; runs are split into extents of at most
// MaxExtentBlocks. The hash of an all-zero block is refused (write zero
// blocks with WriteZero). hashes is copied.
func (w *Writer) WriteRef(start uint64, hashes []byte) error {
	if w.version < VersionRefs {
		return errors.New("cycle writer: ref extents need WriterOptions.Refs (version 2)")
	}
	if len(hashes)%HashSize != 0 {
		return fmt.Errorf("cycle writer: hashes length %d is not a multiple of %d", len(hashes), HashSize)
	}
	n := uint64(len(hashes) / HashSize)
	if err := w.check(start, n); err != nil {
		return err
	}
	for i := 0; i < len(hashes); i += HashSize {
		if [HashSize]byte(hashes[i:i+HashSize]) == zeroBlockHash {
			return fmt.Errorf("cycle writer: ref to an all-zero block (block %d); use WriteZero", start+uint64(i/HashSize))
		}
	}
	if w.pend != nil {
		if err := w.dispatch(); err != nil {
			return err
		}
	}
	if err := w.flushZero(); err != nil {
		return err
	}
	for b := start; len(hashes) > 0; {
		if w.pendRef != nil && w.pendRef.ext.End() != b {
			if err := w.flushRef(); err != nil {
				return err
			}
		}
		if w.pendRef == nil {
			j := jobPool.Get().(*job)
			j.ext = Extent{Start: b, Kind: KindRef}
			j.raw, j.comp, j.done = nil, nil, nil
			w.pendRef = j
		}
		j := w.pendRef
		k := min(MaxExtentBlocks-int(j.ext.Count), len(hashes)/HashSize)
		copy(j.hashes[int(j.ext.Count)*HashSize:], hashes[:k*HashSize])
		j.ext.Count += uint32(k)
		hashes = hashes[k*HashSize:]
		b += uint64(k)
		if j.ext.Count == MaxExtentBlocks {
			if err := w.flushRef(); err != nil {
				return err
			}
		}
	}
	w.next = start + n
	return nil
}

var zeroBlockHash = hashSum(zeroBlock[:])

// flushRef queues the pending ref extent.
func (w *Writer) flushRef() error {
	if w.pendRef == nil {
		return nil
	}
	w.queue = append(w.queue, w.pendRef)
	w.pendRef = nil
	return w.drain(false)
}

// dispatch hands the pending data extent to a worker.
func (w *Writer) dispatch() error {
	j := w.pend
	w.pend = nil
	j.done = make(chan struct{})
	j.comp = nil
	w.queue = append(w.queue, j)
	w.workq <- j
	// One short-lived goroutine per extent; it takes the oldest waiting
	// extent once a worker slot is free, so extents finish roughly in file
	// order. No goroutine outlives the extent, so an abandoned Writer leaks
	// nothing.
	go func() {
		w.sem <- struct{}{}
		w.work(<-w.workq)
		<-w.sem
	}()
	return w.drain(false)
}

func (w *Writer) work(j *job) {
	defer close(j.done)
	n := int(j.ext.Count) * BlockSize
	raw := (*j.raw)[:n]
	for i := 0; i < n; i += BlockSize {
		sum := blake3.Sum256(raw[i : i+BlockSize])
		copy(j.hashes[i/BlockSize*HashSize:], sum[:])
	}
	j.ext.Comp, j.ext.Len = CompNone, uint64(n)
	if !w.opts.Compress || incompressible(raw) {
		return
	}
	enc := encPool.Get().(*zstd.Encoder)
	cb := compPool.Get().(*[]byte)
	*cb = enc.EncodeAll(raw, (*cb)[:0])
	encPool.Put(enc)
	if len(*cb) <= n-n/16 {
		j.comp = cb
		j.ext.Comp, j.ext.Len = CompZstd, uint64(len(*cb))
	} else {
		compPool.Put(cb)
	}
}

// incompressible is a quick check for data that will not compress by 1/16:
// it compresses a sample block and gives up if that does not shrink.
func incompressible(raw []byte) bool {
	if len(raw) < 8*BlockSize {
		return false // small enough to just try
	}
	// Sample three blocks spread over the extent; data that is incompressible
	// in all of them is very unlikely to save 1/16 overall.
	enc := encPool.Get().(*zstd.Encoder)
	defer encPool.Put(enc)
	var buf [BlockSize + 64]byte
	nb := len(raw) / BlockSize
	for _, b := range [...]int{0, nb / 2, nb - 1} {
		out := enc.EncodeAll(raw[b*BlockSize:(b+1)*BlockSize], buf[:0])
		if len(out) < BlockSize-BlockSize/32 {
			return false
		}
	}
	return true
}

// drain writes finished extents from the front of the queue, blocking while
// the queue is longer than allowed (or entirely if all is set).
func (w *Writer) drain(all bool) error {
	for len(w.queue) > 0 {
		j := w.queue[0]
		if j.done != nil {
			if all || len(w.queue) > w.maxQ {
				<-j.done
			} else {
				select {
				case <-j.done:
				default:
					return w.err
				}
			}
		}
		w.queue[0] = nil
		w.queue = w.queue[1:]
		w.emit(j)
	}
	w.queue = w.queue[:0]
	return w.err
}

// emit writes the data of a finished job and records its table entry.
func (w *Writer) emit(j *job) {
	if j.ext.Kind == KindData {
		j.ext.Off = w.off
		var data []byte
		raw, comp := j.raw, j.comp
		if comp != nil {
			data = *comp
		} else {
			data = (*raw)[:int(j.ext.Count)*BlockSize]
		}
		release := func() {
			rawPool.Put(raw)
			if comp != nil {
				compPool.Put(comp)
			}
		}
		if w.writeOwned(data, release) == nil {
			w.hashes = append(w.hashes, j.hashes[:int(j.ext.Count)*HashSize]...)
			w.dataBlk += uint64(j.ext.Count)
		}
	} else if j.ext.Kind == KindRef {
		if w.err == nil {
			w.hashes = append(w.hashes, j.hashes[:int(j.ext.Count)*HashSize]...)
			w.refBlk += uint64(j.ext.Count)
		}
	} else {
		w.zeroBlk += uint64(j.ext.Count)
	}
	var e [ExtentEntrySize]byte
	encodeExtent(e[:], &j.ext)
	w.table = append(w.table, e[:]...)
	w.nExt++
	*j = job{}
	jobPool.Put(j)
}

// Close writes pending extents, the extent table, the block hashes and the
// footer. It does not close the underlying writer. After an error the file
// is incomplete and must be discarded.
func (w *Writer) Close() (Summary, error) {
	if w.closed {
		return Summary{}, errors.New("cycle writer: already closed")
	}
	w.closed = true
	defer w.finish() // stops the output goroutine on every path
	if w.pend != nil {
		w.dispatch()
	}
	w.flushZero()
	w.flushRef()
	if err := w.drain(true); err != nil {
		return Summary{}, err
	}
	f := Footer{
		TableOff:   w.off,
		Extents:    uint64(w.nExt),
		DataBlocks: w.dataBlk,
		ZeroBlocks: w.zeroBlk,
		RefBlocks:  w.refBlk,
	}
	if err := w.write(w.table); err != nil {
		return Summary{}, err
	}
	f.HashesOff = w.off
	if err := w.writeOwned(w.hashes, nil); err != nil {
		return Summary{}, err
	}
	if err := w.finish(); err != nil { // everything before the footer is hashed now
		return Summary{}, err
	}
	w.hasher.Sum(f.FileHash[:0])
	foot := encodeFooter(&f, w.version)
	n, err := w.out.Write(foot)
	w.off += uint64(n)
	if err == nil && n != len(foot) {
		err = io.ErrShortWrite
	}
	if err != nil {
		w.err = fmt.Errorf("cycle writer: %w", err)
		return Summary{}, w.err
	}
	return Summary{Bytes: int64(w.off), DataBlocks: w.dataBlk, ZeroBlocks: w.zeroBlk, RefBlocks: w.refBlk, Extents: w.nExt}, nil
}
