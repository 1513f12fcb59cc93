#!/usr/bin/env bash
# bench/failover.sh — failover benchmark (issue 5, "Benchmarks"): two hosts A and B on
# 127.0.0.1, each running a mount daemon (primary store) and a replica daemon (replica store,
# --primary-store), one group with one 4 GiB image (vm1.img of the benchmark dataset in DS,
# a cloned Debian ext4; without the dataset: 1 GiB of random
# data in a 4 GiB sparse file). 100 MiB is changed before each operation (fio randwrite,
# 64 KiB blocks, distinct offsets, incompressible data).
#
# Prints, with medians of BENCH_REPS runs (default 3; BENCH_QUICK=1 -> 1):
#   1. test failover creation on the replica (target < 1 s)
#   2. planned failover A->B and back B->A with 100 MiB changed: total and per step, against
#      the anchors measured in the same run: 'replicate now' of 100 MiB (the final cycle alone)
#      + b3sum of the image (reading and hashing it once): target "final cycle + verify only"
#   3. reverse replication after a planned failover: bytes sent for 100 MiB written
#   4. failback after an unplanned failover: A changes 50 MiB it never ships and is killed
#      (-9); B is promoted and changes 50 MiB; A comes back and reverses: bytes shipped vs the
#      blocks that differ between the two images (target <= 1.1x), and each step's time
#
# The table goes to stdout and bench/results/failover-<date>[-quick].txt.
# Environment: BENCH_QUICK=1, BENCH_REPS=N, DS=DIR (dataset, default /var/tmp/standin-dataset),
# BENCH_DIR=DIR (scratch, default /var/tmp/standin-failover-bench; removed unless BENCH_KEEP=1),
# BENCH_STANDIN=PATH (binary, default bin/standin).
# Needs root, /dev/fuse, fio, jq, b3sum, python3.
set -Eeuo pipefail
umask 022
export LC_ALL=C

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QUICK=${BENCH_QUICK:-0}
if [[ $QUICK == 1 ]]; then REPS=${BENCH_REPS:-1}; else REPS=${BENCH_REPS:-3}; fi
DS=${DS:-/var/tmp/standin-dataset}
W=${BENCH_DIR:-/var/tmp/standin-failover-bench}
RESULTS=$REPO/bench/results
SRC_BIN=${BENCH_STANDIN:-$REPO/bin/standin}
CHANGE_MIB=100

for t in fio jq b3sum python3; do
	command -v $t >/dev/null || { echo "failover bench: $t is missing (apt-get install -y fio jq b3sum python3)" >&2; exit 1; }
done
[[ -x $SRC_BIN ]] || (cd "$REPO" && make build >/dev/null)
[[ $(id -u) == 0 ]] || { echo "failover bench: needs root (FUSE mounts)" >&2; exit 1; }

