package dedup

import (
	"fmt"
	"strings"
	"unicode/utf8"
)

// validShardName accepts the file names the exporter produces: one directory
// component and one file component of [A-Za-z0-9._-], neither "." nor "..".
// Anything else from the index or journal is refused so that no name read from
// a seed can escape its directory.
func validShardName(name string) error {
	if name == "" || len(name) > 128 {
		return fmt.Errorf("dedup: invalid shard name %q", name)
	}
	parts := strings.Split(name, "/")
	if len(parts) > 2 {
		return fmt.Errorf("dedup: invalid shard name %q", name)
	}
	for _, p := range parts {
		if p == "" || p == "." || p == ".." {
			return fmt.Errorf("dedup: invalid shard name %q", name)
		}
		for _, c := range p {
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
				return fmt.Errorf("dedup: invalid shard name %q", name)
			}
		}
	}
	return nil
}

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
