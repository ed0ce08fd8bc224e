#!/usr/bin/env bash
# `make run`: build the guest image, start the daemon, build the template
# `default` (1 vCPU, 256 MiB) and the pool `default` (min 2, max 4), print
# how to use it, then keep the daemon in the foreground: Ctrl-C (SIGINT) or
# SIGTERM stops it gracefully (warm VMs destroyed, leased VMs kept for the
# next start). Idempotent: a second run reuses the image, the template and
# the pool recorded in $STATE.
#
# Arguments are passed on to `warmpool serve`: `scripts/run.sh --stop-all`
# makes Ctrl-C destroy leased VMs and stop machines too.
#
# Environment: STATE (state directory; the Makefile passes .state in the
# repository), PROVIDER (qemu, the default, or fake), WARMPOOL (the binary).
set -euo pipefail
cd "$(dirname "$0")/.."

WARMPOOL=${WARMPOOL:-$PWD/bin/warmpool}
STATE=${STATE:-$PWD/.state}
PROVIDER=${PROVIDER:-qemu}
mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd)
SOCK="$STATE/warmpool.sock"
LOG="$STATE/daemon.log"
wp() { "$WARMPOOL" --socket "$SOCK" "$@"; }

if [ ! -x "$WARMPOOL" ]; then
  echo "run.sh: $WARMPOOL is missing; run 'make build' first" >&2
  exit 1
fi

if [ "$PROVIDER" != fake ]; then
  echo "==> guest image"
  "$WARMPOOL" image build
fi

if wp status >/dev/null 2>&1; then
  echo "run.sh: a daemon already answers on $SOCK; stop it first" >&2
  exit 1
fi

# The daemon becomes this process (exec, below) so that Ctrl-C reaches it;
# the setup runs beside it and prints what to do once the pool is warm.
DAEMON=$$
fail() {
  echo "run.sh: $*; daemon log: $LOG" >&2
  kill -TERM "$DAEMON" 2>/dev/null || true
  exit 1
}
setup() {
  for _ in $(seq 1 300); do
    wp status >/dev/null 2>&1 && break
    kill -0 "$DAEMON" 2>/dev/null || exit 1
    sleep 0.1
  done
  wp status >/dev/null 2>&1 || fail "the daemon did not answer within 30s"
  if ! wp template ls -o json | tr -d ' \n' | grep -q '"name":"default"'; then
    echo "==> template default (1 vCPU, 256 MiB)"
    wp template build default --vcpus 1 --mem 256 || fail "template build failed"
  fi
  echo "==> pool default (min 2, max 4)"
  wp pool set default --template default --min 2 --max 4 >/dev/null || fail "pool set failed"
  echo "==> waiting for 2 warm VMs"
  for _ in $(seq 1 600); do
    if wp pool ls -o json | tr -d ' \n' | grep -Eq '"name":"default"[^}]*"ready":([2-9]|[1-9][0-9])'; then
      break
    fi
    sleep 0.5
  done
  wp pool ls
  cat <<EOF

warmpool is ready. In another terminal:

  export WARMPOOL_SOCKET=$SOCK
  L=\$($WARMPOOL acquire default -q)    # the lease ID (without -q: a table; -o json for scripts)
  $WARMPOOL exec \$L -- uname -a        # runs in the VM; the exit code passes through
  $WARMPOOL release \$L                 # destroys the VM; the pool refills
  $WARMPOOL pool ls
  $WARMPOOL status
  curl -s --unix-socket $SOCK http://warmpool/metrics

The daemon runs in the foreground (log: $LOG). Ctrl-C stops it: warm VMs are
destroyed; $STOP_NOTE
EOF
}
STOP_NOTE="leased VMs and machines keep running for the next start
(start with scripts/run.sh --stop-all to have Ctrl-C destroy them too)."
for a in "$@"; do
  [ "$a" = --stop-all ] && STOP_NOTE="leased VMs are destroyed and machines stopped too (--stop-all)."
done
setup &
echo "==> starting the daemon (log: $LOG)"
exec "$WARMPOOL" serve --state "$STATE" --provider "$PROVIDER" "$@" >>"$LOG" 2>&1
