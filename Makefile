# ublk-cow. `make demo` and `make test` are the README's two commands.
CARGO ?= cargo
BIN := target/release/ublk-cow

.PHONY: all build setup demo test test-host test-vm test-vm-newest lint bench bench-slow bench-cache bench-alloc bench-commit bench-remote bench-snapshot bench-batch bench-sync bench-fua-steps clean man completions install uninstall check-kit deb

all: build

build:
	$(CARGO) build --release --locked

# Build dependencies and the VM tools (kernel with ublk_drv, QEMU, vng,
# virtiofsd, fio); idempotent, cached under /opt/ublk-cow-ci.
setup:
	bash ci/setup.sh

# The main job: a device over a sample image, ext4 on it, files written and
# read back, base unchanged. In a VM when this host has no ublk_drv.
demo: setup build
	bash ci/in-ublk-env.sh tests/e2e/demo.sh

# The man pages (ublk-cow.1, ublk-cow-COMMAND.1) and the bash, zsh and fish
# completions, generated from the command line's definitions.
MAN_DIR := target/man
COMPLETIONS_DIR := target/completions

man:
	$(CARGO) run --release --locked --example generate -- man $(MAN_DIR)

completions:
	$(CARGO) run --release --locked --example generate -- completions $(COMPLETIONS_DIR)

# `make install` (PREFIX=/usr/local, DESTDIR for staging): the binary, the
# man pages, the completions, the systemd unit and the module to load.
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
MANDIR ?= $(PREFIX)/share/man
DATADIR ?= $(PREFIX)/share
LIBDIR ?= $(PREFIX)/lib
UNITDIR ?= $(LIBDIR)/systemd/system
INSTALLED := $(BINDIR)/ublk-cow \
	$(DATADIR)/bash-completion/completions/ublk-cow \
	$(DATADIR)/zsh/site-functions/_ublk-cow \
	$(DATADIR)/fish/vendor_completions.d/ublk-cow.fish \
	$(UNITDIR)/ublk-cow@.service \
	$(LIBDIR)/modules-load.d/ublk-cow.conf

