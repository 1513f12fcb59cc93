// Package dedup will hold BLAKE3 chunking, the chunk store and seeds with
// Reed-Solomon parity (issue 4). Nothing is implemented yet.
package dedup
