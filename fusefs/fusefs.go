package fusefs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// Tracker is what the mount needs from change tracking. Names are paths
// relative to the mount root.
type Tracker interface {
	// Image returns the tracking handle of the regular file rel, registering
	// it if needed (also right after it was created through the mount).
	Image(rel string) (Image, error)
	// Unlinking is called before rel is unlinked; done reports the outcome.
	Unlinking(rel string) (done func(ok bool))
	// Renamed is called after oldRel was renamed to newRel.
	Renamed(oldRel, newRel string)
}

// Image records the changes of one image. Begin* is called before the
// backing operation, end after it; see tracker.Image.
type Image interface {
	BeginWrite(off, n int64) (end func(), err error)
	BeginPunch(off, n int64) (end func(), err error)
	BeginZero(off, n int64) (end func(), err error)
	BeginAllocate(off, n int64) (end func(), err error)
	BeginResize(size int64) (end func(), err error)
	// Sync is called on FSYNC after the backing file was synced.
	Sync() error
}

// openCounter is implemented by images that count the handles open through
// the mount (tracker.Image): Opened after every successful open of a regular
// file, Closed once when its handle is released.
type openCounter interface {
	Opened(write bool)
	Closed(write bool)
}

// fencer is implemented by images that can be fenced (tracker.Image): a
// fenced image refuses opens for writing with EROFS; reads stay possible.
type fencer interface{ Fenced() bool }

// Options configure a mount.
type Options struct {
	// AllowOther lets other users (QEMU run by libvirt) use the mount; the
	// kernel then enforces file modes (default_permissions). Default true.
	DenyOthers bool
	// AfterWrite is a test hook called after every backing write returned,
	// before the reply to the kernel.
	AfterWrite func()
	// Debug logs every FUSE request.
	Debug  bool
	Logger *slog.Logger
	// Name is the filesystem name shown in /proc/mounts (default "standin").
	Name string
	// Access says who may use a points or test failover mount (MountPoints,
	// MountImages; Mount uses DenyOthers). Default: the mounting user only.
	Access Access
}

// Access is who may use a points or test failover mount. The files and
// directories belong to the daemon's user and Gid; the kernel checks their
// modes (default_permissions).
type Access struct {
	// AllowOther lets users other than the mounting one in (allow_other),
	// as far as the modes let them: needed when QEMU runs as another user
	// (libvirt's qemu user) on a test failover's images. Without it the
	// kernel lets only the mounting user (root for the daemon) in, whatever
	// the modes say.
	AllowOther bool `json:"allow_other,omitempty"`
	// Gid is the group of the files (0: the daemon's group).
	Gid int `json:"gid,omitempty"`
	// Mode is the permission bits of the files (0: owner only: 0400 on the
	// read-only points mount, 0600 for test images). Directories get read
	// and search for every class that may read, and for no other: a user
	// who may not read the points cannot stat them either (sizes, which
	// points exist). Only on the test failover mount with AllowOther may
	// every class search the directory, so a test image chowned to QEMU's
	// user is reachable (the listing is not).
	Mode uint32 `json:"mode,omitempty"`
}

// ids returns the owner and group of a mount's files.
func (a Access) ids() (uid, gid uint32) {
	uid, gid = uint32(os.Geteuid()), uint32(os.Getegid())
	if a.Gid > 0 {
		gid = uint32(a.Gid)
	}
	return uid, gid
}

// fileMode is the permission bits of a file (def when Mode is 0).
func (a Access) fileMode(def uint32) uint32 {
	if a.Mode == 0 {
		return def
	}
	return a.Mode & 0o777
}

// dirMode is the permission bits of the directories holding files of mode
// m: rwx for the owner, r-x for every class that may read; --x for all
// with AllowOther when the files can be chowned (chownable), so their new
// owner reaches them.
func (a Access) dirMode(m uint32, chownable bool) uint32 {
	d := uint32(0o700) | m&0o044 | (m&0o044)>>2
	if a.AllowOther && chownable {
		d |= 0o011
	}
	return d
}

// Server is a running mount.
type Server struct {
	srv *fuse.Server
	mnt string
}

