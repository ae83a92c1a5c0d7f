#!/usr/bin/env bash
# Starts a local Starcite cluster on 127.0.0.1: node1..nodeN with API ports
# 4000.. and peer ports 4100.., data, logs and PID files in one folder
# (.cluster by default). Waits until every node reports ready.
#
#   NODES=5                 number of nodes (default 5)
#   STARCITE_CLUSTER_DIR    folder for data, logs and PID files (default .cluster)
#   STARCITE_BIN            server binary (default: build target/release/starcite)
#   Other STARCITE_* variables are passed on to every node.
set -euo pipefail
cd "$(dirname "$0")/.."

nodes="${NODES:-5}"
dir="${STARCITE_CLUSTER_DIR:-.cluster}"
bin="${STARCITE_BIN:-}"
if [[ -z "$bin" ]]; then
  cargo build --release --locked --bin starcite
  bin="target/release/starcite"
fi

members=""
for i in $(seq 1 "$nodes"); do
  members+="${members:+,}node$i=127.0.0.1:$((4099 + i))"
done

mkdir -p "$dir"
for i in $(seq 1 "$nodes"); do
  pid_file="$dir/node$i.pid"
  if [[ -f "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
    echo "node$i is already running (PID $(cat "$pid_file"))"
    continue
  fi
  NODE_NAME="node$i" CLUSTER_NODES="$members" PORT=$((3999 + i)) \
    STARCITE_RAFT_DATA_DIR="$dir/node$i" \
    "$bin" >>"$dir/node$i.log" 2>&1 &
  echo $! >"$pid_file"
  echo "node$i: http://127.0.0.1:$((3999 + i)) (PID $!, log $dir/node$i.log)"
done

echo "waiting for every node to be ready..."
for attempt in $(seq 1 120); do
  ready=0
  for i in $(seq 1 "$nodes"); do
    if curl -fsS "http://127.0.0.1:$((3999 + i))/health/ready" >/dev/null 2>&1; then
      ready=$((ready + 1))
    fi
  done
  if [[ "$ready" -eq "$nodes" ]]; then
    echo "cluster ready: $nodes nodes"
    exit 0
  fi
  sleep 0.5
done
echo "the cluster did not become ready within 60 s; see the logs in $dir" >&2
exit 1
