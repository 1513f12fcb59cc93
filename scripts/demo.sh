#!/usr/bin/env bash
# make demo: the main job on one machine, end to end, with real parts.
#  1. a replica daemon on 127.0.0.1 (mutual TLS, self-signed CA) and a primary daemon whose FUSE
#     mount serves a sample VM disk created through it (qemu-img); paired with one token
#  2. replication enabled every 30 s; a real workload: a loop device over the image, mkfs.ext4,
#     a file tree copied in, fio
#  3. cycles cut, shipped and applied as recovery points while the workload runs
#  4. the latest point exported and proven equal to the primary frozen at that cut: BLAKE3 of
#     the whole image and fsck -n of its ext4; the same with the offline path (cycle apply).
# Needs root (FUSE, loop devices). Leaves nothing mounted; DEMO_DIR keeps the files.
set -euo pipefail
export LC_ALL=C
cd "$(dirname "$0")/.."
BIN=$PWD/bin/standin
DEMO=${DEMO_DIR:-/var/tmp/standin-demo}
STORE=$DEMO/primary
RSTORE=$DEMO/replica-store
PORT=${DEMO_PORT:-17443}
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
  [ -n "${RPID:-}" ] && kill "$RPID" 2>/dev/null && wait "$RPID" 2>/dev/null
}
trap cleanup EXIT INT TERM

rm -rf "$DEMO"; mkdir -p "$STORE" "$MNT" "$FSMNT" "$(dirname "$REPLICA")"

say "start the replica daemon on 127.0.0.1:$PORT (creates its CA at first start)"
"$BIN" serve --store "$RSTORE" --listen "127.0.0.1:$PORT" >"$DEMO/replica.log" 2>&1 &
RPID=$!
for i in $(seq 100); do "$BIN" pair list --store "$RSTORE" >/dev/null 2>&1 && [ -S "$RSTORE/control.sock" ] && break; sleep 0.1; done
[ -S "$RSTORE/control.sock" ] || { cat "$DEMO/replica.log"; die "replica daemon did not start"; }

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

quiesce_and_replicate() { # freeze the guest fs, hash the primary image, replicate now, thaw
  fsfreeze -f "$FSMNT"
  b3sum --no-names "$STORE/images/vm1-disk0.img" >"$DEMO/frozen-$1.b3"
  "$BIN" replicate now --store "$STORE" --group vm1 --wait
  fsfreeze -u "$FSMNT"
}

say "pair the primary with the replica: one token, nothing else to copy"
TOKEN=$("$BIN" pair token --store "$RSTORE" --images 'vm1/*' 2>/dev/null)
printf '%s\n' "$TOKEN" | "$BIN" pair join --store "$STORE" --token-file -  # the token stays out of the process list

say "replicate group vm1 every 30 s (keep 3 points); the first cycle is the whole disk"
"$BIN" replicate enable --store "$STORE" --group vm1 --images vm1-disk0.img --replica "127.0.0.1:$PORT" \
  --interval 30s --points 3 --point-every 1m --bandwidth 400Mbit
"$BIN" replicate now --store "$STORE" --group vm1 --wait

say "workload: copy a file tree and run fio inside the guest filesystem, cutting while it runs"
cp -a /usr/share/doc/. "$FSMNT/usr-share-doc/" 2>/dev/null || true
fio --name=guest --directory="$FSMNT" --rw=randwrite --bs=4k --size=64M --ioengine=psync \
    --direct=1 --time_based --runtime=6 --numjobs=2 --output="$DEMO/fio.log" &
FIO=$!
sleep 2
"$BIN" replicate now --store "$STORE" --group vm1 --wait   # under load: copy-before-write at work
wait $FIO
sync -f "$FSMNT"
say "a quiesced cycle to compare against"
quiesce_and_replicate 2
"$BIN" status --store "$STORE"
"$BIN" replicate list --store "$STORE"

say "recovery points on the replica"
"$BIN" points list --store "$RSTORE" --group vm1
"$BIN" points verify --store "$RSTORE" --group vm1 --point latest
"$BIN" points export --store "$RSTORE" --group vm1 --point latest --image vm1-disk0.img --to "$REPLICA"

say "prove it: BLAKE3 of the exported point equals the primary frozen at that cut, and its ext4 is clean"
want=$(cat "$DEMO/frozen-2.b3"); got=$(b3sum --no-names "$REPLICA")
echo "primary at the cut: $want"
echo "replica point:      $got"
[ "$want" = "$got" ] || die "replica differs from the primary at the cut"
fsck.ext4 -n -f "$REPLICA" >"$DEMO/fsck.log" 2>&1 || { cat "$DEMO/fsck.log"; die "fsck found errors on the replica"; }
tail -1 "$DEMO/fsck.log"
echo "allocated: primary $(du -h "$STORE/images/vm1-disk0.img" | cut -f1), replica $(du -h "$REPLICA" | cut -f1) (sparse stays sparse)"

say "tear down"
umount "$FSMNT"; losetup -d "$LOOP"; LOOP=""
"$BIN" unmount "$MNT"; wait "$DPID"; DPID=""
kill "$RPID"; wait "$RPID" || true; RPID=""
echo "demo OK: files in $DEMO"