cleanup() {
	local rc=$?
	for h in a b; do
		[[ -f $W/$h/pri.pid ]] && kill "$(cat "$W/$h/pri.pid")" 2>/dev/null || true
		[[ -f $W/$h/rep.pid ]] && kill "$(cat "$W/$h/rep.pid")" 2>/dev/null || true
	done
	pkill -f -- "^$W/standin " 2>/dev/null || true # pid files may name the shell that started a daemon
	sleep 1
	for h in a b; do
		for m in "$W/$h/mnt" "$W/$h/rstore/failover-tests"/*/mnt; do
			mountpoint -q "$m" 2>/dev/null && { umount "$m" 2>/dev/null || umount -l "$m" || true; }
		done
	done
	if [[ ${BENCH_KEEP:-0} != 1 && $rc == 0 ]]; then rm -rf "$W"; else echo "failover bench: scratch kept in $W" >&2; fi
}
trap cleanup EXIT
trap 'echo "failover bench: failed at line $LINENO: $BASH_COMMAND" >&2' ERR

rm -rf "$W"
mkdir -p "$W" "$RESULTS"
BIN=$W/standin
cp "$SRC_BIN" "$BIN"
S() { "$BIN" "$@"; }
log() { echo "[$(date +%T)] $*" >&2; }
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2-$1:.3f}')"; }
median() { python3 -c "import statistics,sys; v=[float(x) for x in sys.argv[1:]]; print(f'{statistics.median(v):.3f}')" "$@"; }
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# host NAME: directories and both daemons.
declare -A ADDR
start_rep() {
	local h=$1
	S serve --store "$W/$h/rstore" --listen "${ADDR[$h]}" --primary-store "$W/$h/pstore" >>"$W/$h/rep.log" 2>&1 &
	echo $! >"$W/$h/rep.pid"
	for _ in $(seq 100); do S status --store "$W/$h/rstore" >/dev/null 2>&1 && return; sleep 0.1; done
	echo "replica daemon $h did not start" >&2; cat "$W/$h/rep.log" >&2; exit 1
}
start_pri() {
	local h=$1
	mountpoint -q "$W/$h/mnt" && umount -l "$W/$h/mnt" || true
	S mount --store "$W/$h/pstore" "$W/$h/mnt" >>"$W/$h/pri.log" 2>&1 &
	echo $! >"$W/$h/pri.pid"
	for _ in $(seq 100); do S status --store "$W/$h/pstore" >/dev/null 2>&1 && mountpoint -q "$W/$h/mnt" && return; sleep 0.1; done
	echo "mount daemon $h did not start" >&2; cat "$W/$h/pri.log" >&2; exit 1
}
for h in a b; do
	mkdir -p "$W/$h/pstore/images" "$W/$h/mnt" "$W/$h/rstore"
	ADDR[$h]=127.0.0.1:$(port)
done

IMG=vm1.img
if [[ -f $DS/vm1.img ]]; then
	cp --sparse=always "$DS/vm1.img" "$W/a/pstore/images/$IMG"
	SRC="dataset vm1.img (cloned Debian ext4)"
else
	truncate -s 4G "$W/a/pstore/images/$IMG"
	fio --name=fill --filename="$W/a/pstore/images/$IMG" --rw=write --bs=1M --size=1G --refill_buffers --direct=1 --output=/dev/null
	SRC="4 GiB sparse, 1 GiB random data (dataset missing)"
fi
ALLOC=$(du -B1 "$W/a/pstore/images/$IMG" | cut -f1)
for h in a b; do start_rep $h; start_pri $h; done

token() { S pair token --store "$W/$1/rstore" --images 'vm1/*' --json | jq -r .token; }
token b | S pair join --store "$W/a/pstore" --token-file - --replica "${ADDR[b]}" --name host-a >/dev/null
S replicate enable --store "$W/a/pstore" --group vm1 --images "$IMG" --replica "${ADDR[b]}" --interval 1h --any-point-window 1h >/dev/null
log "initial replication of $SRC ($((ALLOC >> 20)) MiB allocated)"
S replicate now --store "$W/a/pstore" --group vm1 --wait --timeout 30m >/dev/null

# change HOST MIB: MIB of random 64 KiB writes at distinct offsets through HOST's mount.
change() {
	fio --name=chg --filename="$W/$1/mnt/$IMG" --rw=randwrite --bs=64k --size=4g --io_size="${2}m" \
		--refill_buffers --randrepeat=0 --direct=1 --fsync_on_close=1 --output=/dev/null
}
sent() { S replicate list --store "$W/$1/pstore" --json | jq -r '.[] | select(.group=="vm1") | .bytes_sent'; }
dropcaches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# 1. test failover creation.
TF=()
for r in $(seq "$REPS"); do
	j=$(S failover test --store "$W/b/rstore" --group vm1 --json)
	TF+=("$(jq -r '.[0].create_seconds' <<<"$j")")
	S failover test stop --store "$W/b/rstore" --group vm1 >/dev/null
done
log "test failover creation: ${TF[*]} s"

# 2. planned failover A->B, B->A (each a sample), anchors interleaved.
declare -a P_PREP P_DOWN P_TOTAL P_FINAL P_FINAL_B P_HASH P_PROMOTE P_ADOPT A_NOW A_B3 REV_BYTES REV_MIB
from=a to=b
for r in $(seq $((REPS))); do
	for leg in 1 2; do
		# anchor 1: a plain 'replicate now' of 100 MiB changed
		change $from $CHANGE_MIB
		t0=$(now); S replicate now --store "$W/$from/pstore" --group vm1 --wait --timeout 10m >/dev/null; t1=$(now)
		A_NOW+=("$(secs "$t0" "$t1")")
		# anchor 2: reading and hashing the image once
		dropcaches
		t0=$(now); b3sum --num-threads 2 "$W/$from/pstore/images/$IMG" >/dev/null; t1=$(now)
		A_B3+=("$(secs "$t0" "$t1")")
		change $from $CHANGE_MIB
		dropcaches
		t0=$(now)
		j=$(S failover planned --store "$W/$from/pstore" --replica-store "$W/$from/rstore" --replica-addr "${ADDR[$from]}" --group vm1 --json)
		t1=$(now)
		if [[ $(jq -r '.[0].error // ""' <<<"$j") != "" ]]; then echo "$j" >&2; exit 1; fi
		P_TOTAL+=("$(secs "$t0" "$t1")")
		P_FINAL+=("$(jq -r '.[0].steps[] | select(.step=="final cycle") | .seconds' <<<"$j")")
		P_FINAL_B+=("$(jq -r '.[0].steps[] | select(.step=="final cycle") | .bytes' <<<"$j")")
		P_HASH+=("$(jq -r '.[0].steps[] | select(.step|startswith("hash primary")) | .seconds' <<<"$j")")
		P_PROMOTE+=("$(jq -r '.[0].steps[] | select(.step|startswith("promote")) | .seconds' <<<"$j")")
		P_PREP+=("$(jq -r '.[0].steps[] | select(.step|startswith("prepare")) | .seconds' <<<"$j")")
		P_ADOPT+=("$(jq -r '.[0].steps[] | select(.step|startswith("adopt")) | .seconds' <<<"$j")")
		P_DOWN+=("$(python3 -c "print(f'{$(secs "$t0" "$t1") - $(jq -r '[.[0].steps[] | select((.step|startswith("adopt")) or (.step|startswith("prepare"))) | .seconds] | add' <<<"$j"):.3f}')")")
		[[ $(b3sum --no-names "$W/$to/pstore/images/$IMG") == $(b3sum --no-names "$W/$from/rstore/groups/vm1/images/"*/latest.img) ]] ||
			{ echo "failover bench: images differ after the planned failover" >&2; exit 1; }
		log "planned failover $from->$to: $(jq -c '[.[0].steps[] | {(.step): .seconds}] | add' <<<"$j")"
		# 3. reverse replication of 100 MiB written on the new primary
		s0=$(sent $to)
		change $to $CHANGE_MIB
		S replicate now --store "$W/$to/pstore" --group vm1 --wait --timeout 10m >/dev/null
		REV_BYTES+=("$(($(sent $to) - s0))")
		tmp=$from from=$to to=$tmp
	done
