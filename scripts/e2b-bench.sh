#!/usr/bin/env bash
# Measures create -> first command completed, N times, through the official
# E2B SDK (Sandbox.create + commands.run('true'), e2b/sdktest/bench.mjs) and
# through the native CLI (warmpool acquire -q + warmpool exec -- /bin/bash -l
# -c true, the command the SDK's commands.run sends), side
# by side, against a running `warmpool serve --e2b`. Each sandbox/lease is
# released outside the timed span, and the run waits PAUSE_MS (default
# 1500) between samples so that the pool is back at depth: every sample is
# an acquire from a warm pool.
#
#   scripts/e2b-bench.sh POOL E2B_ADDR [N]     e.g. scripts/e2b-bench.sh deb 127.0.0.1:3000 20
#
# E2B_API_KEY must hold a key of the daemon's key file; WARMPOOL (default
# bin/warmpool) and the usual --state/--socket flags in WARMPOOL_FLAGS reach
# the daemon for the native side.
set -euo pipefail
pool=${1:?usage: e2b-bench.sh POOL E2B_ADDR [N]}
addr=${2:?usage: e2b-bench.sh POOL E2B_ADDR [N]}
n=${3:-20}
wp=${WARMPOOL:-bin/warmpool}
flags=${WARMPOOL_FLAGS:-}
export PAUSE_MS=${PAUSE_MS:-1500}
: "${E2B_API_KEY:?set E2B_API_KEY to a key in the e2b key file of the daemon}"
here=$(cd "$(dirname "$0")/.." && pwd)

sdk=$(cd "$here/e2b/sdktest" && E2B_API_URL="http://$addr" E2B_SANDBOX_URL="http://$addr" TEMPLATE="$pool" node bench.mjs "$n")

native=() nacq=() nexec=()
# One untimed round, as the SDK side has.
l=$($wp $flags acquire "$pool" -q); $wp $flags exec "$l" -- /bin/bash -l -c true; $wp $flags release "$l" >/dev/null
for _ in $(seq "$n"); do
  t0=$(date +%s%N)
  l=$($wp $flags acquire "$pool" -q)
  ta=$(date +%s%N)
  $wp $flags exec "$l" -- /bin/bash -l -c true
  t1=$(date +%s%N)
  native+=($(( (t1 - t0) / 1000 ))) nacq+=($(( (ta - t0) / 1000 ))) nexec+=($(( (t1 - ta) / 1000 )))
  $wp $flags release "$l" >/dev/null
  sleep "$(awk "BEGIN{print $PAUSE_MS/1000}")"
done

python3 - "$sdk" "${native[*]}" "${nacq[*]}" "${nexec[*]}" <<'PY'
import json, math, sys
sdk = json.loads(sys.argv[1])
nat, nacq, nexec = ([int(x) / 1000 for x in a.split()] for a in sys.argv[2:5])
def q(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, math.ceil(p * len(xs)) - 1)]
rows = [("E2B SDK: Sandbox.create -> commands.run('true')", sdk["samples_ms"]),
        ("native CLI: acquire -q -> exec -- bash -l -c true", nat),
        ("  E2B SDK: Sandbox.create", sdk["create_ms"]),
        ("  E2B SDK: commands.run('true')", sdk["run_ms"]),
        ("  native CLI: warmpool acquire -q", nacq),
        ("  native CLI: warmpool exec -- bash -l -c true", nexec)]
print(f"{'PATH':52} {'N':>3} {'P50':>9} {'P99':>9}")
for name, xs in rows:
    print(f"{name:52} {len(xs):>3} {q(xs, .5):>7.1f}ms {q(xs, .99):>7.1f}ms")
print(f"ratio SDK/native p50: {q(rows[0][1], .5) / q(rows[1][1], .5):.2f}")
PY
