#!/usr/bin/env bash
# make deb: target/deb/postgresql-<major>-redis-pg-sync_<version>_amd64.deb, built from
# `cargo pgrx package` (release) against the host's PostgreSQL (PG_MAJOR, default 15; Debian's
# paths, the same as in the official postgres images) and packed with dpkg-deb. With
# --from-image, the files come from the image's builder stage instead (see below).
set -euo pipefail
cd "$(dirname "$0")/.."
PG_MAJOR=${PG_MAJOR:-15}
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/$PG_MAJOR/bin/pg_config}
VERSION=$(awk -F'"' '/^version = /{print $2; exit}' Cargo.toml)
ARCH=$(dpkg --print-architecture)
PKG=postgresql-$PG_MAJOR-redis-pg-sync
say() { printf '\033[1;34m[deb]\033[0m %s\n' "$*"; }

root=target/deb/root
rm -rf "$root"
mkdir -p "$root/DEBIAN" "$root/usr/share/doc/$PKG"
if [ "${1:-}" = --from-image ]; then
  # The files `cargo pgrx package` made in the image's builder stage (cached by make image):
  # the package then holds exactly what the image holds, and no second release build runs.
  : "${CONTAINERS_CONF:?--from-image needs the podman set-up of scripts/image.sh}"
  say "cargo pgrx package in the builder stage of docker/Dockerfile"
  podman build -q --pull=never --build-arg "PG_MAJOR=$PG_MAJOR" --target builder \
    -t localhost/redis_pg_sync:builder -f docker/Dockerfile . >/dev/null
  box=rps-deb-files-$$
  podman create --name "$box" localhost/redis_pg_sync:builder >/dev/null
  trap 'podman rm -f -v "$box" >/dev/null 2>&1 || true' EXIT
  podman cp "$box:/out/usr" "$root/"
else
  say "cargo pgrx package against $PG_CONFIG"
  cargo pgrx package --pg-config "$PG_CONFIG" --no-default-features --features "pg$PG_MAJOR"
  cp -a "target/release/redis_pg_sync-pg$PG_MAJOR/usr" "$root/"
fi
install -m 644 README.md "$root/usr/share/doc/$PKG/README.md"
gzip -9n < CHANGELOG.md > "$root/usr/share/doc/$PKG/changelog.gz"
cat > "$root/usr/share/doc/$PKG/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: redis_pg_sync
License: Apache-2.0

Files: *
License: Apache-2.0
 On Debian systems, the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
COPYRIGHT
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<CONTROL
Package: $PKG
Version: $VERSION
Architecture: $ARCH
Maintainer: redis_pg_sync maintainers <redis_pg_sync@localhost>
Depends: postgresql-$PG_MAJOR, libc6 (>= 2.36), libgcc-s1
Section: database
Priority: optional
Installed-Size: $size
Description: Redis streams and keys kept in sync with PostgreSQL $PG_MAJOR tables
 redis_pg_sync is a PostgreSQL extension whose background worker reads Redis
 Stream entries through consumer groups into a table exactly once, and mirrors
 Redis keys of every type into a key-value table.
 .
 After installing, add redis_pg_sync to shared_preload_libraries, set
 redis_sync.redis_host, restart PostgreSQL and run CREATE EXTENSION redis_pg_sync.
CONTROL
find "$root" -type d -exec chmod 755 {} +
find "$root/usr" -type f -name '*.so' -exec chmod 644 {} +
mkdir -p target/deb
out=target/deb/${PKG}_${VERSION}_${ARCH}.deb
dpkg-deb --root-owner-group --build "$root" "$out" >/dev/null
say "built $out ($(du -h "$out" | cut -f1)): $(dpkg-deb -c "$out" | grep -c '^-') files"
echo "$out"
