#!/usr/bin/env bash
# bench/seed.sh — seed benchmark (issue 4, "Benchmarks"): standin's out-of-band seed
# against borg, restic, casync and tar --sparse | zstd, side by side in one run, on the five
# raw images of five cloned Debian systems (vm1..vm5.img, 4 GiB sparse ext4 each; DS=DIR).
#
# Measures, for every tool:
#   - seed / repository size: APPARENT bytes of everything in the repository / seed
#     directory (du -sb: sum of file sizes, indexes and manifests included); disk usage
#     (du -B1, allocated blocks) is listed next to it
#   - export wall time: median of N runs (N=3, BENCH_QUICK=1 -> 1). Before every timed run
#     the page cache is dropped (sync; echo 3 > /proc/sys/vm/drop_caches), so every tool
#     reads the images cold. Only the data step is timed: borg create, restic backup,
#     casync make (5 calls over one store, summed), tar | zstd, standin seed export
#     (including its cut); repository init is not timed.
#   - peak RSS (/usr/bin/time -v); tar | zstd = tar + zstd; casync = max of its 5 calls;
#     standin: the CLI and the mount daemon the export runs in (VmHWM, reset before the
#     export through /proc/PID/clear_refs)
# standin also: seed verify, seed import on a replica (throughput = allocated bytes of the
# five images / wall time of the import), BLAKE3 of the imported images (first run).
# "Moved files": marginal cost of vm5 (vm1's files in another layout) = size of a seed /
# repository of {vm1, vm5} minus one of {vm1}, for standin, borg and restic (one run each).
#
# The table goes to stdout and to bench/results/seed-<date>.txt (quick runs:
# seed-<date>-quick.txt); logs of every tool run are in BENCH_DIR/log (kept with BENCH_KEEP=1).
#
# Usage: sudo bash bench/seed.sh           (or make bench-seed; part of make bench)
# Environment:
#   BENCH_QUICK=1        one run per tool instead of three
#   BENCH_REPS=N         runs per tool (default 3; quick 1)
#   BENCH_TOOLS="..."    subset of "borg restic casync tar standin" (default all)
#   BENCH_MOVED=0        skip the moved-files runs
#   DS=DIR               dataset (default /var/tmp/standin-dataset): vm1..vm5.img, raw
#                        images of five cloned Debian systems
#   BENCH_DIR=DIR        scratch (default /var/tmp/standin-seed-bench; ~9 GiB free needed);
#                        removed at exit unless BENCH_KEEP=1 (kept after a failure)
#   BENCH_STANDIN=PATH   standin binary (default bin/standin, built when missing);
#                        a private copy is used, so rebuilding bin/standin meanwhile is safe
#   BENCH_PORT=N         replica port (default random 20000-39999, checked free)
#
# Needs root (drop_caches, FUSE), /dev/fuse, borg, restic, casync, zstd, GNU time, jq, b3sum:
#   apt-get install -y borgbackup restic casync zstd time jq b3sum
# Exit status: 0 when every requested tool ran; 1 when a baseline failed (abort) or the
# standin part failed (the baseline table is still printed and written, standin n/a).
set -Eeuo pipefail
umask 022
export LC_ALL=C

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QUICK=${BENCH_QUICK:-0}
if [[ $QUICK == 1 ]]; then REPS=${BENCH_REPS:-1}; else REPS=${BENCH_REPS:-3}; fi
DS=${DS:-/var/tmp/standin-dataset}
W=${BENCH_DIR:-/var/tmp/standin-seed-bench}
TOOLS=${BENCH_TOOLS:-"borg restic casync tar standin"}
MOVED=${BENCH_MOVED:-1}
IMAGES=(vm1.img vm2.img vm3.img vm4.img vm5.img)
RESULTS=$REPO/bench/results
LOGD=$W/log
BIN=$W/standin # private copy of the standin binary
T_START=$(date +%s)

# targets (issue 4)
TGT_SEED_MIB=360 TGT_SPEEDUP=3 TGT_IMPORT_MBS=300 TGT_MEM_MIB_PER_TIB=512

log() { printf '[seed %4ds] %s\n' "$(($(date +%s) - T_START))" "$*" >&2; }
die() {
	printf '\nseed bench: FAILED: %s\n' "$*" >&2
	exit 1
}
on_err() { die "command failed (exit $1) at bench/seed.sh line $2: $3"; }
trap 'on_err $? $LINENO "$BASH_COMMAND"' ERR

