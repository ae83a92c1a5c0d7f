# Sourced by the cluster scripts: the ports, member list and start command of
# a local cluster, so a node restarted by a test gets the same settings that
# start-cluster.sh gave it when its data directory was created.
#
# Node i (1-based) is named "node$i", serves the API on port 3999+i and
# Raft traffic on peer port 4099+i, all on 127.0.0.1. Its data directory,
# log and PID file live in the cluster folder as node$i/, node$i.log and
# node$i.pid.

# Prints the API port of node $1.
cluster_api_port() {
  echo $((3999 + $1))
}

# Prints the peer port of node $1.
cluster_peer_port() {
  echo $((4099 + $1))
}

# Prints CLUSTER_NODES for a cluster of $1 nodes.
cluster_members() {
  local count="$1" members="" i
  for i in $(seq 1 "$count"); do
    members+="${members:+,}node$i=127.0.0.1:$(cluster_peer_port "$i")"
  done
  echo "$members"
}

# Starts node $1 of a cluster of $2 nodes in folder $3 with binary $4, in the
# background. Appends its output to node$1.log and writes its PID to
# node$1.pid. STARCITE_* variables of the caller's environment reach the node
# unchanged, so the caller must export the same ones on every start: the
# shard count and replication factor are fixed once the data directory exists.
cluster_start_node() {
  local i="$1" count="$2" dir="$3" bin="$4"
  NODE_NAME="node$i" CLUSTER_NODES="$(cluster_members "$count")" \
    PORT="$(cluster_api_port "$i")" STARCITE_RAFT_DATA_DIR="$dir/node$i" \
    "$bin" >>"$dir/node$i.log" 2>&1 &
  echo $! >"$dir/node$i.pid"
  echo "node$i: http://127.0.0.1:$(cluster_api_port "$i") (PID $!, log $dir/node$i.log)"
}

# Succeeds when node $1 returns 200 on /health/ready.
cluster_node_ready() {
  curl -fsS --max-time 2 "http://127.0.0.1:$(cluster_api_port "$1")/health/ready" >/dev/null 2>&1
}

# Succeeds when the PID file of node $1 in folder $2 names a running process.
cluster_node_running() {
  local pid_file="$2/node$1.pid"
  [[ -f "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null
}

# Helpers for the test scripts.

# Sends an HTTP request to node $2: method $1, path $3 and, when given, the
# JSON body $4. Sets HTTP_STATUS (000 when no response arrived in 20 s) and
# HTTP_BODY. 20 s covers the server's own limits: a request waits up to 5 s
# for a shard leader and a write up to 10 s for its commit.
cluster_http() {
  local method="$1" node="$2" path="$3" body="${4:-}" output
  local args=(-sS --max-time 20 -X "$method" -w '\n%{http_code}')
  if [[ -n "$body" ]]; then
    args+=(-H 'Content-Type: application/json' --data-binary "$body")
  fi
  output="$(curl "${args[@]}" "http://127.0.0.1:$(cluster_api_port "$node")$path" 2>/dev/null)" || true
  HTTP_STATUS="${output##*$'\n'}"
  HTTP_BODY="${output%$'\n'*}"
  if [[ ! "$HTTP_STATUS" =~ ^[0-9]{3}$ ]]; then
    HTTP_STATUS=000
    HTTP_BODY=""
  fi
}

# Appends test event number $3 to session $2 through node $1. $4 is the
# idempotency key and $5 the expected_seq. An empty value leaves the field
# out. Sets HTTP_STATUS and HTTP_BODY like cluster_http.
cluster_append() {
  local node="$1" session="$2" step="$3" key="$4" expected="$5"
  local body="{\"type\":\"test\",\"payload\":{\"step\":$step},\"actor\":\"agent:test\""
  if [[ -n "$key" ]]; then
    body+=",\"idempotency_key\":\"$key\""
  fi
  if [[ -n "$expected" ]]; then
    body+=",\"expected_seq\":$expected"
  fi
  cluster_http POST "$node" "/v1/sessions/$session/append" "$body}"
}

# Prints the value of field $2 in the JSON object $1, without quotes, or
# nothing when it is missing. Only for scalar values without commas or
# braces (numbers, booleans, error codes), and the first occurrence wins, so
# keep the names unique: the test sessions carry no metadata.
json_field() {
  local match
  match="$(grep -o "\"$2\":[^,}]*" <<<"$1" | head -n 1)" || true
  match="${match#*:}"
  match="${match#\"}"
  echo "${match%\"}"
}

# Prints a failure, with the last response if there was one, and exits with
# status 1.
fail() {
  echo "FAIL: $*" >&2
  if [[ -n "${HTTP_STATUS:-}" ]]; then
    echo "  last response: HTTP $HTTP_STATUS ${HTTP_BODY:-}" >&2
  fi
  exit 1
}

pass() {
  echo "ok: $*"
}

# Fails unless the last response had status $1. $2 describes the request.
expect_status() {
  [[ "$HTTP_STATUS" == "$1" ]] || fail "$2: expected HTTP $1, got $HTTP_STATUS"
}

# Fails unless field $1 of the last response is $2. $3 describes the request.
expect_field() {
  local actual
  actual="$(json_field "$HTTP_BODY" "$1")"
  [[ "$actual" == "$2" ]] || fail "$3: expected $1=$2, got ${actual:-nothing}"
}
