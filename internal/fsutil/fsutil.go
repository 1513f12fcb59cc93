// Package fsutil holds the durable file helpers every package uses: one way to
// replace a file atomically (tmp + fsync + rename + fsync(dir)), one way to
// sync a directory, one way to walk the allocated extents of a sparse file.
package fsutil

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// SyncDir fsyncs a directory so that entries created, renamed or removed in it
// are durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync directory %s: %w", dir, err)
	}
	return nil
}

// WriteFileAtomic replaces path with data durably: the new content is written
// to a temporary file in the same directory, fsynced, renamed over path, and
// the directory is fsynced. A crash leaves either the old or the new file.
func WriteFileAtomic(path string, data []byte, perm os.FileMode) error {
	return WriteAtomic(path, perm, func(w io.Writer) error {
		_, err := w.Write(data)
		return err
	})
}

// WriteFileAtomicNew is WriteFileAtomic for a file that must not exist yet:
// if path exists (also as a symlink), the error wraps fs.ErrExist and
// nothing is written.
func WriteFileAtomicNew(path string, data []byte, perm os.FileMode) error {
	return WriteAtomicOpts(path, AtomicOptions{Perm: perm, NoReplace: true}, func(w io.Writer) error {
		_, err := w.Write(data)
		return err
	})
}

// WriteAtomic is WriteFileAtomic with a streaming producer.
func WriteAtomic(path string, perm os.FileMode, fill func(io.Writer) error) error {
	return WriteAtomicOpts(path, AtomicOptions{Perm: perm}, fill)
}

// AtomicOptions tune WriteAtomicOpts.
type AtomicOptions struct {
	// Perm is the mode of the new file, set exactly (the umask does not
	// apply). The content is written while the file is 0600.
	Perm os.FileMode
	// NoReplace refuses to replace an existing path (file, symlink or
	// anything else): the error wraps fs.ErrExist and nothing changes.
	NoReplace bool
	// NoDirSync leaves the fsync of the directory to the caller (who writes
	// many files into it and syncs it once).
	NoDirSync bool
}

// WriteAtomicOpts writes a new file at path: the content goes to a fresh
// temporary file in the same directory (os.CreateTemp: O_CREATE|O_EXCL, so
// a symlink or file planted there is never followed or reused), is fsynced,
// gets its mode, and is renamed to path. A symlink at path itself is
// replaced (rename does not follow it), never written through. A crash
// leaves either the old file or the new one (and at most a temporary file
// named .BASE.tmp-*). fill writes to the temporary *os.File (it may use
// its WriteAt and Truncate).
func WriteAtomicOpts(path string, o AtomicOptions, fill func(io.Writer) error) (err error) {
	dir := filepath.Dir(path)
	if o.NoReplace {
		if _, err := os.Lstat(path); err == nil {
			return fmt.Errorf("%s: %w (refusing to replace it)", path, fs.ErrExist)
		}
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err = fill(f); err != nil {
		return err
	}
	if err = f.Chmod(o.Perm.Perm()); err != nil {
		return err
	}
	if err = f.Sync(); err != nil {
		return err
	}
	if err = f.Close(); err != nil {
		return err
	}
	if o.NoReplace {
		err = renameNoReplace(tmp, path)
	} else {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		return err
	}
	if o.NoDirSync {
		return nil
	}
	return SyncDir(dir)
}

// renameNoReplace renames oldpath to newpath unless newpath exists
// (renameat2 RENAME_NOREPLACE; link + unlink where the filesystem lacks it).
func renameNoReplace(oldpath, newpath string) error {
	err := unix.Renameat2(unix.AT_FDCWD, oldpath, unix.AT_FDCWD, newpath, unix.RENAME_NOREPLACE)
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.ENOTSUP) {
		if err = os.Link(oldpath, newpath); err == nil {
			os.Remove(oldpath)
			return nil
		}
		var le *os.LinkError
		if errors.As(err, &le) {
			err = le.Err
		}
	}
	if errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("%s: %w (refusing to replace it)", newpath, fs.ErrExist)
	}
	if err != nil {
		return &os.LinkError{Op: "rename", Old: oldpath, New: newpath, Err: err}
	}
	return nil
}

