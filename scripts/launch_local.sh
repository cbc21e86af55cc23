#!/usr/bin/env bash
# Start N processes of scripts/train.py on 127.0.0.1 through jax.distributed, each with its share
# of mesh.cpu_devices simulated CPU devices: the multi-host path, exercised on one machine.
#   scripts/launch_local.sh N [--config PATH] [key.sub=value ...]
# If any process fails, the others are stopped; the exit status is the first failure's. The coordinator's
# port is a free one picked here (or JAXINFRA_PORT); if another process takes it before process 0 binds
# it, all start again on a new one (3 tries).
set -uo pipefail
n=${1:?usage: scripts/launch_local.sh N [train.py arguments]}
shift
case $n in ''|*[!0-9]*) echo "error: N=$n must be a positive number of processes" >&2; exit 2;; esac
((10#$n > 0)) || { echo "error: N=$n must be a positive number of processes" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python}
tries=3
[[ -n ${JAXINFRA_PORT:-} ]] && tries=1  # a port the caller chose is not swapped for another
taken="Failed to add port to server"  # process 0's stderr (gRPC) when the coordinator port is taken
tmp=$(mktemp -d) || exit 1
pids=() tee_pid=
cleanup() {  # every process of this start, then the copy of process 0's output once it has it all
  ((${#pids[@]})) && kill "${pids[@]}" 2>/dev/null
  ((${#pids[@]})) && wait "${pids[@]}" 2>/dev/null
  [[ -n $tee_pid ]] && wait "$tee_pid" 2>/dev/null
  pids=() tee_pid=
}
trap 'cleanup; rm -rf "$tmp"; exit 143' INT TERM
trap 'rm -rf "$tmp"' EXIT

# process 0's output passes through a copy (tee) kept for the port check below: its stderr, or both
# its streams where the launcher's share a file (then process 0's share one too, and their order is kept)
[[ /dev/stdout -ef /dev/stderr ]] && both=1 || both=0

start() {  # all n processes on coordinator port $1; returns the first failure's status (0 if none)
  local port=$1 i rc ended left still status=0
  shift
  rm -f "$tmp/out0" && mkfifo "$tmp/out0" || return 1
  if ((both)); then tee "$tmp/out0.log" <"$tmp/out0" & else tee "$tmp/out0.log" <"$tmp/out0" >&2 & fi
  tee_pid=$!
  for ((i = 0; i < n; i++)); do
    if ((i > 0)); then
      "$py" "$here/train.py" "$@" distributed.coordinator=127.0.0.1:$port distributed.num_processes=$n \
        distributed.process_id=$i &
    elif ((both)); then
      "$py" "$here/train.py" "$@" distributed.coordinator=127.0.0.1:$port distributed.num_processes=$n \
        distributed.process_id=0 >"$tmp/out0" 2>&1 &
    else
      "$py" "$here/train.py" "$@" distributed.coordinator=127.0.0.1:$port distributed.num_processes=$n \
        distributed.process_id=0 2>"$tmp/out0" &
    fi
    pids+=($!)
  done
  left=("${pids[@]}")
  while ((${#left[@]})); do
    wait -n -p ended "${left[@]}"; rc=$?
    still=()
    for i in "${left[@]}"; do [[ $i == "$ended" ]] || still+=("$i"); done
    left=("${still[@]}")
    if ((rc != 0)); then status=$rc; break; fi
  done
  cleanup
  return $status
}

for ((try = 1; ; try++)); do
  port=${JAXINFRA_PORT:-$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
  start "$port" "$@"; status=$?
  if ((status != 0 && try < tries)) && grep -qF "$taken" "$tmp/out0.log" 2>/dev/null; then
    echo "launch_local.sh: the coordinator's port $port was taken; starting again on another" >&2
    continue
  fi
  exit $status
done
