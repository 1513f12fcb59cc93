#!/usr/bin/env bash
# bench/repl.sh — replication benchmarks: one replica daemon and one primary daemon on
# 127.0.0.1, set up like scripts/demo.sh (mutual TLS, one-token pairing).
#
# Prints one results table (also written to bench/results/repl-latest.txt; quick runs to
# bench/results/repl-quick.txt):
#   1. bytes on the wire per dirty byte: random 4K overwrites, a file copy into an ext4
#      image, a database-like fio mix; zstd vs --compress none vs rsync (delta algorithm,
#      plain and -z) of the whole image against a copy of the previous replica state
#   2. replication lag under a steady 10 MB/s write load with --interval 30s
#   3. throttling accuracy of --bandwidth 40Mbit (upload rate measured on the replica)
#   4. apply throughput on the replica vs sequential write speed of the replica's disk
#   5. exporting an older recovery point vs the latest
#   6. daemon memory (RSS) with a 1 GiB image and a sparse 64 GiB image, extrapolated
#
# Environment:
#   BENCH_QUICK=1          smoke run (~2-3 min): smaller images, one repetition
#   BENCH_REPS=N           repetitions for sections 1, 4 and 5 (default 3; quick 1)
#   BENCH_LAG_SECONDS=N    duration of the steady load of section 2 (default 150; quick 40)
#   BENCH_DIR=DIR          scratch directory (default /var/tmp/standin-repl-bench; not tmpfs);
#                          removed at exit unless BENCH_KEEP=1
#   BENCH_PORT=N           replica port (default random 20000-39999); metrics on N+1 (replica)
#                          and N+2 (primary)
#   BENCH_SECTIONS="4 5 6 1 3 2"  which sections to run (5 needs 4; 6 uses 4's image if run)
#
# Needs root, /dev/fuse, fio, jq, rsync, curl, b3sum, losetup, mkfs.ext4. The box is shared
# and noisy: ratios are measured side by side (baselines interleaved with the measurement).
set -Eeuo pipefail
umask 022
export LC_ALL=C

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QUICK=${BENCH_QUICK:-0}
if [[ $QUICK == 1 ]]; then
	REPS=${BENCH_REPS:-1} LAG_SECS=${BENCH_LAG_SECONDS:-40}
	S1_MIB=128 S1_RAND_MIB=32 S1_DB_MIB=16 S1_EXT_MIB=512 S1_CP_SRC=/usr/share/man
	THR_MIB=20 APPLY_MIB=256 SPARSE_WRITE_MIB=64
else
	REPS=${BENCH_REPS:-3} LAG_SECS=${BENCH_LAG_SECONDS:-150}
	S1_MIB=256 S1_RAND_MIB=64 S1_DB_MIB=32 S1_EXT_MIB=2048 S1_CP_SRC=/usr/share
	THR_MIB=60 APPLY_MIB=1024 SPARSE_WRITE_MIB=128
fi
SPARSE_GIB=${BENCH_SPARSE_GIB:-64}
THR_BW=40Mbit THR_RATE=5000000 # bytes/s that 40Mbit means (ParseBandwidth: 1e6/8 per Mbit)
SECTIONS=${BENCH_SECTIONS:-"4 5 6 1 3 2"}
W=${BENCH_DIR:-/var/tmp/standin-repl-bench}
PORT=${BENCH_PORT:-$((20000 + RANDOM % 20000))}
RMPORT=$((PORT + 1)) PMPORT=$((PORT + 2))
REPLICA=127.0.0.1:$PORT
RESULTS=$REPO/bench/results
T_START=$(date +%s)

log() { printf '[repl %4ds] %s\n' "$(($(date +%s) - T_START))" "$*" >&2; }
die() {
	printf '\nrepl bench: FAILED: %s\n' "$*" >&2
	exit 1
}
trap 'die "command failed (exit $?) at bench/repl.sh line $LINENO: $BASH_COMMAND"' ERR

[[ $(id -u) == 0 ]] || die "run as root (FUSE mounts, loop devices, drop_caches)"
[[ -c /dev/fuse ]] || die "/dev/fuse missing"
if ! command -v rsync >/dev/null; then
	log "installing rsync"
	apt-get install -y rsync >/dev/null 2>&1 || die "rsync missing and apt-get install -y rsync failed"
fi
for t in fio jq rsync curl b3sum losetup mkfs.ext4 fsfreeze findmnt mountpoint go; do
	command -v "$t" >/dev/null || die "$t not installed"
done
for p in "$PORT" "$RMPORT" "$PMPORT"; do
	if ss -Hltn "sport = :$p" | grep -q .; then die "port $p is in use; set BENCH_PORT"; fi
done

# ---------------------------------------------------------------- cleanup
PSTORE=$W/primary RSTORE=$W/replica MNT=$W/mnt
RPID="" PPID_D="" # replica daemon pid, primary daemon pid
declare -a BGPIDS=() LOOPS=() FSMNTS=()
PROBLEMS=() # problems seen in standin during the run (printed with the report)
problem() {
	PROBLEMS+=("$*")
	log "PROBLEM: $*"
}

