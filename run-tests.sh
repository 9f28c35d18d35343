#!/usr/bin/env bash
# The project's one test command (README "Testing"; .ci/run calls it).
#
# Installs what the tests need -- Debian packages (QEMU 7.2, busybox, ...), the guest kernel,
# QEMU 10.0.2 from bookworm-backports -- then checks formatting and lints and runs every test:
# unit tests, the daemon's integration tests (real tap, network namespaces, the synthetic
# guest) and the real-QEMU end-to-end tests. Needs root (taps, namespaces, apt).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

if [[ $(id -u) -ne 0 ]]; then
    echo "run-tests.sh: must run as root (creates taps and network namespaces, installs packages)" >&2
    exit 1
fi

echo "== prerequisites"
qemu-scripts/build-guest.sh
qemu-scripts/fetch-qemu.sh
qemu-scripts/systemd-tools.sh
qemu-scripts/libvirt-tools.sh
qemu-scripts/backpressure-lab.sh --fetch-only
qemu-scripts/kernel-lab.sh --kernel all --fetch-only
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    rustup component add rustfmt clippy
fi

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

echo "== tests"
cargo test --workspace --all-targets -- "$@"