# ---------------------------------------------------------------- small helpers
sub() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.6f\n", a - b}'; }
div() { awk -v a="$1" -v b="$2" 'BEGIN {if (a == "nan" || b == "nan" || a == "" || b == "" || b == 0) print "nan"; else printf "%.6g\n", a / b}'; }
median() { printf '%s\n' "$@" | sort -g | awk 'NF {a[++n] = $1} END {if (n == 0) print "nan"; else if (n % 2) print a[(n + 1) / 2]; else print (a[n / 2] + a[n / 2 + 1]) / 2}'; }
minof() { printf '%s\n' "$@" | sort -g | head -1; }
maxof() { printf '%s\n' "$@" | sort -g | tail -1; }
fmt() { awk -v v="$1" -v f="$2" 'BEGIN {if (v == "nan" || v == "") print "n/a"; else printf f, v}'; }
mib() { awk -v b="$1" 'BEGIN {if (b == "nan" || b == "") print "n/a"; else printf "%.1f", b / 1048576}'; }
kmib() { awk -v k="$1" 'BEGIN {if (k == "nan" || k == "") print "n/a"; else printf "%.1f", k / 1024}'; } # KiB -> MiB
mark() { # VALUE OP TARGET -> met / MISSED / n/a
	awk -v v="$1" -v t="$3" -v op="$2" 'BEGIN {if (v == "nan" || v == "") {print "n/a"; exit}; ok = (op == ">=") ? (v >= t) : (v <= t); print ok ? "met" : "MISSED"}'
}
has_tool() { [[ " $TOOLS " == *" $1 "* ]]; }
drop_caches() {
	sync
	echo 3 >/proc/sys/vm/drop_caches
}
apparent_bytes() { du -sb "$@" | awk '{s += $1} END {print s + 0}'; } # sum of file sizes
disk_bytes() { du -s -B1 "$@" | awk '{s += $1} END {print s + 0}'; }  # allocated blocks
rss_of() { awk -F': *' '/Maximum resident set size/ {print $2}' "$1"; } # KiB, from time -v
proc_kb() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }   # PID VmRSS|VmHWM -> KiB

# timed TAG CMD...: run CMD under /usr/bin/time -v (stdout/stderr in $LOGD/TAG.out/.err);
# sets T_WALL (s) and T_RSS (KiB). Dies when CMD fails.
timed() {
	local tag=$1 t0 t1
	shift
	t0=$EPOCHREALTIME
	if ! /usr/bin/time -v -o "$LOGD/$tag.time" "$@" >"$LOGD/$tag.out" 2>"$LOGD/$tag.err"; then
		die "$tag: '$*' failed: $(tail -5 "$LOGD/$tag.err" | tr '\n' ' ')"
	fi
	t1=$EPOCHREALTIME
	T_WALL=$(sub "$t1" "$t0") T_RSS=$(rss_of "$LOGD/$tag.time")
}

# ---------------------------------------------------------------- preflight
[[ $(id -u) == 0 ]] || die "run as root (drop_caches, FUSE mounts)"
for t in $TOOLS; do
	case $t in borg | restic | casync | tar | standin) ;; *) die "unknown tool '$t' in BENCH_TOOLS (borg restic casync tar standin)" ;; esac
done
need=(jq du awk b3sum)
[[ -x /usr/bin/time ]] || die "/usr/bin/time missing: apt-get install -y time"
has_tool borg && need+=(borg)
has_tool restic && need+=(restic)
has_tool casync && need+=(casync)
has_tool tar && need+=(tar zstd)
has_tool standin && need+=(findmnt mountpoint ss)
for t in "${need[@]}"; do
	command -v "$t" >/dev/null || die "$t not installed (apt-get install -y borgbackup restic casync zstd time jq b3sum)"
done
if has_tool standin; then [[ -c /dev/fuse ]] || die "/dev/fuse missing"; fi
for img in "${IMAGES[@]}"; do
	[[ -f $DS/$img ]] || die "$DS/$img missing: DS must hold vm1..vm5.img, raw images of five cloned Debian systems (DS=$DS)"
done
[[ $REPS =~ ^[1-9][0-9]*$ ]] || die "BENCH_REPS must be a positive integer"

# ---------------------------------------------------------------- scratch and cleanup
SD_FAILED="" # why the standin part failed (empty: fine or not run)
PROBLEMS=()  # standin problems seen during the run (printed with the report)
problem() {
	PROBLEMS+=("$*")
	log "PROBLEM: $*"
}

