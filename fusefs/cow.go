package fusefs

// The test failover mount of the replica: a fixed set of writable images
// (copy-on-write over a recovery point, implemented by the caller) in one
// flat directory. The set of files is fixed: no create, unlink, rename or
// resize. Mode, owner and times can be changed (libvirt chowns disks it
// starts a VM on); such changes last as long as the mount.

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// RWImage is one writable image of a test mount.
type RWImage interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	// Zero makes the range read as zeros (PUNCH_HOLE, ZERO_RANGE).
	Zero(off, n int64) error
	// Sync makes every write so far durable (FSYNC).
	Sync() error
	Size() int64
}

// NamedImage is an image with its file name in the mount.
type NamedImage struct {
	Name  string
	Image RWImage
}

// MountImages serves imgs as files at mnt. An image that implements
// DataSeeker also answers SEEK_DATA/SEEK_HOLE.
func MountImages(mnt string, imgs []NamedImage, o Options) (*Server, error) {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	name := o.Name
	if name == "" {
		name = "standin-test"
	}
	root := &cowRoot{imgs: imgs, log: o.Logger}
	root.uid, root.gid = o.Access.ids()
	root.fileMode = o.Access.fileMode(0o600)
	root.dirMode = o.Access.dirMode(root.fileMode, true)
	opts := mountOptionsPerm(name, o.Access.AllowOther, true, o.Debug, true)
	return mount(mnt, root, opts, o.Logger)
}

type cowRoot struct {
	fs.Inode
	imgs []NamedImage
	log  *slog.Logger
	// owner, group and initial permission bits of the files; the mode
	// of the directory
	uid, gid          uint32
	fileMode, dirMode uint32
}

var (
	_ fs.NodeOnAdder   = (*cowRoot)(nil)
	_ fs.NodeGetattrer = (*cowRoot)(nil)
	_ fs.NodeCreater   = (*cowRoot)(nil)
	_ fs.NodeMkdirer   = (*cowRoot)(nil)
	_ fs.NodeMknoder   = (*cowRoot)(nil)
	_ fs.NodeSymlinker = (*cowRoot)(nil)
	_ fs.NodeLinker    = (*cowRoot)(nil)
	_ fs.NodeUnlinker  = (*cowRoot)(nil)
	_ fs.NodeRmdirer   = (*cowRoot)(nil)
	_ fs.NodeRenamer   = (*cowRoot)(nil)
	_ fs.NodeTmpfiler  = (*cowRoot)(nil)
)

func (r *cowRoot) OnAdd(ctx context.Context) {
	now := time.Now()
	for i, im := range r.imgs {
		n := &cowFile{img: im.Image, name: im.Name, log: r.log, mode: r.fileMode, uid: r.uid, gid: r.gid, mtime: now, atime: now, ctime: now}
		ch := r.NewPersistentInode(ctx, n, fs.StableAttr{Mode: syscall.S_IFREG, Ino: uint64(i) + 2})
		r.AddChild(im.Name, ch, false)
	}
}

func (r *cowRoot) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = syscall.S_IFDIR | r.dirMode
	out.Uid, out.Gid = r.uid, r.gid
	out.Nlink = 2
	out.SetTimes(&mountTime, &mountTime, &mountTime)
	return 0
}

// The set of files is fixed.

func (r *cowRoot) Create(ctx context.Context, name string, flags uint32, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	return nil, nil, 0, syscall.EPERM
}
func (r *cowRoot) Mkdir(ctx context.Context, name string, mode uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return nil, syscall.EPERM
}
func (r *cowRoot) Mknod(ctx context.Context, name string, mode, rdev uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return nil, syscall.EPERM
}
func (r *cowRoot) Symlink(ctx context.Context, target, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return nil, syscall.EPERM
}
func (r *cowRoot) Link(ctx context.Context, target fs.InodeEmbedder, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return nil, syscall.EPERM
}
func (r *cowRoot) Unlink(ctx context.Context, name string) syscall.Errno { return syscall.EPERM }
func (r *cowRoot) Rmdir(ctx context.Context, name string) syscall.Errno  { return syscall.EPERM }
func (r *cowRoot) Rename(ctx context.Context, name string, newParent fs.InodeEmbedder, newName string, flags uint32) syscall.Errno {
	return syscall.EPERM
}
func (r *cowRoot) Tmpfile(ctx context.Context, flags uint32, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	return nil, nil, 0, syscall.EOPNOTSUPP
}

type cowFile struct {
	fs.Inode
	img  RWImage
	name string
	log  *slog.Logger

	mu                  sync.Mutex
	mode                uint32
	uid, gid            uint32
	atime, mtime, ctime time.Time
}

var (
	_ fs.NodeGetattrer      = (*cowFile)(nil)
	_ fs.NodeSetattrer      = (*cowFile)(nil)
	_ fs.NodeOpener         = (*cowFile)(nil)
	_ fs.NodeReader         = (*cowFile)(nil)
	_ fs.NodeWriter         = (*cowFile)(nil)
	_ fs.NodeAllocater      = (*cowFile)(nil)
	_ fs.NodeFsyncer        = (*cowFile)(nil)
	_ fs.NodeFlusher        = (*cowFile)(nil)
	_ fs.NodeReleaser       = (*cowFile)(nil)
	_ fs.NodeLseeker        = (*cowFile)(nil)
	_ fs.NodeCopyFileRanger = (*cowFile)(nil)
	_ fs.NodeIoctler        = (*cowFile)(nil)
)

