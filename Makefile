# Shortcuts; the scripts are the source of truth.
.PHONY: all build test run bench bench-rings header install package

# Install layout (see README, "Installing"). The library and its development link live in a
# private directory, PKGLIBDIR, so that they never shadow the Unicorn CPU emulator's libunicorn;
# the pkg-config module unicorn-npu points there. The packages are staged with this same rule.
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
LIBDIR ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
PKGLIBDIR ?= $(LIBDIR)/unicorn-npu
PKGINCLUDEDIR ?= $(INCLUDEDIR)/unicorn-npu
PKGCONFIGDIR ?= $(LIBDIR)/pkgconfig
DOCDIR ?= $(PREFIX)/share/doc/unicorn-npu
# The policy file: /etc when PREFIX is /usr, else under the prefix (the unit then names it).
SYSCONFDIR ?= $(if $(filter /usr,$(PREFIX)),/etc,$(PREFIX)/etc)
SYSTEMDUNITDIR ?= $(PREFIX)/lib/systemd/system
SYSTEMDPRESETDIR ?= $(PREFIX)/lib/systemd/system-preset
UDEVRULESDIR ?= $(PREFIX)/lib/udev/rules.d
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
TMPFILESDIR ?= $(PREFIX)/lib/tmpfiles.d

CARGO_TARGET_DIR ?= target
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
# libunicorn.so.MAJOR.MINOR.PATCH: the C ABI's major (the SONAME, libunicorn.so.1) and minor
# (include/unicorn.h), then the release's patch number.
ABI_MAJOR := $(shell sed -n 's/^\#define UNICORN_ABI_MAJOR \([0-9]*\)$$/\1/p' include/unicorn.h)
ABI_MINOR := $(shell sed -n 's/^\#define UNICORN_ABI_MINOR \([0-9]*\)$$/\1/p' include/unicorn.h)
LIBVERSION := $(ABI_MAJOR).$(ABI_MINOR).$(lastword $(subst ., ,$(VERSION)))
CONFIG_ARG := $(if $(filter /etc,$(SYSCONFDIR)),, --config $(SYSCONFDIR)/unicorn/unicornd.toml)

all:
	cargo build --release --workspace

# What the packages and `make install` ship: the daemon, the CLI and the library, optimised.
build:
	cargo build --release -p unicornd -p unicorn-cli -p libunicorn

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

# The .deb and .rpm packages, into $(CARGO_TARGET_DIR)/packages (packaging/build-packages.sh).
package:
	packaging/build-packages.sh

# Installs everything under $(DESTDIR): the binaries, the library (libunicorn.so.$(LIBVERSION)
# with its SONAME link and development link, in PKGLIBDIR), the header, the pkg-config module,
# the systemd units, the udev rule, sysusers.d and tmpfiles.d entries, and the policy file (kept
# when one is already there).
install: build
	install -d -m755 $(DESTDIR)$(BINDIR) $(DESTDIR)$(PKGLIBDIR) $(DESTDIR)$(PKGINCLUDEDIR) \
		$(DESTDIR)$(PKGCONFIGDIR) $(DESTDIR)$(DOCDIR) $(DESTDIR)$(SYSCONFDIR)/unicorn \
		$(DESTDIR)$(SYSTEMDUNITDIR) $(DESTDIR)$(SYSTEMDPRESETDIR) $(DESTDIR)$(UDEVRULESDIR) \
		$(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(TMPFILESDIR)
	install -m755 $(CARGO_TARGET_DIR)/release/unicornd $(DESTDIR)$(BINDIR)/unicornd
	install -m755 $(CARGO_TARGET_DIR)/release/unicorn $(DESTDIR)$(BINDIR)/unicorn
	install -m755 $(CARGO_TARGET_DIR)/release/libunicorn.so \
		$(DESTDIR)$(PKGLIBDIR)/libunicorn.so.$(LIBVERSION)
	ln -sfn libunicorn.so.$(LIBVERSION) $(DESTDIR)$(PKGLIBDIR)/libunicorn.so.$(ABI_MAJOR)
	ln -sfn libunicorn.so.$(ABI_MAJOR) $(DESTDIR)$(PKGLIBDIR)/libunicorn.so
	install -m644 include/unicorn.h $(DESTDIR)$(PKGINCLUDEDIR)/unicorn.h
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@PKGLIBDIR@|$(PKGLIBDIR)|' \
		-e 's|@PKGINCLUDEDIR@|$(PKGINCLUDEDIR)|' -e 's|@VERSION@|$(VERSION)|' \
		packaging/unicorn-npu.pc.in > $(DESTDIR)$(PKGCONFIGDIR)/unicorn-npu.pc
	chmod 644 $(DESTDIR)$(PKGCONFIGDIR)/unicorn-npu.pc
	sed -e 's|@BINDIR@|$(BINDIR)|' -e 's|@CONFIG_ARG@|$(CONFIG_ARG)|' \
		packaging/unicornd.service.in > $(DESTDIR)$(SYSTEMDUNITDIR)/unicornd.service
	chmod 644 $(DESTDIR)$(SYSTEMDUNITDIR)/unicornd.service
	install -m644 packaging/unicornd.socket $(DESTDIR)$(SYSTEMDUNITDIR)/unicornd.socket
	install -m644 packaging/unicorn-npu.preset $(DESTDIR)$(SYSTEMDPRESETDIR)/80-unicorn-npu.preset
	install -m644 udev/60-unicorn-npu.rules $(DESTDIR)$(UDEVRULESDIR)/60-unicorn-npu.rules
	install -m644 packaging/sysusers.conf $(DESTDIR)$(SYSUSERSDIR)/unicorn-npu.conf
	install -m644 packaging/tmpfiles.conf $(DESTDIR)$(TMPFILESDIR)/unicorn-npu.conf
	install -m644 README.md $(DESTDIR)$(DOCDIR)/README.md
	install -m644 udev/README.md $(DESTDIR)$(DOCDIR)/README.udev.md
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/unicorn/unicornd.toml ]; then \
		echo "keeping $(DESTDIR)$(SYSCONFDIR)/unicorn/unicornd.toml (the default: unicornd --print-default-config)"; \
	else \
		install -m644 unicornd/unicornd.toml $(DESTDIR)$(SYSCONFDIR)/unicorn/unicornd.toml; \
	fi
