// Package dedup writes and reads standin seeds: the out-of-band copy of a set
// of images that is carried to the replica
// site on removable media.
//
// A seed is one or more volume directories, each holding:
//
//	index.0, index.1        shard index (seed id, volume number), twice, each self-hashed
//	volume                  label, only while the volume is being written
//	packs/NNNNNNNN.pack     unique 4 KiB chunks: zstd frames and 16-byte chunk ids
//	manifests/NNNNNNNN.man  one per image: identity, cut, size, chunk runs, root
//	parity/GGGGGGGG-PP.par  Reed-Solomon parity of group GGGGGGGG
//
// Every pack, manifest and parity file is a shard of exactly one
// Reed-Solomon group; its volume, length and BLAKE3 are in the index, so
// damaged or missing shards (or whole volumes) are known before
// reconstruction. Volumes can be written at once (shards striped over them)
// or one after the other (ExportOptions.NextVolume), and parity can be raised
// so that the loss of any one volume is repaired. With a key, packs and
// manifests are sealed with AES-256-GCM and chunk ids are keyed BLAKE3, so
// neither chunk content, chunk hashes nor image names can be read from the
// media. Export is resumable (journal in ExportOptions.ScratchDir), and so is
// Import (ImportOptions.ResumeAt/Checkpoint). The formats are described in
// docs/seed.md.
//
// The package knows nothing about the rest of standin: images come in through
// ImageSource and go out through ImageSink.
package dedup
