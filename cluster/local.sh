#!/usr/bin/env bash
# A Ray cluster on this machine, bound to 127.0.0.1, in its own temp dir; `down` stops only it.
#
#   cluster/local.sh up [EXTRA_WORKER_NODES]   # head (+ optional extra nodes), prints how to submit
#   cluster/local.sh down                      # stops the processes this script started, nothing else
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
state="${ZEROSHIP_CLUSTER_DIR:-/tmp/zeroship-cluster}"
ray="${RAY:-$here/.venv/bin/ray}"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0   # else --node-ip-address 127.0.0.1 is replaced by the external IP
# Token authentication on: without it the job API (arbitrary code) answers anyone who reaches the port.
# The token is made once per cluster folder; clients pass it with the two variables printed by `up`.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
token_file="$state/auth_token"

# alive PID: running and not a zombie (a container's PID 1 may never reap the orphaned `ray start`)
alive() { local st; st=$(ps -o stat= -p "$1" 2>/dev/null) && [ -n "$st" ] && [[ "$st" != Z* ]]; }

free_port() { "$here/.venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

up() {
  if [ -f "$state/head.pid" ] && alive "$(cat "$state/head.pid")"; then
    echo "already running: $(cat "$state/address")"; exit 0
  fi
  mkdir -p "$state/tmp"
  local client_env="RAY_AUTH_MODE=disabled"
  if [ "$RAY_AUTH_MODE" = token ]; then
    if [ ! -s "$token_file" ]; then
      (umask 077 && "$here/.venv/bin/python" -c 'import secrets; print(secrets.token_hex(32))' >"$token_file")
    fi
    export RAY_AUTH_TOKEN_PATH="$token_file"
    client_env="RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$token_file"
  fi
  echo "export $client_env" >"$state/client.env"
  # every port chosen free, so this cluster never collides with another Ray on the machine
  local gcs dash client agent; gcs=$(free_port); dash=$(free_port); client=$(free_port); agent=$(free_port)
  # one logical CPU more than the machine has, as launch's private Ray: a run keeps one beside its
  # workers for Ray Data's tasks, so the quickstart's 2 workers also run on a 2-core machine
  setsid "$ray" start --head --block --node-ip-address 127.0.0.1 --port "$gcs" --num-cpus "$(( $(nproc) + 1 ))" \
    --dashboard-host 127.0.0.1 --dashboard-port "$dash" --ray-client-server-port "$client" \
    --dashboard-agent-listen-port "$agent" --temp-dir "$state/tmp" \
    >"$state/head.log" 2>&1 &
  echo $! >"$state/head.pid"
  local ready=""
  for _ in $(seq 90); do
    (echo >"/dev/tcp/127.0.0.1/$dash") 2>/dev/null && { ready=1; break; }
    alive "$(cat "$state/head.pid")" || break
    sleep 1
  done
  if [ -z "$ready" ]; then
    echo "the Ray head did not come up; its log ($state/head.log) ends with:" >&2
    tail -n 20 "$state/head.log" >&2
    down >/dev/null
    exit 1
  fi
  for i in $(seq "${1:-0}"); do
    setsid "$ray" start --block --address "127.0.0.1:$gcs" --node-ip-address 127.0.0.1 \
      --dashboard-agent-listen-port "$(free_port)" >"$state/worker$i.log" 2>&1 &
    echo $! >"$state/worker$i.pid"
  done
  echo "http://127.0.0.1:$dash" >"$state/address"
  echo "127.0.0.1:$gcs" >"$state/gcs"
  cat <<MSG
Ray head on 127.0.0.1:$gcs (dashboard and job API: http://127.0.0.1:$dash), ${1:-0} extra node(s).
Token authentication: $RAY_AUTH_MODE (every client needs: $client_env)
Submit a run:
  $client_env .venv/bin/ray job submit --address http://127.0.0.1:$dash --working-dir . -- launch recipes/quickstart_ner.yaml
Or launch from this shell into it:
  source $state/client.env; RAY_ADDRESS=127.0.0.1:$gcs .venv/bin/launch recipes/quickstart_ner.yaml
Stop it:
  cluster/local.sh down
MSG
}

down() {
  shopt -s nullglob
  for pidfile in "$state"/*.pid; do
    pid=$(cat "$pidfile")
    kill -TERM -- "-$pid" 2>/dev/null || true   # the process group setsid made: ray start and its children
    # `ray start --block` does not exit on SIGTERM; after a grace period the group is killed
    for _ in $(seq 5); do alive "$pid" || break; sleep 1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$pidfile"
  done
  rm -f "$state/address" "$state/gcs" "$state/client.env"  # the token stays: a cluster brought back up keeps it
  echo "stopped the cluster in $state"
}

case "${1:-}" in
  up) shift; up "${1:-0}" ;;
  down) down ;;
  *) echo "usage: cluster/local.sh up [EXTRA_NODES] | down" >&2; exit 2 ;;
esac
