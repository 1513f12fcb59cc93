// Package lazyfs is a FUSE filesystem for tests that simulates power cuts, in
// the spirit of LazyFS: a passthrough over a backing directory that keeps
// everything not yet made durable in memory and applies it to the backing
// directory only when it is made durable:
//
//   - file data and size (write, truncate, fallocate, O_TRUNC) are kept per
//     inode and reach the backing file on fsync or fdatasync of that file
//     (through any descriptor of it);
//   - directory entries (create, mkdir, mknod, symlink, link, unlink, rmdir,
//     rename) are applied to the backing directory at once but journaled; an
//     entry becomes durable on fsync of its directory (for a rename: of the
//     source or the destination directory). Unlinked and replaced files are
//     parked in a trash directory until their removal is durable.
//
// PowerCut drops every pending write, undoes every journaled entry not yet
// durable (newest first) and unmounts: the backing directory then holds
// exactly the durable state, and a new mount over it shows that state. Sync
// makes everything durable (the sync(2) that FUSE never sees).
//
// Attributes other than the size (mode, owner, times) and extended attributes
// are passed through and count as durable at once. This is conservative for
// what standin relies on: data needs an fsync of the file, a name an fsync of
// its directory.
package lazyfs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

const pageSize = 4096

var zeroPage = make([]byte, pageSize)

// Options configure a mount.
type Options struct {
	// Trash is where unlinked files wait until their removal is durable; it
	// must be on the backing directory's filesystem and outside it, and new,
	// empty or a trash lazyfs made (marked by a file .lazyfs-trash in it).
	// Default: the backing directory's path with ".lazyfs-trash" appended.
	Trash  string
	Debug  bool
	Logger *slog.Logger
}

// FS is a mounted lazyfs.
type FS struct {
	mu      sync.Mutex
	backing string
	trash   string
	mnt     string
	srv     *fuse.Server
	log     *slog.Logger
	files   map[uint64]*pending // by backing inode number
	journal []*metaOp
	trashN  int
	dead    bool
}

// pending is the not yet durable content of one file.
type pending struct {
	fd    int   // read-write descriptor of the backing inode
	size  int64 // logical size
	trunc int64 // backing bytes at or beyond trunc read as zeros (trunc ≤ size)
	pages map[int64][]byte
}

type opKind int

const (
	opCreate opKind = iota // path was created (file, dir, node, link)
	opRemove               // path was moved to trash
	opRename               // from was renamed to path
)

type metaOp struct {
	kind  opKind
	path  string // backing-relative
	from  string // opRename
	trash string // opRemove: absolute path in trash
}

// CutStats says what a power cut dropped.
type CutStats struct {
	Files      int   // files with pending data
	Pages      int   // pending 4 KiB pages dropped
	Truncates  int   // files whose pending size change was dropped
	EntryUndos int   // journaled directory entries undone
	Bytes      int64 // pending page bytes dropped
}

func (c CutStats) String() string {
	return fmt.Sprintf("dropped %d pages (%d bytes) of %d files, %d size changes, undid %d directory entries",
		c.Pages, c.Bytes, c.Files, c.Truncates, c.EntryUndos)
}

