# shellcheck shell=bash
# Shared by the labs that boot a Debian kernel under QEMU with an initramfs of
# their own (backpressure-lab.sh, kernel-lab.sh): fetch a kernel package
# without installing it, find its vmlinuz and modules in either package
# layout, stage modules for busybox insmod, and build initramfs parts.
# Source lib-vm.sh first; this file defines functions only. Callers set
# `set -euo pipefail` themselves.

# --- apt suites ------------------------------------------------------------------

# Make apt know deb.debian.org's SUITE (main) without ever installing from it:
# the suite is pinned to priority -1 (apt-get download of an explicit version
# still works). Returns 0 and sets _vut_suite_added=1 when it added the suite
# (the caller then runs vut_kernel_apt_refresh once after adding all of them).
_vut_suite_added=0
vut_kernel_add_suite() {
    local suite=$1
    # The suite as a whole word in a one-line (deb ...) or deb822 (Suites: ...)
    # source: "trixie" must not match "trixie-backports".
    if grep -rqsE "^[^#]*[[:space:]]$suite([[:space:]]|\$)" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        return 0
    fi
    vut_require_root "adding $suite to apt's sources"
    vut_log "adding $suite to /etc/apt/sources.list.d/vut-$suite.list (pinned to -1)"
    echo "deb http://deb.debian.org/debian $suite main" >"/etc/apt/sources.list.d/vut-$suite.list"
    # This host is not $suite: nothing from it may ever be installed here by
    # accident. Priority -1 forbids installing from it.
    printf 'Package: *\nPin: release n=%s\nPin-Priority: -1\n' "$suite" >"/etc/apt/preferences.d/vut-$suite"
    _vut_suite_added=1
}

# apt-get update if a suite was added since the last update (lib-vm.sh runs
# it at most once per invocation; a suite added after that needs another).
vut_kernel_apt_refresh() {
    if [[ $_vut_suite_added == 1 ]]; then
        _vut_apt_updated=0
        vut_apt_update_once
        _vut_suite_added=0
    fi
}

