#!/usr/bin/env bash
# bench/run.sh — standin benchmarks (DESIGN.md §8), run by `make bench`.
#
# Prints one results table (also written to bench/results/latest.txt):
#   1. fio data path: raw ext4 vs go-fuse loopback vs qemu-storage-daemon FUSE
#      export vs standin (tracking) vs standin with GOMAXPROCS=8; targets are
#      interleaved within every repetition, ratios are medians of per-repetition
#      ratios (runs of the same repetition are back to back).
#   2. extra bytes written on the primary per guest byte (tracking state, cycle).
#   3. tracker memory per TiB (bench/trackermem).
#   4. cut + staging of 1 GiB of dirty data vs the time to read it.
#
# Environment:
#   BENCH_QUICK=1            smoke run: 3 s runs, 1 repetition, 5 s workloads (~3-4 min);
#                            written to bench/results/quick.txt instead of latest.txt
#   BENCH_SECONDS=N          seconds per fio run in section 1 (default 10)
#   BENCH_REPS=N             repetitions of sections 1 and 4 (default 3)
#   BENCH_WORKLOAD_SECONDS=N fio seconds per workload in section 2 (default 20)
#   BENCH_DIR=DIR            scratch directory (default /var/tmp/standin-bench;
#                            not tmpfs: O_DIRECT); removed at exit unless BENCH_KEEP=1
#   BENCH_SECTIONS="1 2 3 4" which sections to run
#
# Needs root, /dev/fuse, fio, jq, qemu-storage-daemon, go. The box is shared and
# noisy: read the ratios, not the absolute numbers.
set -Eeuo pipefail
umask 022

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QUICK=${BENCH_QUICK:-0}
if [[ $QUICK == 1 ]]; then
	SECS=${BENCH_SECONDS:-3} REPS=${BENCH_REPS:-1} WL_SECS=${BENCH_WORKLOAD_SECONDS:-5}
else
	SECS=${BENCH_SECONDS:-10} REPS=${BENCH_REPS:-3} WL_SECS=${BENCH_WORKLOAD_SECONDS:-20}
fi
SECTIONS=${BENCH_SECTIONS:-"1 2 3 4"}
W=${BENCH_DIR:-/var/tmp/standin-bench}
SIZE_MIB=1024
IMG=x.img
RESULTS=$REPO/bench/results
T_START=$(date +%s)

log() { printf '[bench %4ds] %s\n' "$(($(date +%s) - T_START))" "$*" >&2; }
die() {
	printf '\nbench: FAILED: %s\n' "$*" >&2
	exit 1
}
trap 'die "command failed (exit $?) at bench/run.sh line $LINENO: $BASH_COMMAND"' ERR

[[ $(id -u) == 0 ]] || die "run as root (FUSE mounts, drop_caches)"
for t in fio jq qemu-storage-daemon go findmnt mountpoint; do
	command -v "$t" >/dev/null || die "$t not installed"
done
[[ -c /dev/fuse ]] || die "/dev/fuse missing"

# ---------------------------------------------------------------- cleanup
declare -a PIDS=() MOUNTS=()
declare -A DPID=()   # name -> pid of a daemon we started
PROBLEMS=()          # standin problems seen during the run (printed in the report)

is_mounted() { findmnt -n --mountpoint "$1" >/dev/null 2>&1; }

