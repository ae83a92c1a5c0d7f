#!/usr/bin/env bash
# Starts a local Starcite cluster on 127.0.0.1: node1..nodeN with API ports
# 4000.. and peer ports 4100.., data, logs and PID files in one folder
# (.cluster by default). Waits until every node reports ready.
#
#   NODES=5                 number of nodes (default 5)
#   STARCITE_CLUSTER_DIR    folder for data, logs and PID files (default .cluster)
#   STARCITE_BIN            server binary (default: build it into $CARGO_TARGET_DIR, or target/, release/starcite)
#   Other STARCITE_* variables are passed on to every node.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cluster-env.sh

nodes="${NODES:-5}"
dir="${STARCITE_CLUSTER_DIR:-.cluster}"
bin="${STARCITE_BIN:-}"
if [[ -z "$bin" ]]; then
  cargo build --release --locked --bin starcite
  bin="${CARGO_TARGET_DIR:-target}/release/starcite"
fi

mkdir -p "$dir"
for i in $(seq 1 "$nodes"); do
  if cluster_node_running "$i" "$dir"; then
    echo "node$i is already running (PID $(cat "$dir/node$i.pid"))"
    continue
  fi
  cluster_start_node "$i" "$nodes" "$dir" "$bin"
done

echo "waiting for every node to be ready..."
for attempt in $(seq 1 120); do
  ready=0
  for i in $(seq 1 "$nodes"); do
    if cluster_node_ready "$i"; then
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
