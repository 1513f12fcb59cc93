package dedup

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// openRegular opens a seed file for reading and refuses anything but a
// regular file (a FIFO, device, socket or symlink) before any read: the open
// itself cannot block (O_NONBLOCK, O_NOFOLLOW) and the opened file is checked
// with fstat, so a FIFO planted in a seed directory gives an error naming it
// instead of a read that hangs forever. It returns the opened file's
// FileInfo (from that fstat).
func openRegular(path string) (*os.File, os.FileInfo, error) {
	var lst unix.Stat_t
	if err := unix.Lstat(path, &lst); err != nil {
		return nil, nil, &os.PathError{Op: "lstat", Path: path, Err: err}
	}
	if lst.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil, nil, notRegular(path, lst.Mode)
	}
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOFOLLOW|unix.O_NONBLOCK|unix.O_NOCTTY, 0)
	if err != nil {
		if err == unix.ELOOP {
			return nil, nil, notRegular(path, unix.S_IFLNK)
		}
		return nil, nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	f := os.NewFile(uintptr(fd), path)
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	if !fi.Mode().IsRegular() {
		f.Close()
		return nil, nil, notRegular(path, uint32(fi.Sys().(*syscall.Stat_t).Mode))
	}
	// Regular files ignore O_NONBLOCK; clear it anyway so reads behave as usual.
	if fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0); err == nil {
		unix.FcntlInt(uintptr(fd), unix.F_SETFL, fl&^unix.O_NONBLOCK)
	}
	return f, fi, nil
}

// ErrNotRegular: a seed file is a FIFO, device, socket, directory or
// symbolic link; seeds consist of regular files only.
var ErrNotRegular = errors.New("not a regular file")

func notRegular(path string, mode uint32) error {
	return fmt.Errorf("dedup: seed file %s is %s: %w (a seed holds only regular files; remove it or copy the seed again)", path, fileKind(mode), ErrNotRegular)
}

func fileKind(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFIFO:
		return "a FIFO"
	case unix.S_IFCHR:
		return "a character device"
	case unix.S_IFBLK:
		return "a block device"
	case unix.S_IFSOCK:
		return "a socket"
	case unix.S_IFDIR:
		return "a directory"
	case unix.S_IFLNK:
		return "a symbolic link"
	}
	return fmt.Sprintf("of type %#o", mode&unix.S_IFMT)
}