cleanup() {
	local rc=$?
	trap - ERR EXIT INT TERM
	set +e
	local pid m i
	for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
	for pid in "${PIDS[@]}"; do
		for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
		if kill -0 "$pid" 2>/dev/null; then
			echo "bench: pid $pid ignored SIGTERM for 20 s; killing it" >&2
			kill -KILL "$pid" 2>/dev/null
		fi
	done
	for m in "${MOUNTS[@]}"; do
		if is_mounted "$m"; then
			echo "bench: lazy-unmounting leftover $m" >&2
			umount -l "$m"
		fi
	done
	if [[ ${BENCH_KEEP:-0} != 1 && -d $W && -f $W/.standin-bench ]]; then
		rm -rf "$W"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- setup
if [[ -d $W ]]; then
	[[ -f $W/.standin-bench ]] || die "$W exists and is not a bench directory; set BENCH_DIR"
	if findmnt -rn -o TARGET | grep -q "^$W/"; then
		die "something is still mounted under $W (a previous run?): $(findmnt -rn -o TARGET | grep "^$W/" | tr '\n' ' ')"
	fi
	rm -rf "$W"
fi
mkdir -p "$W"/{log,fio}
touch "$W/.standin-bench"
[[ $(stat -f -c %T "$W") != tmpfs ]] || die "$W is on tmpfs, which refuses O_DIRECT; set BENCH_DIR"

if [[ ! -x $REPO/bin/standin ]]; then
	log "building bin/standin"
	make -C "$REPO" build >&2
fi
# Use a private copy: other people may rebuild bin/standin while this runs.
BIN=$W/standin
cp "$REPO/bin/standin" "$BIN"
log "building bench/trackermem"
(cd "$REPO" && go build -o "$W/trackermem" ./bench/trackermem)

# ---------------------------------------------------------------- daemons
# start_standin NAME STORE MNT [ENV=VAL...] [-- FLAGS...]
start_standin() {
	local name=$1 store=$2 mnt=$3 pid i
	shift 3
	local -a envs=() flags=()
	while (($#)); do
		if [[ $1 == -- ]]; then
			shift
			flags=("$@")
			break
		fi
		envs+=("$1")
		shift
	done
	mkdir -p "$mnt" "$store"
	# Owner-only, as a store must be (mk_image made it with the umask's
	# mode; the daemon would warn and tighten it).
	chmod 0700 "$store"
	env "${envs[@]}" "$BIN" mount --store "$store" "${flags[@]}" "$mnt" >"$W/log/$name.log" 2>&1 &
	pid=$!
	PIDS+=("$pid")
	MOUNTS+=("$mnt")
	DPID[$name]=$pid
	for ((i = 0; i < 150; i++)); do
		kill -0 "$pid" 2>/dev/null || die "standin daemon $name exited during start-up: $(tail -5 "$W/log/$name.log")"
		if "$BIN" status --store "$store" --json >/dev/null 2>&1 && is_mounted "$mnt"; then
			log "standin $name ready (pid $pid${envs:+, ${envs[*]}}${flags:+, ${flags[*]}})"
			return
		fi
		sleep 0.2
	done
	die "standin daemon $name not ready after 30 s: $(tail -5 "$W/log/$name.log")"
}

start_loopback() { # NAME DIR MNT
	local name=$1 dir=$2 mnt=$3 pid i
	mkdir -p "$mnt"
	"$BIN" debug loopback "$dir" "$mnt" >"$W/log/$name.log" 2>&1 &
	pid=$!
	PIDS+=("$pid")
	MOUNTS+=("$mnt")
	DPID[$name]=$pid
	for ((i = 0; i < 150; i++)); do
		kill -0 "$pid" 2>/dev/null || die "loopback $name exited during start-up: $(tail -5 "$W/log/$name.log")"
		if is_mounted "$mnt" && [[ -f $mnt/$IMG ]]; then
			log "loopback $name ready (pid $pid)"
			return
		fi
		sleep 0.2
	done
	die "loopback $name not ready after 30 s"
}

QSD_MODE=
start_qsd() { # MODE (on|off = cache.direct)
	local mode=$1 pid i
	[[ $QSD_MODE == "$mode" ]] && return
	[[ -n $QSD_MODE ]] && stop_daemon qsd
	: >"$W/qsd.export" # the export's mountpoint is a regular file
	qemu-storage-daemon \
		--blockdev "driver=file,node-name=f,filename=$W/qsd.img,cache.direct=$mode" \
		--export "type=fuse,id=e,node-name=f,mountpoint=$W/qsd.export,writable=on" \
		>"$W/log/qsd.log" 2>&1 &
	pid=$!
	PIDS+=("$pid")
	MOUNTS+=("$W/qsd.export")
	DPID[qsd]=$pid
	for ((i = 0; i < 150; i++)); do
		kill -0 "$pid" 2>/dev/null || die "qemu-storage-daemon exited during start-up: $(tail -5 "$W/log/qsd.log")"
		if is_mounted "$W/qsd.export" && [[ $(stat -c %s "$W/qsd.export") == $((SIZE_MIB << 20)) ]]; then
			QSD_MODE=$mode
			log "qemu-storage-daemon ready (pid $pid, cache.direct=$mode)"
			return
		fi
		sleep 0.2
	done
	die "qemu-storage-daemon not ready after 30 s: $(tail -5 "$W/log/qsd.log")"
}

stop_daemon() { # NAME: SIGTERM, wait, check it exited cleanly and unmounted
	local name=$1 pid=${DPID[$1]} i rc=0
	kill -TERM "$pid" 2>/dev/null || true
	for ((i = 0; i < 150; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
	if kill -0 "$pid" 2>/dev/null; then
		kill -KILL "$pid" 2>/dev/null || true
		PROBLEMS+=("$name (pid $pid) did not exit within 30 s of SIGTERM; killed")
	fi
	wait "$pid" || rc=$?
	if ((rc != 0)); then
		PROBLEMS+=("$name (pid $pid) exited with status $rc after SIGTERM: $(tail -3 "$W/log/$name.log" | tr '\n' ' ')")
	fi
	unset "DPID[$name]"
	[[ $name == qsd ]] && QSD_MODE=
	return 0
}

alive() { # NAME: die if the daemon crashed
	local pid=${DPID[$1]}
	kill -0 "$pid" 2>/dev/null || die "$1 (pid $pid) died: $(tail -20 "$W/log/$1.log")"
}

# check_path NAME FRONT BACK: a 4 KiB direct write through FRONT reaches BACK.
check_path() {
	local name=$1 front=$2 back=$3
	head -c 4096 /dev/urandom >"$W/probe"
	dd if="$W/probe" of="$front" bs=4096 seek=3 oflag=direct conv=notrunc status=none ||
		die "$name: probe write through $front failed"
	cmp -s <(dd if="$back" bs=4096 skip=3 count=1 status=none) "$W/probe" ||
		die "$name: data written through $front did not reach $back"
}

st_status() { # STORE FIELD
	"$BIN" status --store "$1" --json | jq -er --arg n "$IMG" ".images[] | select(.name == \$n) | .$2"
}

# cycle_cut STORE -> JSON of the one cycle
cycle_cut() {
	local out
	out=$("$BIN" cycle cut --store "$1" --images "$IMG" --json) || die "cycle cut of $1 failed: $out"
	jq -e '.[0] | select(.bytes > 0)' <<<"$out" || die "cycle cut of $1 returned no data: $out"
}

drop_caches() {
	sync
	echo 3 >/proc/sys/vm/drop_caches
}

now() { date +%s.%N; }
cpu_secs() { # PID -> user+system CPU seconds so far
	awk -v hz="$(getconf CLK_TCK)" '{sub(/^.*\) /, ""); print ($12 + $13) / hz}' "/proc/$1/stat"
}

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR] = $1} END {if (NR == 0) print "nan"; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2}'; }
div() { awk -v a="$1" -v b="$2" 'BEGIN {if (b == 0) print "nan"; else printf "%.6g\n", a / b}'; }
fmt() { awk -v v="$1" -v f="$2" 'BEGIN {printf f, v}'; }
mark() { # VALUE OP TARGET -> met/missed
	awk -v v="$1" -v t="$3" -v op="$2" 'BEGIN {ok = (op == ">=") ? (v >= t) : (v <= t); print ok ? "met" : "MISSED"}'
}
human() { awk -v b="$1" 'BEGIN {split("B KiB MiB GiB TiB", u); i = 1; while (b >= 1024 && i < 5) {b /= 1024; i++}; f = (i == 1) ? "%d %s" : "%.2f %s"; printf f, b, u[i]}'; }

# fio_run TAG FILE JOBARGS...: runs fio, JSON in $W/fio/TAG.json; dies on any fio error
FIO_COMMON=(--name=bench --size=${SIZE_MIB}M --fallocate=none --group_reporting --output-format=json)
fio_run() {
	local tag=$1 file=$2
	shift 2
	local json=$W/fio/$tag.json
	fio "${FIO_COMMON[@]}" --filename="$file" "$@" >"$json" 2>"$W/fio/$tag.err" ||
		die "fio $tag on $file failed: $(tail -5 "$W/fio/$tag.err") $(tail -c 500 "$json")"
	jq -e '.jobs[0].error == 0' "$json" >/dev/null || die "fio $tag reported error $(jq '.jobs[0].error' "$json")"
}

REPORT=$W/report.txt
: >"$REPORT"
out() { printf '%s\n' "$*" >>"$REPORT"; }

# ---------------------------------------------------------------- images
log "creating a ${SIZE_MIB} MiB image of random data"
head -c $((SIZE_MIB << 20)) /dev/urandom >"$W/seed.img"
mk_image() { # PATH: a full (non-sparse) copy of the seed image
	mkdir -p "$(dirname "$1")"
	cp --sparse=never "$W/seed.img" "$1"
}

# ================================================================ section 1
declare -A R=()
JOBS=(seqwr randwr randrd bufwr)
declare -A JOBNAME=([seqwr]="seq write 1M QD8 direct" [randwr]="rand write 4K QD16 direct"
	[randrd]="rand read 4K QD16 direct" [bufwr]="seq write 1M buffered, fsync/256M")
declare -A UNIT=([seqwr]=MB/s [randwr]=IOPS [randrd]=IOPS [bufwr]=MB/s)
declare -A JOBARGS=(
	[seqwr]="--rw=write --bs=1M --iodepth=8 --ioengine=libaio --direct=1"
	[randwr]="--rw=randwrite --bs=4k --iodepth=16 --ioengine=libaio --direct=1 --norandommap --randrepeat=0"
	[randrd]="--rw=randread --bs=4k --iodepth=16 --ioengine=libaio --direct=1 --norandommap --randrepeat=0"
	[bufwr]="--rw=write --bs=1M --ioengine=psync --direct=0 --fsync=256 --invalidate=0"
)
TARGETS=(raw loopback qsd standin standin8)
declare -A TNAME=([raw]="raw ext4" [loopback]="go-fuse loopback" [qsd]="qsd FUSE export"
	[standin]="standin (tracking)" [standin8]="standin GOMAXPROCS=8")
declare -A TFILE=([raw]=$W/raw/$IMG [loopback]=$W/mnt-lb/$IMG [qsd]=$W/qsd.export
	[standin]=$W/mnt-st/$IMG [standin8]=$W/mnt-st8/$IMG)

metric() { # JOB JSONFILE
	case $1 in
	seqwr | bufwr) jq -e '.jobs[0].write.bw_bytes / 1e6' "$2" ;;
	randwr) jq -e '.jobs[0].write.iops' "$2" ;;
	randrd) jq -e '.jobs[0].read.iops' "$2" ;;
	esac
}