// Mount serves backing at mnt.
func Mount(backing, mnt string, o Options) (*FS, error) {
	backing, err := filepath.Abs(backing)
	if err != nil {
		return nil, err
	}
	var st syscall.Stat_t
	if err := syscall.Stat(backing, &st); err != nil {
		return nil, fmt.Errorf("lazyfs: backing directory: %w", err)
	}
	if o.Trash == "" {
		o.Trash = backing + ".lazyfs-trash"
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if err := openTrash(o.Trash); err != nil {
		return nil, fmt.Errorf("lazyfs: trash: %w", err)
	}
	var tst syscall.Stat_t
	if err := syscall.Stat(o.Trash, &tst); err != nil || tst.Dev != st.Dev {
		return nil, fmt.Errorf("lazyfs: trash %s must be on the filesystem of %s", o.Trash, backing)
	}
	f := &FS{backing: backing, trash: o.Trash, mnt: mnt, log: o.Logger, files: map[uint64]*pending{}}
	rd := &fs.LoopbackRoot{Path: backing, Dev: uint64(st.Dev)}
	rd.NewNode = func(r *fs.LoopbackRoot, _ *fs.Inode, _ string, _ *syscall.Stat_t) fs.InodeEmbedder {
		return &node{LoopbackNode: fs.LoopbackNode{RootData: r}, fs: f}
	}
	root := &node{LoopbackNode: fs.LoopbackNode{RootData: rd}, fs: f}
	rd.RootNode = root
	zero := time.Duration(0)
	opts := &fs.Options{
		MountOptions: fuse.MountOptions{
			FsName:               "lazyfs",
			Name:                 "lazyfs",
			DirectMount:          os.Geteuid() == 0,
			AllowOther:           os.Geteuid() == 0,
			MaxWrite:             1 << 20,
			DisableSplice:        true,
			DisabledCapabilities: fuse.CAP_PASSTHROUGH,
			Debug:                o.Debug,
		},
		AttrTimeout:     &zero,
		EntryTimeout:    &zero,
		NegativeTimeout: &zero,
	}
	if os.Geteuid() == 0 {
		opts.MountOptions.Options = append(opts.MountOptions.Options, "default_permissions")
	}
	srv, err := fs.Mount(mnt, root, opts)
	if err != nil {
		return nil, fmt.Errorf("lazyfs: mount %s: %w", mnt, err)
	}
	f.srv = srv
	return f, nil
}

// Wait returns when the filesystem is unmounted.
func (f *FS) Wait() { f.srv.Wait() }

// lock takes f.mu, or fails with EIO once the file system is dead (a
// simulated power cut).
func (f *FS) lock() (unlock func(), errno syscall.Errno) {
	f.mu.Lock()
	if f.dead {
		f.mu.Unlock()
		return nil, syscall.EIO
	}
	return f.mu.Unlock, 0
}

// Sync makes everything durable: pending data is written to the backing
// files, journaled entries are kept and parked removals deleted.
func (f *FS) Sync() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.dead {
		return syscall.EIO
	}
	var errs []error
	for ino, p := range f.files {
		errs = append(errs, f.flushLocked(ino, p))
	}
	for _, op := range f.journal {
		if op.kind == opRemove {
			os.RemoveAll(op.trash)
		}
	}
	f.journal = nil
	return errors.Join(errs...)
}

// PowerCut drops everything not durable, leaves the backing directory in the
// durable state and unmounts (lazily: every request from now on fails with
// EIO).
func (f *FS) PowerCut() CutStats {
	f.mu.Lock()
	var c CutStats
	f.dead = true
	for _, p := range f.files {
		c.Files++
		c.Pages += len(p.pages)
		c.Bytes += int64(len(p.pages)) * pageSize
		var st unix.Stat_t
		if unix.Fstat(p.fd, &st) == nil && (p.size != st.Size || p.trunc < st.Size) {
			c.Truncates++
		}
		unix.Close(p.fd)
	}
	f.files = map[uint64]*pending{}
	for i := len(f.journal) - 1; i >= 0; i-- {
		op := f.journal[i]
		var err error
		switch op.kind {
		case opCreate:
			err = os.RemoveAll(f.abs(op.path))
		case opRemove:
			err = os.Rename(op.trash, f.abs(op.path))
		case opRename:
			err = os.Rename(f.abs(op.path), f.abs(op.from))
		}
		if err != nil {
			f.log.Warn("lazyfs: undoing a directory entry", "op", op.kind, "path", op.path, "err", err)
		}
		c.EntryUndos++
	}
	f.journal = nil
	if err := emptyTrash(f.trash); err != nil {
		f.log.Warn("lazyfs: emptying the trash", "err", err)
	}
	f.mu.Unlock()
	if err := unix.Unmount(f.mnt, unix.MNT_DETACH); err != nil {
		f.log.Warn("lazyfs: unmount after the power cut", "err", err)
	}
	return c
}

