# mftd: `make demo` runs the main job, `make test` runs the tests.
# Needs only a Rust toolchain; everything else comes from cargo.

CARGO ?= cargo
PREFIX ?= /usr/local
DESTDIR ?=
# Which build `make install` installs: release (default) or debug.
PROFILE ?= release
BINDIR = $(PREFIX)/bin
MANDIR = $(PREFIX)/share/man
UNITDIR = $(PREFIX)/lib/systemd/system
USERUNITDIR = $(PREFIX)/lib/systemd/user
SYSUSERSDIR = $(PREFIX)/lib/sysusers.d
SYSCONFDIR ?= $(if $(filter /usr,$(PREFIX)),/etc,$(PREFIX)/etc)
BASHCOMPDIR = $(PREFIX)/share/bash-completion/completions
ZSHCOMPDIR = $(PREFIX)/share/zsh/site-functions
FISHCOMPDIR = $(PREFIX)/share/fish/vendor_completions.d
TARGET = target/$(PROFILE)

.PHONY: all build release test demo bench bench-wan man install uninstall check-units systemd-test fuzz clean fmt lint

all: build

build:
	$(CARGO) build --workspace --bins

release:
	$(CARGO) build --release --bins

# Unit tests, property tests and end-to-end tests against the real binaries.
# The e2e tests find mftd/mftctl in target/debug, so build them first.
test: build check-units
	$(CARGO) test --workspace --no-fail-fast

# Lint the unit files and hold the system unit to an exposure score of at
# most 2.0. systemd-analyze comes from Debian's systemd package.
check-units: build
	@command -v systemd-analyze >/dev/null 2>&1 || { \
	  echo "installing systemd (for systemd-analyze)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends systemd \
	  || { $$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends systemd; }; }
	bash scripts/check-units.sh

demo: release
	bash scripts/demo.sh

# Throughput against curl/nginx and aria2c on loopback; installs them if missing.
bench: release
	bash scripts/bench.sh

# mftd against aria2c, curl and iperf3 on an emulated WAN (network namespaces,
# tbf caps, the mftd-delayline delay line) at several round-trip times.
# Needs root; installs nginx, aria2, iperf3 if missing. Not part of test.
bench-wan: release
	$(CARGO) build --release -p mftd-tests --bins
	bash scripts/bench-wan.sh

# libFuzzer targets in fuzz/ on stable (RUSTC_BOOTSTRAP=1); FUZZ_SECS per target (default 60).
fuzz:
	bash scripts/fuzz.sh

# Man pages generated from the clap definitions.
man: build
	mkdir -p target/man
	target/debug/mftd --manpage target/man
	target/debug/mftctl manpages target/man

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Install binaries, units, sysusers entry, default config, man pages and
# completions. Honours PREFIX and DESTDIR; an existing config is kept.
install: man
	@test -x $(TARGET)/mftd || { echo "no $(TARGET)/mftd: run 'make release' (or PROFILE=debug after 'make build')"; exit 1; }
	install -Dm755 $(TARGET)/mftd $(DESTDIR)$(BINDIR)/mftd
	install -Dm755 $(TARGET)/mftctl $(DESTDIR)$(BINDIR)/mftctl
	install -d $(DESTDIR)$(UNITDIR) $(DESTDIR)$(USERUNITDIR)
	sed 's|@BINDIR@|$(BINDIR)|g' systemd/mftd.service.in > $(DESTDIR)$(UNITDIR)/mftd.service
	sed 's|@BINDIR@|$(BINDIR)|g' systemd/user/mftd.service.in > $(DESTDIR)$(USERUNITDIR)/mftd.service
	chmod 644 $(DESTDIR)$(UNITDIR)/mftd.service $(DESTDIR)$(USERUNITDIR)/mftd.service
	install -Dm644 systemd/mftd.sysusers.conf $(DESTDIR)$(SYSUSERSDIR)/mftd.conf
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/mftd/mftd.toml ]; then \
	  echo "keeping existing $(DESTDIR)$(SYSCONFDIR)/mftd/mftd.toml"; \
	else install -Dm644 systemd/mftd.toml $(DESTDIR)$(SYSCONFDIR)/mftd/mftd.toml; fi
	install -d $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(MANDIR)/man8
	install -m644 target/man/mftd.8 $(DESTDIR)$(MANDIR)/man8/
	install -m644 target/man/mftctl*.1 $(DESTDIR)$(MANDIR)/man1/
	install -d $(DESTDIR)$(BASHCOMPDIR) $(DESTDIR)$(ZSHCOMPDIR) $(DESTDIR)$(FISHCOMPDIR)
	$(TARGET)/mftctl completions bash > $(DESTDIR)$(BASHCOMPDIR)/mftctl
	$(TARGET)/mftctl completions zsh > $(DESTDIR)$(ZSHCOMPDIR)/_mftctl
	$(TARGET)/mftctl completions fish > $(DESTDIR)$(FISHCOMPDIR)/mftctl.fish

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/mftd $(DESTDIR)$(BINDIR)/mftctl
	rm -f $(DESTDIR)$(UNITDIR)/mftd.service $(DESTDIR)$(USERUNITDIR)/mftd.service
	rm -f $(DESTDIR)$(SYSUSERSDIR)/mftd.conf
	rm -f $(DESTDIR)$(MANDIR)/man8/mftd.8 $(DESTDIR)$(MANDIR)/man1/mftctl.1 $(DESTDIR)$(MANDIR)/man1/mftctl-*.1
	rm -f $(DESTDIR)$(BASHCOMPDIR)/mftctl $(DESTDIR)$(ZSHCOMPDIR)/_mftctl $(DESTDIR)$(FISHCOMPDIR)/mftctl.fish
	@echo "left $(DESTDIR)$(SYSCONFDIR)/mftd/mftd.toml and /var/lib/mftd in place; remove them by hand if wanted"

# Boots a real systemd in an isolated Debian root (cached under /var/tmp),
# installs mftd there and runs it as a service. Needs root; not part of test.
systemd-test: build
	bash scripts/systemd-boot-test.sh

clean:
	$(CARGO) clean