cleanup() {
	local rc=$? p m l i
	trap - ERR EXIT INT TERM
	set +e
	for p in "${BGPIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
	for p in "${BGPIDS[@]}"; do wait "$p" 2>/dev/null; done
	for m in "${FSMNTS[@]}"; do
		if mountpoint -q "$m"; then
			fsfreeze -u "$m" 2>/dev/null
			umount "$m" || umount -l "$m"
		fi
	done
	for l in "${LOOPS[@]}"; do losetup -d "$l" 2>/dev/null; done
	if [[ -n $PPID_D ]]; then
		if mountpoint -q "$MNT"; then "$BIN" unmount "$MNT" 2>/dev/null || "$BIN" unmount --lazy "$MNT"; fi
		for ((i = 0; i < 150; i++)); do kill -0 "$PPID_D" 2>/dev/null || break; sleep 0.2; done
		if kill -0 "$PPID_D" 2>/dev/null; then
			echo "repl bench: primary daemon $PPID_D still running 30 s after unmount; SIGTERM" >&2
			kill -TERM "$PPID_D"
		fi
	fi
	mountpoint -q "$MNT" 2>/dev/null && umount -l "$MNT"
	if [[ -n $RPID ]]; then
		kill -TERM "$RPID" 2>/dev/null
		local t0=$EPOCHREALTIME
		for ((i = 0; i < 150; i++)); do kill -0 "$RPID" 2>/dev/null || break; sleep 0.2; done
		echo "repl bench: replica daemon exited $(awk -v a="$EPOCHREALTIME" -v b="$t0" 'BEGIN {printf "%.1f", a - b}') s after SIGTERM" >&2
		if kill -0 "$RPID" 2>/dev/null; then
			echo "repl bench: replica daemon $RPID ignored SIGTERM for 30 s; SIGKILL" >&2
			kill -KILL "$RPID"
		fi
		wait "$RPID" 2>/dev/null
	fi
	if [[ $rc != 0 && -f $W/.standin-repl-bench ]]; then
		echo "repl bench: kept $W for inspection (daemon logs: $W/log/replica.log, $PSTORE/daemon.log)" >&2
	elif [[ ${BENCH_KEEP:-0} != 1 && -f $W/.standin-repl-bench ]]; then
		rm -rf "$W"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- helpers
now() { echo "$EPOCHREALTIME"; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR] = $1} END {if (NR == 0) print "nan"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
maxof() { printf '%s\n' "$@" | sort -g | tail -1; }
div() { awk -v a="$1" -v b="$2" 'BEGIN {if (b == 0) print "nan"; else printf "%.6g\n", a / b}'; }
sub() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.6f\n", a - b}'; }
fmt() { awk -v v="$1" -v f="$2" 'BEGIN {if (v == "nan") print "n/a"; else printf f, v}'; }
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
mark() { # VALUE OP TARGET -> met/MISSED
	awk -v v="$1" -v t="$3" -v op="$2" 'BEGIN {if (v == "nan") {print "n/a"; exit}; ok = (op == ">=") ? (v >= t) : (v <= t); print ok ? "met" : "MISSED"}'
}
drop_caches() {
	sync
	echo 3 >/proc/sys/vm/drop_caches
}

sd() { "$BIN" "$@"; } # standin (private copy)
alive() {
	kill -0 "$RPID" 2>/dev/null || die "replica daemon (pid $RPID) died: $(tail -20 "$W/log/replica.log")"
	kill -0 "$PPID_D" 2>/dev/null || die "primary daemon (pid $PPID_D) died: $(tail -20 "$PSTORE/daemon.log")"
}

img_field() { # IMAGE FIELD (primary status)
	sd status --store "$PSTORE" --json | jq -er --arg n "$1" ".images[] | select(.name == \$n) | .$2" ||
		die "status: no field $2 for image $1"
}
grp_field() { # GROUP FIELD (replicate list)
	sd replicate list --store "$PSTORE" --json | jq -er --arg g "$1" ".[] | select(.group == \$g) | .$2" ||
		die "replicate list: no field $2 for group $1"
}
replica_img() { # GROUP -> path of latest.img on the replica (groups have one image here)
	local f
	f=$(ls "$RSTORE"/groups/"$1"/images/*/latest.img 2>/dev/null | head -1)
	[[ -n $f ]] || die "no latest.img for group $1 on the replica"
	echo "$f"
}

# rnow GROUP: one `replicate now --wait`; sets RN_SENT (bytes_sent delta), RN_WALL (s)
rnow() {
	local g=$1 s0 s1 t0 t1 c0 c1 out
	s0=$(grp_field "$g" bytes_sent) c0=$(grp_field "$g" cycles_replicated)
	t0=$(now)
	out=$(sd replicate now --store "$PSTORE" --group "$g" --wait 2>&1) ||
		die "standin replicate now --store $PSTORE --group $g --wait failed: $out"
	t1=$(now)
	s1=$(grp_field "$g" bytes_sent) c1=$(grp_field "$g" cycles_replicated)
	((c1 == c0 + 1)) || problem "replicate now --group $g --wait: cycles_replicated went $c0 -> $c1 (expected +1)"
	RN_SENT=$((s1 - s0)) RN_WALL=$(sub "$t1" "$t0")
}

# enable GROUP IMAGE FLAGS...: enable replication and wait until the base is applied
enable() {
	local g=$1 img=$2 out i
	shift 2
	out=$(sd replicate enable --store "$PSTORE" --group "$g" --images "$img" --replica "$REPLICA" "$@" 2>&1) ||
		die "standin replicate enable --group $g --images $img $*: $out"
	for ((i = 0; i < 6000; i++)); do
		(($(grp_field "$g" cycles_replicated) >= 1)) && return
		alive
		sleep 0.1
	done
	die "group $g: base cycle not replicated after 10 min: $(grp_field "$g" last_error)"
}
wait_base() { # GROUP: poll until the base is applied (enable already ran)
	local g=$1 i
	for ((i = 0; i < 6000; i++)); do
		(($(grp_field "$g" cycles_replicated) >= 1)) && return
		alive
		sleep 0.05
	done
	die "group $g: base cycle not replicated after 5 min: $(grp_field "$g" last_error)"
}

# fio_run TAG FIOARGS...: dies on any fio error; JSON in $W/fio/TAG.json
fio_run() {
	local tag=$1 json=$W/fio/$1.json
	shift
	fio --output-format=json "$@" >"$json" 2>"$W/fio/$tag.err" ||
		die "fio $tag failed: $(tail -5 "$W/fio/$tag.err") $(tail -c 400 "$json")"
	jq -e '[.jobs[].error] | all(. == 0)' "$json" >/dev/null || die "fio $tag reported an error"
}
fio_write_bw() { jq -r '[.jobs[].write.bw_bytes] | add' "$W/fio/$1.json"; } # bytes/s

# fill IMAGE MIB COMPRESS_PCT SEED: sequential 1 MiB direct writes through the mount
fill() {
	fio_run "fill-$1-$4" --name=fill --filename="$MNT/$1" --rw=write --bs=1M --direct=1 --ioengine=libaio \
		--iodepth=8 --size="$2M" --fallocate=none --refill_buffers --buffer_compress_percentage="$3" --randseed="$4"
}
mkimg() { # IMAGE MIB: a sparse image created through the mount
	truncate -s "$2M" "$MNT/$1"
	[[ $(stat -c %s "$PSTORE/images/$1") == $(($2 << 20)) ]] || die "image $1 did not appear in $PSTORE/images"
}

# Inbox watcher: samples the sizes of the replica's inbox files of a group every 50 ms.
# Lines: "EPOCH SIZE NAME" (NAME ends in .part while uploading, .cyc once verified; no
# line for the cycle once applied: the replica deletes it after the commit).
WATCH_PID=""
watch_start() { # GROUP OUTFILE
	local dir=$RSTORE/inbox/$1 out=$2
	mkdir -p "$W/watch"
	(
		trap 'exit 0' TERM
		while :; do
			t=$EPOCHREALTIME
			n=0
			for f in "$dir"/*; do
				[[ -e $f ]] || continue
				s=$(stat -c %s "$f" 2>/dev/null) || continue
				echo "$t $s ${f##*/}"
				n=1
			done
			((n)) || echo "$t 0 -"
			sleep 0.05
		done
	) >"$out" &
	WATCH_PID=$!
	BGPIDS+=("$WATCH_PID")
}
bg_done() { # PID: forget a background job we waited for (so cleanup never signals a reused pid)
	local -a keep=()
	local p
	for p in "${BGPIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
	BGPIDS=("${keep[@]}")
}
watch_stop() {
	kill -TERM "$WATCH_PID" 2>/dev/null || true
	wait "$WATCH_PID" 2>/dev/null || true
	bg_done "$WATCH_PID"
	WATCH_PID=""
}
# watch_times FILE -> "t_first t_full t_cyc t_gone size": first .part sample with data, first
# sample where the .part reached its final size, first .cyc sample, first empty sample after it
watch_times() {
	awk '
		$3 ~ /\.part$/ { if (!first && $2 > 0) first = $1; if ($2 > maxs) {maxs = $2; full = $1} }
		$3 ~ /\.cyc$/  { if (!cyc) cyc = $1; if ($2 > maxs) {maxs = $2; if (!full) full = $1} }
		$3 == "-"      { if (cyc && !gone) gone = $1 }
		END { printf "%s %s %s %s %s\n", first ? first : "nan", full ? full : "nan", cyc ? cyc : "nan", gone ? gone : "nan", maxs + 0 }' "$1"
}
# watch_slope FILE TOTAL -> least-squares bytes/s of the .part size between 10% and 90% of TOTAL
watch_slope() {
	awk -v tot="$2" '
		$3 ~ /\.part$/ && $2 >= 0.1 * tot && $2 <= 0.9 * tot { if (!n) t0 = $1; n++; x[n] = $1 - t0; y[n] = $2 }
		END { if (n < 3) {print "nan"; exit}
		      for (i = 1; i <= n; i++) {mx += x[i]; my += y[i]}; mx /= n; my /= n
		      for (i = 1; i <= n; i++) {sxx += (x[i] - mx) ^ 2; sxy += (x[i] - mx) * (y[i] - my)}
		      if (sxx <= 0) print "nan"; else printf "%.1f\n", sxy / sxx }' "$1"
}