// Unmount makes everything durable and unmounts.
func (f *FS) Unmount() error {
	err := f.Sync()
	f.mu.Lock()
	f.dead = true
	f.mu.Unlock()
	if uerr := f.srv.Unmount(); uerr != nil {
		if uerr2 := unix.Unmount(f.mnt, unix.MNT_DETACH); uerr2 != nil {
			err = errors.Join(err, uerr)
		}
	}
	return err
}

// trashMark names the file that marks a directory as a lazyfs trash.
const trashMark = ".lazyfs-trash"

// openTrash prepares the trash directory dir: it is created if missing. A
// trash left by a killed lazyfs (it holds trashMark) holds only removals that
// were never made durable or undone; its content is gone either way and is
// removed. Any other directory must be empty: lazyfs never removes files it
// did not put there.
func openTrash(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	if len(ents) > 0 && !slices.ContainsFunc(ents, func(e os.DirEntry) bool { return e.Name() == trashMark }) {
		return fmt.Errorf("%s is not empty and not a lazyfs trash: give a new or empty directory", dir)
	}
	if err := emptyTrash(dir); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, trashMark), nil, 0o600)
}

// emptyTrash removes what lazyfs parked in the trash dir (all but the mark).
func emptyTrash(dir string) error {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range ents {
		if e.Name() != trashMark {
			errs = append(errs, os.RemoveAll(filepath.Join(dir, e.Name())))
		}
	}
	return errors.Join(errs...)
}

func (f *FS) abs(rel string) string { return filepath.Join(f.backing, rel) }

// flushLocked writes p to the backing file and forgets it.
func (f *FS) flushLocked(ino uint64, p *pending) error {
	defer func() {
		unix.Close(p.fd)
		delete(f.files, ino)
	}()
	var st unix.Stat_t
	if err := unix.Fstat(p.fd, &st); err != nil {
		return err
	}
	if p.trunc < st.Size {
		if err := unix.Ftruncate(p.fd, p.trunc); err != nil {
			return err
		}
	}
	idx := make([]int64, 0, len(p.pages))
	for i := range p.pages {
		idx = append(idx, i)
	}
	sort.Slice(idx, func(a, b int) bool { return idx[a] < idx[b] })
	for _, i := range idx {
		off := i * pageSize
		n := min(int64(pageSize), p.size-off)
		if n <= 0 {
			continue
		}
		if _, err := unix.Pwrite(p.fd, p.pages[i][:n], off); err != nil {
			return err
		}
	}
	return unix.Ftruncate(p.fd, p.size)
}

// pendingFor returns the pending state of the inode fd refers to, creating
// it (with a read-write descriptor of its own) when create is set.
func (f *FS) pendingFor(fd int, create bool) (*pending, uint64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, 0, err
	}
	if p := f.files[st.Ino]; p != nil || !create {
		return p, st.Ino, nil
	}
	wfd, err := unix.Open("/proc/self/fd/"+strconv.Itoa(fd), unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, 0, err
	}
	p := &pending{fd: wfd, size: st.Size, trunc: st.Size, pages: map[int64][]byte{}}
	f.files[st.Ino] = p
	return p, st.Ino, nil
}

// readLogical fills b with the logical content at off (zeros past the size).
func (p *pending) readLogical(b []byte, off int64) error {
	clear(b)
	end := min(off+int64(len(b)), p.size)
	if off >= end {
		return nil
	}
	if off < p.trunc {
		n := min(end, p.trunc) - off
		if _, err := unix.Pread(p.fd, b[:n], off); err != nil {
			return err
		}
	}
	for pg := off / pageSize; pg*pageSize < end; pg++ {
		data, ok := p.pages[pg]
		if !ok {
			continue
		}
		ps := pg * pageSize
		lo, hi := max(ps, off), min(ps+pageSize, end)
		copy(b[lo-off:hi-off], data[lo-ps:hi-ps])
	}
	return nil
}