# Leftovers of the standin part (its subshells clean up after themselves; this catches what
# an interrupted one left): daemons running our private binary, FUSE mounts under $W.
sweep() {
	local p m
	if [[ -x $BIN ]]; then
		for p in /proc/[0-9]*; do # processes running our private copy: only this script starts it
			[[ $(readlink "$p/exe" 2>/dev/null) == "$BIN" ]] || continue
			p=${p#/proc/}
			log "cleanup: stopping leftover standin daemon $p"
			kill -TERM "$p" 2>/dev/null || true
			for ((i = 0; i < 100; i++)); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
			kill -KILL "$p" 2>/dev/null || true
		done
	fi
	for m in $(findmnt -rn -o TARGET 2>/dev/null | grep "^$W/" | sort -r); do
		log "cleanup: lazy-unmounting leftover $m"
		umount -l "$m" || true
	done
}
cleanup() {
	local rc=$?
	trap - ERR EXIT INT TERM
	set +e
	sweep
	if [[ $rc != 0 && -f $W/.standin-seed-bench ]]; then
		echo "seed bench: kept $W for inspection (logs in $LOGD)" >&2
	elif [[ ${BENCH_KEEP:-0} != 1 && -f $W/.standin-seed-bench ]]; then
		rm -rf "$W"
	fi
	exit "$rc"
}

if [[ -d $W ]]; then
	[[ -f $W/.standin-seed-bench ]] || die "$W exists and is not a seed bench directory; set BENCH_DIR"
	if findmnt -rn -o TARGET | grep -q "^$W/"; then
		die "something is still mounted under $W (a previous run?): $(findmnt -rn -o TARGET | grep "^$W/" | tr '\n' ' ')"
	fi
	rm -rf "$W"
fi
mkdir -p "$W" "$LOGD"
touch "$W/.standin-seed-bench"
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# tool state lives in the scratch dir: no caches in ~root, removed with it
export BORG_BASE_DIR=$W/borg-home BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
export RESTIC_PASSWORD=standin-seed-bench RESTIC_CACHE_DIR=$W/restic-cache

# ---------------------------------------------------------------- dataset
ALLOC=0 APPARENT=0
declare -A IMG_ALLOC=()
for img in "${IMAGES[@]}"; do
	IMG_ALLOC[$img]=$(disk_bytes "$DS/$img")
	ALLOC=$((ALLOC + IMG_ALLOC[$img]))
	APPARENT=$((APPARENT + $(stat -c %s "$DS/$img")))
done
log "dataset $DS: ${#IMAGES[@]} images, $(mib "$APPARENT") MiB apparent, $(mib "$ALLOC") MiB allocated; $REPS run(s) per tool; tools: $TOOLS"

# ---------------------------------------------------------------- results
declare -A R=() # key -> value(s); lists are space-separated, one value per run

record() { # TOOL SIZE_DIR...: after a timed run: time, RSS, sizes
	local tool=$1
	shift
	R[${tool}_s]+="$T_WALL " R[${tool}_rss]+="$T_RSS "
	R[${tool}_bytes]=$(apparent_bytes "$@") R[${tool}_disk]=$(disk_bytes "$@")
	log "  $tool: $(mib "${R[${tool}_bytes]}") MiB (disk $(mib "${R[${tool}_disk]}") MiB) in $(fmt "$T_WALL" %.1f) s, peak RSS $(kmib "$T_RSS") MiB"
}

# ================================================================ baselines
# Each writes to a fresh repository under $W/<tool>; the images are read from $DS.
run_borg() { # TAG REPO IMAGE...
	local tag=$1 repo=$2
	shift 2
	rm -rf "$repo" "$BORG_BASE_DIR"
	borg init -e none "$repo" >"$LOGD/$tag-init.log" 2>&1 || die "borg init failed: $(tail -3 "$LOGD/$tag-init.log")"
	drop_caches
	timed "$tag" borg create --compression zstd "$repo::seed" "${@/#/$DS/}"
}
run_restic() { # TAG REPO IMAGE...
	local tag=$1 repo=$2
	shift 2
	rm -rf "$repo" "$RESTIC_CACHE_DIR"
	restic init --repo "$repo" >"$LOGD/$tag-init.log" 2>&1 || die "restic init failed: $(tail -3 "$LOGD/$tag-init.log")"
	drop_caches
	timed "$tag" restic backup --repo "$repo" --host standin-seed-bench "${@/#/$DS/}"
}
run_casync() { # TAG REPO IMAGE...: one casync make per image, all into one store
	local tag=$1 repo=$2 img s=0 r=0
	shift 2
	rm -rf "$repo"
	mkdir -p "$repo/store" "$repo/index"
	drop_caches
	for img in "$@"; do
		timed "$tag-${img%.img}" casync make --store="$repo/store" "$repo/index/${img%.img}.caibx" "$DS/$img"
		s=$(awk -v a="$s" -v b="$T_WALL" 'BEGIN {print a + b}')
		if ((T_RSS > r)); then r=$T_RSS; fi
	done
	T_WALL=$s T_RSS=$r
}
run_tar() { # TAG OUTFILE IMAGE...: tar --sparse | zstd -T0; RSS = tar + zstd
	local tag=$1 out=$2 t0 t1
	shift 2
	rm -f "$out"
	drop_caches
	t0=$EPOCHREALTIME
	if ! /usr/bin/time -v -o "$LOGD/$tag-tar.time" tar --sparse -cf - -C "$DS" "$@" 2>"$LOGD/$tag-tar.err" |
		/usr/bin/time -v -o "$LOGD/$tag-zstd.time" zstd -q -T0 >"$out" 2>"$LOGD/$tag-zstd.err"; then
		die "$tag: tar --sparse | zstd -T0 failed: $(cat "$LOGD/$tag-tar.err" "$LOGD/$tag-zstd.err" | tail -5 | tr '\n' ' ')"
	fi
	t1=$EPOCHREALTIME
	T_WALL=$(sub "$t1" "$t0") T_RSS=$(($(rss_of "$LOGD/$tag-tar.time") + $(rss_of "$LOGD/$tag-zstd.time")))
}

bench_borg() {
	run_borg "borg-$1" "$W/borg" "${IMAGES[@]}"
	record borg "$W/borg"
}
bench_restic() {
	run_restic "restic-$1" "$W/restic" "${IMAGES[@]}"
	record restic "$W/restic"
}
bench_casync() {
	run_casync "casync-$1" "$W/casync" "${IMAGES[@]}"
	record casync "$W/casync"
}
bench_tar() {
	run_tar "tar-$1" "$W/tar.tar.zst" "${IMAGES[@]}"
	record tar "$W/tar.tar.zst"
}

# ================================================================ standin
# Runs in subshells (sd_run): a failure of standin is recorded, its daemons and mounts are
# torn down, and the baselines go on. Results come back as "key value" lines in $W/standin.kv.
sd() { "$BIN" "$@"; }
sd_put() { echo "$1 $2" >>"$W/standin.kv"; }

# sd_setup NAME IMAGE...: a replica daemon and a primary daemon (images copied into the
# primary store before it starts), paired, one group per VM with --initial seed (the way
# scripts/demo.sh and bench/repl.sh start, pair and wait for them). Sets SDW PS RS MNT PORT RPID DPID.
sd_setup() {
	local name=$1 img i out token
	shift
	SDW=$W/sd-$name PS=$W/sd-$name/primary RS=$W/sd-$name/replica MNT=$W/sd-$name/mnt
	rm -rf "$SDW"
	mkdir -p "$PS/images" "$MNT" "$SDW/log"
	for img in "$@"; do cp --sparse=always "$DS/$img" "$PS/images/$img"; done
	for ((i = 0; i < 50; i++)); do
		PORT=${BENCH_PORT:-$((20000 + RANDOM % 20000))}
		ss -Hltn "sport = :$PORT" | grep -q . || break
		[[ -z ${BENCH_PORT:-} ]] || die "port $PORT is in use; set BENCH_PORT"
	done

	"$BIN" serve --store "$RS" --listen "127.0.0.1:$PORT" >"$SDW/log/replica.log" 2>&1 & # not via sd(): $! must be the daemon
	RPID=$!
	for ((i = 0; i < 150; i++)); do
		kill -0 "$RPID" 2>/dev/null || die "replica daemon exited during start-up: $(tail -5 "$SDW/log/replica.log" | tr '\n' ' ')"
		[[ -S $RS/control.sock ]] && sd status --store "$RS" --json >/dev/null 2>&1 && break
		sleep 0.2
	done
	sd status --store "$RS" --json >/dev/null 2>&1 || die "replica daemon not ready after 30 s: $(tail -5 "$SDW/log/replica.log" | tr '\n' ' ')"

	out=$(sd mount --store "$PS" --background "$MNT" 2>&1) || die "standin mount --store $PS --background $MNT failed: $out"
	DPID=$(sd status --store "$PS" --json | jq -er .pid) || die "primary status --json has no pid"
	mountpoint -q "$MNT" || die "$MNT is not mounted after standin mount --background"
	token=$(sd pair token --store "$RS" 2>/dev/null) || die "standin pair token --store $RS failed"
	out=$(printf '%s\n' "$token" | sd pair join --store "$PS" --token-file - 2>&1) || die "standin pair join failed: $out"
	for img in "$@"; do
		out=$(sd replicate enable --store "$PS" --group "${img%.img}" --images "$img" --replica "127.0.0.1:$PORT" --initial seed 2>&1) ||
			die "standin replicate enable --group ${img%.img} --images $img --initial seed failed: $out"
	done
	log "  standin [$name]: replica pid $RPID on 127.0.0.1:$PORT, primary pid $DPID at $MNT, paired, ${#@} group(s) enabled with --initial seed"
}

sd_teardown() { # stop what sd_setup started (idempotent; also runs on failure)
	local i
	trap - ERR
	set +e
	if [[ -n ${MNT:-} ]] && mountpoint -q "$MNT"; then
		sd unmount "$MNT" >>"$SDW/log/unmount.log" 2>&1 || sd unmount --lazy "$MNT" >>"$SDW/log/unmount.log" 2>&1 || umount -l "$MNT"
	fi
	if [[ -n ${DPID:-} ]]; then
		for ((i = 0; i < 150; i++)); do kill -0 "$DPID" 2>/dev/null || break; sleep 0.2; done
		if kill -0 "$DPID" 2>/dev/null; then
			log "  standin: primary daemon $DPID still running 30 s after unmount; SIGTERM"
			kill -TERM "$DPID"
			for ((i = 0; i < 50; i++)); do kill -0 "$DPID" 2>/dev/null || break; sleep 0.2; done
			kill -KILL "$DPID" 2>/dev/null
		fi
		DPID=""
	fi
	[[ -n ${MNT:-} ]] && mountpoint -q "$MNT" && umount -l "$MNT"
	if [[ -n ${RPID:-} ]]; then
		kill -TERM "$RPID" 2>/dev/null
		for ((i = 0; i < 150; i++)); do kill -0 "$RPID" 2>/dev/null || break; sleep 0.2; done
		if kill -0 "$RPID" 2>/dev/null; then
			log "  standin: replica daemon $RPID ignored SIGTERM for 30 s; SIGKILL"
			kill -KILL "$RPID"
		fi
		wait "$RPID" 2>/dev/null
		RPID=""
	fi
	if [[ -n ${SDW:-} && -d $SDW ]]; then
		mkdir -p "$LOGD/$(basename "$SDW")"
		cp -r "$SDW/log/." "$PS/daemon.log" "$LOGD/$(basename "$SDW")/" 2>/dev/null
		[[ ${BENCH_KEEP:-0} == 1 ]] || rm -rf "$SDW"
	fi
}

# sd_run FUNCTION ARGS...: run a standin step in a subshell with its own error handling and
# teardown. Returns its status; the reason of a failure is in SD_FAILED.
sd_run() {
	local rc
	: >"$W/standin.err"
	trap - ERR
	set +e
	(
		set -Eeuo pipefail
		die() {
			[[ -s $W/standin.err ]] || printf '%s\n' "$*" >"$W/standin.err" # the first failure is the reason
			log "standin FAILED: $*"
			exit 1
		}
		trap 'die "command failed (exit $?) at bench/seed.sh line $LINENO: $BASH_COMMAND"' ERR
		trap sd_teardown EXIT
		trap 'exit 130' INT
		trap 'exit 143' TERM
		"$@"
	)
	rc=$?
	set -e
	trap 'on_err $? $LINENO "$BASH_COMMAND"' ERR
	((rc == 130 || rc == 143)) && exit "$rc"
	if ((rc != 0)); then
		SD_FAILED=$(cat "$W/standin.err")
		[[ -n $SD_FAILED ]] || SD_FAILED="exit status $rc"
	fi
	return "$rc"
}

# sd_json FILE: the last JSON object standin printed (the completion summary of --json)
sd_json() { jq -cs 'map(objects) | last // {}' "$1" 2>/dev/null || echo '{}'; }

# sd_export TAG SEEDDIR ARGS...: timed seed export (cold cache) inside the mount daemon;
# sets T_WALL, T_RSS (CLI), SD_HWM / SD_RSS0 (daemon, KiB)
sd_export() {
	local tag=$1 seed=$2 hwm_ok=1
	shift 2
	drop_caches
	echo 5 >"/proc/$DPID/clear_refs" 2>/dev/null || hwm_ok=0 # reset VmHWM to the current RSS
	SD_RSS0=$(proc_kb "$DPID" VmRSS)
	timed "$tag" "$BIN" seed export --store "$PS" "$@" --to "$seed" --parity 0 --json
	kill -0 "$DPID" 2>/dev/null || die "primary daemon died during seed export: $(tail -5 "$PS/daemon.log" 2>/dev/null | tr '\n' ' ')"
	SD_HWM=$(proc_kb "$DPID" VmHWM)
	((hwm_ok)) || log "  (clear_refs not supported: daemon peak is VmHWM since start)"
}

sd_rep() { # REP: the full path once: setup, export, verify, import, check, teardown
	local rep=$1 seed j img f want got nok=0 nbad=0 hwm_ok=1
	sd_setup "rep$rep" "${IMAGES[@]}"
	seed=$SDW/seed
	sd_export "standin-export-$rep" "$seed" --all
	cp "$LOGD/standin-export-$rep.out" "$LOGD/standin-export-$rep.json"
	j=$(sd_json "$LOGD/standin-export-$rep.out")
	[[ -d $seed ]] || die "seed export exited 0 but $seed does not exist"
	sd_put export_s "$T_WALL"
	sd_put export_cli_rss "$T_RSS"
	sd_put export_d_rss0 "$SD_RSS0"
	sd_put export_d_hwm "$SD_HWM"
	sd_put seed_bytes "$(apparent_bytes "$seed")"
	sd_put seed_disk "$(disk_bytes "$seed")"
	sd_put seed_files "$(find "$seed" -type f | wc -l)"
	sd_put json_seed_bytes "$(jq -r '.seed_bytes // "nan"' <<<"$j")"
	sd_put json_alloc "$(jq -r '.allocated_bytes // "nan"' <<<"$j")"
	sd_put json_ratio "$(jq -r '.ratio // "nan"' <<<"$j")"
	sd_put json_seconds "$(jq -r '.seconds // "nan"' <<<"$j")"
	[[ $j != '{}' ]] || echo "export --json printed no JSON object (stdout in $LOGD/standin-export-$rep.out)" >>"$W/standin.notes"
	log "  standin export: $(mib "$(apparent_bytes "$seed")") MiB in $(fmt "$T_WALL" %.1f) s; CLI RSS $(kmib "$T_RSS") MiB, daemon VmHWM $(kmib "$SD_HWM") MiB (RSS before $(kmib "$SD_RSS0") MiB); summary: $j"

	timed "standin-verify-$rep" "$BIN" seed verify "$seed"
	sd_put verify_s "$T_WALL"
	sd_put verify_rss "$T_RSS"

	drop_caches
	echo 5 >"/proc/$RPID/clear_refs" 2>/dev/null || hwm_ok=0
	local r_rss0
	r_rss0=$(proc_kb "$RPID" VmRSS)
	timed "standin-import-$rep" "$BIN" seed import --store "$RS" --json "$seed"
	kill -0 "$RPID" 2>/dev/null || die "replica daemon died during seed import: $(tail -5 "$SDW/log/replica.log" | tr '\n' ' ')"
	sd_put import_s "$T_WALL"
	sd_put import_cli_rss "$T_RSS"
	sd_put import_d_rss0 "$r_rss0"
	sd_put import_d_hwm "$(proc_kb "$RPID" VmHWM)"
	log "  standin import: $(fmt "$T_WALL" %.1f) s = $(fmt "$(div "$ALLOC" "$(awk -v t="$T_WALL" 'BEGIN {print t * 1e6}')")" %.0f) MB/s of allocated data; CLI RSS $(kmib "$T_RSS") MiB, replica daemon VmHWM $(kmib "$(proc_kb "$RPID" VmHWM)") MiB"

	if [[ $rep == 1 ]]; then # correctness: the imported images are the source images
		for img in "${IMAGES[@]}"; do
			f=$(ls "$RS"/groups/"${img%.img}"/images/*/latest.img 2>/dev/null | head -1)
			if [[ -z $f ]]; then
				echo "after seed import: no $RS/groups/${img%.img}/images/*/latest.img" >>"$W/standin.notes"
				nbad=$((nbad + 1))
				continue
			fi
			want=$(cat "$DS/$img.b3" 2>/dev/null || b3sum --no-names "$DS/$img")
			got=$(b3sum --no-names "$f")
			if [[ $want == "$got" ]]; then nok=$((nok + 1)); else
				nbad=$((nbad + 1))
				echo "imported ${img%.img} differs from $DS/$img (BLAKE3 $got, want $want)" >>"$W/standin.notes"
			fi
			sd_put import_alloc_${img%.img} "$(disk_bytes "$f")"
		done
		sd_put check_ok "$nok"
		sd_put check_bad "$nbad"
		log "  standin import check: $nok/${#IMAGES[@]} imported images equal to the source (BLAKE3)"
	fi
}

sd_moved() { # SETNAME IMAGE...: seed size of just these images
	local name=$1
	shift
	sd_setup "moved-$name" "$@"
	sd_export "standin-moved-$name" "$SDW/seed" --all
	sd_put "moved_${name}" "$(apparent_bytes "$SDW/seed")"
	sd_put "moved_${name}_hwm" "$SD_HWM"
	sd_put "moved_${name}_rss0" "$SD_RSS0"
	log "  standin moved [$*]: $(mib "$(apparent_bytes "$SDW/seed")") MiB"
}

if has_tool standin; then
	src=${BENCH_STANDIN:-$REPO/bin/standin}
	if [[ -z ${BENCH_STANDIN:-} && ! -x $src ]]; then
		log "building bin/standin"
		make -C "$REPO" build >&2 || die "make build failed"
	fi
	[[ -x $src ]] || die "standin binary $src missing"
	cp "$src" "$BIN"
	SD_VERSION=$("$BIN" --version 2>/dev/null | awk '{print $NF}')
	log "standin $SD_VERSION ($src, private copy $BIN)"
	"$BIN" seed --help >/dev/null 2>&1 || log "note: this standin build has no 'seed' command; the standin part will fail at the export"
fi

# ================================================================ run
for ((rep = 1; rep <= REPS; rep++)); do
	log "run $rep/$REPS"
	for t in $TOOLS; do
		case $t in
		borg) bench_borg "$rep" ;;
		restic) bench_restic "$rep" ;;
		casync) bench_casync "$rep" ;;
		tar) bench_tar "$rep" ;;
		standin)
			[[ -z $SD_FAILED ]] || continue
			sd_run sd_rep "$rep" || problem "standin (run $rep): $SD_FAILED"
			;;
		esac
	done
