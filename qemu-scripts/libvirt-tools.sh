#!/usr/bin/env bash
# Install what tests/libvirt.rs needs: libvirt 9.0 (Debian 12) with its QEMU driver and virsh, and
# the user libvirt runs QEMU as. QEMU 7.2 and the guest come from build-guest.sh.
#
# Only the packages that carry the programs are installed (libvirt-daemon, its QEMU driver,
# libvirt-clients), not libvirt-daemon-system: that one pulls in polkitd, iptables and init
# scripts, and its postinst starts the host's libvirtd with the default network. The test starts
# a private libvirtd of its own instead. What libvirt-daemon-system's postinst would have done that
# the test needs is done here the same way: the system user libvirt-qemu (primary group kvm, also
# in its own group libvirt-qemu, uid/gid 64055 when free), which is the user and group Debian's
# libvirt is built to run QEMU as.
#
# Usage: qemu-scripts/libvirt-tools.sh   (root when something is missing; idempotent, quick)
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VUT_LOG_PREFIX=libvirt-tools
# shellcheck source=lib-vm.sh
source "$SCRIPT_DIR/lib-vm.sh"

vut_apt_install libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 \
    iputils-ping adduser

# Debian's fixed ids for libvirt-qemu (libvirt-daemon-system's postinst uses them when free).
QEMU_ID=64055
if ! getent group kvm >/dev/null; then
    vut_require_root "addgroup kvm"
    addgroup --quiet --system kvm
fi
if ! getent passwd libvirt-qemu >/dev/null; then
    vut_require_root "adduser libvirt-qemu"
    uid_opt=()
    getent passwd "$QEMU_ID" >/dev/null || uid_opt=(--uid "$QEMU_ID")
    adduser --quiet --system --ingroup kvm --disabled-login --disabled-password \
        --home /var/lib/libvirt --no-create-home --gecos "Libvirt Qemu" "${uid_opt[@]}" libvirt-qemu
    vut_log "created user libvirt-qemu"
fi
if ! getent group libvirt-qemu >/dev/null; then
    vut_require_root "addgroup libvirt-qemu"
    gid_opt=()
    getent group "$QEMU_ID" >/dev/null || gid_opt=(--gid "$QEMU_ID")
    addgroup --quiet --system "${gid_opt[@]}" libvirt-qemu
    adduser --quiet libvirt-qemu libvirt-qemu
    vut_log "created group libvirt-qemu"
fi

for tool in libvirtd virsh qemu-system-x86_64; do
    command -v "$tool" >/dev/null || [[ -x /usr/sbin/$tool ]] ||
        vut_die "$tool is still missing after installing the packages"
done
vut_log "$(/usr/sbin/libvirtd --version), $(virsh --version | sed 's/^/virsh /')"
