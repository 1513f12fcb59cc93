// Package units formats sizes for people (messages, tables).
package units

import "fmt"

// Bytes spells n bytes with a binary prefix: "512 B", "1.5 KiB", "2.0 GiB".
func Bytes(n int64) string {
	const u = 1024
	if n < u {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(u), 0
	for m := n / u; m >= u; m /= u {
		div *= u
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
