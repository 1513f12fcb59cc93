#!/usr/bin/env bash
# Runs every Go fuzz target of the module for FUZZTIME each (default 4s) and
# prints the executions per target. Targets are discovered, so new ones are
# picked up: packages with a "func Fuzz" in a _test.go file, then
# `go test -list '^Fuzz'` in each.
#
#   FUZZTIME=60s bash scripts/fuzz.sh          # every target, 60 s each
#   bash scripts/fuzz.sh ./dedup/ FuzzIndex     # only these (package, target regexp)
#
# FUZZ_PARALLEL sets the fuzzing workers per target (default 2). A crasher is
# written to PACKAGE/testdata/fuzz/TARGET/ by go test; it then runs as a
# regular test case in every `go test` of the package. Exit status 1 if any
# target failed.
set -uo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
FUZZTIME=${FUZZTIME:-4s}
PAR=${FUZZ_PARALLEL:-2}
only_pkg=${1:-}
only_target=${2:-.}

if [ -n "$only_pkg" ]; then
	pkgs=$only_pkg
else
	pkgs=$(grep -rl --include='*_test.go' -E '^func Fuzz[A-Za-z0-9_]*\(f \*testing\.F\)' . |
		grep -Ev '^\./(integration|bench)/' | xargs -r -n1 dirname | sort -u | sed 's|$|/|')
fi

out=$(mktemp)
trap 'rm -f "$out"' EXIT
fail=0
total=0
rows=()
for pkg in $pkgs; do
	targets=$($GO test -list '^Fuzz' "$pkg" 2>/dev/null | grep -E '^Fuzz' | grep -E "$only_target" || true)
	for t in $targets; do
		start=$(date +%s)
		run() { $GO test -run '^$' -fuzz "^${t}\$" -fuzztime "$FUZZTIME" -fuzzminimizetime 10x -parallel "$PAR" "$pkg" >"$out" 2>&1; }
		run
		rc=$?
		retried=
		tries=1
		while [ $rc -ne 0 ] && [ $tries -lt 4 ] && ! grep -qi 'failing input written to' "$out"; do
			# A failure without an input is Go 1.26's fuzz coordinator racing
			# its own -fuzztime deadline ("context deadline exceeded" right at
			# the deadline, fixed in Go 1.27; seen on about one target in ten
			# on a loaded 2-core box): shown and run again, up to 3 times. A
			# failure with an input is a finding and fails at once.
			echo "---- $pkg $t failed without a failing input; output, then another run:"
			grep -v '^fuzz: elapsed' "$out" | tail -20
			run
			rc=$?
			tries=$((tries + 1))
			retried=" (run $tries times)"
		done
		secs=$(($(date +%s) - start))
		execs=$(grep -oE 'execs: [0-9]+' "$out" | tail -1 | grep -oE '[0-9]+')
		execs=${execs:-0}
		total=$((total + execs))
		if [ $rc -eq 0 ]; then
			res=ok$retried
		else
			res=FAIL
			fail=1
			log=${FUZZ_LOGDIR:-${TMPDIR:-/tmp}}/fuzz-$t.log
			cp "$out" "$log"
			echo "---- $pkg $t failed (full output: $log):"
			grep -v '^fuzz: elapsed' "$out" | head -60
			echo "----"
		fi
		rows+=("$(printf '%-22s %-22s %12s %6ss  %s' "${pkg#./}" "$t" "$execs" "$secs" "$res")")
	done
done

printf '%-22s %-22s %12s %7s  %s\n' package target execs time result
for r in "${rows[@]}"; do echo "$r"; done
echo "fuzz: ${#rows[@]} targets, $total executions, $FUZZTIME each"
exit $fail
