# mftd: `make demo` runs the main job, `make test` runs the tests.
# Needs only a Rust toolchain; everything else comes from cargo.

CARGO ?= cargo
PREFIX ?= /usr/local
DESTDIR ?=

.PHONY: all build release test demo bench man clean fmt lint

all: build

build:
	$(CARGO) build --workspace --bins

release:
	$(CARGO) build --release --bins

# Unit tests, property tests and end-to-end tests against the real binaries.
# The e2e tests find mftd/mftctl in target/debug, so build them first.
test: build
	$(CARGO) test --workspace --no-fail-fast

demo: release
	bash scripts/demo.sh

# Throughput against curl/nginx and aria2c on loopback; installs them if missing.
bench: release
	bash scripts/bench.sh

# Man pages generated from the clap definitions.
man: build
	mkdir -p target/man
	target/debug/mftd --manpage target/man
	target/debug/mftctl manpages target/man

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