func (p *pending) page(pg int64) ([]byte, error) {
	data, ok := p.pages[pg]
	if ok && &data[0] != &zeroPage[0] {
		return data, nil
	}
	buf := make([]byte, pageSize)
	if ok {
		p.pages[pg] = buf // was the shared zero page
		return buf, nil
	}
	if err := p.readLogical(buf, pg*pageSize); err != nil {
		return nil, err
	}
	p.pages[pg] = buf
	return buf, nil
}

func (p *pending) write(data []byte, off int64) error {
	end := off + int64(len(data))
	for pg := off / pageSize; pg*pageSize < end; pg++ {
		ps := pg * pageSize
		lo, hi := max(ps, off), min(ps+pageSize, end)
		if lo == ps && hi == ps+pageSize {
			buf := make([]byte, pageSize)
			copy(buf, data[lo-off:hi-off])
			p.pages[pg] = buf
			continue
		}
		buf, err := p.page(pg)
		if err != nil {
			return err
		}
		copy(buf[lo-ps:hi-ps], data[lo-off:hi-off])
	}
	p.size = max(p.size, end)
	return nil
}

// zero makes [off, off+n) read as zeros without changing the size.
func (p *pending) zero(off, n int64) error {
	end := min(off+n, p.size)
	for pg := off / pageSize; pg*pageSize < end; pg++ {
		ps := pg * pageSize
		lo, hi := max(ps, off), min(ps+pageSize, end)
		if lo == ps && hi == ps+pageSize {
			p.pages[pg] = zeroPage
			continue
		}
		buf, err := p.page(pg)
		if err != nil {
			return err
		}
		clear(buf[lo-ps : hi-ps])
	}
	return nil
}

func (p *pending) truncate(size int64) {
	if size < p.size {
		for pg := range p.pages {
			if pg*pageSize >= size {
				delete(p.pages, pg)
			}
		}
		if pg := size / pageSize; size%pageSize != 0 {
			if data, ok := p.pages[pg]; ok && &data[0] != &zeroPage[0] {
				clear(data[size%pageSize:])
			}
		}
		p.trunc = min(p.trunc, size)
	}
	p.size = size
}

// ---------------------------------------------------------------------------
// nodes

type node struct {
	fs.LoopbackNode
	fs *FS
}

func (n *node) rel(name string) string { return filepath.Join(n.Path(n.Root()), name) }

func (n *node) lock() (unlock func(), errno syscall.Errno) { return n.fs.lock() }

func (n *node) journal(op *metaOp) { n.fs.journal = append(n.fs.journal, op) }

var (
	_ fs.NodeGetattrer  = (*node)(nil)
	_ fs.NodeSetattrer  = (*node)(nil)
	_ fs.NodeOpener     = (*node)(nil)
	_ fs.NodeCreater    = (*node)(nil)
	_ fs.NodeFsyncer    = (*node)(nil)
	_ fs.NodeStatxer    = (*node)(nil)
	_ fs.NodeTmpfiler   = (*node)(nil)
	_ fs.NodeSetxattrer = (*node)(nil)
)

// Statx is refused: the kernel falls back to GETATTR, which knows the
// pending size.
func (n *node) Statx(ctx context.Context, f fs.FileHandle, flags, mask uint32, out *fuse.StatxOut) syscall.Errno {
	return syscall.ENOSYS
}

// Tmpfile (O_TMPFILE) is not supported.
func (n *node) Tmpfile(ctx context.Context, flags, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	return nil, nil, 0, syscall.EOPNOTSUPP
}

// CopyFileRange is refused so the kernel copies through read and write.
func (n *node) CopyFileRange(ctx context.Context, fhIn fs.FileHandle, offIn uint64, out *fs.Inode, fhOut fs.FileHandle, offOut, length uint64, flags uint64) (uint32, syscall.Errno) {
	return 0, syscall.ENOSYS
}

// attrLocked fills out from the backing file (lstat), with the pending size
// if it has pending data. Called with fs.mu held.
func (n *node) attrLocked(out *fuse.AttrOut) syscall.Errno {
	var st syscall.Stat_t
	if err := syscall.Lstat(n.fs.abs(n.rel("")), &st); err != nil {
		return fs.ToErrno(err)
	}
	n.fs.fillAttr(&st, out)
	return 0
}