metric() { # PORT NAME -> value (first series)
	curl -fsS "http://127.0.0.1:$1/metrics" | awk -v n="$2" '$1 == n && !done {printf "%.0f\n", $2; done = 1}'
}
cpu_secs() { # PID [user|sys] -> CPU seconds so far (user+system by default)
	awk -v hz="$(getconf CLK_TCK)" -v k="${2:-all}" '{sub(/^.*\) /, ""); print (k == "user" ? $12 : k == "sys" ? $13 : $12 + $13) / hz}' "/proc/$1/stat"
}
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
# mem_sample LABEL: both daemons' RSS (metrics and /proc), Go heap in use, tracker memory
declare -a MEM_ROWS=()
mem_sample() {
	local label=$1 rr pr rh ph tm rg pg
	sleep 3 # let in-flight buffers go
	alive
	rr=$(metric "$RMPORT" process_resident_memory_bytes)
	pr=$(metric "$PMPORT" process_resident_memory_bytes)
	rh=$(metric "$RMPORT" go_memstats_heap_inuse_bytes)
	ph=$(metric "$PMPORT" go_memstats_heap_inuse_bytes)
	rg=$(metric "$RMPORT" go_memstats_next_gc_bytes)
	pg=$(metric "$PMPORT" go_memstats_next_gc_bytes)
	[[ -n $rr && -n $pr && -n $rh && -n $ph && -n $rg && -n $pg ]] || die "process_resident_memory_bytes / go_memstats_* missing from the daemons' metrics"
	tm=$(sd status --store "$PSTORE" --json | jq '[.images[]?.memory_bytes] | add // 0')
	MEM_ROWS+=("$label|$rr|$rh|$pr|$ph|$tm|$rg|$pg")
	log "memory [$label]: replica RSS $(mib "$rr") MiB (heap $(mib "$rh")), primary RSS $(mib "$pr") MiB (heap $(mib "$ph"), tracker $tm B)"
}

# ---------------------------------------------------------------- setup
if [[ -d $W ]]; then
	[[ -f $W/.standin-repl-bench ]] || die "$W exists and is not a repl bench directory; set BENCH_DIR"
	if findmnt -rn -o TARGET | grep -q "^$W/"; then
		die "something is still mounted under $W (a previous run?): $(findmnt -rn -o TARGET | grep "^$W/" | tr '\n' ' ')"
	fi
	rm -rf "$W"
fi
mkdir -p "$W"/{log,fio,rsync,watch,exp} "$PSTORE" "$MNT"
touch "$W/.standin-repl-bench"
[[ $(stat -f -c %T "$W") != tmpfs ]] || die "$W is on tmpfs, which refuses O_DIRECT; set BENCH_DIR"

if [[ ! -x $REPO/bin/standin ]]; then
	log "building bin/standin"
	make -C "$REPO" build >&2
fi
BIN=$W/standin # private copy: others may rebuild bin/standin while this runs
cp "$REPO/bin/standin" "$BIN"
log "standin $("$BIN" --version | awk '{print $NF}'), scratch $W, replica $REPLICA, sections: $SECTIONS$([[ $QUICK == 1 ]] && echo ' (quick)')"

"$BIN" serve --store "$RSTORE" --listen "$REPLICA" --metrics "127.0.0.1:$RMPORT" >"$W/log/replica.log" 2>&1 &
RPID=$!
for ((i = 0; i < 150; i++)); do
	kill -0 "$RPID" 2>/dev/null || die "replica daemon exited during start-up: $(tail -5 "$W/log/replica.log")"
	[[ -S $RSTORE/control.sock ]] && sd status --store "$RSTORE" --json >/dev/null 2>&1 && break
	sleep 0.2
done
sd status --store "$RSTORE" --json >/dev/null 2>&1 || die "replica daemon not ready after 30 s: $(tail -5 "$W/log/replica.log")"

out=$(sd mount --store "$PSTORE" "$MNT" --background --metrics "127.0.0.1:$PMPORT" 2>&1) ||
	die "standin mount --background failed: $out"
PPID_D=$(sd status --store "$PSTORE" --json | jq -er .pid) || die "primary status has no pid"
mountpoint -q "$MNT" || die "$MNT is not mounted after standin mount --background"
TOKEN=$(sd pair token --store "$RSTORE" 2>/dev/null) || die "standin pair token failed"
out=$(printf '%s\n' "$TOKEN" | sd pair join --store "$PSTORE" --token-file - 2>&1) || die "standin pair join failed: $out"
log "replica pid $RPID, primary pid $PPID_D, paired"
mem_sample "idle (paired, no image)"

# ---------------------------------------------------------------- results
declare -A R=() # key -> value, filled by the sections