done
rm -rf "$W/borg" "$W/restic" "$W/casync" "$W/tar.tar.zst" # free the space before the moved-files runs

if [[ $MOVED == 1 ]]; then
	log "moved files: {vm1} vs {vm1, vm5} (one run each)"
	for t in borg restic; do
		has_tool "$t" || continue
		"run_$t" "$t-moved-1" "$W/$t-m1" vm1.img
		R[${t}_m1]=$(apparent_bytes "$W/$t-m1")
		"run_$t" "$t-moved-15" "$W/$t-m15" vm1.img vm5.img
		R[${t}_m15]=$(apparent_bytes "$W/$t-m15")
		rm -rf "$W/$t-m1" "$W/$t-m15"
		log "  $t: {vm1} $(mib "${R[${t}_m1]}") MiB, {vm1, vm5} $(mib "${R[${t}_m15]}") MiB"
	done
	if has_tool standin && [[ -z $SD_FAILED ]]; then
		sd_run sd_moved m1 vm1.img || problem "standin moved files {vm1}: $SD_FAILED"
		[[ -n $SD_FAILED ]] || sd_run sd_moved m15 vm1.img vm5.img || problem "standin moved files {vm1, vm5}: $SD_FAILED"
	fi
fi

# standin results: "key value" lines -> S[key] = space-separated values
declare -A S=()
if [[ -f $W/standin.kv ]]; then
	while read -r k v; do S[$k]+="$v "; done <"$W/standin.kv"
