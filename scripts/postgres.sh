# Sourced (not run) by scripts/test.sh: a throwaway PostgreSQL for the tests.
#
# Installs Debian's `postgresql` package when no server binaries are found, makes a fresh
# cluster in a temporary directory (trust authentication, loopback only, a private port
# and socket directory), starts it, and exports REMIXD_TEST_POSTGRES_URL for the tests.
# The cluster is stopped and deleted when the sourcing shell exits (postgres_stop, on the
# EXIT trap). `initdb` refuses to run as root, so as root the cluster belongs to the
# `postgres` user the package creates, as Debian runs it.

postgres_bin() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [[ -x "$d/initdb" && -x "$d/pg_ctl" ]] && { echo "$d"; return 0; }
  done
  return 1
}

postgres_start() {
  local bin
  if ! bin=$(postgres_bin); then
    echo "== installing PostgreSQL (Debian's postgresql package)" >&2
    if [[ $(id -u) -eq 0 ]]; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null ||
        { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null; }
    else
      sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null
    fi
    bin=$(postgres_bin) || { echo "error: PostgreSQL's server binaries are still missing" >&2; return 1; }
  fi
  POSTGRES_DIR=$(mktemp -d /tmp/remixd-pg.XXXXXX)
  local as=()
  if [[ $(id -u) -eq 0 ]]; then
    chown postgres: "$POSTGRES_DIR"
    as=(runuser -u postgres --)
  fi
  # A free port on loopback, asked of the kernel.
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "${as[@]}" "$bin/initdb" -D "$POSTGRES_DIR/data" -U postgres -A trust -E UTF8 --locale=C.UTF-8 \
    >"$POSTGRES_DIR/initdb.log" 2>&1 ||
    { cat "$POSTGRES_DIR/initdb.log" >&2; return 1; }
  # fsync off: the cluster is thrown away, and the tests' durability claims are about
  # remixd's transactions, which PostgreSQL commits the same way either way.
  "${as[@]}" "$bin/pg_ctl" -D "$POSTGRES_DIR/data" -l "$POSTGRES_DIR/server.log" -w -t 60 start \
    -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$POSTGRES_DIR \
        -c fsync=off -c max_connections=400 -c shared_buffers=64MB" >/dev/null ||
    { cat "$POSTGRES_DIR/server.log" >&2; return 1; }
  POSTGRES_PG_CTL=("${as[@]}" "$bin/pg_ctl")
  export REMIXD_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$port/postgres"
  echo "== PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port ($POSTGRES_DIR)" >&2
}

postgres_stop() {
  [[ -n "${POSTGRES_DIR:-}" ]] || return 0
  "${POSTGRES_PG_CTL[@]}" -D "$POSTGRES_DIR/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$POSTGRES_DIR"
  POSTGRES_DIR=
}