// fillAttr fills out from st, with the pending size if the file has
// pending data. Called with f.mu held.
func (f *FS) fillAttr(st *syscall.Stat_t, out *fuse.AttrOut) {
	out.FromStat(st)
	if p := f.files[st.Ino]; p != nil {
		out.Size = uint64(p.size)
	}
}

func (n *node) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	if h, ok := f.(*file); ok {
		return h.Getattr(ctx, out)
	}
	unlock, errno := n.lock()
	if errno != 0 {
		return errno
	}
	defer unlock()
	return n.attrLocked(out)
}

func (n *node) Setattr(ctx context.Context, f fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	unlock, errno := n.lock()
	if errno != 0 {
		return errno
	}
	defer unlock()
	var inner fs.FileHandle
	fd := -1
	if h, ok := f.(*file); ok {
		inner, fd = h.lf, h.fd
	}
	if sz, ok := in.GetSize(); ok {
		if fd < 0 {
			var err error
			fd, err = unix.Open(n.fs.abs(n.rel("")), unix.O_RDONLY|unix.O_CLOEXEC, 0)
			if err != nil {
				return fs.ToErrno(err)
			}
			defer unix.Close(fd)
		}
		p, _, err := n.fs.pendingFor(fd, true)
		if err != nil {
			return fs.ToErrno(err)
		}
		p.truncate(int64(sz))
		in2 := *in
		in2.Valid &^= fuse.FATTR_SIZE
		in = &in2
	}
	if errno := n.LoopbackNode.Setattr(ctx, inner, in, out); errno != 0 {
		return errno
	}
	return n.attrLocked(out)
}

func (n *node) Setxattr(ctx context.Context, attr string, data []byte, flags uint32) syscall.Errno {
	unlock, errno := n.lock()
	if errno != 0 {
		return errno
	}
	defer unlock()
	return n.LoopbackNode.Setxattr(ctx, attr, data, flags)
}

func (n *node) wrap(fh fs.FileHandle, flags uint32) (fs.FileHandle, syscall.Errno) {
	lf, ok := fh.(*fs.LoopbackFile)
	if !ok {
		return nil, syscall.EIO
	}
	fd, _ := lf.PassthroughFd()
	h := &file{lf: lf, fd: fd, fs: n.fs}
	if flags&syscall.O_TRUNC != 0 && flags&syscall.O_ACCMODE != syscall.O_RDONLY {
		p, _, err := n.fs.pendingFor(fd, true)
		if err != nil {
			lf.Release(context.Background())
			return nil, fs.ToErrno(err)
		}
		p.truncate(0)
	}
	return h, 0
}

func (n *node) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	unlock, errno := n.lock()
	if errno != 0 {
		return nil, 0, errno
	}
	defer unlock()
	fh, ff, errno := n.LoopbackNode.Open(ctx, flags&^(syscall.O_DIRECT|syscall.O_TRUNC))
	if errno != 0 {
		return nil, 0, errno
	}
	h, errno := n.wrap(fh, flags)
	return h, ff, errno
}

func (n *node) Create(ctx context.Context, name string, flags, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	unlock, errno := n.lock()
	if errno != 0 {
		return nil, nil, 0, errno
	}
	defer unlock()
	_, err := os.Lstat(n.fs.abs(n.rel(name)))
	existed := err == nil
	ch, fh, ff, errno := n.LoopbackNode.Create(ctx, name, flags&^(syscall.O_DIRECT|syscall.O_TRUNC), mode, out)
	if errno != 0 {
		return nil, nil, 0, errno
	}
	if !existed {
		n.journal(&metaOp{kind: opCreate, path: n.rel(name)})
	}
	h, errno := n.wrap(fh, flags)
	return ch, h, ff, errno
}

