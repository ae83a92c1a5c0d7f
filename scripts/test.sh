#!/usr/bin/env bash
# Runs the whole test suite: unit tests, then the integration tests, which
# start the real server binary on loopback ports and talk to it over HTTP
# and WebSocket. Extra arguments go to `cargo test` (a test name filter, say).
set -euo pipefail
cd "$(dirname "$0")/.."

# The cluster script tests drive the nodes with curl.
if ! command -v curl >/dev/null 2>&1; then
  echo "curl is missing; installing it from Debian's packages"
  sudo_cmd=""
  [[ "$(id -u)" -ne 0 ]] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq curl
fi

# The archive tests need a real Postgres; this starts one for the run.
source scripts/postgres-for-tests.sh

# Release mode: the integration tests push tens of thousands of events
# through the server, which a debug build makes several times slower.
cargo test --release --locked "$@"
