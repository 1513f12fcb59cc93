#!/usr/bin/env bash
# Enforces the layering of docs/design.md: only fusefs imports go-fuse, only cmd imports
# urfave/cli, shipper and applier never import each other.
set -euo pipefail
fail=0
check() { # check PATTERN ALLOWED_DIR_REGEX MESSAGE
  local hits
  hits=$(grep -rl --include='*.go' "\"$1" . | grep -Ev "^\./($2)/" | grep -v '^./bench/' || true)
  if [ -n "$hits" ]; then echo "depcheck: $3: $hits"; fail=1; fi
}
check 'github.com/hanwen/go-fuse' 'fusefs' 'only fusefs may import go-fuse'
check 'github.com/urfave/cli' 'cmd/standin' 'only cmd/standin may import urfave/cli'
if grep -rl --include='*.go' '"github.com/standin/standin/applier' shipper 2>/dev/null; then echo "depcheck: shipper imports applier"; fail=1; fi
if grep -rl --include='*.go' '"github.com/standin/standin/shipper' applier 2>/dev/null; then echo "depcheck: applier imports shipper"; fail=1; fi
exit $fail