// created runs mk (which creates name in n) under the lock and journals
// the creation if it succeeded.
func (n *node) created(name string, mk func() (*fs.Inode, syscall.Errno)) (*fs.Inode, syscall.Errno) {
	unlock, errno := n.lock()
	if errno != 0 {
		return nil, errno
	}
	defer unlock()
	ch, errno := mk()
	if errno == 0 {
		n.journal(&metaOp{kind: opCreate, path: n.rel(name)})
	}
	return ch, errno
}

func (n *node) Mkdir(ctx context.Context, name string, mode uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return n.created(name, func() (*fs.Inode, syscall.Errno) { return n.LoopbackNode.Mkdir(ctx, name, mode, out) })
}

func (n *node) Mknod(ctx context.Context, name string, mode, rdev uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return n.created(name, func() (*fs.Inode, syscall.Errno) { return n.LoopbackNode.Mknod(ctx, name, mode, rdev, out) })
}

func (n *node) Symlink(ctx context.Context, target, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return n.created(name, func() (*fs.Inode, syscall.Errno) { return n.LoopbackNode.Symlink(ctx, target, name, out) })
}

func (n *node) Link(ctx context.Context, target fs.InodeEmbedder, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return n.created(name, func() (*fs.Inode, syscall.Errno) { return n.LoopbackNode.Link(ctx, target, name, out) })
}

// remove parks rel in the trash and journals it. Called with fs.mu held.
func (n *node) remove(rel string) syscall.Errno {
	n.fs.trashN++
	t := filepath.Join(n.fs.trash, strconv.Itoa(n.fs.trashN))
	if err := os.Rename(n.fs.abs(rel), t); err != nil {
		return fs.ToErrno(err)
	}
	n.journal(&metaOp{kind: opRemove, path: rel, trash: t})
	return 0
}

func (n *node) Unlink(ctx context.Context, name string) syscall.Errno {
	unlock, errno := n.lock()
	if errno != 0 {
		return errno
	}
	defer unlock()
	st, err := os.Lstat(n.fs.abs(n.rel(name)))
	if err != nil {
		return fs.ToErrno(err)
	}
	if st.IsDir() {
		return syscall.EISDIR
	}
	return n.remove(n.rel(name))
}

func (n *node) Rmdir(ctx context.Context, name string) syscall.Errno {
	unlock, errno := n.lock()
	if errno != 0 {
		return errno
	}
	defer unlock()
	p := n.fs.abs(n.rel(name))
	st, err := os.Lstat(p)
	if err != nil {
		return fs.ToErrno(err)
	}
	if !st.IsDir() {
		return syscall.ENOTDIR
	}
	if ents, err := os.ReadDir(p); err != nil {
		return fs.ToErrno(err)
	} else if len(ents) > 0 {
		return syscall.ENOTEMPTY
	}
	return n.remove(n.rel(name))
}

func (n *node) Rename(ctx context.Context, name string, newParent fs.InodeEmbedder, newName string, flags uint32) syscall.Errno {
	unlock, errno := n.lock()
	if errno != 0 {
		return errno
	}
	defer unlock()
	np, ok := newParent.(*node)
	if !ok {
		return syscall.EXDEV
	}
	if flags&^unix.RENAME_NOREPLACE != 0 {
		return syscall.EINVAL // RENAME_EXCHANGE and friends are not modelled
	}
	from, to := n.rel(name), np.rel(newName)
	sst, err := os.Lstat(n.fs.abs(from))
	if err != nil {
		return fs.ToErrno(err)
	}
	if from == to {
		return 0
	}
	if dst, err := os.Lstat(n.fs.abs(to)); err == nil {
		if flags&unix.RENAME_NOREPLACE != 0 {
			return syscall.EEXIST
		}
		switch {
		case sst.IsDir() && !dst.IsDir():
			return syscall.ENOTDIR
		case !sst.IsDir() && dst.IsDir():
			return syscall.EISDIR
		case dst.IsDir():
			if ents, _ := os.ReadDir(n.fs.abs(to)); len(ents) > 0 {
				return syscall.ENOTEMPTY
			}
		}
		if errno := np.remove(to); errno != 0 {
			return errno
		}
	}
	if err := os.Rename(n.fs.abs(from), n.fs.abs(to)); err != nil {
		return fs.ToErrno(err)
	}
	n.journal(&metaOp{kind: opRename, path: to, from: from})
	return 0
}

