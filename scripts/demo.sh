#!/usr/bin/env bash
# make demo: the main job on one machine, end to end, with real parts.
#  1. a primary store with a sample VM disk created through the tracked FUSE mount (qemu-img)
#  2. a real workload: a loop device over the image, mkfs.ext4, a file tree copied in, fio
#  3. crash-consistent cycles cut while the workload runs
#  4. the cycles applied to a replica copy (standin cycle apply), and the replica proven
#     equal to the primary at the cut: BLAKE3 of the whole image and fsck -n of its ext4.
# Needs root (FUSE, loop devices). Leaves nothing mounted; DEMO_DIR keeps the files.
set -euo pipefail
export LC_ALL=C
cd "$(dirname "$0")/.."
BIN=$PWD/bin/standin
DEMO=${DEMO_DIR:-/var/tmp/standin-demo}
STORE=$DEMO/primary
MNT=$DEMO/mnt
FSMNT=$DEMO/guestfs
REPLICA=$DEMO/replica/vm1-disk0.img
LOOP=""

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
die() { echo "demo: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (FUSE mounts and loop devices)"
for c in qemu-img mkfs.ext4 fsck.ext4 losetup b3sum fio; do
  command -v "$c" >/dev/null || { echo "installing test tools"; bash .ci/deps.sh; break; }
done

cleanup() {
  set +e
  mountpoint -q "$FSMNT" && umount "$FSMNT"
  [ -n "$LOOP" ] && losetup -d "$LOOP" 2>/dev/null
  if mountpoint -q "$MNT"; then "$BIN" unmount "$MNT" || umount -l "$MNT"; fi
  [ -n "${DPID:-}" ] && wait "$DPID" 2>/dev/null
}
trap cleanup EXIT INT TERM

rm -rf "$DEMO"; mkdir -p "$STORE" "$MNT" "$FSMNT" "$(dirname "$REPLICA")"

say "start the primary daemon: $STORE served at $MNT"
"$BIN" mount --store "$STORE" "$MNT" >"$DEMO/daemon.log" 2>&1 &
DPID=$!
for i in $(seq 100); do "$BIN" status --store "$STORE" >/dev/null 2>&1 && break; sleep 0.1; done
"$BIN" status --store "$STORE" >/dev/null || { cat "$DEMO/daemon.log"; die "daemon did not start"; }

say "create a 512 MiB VM disk through the mount (qemu-img) and put ext4 on it via a loop device"
qemu-img create -q -f raw "$MNT/vm1-disk0.img" 512M
LOOP=$(losetup --direct-io=on -f --show "$MNT/vm1-disk0.img")
mkfs.ext4 -q -F "$LOOP"
mount "$LOOP" "$FSMNT"
mkdir -p "$FSMNT/etc" "$FSMNT/usr-share-doc"
cp -a /etc/. "$FSMNT/etc/" 2>/dev/null || true
sync -f "$FSMNT"

quiesce_and_cut() { # freeze the guest fs, hash the primary image, cut, thaw
  fsfreeze -f "$FSMNT"
  b3sum --no-names "$STORE/images/vm1-disk0.img" >"$DEMO/frozen-$1.b3"
  "$BIN" cycle cut --store "$STORE" --images vm1-disk0.img
  fsfreeze -u "$FSMNT"
}

say "cycle 0 (the base: the whole allocated disk)"
quiesce_and_cut 0

say "workload: copy a file tree and run fio inside the guest filesystem, cutting while it runs"
cp -a /usr/share/doc/. "$FSMNT/usr-share-doc/" 2>/dev/null || true
fio --name=guest --directory="$FSMNT" --rw=randwrite --bs=4k --size=64M --ioengine=psync \
    --direct=1 --time_based --runtime=6 --numjobs=2 --output="$DEMO/fio.log" &
FIO=$!
sleep 2
"$BIN" cycle cut --store "$STORE" --images vm1-disk0.img   # under load: copy-before-write at work
wait $FIO
sync -f "$FSMNT"
say "cycle 2, quiesced, to compare against"
quiesce_and_cut 2
"$BIN" status --store "$STORE"

say "apply every cycle to the replica copy"
"$BIN" cycle list --store "$STORE" --image vm1-disk0.img
# shellcheck disable=SC2046
"$BIN" cycle apply --to "$REPLICA" $("$BIN" cycle list --store "$STORE" --image vm1-disk0.img --json | grep '"path"' | cut -d'"' -f4)

say "prove it: BLAKE3 of the replica equals the primary frozen at cut 2, and its ext4 is clean"
want=$(cat "$DEMO/frozen-2.b3"); got=$(b3sum --no-names "$REPLICA")
echo "primary at cut 2: $want"
echo "replica:          $got"
[ "$want" = "$got" ] || die "replica differs from the primary at the cut"
fsck.ext4 -n -f "$REPLICA" >"$DEMO/fsck.log" 2>&1 || { cat "$DEMO/fsck.log"; die "fsck found errors on the replica"; }
tail -1 "$DEMO/fsck.log"
echo "allocated: primary $(du -h "$STORE/images/vm1-disk0.img" | cut -f1), replica $(du -h "$REPLICA" | cut -f1) (sparse stays sparse)"

say "tear down"
umount "$FSMNT"; losetup -d "$LOOP"; LOOP=""
"$BIN" unmount "$MNT"; wait "$DPID"; DPID=""
echo "demo OK: files in $DEMO"