section1() {
	log "section 1: fio data path, $REPS × $SECS s per job and target"
	mk_image "$W/raw/$IMG"
	mk_image "$W/lb/$IMG"
	mk_image "$W/qsd.img"
	mk_image "$W/st/images/$IMG"
	mk_image "$W/st8/images/$IMG"
	sync
	start_loopback loopback "$W/lb" "$W/mnt-lb"
	start_standin standin "$W/st" "$W/mnt-st"
	start_standin standin8 "$W/st8" "$W/mnt-st8" GOMAXPROCS=8
	start_qsd on
	check_path loopback "${TFILE[loopback]}" "$W/lb/$IMG"
	check_path qsd "${TFILE[qsd]}" "$W/qsd.img"
	local w0 w1 t
	for t in standin standin8; do
		w0=$(st_status "$W/${t/standin/st}" writes)
		check_path "$t" "${TFILE[$t]}" "$W/${t/standin/st}/images/$IMG"
		w1=$(st_status "$W/${t/standin/st}" writes)
		((w1 > w0)) || die "$t: a write through the mount was not tracked (writes $w0 -> $w1)"
	done
	local rep job v
	for ((rep = 1; rep <= REPS; rep++)); do
		for job in "${JOBS[@]}"; do
			if [[ $job == bufwr ]]; then start_qsd off; else start_qsd on; fi
			for t in "${TARGETS[@]}"; do
				sync
				sleep 0.5
				# shellcheck disable=SC2086
				fio_run "s1-$job-$t-$rep" "${TFILE[$t]}" --time_based --runtime="$SECS" ${JOBARGS[$job]}
				[[ $t == raw ]] || alive "$t"
				v=$(metric "$job" "$W/fio/s1-$job-$t-$rep.json") || die "no $job result for $t"
				awk -v v="$v" 'BEGIN {exit !(v > 0)}' || die "$t $job: fio measured $v ${UNIT[$job]}"
				R[$job,$t,$rep]=$v
				log "rep $rep $job $t: $(fmt "$v" %.0f) ${UNIT[$job]}"
			done
		done
	done
	# Tracking really happened on the standin targets.
	local commits=()
	for t in standin standin8; do
		v=$(st_status "$W/${t/standin/st}" writes)
		((v > 1000)) || die "$t: status reports only $v tracked writes after the fio runs"
		commits+=("$t: $v writes, $(st_status "$W/${t/standin/st}" intent_commits) write-intent commits")
	done
	stop_daemon qsd
	stop_daemon loopback
	stop_daemon standin
	stop_daemon standin8
	rm -rf "$W/raw" "$W/lb" "$W/qsd.img" "$W/st" "$W/st8"

	out "1. fio data path: 1 GiB preallocated file, $SECS s time-based runs, median of $REPS repetitions;"
	out "   targets run back to back in each repetition (raw, loopback, qsd, standin, standin GOMAXPROCS=8);"
	out "   ratios = median over repetitions of the ratio within one repetition. qsd: qemu-storage-daemon"
	out "   $(qemu-storage-daemon --version | head -1 | awk '{print $3}') --export type=fuse, cache.direct=on for direct jobs, off for the buffered one."
	out ""
	local line rs r
	line=$(printf '%-34s %-5s' "job" "unit")
	for t in "${TARGETS[@]}"; do line+=$(printf ' %22s' "${TNAME[$t]}"); done
	out "$line"
	for job in "${JOBS[@]}"; do
		line=$(printf '%-34s %-5s' "${JOBNAME[$job]}" "${UNIT[$job]}")
		for t in "${TARGETS[@]}"; do
			local vals=() ratios=()
			for ((rep = 1; rep <= REPS; rep++)); do
				vals+=("${R[$job,$t,$rep]}")
				ratios+=("$(div "${R[$job,$t,$rep]}" "${R[$job,raw,$rep]}")")
			done
			v=$(median "${vals[@]}")
			if [[ $t == raw ]]; then
				line+=$(printf ' %22s' "$(fmt "$v" %.0f)")
			else
				line+=$(printf ' %22s' "$(fmt "$v" %.0f) ($(fmt "$(median "${ratios[@]}")" %.2f)x)")
			fi
		done
		out "$line"
	done
	out ""
	out "   tracked by the standin daemons during section 1: ${commits[0]}; ${commits[1]}"
	out ""
	out "   tracking cost and comparison (median of per-repetition ratios):"
	line=$(printf '%-34s %-20s %-20s %-20s %-20s' "job" "standin/loopback" "standin/qsd" "gmp8/loopback" "gmp8/qsd")
	out "$line"
	out "$(printf '%-34s %-20s %-20s %-20s %-20s' "" "(target >= 0.90)" "(target >= 1.0)" "(target >= 0.90)" "(target >= 1.0)")"
	for job in "${JOBS[@]}"; do
		line=$(printf '%-34s' "${JOBNAME[$job]}")
		for pair in standin:loopback:0.90 standin:qsd:1.0 standin8:loopback:0.90 standin8:qsd:1.0; do
			IFS=: read -r a b tgt <<<"$pair"
			rs=()
			for ((rep = 1; rep <= REPS; rep++)); do rs+=("$(div "${R[$job,$a,$rep]}" "${R[$job,$b,$rep]}")"); done
			r=$(median "${rs[@]}")
			line+=$(printf ' %-20s' "$(fmt "$r" %.2f) $(mark "$r" ">=" "$tgt")")
		done
		out "$line"
	done
	out ""
}

