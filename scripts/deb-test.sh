#!/usr/bin/env bash
# make deb-test: the Debian package installed with dpkg -i on a clean server, inside a
# postgres:${PG_MAJOR:-15}-bookworm container (the host's PostgreSQL 15 is the other tests'), preloaded, seen
# syncing stream entries from a Redis on the host; then dpkg -r removes every file it installed.
# Skips outside CI where containers cannot be run (as image-test.sh); with CI=true that fails.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/image.sh
source scripts/image.sh

say() { printf '\033[1;34m[deb-test]\033[0m %s\n' "$*"; }
fail() { printf '\033[1;31m[deb-test] FAILED:\033[0m %s\n' "$*" >&2; exit 1; }

if ! why=$(container_tooling 2>&1); then
  [ "${CI:-}" = true ] && fail "$why"
  say "skipped: $why"
  exit 0
fi
prepare_bases
deb=$(bash scripts/deb.sh --from-image | tail -1)
[ -f "$deb" ] || fail "no package built"
pkg=$(dpkg-deb -f "$deb" Package)

TMP=$(mktemp -d /tmp/rps-deb-test-XXXXXX)
NAME=rps-deb-test-$$
REDIS_PID=
cleanup() {
  podman rm -f -v "$NAME" >/dev/null 2>&1 || true
  # Redis writes its log as it shuts down: wait for it before removing its directory.
  if [ -n "$REDIS_PID" ]; then kill "$REDIS_PID" 2>/dev/null || true; wait "$REDIS_PID" 2>/dev/null || true; fi
  rm -rf "$TMP"
}
trap cleanup EXIT
RPORT=$(free_port)
PGPORT=$(free_port)
redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --dir "$TMP" --logfile "$TMP/redis.log" &
REDIS_PID=$!
for _ in $(seq 100); do redis-cli -p "$RPORT" PING >/dev/null 2>&1 && break; sleep 0.1; done
for i in $(seq 25); do echo "XADD deb-stream * n $i"; done | redis-cli -p "$RPORT" >/dev/null

cp "$deb" "$TMP/"
podman run -d --name "$NAME" --network=host -v "$TMP:/pkg:ro" --entrypoint sleep \
  "docker.io/library/postgres:${PG_MAJOR}-bookworm" infinity >/dev/null
inside() { podman exec "$NAME" "$@"; }
bin=/usr/lib/postgresql/$PG_MAJOR/bin

# The files the package holds (not directories, nor the docs, which slim images keep out with
# a dpkg path-exclude), none there before.
mapfile -t files < <(dpkg-deb -c "$deb" | awk '$1 ~ /^-/ {sub(/^\./, "", $6); print $6}' \
  | grep -v '^/usr/share/doc/')
[ "${#files[@]}" -gt 3 ] || fail "the package holds ${#files[@]} files"
for f in "${files[@]}"; do
  inside test ! -e "$f" || fail "$f is in the image before the package is installed"
done
inside dpkg -i "/pkg/$(basename "$deb")" >/dev/null || fail "dpkg -i"
for f in "${files[@]}"; do inside test -f "$f" || fail "dpkg -i did not install $f"; done
# Everything dpkg says it installed that is there (docs included where not excluded).
mapfile -t installed < <(inside sh -c "dpkg -L $pkg | while read -r f; do [ -f \"\$f\" ] && echo \"\$f\"; done")
[ "${#installed[@]}" -ge "${#files[@]}" ] || fail "dpkg -L lists ${#installed[@]} files"
say "dpkg -i $(basename "$deb"): ${#installed[@]} files installed"

inside su postgres -c "$bin/initdb -D /tmp/pgdata --auth=trust -U postgres >/dev/null" || fail "initdb"
podman exec -i "$NAME" su postgres -c "cat >> /tmp/pgdata/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PGPORT
shared_preload_libraries = 'redis_pg_sync'
redis_sync.redis_host = '127.0.0.1'
redis_sync.redis_port = $RPORT
CONF
inside su postgres -c "$bin/pg_ctl -D /tmp/pgdata -l /tmp/pgdata/log -w start >/dev/null" || fail "pg_ctl start"
sql() { psql -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres -XAtq -v ON_ERROR_STOP=1 -c "$1"; }
sql "CREATE EXTENSION redis_pg_sync"
[ "$(sql "SELECT redis_sync_wait_until_running('60s')")" = t ] \
  || fail "the worker is not running: $(inside cat /tmp/pgdata/log | tail -20)"
deadline=$(( $(date +%s) + 60 ))
until [ "$(sql "SELECT count(*) FROM redis_streams WHERE stream_key = 'deb-stream'")" = 25 ]; do
  [ "$(date +%s)" -lt "$deadline" ] || fail "the 25 entries did not land"
  sleep 0.2
done
say "installed from the package, preloaded: 25 entries landed"
inside su postgres -c "$bin/pg_ctl -D /tmp/pgdata -m fast -w stop >/dev/null"

inside dpkg -r "$pkg" >/dev/null || fail "dpkg -r"
for f in "${installed[@]}"; do inside test ! -e "$f" || fail "dpkg -r left $f"; done
inside dpkg -s "$pkg" >/dev/null 2>&1 && fail "$pkg still installed"
say "passed: dpkg -r removed all ${#installed[@]} files"
