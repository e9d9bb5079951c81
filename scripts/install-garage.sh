#!/usr/bin/env bash
# Installs Garage, the S3-compatible object store the S3 tests start on
# loopback, unless it is already there. The first build takes 20-35 minutes
# on a 2-core machine; it is cached in ~/.cargo/bin for every later run.
set -euo pipefail
if command -v garage >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/garage" ]; then
    exit 0
fi
echo "building Garage once for the S3 tests (20-35 minutes on 2 cores; cached in ~/.cargo/bin)" >&2
# Only the storage engines the tests use; no metrics or K2V API.
cargo install --locked garage --no-default-features --features bundled-libs,lmdb,sqlite
