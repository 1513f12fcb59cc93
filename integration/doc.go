// Package integration holds end-to-end tests that run the real standin
// binary as subprocesses: a conformance suite (plain directory vs. standin
// mount), real clients (qemu-img, qemu-io, a loop device with ext4, fio),
// crash-consistent cycles (I2), input verification (I5) and crash recovery
// with kill -9 (I1).
//
// The tests need root and /dev/fuse. Without them they skip, unless CI=true,
// in which case they fail. The binary is taken from STANDIN_BIN or built once
// from ./cmd/standin. Every test directory lives under /var/tmp/standin-it
// (O_DIRECT does not work on tmpfs); a run refuses to finish green if a mount
// is left behind there.
//
// Run them with: make test-integration (go test -p 1 -count=1 ./integration/).
package integration