// Fsync of a directory (through Fsyncdir of its handle) makes the journaled
// entries in it durable.
func (n *node) Fsync(ctx context.Context, f fs.FileHandle, flags uint32) syscall.Errno {
	if h, ok := f.(*file); ok {
		return h.Fsync(ctx, flags)
	}
	if n.IsDir() {
		return n.syncDir()
	}
	return syscall.EBADF
}

func (n *node) syncDir() syscall.Errno {
	unlock, errno := n.lock()
	if errno != 0 {
		return errno
	}
	defer unlock()
	dir := n.rel("")
	in := func(p string) bool {
		return p != "" && filepath.Dir(p) == filepath.Clean(dir) // Clean("") is "."
	}
	keep := n.fs.journal[:0]
	for _, op := range n.fs.journal {
		durable := in(op.path) || (op.kind == opRename && in(op.from))
		switch {
		case !durable:
			keep = append(keep, op)
		case op.kind == opRemove:
			os.RemoveAll(op.trash)
		}
	}
	clear(n.fs.journal[len(keep):])
	n.fs.journal = keep
	return 0
}

// OpendirHandle wraps the loopback directory stream so that its fsync
// reaches syncDir.
func (n *node) OpendirHandle(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	fh, ff, errno := n.LoopbackNode.OpendirHandle(ctx, flags)
	if errno != 0 {
		return nil, 0, errno
	}
	return &dirHandle{inner: fh, n: n}, ff, 0
}

type dirHandle struct {
	inner fs.FileHandle
	n     *node
}

func (d *dirHandle) Readdirent(ctx context.Context) (*fuse.DirEntry, syscall.Errno) {
	return d.inner.(fs.FileReaddirenter).Readdirent(ctx)
}

func (d *dirHandle) Seekdir(ctx context.Context, off uint64) syscall.Errno {
	return d.inner.(fs.FileSeekdirer).Seekdir(ctx, off)
}

func (d *dirHandle) Releasedir(ctx context.Context, flags uint32) {
	d.inner.(fs.FileReleasedirer).Releasedir(ctx, flags)
}

func (d *dirHandle) Fsyncdir(ctx context.Context, flags uint32) syscall.Errno { return d.n.syncDir() }

// ---------------------------------------------------------------------------
// files

type file struct {
	lf *fs.LoopbackFile
	fd int
	fs *FS
}

var (
	_ fs.FileReader    = (*file)(nil)
	_ fs.FileWriter    = (*file)(nil)
	_ fs.FileFsyncer   = (*file)(nil)
	_ fs.FileGetattrer = (*file)(nil)
	_ fs.FileAllocater = (*file)(nil)
	_ fs.FileLseeker   = (*file)(nil)
	_ fs.FileReleaser  = (*file)(nil)
	_ fs.FileFlusher   = (*file)(nil)
)

func (h *file) lock() (unlock func(), errno syscall.Errno) { return h.fs.lock() }

func (h *file) Read(ctx context.Context, buf []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	unlock, errno := h.lock()
	if errno != 0 {
		return nil, errno
	}
	defer unlock()
	p, _, err := h.fs.pendingFor(h.fd, false)
	if err != nil {
		return nil, fs.ToErrno(err)
	}
	if p == nil {
		n, err := unix.Pread(h.fd, buf, off)
		if err != nil {
			return nil, fs.ToErrno(err)
		}
		return fuse.ReadResultData(buf[:n]), 0
	}
	n := max(0, min(int64(len(buf)), p.size-off))
	if err := p.readLogical(buf[:n], off); err != nil {
		return nil, fs.ToErrno(err)
	}
	return fuse.ReadResultData(buf[:n]), 0
}