// Mount serves the directory tree dir at mnt with every mutation of a
// regular file recorded by t before it reaches the backing file.
func Mount(dir, mnt string, t Tracker, o Options) (*Server, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(dir, &st); err != nil {
		return nil, fmt.Errorf("fusefs: backing directory: %w", err)
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	rd := &fs.LoopbackRoot{Path: dir, Dev: uint64(st.Dev)}
	root := &node{LoopbackNode: &fs.LoopbackNode{RootData: rd}, t: t, o: &o}
	rd.RootNode = root
	name := o.Name
	if name == "" {
		name = "standin"
	}
	return mount(mnt, root, mountOptions(name, !o.DenyOthers, o.Debug, true), o.Logger)
}

// MountLoopback serves dir at mnt with a plain, untracked go-fuse loopback
// tuned like Mount (for benchmarks: the cost of tracking is Mount minus this).
func MountLoopback(dir, mnt string) (*Server, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(dir, &st); err != nil {
		return nil, err
	}
	rd := &fs.LoopbackRoot{Path: dir, Dev: uint64(st.Dev)}
	root := &plainNode{LoopbackNode: &fs.LoopbackNode{RootData: rd}}
	rd.RootNode = root
	return mount(mnt, root, mountOptions("standin-loopback", true, false, true), slog.Default())
}

// mountOptions are the options measured to matter on a 2-core box: MaxWrite
// 1 MiB, CAP_ASYNC_DIO and DisableXAttrs (a GETXATTR round trip per write
// otherwise), passthrough masked (writes would bypass the tracker).
func mountOptions(name string, allowOther, debug, directIO bool) *fs.Options {
	return mountOptionsPerm(name, allowOther, allowOther, debug, directIO)
}

// mountOptionsPerm is mountOptions with default_permissions chosen apart
// from allow_other.
func mountOptionsPerm(name string, allowOther, defaultPermissions, debug, directIO bool) *fs.Options {
	one := time.Second
	mo := fuse.MountOptions{
		FsName:            name,
		Name:              "standin",
		DirectMountStrict: os.Geteuid() == 0,
		DirectMount:       os.Geteuid() == 0,
		AllowOther:        allowOther,
		MaxWrite:          1 << 20,
		MaxBackground:     64,
		DisableSplice:     true,
		DisableXAttrs:     true,
		// Passthrough would let reads AND writes bypass the server as root
		// on Linux ≥ 6.9: nothing would be tracked.
		DisabledCapabilities: fuse.CAP_PASSTHROUGH,
		Debug:                debug,
	}
	if directIO {
		mo.ExtraCapabilities = fuse.CAP_ASYNC_DIO
	}
	mo.MaxInflightRequestBytes = 256 << 20
	if defaultPermissions {
		mo.Options = append(mo.Options, "default_permissions")
	}
	return &fs.Options{
		MountOptions:    mo,
		AttrTimeout:     &one,
		EntryTimeout:    &one,
		NegativeTimeout: &one,
	}
}

func mount(mnt string, root fs.InodeEmbedder, opts *fs.Options, log *slog.Logger) (*Server, error) {
	srv, err := fs.Mount(mnt, root, opts)
	if err != nil {
		return nil, fmt.Errorf("fusefs: mount %s: %w", mnt, err)
	}
	return &Server{srv: srv, mnt: mnt}, nil
}

// Wait blocks until the filesystem is unmounted.
func (s *Server) Wait() { s.srv.Wait() }

// Unmount unmounts; if files are still open it detaches the mount lazily
// (open files keep working until closed, Wait returns after that).
func (s *Server) Unmount() error {
	if err := s.srv.Unmount(); err != nil {
		if err2 := unix.Unmount(s.mnt, unix.MNT_DETACH); err2 != nil {
			return fmt.Errorf("fusefs: unmount %s: %v; lazy unmount: %w", s.mnt, err, err2)
		}
	}
	return nil
}

// node is a loopback node whose mutating operations are tracked. Node-level
// methods run before the handle's (fs/bridge.go), so every handle type is
// covered, including a nil handle (truncate(2), O_TRUNC).
type node struct {
	*fs.LoopbackNode
	t Tracker
	o *Options
}

var (
	_ fs.NodeWrapChilder    = (*node)(nil)
	_ fs.NodeOpener         = (*node)(nil)
	_ fs.NodeCreater        = (*node)(nil)
	_ fs.NodeWriter         = (*node)(nil)
	_ fs.NodeWritever       = (*node)(nil)
	_ fs.NodeReader         = (*node)(nil)
	_ fs.NodeAllocater      = (*node)(nil)
	_ fs.NodeSetattrer      = (*node)(nil)
	_ fs.NodeFsyncer        = (*node)(nil)
	_ fs.NodeCopyFileRanger = (*node)(nil)
	_ fs.NodeIoctler        = (*node)(nil)
	_ fs.NodeTmpfiler       = (*node)(nil)
	_ fs.NodeUnlinker       = (*node)(nil)
	_ fs.NodeRenamer        = (*node)(nil)
	_ fs.NodeLinker         = (*node)(nil)
	_ fs.NodeMknoder        = (*node)(nil)
	_ fs.NodeSymlinker      = (*node)(nil)
)

func (n *node) WrapChild(ctx context.Context, ops fs.InodeEmbedder) fs.InodeEmbedder {
	return &node{LoopbackNode: ops.(*fs.LoopbackNode), t: n.t, o: n.o}
}

// rel is the node's path relative to the mount root.
func (n *node) rel() string { return n.Path(n.Root()) }

func (n *node) image(rel string) (Image, syscall.Errno) {
	img, err := n.t.Image(rel)
	if err != nil {
		n.o.Logger.Error("fusefs: tracking unavailable", "path", rel, "err", err)
		return nil, syscall.EIO
	}
	return img, 0
}

func (n *node) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	return n.open(n.rel(), flags&^(syscall.O_APPEND|fuse.FMODE_EXEC))
}

