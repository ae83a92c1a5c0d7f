#!/usr/bin/env bash
# Checks a running cluster through the public API of every node: ordered
# appends with expected_seq guards, idempotent retries across nodes,
# duplicate session ids and consistent headers. Start the cluster first with
# scripts/start-cluster.sh. Needs bash, curl and grep.
#
#   NODES=5    number of nodes, on API ports 4000 to 4000+NODES-1 (default 5)
#
# Prints each check and exits with status 1 at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cluster-env.sh

nodes="${NODES:-5}"
if [[ ! "$nodes" =~ ^[0-9]+$ ]] || ((nodes < 2)); then
  echo "NODES must be a number of at least 2, got ${nodes}" >&2
  exit 2
fi

check_ready() {
  local i
  for i in $(seq 1 "$nodes"); do
    cluster_node_ready "$i" ||
      fail "node$i (http://127.0.0.1:$(cluster_api_port "$i")) is not ready; start the cluster with scripts/start-cluster.sh"
  done
  pass "all $nodes nodes are ready"
}

create_session() {
  cluster_http POST 1 /v1/sessions "{\"id\":\"$session\"}"
  expect_status 201 "create $session on node1"
  expect_field last_seq 0 "create $session on node1"
  pass "node1 created $session"
}

# Appends one event through each node in turn, each guarded by the
# expected_seq of the one before, so the seqs must come back 1, 2, 3, ...
append_through_every_node() {
  local i
  for i in $(seq 1 "$nodes"); do
    cluster_append "$i" "$session" "$i" "ordered-$i" $((i - 1))
    expect_status 201 "append $i through node$i"
    expect_field seq "$i" "append $i through node$i"
    expect_field deduped false "append $i through node$i"
    pass "node$i appended seq $i with expected_seq $((i - 1))"
  done
}

check_stale_expected_seq() {
  cluster_append "$nodes" "$session" 0 "" 0
  expect_status 409 "append with stale expected_seq 0 through node$nodes"
  expect_field error expected_seq_conflict "append with stale expected_seq 0 through node$nodes"
  pass "node$nodes rejected stale expected_seq 0 with expected_seq_conflict"
}

# Sends one event through node1, then the same event with the same key
# through node2: the retry must return the original seq and append nothing.
check_idempotent_retry() {
  local first_seq=$((nodes + 1))
  cluster_append 1 "$session" 100 retry-key ""
  expect_status 201 "append with key retry-key through node1"
  expect_field seq "$first_seq" "append with key retry-key through node1"
  expect_field deduped false "append with key retry-key through node1"
  pass "node1 appended seq $first_seq with key retry-key"

  cluster_append 2 "$session" 100 retry-key ""
  expect_status 201 "retry with key retry-key through node2"
  expect_field seq "$first_seq" "retry with key retry-key through node2"
  expect_field deduped true "retry with key retry-key through node2"
  expect_field last_seq "$first_seq" "retry with key retry-key through node2"
  pass "node2 returned the original seq $first_seq with deduped:true"

  cluster_append "$nodes" "$session" 101 retry-key ""
  expect_status 409 "other event with key retry-key through node$nodes"
  expect_field error idempotency_conflict "other event with key retry-key through node$nodes"
  pass "node$nodes rejected another event with key retry-key as idempotency_conflict"
}

check_duplicate_create() {
  local i
  for i in $(seq 2 "$nodes"); do
    cluster_http POST "$i" /v1/sessions "{\"id\":\"$session\"}"
    expect_status 409 "create $session again on node$i"
    expect_field error session_exists "create $session again on node$i"
  done
  pass "nodes 2 to $nodes rejected a second create of $session with session_exists"
}

check_headers_agree() {
  local expected=$((nodes + 1)) i
  for i in $(seq 1 "$nodes"); do
    cluster_http GET "$i" "/v1/sessions/$session"
    expect_status 200 "read header of $session from node$i"
    expect_field last_seq "$expected" "read header of $session from node$i"
  done
  pass "all $nodes nodes report last_seq $expected for $session"
}

session="ses_test_cluster_$(date +%s)_$$_$RANDOM"
check_ready
create_session
append_through_every_node
check_stale_expected_seq
check_idempotent_retry
check_duplicate_create
check_headers_agree
echo "all checks passed"