# ================================================================ section 2
section2() {
	log "section 2: extra bytes written on the primary, $WL_SECS s per workload"
	local S=$W/s2 M=$W/mnt-s2
	mk_image "$S/images/$IMG"
	sync
	start_standin s2 "$S" "$M"
	cycle_cut "$S" >/dev/null # the pre-filled image registers fully dirty: cut its base cycle first
	out "2. Extra bytes written on the primary: fio on the standin mount over a 1 GiB pre-filled image,"
	out "   $WL_SECS s each; guest bytes = fio's written bytes; tracking bytes = delta of tracking_bytes_written"
	out "   (write-intent pages + dirty-map checkpoints) over the fio run; cycle = the cut right after it."
	out ""
	out "$(printf '%-28s %12s %13s %-24s %12s %12s %-12s %8s' workload "guest bytes" "tracking B" "tracking/guest (<=10%)" "dirty bytes" "cycle bytes" cycle/guest "commits")"
	local wl tb0 tb1 ic0 ic1 g dirty cyc tr
	for wl in randwr seqwr; do
		tb0=$(st_status "$S" tracking_bytes_written)
		ic0=$(st_status "$S" intent_commits)
		# shellcheck disable=SC2086
		fio_run "s2-$wl" "$M/$IMG" --time_based --runtime="$WL_SECS" ${JOBARGS[$wl]}
		alive s2
		g=$(jq -e '.jobs[0].write.io_bytes' "$W/fio/s2-$wl.json")
		((g > 0)) || die "section 2: fio wrote $g bytes"
		tb1=$(st_status "$S" tracking_bytes_written)
		ic1=$(st_status "$S" intent_commits)
		dirty=$(st_status "$S" dirty_bytes)
		cyc=$(cycle_cut "$S" | jq -e .bytes)
		tr=$(awk -v a=$((tb1 - tb0)) -v b="$g" 'BEGIN {printf "%.4f", 100 * a / b}')
		out "$(printf '%-28s %12s %13s %-24s %12s %12s %-12s %8s' "${JOBNAME[$wl]}" "$(human "$g")" "$(human $((tb1 - tb0)))" \
			"$tr% $(mark "$tr" "<=" 10)" "$(human "$dirty")" "$(human "$cyc")" \
			"$(fmt "$(div "$cyc" "$g")" %.3f)" "$((ic1 - ic0))")"
		log "section 2 $wl: guest $g tracking $((tb1 - tb0)) cycle $cyc"
		S2[$wl]="$g $((tb1 - tb0)) $cyc"
	done
	stop_daemon s2
	rm -rf "$S"
	out ""
}

