#!/usr/bin/env bash
# Start N processes of scripts/train.py on 127.0.0.1 through jax.distributed, each with its share
# of mesh.cpu_devices simulated CPU devices: the multi-host path, exercised on one machine.
#   scripts/launch_local.sh N [--config PATH] [key.sub=value ...]
# If any process fails, the others are stopped; the exit status is the first failure's.
set -uo pipefail
n=${1:?usage: scripts/launch_local.sh N [train.py arguments]}
shift
case $n in ''|*[!0-9]*) echo "error: N=$n must be a positive number of processes" >&2; exit 2;; esac
((10#$n > 0)) || { echo "error: N=$n must be a positive number of processes" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python}
port=${JAXINFRA_PORT:-$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; }
trap 'cleanup; exit 143' INT TERM
for ((i = 0; i < n; i++)); do
  "$py" "$here/train.py" "$@" distributed.coordinator=127.0.0.1:$port distributed.num_processes=$n \
    distributed.process_id=$i &
  pids+=($!)
done
status=0
for ((i = 0; i < n; i++)); do
  wait -n; rc=$?
  if ((rc != 0 && status == 0)); then status=$rc; cleanup; break; fi
done
exit $status