// open opens the node, whose path relative to the mount is rel (passed in:
// a node just created is not linked into the tree yet).
func (n *node) open(rel string, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	p := filepath.Join(n.RootData.Path, rel)
	var st syscall.Stat_t
	if err := syscall.Lstat(p, &st); err != nil {
		return nil, 0, fs.ToErrno(err)
	}
	if st.Mode&syscall.S_IFMT != syscall.S_IFREG {
		fh, fl, errno := n.LoopbackNode.Open(context.Background(), flags)
		return fh, fl, errno
	}
	// Every regular file is an image: even a read-only open registers it,
	// so its content at the first cut is known.
	img, errno := n.image(rel)
	if errno != 0 {
		return nil, 0, errno
	}
	write := flags&syscall.O_ACCMODE != syscall.O_RDONLY
	if fc, ok := img.(fencer); ok && (write || flags&syscall.O_TRUNC != 0) && fc.Fenced() {
		return nil, 0, syscall.EROFS
	}
	f, err := os.OpenFile(p, int(flags)|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return nil, 0, fs.ToErrno(err)
	}
	h := &handle{f: f, path: p, img: img, direct: flags&syscall.O_DIRECT != 0, afterWrite: n.o.AfterWrite, writable: write}
	if oc, ok := img.(openCounter); ok {
		oc.Opened(write)
		h.counter = oc
	}
	if h.direct {
		return h, fuse.FOPEN_DIRECT_IO | fuse.FOPEN_PARALLEL_DIRECT_WRITES, 0
	}
	return h, 0, 0
}

func (n *node) Create(ctx context.Context, name string, flags uint32, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	ch, fh, _, errno := n.LoopbackNode.Create(ctx, name, flags&^syscall.O_DIRECT, mode, out)
	if errno != 0 {
		return nil, nil, 0, errno
	}
	// Reopen as a tracked handle; the file exists now. The loopback handle
	// released here was never counted (openCounter); the reopen is.
	if r, ok := fh.(fs.FileReleaser); ok {
		r.Release(ctx)
	}
	h, fl, errno := n.open(filepath.Join(n.rel(), name), flags&^(syscall.O_CREAT|syscall.O_EXCL|syscall.O_TRUNC|syscall.O_APPEND))
	if errno != 0 {
		return nil, nil, 0, errno
	}
	return ch, h, fl, 0
}

func (n *node) Write(ctx context.Context, f fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	h, ok := f.(*handle)
	if !ok {
		return 0, syscall.EBADF
	}
	return h.write(data, off)
}

func (n *node) Writev(ctx context.Context, f fs.FileHandle, data [][]byte, off int64) (uint32, syscall.Errno) {
	var total uint32
	for _, d := range data {
		w, errno := n.Write(ctx, f, d, off+int64(total))
		total += w
		if errno != 0 || int(w) < len(d) {
			return total, errno
		}
	}
	return total, 0
}

func (n *node) Read(ctx context.Context, f fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	h, ok := f.(*handle)
	if !ok {
		if r, ok := f.(fs.FileReader); ok {
			return r.Read(ctx, dest, off)
		}
		return nil, syscall.EBADF
	}
	return h.read(dest, off)
}

func (n *node) Allocate(ctx context.Context, f fs.FileHandle, off, size uint64, mode uint32) syscall.Errno {
	h, ok := f.(*handle)
	if !ok {
		return syscall.EBADF
	}
	return h.allocate(off, size, mode)
}

func (n *node) Setattr(ctx context.Context, f fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	sz, ok := in.GetSize()
	if !ok {
		return n.LoopbackNode.Setattr(ctx, nil, in, out)
	}
	var img Image
	if h, isH := f.(*handle); isH {
		img = h.img
	} else {
		var errno syscall.Errno
		if img, errno = n.image(n.rel()); errno != 0 {
			return errno
		}
	}
	end, err := img.BeginResize(int64(sz))
	if err != nil {
		return toErrno(err)
	}
	defer end()
	return n.LoopbackNode.Setattr(ctx, nil, in, out)
}

