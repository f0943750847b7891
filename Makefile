# Shortcuts; the scripts are the source of truth.
.PHONY: all test run bench bench-rings header install

PREFIX ?= /usr/local
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)

all:
	cargo build --release --workspace

test:
	scripts/test

run:
	scripts/run

# Every benchmark, each printing unicorn beside its peer measured in the same run.
bench:
	scripts/bench

bench-rings:
	scripts/bench rings

# Regenerates include/unicorn.h after a change to the C ABI.
header:
	UNICORN_BLESS=1 cargo test -p libunicorn --test header

# Installs the binaries, the library (with its SONAME link and development link) and the header
# under $(DESTDIR)$(PREFIX).
install: all
	install -Dm755 target/release/unicornd $(DESTDIR)$(PREFIX)/bin/unicornd
	install -Dm755 target/release/unicorn $(DESTDIR)$(PREFIX)/bin/unicorn
	install -Dm755 target/release/libunicorn.so $(DESTDIR)$(PREFIX)/lib/libunicorn.so.$(VERSION)
	ln -sf libunicorn.so.$(VERSION) $(DESTDIR)$(PREFIX)/lib/libunicorn.so.1
	ln -sf libunicorn.so.1 $(DESTDIR)$(PREFIX)/lib/libunicorn.so
	install -Dm644 include/unicorn.h $(DESTDIR)$(PREFIX)/include/unicorn.h
