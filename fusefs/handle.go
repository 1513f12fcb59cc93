package fusefs

import (
	"context"
	"errors"
	"os"
	"sync"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// handle is an open image file. It does not embed *fs.LoopbackFile: that
// would promote PassthroughFd (untracked I/O), Writev and Ioctl.
type handle struct {
	f          *os.File // as the client opened it (O_DIRECT kept)
	path       string
	img        Image
	direct     bool
	afterWrite func()
	writable   bool // opened for writing (O_WRONLY or O_RDWR)

	mu      sync.Mutex
	fb      *os.File    // lazily opened buffered twin for unaligned I/O on a direct handle
	counter openCounter // told Closed once, on Release; nil after
}

var (
	_ fs.FileReader    = (*handle)(nil)
	_ fs.FileWriter    = (*handle)(nil)
	_ fs.FileLseeker   = (*handle)(nil)
	_ fs.FileGetattrer = (*handle)(nil)
	_ fs.FileReleaser  = (*handle)(nil)
	_ fs.FileFlusher   = (*handle)(nil)
	_ fs.FileFsyncer   = (*handle)(nil)
	_ fs.FileAllocater = (*handle)(nil)
)

// fallback returns a non-O_DIRECT descriptor of the same file, for requests
// the backing filesystem rejects as unaligned (FUSE itself accepts any).
func (h *handle) fallback() (*os.File, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.fb == nil {
		fl, err := unix.FcntlInt(h.f.Fd(), unix.F_GETFL, 0)
		if err != nil {
			return nil, err
		}
		mode := fl & unix.O_ACCMODE
		f, err := os.OpenFile(h.path, mode|syscall.O_NOFOLLOW, 0)
		if err != nil {
			return nil, err
		}
		h.fb = f
	}
	return h.fb, nil
}

func (h *handle) pwrite(p []byte, off int64) (int, error) {
	n, err := h.f.WriteAt(p, off)
	if h.direct && errors.Is(err, syscall.EINVAL) && n == 0 {
		fb, ferr := h.fallback()
		if ferr != nil {
			return 0, ferr
		}
		return fb.WriteAt(p, off)
	}
	return n, err
}

func (h *handle) write(data []byte, off int64) (uint32, syscall.Errno) {
	end, err := h.img.BeginWrite(off, int64(len(data)))
	if err != nil {
		return 0, toErrno(err)
	}
	n, err := h.pwrite(data, off)
	end()
	if h.afterWrite != nil {
		h.afterWrite()
	}
	return uint32(n), toErrno(err)
}

func (h *handle) Write(ctx context.Context, data []byte, off int64) (uint32, syscall.Errno) {
	return h.write(data, off)
}

func (h *handle) read(dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	n, err := h.f.ReadAt(dest, off)
	if h.direct && errors.Is(err, syscall.EINVAL) && n == 0 {
		fb, ferr := h.fallback()
		if ferr != nil {
			return nil, toErrno(ferr)
		}
		n, err = fb.ReadAt(dest, off)
	}
	if err != nil && !errors.Is(err, os.ErrClosed) && n == 0 && !isEOF(err) {
		return nil, toErrno(err)
	}
	return fuse.ReadResultData(dest[:n]), 0
}

func isEOF(err error) bool { return err != nil && err.Error() == "EOF" }

func (h *handle) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	return h.read(dest, off)
}

func (h *handle) allocate(off, size uint64, mode uint32) syscall.Errno {
	var begin func(off, n int64) (func(), error)
	switch {
	case mode == unix.FALLOC_FL_KEEP_SIZE:
		begin = nil // preallocation only: no content changes
	case mode&unix.FALLOC_FL_PUNCH_HOLE != 0:
		begin = h.img.BeginPunch
	case mode&unix.FALLOC_FL_ZERO_RANGE != 0:
		begin = h.img.BeginZero
	default:
		begin = h.img.BeginAllocate
	}
	end := func() {}
	if begin != nil {
		var err error
		if end, err = begin(int64(off), int64(size)); err != nil {
			return toErrno(err)
		}
	}
	err := unix.Fallocate(int(h.f.Fd()), mode, int64(off), int64(size))
	end()
	return fs.ToErrno(err)
}

func (h *handle) Allocate(ctx context.Context, off, size uint64, mode uint32) syscall.Errno {
	return h.allocate(off, size, mode)
}

// fsync syncs the backing data, then the tracking state, and only then
// replies. It never answers ENOSYS (the kernel would stop asking and report
// success to every later fsync).
func (h *handle) fsync(flags uint32) syscall.Errno {
	var err error
	if flags&fsyncFdatasync != 0 {
		err = unix.Fdatasync(int(h.f.Fd()))
	} else {
		err = h.f.Sync()
	}
	if err != nil {
		return fs.ToErrno(err)
	}
	if h.img != nil {
		if err := h.img.Sync(); err != nil {
			return syscall.EIO
		}
	}
	return 0
}

func (h *handle) Fsync(ctx context.Context, flags uint32) syscall.Errno { return h.fsync(flags) }

func (h *handle) Lseek(ctx context.Context, off uint64, whence uint32) (uint64, syscall.Errno) {
	n, err := unix.Seek(int(h.f.Fd()), int64(off), int(whence))
	return uint64(n), fs.ToErrno(err)
}

func (h *handle) Getattr(ctx context.Context, out *fuse.AttrOut) syscall.Errno {
	var st syscall.Stat_t
	if err := syscall.Fstat(int(h.f.Fd()), &st); err != nil {
		return fs.ToErrno(err)
	}
	out.FromStat(&st)
	return 0
}

// Flush is not a durability point (close(2) of every dup'ed fd sends it).
func (h *handle) Flush(ctx context.Context) syscall.Errno { return 0 }

func (h *handle) Release(ctx context.Context) syscall.Errno {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.fb != nil {
		h.fb.Close()
		h.fb = nil
	}
	if h.counter != nil {
		h.counter.Closed(h.writable)
		h.counter = nil
	}
	return fs.ToErrno(h.f.Close())
}

// fsyncFdatasync is FUSE_FSYNC_FDATASYNC (include/uapi/linux/fuse.h).
const fsyncFdatasync = 1
