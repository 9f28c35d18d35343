#!/usr/bin/env bash
# The backpressure lab: where do frames get lost between a local sender and a
# slow guest, with and without the kernel's IFF_BACKPRESSURE?
#
# Boots Debian trixie-backports' Linux 7.3.4 cloud kernel (it has
# IFF_BACKPRESSURE) under QEMU (TCG, 2 vCPUs, no NIC) as the *host* of the
# experiment. Inside, qemu-scripts/lab/init.sh runs, for every qdisc x mode x
# sender thread count: the daemon on tap vut0 (--backpressure off = "stock",
# auto = "backpressure"), the synthetic guest harvesting at a fixed rate, and
# blocking UDP senders for T seconds; it drains the queues and reports every
# counter, raw (the kernel's, tc's JSON, the daemon's --metrics scrape, the
# sender's and the guest's counts). vut-report (built with the binaries;
# crates/vhost-user-tap-guest/src/report/bplab.rs) then prints a table
# shaped like the seed's (Received pps, Lost/s) and the totals behind it, and
# checks that they add up.
#
# Usage: qemu-scripts/backpressure-lab.sh [options]
#   --seconds T      sending time per case (default 10)
#   --quick          short run for tests: 2 s per case
#   --rx-rate PPS    the synthetic guest's harvest rate (default 5000)
#   --out DIR        also write DIR/table.txt, DIR/results.json, DIR/console.log
#   --bin-dir DIR    use DIR/vhost-user-tap, DIR/vhost-user-tap-guest and
#                    DIR/vut-report instead of building them (cargo build
#                    --release)
#   --qemu PATH      QEMU binary (default: qemu-system-x86_64 in PATH, Debian's
#                    7.2; the wrapper from fetch-qemu.sh works too)
#   --threads LIST   sender threads per case (default 1,2)
#   --modes LIST     stock,backpressure (default both)
#   --qdiscs LIST    fq_codel,pfifo (default both); also pfifo_fast (lockless)
#   --pfifo-limit N  pfifo's limit in packets (default 1000)
#   --fetch-only     install the packages and fetch the kernel, then exit
#
# Exit status: 0 when every case ran, drained and its totals add up; 1 when a
# case failed or did not add up (the table is printed anyway); 2 for usage.
#
# Needs root (apt-get, mknod for the initramfs). Installs only this host's
# Debian packages; the 7.3.4 kernel is downloaded and extracted into
# ${VUT_CACHE:-$HOME/.cache/vhost-user-tap}/lab-kernel/, never installed.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
LAB_DIR=$SCRIPT_DIR/lab
VUT_LOG_PREFIX=backpressure-lab
# shellcheck source=lib-vm.sh
source "$SCRIPT_DIR/lib-vm.sh"
# shellcheck source=lib-kernel.sh
source "$SCRIPT_DIR/lib-kernel.sh"

usage() {
    sed -n '/^# Usage:/,/^# Exit status/p' "$0" | sed 's/^# \{0,1\}//' | head -n -1 >&2
    exit 2
}
bad_usage() {
    echo "backpressure-lab: $*" >&2
    exit 2
}

SECONDS_PER_CASE=10
# Why 5000 frames/s. Measured here under TCG: one blocking sender reaches
# 50 000-180 000 datagrams/s on a stock kernel, and the release daemon plus
# an unthrottled synthetic guest deliver 18 000-60 000 frames/s while the
# senders compete for the same 2 vCPUs. 5000 is far below both, so the
# guest's rate, not CPU starvation, limits delivery (Received is the same in
# every column), the guest's ring and then the tun ring fill within a
# fraction of a second, and a full tun ring (1000) plus the guest's ring
# (256) drains in a quarter of a second.
RX_RATE=5000
THREADS=1,2
MODES=stock,backpressure
QDISCS=fq_codel,pfifo
# pfifo's limit must exceed what the blocking senders can keep queued. A UDP
# skb waiting in the qdisc stays charged to its socket's send buffer (tun
# orphans it only when it enters the tun ring), so send() blocks once a
# socket has wmem_default (212992) / truesize (~895 bytes for these
# datagrams) = 238 datagrams in the qdisc: measured peaks 238 with 1 sender,
# 476 with 2, 952 with 4. 1000 (= txqueuelen, pfifo's default) holds up to
# 4 senders without a drop; with 8 the qdisc overflows and tail-drops
# (try --threads 8), which is a qdisc sizing choice, not tun's tail drop.
PFIFO_LIMIT=1000
PAYLOAD=18 # 18 bytes of UDP payload: 60-byte frames, the classic 64 with FCS
OUT_DIR=
BIN_DIR=
QEMU="qemu-system-x86_64"
FETCH_ONLY=0

