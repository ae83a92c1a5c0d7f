#!/usr/bin/env bash
# Kills node1 of a running local cluster with SIGKILL, checks that writes
# continue through the other nodes without gaps or duplicates, measures how
# long writes were unavailable, then restarts node1 and checks that it serves
# the same data. Start the cluster first with scripts/start-cluster.sh and
# run this with the same environment. Needs Linux (it reads /proc), bash,
# curl, sed and awk.
#
#   STARCITE_CLUSTER_DIR  the cluster folder (default .cluster)
#   NODES                 number of nodes (default: one per PID file in it)
#   STARCITE_BIN          binary for the restart (default ${CARGO_TARGET_DIR:-target}/release/starcite)
#   SESSIONS=24           test sessions, spread over the shards so that some
#                         land on shards whose leader is node1
#   Other STARCITE_* variables reach the restarted node, as in start-cluster.sh.
#
# Exits with status 1 at the first failed check. node1 is started again on
# success. After a failure, scripts/start-cluster.sh starts it again.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cluster-env.sh

dir="${STARCITE_CLUSTER_DIR:-.cluster}"
bin="${STARCITE_BIN:-${CARGO_TARGET_DIR:-target}/release/starcite}"
sessions="${SESSIONS:-24}"
pid_files=("$dir"/node*.pid)
nodes="${NODES:-${#pid_files[@]}}"

# Events appended to every session before the kill.
readonly EVENTS_BEFORE=3
# How long one append is retried on 503 or no response, in seconds.
readonly RETRY_SECONDS=15
# How long the restarted node1 may take to become ready, in seconds.
readonly READY_SECONDS=60
# How long node1's applied indexes may take to reach the other replicas', in seconds.
readonly CATCH_UP_SECONDS=15

node1_killed=0
results="$(mktemp -d)"
on_exit() {
  rm -rf "$results"
  if ((node1_killed)); then
    echo "node1 is still stopped; scripts/start-cluster.sh starts it again" >&2
  fi
}
trap on_exit EXIT

now_ms() {
  echo $(($(date +%s%N) / 1000000))
}

# Prints milliseconds $1 as seconds with two decimals.
format_seconds() {
  printf '%d.%02d' $(($1 / 1000)) $(($1 % 1000 / 10))
}

# Succeeds while process $1 runs. A zombie counts as stopped: the killed node
# waits for init to reap it, which took over a second on a test machine.
process_alive() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"
  [[ "${stat%% *}" != Z ]]
}

# Prints the id of test session $1.
session_id() {
  echo "${prefix}_$1"
}

# Prints the surviving node (2..NODES) that sends append $2 of session $1
# after the kill, so each session writes through every survivor in turn.
survivor() {
  echo $((2 + ($1 + $2) % (nodes - 1)))
}

# Prints "shard value" for every line of metric $2 in node $1's /metrics.
metric_by_shard() {
  curl -fsS --max-time 5 "http://127.0.0.1:$(cluster_api_port "$1")/metrics" 2>/dev/null |
    sed -n "s/^$2{shard=\"\([0-9]*\)\"} \([0-9]*\)\$/\1 \2/p" || true
}

# Prints the shards that node $1 reports node $2 as the leader of.
shards_led_by() {
  metric_by_shard "$1" starcite_raft_leader_node | awk -v leader="$2" '$2 == leader { print $1 }' | xargs
}

# Appends like cluster_append, retrying on 503 or no response with the same
# idempotency key for up to RETRY_SECONDS. Sets ATTEMPTS.
append_with_retry() {
  local deadline=$(($(now_ms) + RETRY_SECONDS * 1000))
  ATTEMPTS=0
  while true; do
    ATTEMPTS=$((ATTEMPTS + 1))
    cluster_append "$@"
    if [[ "$HTTP_STATUS" != 503 && "$HTTP_STATUS" != 000 ]] || (($(now_ms) >= deadline)); then
      return
    fi
    sleep 0.2
  done
}

check_setup() {
  if [[ ! "$nodes" =~ ^[0-9]+$ ]] || ((nodes < 3)); then
    fail "the cluster needs at least 3 nodes so that a majority survives node1 (NODES=$nodes, folder $dir)"
  fi
  [[ -x "$bin" ]] || fail "server binary $bin is missing; set STARCITE_BIN"
  local i
  for i in $(seq 1 "$nodes"); do
    cluster_node_ready "$i" || fail "node$i is not ready; start the cluster with scripts/start-cluster.sh"
  done
  cluster_node_running 1 "$dir" || fail "no running node1 has a PID file in $dir; is STARCITE_CLUSTER_DIR the folder start-cluster.sh used?"
  pass "all $nodes nodes are ready; node1 has PID $(cat "$dir/node1.pid")"
}

