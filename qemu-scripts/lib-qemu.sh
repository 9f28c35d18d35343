# shellcheck shell=bash
# QEMU helpers for run-vm.sh and xdp-bench.sh: the version of a QEMU binary,
# and whether KVM really works. Source it after lib-vm.sh (it uses vut_log,
# vut_die and VUT_CACHE); it defines functions only.
#
# Kept apart from lib-vm.sh on purpose: build-guest.sh and fetch-qemu.sh key
# their caches on lib-vm.sh's checksum, so any edit there re-downloads QEMU
# 10.0.2 and rebuilds the guest (and a re-extraction under a running test
# pulls the wrapper from under it).

# "MAJOR MINOR MICRO" of a QEMU binary ("QEMU emulator version 7.2.22 (...)").
vut_qemu_version() {
    local out v
    out=$("$1" --version 2>/dev/null | head -n1) || true
    v=$(sed -n 's/.*version \([0-9][0-9]*\)\.\([0-9][0-9]*\)\.\([0-9][0-9]*\).*/\1 \2 \3/p' <<<"$out")
    [[ -n $v ]] || vut_die "cannot read the version of QEMU $1 (--version said: ${out:-nothing})"
    echo "$v"
}

# KVM or TCG for QEMU binary $1: prints "ACCEL CPU", one of "kvm host"
# (KVM with -cpu host), "kvm default" (KVM with QEMU's default CPU model) or
# "tcg default". KVM only if a Linux kernel really boots to userspace with it.
# /dev/kvm alone proves nothing: on some hosts (nested virtualization, this
# project's CI machine) it exists, SeaBIOS and the boot loader run, and the
# guest kernel then hangs forever (or QEMU aborts setting an MSR for -cpu host).
#
# The probe boots the test guest from build-guest.sh (its vut.mode=probe
# prints VUT-PROBE-OK from /init and powers off), or else the kernel (and
# initrd) given as $2 (and $3), and waits up to VUT_KVM_PROBE_TIMEOUT seconds
# (default 20; a KVM guest reaches userspace in 1-2 s, TCG here in ~7) for a
# sign that userspace or the root mount was reached. It tries -cpu host first
# and, only if QEMU exits at once with it, the default CPU model. The answer
# is cached in $VUT_CACHE/accel-probe/, keyed by the QEMU binary and version,
# the host kernel, /dev/kvm and the probe kernel's contents (not the initrd's:
# rebuilding the test guest does not change what KVM can boot);
# VUT_KVM_REPROBE=1 ignores the cache.
vut_detect_accel() {
    local qemu=$1 kernel=${2:-} initrd=${3:-}
    if [[ ! -e /dev/kvm ]]; then
        vut_log "no /dev/kvm: using TCG"
        echo "tcg default"
        return 0
    fi
    if [[ ! -r /dev/kvm || ! -w /dev/kvm ]]; then
        vut_log "/dev/kvm is not read-writable for $(id -un): using TCG"
        echo "tcg default"
        return 0
    fi
    if [[ -f $VUT_CACHE/guest/vmlinuz && -f $VUT_CACHE/guest/initrd.img ]]; then
        kernel=$VUT_CACHE/guest/vmlinuz
        initrd=$VUT_CACHE/guest/initrd.img
    elif [[ -z $kernel ]]; then
        vut_log "cannot probe KVM: no kernel to boot (run qemu-scripts/build-guest.sh, or pass" \
            "--kernel, or --accel kvm if you know it works); using TCG"
        echo "tcg default"
        return 0
    fi
    local qemu_path key cache_dir cache
    qemu_path=$(command -v "$qemu") || vut_die "QEMU $qemu not found"
    key="probe-v3
$(readlink -f "$qemu_path") $("$qemu" --version 2>/dev/null | head -n1)
host=$(uname -r) kvm=$(stat -L -c '%t:%T' /dev/kvm)
kernel=$(sha256sum <"$kernel" | cut -c1-16)"
    cache_dir=$VUT_CACHE/accel-probe
    cache=$cache_dir/$(sha256sum <<<"$key" | cut -c1-16)
    if [[ ${VUT_KVM_REPROBE:-0} != 1 && -f $cache ]]; then
        vut_log "accel: $(tail -n1 "$cache") (cached in $cache; VUT_KVM_REPROBE=1 to redo)"
        head -n1 "$cache"
        return 0
    fi

    local result="tcg default" why='' cpu outcome
    for cpu in host default; do
        outcome=$(_vut_kvm_boot "$qemu" "$cpu" "$kernel" "$initrd")
        case $outcome in
        booted)
            result="kvm $cpu"
            why="a kernel booted under KVM with -cpu $cpu"
            break
            ;;
        exited)
            why+="QEMU -accel kvm -cpu $cpu exited without booting a kernel; "
            ;;
        *)
            why+="no sign of a booted kernel under KVM -cpu $cpu within ${VUT_KVM_PROBE_TIMEOUT:-20}s (hangs)"
            # A kernel that hangs with the host's CPU model is not rescued by
            # another model; do not wait twice.
            break
            ;;
        esac
    done
    why=${why%; }
    mkdir -p "$cache_dir"
    printf '%s\n%s\n' "$result" "${result%% *}: $why" >"$cache.tmp"
    mv "$cache.tmp" "$cache"
    vut_log "accel: ${result%% *}: $why"
    echo "$result"
}

# One KVM boot attempt for vut_detect_accel: prints booted, exited or hung.
_vut_kvm_boot() {
    local qemu=$1 cpu=$2 kernel=$3 initrd=$4 timeout=${VUT_KVM_PROBE_TIMEOUT:-20}
    local log pid ticks=0 outcome=hung cpu_args=()
    local booted='VUT-PROBE-OK|VUT-BOOT|Run /init as init process|Freeing unused kernel|VFS: Unable to mount root'
    [[ $cpu == host ]] && cpu_args=(-cpu host)
    log=$(mktemp "${TMPDIR:-/tmp}/vut-kvm-probe.XXXXXX")
    vut_log "probing KVM: booting $(basename "$kernel") with -accel kvm -cpu $cpu (up to ${timeout}s, once)"
    # `timeout` bounds QEMU's life even if this shell is killed meanwhile; its
    # margin keeps it from racing the loop below, which decides "hung".
    timeout -k 2 "$((timeout + 10))" "$qemu" -accel kvm "${cpu_args[@]}" -m 256 -smp 1 -display none \
        -nodefaults -no-reboot -serial "file:$log" -kernel "$kernel" ${initrd:+-initrd "$initrd"} \
        -append "console=ttyS0 panic=-1 vut.mode=probe" </dev/null >/dev/null 2>&1 &
    pid=$!
    # VUT-*: the test guest's /init ran. The kernel lines: any other Linux
    # reached its last init steps (the root mount, or starting init).
    while ((ticks < timeout * 5)); do
        if grep -aqE "$booted" "$log"; then
            outcome=booted
            break
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            outcome=exited
            grep -aqE "$booted" "$log" && outcome=booted
            break
        fi
        sleep 0.2
        ticks=$((ticks + 1))
    done
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -f "$log"
    echo "$outcome"
}
