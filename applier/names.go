package applier

import (
	"errors"
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/google/uuid"
)

// ErrBadName is returned for a group, image or point name that is not a
// plain token: 1..128 bytes of [A-Za-z0-9._-], starting with a letter or
// digit, without "..". Such names are used as single path elements under
// the replica store, so they can never escape it.
var ErrBadName = errors.New("invalid name")

// MaxStoreName is the maximum length of a group or image name.
const MaxStoreName = 128

func storeNameOK(s string) bool {
	if len(s) == 0 || len(s) > MaxStoreName || strings.Contains(s, "..") {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case (c == '.' || c == '_' || c == '-') && i > 0:
		default:
			return false
		}
	}
	return true
}

// checkName returns ErrBadName (wrapped with what) unless s is a valid store name.
func checkName(what, s string) error {
	if !storeNameOK(s) {
		return fmt.Errorf("%s %q: %w", what, s, ErrBadName)
	}
	return nil
}

// imageIDOK reports whether s is a canonical (lower-case, hyphenated) UUID,
// the only spelling used for image directories.
func imageIDOK(s string) bool {
	u, err := uuid.Parse(s)
	return err == nil && u.String() == s
}

// MaxImageName is the maximum length in bytes of an image name from the wire
// (the name of the disk file on the primary's mount).
const MaxImageName = 255

// checkImageName checks an image name that came from the wire (a query
// parameter, a JSON body or a cycle header): 1..255 bytes of valid UTF-8,
// no control characters (newline and tab included), no "/", not "." or "..",
// and not starting with "-" (it would read as an option in shell commands
// and tools that print or take image names).
func checkImageName(s string) error {
	bad := func(why string) error {
		return fmt.Errorf("image name %q: %s: %w", s, why, ErrBadName)
	}
	switch {
	case s == "":
		return bad("empty")
	case len(s) > MaxImageName:
		return bad(fmt.Sprintf("%d bytes, more than %d", len(s), MaxImageName))
	case !utf8.ValidString(s):
		return bad("not valid UTF-8")
	case s == "." || s == "..":
		return bad("not a file name")
	case strings.HasPrefix(s, "-"):
		return bad("starts with a dash")
	case strings.Contains(s, "/"):
		return bad("contains a slash")
	}
	for _, c := range s {
		if unicode.IsControl(c) {
			return bad("contains a control character")
		}
	}
	return nil
}