# The kernel image package a linux-image metapackage depends on, and its
# version: "PKG VERSION" on stdout, nothing if apt does not know the
# metapackage. $1 is "linux-image-amd64" (the host's candidate: what
# build-guest.sh uses) or "linux-image-amd64/SUITE" (the newest in SUITE).
vut_kernel_resolve_meta() {
    local spec=$1 stanza pkg ver
    if [[ $spec == */* ]]; then
        stanza=$(apt-cache show "$spec" 2>/dev/null | sed '/^$/q')
    else
        stanza=$(apt-cache show --no-all-versions "$spec" 2>/dev/null | sed '/^$/q')
    fi
    # "Depends: linux-image-6.1.0-57-amd64 (= 6.1.192-3)"; the version may be absent.
    read -r pkg ver < <(sed -n 's/^Depends:.*\(linux-image-[0-9][^ ,]*\)\( (= \([^)]*\))\)\?.*/\1 \3/p' \
        <<<"$stanza" | head -n1) || true
    [[ -n ${pkg:-} ]] || return 0
    if [[ -z ${ver:-} ]]; then
        if [[ $spec == */* ]]; then
            ver=$(vut_apt_candidate "$pkg/${spec#*/}")
        else
            ver=$(vut_apt_candidate "$pkg")
        fi
    fi
    [[ -n $ver ]] && echo "$pkg $ver"
}

# --- download and locate ---------------------------------------------------------

# Download PKG=VERSION for each PKG and extract them all into KDIR/root
# (never installed). Skipped when KDIR/extracted exists; a partial download
# or extraction from an interrupted run is discarded first.
vut_kernel_fetch() {
    local kdir=$1 version=$2 pkg deb
    shift 2
    [[ -f $kdir/extracted ]] && return 0
    vut_require_root "apt-get download"
    rm -rf "$kdir"
    for pkg in "$@"; do
        vut_log "downloading $pkg=$version"
        deb=$(vut_apt_download "$pkg" "$version" "$kdir/deb/$pkg")
        dpkg -x "$deb" "$kdir/root"
    done
    rm -rf "$kdir/deb"
    touch "$kdir/extracted"
}

# Find the kernel in an extracted package tree ROOT. Sets VUT_KREL (its
# release, `uname -r`), VUT_VMLINUZ and VUT_MODDIR. Two layouts:
#   /boot/vmlinuz-KREL + /lib/modules/KREL or /usr/lib/modules/KREL (linux-image-*)
#   /usr/lib/modules/KREL/vmlinuz (linux-binary-* of the split packages)
vut_kernel_locate() {
    local root=$1 found=()
    VUT_KREL='' VUT_VMLINUZ='' VUT_MODDIR=''
    mapfile -t found < <(find "$root/boot" -maxdepth 1 -name 'vmlinuz-*' 2>/dev/null)
    if [[ ${#found[@]} -eq 1 ]]; then
        VUT_VMLINUZ=${found[0]}
        VUT_KREL=${VUT_VMLINUZ##*/vmlinuz-}
        local d
        for d in "$root/lib/modules/$VUT_KREL" "$root/usr/lib/modules/$VUT_KREL"; do
            [[ -d $d/kernel ]] && VUT_MODDIR=$d
        done
    else
        mapfile -t found < <(find "$root/usr/lib/modules" "$root/lib/modules" -mindepth 2 -maxdepth 2 \
            -name vmlinuz 2>/dev/null)
        [[ ${#found[@]} -eq 1 ]] || vut_die "expected one kernel in $root, found ${#found[@]} vmlinuz"
        VUT_VMLINUZ=${found[0]}
        VUT_MODDIR=$(dirname "$VUT_VMLINUZ")
        VUT_KREL=$(basename "$VUT_MODDIR")
    fi
    [[ -f $VUT_VMLINUZ ]] || vut_die "no vmlinuz in $root"
    [[ -n $VUT_MODDIR && -d $VUT_MODDIR/kernel ]] || vut_die "no modules for $VUT_KREL in $root"
}

# --- the labs' kernels -----------------------------------------------------------

# The kernels the labs boot, by short name. The Debian suite each comes from
# (empty: the host's own lists) is what vut_kernel_add_suite needs.
VUT_LAB_KERNELS=(5.10 6.1 6.12 7.3)
vut_kernel_suite() {
    case $1 in
    5.10) echo bullseye ;;              # Debian 11's stock kernel
    6.1) echo "" ;;                     # Debian 12's, the host's candidate (build-guest.sh's)
    6.12) echo trixie ;;                # Debian 13's stock kernel
    7.3) echo trixie-backports ;;       # the cloud kernel with IFF_BACKPRESSURE
    *) vut_die "unknown kernel $1 (one of ${VUT_LAB_KERNELS[*]})" ;;
    esac
}
# The 7.3 cloud kernel's ABI name: split packages linux-binary-* (vmlinuz),
# linux-modules-* (.ko.xz), linux-base-* (config, modules.builtin).
VUT_KABI_73=7.3.4+deb13-cloud-amd64

# Resolve, download (once, into the cache) and locate kernel NAME (5.10, 6.1,
# 6.12, 7.3). Sets VUT_KPKG and VUT_KVERSION (the Debian package and version),
# VUT_KDIR (its cache directory) and, from vut_kernel_locate, VUT_KREL,
# VUT_VMLINUZ, VUT_MODDIR. The caches are shared: 6.1 is build-guest.sh's
# kernel ($VUT_CACHE/kernel/), 7.3 is the backpressure lab's ($VUT_CACHE/lab-kernel/).
vut_kernel_prepare() {
    local name=$1 suite pkgs=() cache=kernel resolved=
    suite=$(vut_kernel_suite "$name")
    [[ -z $suite ]] || vut_kernel_add_suite "$suite"
    vut_kernel_apt_refresh
    _vut_kernel_resolve() {
        case $name in
        7.3)
            VUT_KPKG=linux-binary-$VUT_KABI_73
            VUT_KVERSION=$(vut_apt_candidate "$VUT_KPKG/$suite")
            ;;
        6.1)
            resolved=$(vut_kernel_resolve_meta linux-image-amd64)
            # A host that is not bookworm: take Debian 12's explicitly.
            if [[ -n $resolved && $resolved != linux-image-6.1.* ]]; then
                vut_kernel_add_suite bookworm
                vut_kernel_apt_refresh
                resolved=$(vut_kernel_resolve_meta linux-image-amd64/bookworm)
            fi
            read -r VUT_KPKG VUT_KVERSION <<<"$resolved" || true
            ;;
        *)
            resolved=$(vut_kernel_resolve_meta "linux-image-amd64/$suite")
            read -r VUT_KPKG VUT_KVERSION <<<"$resolved" || true
            ;;
        esac
    }
    VUT_KPKG='' VUT_KVERSION=''
    _vut_kernel_resolve
    if [[ -z ${VUT_KVERSION:-} ]]; then
        # Stale or empty lists: one update, then ask again.
        vut_apt_update_once
        _vut_kernel_resolve
    fi
    [[ -n ${VUT_KPKG:-} && -n ${VUT_KVERSION:-} ]] ||
        vut_die "kernel $name: no package found (apt-cache show linux-image-amd64${suite:+/$suite})"
    if [[ $name == 7.3 ]]; then
        pkgs=("linux-binary-$VUT_KABI_73" "linux-modules-$VUT_KABI_73" "linux-base-$VUT_KABI_73")
        cache=lab-kernel
        VUT_KDIR=$VUT_CACHE/$cache/$(vut_sanitize "${VUT_KABI_73}_$VUT_KVERSION")
    else
        pkgs=("$VUT_KPKG")
        VUT_KDIR=$VUT_CACHE/$cache/$(vut_sanitize "${VUT_KPKG}_$VUT_KVERSION")
    fi
    vut_kernel_fetch "$VUT_KDIR" "$VUT_KVERSION" "${pkgs[@]}"
    vut_kernel_locate "$VUT_KDIR/root"
}

# --- modules ---------------------------------------------------------------------

# File names may use '-' where the module name has '_' and vice versa.
_vut_module_pattern() { echo "${1//[-_]/[-_]}"; }

# Is module NAME built into the kernel of MODDIR?
vut_module_builtin() {
    local moddir=$1 name=$2
    grep -Eq "/$(_vut_module_pattern "$name")\.ko\$" "$moddir/modules.builtin" 2>/dev/null
}

# The file of module NAME under MODDIR/kernel (.ko, .ko.xz, .ko.zst, .ko.gz), or nothing.
vut_module_file() {
    local moddir=$1 name=$2
    find "$moddir/kernel" -regextype posix-extended \
        -regex ".*/$(_vut_module_pattern "$name")\.ko(\.xz|\.zst|\.gz)?" -print -quit
}

# A module file, decompressed (busybox insmod wants a plain ELF file).
vut_module_cat() {
    case $1 in
    *.ko.xz) xz -dc "$1" ;;
    *.ko.zst) zstd -dcq "$1" ;;
    *.ko.gz) gzip -dc "$1" ;;
    *) cat "$1" ;;
    esac
}

