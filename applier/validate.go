package applier

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/google/uuid"
	"golang.org/x/sys/unix"

	"github.com/standin/standin/internal/format"
)

// MaxImageSize is the largest image the replica accepts: 2^32 blocks of
// 4 KiB (16 TiB), the product's per-image limit (the primary tracks blocks in
// 32-bit bitmaps).
const MaxImageSize = uint64(1) << 44

// ErrUnholdable is returned for a cycle the replica could never apply: an
// image larger than MaxImageSize or than the replica's filesystem can hold,
// an unusable image name. It is refused before anything changes.
var ErrUnholdable = errors.New("cycle cannot be held by this replica")

// checkHoldable checks, before anything of an apply is written, everything
// about the cycles that could otherwise only fail after the commit record
// (and so leave the group with an apply that can never finish): the image
// size against MaxImageSize and against what the filesystem of the store
// can hold (a sparse file of that size is created and removed), every extent
// within the image, and the image name.
func (r *Replica) checkHoldable(g *group, cs []*openedCycle) error {
	for _, c := range cs {
		h := c.r.Header()
		id := uuid.UUID(h.ImageID).String()
		if h.ImageSize == 0 || h.ImageSize > MaxImageSize {
			return fmt.Errorf("%s: %w: image %s (%q) claims %d bytes; the limit is 1..%d (16 TiB) per image",
				c.path, ErrUnholdable, id, h.Name, h.ImageSize, MaxImageSize)
		}
		if err := checkImagePath(h.Name); err != nil {
			return fmt.Errorf("%s: %w: image %s: %v", c.path, ErrUnholdable, id, err)
		}
		nb := h.Blocks()
		for i, e := range c.r.Extents() {
			if e.End() > nb || e.End() < e.Start {
				return fmt.Errorf("%s: %w: extent %d (blocks %d..%d) beyond the image's %d blocks", c.path, format.ErrCorrupt, i, e.Start, e.End(), nb)
			}
		}
	}
	return r.sizeOK.check(g.dir, largestImage(cs, nil))
}

// largestImage is the largest image size of the cycles cs (only those
// with apply(i), if apply is not nil).
func largestImage(cs []*openedCycle, apply func(i int) bool) uint64 {
	var biggest uint64
	for i, c := range cs {
		if apply == nil || apply(i) {
			biggest = max(biggest, c.r.Header().ImageSize)
		}
	}
	return biggest
}

// sizeCache remembers the largest (sparse) file size a filesystem was seen
// to hold, so the check creates a file only for a larger size.
type sizeCache struct{ ok atomic.Uint64 }

// check makes sure the filesystem of dir can hold a (sparse) file of size
// bytes (0: nothing to check).
func (c *sizeCache) check(dir string, size uint64) error {
	if size <= c.ok.Load() {
		return nil
	}
	if err := sparseSizeOK(dir, size); err != nil {
		return err
	}
	for {
		cur := c.ok.Load()
		if size <= cur || c.ok.CompareAndSwap(cur, size) {
			return nil
		}
	}
}

// fileSizes are the size caches of ApplyFiles, one per filesystem (device).
var fileSizes sync.Map // uint64 → *sizeCache

// sizeCacheOf returns the size cache of dir's filesystem (a fresh one if
// dir cannot be examined: the check then reports why).
func sizeCacheOf(dir string) *sizeCache {
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return &sizeCache{}
	}
	c, _ := fileSizes.LoadOrStore(uint64(st.Dev), &sizeCache{})
	return c.(*sizeCache)
}

// sparseSizeOK creates a sparse file of size bytes in dir and removes it.
func sparseSizeOK(dir string, size uint64) error {
	if size > MaxImageSize {
		return fmt.Errorf("%w: an image of %d bytes is over the limit of %d (16 TiB)", ErrUnholdable, size, MaxImageSize)
	}
	f, err := os.CreateTemp(dir, ".sizecheck.tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	if err := f.Truncate(int64(size)); err != nil {
		return fmt.Errorf("%w: the filesystem of %s cannot hold an image of %d bytes: %v", ErrUnholdable, dir, size, err)
	}
	return nil
}

// checkImagePath accepts what the primary's store can name: a relative path
// without "." or ".." elements, empty elements or NUL bytes (format.MaxNameLen
// and UTF-8 are checked by the format reader). Names from the wire are
// checked more strictly by checkImageName.
func checkImagePath(name string) error {
	if name == "" {
		return errors.New("empty image name")
	}
	if strings.ContainsRune(name, 0) || strings.HasPrefix(name, "/") {
		return fmt.Errorf("image name %q is not a relative path", name)
	}
	for _, el := range strings.Split(name, "/") {
		if el == "" || el == "." || el == ".." {
			return fmt.Errorf("image name %q has an empty, \".\" or \"..\" element", name)
		}
	}
	return nil
}