// MkdirNew creates dir (and its missing parents) with exactly mode perm,
// whatever the umask, if it does not exist; an existing dir (one a user
// named) is left as it is.
func MkdirNew(dir string, perm os.FileMode) error {
	if _, err := os.Stat(dir); err == nil {
		return nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if err := os.MkdirAll(dir, perm); err != nil {
		return err
	}
	return os.Chmod(dir, perm)
}

// MkdirPrivate makes sure path is a directory (not a symlink to one) with
// mode perm: it is created if missing (its parents with perm as well) and
// chmodded to perm if it exists with another mode. It returns an error if
// path is a symlink or not a directory, so that nothing is written through
// a link planted where a directory is expected.
func MkdirPrivate(path string, perm os.FileMode) error {
	perm = perm.Perm()
	if err := os.MkdirAll(filepath.Dir(path), perm); err != nil {
		return err
	}
	if err := os.Mkdir(path, perm); err != nil && !errors.Is(err, fs.ErrExist) {
		return err
	}
	old, err := dirMode(path, false)
	if err != nil {
		return err
	}
	if old != perm {
		// Mkdir applies the umask; an existing directory may be looser.
		if err := os.Chmod(path, perm); err != nil {
			return fmt.Errorf("set mode %04o on %s: %w", perm, path, err)
		}
	}
	return nil
}

// Tighten removes group and other permissions from the directory path if it
// has any, and reports the old mode when it changed something. A missing
// path is created with mode 0700. A symlink is refused.
func Tighten(path string) (old os.FileMode, changed bool, err error) {
	if err := os.MkdirAll(path, 0o700); err != nil {
		return 0, false, err
	}
	// The user named the store: a link to it is followed once, explicitly.
	if old, err = dirMode(path, true); err != nil {
		return 0, false, err
	}
	if old&0o077 == 0 {
		return old, false, nil
	}
	if err := os.Chmod(path, old&0o700); err != nil {
		return old, false, fmt.Errorf("remove group/other access from %s (mode %04o): %w", path, old, err)
	}
	return old, true, nil
}

// dirMode returns the permission bits of the directory path. A symlink there
// is followed when followLink is set, refused otherwise, so that nothing is
// written through a link planted where a directory is expected.
func dirMode(path string, followLink bool) (os.FileMode, error) {
	st, err := os.Lstat(path)
	if err != nil {
		return 0, err
	}
	if st.Mode()&fs.ModeSymlink != 0 {
		if !followLink {
			return 0, fmt.Errorf("%s is a symbolic link, not a directory: refusing to write through it (remove it or name the real directory)", path)
		}
		if st, err = os.Stat(path); err != nil {
			return 0, err
		}
	}
	if !st.IsDir() {
		return 0, fmt.Errorf("%s exists and is not a directory", path)
	}
	return st.Mode().Perm(), nil
}

// Extent is a byte range [Off, Off+Len).
type Extent struct{ Off, Len int64 }

// DataExtents lists the allocated (non-hole) byte ranges of f up to size,
// using SEEK_DATA/SEEK_HOLE. On filesystems without hole support the whole
// file is one extent.
func DataExtents(f *os.File, size int64) ([]Extent, error) {
	var out []Extent
	fd := int(f.Fd())
	off := int64(0)
	for off < size {
		d, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if err != nil {
			if errors.Is(err, unix.ENXIO) { // no data after off
				break
			}
			if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP) {
				return []Extent{{0, size}}, nil
			}
			return nil, fmt.Errorf("seek data in %s at %d: %w", f.Name(), off, err)
		}
		if d >= size {
			break
		}
		h, err := unix.Seek(fd, d, unix.SEEK_HOLE)
		if err != nil {
			return nil, fmt.Errorf("seek hole in %s at %d: %w", f.Name(), d, err)
		}
		if h > size {
			h = size
		}
		out = append(out, Extent{d, h - d})
		off = h
	}
	return out, nil
}

// WriteJSON replaces path atomically with v as indented JSON.
func WriteJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return WriteFileAtomic(path, append(b, '\n'), 0o600)
}

// ReadJSON reads path into v; the error names the file.
func ReadJSON(path string, v any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return nil
}
