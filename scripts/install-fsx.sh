#!/usr/bin/env bash
# Installs fsx (the Rust port of the classic file-system exerciser) for the
# fsx tests, unless it is already there. About 1.5 minutes on 2 cores; cached
# in ~/.cargo/bin.
set -euo pipefail
if command -v fsx >/dev/null 2>&1 || [ -x "$HOME/.cargo/bin/fsx" ]; then
    exit 0
fi
echo "building fsx once for the fsx tests (about 1.5 minutes)" >&2
cargo install --locked fsx --version 0.3.2