# Stage modules of MODDIR for insmod into STAGE/lib/modules/NAME.ko, their
# dependencies (read from each module's depends=, as the .deb ships no
# modules.dep) first, and append the load order to STAGE/etc/vut-modules.
#   vut_stage_modules MODDIR STAGE [--optional] NAME...
# A NAME after --optional may be missing (it is then left out and logged);
# a missing required one is fatal. Built-in modules are skipped. Sets
# VUT_STAGED_MODULES (load order), VUT_BUILTIN_MODULES and VUT_MISSING_MODULES.
vut_stage_modules() {
    local moddir=$1 stage=$2 optional=0 name
    shift 2
    mkdir -p "$stage/lib/modules" "$stage/etc"
    declare -gA _vut_mod_seen=()
    VUT_STAGED_MODULES=() VUT_BUILTIN_MODULES=() VUT_MISSING_MODULES=()
    [[ -f $moddir/modules.builtin ]] || vut_log "warning: no modules.builtin in $moddir"
    for name in "$@"; do
        if [[ $name == --optional ]]; then
            optional=1
            continue
        fi
        _vut_stage_module "$moddir" "$stage" "$name" "$optional"
    done
    touch "$stage/etc/vut-modules"
    [[ ${#VUT_STAGED_MODULES[@]} -eq 0 ]] || printf '%s\n' "${VUT_STAGED_MODULES[@]}" >>"$stage/etc/vut-modules"
}
_vut_stage_module() {
    local moddir=$1 stage=$2 name=$3 optional=$4 file deps dep
    [[ -n ${_vut_mod_seen[$name]:-} ]] && return 0
    _vut_mod_seen[$name]=1
    if vut_module_builtin "$moddir" "$name"; then
        VUT_BUILTIN_MODULES+=("$name")
        return 0
    fi
    file=$(vut_module_file "$moddir" "$name")
    if [[ -z $file ]]; then
        [[ $optional == 1 ]] || vut_die "module $name neither built in nor under $moddir"
        VUT_MISSING_MODULES+=("$name")
        return 0
    fi
    vut_module_cat "$file" >"$stage/lib/modules/$name.ko"
    deps=$(tr '\0' '\n' <"$stage/lib/modules/$name.ko" | sed -n 's/^depends=//p' | head -n1)
    for dep in ${deps//,/ }; do
        # A module's dependencies are never optional.
        _vut_stage_module "$moddir" "$stage" "$dep" 0
    done
    VUT_STAGED_MODULES+=("$name")
}

# --- initramfs -------------------------------------------------------------------

# The skeleton every lab initramfs has: the usual directories, busybox-static
# with its applets as relative links (busybox --install would link to the
# host's absolute path), /dev/console (the kernel opens it for init before
# anything is mounted), /var/run -> /run.
vut_initramfs_base() {
    local stage=$1 applet
    mkdir -p "$stage"/{bin,usr/bin,usr/sbin,dev,etc,proc,sys,tmp,run,var,lib/modules}
    ln -sfn ../run "$stage/var/run"
    cp /bin/busybox "$stage/bin/busybox"
    for applet in $(/bin/busybox --list); do
        [[ $applet == busybox ]] || ln -sf busybox "$stage/bin/$applet"
    done
    mknod -m 600 "$stage/dev/console" c 5 1
}

# Copy the shared libraries PROG... need, and the loader, into STAGE at the
# paths ldd names, so dynamically linked host programs run unchanged.
vut_initramfs_add_libs() {
    local stage=$1 lib prog
    shift
    for lib in $(for prog in "$@"; do
        ldd "$prog" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
    done | sort -u); do
        mkdir -p "$stage$(dirname "$lib")"
        cp -L "$lib" "$stage$lib"
    done
}

# Pack STAGE into an uncompressed newc archive OUT (atomically). Uncompressed:
# under TCG the kernel would spend longer inflating it than the disk space is
# worth. Several archives may be concatenated into one initrd.
vut_initramfs_pack() {
    local stage=$1 out=$2
    mkdir -p "$(dirname "$out")"
    (cd "$stage" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --owner=0:0 --quiet) \
        >"$out.tmp"
    mv "$out.tmp" "$out"
}
