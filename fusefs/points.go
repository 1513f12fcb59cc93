package fusefs

// The points mount of the replica: every recovery point of every group as a
// read-only file.
//
//	MNT/GROUP/IMAGE@TIME      one file per image and point
//	MNT/GROUP/latest/IMAGE    the same file (same inode) of the latest point
//
// Each (point, image) is one inode whose content never changes, so the
// kernel may keep its page cache across opens (FOPEN_KEEP_CACHE). Opening a
// file asks the PointSource for a reader, which pins the point until the
// file is released: a file once opened keeps reading the point it was
// opened at, while cycles are applied and retention runs. GROUP/latest/IMAGE
// is looked up again at every access (entry timeout 0), so it always names
// the latest point's inode; listings are built at every READDIR.

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"log/slog"
	"strings"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// PointSource is what the points mount reads. Errors whose errno is known
// (ENOENT for a point, group or image that does not exist) should be
// syscall.Errno values; anything else reads as EIO.
type PointSource interface {
	// Groups lists the groups (directories of the mount root).
	Groups() ([]string, error)
	// Files lists the files of a group.
	Files(group string) ([]PointFile, error)
	// Open opens one file for reading; Close of the reader releases it.
	Open(group string, f PointFile) (ImageReader, error)
}

// PointFile is one image at one recovery point.
type PointFile struct {
	Name   string // name in the group directory, e.g. disk.img@2026-01-01T10:00:00Z
	Image  string // name in GROUP/latest/ (when Latest)
	Key    string // identity of the content: equal keys, equal bytes (e.g. "POINT/IMAGEID")
	Size   int64
	Time   time.Time
	Latest bool
	// Allocated is reported as st_blocks (0: Size): sparse-aware copiers
	// (cp, tar, rsync) look for holes only in files whose st_blocks is
	// smaller than their size.
	Allocated int64
}

// ImageReader reads a point file.
type ImageReader interface {
	ReadAt(p []byte, off int64) (int, error)
	Close() error
}

// DataSeeker is implemented by readers that know where their data is; it
// answers lseek SEEK_DATA (hole false) and SEEK_HOLE. Errors: ENXIO as
// lseek(2) defines it.
type DataSeeker interface {
	SeekData(off int64, hole bool) (int64, error)
}

// MountPoints serves src read-only at mnt.
func MountPoints(mnt string, src PointSource, o Options) (*Server, error) {
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	name := o.Name
	if name == "" {
		name = "standin-points"
	}
	opts := mountOptionsPerm(name, o.Access.AllowOther, true, o.Debug, false)
	readOnly(opts)
	root := &ptRoot{src: src, log: o.Logger}
	root.uid, root.gid = o.Access.ids()
	root.fileMode = o.Access.fileMode(0o400) &^ 0o222 // read-only
	root.dirMode = o.Access.dirMode(root.fileMode, false) &^ 0o222
	return mount(mnt, root, opts, o.Logger)
}

// readOnly makes a mount read-only in the kernel.
func readOnly(opts *fs.Options) {
	if opts.DirectMount {
		opts.DirectMountFlags = syscall.MS_NOSUID | syscall.MS_NODEV | syscall.MS_RDONLY
	} else {
		opts.Options = append(opts.Options, "ro")
	}
}

func inoOf(s string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(s))
	return h.Sum64() | 1<<63 // never 1 (the root)
}

var (
	dirTimeout  = time.Second
	fileTimeout = time.Minute // a point file's attributes never change
)

// mountTime is the time shown for directories.
var mountTime = time.Now()

func (r *ptRoot) dirAttr(a *fuse.Attr) {
	a.Mode = syscall.S_IFDIR | r.dirMode
	a.Uid, a.Gid = r.uid, r.gid
	a.Nlink = 2
	a.SetTimes(&mountTime, &mountTime, &mountTime)
}

type ptRoot struct {
	fs.Inode
	src PointSource
	log *slog.Logger
	// owner, group and permission bits of every file and directory
	uid, gid          uint32
	fileMode, dirMode uint32
}

var (
	_ fs.NodeReaddirer = (*ptRoot)(nil)
	_ fs.NodeLookuper  = (*ptRoot)(nil)
	_ fs.NodeGetattrer = (*ptRoot)(nil)
)

func (r *ptRoot) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	r.dirAttr(&out.Attr)
	return 0
}

func (r *ptRoot) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	gs, err := r.src.Groups()
	if err != nil {
		r.log.Error("points mount: list groups", "err", err)
		return nil, toErrno(err)
	}
	es := make([]fuse.DirEntry, 0, len(gs))
	for _, g := range gs {
		es = append(es, fuse.DirEntry{Name: g, Mode: syscall.S_IFDIR, Ino: inoOf("g/" + g)})
	}
	return fs.NewListDirStream(es), 0
}

