#!/usr/bin/env bash
# Stops the nodes started by start-cluster.sh (SIGTERM, then SIGKILL after
# 15 s), using the PID files in the cluster folder. Data is kept; pass
# --clean to delete the folder as well.
set -euo pipefail
cd "$(dirname "$0")/.."

dir="${STARCITE_CLUSTER_DIR:-.cluster}"
[[ -d "$dir" ]] || { echo "no cluster folder $dir"; exit 0; }

pids=()
for pid_file in "$dir"/node*.pid; do
  [[ -f "$pid_file" ]] || continue
  pid="$(cat "$pid_file")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    pids+=("$pid")
  fi
  rm -f "$pid_file"
done

for _ in $(seq 1 150); do
  alive=0
  for pid in "${pids[@]}"; do
    kill -0 "$pid" 2>/dev/null && alive=1
  done
  [[ "$alive" -eq 0 ]] && break
  sleep 0.1
done
for pid in "${pids[@]}"; do
  if kill -0 "$pid" 2>/dev/null; then
    echo "PID $pid did not stop in 15 s; killing it"
    kill -KILL "$pid"
  fi
done
echo "stopped ${#pids[@]} node(s)"

if [[ "${1:-}" == "--clean" ]]; then
  rm -rf "$dir"
  echo "removed $dir"
fi