# ================================================================ section 3
section3() {
	log "section 3: tracker memory per TiB"
	"$W/trackermem" -dir "$W/trackermem.d" -json >"$W/trackermem.json" 2>"$W/log/trackermem.log" ||
		die "trackermem failed: $(tail -5 "$W/log/trackermem.log")"
	[[ $(wc -l <"$W/trackermem.json") == 3 ]] || die "trackermem printed $(wc -l <"$W/trackermem.json") results, want 3"
	out "3. Tracker memory per TiB (bench/trackermem: sparse 1 TiB image, marks only, 64 concurrent markers;"
	out "   memory = status memory_bytes (roaring dirty map); heap = Go HeapInuse delta after GC; live = HeapAlloc delta)"
	out ""
	out "$(printf '%-44s %12s %16s %-22s %16s' case "dirty blocks" "memory MiB/TiB" "heap MiB/TiB (<=64)" "live MiB/TiB")"
	local c desc
	while read -r line; do
		c=$(jq -r .case <<<"$line")
		case $c in
		random1pct) desc="random 4 KiB writes at 1% of blocks" ;;
		alternate64) desc="every other block of 64 GiB, x16 per TiB" ;;
		seqfull) desc="sequential full TiB, 1 MiB marks" ;;
		*) desc=$c ;;
		esac
		local mem heap live worst
		mem=$(jq -r '.memory_bytes_per_tib / 1048576' <<<"$line")
		heap=$(jq -r '.heap_inuse_per_tib / 1048576' <<<"$line")
		live=$(jq -r '.heap_alloc_delta_bytes * .scale_to_tib / 1048576' <<<"$line")
		worst=$(awk -v a="$mem" -v b="$heap" 'BEGIN {print (a > b) ? a : b}')
		out "$(printf '%-44s %12s %16s %-22s %16s' "$desc" "$(jq -r .dirty_blocks <<<"$line")" "$(fmt "$mem" %.2f)" \
			"$(fmt "$heap" %.2f) $(mark "$worst" "<=" 64)" "$(fmt "$live" %.2f)")"
	done <"$W/trackermem.json"
	out ""
}

