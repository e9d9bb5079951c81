# recoverfs — two promises: `make demo` and `make test` on a fresh Debian machine.

SHELL := /bin/bash
CARGO ?= cargo
DEMO ?= tiny

# Debian packages the build, tests and demo need. qemu-utils is pinned to the
# same version as qemu-system-x86 because installing one replaces the other.
APT_PACKAGES := fuse3 fio curl qemu-system-x86 python3

.PHONY: all build release deps test demo bench clean fmt

all: build

# Installs missing system packages (as root, or through sudo).
deps:
	@scripts/install-deps.sh $(APT_PACKAGES)

build:
	$(CARGO) build

release:
	$(CARGO) build --release

test: deps
	$(CARGO) build --all-targets
	$(CARGO) test --no-fail-fast -- --test-threads=2

demo: deps release
	scripts/demo.sh

fmt:
	$(CARGO) fmt

clean:
	$(CARGO) clean