done

# 4. failback after an unplanned failover (A is primary again after an even number of legs).
[[ $from == a ]] || { echo "failover bench: expected A to be the primary" >&2; exit 1; }
change a 50
S replicate now --store "$W/a/pstore" --group vm1 --wait --timeout 10m >/dev/null
change a 50 # never shipped: A dies with these changes
kill -9 "$(cat "$W/a/pri.pid")"
sleep 0.5
umount -l "$W/a/mnt" 2>/dev/null || true
t0=$(now); j=$(S failover unplanned --store "$W/b/rstore" --group vm1 --json); t1=$(now)
[[ $(jq -r '.[0].error // ""' <<<"$j") == "" ]] || { echo "$j" >&2; exit 1; }
U_TIME=$(secs "$t0" "$t1")
change b 50
start_pri a
python3 - "$W/a/pstore/images/$IMG" "$W/b/pstore/images/$IMG" >"$W/differ" <<'EOF'
import sys
a, b = open(sys.argv[1], 'rb'), open(sys.argv[2], 'rb')
n = 0
while True:
    x, y = a.read(1 << 22), b.read(1 << 22)
    if not x and not y:
        break
    x, y = x.ljust(len(y), b'\0'), y.ljust(len(x), b'\0')
    n += sum(1 for i in range(0, len(x), 4096) if x[i:i+4096] != y[i:i+4096])
