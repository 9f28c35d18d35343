#!/usr/bin/env bash
# The kernel lab: do the project's datapath scenarios pass on a given Linux?
#
# Boots a Debian kernel under QEMU (TCG, 2 vCPUs, 2 GiB, no NIC) as the *host*
# of the project's own integration tests: the test binary of tests/daemon.rs,
# the daemon and the synthetic guest of this build (debug profile) run inside
# it, each test with its own network namespace and tap, held to the same
# assertions as on the machine that built them. One libtest invocation per
# scenario (`--exact NAME --test-threads=1`), each killed after a time limit;
# qemu-scripts/kernel-lab/init.sh is the VM's /init and describes the console
# markers. vut-report (built with the guest, run on this host after the VMs;
# crates/vhost-user-tap-guest/src/report/klab.rs) turns the consoles into a
# scenario x kernel table with every failure's output and results.json.
#
# Usage: qemu-scripts/kernel-lab.sh --kernel 5.10|6.1|6.12|7.3|all [options]
#   --kernel K       the kernel(s): 5.10 (Debian 11's stock linux-image-amd64),
#                    6.1 (Debian 12's, the test guest's kernel), 6.12 (Debian
#                    13's), 7.3 (trixie-backports' 7.3.4 cloud kernel with
#                    IFF_BACKPRESSURE), all, or a comma-separated list
#   --quick          fewer rounds: 300 stop/wake iterations instead of 1000,
#                    TCP 4 MiB each way instead of 16 (about a minute per
#                    kernel under TCG)
#   --tests LIST     scenarios to run, comma-separated: labels (tx, rx, ...;
#                    --list shows them) or any test name of tests/daemon.rs
#                    (default: every scenario)
#   --out DIR        write DIR/results.json, DIR/table.txt, DIR/KERNEL/console.log
#                    and DIR/KERNEL/run.txt (how its VM ran)
#   --qemu PATH      QEMU binary (default: qemu-system-x86_64 in PATH)
#   --test-timeout S seconds one scenario may take before it is killed
#                    (default 120 with --quick, 600 otherwise)
#   --daemon-args A  extra daemon options for every scenario, e.g.
#                    "--no-io-uring" (words of [A-Za-z0-9=,._/:-])
#   --fetch-only     install the packages and fetch the kernel(s), then exit
#   --list           print the scenarios and exit
#
# Exit status: 0 when every scenario ran and passed on every kernel asked for
# (and each booted the release asked for); 1 otherwise (the table is printed
# anyway); 2 for usage.
#
# Needs root (apt-get, mknod for the initramfs). Installs only this host's
# Debian packages. Kernels are downloaded with apt-get download from suites
# pinned to priority -1 (bullseye, trixie, trixie-backports; never installed)
# and extracted under ${VUT_CACHE:-$HOME/.cache/vhost-user-tap}/kernel/ and
# lab-kernel/ (shared with build-guest.sh and backpressure-lab.sh); the
# initramfs parts are cached in kernel-lab/ there.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
KLAB_DIR=$SCRIPT_DIR/kernel-lab
VUT_LOG_PREFIX=kernel-lab
# shellcheck source=lib-vm.sh
source "$SCRIPT_DIR/lib-vm.sh"
# shellcheck source=lib-kernel.sh
source "$SCRIPT_DIR/lib-kernel.sh"

usage() {
    sed -n '/^# Usage:/,/^# Exit status/p' "$0" | sed 's/^# \{0,1\}//' | head -n -1 >&2
    exit 2
}
bad_usage() {
    echo "kernel-lab: $*" >&2
    exit 2
}