func (r *ptRoot) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	gs, err := r.src.Groups()
	if err != nil {
		return nil, toErrno(err)
	}
	for _, g := range gs {
		if g == name {
			r.dirAttr(&out.Attr)
			out.SetEntryTimeout(dirTimeout)
			out.SetAttrTimeout(dirTimeout)
			return r.NewInode(ctx, &ptGroup{root: r, group: g}, fs.StableAttr{Mode: syscall.S_IFDIR, Ino: inoOf("g/" + g)}), 0
		}
	}
	return nil, syscall.ENOENT
}

type ptGroup struct {
	fs.Inode
	root  *ptRoot
	group string
}

var (
	_ fs.NodeReaddirer = (*ptGroup)(nil)
	_ fs.NodeLookuper  = (*ptGroup)(nil)
	_ fs.NodeGetattrer = (*ptGroup)(nil)
)

func (d *ptGroup) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	d.root.dirAttr(&out.Attr)
	return 0
}

func (d *ptGroup) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	fs0, err := d.root.src.Files(d.group)
	if err != nil {
		return nil, toErrno(err)
	}
	es := []fuse.DirEntry{{Name: "latest", Mode: syscall.S_IFDIR, Ino: inoOf("l/" + d.group)}}
	for _, f := range fs0 {
		es = append(es, fuse.DirEntry{Name: f.Name, Mode: syscall.S_IFREG, Ino: inoOf("f/" + d.group + "/" + f.Key)})
	}
	return fs.NewListDirStream(es), 0
}

func (d *ptGroup) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if name == "latest" {
		d.root.dirAttr(&out.Attr)
		out.SetEntryTimeout(dirTimeout)
		out.SetAttrTimeout(dirTimeout)
		return d.NewInode(ctx, &ptLatest{root: d.root, group: d.group}, fs.StableAttr{Mode: syscall.S_IFDIR, Ino: inoOf("l/" + d.group)}), 0
	}
	if !strings.Contains(name, "@") {
		return nil, syscall.ENOENT
	}
	files, err := d.root.src.Files(d.group)
	if err != nil {
		return nil, toErrno(err)
	}
	for _, f := range files {
		if f.Name == name {
			return d.root.fileInode(ctx, &d.Inode, d.group, f, out, dirTimeout), 0
		}
	}
	return nil, syscall.ENOENT
}

type ptLatest struct {
	fs.Inode
	root  *ptRoot
	group string
}

var (
	_ fs.NodeReaddirer = (*ptLatest)(nil)
	_ fs.NodeLookuper  = (*ptLatest)(nil)
	_ fs.NodeGetattrer = (*ptLatest)(nil)
)

func (d *ptLatest) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	d.root.dirAttr(&out.Attr)
	return 0
}

func (d *ptLatest) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	files, err := d.root.src.Files(d.group)
	if err != nil {
		return nil, toErrno(err)
	}
	var es []fuse.DirEntry
	for _, f := range files {
		if f.Latest {
			es = append(es, fuse.DirEntry{Name: f.Image, Mode: syscall.S_IFREG, Ino: inoOf("f/" + d.group + "/" + f.Key)})
		}
	}
	return fs.NewListDirStream(es), 0
}

func (d *ptLatest) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	files, err := d.root.src.Files(d.group)
	if err != nil {
		return nil, toErrno(err)
	}
	for _, f := range files {
		if f.Latest && f.Image == name {
			// (Almost) no entry caching: the next access looks the name up
			// again and gets the inode of whatever point is latest then. (0
			// would mean "the mount's default" to go-fuse.)
			return d.root.fileInode(ctx, &d.Inode, d.group, f, out, time.Nanosecond), 0
		}
	}
	return nil, syscall.ENOENT
}

func (r *ptRoot) fileInode(ctx context.Context, parent *fs.Inode, group string, f PointFile, out *fuse.EntryOut, entryTimeout time.Duration) *fs.Inode {
	n := &ptFile{root: r, group: group, f: f}
	n.fill(&out.Attr)
	out.SetEntryTimeout(entryTimeout)
	out.SetAttrTimeout(fileTimeout)
	return parent.NewInode(ctx, n, fs.StableAttr{Mode: syscall.S_IFREG, Ino: inoOf("f/" + group + "/" + f.Key)})
}

// blocks512 is st_blocks for a file of size bytes of which alloc are
// allocated (0: all).
func blocks512(alloc, size int64) uint64 {
	if alloc <= 0 || alloc > size {
		alloc = size
	}
	return uint64(alloc+511) / 512
}

// Allocator is implemented by images that can estimate their non-hole
// bytes (reported as st_blocks).
type Allocator interface {
	Allocated() int64
}