create_sessions() {
  local k step node
  for k in $(seq 0 $((sessions - 1))); do
    node=$((1 + k % nodes))
    cluster_http POST "$node" /v1/sessions "{\"id\":\"$(session_id "$k")\"}"
    expect_status 201 "create $(session_id "$k") on node$node"
    for step in $(seq 1 "$EVENTS_BEFORE"); do
      cluster_append "$node" "$(session_id "$k")" "$step" "step-$step" $((step - 1))
      expect_status 201 "append $step to $(session_id "$k") through node$node"
      expect_field seq "$step" "append $step to $(session_id "$k") through node$node"
    done
  done
  pass "created $sessions sessions ${prefix}_* with $EVENTS_BEFORE events each"
}

kill_node1() {
  local pid led
  pid="$(cat "$dir/node1.pid")"
  led="$(shards_led_by 1 1)"
  if [[ -n "$led" ]]; then
    echo "node1 leads shards: $led"
  else
    echo "NOTE: node1 leads no shard, so its death interrupts no leader; the time measured below is only the cost of routing around it"
  fi
  kill -KILL "$pid"
  kill_ms="$(now_ms)"
  node1_killed=1
  for _ in $(seq 1 50); do
    process_alive "$pid" || break
    sleep 0.1
  done
  if process_alive "$pid"; then
    fail "node1 (PID $pid) is still running 5 s after SIGKILL"
  fi
  pass "killed node1 (PID $pid) with SIGKILL"
}

# Sends the first append after the kill to every session at once, each
# through its own survivor, and records in $results/<k> when it succeeded.
# Because all start right after the kill, the slowest one measures how long
# the shards led by node1 could not take writes.
append_first_after_kill() {
  local k node step=$((EVENTS_BEFORE + 1))
  for k in $(seq 0 $((sessions - 1))); do
    node="$(survivor "$k" 0)"
    (
      append_with_retry "$node" "$(session_id "$k")" "$step" "step-$step" "$EVENTS_BEFORE"
      echo "$HTTP_STATUS $(($(now_ms) - kill_ms)) $ATTEMPTS $node $HTTP_BODY" >"$results/$k"
    ) &
  done
  wait
}

check_first_after_kill() {
  local k status elapsed attempts node body max_ms=0 slow=0 retried=0 times=()
  local step=$((EVENTS_BEFORE + 1))
  for k in $(seq 0 $((sessions - 1))); do
    [[ -s "$results/$k" ]] || fail "the first append to $(session_id "$k") after the kill recorded no result"
    read -r status elapsed attempts node body <"$results/$k"
    HTTP_STATUS="$status"
    HTTP_BODY="$body"
    expect_status 201 "append $step to $(session_id "$k") through node$node after the kill ($attempts attempts in $(format_seconds "$elapsed") s)"
    expect_field seq "$step" "append $step to $(session_id "$k") through node$node after the kill"
    times+=("$elapsed")
    if ((elapsed > max_ms)); then
      max_ms="$elapsed"
    fi
    if ((elapsed > 1000)); then
      slow=$((slow + 1))
    fi
    if ((attempts > 1)); then
      retried=$((retried + 1))
    fi
  done
  pass "every session took append $step after the kill with seq $step"
  echo "writes were unavailable for up to $(format_seconds "$max_ms") s after the kill:" \
    "the slowest first append succeeded $(format_seconds "$max_ms") s after SIGKILL;" \
    "$slow of $sessions sessions waited over 1 s, $retried needed more than one attempt"
  echo "seconds from SIGKILL to each session's first successful append, sorted:" \
    "$(for elapsed in $(printf '%s\n' "${times[@]}" | sort -n); do format_seconds "$elapsed"; echo -n ' '; done)"
}

# Appends through every other survivor in turn, sequentially.
append_through_survivors() {
  local k j node step
  for j in $(seq 1 $((nodes - 2))); do
    step=$((EVENTS_BEFORE + 1 + j))
    for k in $(seq 0 $((sessions - 1))); do
      node="$(survivor "$k" "$j")"
      append_with_retry "$node" "$(session_id "$k")" "$step" "step-$step" $((step - 1))
      expect_status 201 "append $step to $(session_id "$k") through node$node"
      expect_field seq "$step" "append $step to $(session_id "$k") through node$node"
    done
  done
  pass "every session took appends through each of nodes 2 to $nodes, seqs $((EVENTS_BEFORE + 1)) to $last_seq"
}