# ================================================================ 4. apply throughput
# A base cycle of an APPLY_MIB image of incompressible data (--compress none), then full
# overwrites (applied with undo logs). Timeline from the replica's inbox: .part complete ->
# verified (.cyc) -> applied (.cyc deleted after the commit). Baseline: fio seq write 1M
# direct (and buffered + fsync) on the replica store's filesystem, run before and after.
rdisk_baseline() { # TAG
	fio_run "rdisk-direct-$1" --name=seq --filename="$RSTORE/fio-baseline" --rw=write --bs=1M --direct=1 \
		--size="${APPLY_MIB}M" --fallocate=none
	fio_run "rdisk-buffered-$1" --name=seq --filename="$RSTORE/fio-baseline" --rw=write --bs=1M --direct=0 \
		--size="${APPLY_MIB}M" --fallocate=none --end_fsync=1
	rm -f "$RSTORE/fio-baseline"
	R[bl_direct]+="$(fio_write_bw "rdisk-direct-$1") " R[bl_buffered]+="$(fio_write_bw "rdisk-buffered-$1") "
}
apply_round() { # TAG KIND(base|overwrite): sets R[apply_*]
	local tag=$1 kind=$2 wf=$W/watch/$1.txt t_first t_full t_cyc t_gone size c0 c1 u0 u1
	c0=$(cpu_secs "$RPID") u0=$(cpu_secs "$RPID" user)
	watch_start apl "$wf"
	if [[ $kind == base ]]; then
		out=$(sd replicate enable --store "$PSTORE" --group apl --images apl.img --replica "$REPLICA" \
			--interval 15m --compress none --any-point-window 1h 2>&1) || die "replicate enable apl: $out"
		wait_base apl
	else
		rnow apl
	fi
	sleep 0.2
	watch_stop
	c1=$(cpu_secs "$RPID") u1=$(cpu_secs "$RPID" user)
	R[apply_${kind}_cpu]+="$(sub "$c1" "$c0") " R[apply_${kind}_user]+="$(sub "$u1" "$u0") "
	read -r t_first t_full t_cyc t_gone size < <(watch_times "$wf")
	[[ $t_gone != nan && $t_cyc != nan ]] || die "apply timeline of $tag incomplete (watcher: $t_first $t_full $t_cyc $t_gone); see $wf"
	R[apply_${kind}_s]+="$(sub "$t_gone" "$t_cyc") "
	R[apply_${kind}_verify_s]+="$(sub "$t_cyc" "$t_full") "
	R[apply_${kind}_upload_bps]+="$(div "$size" "$(sub "$t_full" "$t_first")") "
	R[apply_${kind}_bytes]=$size
	log "apply $tag: cycle $(mib "$size") MiB, upload $(fmt "$(sub "$t_full" "$t_first")" %.2f) s, verify $(fmt "$(sub "$t_cyc" "$t_full")" %.2f) s, apply $(fmt "$(sub "$t_gone" "$t_cyc")" %.2f) s"
}
declare -a APL_B3=() # b3sum of the primary image after each round (point order)
sec4() {
	log "section 4: apply throughput ($APPLY_MIB MiB, --compress none)"
	mkimg apl.img "$APPLY_MIB"
	fill apl.img "$APPLY_MIB" 0 1
	APL_B3+=("$(b3sum --no-names "$PSTORE/images/apl.img")")
	rdisk_baseline 0
	apply_round base base
	mem_sample "+ $APPLY_MIB MiB image replicated (base, 1 point)"
	rdisk_baseline 1
	APL_OVERWRITES=$((REPS < 2 ? REPS : 2)) # 1 GiB each: keep the default run within ~10 min
	for ((rep = 1; rep <= APL_OVERWRITES; rep++)); do
		fill apl.img "$APPLY_MIB" 0 $((rep + 1))
		APL_B3+=("$(b3sum --no-names "$PSTORE/images/apl.img")")
		apply_round "overwrite$rep" overwrite
		rdisk_baseline $((rep + 1))
	done
}

