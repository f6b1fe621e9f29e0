#!/usr/bin/env bash
# make image-test: builds the image (scripts/image.sh) and checks it as a user runs it, from the
# host through psql: the extension created in $POSTGRES_DB, the worker running and connected to a
# Redis with a password read from a file, settings from REDIS_SYNC_* variables in effect, stream
# entries and keys landing, a container restart keeping the data with the worker resuming,
# `podman stop` clean within 10 s, a bad setting stopping the first start with the extension's
# error, and docker/compose.yaml parsing. Outside CI it skips (exit 0, saying why) where
# containers cannot be built; with CI=true that is a failure. Everything it starts is stopped by PID or by its exact name.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/image.sh
source scripts/image.sh

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
secs_since() { local d=$(( $(now_ms) - $1 )); printf '%d.%02d' $((d / 1000)) $((d % 1000 / 10)); }
say() { printf '\033[1;34m[image-test]\033[0m %s\n' "$*"; }
fail() { printf '\033[1;31m[image-test] FAILED:\033[0m %s\n' "$*" >&2; exit 1; }

if ! why=$(container_tooling 2>&1); then
  if [ "${CI:-}" = true ]; then
    fail "$why"
  fi
  say "skipped: $why"
  exit 0
fi

IMAGE=localhost/redis_pg_sync:image-test
build_image

# No redis:7 image and no registry here: docker/compose.yaml is checked for syntax by
# podman-compose, and the same wiring (this image, a Redis, a producer) is run below.
# (PyPI's podman-compose: Debian's 1.0.3 has no `config`, and its --dry-run creates volumes.)
if ! podman-compose version 2>/dev/null | grep -q 'podman-compose version 1\.[1-9]'; then
  python3 -m pip install -q --disable-pip-version-check 'podman-compose==1.6.0' >/dev/null 2>&1 || true
  hash -r
fi
if command -v podman-compose >/dev/null; then
  podman-compose -f docker/compose.yaml config >/dev/null || fail "docker/compose.yaml does not parse"
  say "docker/compose.yaml parses (podman-compose config)"
elif [ "${CI:-}" = true ]; then
  fail "podman-compose could not be installed to check docker/compose.yaml"
fi

TMP=$(mktemp -d /tmp/rps-image-test-XXXXXX)
NAME=rps-image-test-$$
BAD=rps-image-test-bad-$$
REDIS_PID=
cleanup() {
  podman rm -f -v "$NAME" >/dev/null 2>&1 || true
  podman rm -f -v "$BAD" >/dev/null 2>&1 || true
  # Redis writes its log as it shuts down: wait for it before removing its directory.
  if [ -n "$REDIS_PID" ]; then kill "$REDIS_PID" 2>/dev/null || true; wait "$REDIS_PID" 2>/dev/null || true; fi
  rm -rf "$TMP"
}
trap cleanup EXIT

RPORT=$(free_port)
PGPORT=$(free_port)
PASSWORD=image-test-secret
redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$TMP" \
  --requirepass "$PASSWORD" --logfile "$TMP/redis.log" &
REDIS_PID=$!
rcli() { redis-cli -p "$RPORT" -a "$PASSWORD" --no-auth-warning "$@"; }
for _ in $(seq 100); do rcli PING >/dev/null 2>&1 && break; sleep 0.1; done
rcli PING >/dev/null || fail "redis-server did not start"
printf '%s' "$PASSWORD" > "$TMP/redis_password"
chmod 644 "$TMP/redis_password"

add_entries() { # stream count
  local i
  for i in $(seq "$2"); do echo "XADD $1 * heart_rate $((60 + i % 40)) n $i"; done | rcli >/dev/null
}
add_entries biosignal-stream 50
rcli MSET user:1 alice user:2 bob user:3 carol >/dev/null

export PGPASSWORD=postgres-secret
sql() { psql -h 127.0.0.1 -p "$PGPORT" -U postgres -d app -XAtq -v ON_ERROR_STOP=1 -c "$1"; }
# Polls `sql` until it prints $2, for at most $3 seconds.
wait_sql() {
  local deadline=$(( $(date +%s) + $3 )) got=
  while [ "$(date +%s)" -lt "$deadline" ]; do
    got=$(sql "$1" 2>/dev/null || true)
    [ "$got" = "$2" ] && return 0
    sleep 0.2
  done
  fail "waited $3 s for [$1] to give [$2], last [$got]; container log:
$(podman logs --tail 40 "$NAME" 2>&1)"
}

say "starting $IMAGE (Redis on 127.0.0.1:$RPORT, Postgres on 127.0.0.1:$PGPORT)"
t0=$(now_ms)
podman run -d --name "$NAME" --network=host \
  -e POSTGRES_PASSWORD="$PGPASSWORD" -e POSTGRES_DB=app \
  -e REDIS_SYNC_REDIS_HOST=127.0.0.1 -e REDIS_SYNC_REDIS_PORT="$RPORT" \
  -e REDIS_SYNC_REDIS_PASSWORD_FILE=/run/secrets/redis_password \
  -v "$TMP/redis_password:/run/secrets/redis_password:ro" \
  -e REDIS_SYNC_KEY_VALUE_PATTERNS='user:*' -e REDIS_SYNC_BATCH_SIZE=250 \
  -e REDIS_SYNC_CONSUMER_NAME="it's a=b=" \
  "$IMAGE" -p "$PGPORT" >/dev/null
