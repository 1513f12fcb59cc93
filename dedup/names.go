package dedup

import (
	"fmt"
	"strings"
	"unicode/utf8"
)

// ValidImageName reports whether an image name read from a seed is safe to use
// as a relative path below a store directory: non-empty, valid UTF-8, not
// absolute, no empty, "." or ".." components, no backslash, NUL or control
// characters, at most 1024 bytes.
func ValidImageName(name string) error {
	bad := func() error { return fmt.Errorf("dedup: invalid image name %q", name) }
	if name == "" || len(name) > 1024 || !utf8.ValidString(name) || strings.HasPrefix(name, "/") {
		return bad()
	}
	for _, c := range name {
		if c < 0x20 || c == 0x7f || c == '\\' {
			return bad()
		}
	}
	for _, p := range strings.Split(name, "/") {
		if p == "" || p == "." || p == ".." {
			return bad()
		}
	}
	return nil
}
