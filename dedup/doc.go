// Package dedup writes and reads standin seeds: the out-of-band copy of a set
// of images (issue 4, DESIGN.md section 6) that is carried to the replica
// site on removable media.
//
// A seed is a directory:
//
//	index.0, index.1        shard index, written twice, each self-hashed
//	journal                 export progress (only while an export is unfinished)
//	packs/NNNNNNNN.pack     unique 4 KiB chunks, zstd frames, chunk hashes
//	manifests/NNNNNNNN.man  one per image: identity, size, cut, chunk runs, root
//	parity/GGGGGGGG-PP.par  Reed-Solomon parity over groups of packs/manifests
//
// Every file is a shard of exactly one Reed-Solomon group and its BLAKE3 is
// recorded in the index, so damaged shards are known before reconstruction.
// With a key, packs and manifests are sealed with AES-256-GCM and chunk ids are
// keyed BLAKE3, so neither chunk content, chunk hashes nor image names can be
// read from the media. The layout and formats are described in docs/seed.md.
//
// The package knows nothing about the rest of standin: images come in through
// ImageSource and go out through ImageSink.
package dedup