install: build man completions
	install -D -m 755 $(BIN) $(DESTDIR)$(BINDIR)/ublk-cow
	install -d $(DESTDIR)$(MANDIR)/man1
	install -m 644 $(MAN_DIR)/*.1 $(DESTDIR)$(MANDIR)/man1/
	install -D -m 644 $(COMPLETIONS_DIR)/ublk-cow.bash $(DESTDIR)$(DATADIR)/bash-completion/completions/ublk-cow
	install -D -m 644 $(COMPLETIONS_DIR)/_ublk-cow $(DESTDIR)$(DATADIR)/zsh/site-functions/_ublk-cow
	install -D -m 644 $(COMPLETIONS_DIR)/ublk-cow.fish $(DESTDIR)$(DATADIR)/fish/vendor_completions.d/ublk-cow.fish
	install -d $(DESTDIR)$(UNITDIR)
	sed 's|@BINDIR@|$(BINDIR)|g' dist/systemd/ublk-cow@.service > $(DESTDIR)$(UNITDIR)/ublk-cow@.service
	chmod 644 $(DESTDIR)$(UNITDIR)/ublk-cow@.service
	install -D -m 644 dist/modules-load.d/ublk-cow.conf $(DESTDIR)$(LIBDIR)/modules-load.d/ublk-cow.conf

uninstall:
	rm -f $(addprefix $(DESTDIR),$(INSTALLED))
	rm -f $(DESTDIR)$(MANDIR)/man1/ublk-cow.1 $(DESTDIR)$(MANDIR)/man1/ublk-cow-*.1

# A Debian package with cargo-deb (`cargo install cargo-deb --locked`, which
# `make setup` does): target/debian/ublk-cow_VERSION-1_ARCH.deb.
deb: build man completions
	mkdir -p target/deb
	sed 's|@BINDIR@|/usr/bin|g' dist/systemd/ublk-cow@.service > target/deb/ublk-cow@.service
	$(CARGO) deb --no-build --locked

# What ships, checked: `make install` into a staging directory, the
# installed binary's --version and --help, the unit verified by systemd,
# `make uninstall` leaving nothing; then the Debian package, linted.
check-kit:
	bash ci/check-kit.sh

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets --locked -- -D warnings

# Host tests (engine, model, race, CLI), then the end-to-end suite in a VM.
test-host:
	$(CARGO) test --release --locked -- --show-output

test-vm: build
	bash ci/in-ublk-env.sh tests/e2e/run.sh

# The suite again in a VM with the newest Debian kernel: ublk's behaviour
# changes between kernels. Its kill -9 loop runs 10 cycles (6.12 runs 20),
# enough to take each kernel's side of recovery through every step.
test-vm-newest: build
	bash ci/newest-kernel.sh
	VM_KERNEL=newest CRASH_CYCLES=10 bash ci/in-ublk-env.sh tests/e2e/run.sh

# Everything, the demo included: CI proves both of the README's commands.
test: setup lint test-host check-kit test-vm test-vm-newest
	bash ci/in-ublk-env.sh tests/e2e/demo.sh

clean:
	$(CARGO) clean

# Benchmarks against peers (not part of `make test`): in a VM when needed.
bench:
	bash ci/bench/setup.sh
	$(MAKE) build
	bash ci/bench/run.sh

# The same, with the base on a slower device (1 ms per I/O).
bench-slow:
	bash ci/bench/setup.sh
	$(MAKE) build
	SLOW_MS=$${SLOW_MS:-1} bash ci/bench/run.sh

# Cache benchmarks: readahead over a slow base, copy-on-cache against cp.
bench-cache:
	bash ci/bench/setup.sh
	$(MAKE) build
	BENCH_SCRIPT=ci/bench/cache-guest.sh bash ci/bench/run.sh

# What UBLK_F_BATCH_IO saves per request: a null target's transports side
# by side (needs a kernel that offers it: VM_KERNEL=newest).
bench-batch:
	bash ci/bench/setup.sh
	cd ci/bench/batch-null && cargo build --release
	BENCH_SCRIPT=ci/bench/batch-guest.sh bash ci/bench/run.sh

# What a first write to a sparse overlay costs the guest's kernel alone:
# pwrite into a tmpfs hole against into a page that exists.
bench-alloc:
	bash ci/bench/setup.sh
	$(MAKE) build
	BENCH_SCRIPT=ci/bench/alloc-guest.sh bash ci/bench/run.sh

# A remote base (moto_server, S3) against curl of the same object.
bench-remote:
	bash ci/bench/setup.sh
	$(MAKE) build
	BENCH_SCRIPT=ci/bench/remote-guest.sh bash ci/bench/run.sh

# The pause of snapshot -n under fio, and fio with snapshots against alone.
bench-snapshot:
	bash ci/bench/setup.sh
	$(MAKE) build
	BENCH_SCRIPT=ci/bench/snapshot-guest.sh BENCH_SUMMARY=ci/bench/snapshot-summary.py bash ci/bench/run.sh

# Where a FUA write's time goes on an overlay on ext4 or xfs, against
# loop and rublk over a sparse file: commits per write, each step's time.
bench-sync:
	bash ci/bench/setup.sh
	$(MAKE) build
	mkdir -p target/bench
	bash ci/in-ublk-env.sh ci/bench/sync-trace-guest.sh | tee target/bench/sync-trace.log

# The steps of one FUA write at QD1 on ext4, traced, for ublk-cow and
# rublk over a sparse file: the median time from each step to the next.
bench-fua-steps:
	bash ci/bench/setup.sh
	$(MAKE) build
	mkdir -p target/bench
	bash ci/in-ublk-env.sh ci/bench/fua-steps-guest.sh | tee target/bench/fua-steps.log

# commit of an overlay against cp --sparse=always of the same data.
bench-commit:
	bash ci/bench/setup.sh
	$(MAKE) build
	BENCH_SCRIPT=ci/bench/commit-guest.sh bash ci/bench/run.sh