fi
if [[ -f $W/standin.notes ]]; then
	while IFS= read -r l; do problem "$l"; done <"$W/standin.notes"
fi
if has_tool standin && [[ -n ${S[export_s]:-} ]]; then
	R[standin_s]=${S[export_s]} R[standin_rss]=""
	for ((i = 1; i <= $(wc -w <<<"${S[export_s]}"); i++)); do # daemon peak + CLI peak, per run
		R[standin_rss]+="$(($(cut -d' ' -f$i <<<"${S[export_d_hwm]}") + $(cut -d' ' -f$i <<<"${S[export_cli_rss]}"))) "
	done
	R[standin_bytes]=$(echo ${S[seed_bytes]} | awk '{print $NF}') R[standin_disk]=$(echo ${S[seed_disk]} | awk '{print $NF}')
	R[standin_m1]=$(echo ${S[moved_m1]:-} | awk '{print $NF}') R[standin_m15]=$(echo ${S[moved_m15]:-} | awk '{print $NF}')
fi

# ================================================================ report
last() { echo ${1:-} | awk '{print $NF}'; }
REPORT=$W/report.txt
{
	echo "standin seed benchmark — $(date -u '+%Y-%m-%d %H:%M UTC'), standin ${SD_VERSION:-n/a}, $(nproc) CPUs, $(uname -r), shared noisy box"
	echo "dataset $DS: ${IMAGES[*]} — $(mib "$APPARENT") MiB apparent, $(mib "$ALLOC") MiB allocated (du -B1)"
	for img in "${IMAGES[@]}"; do printf '%s %s MiB; ' "${img%.img}" "$(mib "${IMG_ALLOC[$img]}")"; done
	echo
	echo "$([[ $QUICK == 1 ]] && echo 'QUICK run; ')$REPS run(s) per tool, interleaved (run k of every tool, then run k+1); time = median [min-max]."
	echo "Page cache dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before every timed run: every tool reads the images cold."
	echo "size = apparent bytes of every file in the repository / seed dir (du -sb; data, indexes, manifests, config);"
	echo "disk = allocated blocks (du -B1). Timed: only the data step (repository init excluded). RSS = /usr/bin/time -v peak."
	echo
	v=()
	if has_tool borg; then v+=("$(borg --version)"); fi
	if has_tool restic; then v+=("$(restic version | cut -d' ' -f1-2)"); fi
	if has_tool casync; then v+=("casync $(casync --version 2>&1 | awk 'NR == 1 {print $2}')"); fi
	if has_tool tar; then v+=("$(tar --version | head -1)" "zstd $(zstd -V | grep -o 'v[0-9.]*')"); fi
	if has_tool standin; then v+=("standin ${SD_VERSION:-n/a}"); fi
	echo "Versions: $(IFS=,; echo "${v[*]}" | sed 's/,/, /g')"
	printf '%-40s %9s %9s %10s %26s %10s %10s %9s\n' tool "size MiB" "disk MiB" "standin/x" "export s" "x vs this" "alloc MB/s" "RSS MiB"
	sdb=${R[standin_bytes]:-nan} sdt=$(median ${R[standin_s]:-})
	for t in borg restic casync tar standin; do
		has_tool "$t" || continue
		case $t in
		borg) label="borg create --compression zstd (-e none)" ;;
		restic) label="restic backup (zstd auto, encrypted)" ;;
		casync) label="casync make x5, one store (zstd)" ;;
		tar) label="tar --sparse | zstd -T0" ;;
		standin) label="standin seed export --parity 0" ;;
		esac
		if [[ -z ${R[${t}_s]:-} ]]; then
			printf '%-40s %9s\n' "$label" "n/a (failed: see problems)"
			continue
		fi
		tm=$(median ${R[${t}_s]})
		printf '%-40s %9s %9s %10s %26s %10s %10s %9s\n' "$label" "$(mib "${R[${t}_bytes]}")" "$(mib "${R[${t}_disk]}")" \
			"$(fmt "$(div "$sdb" "${R[${t}_bytes]}")" %.3f)" \
			"$(fmt "$tm" %.1f) [$(fmt "$(minof ${R[${t}_s]})" %.1f)-$(fmt "$(maxof ${R[${t}_s]})" %.1f)]" \
			"$(fmt "$(div "$tm" "$sdt")" %.2fx)" "$(fmt "$(div "$ALLOC" "$(awk -v t="$tm" 'BEGIN {print t * 1e6}')")" %.0f)" \
			"$(kmib "$(median ${R[${t}_rss]})")"
	done
	echo "standin/x = standin seed size / this tool's size; x vs this = this tool's export time / standin's (standin speedup)."
	echo "casync: sum of its 5 make calls (cache dropped once before them), RSS = max of them; tar | zstd: RSS = tar + zstd;"
	echo "standin: RSS = mount daemon peak during the export (VmHWM) + CLI peak (the export runs in the daemon)."
	echo
	if has_tool standin; then
		echo "standin"
		if [[ -n ${S[export_s]:-} ]]; then
			bt=$(median ${R[borg_s]:-})
			seedb=$(last "${S[seed_bytes]}")
			imp=$(median ${S[import_s]:-})
			imps=$(div "$ALLOC" "$(awk -v t="$imp" 'BEGIN {print t * 1e6}')")
			printf '  seed (--parity 0): %s MiB apparent (%s MiB disk, %s files); export --json: seed_bytes %s MiB, allocated_bytes %s MiB, ratio %s, seconds %s\n' \
				"$(mib "$seedb")" "$(mib "$(last "${S[seed_disk]}")")" "$(last "${S[seed_files]}")" "$(mib "$(last "${S[json_seed_bytes]}")")" \
				"$(mib "$(last "${S[json_alloc]}")")" "$(fmt "$(last "${S[json_ratio]}")" %.2f)" "$(fmt "$(last "${S[json_seconds]}")" %.1f)"
			printf '  target seed <= %s MiB before parity: %s\n' "$TGT_SEED_MIB" "$(mark "$(div "$seedb" 1048576)" '<=' "$TGT_SEED_MIB")"
			printf '  export %s s (median of %s); borg %s s -> standin %s faster   target >= %sx: %s\n' "$(fmt "$sdt" %.1f)" "$(wc -w <<<"${S[export_s]}")" \
				"$(fmt "$bt" %.1f)" "$(fmt "$(div "$bt" "$sdt")" %.2fx)" "$TGT_SPEEDUP" "$(mark "$(div "$bt" "$sdt")" '>=' "$TGT_SPEEDUP")"
			printf '  verify %s s (median)\n' "$(fmt "$(median ${S[verify_s]:-})" %.1f)"
			if [[ -n ${S[import_s]:-} ]]; then
				printf '  import %s s (median of %s, cold cache) = %s MB/s of reconstructed allocated data (%s MB / time)   target >= %s MB/s: %s\n' \
					"$(fmt "$imp" %.1f)" "$(wc -w <<<"${S[import_s]}")" "$(fmt "$imps" %.0f)" "$(fmt "$(div "$ALLOC" 1e6)" %.0f)" "$TGT_IMPORT_MBS" "$(mark "$imps" '>=' "$TGT_IMPORT_MBS")"
				[[ -n ${S[check_ok]:-} ]] && printf '  imported images equal to the source (BLAKE3, run 1): %s/%s; allocated on the replica: %s MiB\n' \
					"$(last "${S[check_ok]}")" "${#IMAGES[@]}" "$(mib "$(for img in "${IMAGES[@]}"; do last "${S[import_alloc_${img%.img}]:-0}"; done | awk '{s += $1} END {print s}')")"
			fi
			dh=$(median ${S[export_d_hwm]}) d0=$(median ${S[export_d_rss0]})
			printf '  memory, export: mount daemon peak %s MiB (VmHWM, reset at the start; RSS before %s MiB -> +%s MiB), CLI peak %s MiB\n' \
				"$(kmib "$dh")" "$(kmib "$d0")" "$(kmib "$(sub "$dh" "$d0")")" "$(kmib "$(median ${S[export_cli_rss]})")"
			if [[ -n ${S[import_s]:-} ]]; then
				rh=$(median ${S[import_d_hwm]}) r0=$(median ${S[import_d_rss0]})
				printf '  memory, import: replica daemon peak %s MiB (RSS before %s MiB -> +%s MiB), CLI peak %s MiB\n' \
					"$(kmib "$rh")" "$(kmib "$r0")" "$(kmib "$(sub "$rh" "$r0")")" "$(kmib "$(median ${S[import_cli_rss]})")"
			fi
			if [[ -n ${S[moved_m1_hwm]:-} && -n ${S[moved_m15_hwm]:-} ]]; then
				printf '  export daemon peak by seed size: {vm1} (%s MiB allocated) %s MiB, {vm1, vm5} (%s MiB) %s MiB, all five (%s MiB) %s MiB\n' \
					"$(mib "${IMG_ALLOC[vm1.img]}")" "$(kmib "$(last "${S[moved_m1_hwm]}")")" \
					"$(mib "$((${IMG_ALLOC[vm1.img]} + ${IMG_ALLOC[vm5.img]}))")" "$(kmib "$(last "${S[moved_m15_hwm]}")")" "$(mib "$ALLOC")" "$(kmib "$dh")"
			fi
			printf '  target <= %s MiB for a 1 TiB seed: not measurable here (%s MiB allocated); if the export growth (+%s MiB) were all\n' \
				"$TGT_MEM_MIB_PER_TIB" "$(mib "$ALLOC")" "$(kmib "$(sub "$dh" "$d0")")"
			printf '  per-byte state, 1 TiB would need %s MiB (a naive linear upper bound, not a measurement)\n' \
				"$(awk -v g="$(sub "$dh" "$d0")" -v a="$ALLOC" 'BEGIN {printf "%.0f", g * 1024 / a * 1099511627776 / 1048576}')"
		else
			echo "  n/a: ${SD_FAILED:-not run}"
		fi
		echo
	fi
	if [[ $MOVED == 1 ]]; then
		echo "Moved files: vm5 = vm1's files in another layout; marginal cost = size({vm1, vm5}) - size({vm1}) (one run each)"
		printf '  %-10s %12s %16s %18s\n' tool "{vm1} MiB" "{vm1, vm5} MiB" "vm5 marginal MiB"
		for t in standin borg restic; do
			has_tool "$t" || continue
			a=${R[${t}_m1]:-} b=${R[${t}_m15]:-}
			if [[ -z $a || -z $b ]]; then
				printf '  %-10s %12s\n' "$t" "n/a"
				continue
			fi
			printf '  %-10s %12s %16s %18s\n' "$t" "$(mib "$a")" "$(mib "$b")" "$(mib $((b - a)))"
		done
		echo
	fi
	echo "Problems seen in standin during this run: ${#PROBLEMS[@]}"
	for p in "${PROBLEMS[@]}"; do echo "  - $p"; done
	echo "(total $(($(date +%s) - T_START)) s; logs: $LOGD$([[ ${BENCH_KEEP:-0} == 1 ]] || echo ', removed at exit unless BENCH_KEEP=1'))"
} >"$REPORT"

mkdir -p "$RESULTS"
out_file=$RESULTS/seed-$(date +%Y-%m-%d).txt
if [[ $QUICK == 1 ]]; then out_file=$RESULTS/seed-$(date +%Y-%m-%d)-quick.txt; fi
cp "$REPORT" "$out_file"
echo
cat "$REPORT"
echo "(written to ${out_file#"$REPO"/})"
if has_tool standin && [[ -n $SD_FAILED ]]; then
	echo "seed bench: the standin part failed: $SD_FAILED" >&2
	exit 1
fi
