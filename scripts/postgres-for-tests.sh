# Sourced by scripts/test.sh: starts a throwaway Postgres on 127.0.0.1 for
# the archive tests, installing Debian's package first when no server is
# present, and stops it when the calling script exits.
#
# Exports STARCITE_TEST_POSTGRES_URL (a superuser URL; each test creates its
# own database) and STARCITE_TEST_PG_STOP / STARCITE_TEST_PG_START (scripts
# that stop and start this server, for the tests that take Postgres away).

pg_bin_dir() {
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

# NOTE: the install branch has not run yet: every machine it was tried on
# already had the package.
if [[ ! -x "$(pg_bin_dir)/initdb" ]]; then
  echo "no Postgres server found; installing it from Debian's packages"
  sudo_cmd=""
  [[ "$(id -u)" -ne 0 ]] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq postgresql >/dev/null
fi
pg_bin="$(pg_bin_dir)"

pg_dir="$(mktemp -d /tmp/starcite-pg.XXXXXX)"
pg_port="${STARCITE_TEST_PG_PORT:-55432}"
# Postgres refuses to run as root, so root runs it as the package's user.
as_postgres=""
if [[ "$(id -u)" -eq 0 ]]; then
  chown postgres "$pg_dir"
  as_postgres="runuser -u postgres --"
fi

$as_postgres "$pg_bin/initdb" -D "$pg_dir/data" -A trust -U postgres >/dev/null
pg_ctl="$as_postgres $pg_bin/pg_ctl -D $pg_dir/data -l $pg_dir/log -w"
cat >"$pg_dir/start.sh" <<SCRIPT
#!/usr/bin/env bash
exec $pg_ctl -o "-p $pg_port -k $pg_dir -c listen_addresses=127.0.0.1" start >/dev/null
SCRIPT
cat >"$pg_dir/stop.sh" <<SCRIPT
#!/usr/bin/env bash
exec $pg_ctl -m fast stop >/dev/null
SCRIPT
chmod +rx "$pg_dir" "$pg_dir/start.sh" "$pg_dir/stop.sh"

"$pg_dir/start.sh"
echo "Postgres for the archive tests on 127.0.0.1:$pg_port (data in $pg_dir)"
export STARCITE_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$pg_port/postgres"
export STARCITE_TEST_PG_START="$pg_dir/start.sh"
export STARCITE_TEST_PG_STOP="$pg_dir/stop.sh"
trap '"$pg_dir/stop.sh" 2>/dev/null || true; rm -rf "$pg_dir"' EXIT