func (n *node) Fsync(ctx context.Context, f fs.FileHandle, flags uint32) syscall.Errno {
	h, ok := f.(*handle)
	if !ok {
		if s, ok := f.(fs.FileFsyncer); ok {
			return s.Fsync(ctx, flags)
		}
		return 0 // directories: nothing to do (never ENOSYS)
	}
	return h.fsync(flags)
}

// CopyFileRange is refused: the kernel then falls back to READ+WRITE, which
// is tracked. It is asked on the source inode only, and never remembers a
// per-inode answer, so ENOSYS is the one safe reply.
func (n *node) CopyFileRange(ctx context.Context, fhIn fs.FileHandle, offIn uint64, out *fs.Inode, fhOut fs.FileHandle, offOut uint64, l uint64, flags uint64) (uint32, syscall.Errno) {
	return 0, syscall.ENOSYS
}

// Ioctl is refused: forwarding would let data-modifying ioctls bypass tracking.
func (n *node) Ioctl(ctx context.Context, f fs.FileHandle, cmd uint32, arg uint64, input []byte, output []byte) (int32, syscall.Errno) {
	return 0, syscall.ENOTTY
}

// Tmpfile is refused: such files bypass node-level interception.
func (n *node) Tmpfile(ctx context.Context, flags uint32, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	return nil, nil, 0, syscall.EOPNOTSUPP
}

// Link is refused: one image, one name.
func (n *node) Link(ctx context.Context, target fs.InodeEmbedder, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return nil, syscall.EPERM
}

// Mknod is refused: the mount holds images and directories.
func (n *node) Mknod(ctx context.Context, name string, mode, rdev uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return nil, syscall.EPERM
}

// Symlink is refused: a link could point an image name outside the store.
func (n *node) Symlink(ctx context.Context, target, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return nil, syscall.EPERM
}

// fencedFile reports whether rel is a fenced image (its replication group
// failed over): it may be read, but not unlinked, renamed or replaced.
func (n *node) fencedFile(rel string) bool {
	st, err := os.Lstat(filepath.Join(n.RootData.Path, rel))
	if err != nil || !st.Mode().IsRegular() {
		return false
	}
	img, errno := n.image(rel)
	if errno != 0 {
		return false
	}
	f, ok := img.(fencer)
	return ok && f.Fenced()
}

func (n *node) Unlink(ctx context.Context, name string) syscall.Errno {
	rel := filepath.Join(n.rel(), name)
	if n.fencedFile(rel) {
		return syscall.EROFS
	}
	done := n.t.Unlinking(rel)
	errno := n.LoopbackNode.Unlink(ctx, name)
	done(errno == 0)
	return errno
}

func (n *node) Rename(ctx context.Context, name string, newParent fs.InodeEmbedder, newName string, flags uint32) syscall.Errno {
	np, ok := newParent.(*node)
	if !ok {
		return syscall.EXDEV
	}
	oldRel := filepath.Join(n.rel(), name)
	newRel := filepath.Join(np.rel(), newName)
	if n.fencedFile(oldRel) || n.fencedFile(newRel) {
		return syscall.EROFS
	}
	done := func(bool) {}
	if flags&unix.RENAME_EXCHANGE == 0 {
		if st, err := os.Lstat(filepath.Join(n.RootData.Path, newRel)); err == nil && st.Mode().IsRegular() {
			done = n.t.Unlinking(newRel) // the target is replaced
		}
	}
	errno := n.LoopbackNode.Rename(ctx, name, np, newName, flags)
	done(errno == 0)
	if errno == 0 {
		if flags&unix.RENAME_EXCHANGE != 0 {
			tmp := "\x00exchange"
			n.t.Renamed(oldRel, tmp)
			n.t.Renamed(newRel, oldRel)
			n.t.Renamed(tmp, newRel)
		} else {
			n.t.Renamed(oldRel, newRel)
		}
	}
	return errno
}

func toErrno(err error) syscall.Errno {
	var e syscall.Errno
	switch {
	case err == nil:
		return 0
	case errors.As(err, &e):
		return e
	case errors.Is(err, os.ErrNotExist):
		return syscall.ENOENT
	default:
		return syscall.EIO
	}
}

// plainNode is the untracked benchmark loopback: LoopbackNode with the same
// handle type minus tracking, so both differ only by tracking.
type plainNode struct {
	*fs.LoopbackNode
}

func (n *plainNode) WrapChild(ctx context.Context, ops fs.InodeEmbedder) fs.InodeEmbedder {
	return &plainNode{LoopbackNode: ops.(*fs.LoopbackNode)}
}

func (n *plainNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	fh, fl, errno := n.LoopbackNode.Open(ctx, flags)
	if errno == 0 && flags&syscall.O_DIRECT != 0 {
		fl |= fuse.FOPEN_DIRECT_IO | fuse.FOPEN_PARALLEL_DIRECT_WRITES
	}
	return fh, fl, errno
}
