# shellcheck shell=bash
# Shared helpers for qemu-scripts/*.sh. Source it; it defines functions and
# VUT_CACHE, nothing else. Callers set `set -euo pipefail` themselves.

# Everything downloaded or built lives under one cache directory so that a
# test run never touches the host's installed packages beyond apt-get install.
VUT_CACHE=${VUT_CACHE:-$HOME/.cache/vhost-user-tap}

# Prefix for messages; callers override it with their own script name.
VUT_LOG_PREFIX=${VUT_LOG_PREFIX:-qemu-scripts}

vut_log() { echo "$VUT_LOG_PREFIX: $*" >&2; }
vut_die() {
    echo "$VUT_LOG_PREFIX: error: $*" >&2
    exit 1
}

vut_require_root() {
    [[ $(id -u) -eq 0 ]] || vut_die "must run as root ($1)"
}

# apt-get update is slow-ish and touches the network: run it at most once
# per script invocation, and only when something is actually missing.
_vut_apt_updated=0
vut_apt_update_once() {
    if [[ $_vut_apt_updated -eq 0 ]]; then
        vut_log "apt-get update"
        apt-get update -qq || vut_die "apt-get update failed"
        _vut_apt_updated=1
    fi
}

vut_pkg_installed() {
    [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == "install ok installed" ]]
}

# Install the given packages if any is missing (no recommends: keep the host lean).
vut_apt_install() {
    local missing=() p
    for p in "$@"; do
        vut_pkg_installed "$p" || missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    vut_require_root "apt-get install ${missing[*]}"
    vut_apt_update_once
    vut_log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 ||
        vut_die "apt-get install ${missing[*]} failed"
}

# Candidate version of a package ("pkg" or "pkg/suite"), empty if apt knows none.
vut_apt_candidate() {
    local pkg=${1%%/*} suite=${1#*/}
    if [[ $suite == "$1" ]]; then
        apt-cache policy "$pkg" 2>/dev/null | awk '/^  Candidate:/ { if ($2 != "(none)") print $2 }'
    else
        # apt-cache show PKG/SUITE prints the newest version in that suite first.
        apt-cache show "$pkg/$suite" 2>/dev/null | awk '/^Version:/ { print $2; exit }'
    fi
}

# Download PKG=VERSION's .deb into DIR (created). Prints the .deb path.
# APT::Sandbox::User=root: the _apt user cannot write into root's cache dir,
# which otherwise only produces a noisy warning.
vut_apt_download() {
    local pkg=$1 version=$2 dir=$3
    mkdir -p "$dir"
    (cd "$dir" && apt-get download -qq -o APT::Sandbox::User=root "$pkg=$version" >&2) ||
        vut_die "apt-get download $pkg=$version failed"
    # apt names the file pkg_version_arch.deb with ':' in the version escaped
    # as %3a; match on the package name only (callers use a fresh DIR per package).
    local debs=("$dir/${pkg}_"*.deb)
    [[ -f ${debs[0]} ]] || vut_die "apt-get download $pkg=$version produced no .deb in $dir"
    echo "${debs[0]}"
}

# A string that is safe as a directory name (epochs use ':', versions '~' '+').
vut_sanitize() { printf '%s' "$1" | tr -c 'A-Za-z0-9._+-' '_'; }