print(n)
EOF
DIFFER=$(cat "$W/differ")
t0=$(now); j=$(S failover reverse --store "$W/a/pstore" --replica-store "$W/a/rstore" --replica-addr "${ADDR[a]}" --group vm1 --json); t1=$(now)
[[ $(jq -r '.[0].error // ""' <<<"$j") == "" ]] || { echo "$j" >&2; exit 1; }
R_TIME=$(secs "$t0" "$t1")
t0=$(now); S replicate now --store "$W/b/pstore" --group vm1 --wait --timeout 10m >/dev/null; t1=$(now)
FB_TIME=$(secs "$t0" "$t1")
FB_BYTES=$(sent b)
[[ $(b3sum --no-names "$W/b/pstore/images/$IMG") == $(b3sum --no-names "$W/a/rstore/groups/vm1/images/"*/latest.img) ]] ||
	{ echo "failover bench: images differ after the failback" >&2; exit 1; }

# 5. unplanned failover with a warm standby: B is the primary now and A its replica; A's
# replica daemon restarts with --warm-standby, which brings a promotion copy forward after
# every apply; then B dies (-9) and A takes over.
pkill -f -- "serve --store $W/a/rstore " || true # rep.pid is the shell running S, not the daemon
for _ in $(seq 200); do pgrep -f -- "serve --store $W/a/rstore " >/dev/null || break; sleep 0.1; done
"$BIN" serve --store "$W/a/rstore" --listen "${ADDR[a]}" --primary-store "$W/a/pstore" --warm-standby >>"$W/a/rep.log" 2>&1 &
echo $! >"$W/a/rep.pid"
for _ in $(seq 100); do S status --store "$W/a/rstore" >/dev/null 2>&1 && break; sleep 0.1; done
warm_wait() { # until the prepared copy is at A's latest point
	local want
	want=$(S points list --store "$W/a/rstore" --group vm1 --json | jq -r '.[-1].point')
	for _ in $(seq 600); do
		[[ $(jq -r '.point' "$W/a/pstore/failover/vm1/prepared.json" 2>/dev/null) == "$want" ]] && return
		sleep 0.1
	done
	echo "failover bench: the warm standby copy did not reach point $want" >&2; exit 1
}
change b 50
S replicate now --store "$W/b/pstore" --group vm1 --wait --timeout 10m >/dev/null
t0=$(now); warm_wait; t1=$(now)
W_FIRST=$(secs "$t0" "$t1")
change b $CHANGE_MIB
t0=$(now); S replicate now --store "$W/b/pstore" --group vm1 --wait --timeout 10m >/dev/null; warm_wait; t1=$(now)
W_APPLY=$(secs "$t0" "$t1")
kill -9 "$(cat "$W/b/pri.pid")"
sleep 0.5
umount -l "$W/b/mnt" 2>/dev/null || true
t0=$(now); j=$(S failover unplanned --store "$W/a/rstore" --group vm1 --json); t1=$(now)
[[ $(jq -r '.[0].error // ""' <<<"$j") == "" ]] || { echo "$j" >&2; exit 1; }
W_UNPLANNED=$(secs "$t0" "$t1")
W_DETAIL=$(jq -r '.[0].steps[] | select(.step|startswith("promote")) | .detail' <<<"$j")
[[ $(b3sum --no-names "$W/a/pstore/images/$IMG") == $(S points export --store "$W/a/rstore" --group vm1 --point latest --to "$W/warm-export" >/dev/null && b3sum --no-names "$W/warm-export/$IMG") ]] ||
	{ echo "failover bench: the warm standby promotion differs from the latest point" >&2; exit 1; }