# ================================================================ 5. older point vs latest
sec5() {
	log "section 5: export an older point vs the latest"
	local rep p t0 t1 oldest latest
	# two more rounds of partial random overwrites (25% of the image each) on top of 4's points
	for ((rep = 1; rep <= 2; rep++)); do
		fio_run "apl-partial-$rep" --name=part --filename="$MNT/apl.img" --rw=randwrite --bs=64k --direct=1 \
			--ioengine=libaio --iodepth=8 --size="${APPLY_MIB}M" --io_size=$((APPLY_MIB / 4))M --randseed=$((100 + rep))
		APL_B3+=("$(b3sum --no-names "$PSTORE/images/apl.img")")
		rnow apl
	done
	sd points list --store "$RSTORE" --group apl --json >"$W/apl-points.json"
	oldest=$(jq -r '.[0].point' "$W/apl-points.json")
	latest=$(jq -r '.[-1].point' "$W/apl-points.json")
	R[s5_points]=$(jq length "$W/apl-points.json")
	R[s5_oldest]=$oldest
	R[s5_undo]=$(sd status --store "$RSTORE" --json | jq -r '.groups[] | select(.group == "apl") | .undo_bytes')
	((${R[s5_points]} == ${#APL_B3[@]})) || problem "points list --group apl shows ${R[s5_points]} points after ${#APL_B3[@]} replicated cuts with --any-point-window 1h"
	for ((rep = 1; rep <= REPS; rep++)); do
		for p in $( ((rep % 2)) && echo "latest $oldest" || echo "$oldest latest"); do
			rm -f "$W/exp/apl.img"
			drop_caches
			t0=$(now)
			out=$(sd points export --store "$RSTORE" --group apl --point "$p" --image apl.img --to "$W/exp/apl.img" 2>&1) ||
				die "standin points export --group apl --point $p failed: $out"
			t1=$(now)
			R[s5_$([[ $p == latest ]] && echo latest || echo old)]+="$(sub "$t1" "$t0") "
			if ((rep == 1)); then # correctness: equal to the primary image at that cut
				local want got
				if [[ $p == latest ]]; then want=${APL_B3[-1]}; else want=${APL_B3[0]}; fi
				got=$(b3sum --no-names "$W/exp/apl.img")
				[[ $got == "$want" ]] || problem "points export --point $p of group apl differs from the primary image at that cut (BLAKE3 $got, want $want)"
			fi
		done
	done
	rm -f "$W/exp/apl.img"
	log "export latest: ${R[s5_latest]}s; point $oldest: ${R[s5_old]}s"
}

# ================================================================ 6. memory
sec6() {
	log "section 6: memory with a sparse ${SPARSE_GIB} GiB image"
	mkimg big.img $((SPARSE_GIB << 10))
	fio_run big-1 --name=big --filename="$MNT/big.img" --rw=randwrite --bs=4k --direct=1 --ioengine=libaio \
		--iodepth=16 --size="${SPARSE_GIB}G" --io_size="${SPARSE_WRITE_MIB}M" --randseed=7 --fallocate=none
	enable big big.img --interval 15m --compress zstd --any-point-window 1h
	fio_run big-2 --name=big --filename="$MNT/big.img" --rw=randwrite --bs=4k --direct=1 --ioengine=libaio \
		--iodepth=16 --size="${SPARSE_GIB}G" --io_size="${SPARSE_WRITE_MIB}M" --randseed=8 --fallocate=none
	R[s6_dirty2]=$(img_field big.img dirty_bytes)
	rnow big
	R[s6_alloc]=$(($(stat -c %b "$PSTORE/images/big.img") * 512))
	mem_sample "+ sparse ${SPARSE_GIB} GiB image ($(mib "${R[s6_alloc]}") MiB allocated, 2 points)"
}

# ================================================================ 1. wire bytes per dirty byte
# For each workload two identical images, one replicated with zstd and one with --compress
# none; rsync runs against a copy of the previous replica state of each (plain rsync for the
# none image, rsync -z --compress-choice=zstd for the zstd one).
S1_KINDS="rand ext4 db"
s1_rsync() { # GROUP IMAGE MODE(plain|z) -> "sent recv literal wall"
	local g=$1 img=$2 mode=$3 t0 t1 st
	local -a zf=()
	[[ $mode == z ]] && zf=(-z --compress-choice=zstd)
	t0=$(now)
	st=$(rsync -I --inplace --no-whole-file --stats "${zf[@]}" "$PSTORE/images/$img" "$W/rsync/$g.prev" 2>&1) ||
		die "rsync $mode of $img failed: $st"
	t1=$(now)
	awk -v w="$(sub "$t1" "$t0")" '
		{ gsub(/,/, "") }
		/^Total bytes sent:/ {s = $4} /^Total bytes received:/ {r = $4} /^Literal data:/ {l = $3}
		END {print s + 0, r + 0, l + 0, w}' <<<"$st"
}
s1_setup() { # KIND
	local k=$1 c g img
	for c in z n; do
		g=s1-$k-$c img=s1-$k-$c.img
		case $k in
		rand | db)
			mkimg "$img" "$S1_MIB"
			fill "$img" "$S1_MIB" 50 11
			;;
		ext4)
			mkimg "$img" "$S1_EXT_MIB"
			local loop
			loop=$(losetup --direct-io=on -f --show "$MNT/$img") || die "losetup --direct-io=on $MNT/$img failed"
			LOOPS+=("$loop")
			mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$loop" || die "mkfs.ext4 on $loop failed"
			mkdir -p "$W/fs-$c"
			mount "$loop" "$W/fs-$c"
			FSMNTS+=("$W/fs-$c")
			sync -f "$W/fs-$c"
			;;
		esac
		enable "$g" "$img" --interval 15m --compress "$([[ $c == z ]] && echo zstd || echo none)"
		if [[ $k == ext4 ]]; then fsfreeze -f "$W/fs-$c"; fi
		rnow "$g" # settle: after this round the replica equals the image
		if [[ $k == ext4 ]]; then fsfreeze -u "$W/fs-$c"; fi
		cp --sparse=always "$(replica_img "$g")" "$W/rsync/$g.prev"
	done
}
s1_workload() { # KIND C REP
	local k=$1 c=$2 rep=$3 img=s1-$1-$2.img
	case $k in
	rand)
		fio_run "s1-rand-$c-$rep" --name=rand --filename="$MNT/$img" --rw=randwrite --bs=4k --direct=1 \
			--ioengine=libaio --iodepth=16 --size="${S1_MIB}M" --io_size="${S1_RAND_MIB}M" --fallocate=none \
			--refill_buffers --buffer_compress_percentage=50 --randseed=$((20 + rep))
		;;
	db) # 3/4 of the image: data pages, random 8k/16k (hot pages rewritten); 1/4: a log, appended 8k + fdatasync
		local data=$((S1_MIB * 3 / 4)) walsz=$((S1_DB_MIB / 4))
		fio_run "s1-db-$c-$rep" --fallocate=none --refill_buffers --randseed=$((30 + rep)) --direct=1 --filename="$MNT/$img" \
			--name=data --rw=randwrite --bssplit=8k/60:16k/40 --ioengine=libaio --iodepth=4 --offset=0 --size="${data}M" \
			--io_size="${S1_DB_MIB}M" --norandommap --buffer_compress_percentage=60 \
			--name=wal --rw=write --bs=8k --ioengine=psync --fdatasync=4 --offset=$((data + (rep - 1) * walsz))M \
			--size="${walsz}M" --buffer_compress_percentage=70
		;;
	ext4)
		cp -a "$S1_CP_SRC" "$W/fs-$c/copy-$rep" 2>"$W/log/cp-$c.err" || true # unreadable special files only
		sync -f "$W/fs-$c"
		fsfreeze -f "$W/fs-$c"
		;;
	esac
}
sec1() {
	local k c rep g img dirty cs sent recv lit wall
	for k in $S1_KINDS; do
		log "section 1: $k: setting up two images (zstd / none) and their bases"
		s1_setup "$k"
		local reps=$REPS
		[[ $k == ext4 ]] && reps=1 # one copy of $S1_CP_SRC
		for ((rep = 1; rep <= reps; rep++)); do
			for c in z n; do
				g=s1-$k-$c img=s1-$k-$c.img
				s1_workload "$k" "$c" "$rep"
				dirty=$(img_field "$img" dirty_bytes)
				((dirty > 0)) || die "section 1 $k: no dirty bytes after the workload"
				rnow "$g"
				R[s1_${k}_${c}_ratio]+="$(div "$RN_SENT" "$dirty") "
				R[s1_${k}_${c}_wall]+="$RN_WALL "
				R[s1_${k}_dirty]+="$dirty "
				read -r sent recv lit wall < <(s1_rsync "$g" "$img" "$([[ $c == z ]] && echo z || echo plain)")
				R[s1_${k}_rs${c}_wire]+="$(div $((sent + recv)) "$dirty") "
				R[s1_${k}_rs${c}_sent]+="$(div "$sent" "$dirty") "
				R[s1_${k}_rs${c}_lit]+="$(div "$lit" "$dirty") "
				R[s1_${k}_rs${c}_wall]+="$wall "
				log "  $k rep $rep $c: dirty $(mib "$dirty") MiB, sent $(mib "$RN_SENT") MiB ($(div "$RN_SENT" "$dirty")) in $(fmt "$RN_WALL" %.2f) s; rsync sent+recv $(mib $((sent + recv))) MiB, literal $(mib "$lit") MiB in $(fmt "$wall" %.2f) s"
				if [[ $rep == 1 ]]; then # correctness: replica == primary image == rsync result
					local a b r
					a=$(b3sum --no-names "$PSTORE/images/$img") b=$(b3sum --no-names "$(replica_img "$g")") r=$(b3sum --no-names "$W/rsync/$g.prev")
					[[ $a == "$b" ]] || problem "section 1 $k/$c: replica latest.img differs from the primary image after replicate now --wait (nothing was writing)"
					[[ $a == "$r" ]] || die "rsync result differs from the source image ($k/$c)"
				fi
				if [[ $k == ext4 ]]; then fsfreeze -u "$W/fs-$c"; fi # frozen from the workload to here
			done
		done
		if [[ $k == ext4 ]]; then
			for c in z n; do umount "$W/fs-$c"; done
			for l in "${LOOPS[@]}"; do losetup -d "$l"; done
			LOOPS=() FSMNTS=()
		fi
	done
}

