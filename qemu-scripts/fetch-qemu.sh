#!/usr/bin/env bash
# Fetch QEMU 10.0.2 (x86) from bookworm-backports into a private directory,
# next to the system's QEMU 7.2, which stays untouched.
#
# Usage: qemu-scripts/fetch-qemu.sh
#   Result: ${VUT_CACHE:-$HOME/.cache/vhost-user-tap}/qemu-10/qemu-system-x86_64,
#   a wrapper usable exactly like the system binary. Prints its path.
#
# How: add bookworm-backports to apt's sources if missing (its default pin
# priority is 100, so nothing installed gets upgraded by it), apt-get download
# the QEMU debs, dpkg -x them into the cache. Their shared-library
# dependencies are ordinary bookworm packages and get apt-get installed if
# missing. Idempotent: a second run only checks versions (seconds).
#
# Why a wrapper: the extracted binary was built for /usr paths. Left alone it
# would load QEMU 7.2's modules from /usr/lib/x86_64-linux-gnu/qemu (abort on
# version mismatch) and 7.2's option ROMs from /usr/share/qemu. The wrapper
# points QEMU_MODULE_DIR at an empty directory (no modules: fine for
# -nographic/-display none; a missing module is reported, not loaded) and puts
# its own firmware first with -L.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VUT_LOG_PREFIX=fetch-qemu
# shellcheck source=lib-vm.sh
source "$SCRIPT_DIR/lib-vm.sh"

WANT_VERSION=10.0.2
SUITE=bookworm-backports
DEST=$VUT_CACHE/qemu-10
WRAPPER=$DEST/qemu-system-x86_64
# qemu-system-x86 holds the binary; -common and -data are required by it (the
# latter has the option ROMs, keymaps, linuxboot_dma.bin). seabios: the
# backported QEMU depends on seabios >> 1.16.3-1~ while bookworm has 1.16.2.
PACKAGES=(qemu-system-x86 qemu-system-common qemu-system-data seabios)

# --- apt source --------------------------------------------------------------
if ! grep -rqsE "^[^#]*bookworm-backports|^Suites:.*bookworm-backports" \
    /etc/apt/sources.list /etc/apt/sources.list.d/; then
    vut_require_root "adding $SUITE to apt sources"
    vut_log "adding $SUITE to /etc/apt/sources.list.d/vut-bookworm-backports.list"
    echo "deb http://deb.debian.org/debian $SUITE main" >/etc/apt/sources.list.d/vut-bookworm-backports.list
    vut_apt_update_once
fi

# The versions in $SUITE, all in one apt-cache call (this machine's apt keeps
# no pkgcache.bin: each call parses every list, ~0.5 s).
declare -A VERSION=()
read_versions() {
    local pkg version
    while read -r pkg version; do
        VERSION[$pkg]=$version
    done < <(apt-cache show --no-all-versions "${PACKAGES[@]/%//$SUITE}" 2>/dev/null |
        awk '/^Package:/ { p = $2 } /^Version:/ { print p, $2 }')
}
read_versions
if [[ ${#VERSION[@]} -ne ${#PACKAGES[@]} ]]; then
    # The source exists but its lists were never fetched.
    vut_apt_update_once
    read_versions
fi
for pkg in "${PACKAGES[@]}"; do
    [[ -n ${VERSION[$pkg]:-} ]] || vut_die "$pkg not found in $SUITE (apt-cache show $pkg/$SUITE)"
done
case ${VERSION[qemu-system-x86]} in
*:"$WANT_VERSION"+*) ;;
*) vut_die "$SUITE has qemu-system-x86 ${VERSION[qemu-system-x86]}, expected $WANT_VERSION" ;;
esac

INPUTS="fetch-qemu=$(sha256sum "$0" | cut -d' ' -f1)
lib-vm=$(sha256sum "$SCRIPT_DIR/lib-vm.sh" | cut -d' ' -f1)"
for pkg in "${PACKAGES[@]}"; do
    INPUTS+=$'\n'"$pkg=${VERSION[$pkg]}"
done

# Libraries the binary needs must come from bookworm proper (a backport is
# built against stable); install the missing ones. Package names come from
# the debs' Depends, minus the packages we extract ourselves.
install_runtime_deps() {
    local deps=() dep deb
    for deb in "$DEST"/debs/*/*.deb; do
        while read -r dep; do
            case $dep in
            "" | qemu-* | seabios) ;;
            *) deps+=("${dep%%:*}") ;;
            esac
        done < <(dpkg-deb -f "$deb" Depends | tr ',' '\n' | sed 's/([^)]*)//g; s/|.*//; s/[[:space:]]//g')
    done
    [[ ${#deps[@]} -gt 0 ]] && vut_apt_install "${deps[@]}"
    return 0
}

check_libraries() {
    local missing
    missing=$(ldd "$DEST/root/usr/bin/qemu-system-x86_64" | awk '/not found/ { print $1 }')
    [[ -z $missing ]] || vut_die "QEMU $WANT_VERSION needs libraries that are not installed: ${missing//$'\n'/ }"
}

check_wrapper() {
    local out
    out=$("$WRAPPER" --version 2>&1) || vut_die "$WRAPPER --version failed: $out"
    [[ $out == *"version $WANT_VERSION"* ]] ||
        vut_die "$WRAPPER --version does not report $WANT_VERSION: $out"
}

if [[ -x $WRAPPER && -f $DEST/inputs && $(cat "$DEST/inputs") == "$INPUTS" ]]; then
    check_libraries
    check_wrapper
    vut_log "up to date (qemu-system-x86 ${VERSION[qemu-system-x86]})"
    echo "$WRAPPER"
    exit 0
fi

vut_require_root "apt-get download / install"
rm -rf "$DEST"
mkdir -p "$DEST/debs" "$DEST/empty-modules"
for pkg in "${PACKAGES[@]}"; do
    vut_log "downloading $pkg=${VERSION[$pkg]}"
    deb=$(vut_apt_download "$pkg" "${VERSION[$pkg]}" "$DEST/debs/$pkg")
    dpkg -x "$deb" "$DEST/root"
done
install_runtime_deps
check_libraries

# QEMU appends its compiled-in firmware path (/usr/share/qemu,
# /usr/share/seabios, /usr/lib/ipxe/qemu, ...) after the -L directories, so
# anything the private tree lacks (e.g. ipxe's efi-virtio.rom) still comes
# from the system.
cat >"$WRAPPER.tmp" <<EOF
#!/bin/sh
# Generated by qemu-scripts/fetch-qemu.sh: QEMU ${VERSION[qemu-system-x86]} from $SUITE,
# extracted under $DEST/root. Use it like /usr/bin/qemu-system-x86_64.
# QEMU_MODULE_DIR: an empty directory, so 7.2's modules in /usr/lib are never loaded.
export QEMU_MODULE_DIR="$DEST/empty-modules"
exec "$DEST/root/usr/bin/qemu-system-x86_64" \\
    -L "$DEST/root/usr/share/qemu" -L "$DEST/root/usr/share/seabios" -L /usr/share/seabios "\$@"
EOF
chmod 755 "$WRAPPER.tmp"
mv "$WRAPPER.tmp" "$WRAPPER"
check_wrapper
# Written last: its presence means the tree and wrapper above are complete.
echo "$INPUTS" >"$DEST/inputs"
vut_log "$("$WRAPPER" --version | head -n1)"
echo "$WRAPPER"