m() { median "$@"; }
CH=$((CHANGE_MIB << 20))
out=$RESULTS/failover-$(date +%Y%m%d-%H%M)$([[ $QUICK == 1 ]] && echo -quick || true).txt
{
	echo "standin failover benchmark — $(date -u +%FT%TZ), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
	echo "image: $SRC, 4 GiB, $((ALLOC >> 20)) MiB allocated; $CHANGE_MIB MiB changed per operation; medians of $REPS run(s) (planned: $((2 * REPS)) legs)"
	echo
	printf '%-58s %12s %s\n' "operation" "median" "detail / target"
	printf '%-58s %10s s %s\n' "test failover creation (daemon side)" "$(m "${TF[@]}")" "all: ${TF[*]}; target < 1 s"
	printf '%-58s %10s s %s\n' "planned failover, total (CLI)" "$(m "${P_TOTAL[@]}")" "all: ${P_TOTAL[*]}"
	printf '%-58s %10s s %s\n' "  prepare: replica copies its latest point (VM running)" "$(m "${P_PREP[@]}")" ""
	printf '%-58s %10s s %s\n' "  VM down: fence .. promoted + tracked" "$(m "${P_DOWN[@]}")" "all: ${P_DOWN[*]}"
	printf '%-58s %10s s %s\n' "  fence + final cycle ($CHANGE_MIB MiB changed)" "$(m "${P_FINAL[@]}")" "bytes: $(m "${P_FINAL_B[@]}" | cut -d. -f1)"
	printf '%-58s %10s s %s\n' "  hash the primary image (root), during the final cycle" "$(m "${P_HASH[@]}")" ""
	printf '%-58s %10s s %s\n' "  promote: bring the prepared copy forward, root, track" "$(m "${P_PROMOTE[@]}")" ""
	printf '%-58s %10s s %s\n' "  adopt the old primary's image as replica copy" "$(m "${P_ADOPT[@]}")" ""
	printf '%-58s %10s s %s\n' "anchor: replicate now of $CHANGE_MIB MiB changed" "$(m "${A_NOW[@]}")" ""
	printf '%-58s %10s s %s\n' "anchor: b3sum of the image, cold cache" "$(m "${A_B3[@]}")" ""
	ratio=$(python3 -c "print(f'{$(m "${P_DOWN[@]}")/($(m "${A_NOW[@]}")+$(m "${A_B3[@]}")):.2f}')")
	printf '%-58s %10s x %s\n' "downtime / (replicate now + b3sum)" "$ratio" "target: final cycle + verify only (~1x)"
	rb=$(m "${REV_BYTES[@]}" | cut -d. -f1)
	printf '%-58s %10s B %s\n' "reverse replication: bytes for $CHANGE_MIB MiB written" "$rb" "$(python3 -c "print(f'{$rb/$CH:.3f}')")x of the data written (no full copy)"
	printf '%-58s %10s s %s\n' "unplanned failover (promote the latest point)" "$U_TIME" "full local copy"
	printf '%-58s %10s s %s\n' "warm standby: first copy after enabling it" "$W_FIRST" ""
	printf '%-58s %10s s %s\n' "warm standby: replicate now of $CHANGE_MIB MiB + bring forward" "$W_APPLY" "anchor: replicate now alone above"
	printf '%-58s %10s s %s\n' "unplanned failover with a warm standby" "$W_UNPLANNED" "$W_DETAIL"
	printf '%-58s %10s s %s\n' "failover reverse on the returning old primary" "$R_TIME" ""
	printf '%-58s %10s s %s\n' "failback: first replication back (hash check + delta)" "$FB_TIME" ""
	printf '%-58s %10s B %s\n' "failback bytes sent" "$FB_BYTES" "differing blocks: $DIFFER = $((DIFFER * 4096)) B -> $(python3 -c "print(f'{$FB_BYTES/($DIFFER*4096):.3f}')")x (target <= 1.1x)"
} | tee "$out"
log "written to $out"
