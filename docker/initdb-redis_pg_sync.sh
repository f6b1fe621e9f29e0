#!/usr/bin/env bash
# Run by the official image's entrypoint on the first start (an empty data directory), with a
# temporary server that already preloads redis_pg_sync:
#   - every REDIS_SYNC_<NAME>=value in the environment becomes redis_sync.<name> = 'value' in
#     postgresql.auto.conf (ALTER SYSTEM, so the extension checks each value: a bad one stops
#     this first start with its own error);
#   - REDIS_SYNC_REDIS_PASSWORD_FILE=/run/secrets/... sets redis_sync.redis_password from a file;
#   - redis_sync.database is $POSTGRES_DB unless REDIS_SYNC_DATABASE says otherwise;
#   - CREATE EXTENSION redis_pg_sync in that database.
# The temporary server's own worker is paused meanwhile (redis_sync.enabled = off until the end).
# Later starts do not run this script: change settings with ALTER SYSTEM and a reload.
set -Eeuo pipefail

rps_sql() {
	psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER:-postgres}" --no-password "$@"
}

rps_set() {
	local name=$1 value=$2
	if ! [[ $name =~ ^[a-z][a-z0-9_]*$ ]]; then
		echo "redis_pg_sync: REDIS_SYNC_${name^^} is not a setting name" >&2
		return 1
	fi
	rps_sql --dbname postgres -q -v value="$value" <<-SQL
		ALTER SYSTEM SET redis_sync.${name} = :'value';
	SQL
	if [ "$name" = redis_password ]; then
		echo "redis_pg_sync: redis_sync.redis_password set"
	else
		echo "redis_pg_sync: redis_sync.${name} = '${value}'"
	fi
}

db=${REDIS_SYNC_DATABASE:-${POSTGRES_DB:-postgres}}
# The temporary server's worker runs with the image's defaults (and in database postgres):
# paused until the real server starts with the settings below.
rps_sql --dbname postgres -q <<-SQL
	ALTER SYSTEM SET redis_sync.enabled = off;
	SELECT pg_reload_conf();
SQL
if [ -n "${REDIS_SYNC_REDIS_PASSWORD_FILE:-}" ]; then
	if [ -n "${REDIS_SYNC_REDIS_PASSWORD:-}" ]; then
		echo "redis_pg_sync: both REDIS_SYNC_REDIS_PASSWORD and REDIS_SYNC_REDIS_PASSWORD_FILE are set (but are exclusive)" >&2
		exit 1
	fi
	password=$(< "$REDIS_SYNC_REDIS_PASSWORD_FILE")
	rps_set redis_password "$password"
fi
rps_set database "$db"
while IFS='=' read -r -d '' var value; do
	case $var in
		REDIS_SYNC_REDIS_PASSWORD_FILE | REDIS_SYNC_DATABASE) ;;
		REDIS_SYNC_*)
			name=${var#REDIS_SYNC_}
			rps_set "${name,,}" "$value"
			;;
	esac
done < <(env -0)
rps_sql --dbname "$db" -q <<-SQL
	CREATE EXTENSION IF NOT EXISTS redis_pg_sync;
SQL
if [ -z "${REDIS_SYNC_ENABLED:-}" ]; then
	rps_sql --dbname postgres -q <<-SQL
		ALTER SYSTEM RESET redis_sync.enabled;
	SQL
fi
echo "redis_pg_sync: extension created in database \"$db\"; the worker starts with the server"