# ================================================================ 3. throttling
sec3() {
	log "section 3: throttling ($THR_BW, $THR_MIB MiB incompressible, --compress none)"
	local wf=$W/watch/thr.txt t_first t_full t_cyc t_gone size dirty
	mkimg thr.img $((THR_MIB + 4))
	enable thr thr.img --interval 15m --compress none --bandwidth "$THR_BW"
	fill thr.img "$THR_MIB" 0 41
	dirty=$(img_field thr.img dirty_bytes)
	watch_start thr "$wf"
	rnow thr
	sleep 0.2
	watch_stop
	read -r t_first t_full t_cyc t_gone size < <(watch_times "$wf")
	R[s3_dirty]=$dirty R[s3_sent]=$RN_SENT R[s3_wall]=$RN_WALL
	R[s3_slope]=$(watch_slope "$wf" "$size")
	R[s3_avg]=$(div "$size" "$(sub "$t_full" "$t_first")")
	R[s3_sent_wall]=$(div "$RN_SENT" "$RN_WALL")
	R[s3_upload_s]=$(sub "$t_full" "$t_first")
	log "throttle: cycle $(mib "$size") MiB, upload $(fmt "${R[s3_upload_s]}" %.2f) s, slope $(fmt "${R[s3_slope]}" %.0f) B/s, average $(fmt "${R[s3_avg]}" %.0f) B/s, bytes_sent/wall $(fmt "${R[s3_sent_wall]}" %.0f) B/s"
}

# ================================================================ 2. lag under steady load
sec2() {
	log "section 2: lag under 10 MB/s for $LAG_SECS s, --interval 30s"
	mkimg lag.img 1024
	enable lag lag.img --interval 30s
	local fpid spid lf=$W/lag-samples.txt c0 c1
	c0=$(grp_field lag cycles_replicated)
	fio --name=lag --filename="$MNT/lag.img" --rw=randwrite --bs=64k --direct=1 --ioengine=libaio --iodepth=4 \
		--size=1G --fallocate=none --rate=10m --time_based --runtime="$LAG_SECS" --output-format=json \
		>"$W/fio/lag.json" 2>"$W/fio/lag.err" &
	fpid=$!
	BGPIDS+=("$fpid")
	(
		trap 'exit 0' TERM
		while :; do
			sd replicate list --store "$PSTORE" --json |
				jq -r --arg t "$EPOCHREALTIME" '.[] | select(.group == "lag") | "\($t) \(.lag_seconds) \(.pending_bytes) \(.cycles_replicated) \(.health)"' || true
			sleep 2
		done
	) >"$lf" &
	spid=$!
	BGPIDS+=("$spid")
	wait "$fpid" || die "fio (lag load) failed: $(tail -5 "$W/fio/lag.err")"
	bg_done "$fpid"
	kill -TERM "$spid" 2>/dev/null || true
	wait "$spid" 2>/dev/null || true
	bg_done "$spid"
	c1=$(grp_field lag cycles_replicated)
	local -a lags
	mapfile -t lags < <(awk '{print $2}' "$lf")
	((${#lags[@]} >= 3)) || die "section 2: only ${#lags[@]} lag samples"
	R[s2_n]=${#lags[@]}
	R[s2_max]=$(maxof "${lags[@]}")
	R[s2_med]=$(median "${lags[@]}")
	R[s2_cycles]=$((c1 - c0))
	R[s2_rate]=$(jq -r '.jobs[0].write.bw_bytes' "$W/fio/lag.json")
	R[s2_health]=$(awk '{print $5}' "$lf" | sort | uniq -c | awk '{printf "%s%s×%s", sep, $2, $1; sep = ", "}')
	log "lag: median ${R[s2_med]} s, max ${R[s2_max]} s over ${R[s2_n]} samples, ${R[s2_cycles]} cycles"
}

# ---------------------------------------------------------------- run
for s in $SECTIONS; do
	case $s in
	1) sec1 ;; 2) sec2 ;; 3) sec3 ;; 4) sec4 ;;
	5) [[ -n ${APL_B3[*]} ]] || die "section 5 needs section 4 (BENCH_SECTIONS)"; sec5 ;;
	6) sec6 ;;
	*) die "unknown section $s" ;;
	esac
	alive
done

# daemon log warnings are problems too
nwarn=$(cat "$W/log/replica.log" "$PSTORE/daemon.log" | { grep -Eci 'level=(WARN|ERROR)' || true; })
if ((nwarn > 0)); then
	problem "$nwarn WARN/ERROR lines in the daemon logs, e.g.: $(cat "$W/log/replica.log" "$PSTORE/daemon.log" | { grep -Ei 'level=(WARN|ERROR)' || true; } | head -3 | cut -c1-300 | tr '\n' ' ')"
fi

