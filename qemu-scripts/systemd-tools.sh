#!/usr/bin/env bash
# Install what tests/systemd.rs needs: systemd-analyze (verify, security --offline,
# syscall-filter) and systemd-socket-activate, both from Debian's package systemd. Nothing here
# needs systemd to be running (the tests do not start units); installing the package on a host
# booted without it only adds the tools.
#
# Usage: qemu-scripts/systemd-tools.sh   (root when something is missing; idempotent, quick)
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VUT_LOG_PREFIX=systemd-tools
# shellcheck source=lib-vm.sh
source "$SCRIPT_DIR/lib-vm.sh"

if ! command -v systemd-analyze >/dev/null || ! command -v systemd-socket-activate >/dev/null; then
    vut_apt_install systemd
fi
for tool in systemd-analyze systemd-socket-activate; do
    command -v "$tool" >/dev/null || vut_die "$tool is still missing after installing systemd"
done
vut_log "$(systemd-analyze --version | head -1)"