while [[ $# -gt 0 ]]; do
    case $1 in
    --seconds) SECONDS_PER_CASE=${2:?}; shift 2 ;;
    --quick) SECONDS_PER_CASE=2; shift ;;
    --rx-rate) RX_RATE=${2:?}; shift 2 ;;
    --out) OUT_DIR=${2:?}; shift 2 ;;
    --bin-dir) BIN_DIR=${2:?}; shift 2 ;;
    --qemu) QEMU=${2:?}; shift 2 ;;
    --threads) THREADS=${2:?}; shift 2 ;;
    --modes) MODES=${2:?}; shift 2 ;;
    --qdiscs) QDISCS=${2:?}; shift 2 ;;
    --pfifo-limit) PFIFO_LIMIT=${2:?}; shift 2 ;;
    --fetch-only) FETCH_ONLY=1; shift ;;
    -h | --help) usage ;;
    *) bad_usage "unknown option $1 (--help lists them)" ;;
    esac
done
[[ $SECONDS_PER_CASE =~ ^[0-9]+$ && $SECONDS_PER_CASE -gt 0 ]] || bad_usage "--seconds: a whole number > 0"
[[ $RX_RATE =~ ^[0-9]+$ && $RX_RATE -gt 0 ]] || bad_usage "--rx-rate: a number > 0"
[[ $PFIFO_LIMIT =~ ^[0-9]+$ && $PFIFO_LIMIT -gt 0 ]] || bad_usage "--pfifo-limit: a number > 0"
[[ $THREADS =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || bad_usage "--threads: numbers > 0 separated by commas"
[[ $MODES =~ ^(stock|backpressure)(,(stock|backpressure))*$ ]] || bad_usage "--modes: stock and/or backpressure"
[[ $QDISCS =~ ^(fq_codel|pfifo|pfifo_fast)(,(fq_codel|pfifo|pfifo_fast))*$ ]] ||
    bad_usage "--qdiscs: fq_codel, pfifo, pfifo_fast"

vut_require_root "apt-get, and mknod in the initramfs"
# busybox-static: the VM's userland; iproute2: its ip and tc (busybox's tc
# cannot configure fq_codel or print qdisc statistics); gcc/libc6-dev: the
# static C helpers; binutils: strip; qemu-system-x86: QEMU 7.2.
vut_apt_install busybox-static cpio xz-utils gcc libc6-dev binutils iproute2 qemu-system-x86

# --- the 7.3.4 kernel ----------------------------------------------------------
# From trixie-backports (pinned to -1: nothing from it is ever installed
# here); cached in $VUT_CACHE/lab-kernel/ (lib-kernel.sh).
vut_kernel_prepare 7.3
KABI=$VUT_KREL
KVERSION=$VUT_KVERSION
KDIR=$VUT_KDIR
MODDIR=$VUT_MODDIR
VMLINUZ=$VUT_VMLINUZ
if [[ $FETCH_ONLY == 1 ]]; then
    vut_log "kernel $KABI ($KVERSION) ready in $KDIR"
    exit 0
fi

# --- the binaries ----------------------------------------------------------------
if [[ -z $BIN_DIR ]]; then
    vut_log "cargo build --release (daemon, synthetic guest, vut-report)"
    (cd "$REPO" && cargo build --release --quiet -p vhost-user-tap -p vhost-user-tap-guest) ||
        vut_die "cargo build --release failed"
    BIN_DIR=${CARGO_TARGET_DIR:-$REPO/target}/release
fi
DAEMON=$BIN_DIR/vhost-user-tap
GUEST=$BIN_DIR/vhost-user-tap-guest
REPORT=$BIN_DIR/vut-report
[[ -x $DAEMON && -x $GUEST ]] || vut_die "no vhost-user-tap / vhost-user-tap-guest in $BIN_DIR"
[[ -x $REPORT ]] || vut_die "no vut-report in $BIN_DIR (cargo build -p vhost-user-tap-guest --bin vut-report)"
# The daemon's options decide what the VM can run: without --backpressure
# only stock mode exists (backpressure cases are skipped, and say so). Its
# counters are read from its metrics: it must have --metrics.
DAEMON_HELP=$("$DAEMON" --help)
BP_FLAG=0 QDISC_FLAG=0
[[ $DAEMON_HELP == *--backpressure* ]] && BP_FLAG=1
[[ $DAEMON_HELP == *--qdisc* ]] && QDISC_FLAG=1
[[ $DAEMON_HELP == *--metrics* ]] || vut_die "$DAEMON has no --metrics: the lab reads the daemon's counters there"
[[ $BP_FLAG == 1 ]] || vut_log "warning: $DAEMON has no --backpressure: backpressure cases are skipped"

# --- the initramfs ---------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vut-lab.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
hash_of() { sha256sum "$@" | cut -d' ' -f1 | sha256sum | cut -c1-16; }
INPUTS="lab=$(hash_of "$0" "$SCRIPT_DIR/lib-vm.sh" "$SCRIPT_DIR/lib-kernel.sh" "$LAB_DIR"/*)
kernel=$KABI=$KVERSION
binaries=$(hash_of "$DAEMON" "$GUEST")
busybox=$(dpkg-query -W -f='${Version}' busybox-static)
iproute2=$(dpkg-query -W -f='${Version}' iproute2)
gcc=$(gcc -dumpfullversion)"
IMG=$VUT_CACHE/backpressure-lab
INITRD=$IMG/initrd.img

build_initramfs() {
    local stage=$WORK/stage
    vut_initramfs_base "$stage"

    # Modules: tun only. sch_fq_codel and pfifo (sch_fifo) are built into this
    # kernel (CONFIG_NET_SCH_FQ_CODEL=y, NET_SCH_FIFO=y); staging follows
    # depends= and would pick up a qdisc module a future config splits out.
    vut_stage_modules "$MODDIR" "$stage" tun sch_fq_codel
    vut_log "modules to load: ${VUT_STAGED_MODULES[*]:-none} (the qdiscs are built in)"

    # Dynamically linked programs, stripped of debug info (the release
    # profile keeps it; 20 MB each), with their libraries and the loader at
    # the paths ldd names, so they run unchanged. init.sh calls iproute2's ip
    # and tc by path.
    strip --strip-debug -o "$stage/usr/bin/vhost-user-tap" "$DAEMON"
    strip --strip-debug -o "$stage/usr/bin/vhost-user-tap-guest" "$GUEST"
    cp /usr/sbin/ip /usr/sbin/tc "$stage/usr/sbin/"
    vut_initramfs_add_libs "$stage" "$DAEMON" "$GUEST" /usr/sbin/ip /usr/sbin/tc

    gcc -O2 -static -pthread -Wall -Wextra -Werror -s -o "$stage/usr/bin/vut-udpsend" \
        "$LAB_DIR/vut-udpsend.c" || vut_die "compiling vut-udpsend failed"
    gcc -O2 -static -Wall -Wextra -Werror -s -o "$stage/usr/bin/vut-tunfeatures" \
        "$LAB_DIR/vut-tunfeatures.c" || vut_die "compiling vut-tunfeatures failed"
    install -m 755 "$LAB_DIR/init.sh" "$stage/init"

    mkdir -p "$IMG"
    rm -f "$IMG/inputs"
    # Uncompressed (see vut_initramfs_pack): it is rebuilt on every binary change.
    vut_initramfs_pack "$stage" "$INITRD"
    echo "$INPUTS" >"$IMG/inputs"
    vut_log "initramfs $(du -h "$INITRD" | cut -f1)"
}
if [[ ! -f $INITRD || ! -f $IMG/inputs || $(cat "$IMG/inputs") != "$INPUTS" ]]; then
    build_initramfs
else
    vut_log "initramfs up to date"
fi

# --- run -------------------------------------------------------------------------
count_words() { tr ',' '\n' <<<"$1" | wc -l; }
NCASES=$(($(count_words "$THREADS") * $(count_words "$MODES") * $(count_words "$QDISCS")))
# Boot (~3 s) + per case: start/stop (~3 s under TCG), sending, draining.
TIMEOUT=$((120 + NCASES * (SECONDS_PER_CASE + 40)))
CONSOLE=$WORK/console.log
# ipv6.disable=1: no router solicitations or MLD reports on the tap, so every
# frame the guest receives is one of ours and the totals can match exactly.
APPEND="console=ttyS0 loglevel=3 panic=-1 ipv6.disable=1"
APPEND+=" vut.seconds=$SECONDS_PER_CASE vut.rx_rate=$RX_RATE vut.threads=$THREADS"
APPEND+=" vut.modes=$MODES vut.qdiscs=$QDISCS vut.pfifo_limit=$PFIFO_LIMIT vut.payload=$PAYLOAD"
APPEND+=" vut.bp_flag=$BP_FLAG vut.qdisc_flag=$QDISC_FLAG"
vut_log "$NCASES cases x ${SECONDS_PER_CASE}s, guest harvests ${RX_RATE}/s; $("$QEMU" --version | head -n1)"

# -smp 2 with multi-threaded TCG: senders and the daemon/guest really run in
# parallel, like the seed's 2-CPU setup, and the LLTX race can happen. No
# NIC: all traffic stays inside the VM. Markers are streamed to stderr as
# they arrive, so a long run shows progress.
run_vm() {
    local started status
    started=$(date +%s)
    set +e
    timeout "$TIMEOUT" "$QEMU" -accel tcg -cpu max -smp 2 -m 1024 -nodefaults -no-reboot \
        -display none -serial stdio -nic none \
        -kernel "$VMLINUZ" -initrd "$INITRD" -append "$APPEND" </dev/null 2>&1 |
        tr -d '\r' | tee "$CONSOLE" |
        grep --line-buffered -E '^VUT-LAB-(BOOT|TUN|CASE-START|SEND |STALL|WARN|ERROR|SKIP)' >&2
    status=${PIPESTATUS[0]}
    set -e
    vut_log "VM ran $(($(date +%s) - started)) s (exit status $status)"
}
# Multi-threaded TCG occasionally loses a race with the kernel's live code
# patching (seen once in ~30 boots here: "Oops: int3" in a static-key site
# during boot). That is the emulator, not the experiment: run the VM again,
# at most twice, and say so in the results.
CRASHES=()
for attempt in 1 2 3; do
    run_vm
    grep -q '^VUT-LAB-DONE' "$CONSOLE" && break
    crash=$(grep -m1 -E 'Oops|Kernel panic|BUG:|general protection' "$CONSOLE" || true)
    [[ -n $OUT_DIR ]] && mkdir -p "$OUT_DIR" && cp "$CONSOLE" "$OUT_DIR/console-attempt$attempt.log"
    if [[ -z $crash || $attempt == 3 ]]; then
        tail -n 30 "$CONSOLE" >&2
        vut_die "the VM did not finish (timeout ${TIMEOUT}s or crash); console above"
    fi
    CRASHES+=("$crash")
    vut_log "the VM's kernel crashed (${crash}); running it again"
done
VM_ATTEMPTS=$attempt
[[ -n $OUT_DIR ]] && mkdir -p "$OUT_DIR" && cp "$CONSOLE" "$OUT_DIR/console.log"

# --- report ----------------------------------------------------------------------
# The accounting happens here, on the host, in vut-report: the VM only
# collects raw counters. It prints the table, writes table.txt and
# results.json with --out, and fails unless every case ran, drained and added
# up.
report_args=(--console "$CONSOLE" --kernel "$KABI" --kernel-version "$KVERSION"
    --qemu-line="$("$QEMU" --version | head -n1)" --rx-rate "$RX_RATE" --seconds "$SECONDS_PER_CASE"
    --pfifo-limit "$PFIFO_LIMIT" --payload "$PAYLOAD" --vm-attempts "$VM_ATTEMPTS"
    --threads "$THREADS" --modes "$MODES" --qdiscs "$QDISCS")
[[ -n $OUT_DIR ]] && report_args+=(--out "$OUT_DIR")
[[ $BP_FLAG == 1 ]] || report_args+=(--no-backpressure-option)
for crash in "${CRASHES[@]}"; do report_args+=(--crash="$crash"); done
ok=1
"$REPORT" backpressure-lab "${report_args[@]}" || ok=0
[[ -n $OUT_DIR ]] && vut_log "wrote $OUT_DIR/table.txt, results.json, console.log"
[[ $ok == 1 ]] || vut_die "not every case ran, drained and added up (see the notes and the console log)"