func (n *cowFile) fill(out *fuse.AttrOut) {
	n.mu.Lock()
	defer n.mu.Unlock()
	a := &out.Attr
	a.Mode = syscall.S_IFREG | n.mode
	a.Uid, a.Gid = n.uid, n.gid
	a.Size = uint64(n.img.Size())
	a.Blocks = a.Size / 512
	if al, ok := n.img.(Allocator); ok {
		a.Blocks = blocks512(al.Allocated(), n.img.Size())
	}
	a.Blksize = 1 << 20
	a.Nlink = 1
	a.SetTimes(&n.atime, &n.mtime, &n.ctime)
	out.SetTimeout(time.Second)
}

func (n *cowFile) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	n.fill(out)
	return 0
}

func (n *cowFile) Setattr(ctx context.Context, f fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if sz, ok := in.GetSize(); ok && int64(sz) != n.img.Size() {
		return syscall.EPERM // a test image keeps the size of its point
	}
	n.mu.Lock()
	now := time.Now()
	if m, ok := in.GetMode(); ok {
		n.mode = m & 0o7777
		n.ctime = now
	}
	if u, ok := in.GetUID(); ok {
		n.uid, n.ctime = u, now
	}
	if g, ok := in.GetGID(); ok {
		n.gid, n.ctime = g, now
	}
	if t, ok := in.GetATime(); ok {
		n.atime = t
	}
	if t, ok := in.GetMTime(); ok {
		n.mtime = t
	}
	n.mu.Unlock()
	n.fill(out)
	return 0
}

// cowHandle: node-level methods do the work; the handle only marks opens.
type cowHandle struct{}

func (n *cowFile) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if flags&syscall.O_TRUNC != 0 && n.img.Size() != 0 {
		return nil, 0, syscall.EPERM
	}
	if flags&syscall.O_DIRECT != 0 {
		return &cowHandle{}, fuse.FOPEN_DIRECT_IO | fuse.FOPEN_PARALLEL_DIRECT_WRITES, 0
	}
	return &cowHandle{}, 0, 0
}

func (n *cowFile) Read(ctx context.Context, f fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	k, err := n.img.ReadAt(dest, off)
	if err != nil && !errors.Is(err, io.EOF) {
		n.log.Error("test mount: read", "file", n.name, "off", off, "err", err)
		return nil, toErrno(err)
	}
	return fuse.ReadResultData(dest[:k]), 0
}

func (n *cowFile) Write(ctx context.Context, f fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	if off >= n.img.Size() {
		return 0, syscall.ENOSPC
	}
	if rest := n.img.Size() - off; int64(len(data)) > rest {
		data = data[:rest] // a short write; the next one gets ENOSPC
	}
	k, err := n.img.WriteAt(data, off)
	if err != nil {
		n.log.Error("test mount: write", "file", n.name, "off", off, "err", err)
		return uint32(k), toErrno(err)
	}
	n.mu.Lock()
	n.mtime = time.Now()
	n.mu.Unlock()
	return uint32(k), 0
}

func (n *cowFile) Allocate(ctx context.Context, f fs.FileHandle, off, size uint64, mode uint32) syscall.Errno {
	end := int64(off + size)
	if end > n.img.Size() && mode&unix.FALLOC_FL_KEEP_SIZE == 0 {
		return syscall.EPERM // would grow the image
	}
	end = min(end, n.img.Size())
	if mode&(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_ZERO_RANGE) == 0 {
		return 0 // preallocation: no content changes
	}
	if int64(off) >= end {
		return 0
	}
	if err := n.img.Zero(int64(off), end-int64(off)); err != nil {
		return toErrno(err)
	}
	return 0
}

func (n *cowFile) Fsync(ctx context.Context, f fs.FileHandle, flags uint32) syscall.Errno {
	if err := n.img.Sync(); err != nil {
		n.log.Error("test mount: fsync", "file", n.name, "err", err)
		return syscall.EIO
	}
	return 0
}

func (n *cowFile) Flush(ctx context.Context, f fs.FileHandle) syscall.Errno   { return 0 }
func (n *cowFile) Release(ctx context.Context, f fs.FileHandle) syscall.Errno { return 0 }

func (n *cowFile) Lseek(ctx context.Context, f fs.FileHandle, off uint64, whence uint32) (uint64, syscall.Errno) {
	ds, _ := n.img.(DataSeeker)
	return seekData(ds, int64(off), whence, n.img.Size())
}

func (n *cowFile) CopyFileRange(ctx context.Context, fhIn fs.FileHandle, offIn uint64, out *fs.Inode, fhOut fs.FileHandle, offOut uint64, l uint64, flags uint64) (uint32, syscall.Errno) {
	return 0, syscall.ENOSYS
}

func (n *cowFile) Ioctl(ctx context.Context, f fs.FileHandle, cmd uint32, arg uint64, input []byte, output []byte) (int32, syscall.Errno) {
	return 0, syscall.ENOTTY
}