func (h *file) Write(ctx context.Context, data []byte, off int64) (uint32, syscall.Errno) {
	unlock, errno := h.lock()
	if errno != 0 {
		return 0, errno
	}
	defer unlock()
	p, _, err := h.fs.pendingFor(h.fd, true)
	if err == nil {
		err = p.write(data, off)
	}
	if err != nil {
		return 0, fs.ToErrno(err)
	}
	return uint32(len(data)), 0
}

func (h *file) Fsync(ctx context.Context, flags uint32) syscall.Errno {
	unlock, errno := h.lock()
	if errno != 0 {
		return errno
	}
	defer unlock()
	p, ino, err := h.fs.pendingFor(h.fd, false)
	if err == nil && p != nil {
		err = h.fs.flushLocked(ino, p)
	}
	return fs.ToErrno(err)
}

func (h *file) Getattr(ctx context.Context, out *fuse.AttrOut) syscall.Errno {
	unlock, errno := h.lock()
	if errno != 0 {
		return errno
	}
	defer unlock()
	var st syscall.Stat_t
	if err := syscall.Fstat(h.fd, &st); err != nil {
		return fs.ToErrno(err)
	}
	h.fs.fillAttr(&st, out)
	return 0
}

func (h *file) Allocate(ctx context.Context, off, size uint64, mode uint32) syscall.Errno {
	unlock, errno := h.lock()
	if errno != 0 {
		return errno
	}
	defer unlock()
	p, _, err := h.fs.pendingFor(h.fd, true)
	if err != nil {
		return fs.ToErrno(err)
	}
	o, n := int64(off), int64(size)
	keep := mode&unix.FALLOC_FL_KEEP_SIZE != 0
	switch mode &^ unix.FALLOC_FL_KEEP_SIZE {
	case 0:
	case unix.FALLOC_FL_PUNCH_HOLE:
		if !keep {
			return syscall.EOPNOTSUPP
		}
		err = p.zero(o, n)
	case unix.FALLOC_FL_ZERO_RANGE:
		if !keep && o+n > p.size {
			p.truncate(o + n)
		}
		err = p.zero(o, n)
	default:
		return syscall.EOPNOTSUPP
	}
	if err != nil {
		return fs.ToErrno(err)
	}
	if !keep && o+n > p.size {
		p.truncate(o + n)
	}
	return 0
}

// Lseek answers SEEK_DATA and SEEK_HOLE as if the file had no holes: the
// backing file's holes are not the logical ones while data is pending.
func (h *file) Lseek(ctx context.Context, off uint64, whence uint32) (uint64, syscall.Errno) {
	unlock, errno := h.lock()
	if errno != 0 {
		return 0, errno
	}
	defer unlock()
	size := int64(-1)
	if p, _, err := h.fs.pendingFor(h.fd, false); err != nil {
		return 0, fs.ToErrno(err)
	} else if p != nil {
		size = p.size
	} else {
		var st unix.Stat_t
		if err := unix.Fstat(h.fd, &st); err != nil {
			return 0, fs.ToErrno(err)
		}
		size = st.Size
	}
	if int64(off) >= size {
		return 0, syscall.ENXIO
	}
	switch whence {
	case unix.SEEK_DATA:
		return off, 0
	case unix.SEEK_HOLE:
		return uint64(size), 0
	}
	return 0, syscall.EINVAL
}

func (h *file) Flush(ctx context.Context) syscall.Errno { return h.lf.Flush(ctx) }

func (h *file) Release(ctx context.Context) syscall.Errno { return h.lf.Release(ctx) }

func (h *file) Getlk(ctx context.Context, owner uint64, lk *fuse.FileLock, flags uint32, out *fuse.FileLock) syscall.Errno {
	return h.lf.Getlk(ctx, owner, lk, flags, out)
}

func (h *file) Setlk(ctx context.Context, owner uint64, lk *fuse.FileLock, flags uint32) syscall.Errno {
	return h.lf.Setlk(ctx, owner, lk, flags)
}

func (h *file) Setlkw(ctx context.Context, owner uint64, lk *fuse.FileLock, flags uint32) syscall.Errno {
	return h.lf.Setlkw(ctx, owner, lk, flags)
}
