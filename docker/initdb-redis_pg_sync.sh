#!/usr/bin/env bash
# Run by the official image's entrypoint on the first start (an empty data directory), as the
# postgres user, with a temporary server that already preloads redis_pg_sync:
#   - every REDIS_SYNC_<NAME>=value in the environment becomes redis_sync.<name> = 'value' in
#     postgresql.auto.conf (ALTER SYSTEM, so the extension checks each value: a bad one stops
#     this first start with its own error);
#   - REDIS_SYNC_REDIS_PASSWORD_FILE=/run/secrets/... (a secret mounted read-only, any owner):
#     the file is copied to $PGDATA/redis_sync_password (owned by postgres, mode 0600) and
#     redis_sync.redis_password_file points there, so the password is in no configuration file;
#   - redis_sync.database is $POSTGRES_DB unless REDIS_SYNC_DATABASE says otherwise;
#   - CREATE EXTENSION redis_pg_sync in that database.
# The temporary server's own worker is paused meanwhile (redis_sync.enabled = off until the end).
# Later starts do not run this script: change settings with ALTER SYSTEM and a reload.
set -Eeuo pipefail

rps_sql() {
	psql -v ON_ERROR_STOP=1 --no-psqlrc -q --username "${POSTGRES_USER:-postgres}" --no-password "$@"
}

# ALTER SYSTEM SET redis_sync.<name> = <value>, the value sent on stdin (not in psql's
# arguments, which other processes can read) as a dollar-quoted literal.
rps_set() {
	local name=$1 value=$2 tag
	if ! [[ $name =~ ^[a-z][a-z0-9_]*$ ]]; then
		echo "redis_pg_sync: REDIS_SYNC_${name^^} is not a setting name" >&2
		return 1
	fi
	tag=rps
	while [[ $value == *"\$$tag\$"* ]]; do tag="rps$RANDOM"; done
	printf 'ALTER SYSTEM SET redis_sync.%s = $%s$%s$%s$;\n' "$name" "$tag" "$value" "$tag" \
		| rps_sql --dbname postgres
	case $name in
		redis_password) echo "redis_pg_sync: redis_sync.redis_password set" ;;
		*) echo "redis_pg_sync: redis_sync.${name} = '${value}'" ;;
	esac
}

db=${REDIS_SYNC_DATABASE:-${POSTGRES_DB:-postgres}}
# The temporary server's worker runs with the image's defaults (and in database postgres):
# paused until the real server starts with the settings below.
echo "ALTER SYSTEM SET redis_sync.enabled = off; SELECT pg_reload_conf() \\g /dev/null" \
	| rps_sql --dbname postgres
if [ -n "${REDIS_SYNC_REDIS_PASSWORD_FILE:-}" ]; then
	if [ -n "${REDIS_SYNC_REDIS_PASSWORD:-}" ]; then
		echo "redis_pg_sync: both REDIS_SYNC_REDIS_PASSWORD and REDIS_SYNC_REDIS_PASSWORD_FILE are set (but are exclusive)" >&2
		exit 1
	fi
	copy="$PGDATA/redis_sync_password"
	install -m 600 "$REDIS_SYNC_REDIS_PASSWORD_FILE" "$copy"
	rps_set redis_password_file "$copy"
fi
rps_set database "$db"
while IFS= read -r -d '' entry; do
	var=${entry%%=*}
	value=${entry#*=}
	case $var in
		REDIS_SYNC_REDIS_PASSWORD_FILE | REDIS_SYNC_DATABASE) ;;
		REDIS_SYNC_*) rps_set "$(tr '[:upper:]' '[:lower:]' <<< "${var#REDIS_SYNC_}")" "$value" ;;
	esac
done < <(env -0)
echo "CREATE EXTENSION IF NOT EXISTS redis_pg_sync;" | rps_sql --dbname "$db"
if [ -z "${REDIS_SYNC_ENABLED:-}" ]; then
	echo "ALTER SYSTEM RESET redis_sync.enabled;" | rps_sql --dbname postgres
fi
echo "redis_pg_sync: extension created in database \"$db\"; the worker starts with the server"