wait_sql "SELECT redis_sync_wait_until_running('1s')" t 180
START_SECS=$(secs_since "$t0")
say "the worker was running and connected ${START_SECS} s after podman run (initdb included)"

[ "$(sql "SELECT extversion FROM pg_extension WHERE extname = 'redis_pg_sync'")" = "$VERSION" ] \
  || fail "extension $VERSION not created in database app"
[ "$(sql "SHOW redis_sync.database")" = app ] || fail "redis_sync.database is not \$POSTGRES_DB"
[ "$(sql "SHOW redis_sync.batch_size")" = 250 ] || fail "REDIS_SYNC_BATCH_SIZE not in effect"
[ "$(sql "SHOW redis_sync.redis_port")" = "$RPORT" ] || fail "REDIS_SYNC_REDIS_PORT not in effect"
[ "$(sql "SHOW redis_sync.enabled")" = on ] || fail "the worker was left paused after the first start"
[ "$(sql "SHOW redis_sync.consumer_name")" = "it's a=b=" ] || fail "a value with quotes and = changed"
[ "$(sql "SHOW redis_sync.redis_password_file")" = /var/lib/postgresql/data/redis_sync_password ] \
  || fail "REDIS_SYNC_REDIS_PASSWORD_FILE did not become redis_sync.redis_password_file"
if podman exec "$NAME" grep -rqF "$PASSWORD" /var/lib/postgresql/data/postgresql.auto.conf \
  /var/lib/postgresql/data/postgresql.conf; then
  fail "the Redis password is in a configuration file"
fi
[ "$(sql "SELECT redis_connected FROM redis_sync_status()")" = t ] || fail "not connected"
wait_sql "SELECT count(*) FROM redis_streams WHERE stream_key = 'biosignal-stream'" 50 60
wait_sql "SELECT string_agg(redis_key || '=' || redis_value, ',' ORDER BY redis_key) FROM redis_key_values" \
  "user:1=alice,user:2=bob,user:3=carol" 60
say "50 entries and 3 keys landed"

stop_container() {
  local t secs code
  t=$(now_ms)
  podman stop -t 10 "$NAME" >/dev/null
  secs=$(secs_since "$t")
  code=$(podman inspect --format '{{.State.ExitCode}}' "$NAME")
  [ "$code" = 0 ] || fail "the container exited with $code on podman stop"
  [ $(( $(now_ms) - t )) -lt 10000 ] || fail "podman stop took ${secs} s"
  say "podman stop: exit code 0 in ${secs} s"
}
stop_container
add_entries biosignal-stream 30
rcli SET user:4 dave >/dev/null
podman start "$NAME" >/dev/null
wait_sql "SELECT redis_sync_wait_until_running('1s')" t 120
wait_sql "SELECT count(*) FROM redis_streams WHERE stream_key = 'biosignal-stream'" 80 60
wait_sql "SELECT count(*) FROM redis_key_values" 4 60
group=$(sql "SELECT current_setting('redis_sync.consumer_group')")
[ "$(rcli XPENDING biosignal-stream "$group" | head -1)" = 0 ] || fail "entries left pending"
say "after a restart: the data kept, the worker resumed (80 entries, none pending, 4 keys)"
stop_container

say "a bad setting stops the first start"
podman run -d --name "$BAD" --network=host -e POSTGRES_PASSWORD=x \
  -e REDIS_SYNC_BATCH_SIZE=0 "$IMAGE" -p "$(free_port)" >/dev/null
deadline=$(( $(date +%s) + 120 ))
while [ "$(podman inspect --format '{{.State.Running}}' "$BAD")" = true ]; do
  [ "$(date +%s)" -lt "$deadline" ] || fail "a container with REDIS_SYNC_BATCH_SIZE=0 kept running"
  sleep 0.5
done
code=$(podman inspect --format '{{.State.ExitCode}}' "$BAD")
[ "$code" != 0 ] || fail "a container with REDIS_SYNC_BATCH_SIZE=0 exited with 0"
podman logs "$BAD" 2>&1 | grep -F 'redis_sync.batch_size' >/dev/null \
  || fail "no word of redis_sync.batch_size in the log: $(podman logs --tail 20 "$BAD" 2>&1)"
say "REDIS_SYNC_BATCH_SIZE=0: first start stopped (exit $code): $(podman logs "$BAD" 2>&1 | grep -F 'redis_sync.batch_size' | head -1)"

say "passed: image ${IMAGE_MB} MB, built in ${BUILD_SECS} s, running ${START_SECS} s after podman run"