# ---------------------------------------------------------------- report
REPORT=$W/report.txt
{
	echo "standin replication benchmarks — $(date -u '+%Y-%m-%d %H:%M UTC'), $(sd --version), $(nproc) CPUs, $(uname -r)"
	echo "scratch $W on $(findmnt -n -o FSTYPE --target "$W"); $([[ $QUICK == 1 ]] && echo 'QUICK run; ')reps $REPS; medians over reps; shared noisy box"
	echo
	if [[ " $SECTIONS " == *" 1 "* ]]; then
		echo "1. Bytes on the wire per dirty byte (one 'replicate now --wait' round; dirty = status dirty_bytes right before it)"
		echo "   wire = bytes_sent delta (cycle file bytes: data + headers + per-block hashes; TLS/HTTP framing not counted)."
		echo "   rsync --inplace --no-whole-file of the whole image onto a copy of the previous replica state (local, delta algorithm):"
		echo "   wire = Total bytes sent + received, literal = Literal data; 'rsync' plain, 'rsync -z' --compress-choice=zstd."
		printf '   %-24s %10s %9s %9s %9s %9s %9s %9s %9s %9s %s\n' workload "dirty MiB" "zstd" "none" rsync "rs lit" "rsync -z" "round z" "round n" "rsync t" "target (zstd <=0.5 compressible, all <=1.02)"
		for k in $S1_KINDS; do
			[[ -n ${R[s1_${k}_dirty]:-} ]] || continue
			zr=$(median ${R[s1_${k}_z_ratio]}) nr=$(median ${R[s1_${k}_n_ratio]})
			case $k in
			rand) label="rand 4K (50% compr.)" ;;
			ext4) label="ext4 cp -a $(basename "$S1_CP_SRC")" ;;
			db) label="db mix 8k/16k + log" ;;
			esac
			verdict="zstd $(mark "$zr" '<=' 0.5) 0.5, zstd $(mark "$zr" '<=' 1.02) / none $(mark "$nr" '<=' 1.02) 1.02"
			printf '   %-24s %10s %9s %9s %9s %9s %9s %8ss %8ss %8ss %s\n' "$label" \
				"$(mib "$(median ${R[s1_${k}_dirty]})")" "$(fmt "$zr" %.3f)" "$(fmt "$nr" %.4f)" \
				"$(fmt "$(median ${R[s1_${k}_rsn_wire]})" %.3f)" "$(fmt "$(median ${R[s1_${k}_rsn_lit]})" %.3f)" \
				"$(fmt "$(median ${R[s1_${k}_rsz_wire]})" %.3f)" \
				"$(fmt "$(median ${R[s1_${k}_z_wall]})" %.2f)" "$(fmt "$(median ${R[s1_${k}_n_wall]})" %.2f)" \
				"$(fmt "$(median ${R[s1_${k}_rsn_wall]})" %.2f)" "$verdict"
		done
		echo "   raw dirty blocks uncompressed = 1.000 by definition; protocol overhead of --compress none = (none - 1)."
		echo "   round z/n = wall time of 'replicate now --wait' (cut + stage + upload + verify + apply); rsync t = plain rsync wall time."
		echo
	fi
	if [[ " $SECTIONS " == *" 2 "* ]]; then
		echo "2. Replication lag under steady load (fio randwrite 64k direct --rate=10m for $LAG_SECS s on a 1 GiB image, --interval 30s, zstd)"
		printf '   achieved write rate %s MB/s; %s samples of replicate list lag_seconds every 2 s; %s cycles applied during the load; health: %s\n' \
			"$(fmt "$(div "${R[s2_rate]}" 1000000)" %.2f)" "${R[s2_n]}" "${R[s2_cycles]}" "${R[s2_health]}"
		printf '   median lag %s s, max lag %s s   target max <= 60 s (2 intervals): %s\n' \
			"$(fmt "${R[s2_med]}" %.1f)" "$(fmt "${R[s2_max]}" %.1f)" "$(mark "${R[s2_max]}" '<=' 60)"
		echo
	fi
	if [[ " $SECTIONS " == *" 3 "* ]]; then
		echo "3. Throttling accuracy (--bandwidth $THR_BW = $THR_RATE B/s, --compress none, one round of $(mib "${R[s3_dirty]}") MiB incompressible dirty data)"
		echo "   upload rate measured on the replica: size of the inbox .part file sampled every 50 ms"
		printf '   least-squares slope (10%%..90%% of the file) %s B/s: error %s%%   target within 5%%: %s\n' \
			"$(fmt "${R[s3_slope]}" %.0f)" "$(fmt "$(awk -v a="${R[s3_slope]}" -v b=$THR_RATE 'BEGIN {print (a / b - 1) * 100}')" %+.2f)" \
			"$(mark "$(awk -v a="${R[s3_slope]}" -v b=$THR_RATE 'BEGIN {d = a / b - 1; print d < 0 ? -d : d}')" '<=' 0.05)"
		printf '   whole upload: %s MiB in %s s = %s B/s (error %s%%); bytes_sent %s MiB / round wall %s s = %s B/s (includes cut, verify, apply)\n' \
			"$(mib "${R[s3_sent]}")" "$(fmt "${R[s3_upload_s]}" %.2f)" "$(fmt "${R[s3_avg]}" %.0f)" \
			"$(fmt "$(awk -v a="${R[s3_avg]}" -v b=$THR_RATE 'BEGIN {print (a / b - 1) * 100}')" %+.2f)" \
			"$(mib "${R[s3_sent]}")" "$(fmt "${R[s3_wall]}" %.2f)" "$(fmt "${R[s3_sent_wall]}" %.0f)"
		echo
	fi
	if [[ " $SECTIONS " == *" 4 "* ]]; then
		bd=$(median ${R[bl_direct]}) bb=$(median ${R[bl_buffered]})
		ab=$(div "${R[apply_base_bytes]}" "$(median ${R[apply_base_s]})")
		ao=$(div "${R[apply_overwrite_bytes]}" "$(median ${R[apply_overwrite_s]})")
		echo "4. Apply throughput on the replica ($APPLY_MIB MiB of incompressible data, --compress none)"
		echo "   apply = from the verified cycle appearing in the replica's inbox to its deletion after the commit (50 ms sampling):"
		echo "   the whole ApplyGroup (writes, hashes, undo log, fsyncs, point bookkeeping). Verification of the upload is listed apart."
		printf '   replica disk: fio seq write 1M direct %s MB/s, buffered + end_fsync %s MB/s (medians of %s runs interleaved with the applies)\n' \
			"$(fmt "$(div "$bd" 1e6)" %.0f)" "$(fmt "$(div "$bb" 1e6)" %.0f)" "$(wc -w <<<"${R[bl_direct]}")"
		printf '   %-28s %9s %9s %11s %11s %13s %s\n' cycle "apply s" "MB/s" "vs direct" "vs buffered" "verify s" "upload MB/s (unthrottled, TLS loopback)"
		printf '   %-28s %9s %9s %11s %11s %13s %s   target >= 0.8x direct: %s\n' "base (seq 0)" "$(fmt "$(median ${R[apply_base_s]})" %.2f)" \
			"$(fmt "$(div "$ab" 1e6)" %.0f)" "$(fmt "$(div "$ab" "$bd")" %.2f)x" "$(fmt "$(div "$ab" "$bb")" %.2f)x" \
			"$(fmt "$(median ${R[apply_base_verify_s]})" %.2f)" "$(fmt "$(div "$(median ${R[apply_base_upload_bps]})" 1e6)" %.0f)" "$(mark "$(div "$ab" "$bd")" '>=' 0.8)"
		printf '   %-28s %9s %9s %11s %11s %13s %s   target >= 0.8x direct: %s\n' "full overwrite (undo), x$APL_OVERWRITES" "$(fmt "$(median ${R[apply_overwrite_s]})" %.2f)" \
			"$(fmt "$(div "$ao" 1e6)" %.0f)" "$(fmt "$(div "$ao" "$bd")" %.2f)x" "$(fmt "$(div "$ao" "$bb")" %.2f)x" \
			"$(fmt "$(median ${R[apply_overwrite_verify_s]})" %.2f)" "$(fmt "$(div "$(median ${R[apply_overwrite_upload_bps]})" 1e6)" %.0f)" "$(mark "$(div "$ao" "$bd")" '>=' 0.8)"
		printf '   replica daemon CPU per round (receive over TLS + verify + apply): base %s s (user %s), overwrite %s s (user %s) = %s CPU-s per GiB of cycle\n' \
			"$(fmt "$(median ${R[apply_base_cpu]})" %.2f)" "$(fmt "$(median ${R[apply_base_user]})" %.2f)" \
			"$(fmt "$(median ${R[apply_overwrite_cpu]})" %.2f)" "$(fmt "$(median ${R[apply_overwrite_user]})" %.2f)" \
			"$(fmt "$(awk -v c="$(median ${R[apply_overwrite_cpu]})" -v b="${R[apply_overwrite_bytes]}" 'BEGIN {print c / (b / 1073741824)}')" %.2f)"
		echo "   MB/s = cycle file bytes / apply s. An overwrite apply also reads the old blocks and writes them to an undo log."
		echo "   The apply is one goroutine: read extent, write latest.img, BLAKE3 each block into hashes.bin, fdatasync at the end;"
		echo "   on this shared 2-CPU box it competes for CPU with the other tenants, the fio baseline hardly uses CPU."
		echo
	fi
	if [[ " $SECTIONS " == *" 5 "* ]]; then
		lt=$(median ${R[s5_latest]}) ot=$(median ${R[s5_old]})
		echo "5. Export an older point vs the latest ($APPLY_MIB MiB image, ${R[s5_points]} points, undo logs $(mib "${R[s5_undo]}") MiB; drop_caches before each; $REPS x each, alternating)"
		printf '   points export --point latest %s s; --point %s (oldest, every block from undo logs) %s s; ratio %s   target <= 1.5x: %s\n' \
			"$(fmt "$lt" %.2f)" "${R[s5_oldest]}" "$(fmt "$ot" %.2f)" "$(fmt "$(div "$ot" "$lt")" %.2f)x" "$(mark "$(div "$ot" "$lt")" '<=' 1.5)"
		echo "   both exports checked against BLAKE3 of the primary image at the cut"
		echo
	fi
	if ((${#MEM_ROWS[@]})); then
		echo "6. Daemon memory (process_resident_memory_bytes from --metrics; go heap in use; primary tracker = sum of status memory_bytes)"
		echo "   (MiB; heap = go_memstats_heap_inuse_bytes, includes garbage not yet collected; live = go_memstats_next_gc_bytes / 2,"
		echo "   the live heap at the last GC under GOGC=100)"
		printf '   %-50s %12s %8s %8s %12s %8s %8s %10s\n' state "replica RSS" heap live "primary RSS" heap live "tracker B"
		for row in "${MEM_ROWS[@]}"; do
			IFS='|' read -r label rr rh pr ph tm rg pg <<<"$row"
			printf '   %-50s %12s %8s %8s %12s %8s %8s %10s\n' "$label" "$(mib "$rr")" "$(mib "$rh")" "$(mib $((rg / 2)))" \
				"$(mib "$pr")" "$(mib "$ph")" "$(mib $((pg / 2)))" "$tm"
		done
		IFS='|' read -r _ rr0 rh0 pr0 ph0 _ _ _ <<<"${MEM_ROWS[0]}"
		IFS='|' read -r _ rrN rhN prN phN tmN _ _ <<<"${MEM_ROWS[-1]}"
		echo "   Extrapolation (assumptions stated):"
		echo "   - RSS is dominated by the Go runtime and transfer buffers, not by image size: idle -> last row grows replica"
		printf '     %+.1f MiB (heap %+.1f MiB), primary %+.1f MiB (heap %+.1f MiB) for %s of images.\n' \
			"$(div $((rrN - rr0)) 1048576)" "$(div $((rhN - rh0)) 1048576)" "$(div $((prN - pr0)) 1048576)" "$(div $((phN - ph0)) 1048576)" \
			"$(x=(); [[ " $SECTIONS " == *" 4 "* ]] && x+=("${APPLY_MIB} MiB dense"); [[ " $SECTIONS " == *" 6 "* ]] && x+=("${SPARSE_GIB} GiB sparse"); IFS=+; echo "${x[*]}")"
		if [[ " $SECTIONS " == *" 4 "* ]]; then
			IFS='|' read -r _ rr1 rh1 pr1 ph1 _ _ _ <<<"${MEM_ROWS[1]}"
			printf '   - naive linear upper bound from the dense image (RSS growth per GiB replicated x 1024): replica %.2f GiB/TiB, primary %.2f GiB/TiB\n' \
				"$(awk -v d=$((rr1 - rr0)) -v m="$APPLY_MIB" 'BEGIN {print d * 1024 / m * 1024 / 1073741824}')" \
				"$(awk -v d=$((pr1 - pr0)) -v m="$APPLY_MIB" 'BEGIN {print d * 1024 / m * 1024 / 1073741824}')"
			echo "     (treats the whole growth as per-byte state; most of it is buffers and uncollected garbage, so this overstates it)."
		fi
		echo "   - size-dependent state: primary = roaring dirty bitmaps (tracker column; scales with dirty blocks between cuts,"
		echo "     not with image size: a fully dirty TiB = 2^28 blocks ~ 32 MiB of bitmap at 1 bit/block);"
		echo "     replica = undo index of kept points (README: ~48 B per saved 4 KiB block -> 12 GiB per TiB of saved blocks),"
		echo "     so replica memory scales with the undo data kept (churn x retention), not with the replicated TiB."
		echo
	fi
	echo "Problems seen in standin during this run: ${#PROBLEMS[@]}"
	for p in "${PROBLEMS[@]}"; do echo "  - $p"; done
	echo "(total $(($(date +%s) - T_START)) s)"
} >"$REPORT"

mkdir -p "$RESULTS"
out_file=$RESULTS/repl-latest.txt
[[ $QUICK == 1 ]] && out_file=$RESULTS/repl-quick.txt
cp "$REPORT" "$out_file"
echo
cat "$REPORT"
echo "(written to ${out_file#"$REPO"/})"