# The scenarios: label and test name in tests/daemon.rs, in running order.
SCENARIOS=(
    "tx guest_frames_reach_a_host_socket"
    "rx host_datagrams_reach_the_guest_byte_exact_and_in_order"
    "rx-no-mrg host_datagrams_reach_the_guest_byte_exact_and_in_order_without_mrg_rxbuf"
    "rx-no-event-idx host_datagrams_reach_the_guest_byte_exact_and_in_order_without_event_idx"
    "rx-neither host_datagrams_reach_the_guest_byte_exact_and_in_order_without_mrg_rxbuf_or_event_idx"
    "stop-wake full_rx_ring_stops_reading_the_tap_and_resumes_on_kick_1000_times"
    "multiqueue flows_spread_over_four_queue_pairs_all_arrive"
    "tcp-offloads tcp_through_the_daemon_arrives_intact_with_offloads"
    "tcp-no-offloads tcp_through_the_daemon_arrives_intact_without_offloads"
    "bad-descriptors malformed_descriptors_are_rejected_and_traffic_goes_on"
    "sigterm sigterm_exits_zero_and_removes_the_socket"
    "startup-report startup_report_matches_what_this_kernel_supports"
    "metrics metrics_show_where_frames_went_and_move_with_traffic"
    "restart-after-kill a_daemon_started_right_after_a_sigkill_gets_the_tap"
)

KERNELS=
QUICK=0
TESTS=
OUT_DIR=
QEMU=qemu-system-x86_64
TEST_TIMEOUT=
DAEMON_ARGS=
FETCH_ONLY=0
while [[ $# -gt 0 ]]; do
    case $1 in
    --kernel) KERNELS=${2:?}; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --tests) TESTS=${2:?}; shift 2 ;;
    --out) OUT_DIR=${2:?}; shift 2 ;;
    --qemu) QEMU=${2:?}; shift 2 ;;
    --test-timeout) TEST_TIMEOUT=${2:?}; shift 2 ;;
    --daemon-args) DAEMON_ARGS=${2?}; shift 2 ;;
    --fetch-only) FETCH_ONLY=1; shift ;;
    --list) printf '%s\n' "${SCENARIOS[@]}"; exit 0 ;;
    -h | --help) usage ;;
    *) bad_usage "unknown option $1 (--help lists them)" ;;
    esac
done
[[ -n $KERNELS ]] || bad_usage "--kernel is required (5.10, 6.1, 6.12, 7.3 or all)"
[[ $KERNELS == all ]] && KERNELS=$(IFS=,; echo "${VUT_LAB_KERNELS[*]}")
IFS=, read -r -a KLIST <<<"$KERNELS"
for k in "${KLIST[@]}"; do
    [[ " ${VUT_LAB_KERNELS[*]} " == *" $k "* ]] || bad_usage "--kernel: $k is not one of ${VUT_LAB_KERNELS[*]} all"
done
[[ -z $TEST_TIMEOUT ]] && TEST_TIMEOUT=$([[ $QUICK == 1 ]] && echo 120 || echo 600)
[[ $TEST_TIMEOUT =~ ^[1-9][0-9]*$ ]] || bad_usage "--test-timeout: a whole number > 0"
[[ $DAEMON_ARGS =~ ^[A-Za-z0-9=,._/:\ -]*$ ]] || bad_usage "--daemon-args: words of [A-Za-z0-9=,._/:-]"

# The scenarios asked for, as "label test" lines.
PLAN=()
if [[ -z $TESTS ]]; then
    PLAN=("${SCENARIOS[@]}")