# ================================================================ section 4
section4() {
	log "section 4: cut + staging of 1 GiB vs reading it, $REPS repetitions"
	local -A S4=()
	local mode
	for mode in zstd plain; do
		mkdir -p "$W/s4$mode/images"
		truncate -s $((SIZE_MIB << 20)) "$W/s4$mode/images/$IMG" # sparse: registers clean
	done
	start_standin s4zstd "$W/s4zstd" "$W/mnt-s4zstd"
	start_standin s4plain "$W/s4plain" "$W/mnt-s4plain" -- --compress=false
	local rep cache t0 t1 c0 c1 tcat tcut cj back
	for ((rep = 1; rep <= REPS; rep++)); do
		for cache in cold warm; do
			for mode in zstd plain; do
				back=$W/s4$mode/images/$IMG
				fio_run "s4-$mode-$cache-$rep" "$W/mnt-s4$mode/$IMG" --rw=write --bs=1M --iodepth=8 --ioengine=libaio \
					--direct=1 --refill_buffers --buffer_compress_percentage=50 --buffer_compress_chunk=4k
				alive "s4$mode"
				[[ $(st_status "$W/s4$mode" dirty_bytes) == $((SIZE_MIB << 20)) ]] ||
					die "s4$mode: dirty_bytes $(st_status "$W/s4$mode" dirty_bytes) after writing ${SIZE_MIB} MiB"
				if [[ $cache == cold ]]; then drop_caches; else
					sync
					cat "$back" >/dev/null
				fi
				t0=$(now)
				cat "$back" >/dev/null
				t1=$(now)
				tcat=$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')
				[[ $cache == cold ]] && drop_caches
				c0=$(cpu_secs "${DPID[s4$mode]}")
				t0=$(now)
				cj=$(cycle_cut "$W/s4$mode")
				t1=$(now)
				c1=$(cpu_secs "${DPID[s4$mode]}")
				tcut=$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')
				[[ $(jq -e .data_blocks <<<"$cj") -gt 0 ]] || die "s4$mode cut staged no data blocks: $cj"
				S4[$mode,$cache,$rep]="$tcat $tcut $(jq -e .bytes <<<"$cj") $(awk -v a="$c0" -v b="$c1" 'BEGIN {print b - a}')"
				log "rep $rep $mode $cache: cat ${tcat}s cut ${tcut}s (stage_time $(jq -r .stage_time <<<"$cj"), daemon CPU $(awk -v a="$c0" -v b="$c1" 'BEGIN {print b - a}') s) cycle $(jq -e .bytes <<<"$cj") B"
			done
		done
	done
	stop_daemon s4zstd
	stop_daemon s4plain
	rm -rf "$W/s4zstd" "$W/s4plain"

	out "4. Cut + staging of 1 GiB of dirty data (fio, 50% compressible) vs reading the backing file with cat;"
	out "   cold = drop_caches before cat and before the cut; warm = file in page cache (shows the CPU part)."
	out "   median of $REPS; cut time = wall time of 'standin cycle cut' (returns when the cycle file is durable);"
	out "   daemon CPU = user+system seconds the daemon used during the cut (2 CPUs: at most 2 per wall second)."
	out ""
	out "$(printf '%-22s %-5s %8s %8s %-20s %12s %10s %16s' daemon cache "cat s" "cut s" "cut/cat (<=2.0)" "cycle bytes" "cycle/1GiB" "daemon CPU s")"
	local a c r b cs cu rs bs cp cpus
	for mode in zstd plain; do
		for cache in cold warm; do
			cs=() cu=() rs=() bs=() cpus=()
			for ((rep = 1; rep <= REPS; rep++)); do
				read -r a c b cp <<<"${S4[$mode,$cache,$rep]}"
				cs+=("$a") cu+=("$c") rs+=("$(div "$c" "$a")") bs+=("$b") cpus+=("$cp")
			done
			r=$(median "${rs[@]}")
			b=$(median "${bs[@]}")
			out "$(printf '%-22s %-5s %8s %8s %-20s %12s %10s %16s' \
				"$([[ $mode == zstd ]] && echo "default (zstd)" || echo "--compress=false")" "$cache" \
				"$(fmt "$(median "${cs[@]}")" %.2f)" "$(fmt "$(median "${cu[@]}")" %.2f)" \
				"$(fmt "$r" %.2f) $([[ $cache == cold ]] && mark "$r" "<=" 2.0 || echo "(info)")" \
				"$(human "$b")" "$(fmt "$(div "$b" $((SIZE_MIB << 20)))" %.3f)" "$(fmt "$(median "${cpus[@]}")" %.1f)")"
		done
	done
	out ""
}