# Sends the first append after the kill again through another survivor. The
# server must return the original seq, whatever the first attempt saw.
check_retry_deduped() {
  local k node step=$((EVENTS_BEFORE + 1))
  for k in $(seq 0 $((sessions - 1))); do
    node="$(survivor "$k" 1)"
    append_with_retry "$node" "$(session_id "$k")" "$step" "step-$step" "$EVENTS_BEFORE"
    expect_status 201 "retry of append $step to $(session_id "$k") through node$node"
    expect_field deduped true "retry of append $step to $(session_id "$k") through node$node"
    expect_field seq "$step" "retry of append $step to $(session_id "$k") through node$node"
  done
  pass "a retry of append $step with its key returned the original seq in every session"
}

# Fails unless node $1 reports last_seq $2 for every session.
check_headers_via() {
  local node="$1" expected="$2" k
  for k in $(seq 0 $((sessions - 1))); do
    cluster_http GET "$node" "/v1/sessions/$(session_id "$k")"
    expect_status 200 "read header of $(session_id "$k") from node$node"
    expect_field last_seq "$expected" "read header of $(session_id "$k") from node$node"
  done
  pass "node$node reports last_seq $expected for every session (no gap, no duplicate)"
}

restart_node1() {
  local start_ms
  HTTP_STATUS=""
  cluster_start_node 1 "$nodes" "$dir" "$bin"
  start_ms="$(now_ms)"
  for _ in $(seq 1 $((READY_SECONDS * 5))); do
    if cluster_node_ready 1; then
      node1_killed=0
      pass "node1 ready $(format_seconds $(($(now_ms) - start_ms))) s after its restart"
      return
    fi
    if ! cluster_node_running 1 "$dir"; then
      tail -n 3 "$dir/node1.log" >&2
      fail "node1 exited during its restart (last log lines above); were the STARCITE_* variables the same as at its first start?"
    fi
    sleep 0.2
  done
  fail "node1 was not ready $READY_SECONDS s after its restart; see $dir/node1.log"
}

# Prints "shard index" lines where node1's applied index is behind the
# highest one another node reports for the same shard.
shards_node1_lags() {
  local others node
  others="$(for node in $(seq 2 "$nodes"); do metric_by_shard "$node" starcite_raft_applied_index; done)"
  metric_by_shard 1 starcite_raft_applied_index | while read -r shard applied; do
    local highest
    highest="$(awk -v shard="$shard" '$1 == shard && $2 > max { max = $2 } END { print max + 0 }' <<<"$others")"
    if ((applied < highest)); then
      echo "shard $shard: node1 applied $applied, another replica $highest"
    fi
  done
}

# Waits until node1 has applied as much of each shard it hosts as the other
# replicas, which shows it caught up from the log or a snapshot. The gauges
# are sampled once a second, so the first check waits until the other nodes'
# gauges include every append made so far.
check_caught_up() {
  local lag=""
  sleep 1.2
  for _ in $(seq 1 $((CATCH_UP_SECONDS * 2))); do
    lag="$(shards_node1_lags)"
    if [[ -z "$lag" && -n "$(metric_by_shard 1 starcite_raft_applied_index)" ]]; then
      pass "node1 applied every shard it hosts as far as the other replicas"
      return
    fi
    sleep 0.5
  done
  HTTP_STATUS=""
  fail "node1 did not catch up within $CATCH_UP_SECONDS s: ${lag:-node1 reports no applied index}"
}

check_append_via_node1() {
  local k step=$((last_seq + 1))
  for k in $(seq 0 $((sessions - 1))); do
    append_with_retry 1 "$(session_id "$k")" "$step" "step-$step" "$last_seq"
    expect_status 201 "append $step to $(session_id "$k") through the restarted node1"
    expect_field seq "$step" "append $step to $(session_id "$k") through the restarted node1"
  done
  pass "the restarted node1 took append $step in every session"
}

prefix="ses_failover_$(date +%s)_$$"
last_seq=$((EVENTS_BEFORE + nodes - 1))

check_setup
create_sessions
kill_node1
append_first_after_kill
check_first_after_kill
append_through_survivors
check_retry_deduped
check_headers_via 2 "$last_seq"
restart_node1
check_headers_via 1 "$last_seq"
check_caught_up
check_append_via_node1
led="$(shards_led_by 1 1)"
echo "node1 leads shards after its restart: ${led:-none} (leadership does not move back by itself)"
echo "all checks passed"