type ptFile struct {
	fs.Inode
	root  *ptRoot
	group string
	f     PointFile
}

var (
	_ fs.NodeGetattrer      = (*ptFile)(nil)
	_ fs.NodeOpener         = (*ptFile)(nil)
	_ fs.NodeReader         = (*ptFile)(nil)
	_ fs.NodeReleaser       = (*ptFile)(nil)
	_ fs.NodeLseeker        = (*ptFile)(nil)
	_ fs.NodeCopyFileRanger = (*ptFile)(nil)
	_ fs.NodeFsyncer        = (*ptFile)(nil)
	_ fs.NodeFlusher        = (*ptFile)(nil)
)

func (n *ptFile) fill(a *fuse.Attr) {
	a.Mode = syscall.S_IFREG | n.root.fileMode
	a.Uid, a.Gid = n.root.uid, n.root.gid
	a.Size = uint64(n.f.Size)
	a.Blocks = blocks512(n.f.Allocated, n.f.Size)
	a.Blksize = 1 << 20
	t := n.f.Time
	a.SetTimes(&t, &t, &t)
	a.Nlink = 1
}

func (n *ptFile) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	n.fill(&out.Attr)
	out.SetTimeout(fileTimeout)
	return 0
}

// ptHandle is an open point file.
type ptHandle struct {
	r ImageReader
}

func (n *ptFile) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if flags&syscall.O_ACCMODE != syscall.O_RDONLY || flags&syscall.O_TRUNC != 0 {
		return nil, 0, syscall.EROFS
	}
	r, err := n.root.src.Open(n.group, n.f)
	if err != nil {
		return nil, 0, toErrno(err)
	}
	fl := uint32(fuse.FOPEN_KEEP_CACHE)
	if flags&syscall.O_DIRECT != 0 {
		fl = fuse.FOPEN_DIRECT_IO
	}
	return &ptHandle{r: r}, fl, 0
}

func (n *ptFile) Read(ctx context.Context, f fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	h, ok := f.(*ptHandle)
	if !ok {
		return nil, syscall.EBADF
	}
	k, err := h.r.ReadAt(dest, off)
	if err != nil && !errors.Is(err, io.EOF) {
		n.root.log.Error("points mount: read", "group", n.group, "file", n.f.Name, "off", off, "err", err)
		return nil, toErrno(err)
	}
	return fuse.ReadResultData(dest[:k]), 0
}

func (n *ptFile) Release(ctx context.Context, f fs.FileHandle) syscall.Errno {
	if h, ok := f.(*ptHandle); ok {
		h.r.Close()
	}
	return 0
}

func (n *ptFile) Lseek(ctx context.Context, f fs.FileHandle, off uint64, whence uint32) (uint64, syscall.Errno) {
	var ds DataSeeker
	if h, ok := f.(*ptHandle); ok {
		ds, _ = h.r.(DataSeeker)
	}
	return seekData(ds, int64(off), whence, n.f.Size)
}

// seekData answers FUSE LSEEK (the kernel only sends SEEK_DATA and
// SEEK_HOLE): through ds if there is one, else the whole file is data.
func seekData(ds DataSeeker, off int64, whence uint32, size int64) (uint64, syscall.Errno) {
	const seekData, seekHole = 3, 4
	if whence != seekData && whence != seekHole {
		return 0, syscall.EINVAL
	}
	if off >= size {
		return 0, syscall.ENXIO
	}
	if ds == nil {
		if whence == seekData {
			return uint64(off), 0
		}
		return uint64(size), 0
	}
	r, err := ds.SeekData(off, whence == seekHole)
	if err != nil {
		return 0, toErrno(err)
	}
	return uint64(r), 0
}

func (n *ptFile) CopyFileRange(ctx context.Context, fhIn fs.FileHandle, offIn uint64, out *fs.Inode, fhOut fs.FileHandle, offOut uint64, l uint64, flags uint64) (uint32, syscall.Errno) {
	return 0, syscall.ENOSYS
}

func (n *ptFile) Fsync(ctx context.Context, f fs.FileHandle, flags uint32) syscall.Errno { return 0 }
func (n *ptFile) Flush(ctx context.Context, f fs.FileHandle) syscall.Errno               { return 0 }

// UnmountStrict unmounts, failing (EBUSY) while files of the mount are open
// or a loop device uses one, instead of detaching lazily like Unmount.
func (s *Server) UnmountStrict() error {
	if err := s.srv.Unmount(); err != nil {
		return fmt.Errorf("fusefs: unmount %s: %w", s.mnt, err)
	}
	return nil
}

// Dir is the mount point.
func (s *Server) Dir() string { return s.mnt }