else
    IFS=, read -r -a wanted <<<"$TESTS"
    for w in "${wanted[@]}"; do
        [[ $w =~ ^[a-z0-9_-]+$ ]] || bad_usage "--tests: $w is not a label or test name"
        match=
        for s in "${SCENARIOS[@]}"; do
            [[ ${s% *} == "$w" || ${s#* } == "$w" ]] && match=$s
        done
        # Any other test of tests/daemon.rs runs under its own name.
        PLAN+=("${match:-$w $w}")
    done
fi
TEST_NAMES=$(for s in "${PLAN[@]}"; do echo "${s#* }"; done | paste -sd,)

# Quick mode: the same assertions with fewer rounds (full: 1000 stop/wake
# iterations, 16 MiB each way per offload set). Measured here (QEMU 7.2 TCG,
# 2 vCPUs): a kernel's VM runs 40-57 s quick, 84-101 s full; stop/wake is
# ~65 ms an iteration, the rest of the scenarios ~20 s together.
if [[ $QUICK == 1 ]]; then
    TEST_ENV=VUT_STOPWAKE_ITERATIONS=300,VUT_TCP_BYTES=4194304
else
    TEST_ENV=
fi
# --daemon-args: the tests run a wrapper that adds them (VUT_DAEMON_BIN).
[[ -z ${DAEMON_ARGS// /} ]] || TEST_ENV+=${TEST_ENV:+,}VUT_DAEMON_BIN=/usr/bin/vut-daemon-with-args

vut_require_root "apt-get, and mknod in the initramfs"
# busybox-static: the VM's userland; iproute2: ip, tc, ss for the tests
# (busybox's ip has no netns); binutils: strip; xz-utils/zstd: compressed
# modules; qemu-system-x86: QEMU 7.2.
vut_apt_install busybox-static cpio xz-utils zstd binutils iproute2 qemu-system-x86

# --- the kernels -------------------------------------------------------------------
# Every suite first, then one apt-get update for all of them.
for k in "${KLIST[@]}"; do
    suite=$(vut_kernel_suite "$k")
    [[ -z $suite ]] || vut_kernel_add_suite "$suite"
done
vut_kernel_apt_refresh
declare -A K_PKG=() K_VER=() K_REL=() K_VMLINUZ=() K_MODDIR=()
for k in "${KLIST[@]}"; do
    vut_kernel_prepare "$k"
    K_PKG[$k]=$VUT_KPKG K_VER[$k]=$VUT_KVERSION K_REL[$k]=$VUT_KREL
    K_VMLINUZ[$k]=$VUT_VMLINUZ K_MODDIR[$k]=$VUT_MODDIR
    vut_log "kernel $k: $VUT_KPKG $VUT_KVERSION (release $VUT_KREL) in $VUT_KDIR"
done
if [[ $FETCH_ONLY == 1 ]]; then
    exit 0
fi

# --- the binaries ------------------------------------------------------------------
# The integration test binary of tests/daemon.rs and the daemon and guest of
# the same build: cargo names the first in its JSON messages (one object a
# line; the test target's "executable"); the others are in the profile
# directory above it (target/debug/deps/.. = target/debug). vut-report, the
# guest package's report tool, runs here on the host only.
vut_log "cargo test --no-run --test daemon, cargo build -p vhost-user-tap-guest (debug build)"
CARGO_JSON=$(cd "$REPO" && cargo test --no-run -p vhost-user-tap --test daemon --message-format=json) ||
    vut_die "cargo test --no-run --test daemon failed"
(cd "$REPO" && cargo build --quiet -p vhost-user-tap-guest) || vut_die "cargo build -p vhost-user-tap-guest failed"
TESTS_EXE=$(grep '"reason":"compiler-artifact"' <<<"$CARGO_JSON" |
    grep '"target":{"kind":\["test"\],[^}]*"name":"daemon"' |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n1)
[[ -n $TESTS_EXE && -x $TESTS_EXE ]] || vut_die "cargo named no test executable for tests/daemon.rs"
BIN_DIR=$(cd "$(dirname "$TESTS_EXE")/.." && pwd)
DAEMON=$BIN_DIR/vhost-user-tap
GUEST=$BIN_DIR/vhost-user-tap-guest
REPORT=$BIN_DIR/vut-report
[[ -x $DAEMON && -x $GUEST ]] || vut_die "no vhost-user-tap / vhost-user-tap-guest in $BIN_DIR"
[[ -x $REPORT ]] || vut_die "no vut-report in $BIN_DIR"
vut_log "test binary $TESTS_EXE"

# --- the initramfs -----------------------------------------------------------------
# Two archives, concatenated per run (the kernel unpacks them in turn): the
# programs, the same for every kernel, and each kernel's modules.
IMG=$VUT_CACHE/kernel-lab
mkdir -p "$IMG"
# One lab at a time: the cached parts are shared, and the machine runs one VM.
exec 9>"$IMG/lock"
flock 9
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vut-kernel-lab.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
hash_of() { sha256sum "$@" | cut -d' ' -f1 | sha256sum | cut -c1-16; }
SS=$(command -v ss)
PROGS_INPUTS="lab=$(hash_of "$0" "$SCRIPT_DIR/lib-vm.sh" "$SCRIPT_DIR/lib-kernel.sh" "$KLAB_DIR/init.sh")
binaries=$(hash_of "$TESTS_EXE" "$DAEMON" "$GUEST")
busybox=$(dpkg-query -W -f='${Version}' busybox-static)
iproute2=$(dpkg-query -W -f='${Version}' iproute2)
libc6=$(dpkg-query -W -f='${Version}' libc6)"
PROGS=$IMG/programs.cpio

build_programs() {
    local stage=$WORK/programs
    vut_initramfs_base "$stage"
    # Debug builds, stripped of their debug info (the test binary and the
    # daemon carry tens of MB of it).
    strip --strip-debug -o "$stage/usr/bin/vut-daemon-tests" "$TESTS_EXE"
    strip --strip-debug -o "$stage/usr/bin/vhost-user-tap" "$DAEMON"
    strip --strip-debug -o "$stage/usr/bin/vhost-user-tap-guest" "$GUEST"
    cp /usr/sbin/ip /usr/sbin/tc "$SS" "$stage/usr/sbin/"
    vut_initramfs_add_libs "$stage" "$TESTS_EXE" "$DAEMON" "$GUEST" /usr/sbin/ip /usr/sbin/tc "$SS"
    install -m 755 "$KLAB_DIR/init.sh" "$stage/init"
    rm -f "$PROGS.inputs"
    vut_initramfs_pack "$stage" "$PROGS"
    echo "$PROGS_INPUTS" >"$PROGS.inputs"
    vut_log "programs archive $(du -h "$PROGS" | cut -f1)"
}
if [[ -f $PROGS && -f $PROGS.inputs && $(cat "$PROGS.inputs") == "$PROGS_INPUTS" ]]; then
    vut_log "programs archive up to date"
else
    build_programs
fi

# Modules: tun (every test's tap). Optional: sch_fq_codel (a qdisc the daemon
# may be asked to install; pfifo is always built in), and the socket
# diagnostics ss needs when the TCP test prints its sockets on failure.
# Namespaces, IPv6 and io_uring are built into every Debian kernel here.
REQUIRED_MODULES=(tun)
OPTIONAL_MODULES=(sch_fq_codel inet_diag tcp_diag udp_diag)
modules_archive() {
    local k=$1 moddir=${K_MODDIR[$1]} out inputs stage
    out=$IMG/modules-$(vut_sanitize "${K_REL[$k]}_${K_VER[$k]}").cpio
    inputs="lib=$(hash_of "$SCRIPT_DIR/lib-kernel.sh") modules=${REQUIRED_MODULES[*]} ${OPTIONAL_MODULES[*]}"
    if [[ ! -f $out || ! -f $out.inputs || $(cat "$out.inputs") != "$inputs" ]]; then
        stage=$WORK/modules-$k
        mkdir -p "$stage"
        vut_stage_modules "$moddir" "$stage" "${REQUIRED_MODULES[@]}" --optional "${OPTIONAL_MODULES[@]}"
        vut_log "kernel $k: modules to load: ${VUT_STAGED_MODULES[*]:-none}; built in:" \
            "${VUT_BUILTIN_MODULES[*]:-none}; missing (optional): ${VUT_MISSING_MODULES[*]:-none}"
        rm -f "$out.inputs"
        vut_initramfs_pack "$stage" "$out"
        echo "$inputs" >"$out.inputs"
    fi
    echo "$out"
}

# --- run ---------------------------------------------------------------------------
NTESTS=${#PLAN[@]}
# Boot (3-10 s under TCG) and the daemon probe, then every scenario at most
# its time limit.
TIMEOUT=$((180 + NTESTS * (TEST_TIMEOUT + 10)))
QEMU_VERSION=$("$QEMU" --version | head -n1)
RESULTS=$WORK/results
[[ -n $OUT_DIR ]] && RESULTS=$OUT_DIR
mkdir -p "$RESULTS"
# random.trust_cpu=on: the tests seed rand from getrandom(), which on 5.10
# blocks until the CRNG is ready; the TCG CPU's RDRAND is good enough here.
APPEND="console=ttyS0 loglevel=3 panic=-1 random.trust_cpu=on"
APPEND+=" vut.tests=$TEST_NAMES vut.test_timeout=$TEST_TIMEOUT"
[[ -n $TEST_ENV ]] && APPEND+=" vut.env=$TEST_ENV"
# x86's kernel command line holds 2047 bytes.
[[ ${#APPEND} -lt 2000 ]] || bad_usage "--tests: too many names for the kernel command line"
vut_log "$NTESTS scenario(s) on ${KLIST[*]}$([[ $QUICK == 1 ]] && echo ' (quick)')${DAEMON_ARGS:+, daemon $DAEMON_ARGS}; $QEMU_VERSION"

run_vm() {
    local k=$1 initrd=$2 console=$3 status
    set +e
    timeout "$TIMEOUT" "$QEMU" -accel tcg -cpu max -smp 2 -m 2048 -nodefaults -no-reboot \
        -display none -serial stdio -nic none \
        -kernel "${K_VMLINUZ[$k]}" -initrd "$initrd" -append "$APPEND" </dev/null 2>&1 |
        tr -d '\r' | tee "$console" |
        grep --line-buffered -E '^VUT-KLAB-(BOOT|MODULE|TESTS-START|RESULT|ERROR)' |
        sed -u "s/^/  [$k] /" >&2
    status=${PIPESTATUS[0]}
    set -e
    return "$status"
}

# A third archive, per run: the --daemon-args wrapper.
EXTRA=$WORK/extra.cpio
mkdir -p "$WORK/extra/usr/bin"
if [[ -n ${DAEMON_ARGS// /} ]]; then
    printf '#!/bin/sh\nexec /usr/bin/vhost-user-tap %s "$@"\n' "$DAEMON_ARGS" \
        >"$WORK/extra/usr/bin/vut-daemon-with-args"
    chmod 755 "$WORK/extra/usr/bin/vut-daemon-with-args"
fi
vut_initramfs_pack "$WORK/extra" "$EXTRA"

for k in "${KLIST[@]}"; do
    modules=$(modules_archive "$k")
    initrd=$WORK/initrd-$k.img
    cat "$PROGS" "$modules" "$EXTRA" >"$initrd"
    mkdir -p "$RESULTS/$k"
    console=$RESULTS/$k/console.log
    crashes=()
    started=$(date +%s)
    # Multi-threaded TCG occasionally loses a race with the kernel's live code
    # patching during boot (seen in the backpressure lab: "Oops: int3"). That
    # is the emulator: a kernel that crashed before the tests started is run
    # once more, and the results say so. A crash during the tests is a result.
    for attempt in 1 2; do
        vut_log "kernel $k (${K_REL[$k]}): VM attempt $attempt"
        status=0
        run_vm "$k" "$initrd" "$console" || status=$?
        grep -q 'VUT-KLAB-TESTS-START' "$console" && break
        crash=$(grep -m1 -E 'Oops|Kernel panic|BUG:|general protection' "$console" || true)
        [[ -n $crash && $attempt == 1 ]] || break
        cp "$console" "$RESULTS/$k/console-attempt$attempt.log"
        crashes+=("$crash")
        vut_log "kernel $k crashed before the tests started (${crash}); running it again"
    done
    seconds=$(($(date +%s) - started))
    vut_log "kernel $k: VM ran ${seconds} s (exit status $status)"
    # How the VM ran, beside its console (vut-report reads both).
    {
        printf 'package=%s\npackage_version=%s\nrelease=%s\n' "${K_PKG[$k]}" "${K_VER[$k]}" "${K_REL[$k]}"
        printf 'vm_attempts=%s\nvm_seconds=%s\nvm_status=%s\n' "$attempt" "$seconds" "$status"
        for crash in "${crashes[@]}"; do printf 'crash=%s\n' "$crash"; done
    } >"$RESULTS/$k/run.txt"
done

# --- report ------------------------------------------------------------------------
report_args=(--results "$RESULTS" --kernels "$(IFS=,; echo "${KLIST[*]}")"
    --qemu-line="$QEMU_VERSION" --env="$TEST_ENV" --daemon-args="$DAEMON_ARGS")
[[ $QUICK == 1 ]] && report_args+=(--quick)
for s in "${PLAN[@]}"; do report_args+=(--scenario="$s"); done
set +e
"$REPORT" kernel-lab "${report_args[@]}"
ok=$?
set -e
[[ -n $OUT_DIR ]] && vut_log "wrote $OUT_DIR/results.json, table.txt, */console.log"
[[ $ok == 0 ]] || vut_die "not every scenario ran and passed on ${KLIST[*]} (table above)"
