# recoverfs — two promises: `make demo` and `make test` on a fresh Debian machine.

SHELL := /bin/bash
CARGO ?= cargo
DEMO ?= debian

# Debian packages the build, tests and demo need. qemu-utils is pinned to the
# same version as qemu-system-x86 because installing one replaces the other.
APT_PACKAGES := fuse3 fio curl qemu-system-x86 python3 fdisk dosfstools e2fsprogs \
	libnfs-utils qemu-block-extra libnbd-bin python3-libnbd iproute2 util-linux
# Peers and tools the benchmarks compare against.
BENCH_PACKAGES := nbdkit nbdfuse bindfs libnbd-bin strace nfs-ganesha nfs-ganesha-vfs rpcbind b3sum

.PHONY: all build release agent deps garage fsx test demo bench bench-quick clean fmt

all: build

# Installs missing system packages (as root, or through sudo).
deps:
	@scripts/install-deps.sh $(APT_PACKAGES)

# Garage, the real S3 store the S3 tests run against (built once, cached).
garage:
	@scripts/install-garage.sh

# fsx, the file-system exerciser the fsx tests run (built once, cached).
fsx:
	@scripts/install-fsx.sh

build:
	$(CARGO) build

release:
	$(CARGO) build --release

# The in-guest agent: this binary built static (glibc with +crt-static; no
# musl target is installed here) into target/$(AGENT_TARGET)/agent/, where
# `recoverfs agent build` finds it.
AGENT_TARGET := x86_64-unknown-linux-gnu
agent:
	RUSTFLAGS='-C target-feature=+crt-static' $(CARGO) build --profile agent --target $(AGENT_TARGET) --bin recoverfs

test: deps garage fsx agent
	$(CARGO) build --all-targets
	$(CARGO) test --no-fail-fast -- --test-threads=2

demo: deps release agent
	DEMO=$(DEMO) scripts/demo.sh

# Writes docs/benchmarks.md (+ JSON): every figure as a ratio against a
# baseline measured in the same run. BENCH_ARGS=--quick for a short run.
bench: deps garage release
	@scripts/install-deps.sh $(BENCH_PACKAGES)
	python3 scripts/bench/run.py $(BENCH_ARGS)
	python3 scripts/bench/relocation.py $(BENCH_ARGS)
	python3 scripts/bench/exports.py $(BENCH_ARGS)
	python3 scripts/bench/placement.py $(BENCH_ARGS)
	python3 scripts/bench/vmbackup.py $(BENCH_ARGS)
	python3 scripts/bench/precopy.py $(BENCH_ARGS)
	python3 scripts/bench/large.py $(BENCH_ARGS)

bench-quick:
	$(MAKE) bench BENCH_ARGS=--quick

fmt:
	$(CARGO) fmt

clean:
	$(CARGO) clean