declare -A S2=()
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
for s in $SECTIONS; do
	case $s in
	1) section1 ;;
	2) section2 ;;
	3) section3 ;;
	4) section4 ;;
	*) die "unknown section $s" ;;
	esac
done
LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)

# Daemon logs: errors, panics and warnings the benchmark did not cause on purpose.
for f in "$W"/log/*.log; do
	[[ -s $f ]] || continue
	while read -r l; do PROBLEMS+=("$(basename "$f" .log): $l"); done < <({ grep -E 'panic|level=ERROR|fatal|level=WARN' "$f" || true; } | head -5)
done

{
	echo "standin benchmarks — $(date -u +'%Y-%m-%d %H:%M UTC'), $("$BIN" --version 2>/dev/null | head -1), $(uname -r), $(nproc) CPUs"
	echo "$([[ $QUICK == 1 ]] && echo 'QUICK SMOKE RUN — not for comparison. ')load average at start $LOAD0, at end $LOAD1 (shared box: compare ratios, not absolutes)"
	echo
	cat "$REPORT"
	if ((${#PROBLEMS[@]})); then
		echo "problems seen:"
		printf '  - %s\n' "${PROBLEMS[@]}"
	else
		echo "problems seen: none (no daemon errors/warnings logged, every daemon exited cleanly on SIGTERM)"
	fi
	echo "total time: $(($(date +%s) - T_START)) s"
} >"$W/final.txt"
mkdir -p "$RESULTS"
# A smoke run must not replace the last real results.
if [[ $QUICK == 1 ]]; then cp "$W/final.txt" "$RESULTS/quick.txt"; else cp "$W/final.txt" "$RESULTS/latest.txt"; fi
echo
cat "$W/final.txt"
