#!/usr/bin/env bash
# Start a throw-away PostgreSQL server (Debian's postgresql package) for the collect tests: initdb into a temp
# folder as the postgres user, on a free port, trust auth on 127.0.0.1 only. Prints the admin URL on stdout
# (postgresql://postgres@127.0.0.1:PORT/postgres) and the folder on a second line; stop it and remove the folder
# with: .ci/postgres.sh stop DIR
set -euo pipefail
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -n "$bin" ] && [ -x "$bin/initdb" ] || { echo "postgres: initdb not found (apt-get install postgresql)" >&2; exit 1; }
run_as() { if [ "$(id -u)" = 0 ]; then chown -R postgres "$dir"; su postgres -s /bin/sh -c "$*"; else sh -c "$*"; fi; }
if [ "${1:-}" = stop ]; then
  dir=$2
  run_as "'$bin/pg_ctl' -D '$dir/data' stop -m fast >/dev/null 2>&1" || true
  rm -rf "$dir"
  exit 0
fi
dir=$(mktemp -d /tmp/transferkit-pg.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
user=$([ "$(id -u)" = 0 ] && echo postgres || id -un)
run_as "'$bin/initdb' -D '$dir/data' -U '$user' --auth=trust -E UTF8 >'$dir/initdb.log' 2>&1"
run_as "'$bin/pg_ctl' -D '$dir/data' -l '$dir/server.log' -w -o \"-c listen_addresses=127.0.0.1 -p $port -k '$dir'\" start >/dev/null"
echo "postgres: running in $dir/data on port $port" >&2
echo "postgresql://$user@127.0.0.1:$port/postgres"
echo "$dir"
