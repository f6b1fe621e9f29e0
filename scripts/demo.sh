#!/usr/bin/env bash
# make demo / make demo-stop: a throwaway PostgreSQL cluster with redis_pg_sync preloaded and
# a local redis-server, both on loopback, both in one temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."

DEMO_DIR=${DEMO_DIR:-/tmp/redis_pg_sync-demo}
PG_CONFIG=${PG15_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
PG_PORT=${DEMO_PG_PORT:-55432}
REDIS_PORT=${DEMO_REDIS_PORT:-56379}
BIN=$("$PG_CONFIG" --bindir)
PGVER=$("$PG_CONFIG" --version | sed -E 's/[^0-9]*([0-9]+).*/\1/')

say() { printf '\033[1;34m[demo]\033[0m %s\n' "$*"; }
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
psql_demo() { "$BIN/psql" -X -h "$DEMO_DIR" -p "$PG_PORT" -U postgres -d postgres "$@"; }
# Waits (up to ~10 s) until table $1 exists and holds at least $2 rows.
wait_rows() {
  for _ in $(seq 50); do
    n=$(psql_demo -At -c "SELECT count(*) FROM pg_tables WHERE tablename = '$1'" 2>/dev/null)
    [ "$n" = 1 ] && [ "$(psql_demo -At -c "SELECT count(*) FROM $1")" -ge "$2" ] && return 0
    sleep 0.2
  done
}
redis_up() { [ -f "$DEMO_DIR/redis.pid" ] && kill -0 "$(cat "$DEMO_DIR/redis.pid")" 2>/dev/null; }
pg_up() { [ -d "$DEMO_DIR/data" ] && as_pg "$BIN/pg_ctl" -D "$DEMO_DIR/data" status >/dev/null 2>&1; }

stop() {
  if pg_up; then
    say "stopping PostgreSQL"
    as_pg "$BIN/pg_ctl" -D "$DEMO_DIR/data" stop -m fast >/dev/null
  fi
  if redis_up; then
    say "stopping redis-server (pid $(cat "$DEMO_DIR/redis.pid"))"
    rpid=$(cat "$DEMO_DIR/redis.pid")
    kill "$rpid"
    # Gone, not only deaf: it writes its log as it shuts down.
    for _ in $(seq 50); do kill -0 "$rpid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -rf "$DEMO_DIR"
  say "stopped and removed $DEMO_DIR"
}

start() {
  say "building and installing the extension into PostgreSQL $PGVER"
  cargo pgrx install --pg-config "$PG_CONFIG" --no-default-features --features "pg$PGVER" >/dev/null
  mkdir -p "$DEMO_DIR"
  chmod 700 "$DEMO_DIR"
  [ "$(id -u)" = 0 ] && chown postgres "$DEMO_DIR"

  if ! redis_up; then
    say "starting redis-server on 127.0.0.1:$REDIS_PORT"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
      --daemonize yes --pidfile "$DEMO_DIR/redis.pid" --dir "$DEMO_DIR" \
      --logfile "$DEMO_DIR/redis.log" --notify-keyspace-events KEA
    for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  fi

  if [ ! -d "$DEMO_DIR/data" ]; then
    say "initdb in $DEMO_DIR/data"
    as_pg "$BIN/initdb" -D "$DEMO_DIR/data" --auth=trust --username=postgres --encoding=UTF8 \
      --locale=C >/dev/null
    cat >> "$DEMO_DIR/data/postgresql.conf" <<CONF

# --- redis_pg_sync demo ---
listen_addresses = '127.0.0.1'
shared_preload_libraries = 'redis_pg_sync'
redis_sync.redis_host = '127.0.0.1'
redis_sync.redis_port = $REDIS_PORT
redis_sync.backoff_base = '200ms'
redis_sync.backoff_max = '5s'
CONF
  fi
  if ! pg_up; then
    say "starting PostgreSQL $PGVER on 127.0.0.1:$PG_PORT"
    as_pg "$BIN/pg_ctl" -D "$DEMO_DIR/data" -l "$DEMO_DIR/postgres.log" \
      -o "-p $PG_PORT -k $DEMO_DIR" -w start >/dev/null
  fi
  psql_demo -q -c "CREATE EXTENSION IF NOT EXISTS redis_pg_sync"

  say "adding demo data to Redis"
  for i in $(seq 1 5); do
    redis-cli -p "$REDIS_PORT" XADD biosignal-stream '*' heart_rate $((60 + i)) spo2 98 \
      temperature 36.$i device_id dev-1 quality good >/dev/null
  done
  redis-cli -p "$REDIS_PORT" SET device:1:name "bedside monitor" >/dev/null
  redis-cli -p "$REDIS_PORT" HSET device:1:config rate 250 unit bpm >/dev/null

  say "waiting for the worker: SELECT redis_sync_wait_until_running('30s')"
  psql_demo -At -c "SELECT redis_sync_wait_until_running('30s')" | grep -q t || {
    echo "the worker did not reach running; see $DEMO_DIR/postgres.log" >&2; exit 1; }
  say "SELECT * FROM redis_sync_status();"
  psql_demo -x -c "SELECT * FROM redis_sync_status()"
  say "waiting for the demo entries to land"
  wait_rows redis_streams 5
  say "SELECT stream_key, message_id, data FROM redis_streams;"
  psql_demo -c "SELECT stream_key, message_id, data FROM redis_streams ORDER BY id"
  say "SELECT stream_key, state, last_id, messages_synced, pending, length FROM redis_sync_streams();"
  psql_demo -c "SELECT stream_key, state, last_id, messages_synced, pending, length FROM redis_sync_streams()"
  say "SELECT redis_key, value_type, redis_value FROM redis_key_values;"
  wait_rows redis_key_values 2
  psql_demo -c "SELECT redis_db, redis_key, value_type, redis_value FROM redis_key_values ORDER BY redis_key"
  say "the worker in pg_stat_activity:"
  psql_demo -c "SELECT pid, backend_type, state, query FROM pg_stat_activity WHERE backend_type LIKE 'redis_pg_sync%'"
  cat <<MSG

The demo is running:
  psql:       $BIN/psql -h $DEMO_DIR -p $PG_PORT -U postgres
  redis-cli:  redis-cli -p $REDIS_PORT
  server log: $DEMO_DIR/postgres.log
Try: redis-cli -p $REDIS_PORT XADD biosignal-stream '*' heart_rate 80   (then SELECT * FROM redis_streams)
     redis-cli -p $REDIS_PORT SET device:1:name "new name"         (then SELECT * FROM redis_key_values)
     ALTER SYSTEM SET redis_sync.enabled = off; SELECT pg_reload_conf();  -- state becomes paused
Stop and remove everything with: make demo-stop
MSG
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
