#!/usr/bin/env bash
# The seed's benchmark for this daemon: a guest that drops every frame in XDP,
# so the guest costs almost nothing per frame and the host path is what gets
# measured. The host sends 64-byte frames into the tap through a qdisc, from 1
# and 2 sender threads, for T seconds, R runs, once per backend:
#   vhost-user  this daemon (-netdev vhost-user)
#   tap         QEMU's own tap backend (-netdev tap,vhost=off)
#   vhost-net   kernel vhost-net (-netdev tap,vhost=on), only with /dev/vhost-net
# and prints the seed-style table (Received, Lost/s, diff vs the first column)
# and writes it, every run's counters (JSON) and a PNG chart to an output dir.
#
# Usage: qemu-scripts/xdp-bench.sh [options]
#   --seconds T        sending time per run (default 10)
#   --runs R           runs per backend and thread count (default 3)
#   --threads LIST     sender thread counts (default 1,2)
#   --backends LIST    subset of vhost-user,tap,vhost-net (default all three)
#   --qemu PATH        QEMU binary (default: $QEMU, else qemu-system-x86_64)
#   --accel MODE       auto (default: KVM only if it really boots a guest,
#                      see run-vm.sh), kvm or tcg
#   --daemon PATH      vhost-user-tap binary (default: cargo build --release)
#   --daemon-args STR  extra daemon options, e.g. "--busy-poll-us 50"
#   --qdisc KIND       root qdisc on the tap (default fq_codel, as in the seed;
#                      pfifo_fast where the kernel has no fq_codel)
#   --smp N            guest vCPUs (default 1)
#   --out DIR          output directory (default ./xdp-bench-<date>)
#   --help
#
# Every VM boots fresh for each run (backend x threads x run), so each run's
# counters -- the tap's, the qdisc's, the daemon's (logged at SIGTERM) and the
# guest's -- start at zero and belong to that run alone.
#
# Accounting, per run (all frame counts; the JSON has every term):
#   sent     = frames the sender handed to the kernel (vut-blast.c: accepted
#              by the qdisc or refused by it at enqueue)
#   received = frames the guest's XDP program counted
#   lost     = qdisc drops (tc -s) + tun ring drops (the tap's tx_dropped)
#              + daemon RX drops (rx_dropped_* in its "queue pair 0:" line)
#   in_flight = sent - received - lost
# After sending, the script waits 1 s and then until the guest's count stays
# unchanged for one report interval (0.5 s): every queue (qdisc, tun ring,
# daemon, guest ring) has drained, so in_flight must be 0. A nonzero value
# means frames stuck or lost without being counted; the script then fails.
# Lost/s = lost / T; Received = received / T (frames drained after the sender
# stopped were sent during T, so they count).
#
# Isolation: everything runs in a network namespace created and deleted here
# (IPv6 off, no addresses): the frames are raw Ethernet frames to the guest's
# MAC (IPv4 198.18.0.1 -> .2, the benchmarking range), sent through an
# AF_PACKET socket on the tap inside the namespace; they reach nothing but the
# guest. Every process, tap and namespace created here is removed at exit,
# also on failure or Ctrl-C.
#
# Needs root (namespaces, taps; apt-get install gnuplot-nox gcc if missing).
# Exit status: 0 when every run completed and balanced, 1 otherwise (the
# table is still written), 2 for a bad command line.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
VUT_LOG_PREFIX=xdp-bench
# shellcheck source=lib-vm.sh
source "$SCRIPT_DIR/lib-vm.sh"
# shellcheck source=lib-qemu.sh
source "$SCRIPT_DIR/lib-qemu.sh"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
bad_usage() {
    echo "xdp-bench: $*" >&2
    echo "xdp-bench: see --help" >&2
    exit 2
}

seconds=10 runs=3 threads_list=1,2 backends_list=vhost-user,tap,vhost-net
DAEMON_ARGS=()
qemu=${QEMU:-qemu-system-x86_64} accel=auto daemon='' qdisc=fq_codel qdisc_explicit=0 smp=1 out=''
need_arg() { [[ $# -ge 2 ]] || bad_usage "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case $1 in
    --seconds) need_arg "$@"; seconds=$2; shift 2 ;;
    --runs) need_arg "$@"; runs=$2; shift 2 ;;
    --threads) need_arg "$@"; threads_list=$2; shift 2 ;;
    --backends) need_arg "$@"; backends_list=$2; shift 2 ;;
    --qemu) need_arg "$@"; qemu=$2; shift 2 ;;
    --accel) need_arg "$@"; accel=$2; shift 2 ;;
    --daemon) need_arg "$@"; daemon=$2; shift 2 ;;
    --daemon-args) need_arg "$@"; read -r -a DAEMON_ARGS <<<"$2"; shift 2 ;;
    --qdisc) need_arg "$@"; qdisc=$2; qdisc_explicit=1; shift 2 ;;
    --smp) need_arg "$@"; smp=$2; shift 2 ;;
    --out) need_arg "$@"; out=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) bad_usage "unknown argument $1" ;;
    esac
done
positive() { [[ $1 =~ ^[0-9]+$ ]] && (($1 >= 1)); }
positive "$seconds" || bad_usage "--seconds $seconds: whole seconds, 1 or more"
positive "$runs" || bad_usage "--runs $runs: 1 or more"
positive "$smp" || bad_usage "--smp $smp: 1 or more"
[[ $threads_list =~ ^[0-9]+(,[0-9]+)*$ ]] || bad_usage "--threads $threads_list: e.g. 1,2"
IFS=, read -r -a THREADS <<<"$threads_list"
IFS=, read -r -a WANTED <<<"$backends_list"
for b in "${WANTED[@]}"; do
    case $b in vhost-user | tap | vhost-net) ;; *) bad_usage "--backends: unknown backend $b" ;; esac
done
case $accel in auto | kvm | tcg) ;; *) bad_usage "--accel $accel: auto, kvm or tcg" ;; esac
[[ $qdisc =~ ^[a-z_]+$ ]] || bad_usage "--qdisc $qdisc: a qdisc kind such as fq_codel or pfifo_fast"

vut_require_root "network namespaces and taps"
command -v "$qemu" >/dev/null || vut_die "QEMU $qemu not found (--qemu PATH)"
for tool in ip tc timeout; do
    command -v "$tool" >/dev/null || vut_die "$tool not found (apt-get install iproute2 coreutils)"
done

# Column order of the table: the daemon first, everything else is compared with it.
BACKENDS=()
declare -A NA=()
for b in vhost-user tap vhost-net; do
    [[ ,$backends_list, == *",$b,"* ]] || continue
    if [[ $b == vhost-net && ! -c /dev/vhost-net ]]; then
        vut_log "no /dev/vhost-net (modprobe vhost_net?): vhost-net column is n/a"
        NA[$b]=1
    fi
    BACKENDS+=("$b")
done

# --- prerequisites -------------------------------------------------------------
# gnuplot-nox: PNG output (libgd) without X11; gcc builds the sender.
vut_apt_install gnuplot-nox gcc libc6-dev
GUEST_PATHS=$("$SCRIPT_DIR/build-guest.sh")
KERNEL=$(sed -n 1p <<<"$GUEST_PATHS")
INITRD=$(sed -n 2p <<<"$GUEST_PATHS")

if [[ " ${BACKENDS[*]} " == *" vhost-user "* ]]; then
    if [[ -z $daemon ]]; then
        command -v cargo >/dev/null || vut_die "cargo not found: pass --daemon PATH"
        vut_log "cargo build --release (the daemon)"
        (cd "$REPO_DIR" && cargo build --release --quiet --bin vhost-user-tap) >&2
        daemon=${CARGO_TARGET_DIR:-$REPO_DIR/target}/release/vhost-user-tap
    fi
    [[ -x $daemon ]] || vut_die "daemon $daemon is not an executable"
fi

# The sender, built into the cache; rebuilt when its source changes.
BLAST=$VUT_CACHE/bench/vut-blast
blast_sum=$(sha256sum "$SCRIPT_DIR/vut-blast.c" | cut -d' ' -f1)
if [[ ! -x $BLAST || $(cat "$BLAST.sha256" 2>/dev/null) != "$blast_sum" ]]; then
    mkdir -p "$(dirname "$BLAST")"
    gcc -O2 -Wall -Wextra -Werror -pthread -o "$BLAST.tmp" "$SCRIPT_DIR/vut-blast.c" ||
        vut_die "compiling vut-blast failed"
    mv "$BLAST.tmp" "$BLAST"
    echo "$blast_sum" >"$BLAST.sha256"
fi

read -r QMAJ QMIN QMIC < <(vut_qemu_version "$qemu")
QEMU_LINE=$("$qemu" --version 2>/dev/null | head -n1)
cpu_model=''
RUN_VM_ACCEL=$accel
if [[ $accel == auto ]]; then
    # run-vm.sh gets --accel auto too: it reads the same cached probe result,
    # including whether -cpu host works.
    read -r accel cpu_model < <(vut_detect_accel "$qemu" "$KERNEL" "$INITRD")
fi
ACCEL=$accel
# QEMU < 8 under TCG needs INTx for a vhost-user NIC (README); give the other
# backends INTx too, so that the columns compare like with like.
VECTORS=()
INTX_NOTE=''
if [[ $ACCEL == tcg && $QMAJ -lt 8 ]]; then
    VECTORS=(--vectors 0)
    INTX_NOTE="; INTx for every backend (QEMU < 8 + TCG + vhost-user needs vectors=0)"
fi
HOST_KERNEL=$(uname -r)
HOST_CPU=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)
HOST_CPUS=$(nproc)

[[ -n $out ]] || out=$PWD/xdp-bench-$(date +%Y%m%d-%H%M%S)
mkdir -p "$out/runs"
out=$(cd "$out" && pwd)

# --- cleanup -------------------------------------------------------------------
NETNS=vut-xdp-$$
TAP=vut0
GUEST_MAC=52:54:00:12:34:56
RUN_PIDS=()
# Only the processes started here, by pid: each is a `timeout` wrapper, which
# passes SIGTERM on to QEMU, the daemon or the sender.
stop_run_pids() {
    local pid
    for pid in "${RUN_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${RUN_PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    RUN_PIDS=()
}
# shellcheck disable=SC2317 # only called from the EXIT trap
cleanup() {
    stop_run_pids
    if [[ -e /run/netns/$NETNS ]]; then
        # The tap belongs to QEMU or the daemon and is gone with them; a
        # leftover would be deleted with the namespace anyway.
        ip -n "$NETNS" link del "$TAP" 2>/dev/null || true
        ip netns delete "$NETNS" 2>/dev/null || vut_log "warning: cannot delete netns $NETNS"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# Namespaces of earlier runs of this script that died without cleaning up
# (SIGKILL): their pid is gone.
for ns in /run/netns/vut-xdp-*; do
    [[ -e $ns ]] || continue
    pid=${ns##*/vut-xdp-}
    if [[ $pid =~ ^[0-9]+$ && ! -e /proc/$pid ]]; then
        vut_log "removing stale netns ${ns##*/}"
        ip netns delete "${ns##*/}" 2>/dev/null || true
    fi
done

ip netns add "$NETNS"
# No IPv6 (and no addresses at all): the host must not send anything of its
# own (router solicitations, MLD) into the tap, or the guest would count it.
ip netns exec "$NETNS" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
ip -n "$NETNS" link set lo up

# --- one run ---------------------------------------------------------------------
BOOT_TIMEOUT=180 # TCG on a loaded 2-core machine; KVM boots in seconds
INTERVAL_MS=500  # guest report interval
DRAIN_SECS=1
GUEST_SECS=$((BOOT_TIMEOUT + seconds + 120)) # the guest powers off by itself after this
LIFETIME=$((GUEST_SECS + 60))                # and `timeout` ends anything left after this

now() { date +%s.%N; }
elapsed_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
alive() { kill -0 "$1" 2>/dev/null; }

# The guest's cumulative XDP counts, one per report line.
xdp_counts() { tr -d '\r' <"$1" | sed -n 's/.*VUT-XDP [0-9.]* \([0-9][0-9]*\) [0-9][0-9]*$/\1/p'; }

# Waits until FILE has a line matching REGEX; fails if PID dies or at the deadline.
wait_for_line() {
    local file=$1 regex=$2 pid=$3 limit=$4 what=$5 start
    start=$(now)
    while ! tr -d '\r' <"$file" | grep -aqE "$regex"; do
        alive "$pid" || { vut_log "$what: process exited first"; return 1; }
        if awk -v a="$start" -v b="$(now)" -v l="$limit" 'BEGIN { exit !(b - a > l) }'; then
            vut_log "$what: not within ${limit}s"
            return 1
        fi
        sleep 0.1
    done
}

# Prints the guest's count once it has stopped moving: the last two reports,
# both newer than report number $2, are equal.
wait_quiescent() {
    local console=$1 after=$2 pid=$3 start counts n
    start=$(now)
    while :; do
        mapfile -t counts < <(xdp_counts "$console")
        n=${#counts[@]}
        if ((n >= after + 2)) && [[ ${counts[n - 1]} == "${counts[n - 2]}" ]]; then
            echo "${counts[n - 1]}"
            return 0
        fi
        alive "$pid" || { vut_log "guest exited while draining"; return 1; }
        if awk -v a="$start" -v b="$(now)" 'BEGIN { exit !(b - a > 60) }'; then
            vut_log "guest count still moving 60 s after the sender stopped"
            return 1
        fi
        sleep 0.2
    done
}

# key=value from a line such as "sent=12 accepted=12" or the daemon's counters.
kv() { sed -n "s/.*[[:space:]]$2=\([0-9][0-9]*\).*/\1/p" <<<" $1" | head -n1; }

tap_stat() { ip netns exec "$NETNS" cat "/sys/class/net/$TAP/statistics/$1"; }

# "kind sent dropped backlog" of the tap's root qdisc (tc -s; packets).
qdisc_stats() {
    tc -n "$NETNS" -s qdisc show dev "$TAP" | awk '
        /^qdisc/ { root = / root /; kind = $2 }
        root && /^ Sent/ { sent = $4; d = $7; sub(/,/, "", d) }
        root && /^ backlog/ { b = $3; sub(/p$/, "", b); print kind, sent, d, b; exit }'
}

RESULTS=$out/runs.tsv
printf 'backend\tthreads\trun\tseconds\tsent\treceived\tqdisc_drops\ttun_drops\tdaemon_drops\tin_flight\tqdisc_sent\tqdisc_backlog\ttap_tx_packets\tdaemon_rx_frames\txdp_mode\tboot_s\tqdisc\n' >"$RESULTS"
FAILED=0
GUEST_KERNEL='' DAEMON_BACKPRESSURE=''

# Fails (returns 1) unless every argument is a non-negative integer.
counts_ok() {
    local v
    for v in "$@"; do
        [[ $v =~ ^[0-9]+$ ]] || return 1
    done
}

# Installs the qdisc under test on the tap. The default, fq_codel (the seed's),
# falls back to pfifo_fast on kernels built without it, once and loudly; a
# qdisc asked for with --qdisc must work.
install_qdisc() {
    if tc -n "$NETNS" qdisc replace dev "$TAP" root "$qdisc" 2>/dev/null; then
        return 0
    fi
    if [[ $qdisc_explicit -eq 0 && $qdisc == fq_codel ]]; then
        vut_log "this kernel has no fq_codel qdisc (CONFIG_NET_SCH_FQ_CODEL): using pfifo_fast"
        qdisc=pfifo_fast
        tc -n "$NETNS" qdisc replace dev "$TAP" root "$qdisc" && return 0
    fi
    vut_log "cannot install qdisc $qdisc on the tap (tc qdisc replace dev $TAP root $qdisc)"
    return 1
}

# One run: boot a VM on BACKEND, send for T seconds from THREADS threads,
# drain, read every counter, stop, append a line to runs.tsv. Called as
# `if ! run_one`, where errexit does not apply: every step checks for itself.
run_one() {
    local backend=$1 threads=$2 run=$3
    local dir=$out/runs/$backend-t$threads-r$run
    mkdir -p "$dir" || return 1
    local console=$dir/console.log sock=$dir/vhost-user.sock
    local daemon_pid='' qemu_pid='' start i
    start=$(now)

    local vm=("$SCRIPT_DIR/run-vm.sh" --qemu "$qemu" --accel "$RUN_VM_ACCEL" --kernel "$KERNEL"
        --initrd "$INITRD" --mem 256M --smp "$smp" --mac "$GUEST_MAC" --xdp "${VECTORS[@]}"
        --append "console=ttyS0 quiet panic=-1 vut.mode=xdp vut.xdp_secs=$GUEST_SECS vut.xdp_interval_ms=$INTERVAL_MS")
    case $backend in
    vhost-user)
        # The daemon creates the tap (and it disappears when the daemon exits).
        timeout -k 5 "$LIFETIME" ip netns exec "$NETNS" env RUST_LOG=info "$daemon" \
            --socket-path "$sock" --tap "$TAP" "${DAEMON_ARGS[@]}" </dev/null >"$dir/daemon.log" 2>&1 &
        daemon_pid=$!
        RUN_PIDS+=("$daemon_pid")
        i=0
        while [[ ! -S $sock ]]; do
            alive "$daemon_pid" || { vut_log "daemon exited at start: $(tail -n3 "$dir/daemon.log")"; return 1; }
            ((++i < 200)) || { vut_log "daemon created no socket in 20 s"; return 1; }
            sleep 0.1
        done
        timeout -k 5 "$LIFETIME" "${vm[@]}" --socket "$sock" </dev/null >"$console" 2>"$dir/qemu.err" &
        ;;
    tap | vhost-net)
        # QEMU creates the tap inside the namespace, so it runs there.
        local vhost=()
        [[ $backend == vhost-net ]] && vhost=(--vhost-net)
        timeout -k 5 "$LIFETIME" ip netns exec "$NETNS" "${vm[@]}" --tap "$TAP" "${vhost[@]}" \
            </dev/null >"$console" 2>"$dir/qemu.err" &
        ;;
    esac
    qemu_pid=$!
    RUN_PIDS+=("$qemu_pid")

    # The tap exists once its owner started; bring it up with the qdisc under test.
    i=0
    until ip -n "$NETNS" link show "$TAP" >/dev/null 2>&1; do
        alive "$qemu_pid" || { vut_log "QEMU exited at start: $(tail -n3 "$dir/qemu.err")"; return 1; }
        ((++i < 300)) || { vut_log "no tap $TAP after 30 s"; return 1; }
        sleep 0.1
    done
    ip -n "$NETNS" link set "$TAP" up || return 1
    install_qdisc || return 1

    if ! wait_for_line "$console" 'VUT-XDP-READY' "$qemu_pid" "$BOOT_TIMEOUT" "guest boot ($backend)"; then
        tail -n5 "$console" "$dir/qemu.err" >&2
        return 1
    fi
    local boot_s mode
    boot_s=$(elapsed_since "$start")
    mode=$(tr -d '\r' <"$console" | sed -n 's/.*VUT-XDP-READY mode=\([a-z]*\).*/\1/p' | head -n1)
    [[ -n $mode ]] || { vut_log "no XDP mode in the guest's READY line"; return 1; }
    [[ -n $GUEST_KERNEL ]] ||
        GUEST_KERNEL=$(tr -d '\r' <"$console" | sed -n 's/.*VUT-BOOT kernel=\([^ ]*\).*/\1/p' | head -n1)
    [[ $mode == native ]] ||
        vut_log "warning: the guest runs XDP in $mode mode (an skb per frame): $(grep -a VUT-XDP-WARN "$console")"
    # The count before sending: the first report (0 unless something else reached the guest).
    wait_for_line "$console" 'VUT-XDP [0-9.]+ [0-9]+ [0-9]+' "$qemu_pid" 30 "first XDP report" || return 1
    local baseline
    baseline=$(xdp_counts "$console" | tail -n1)
    counts_ok "$baseline" || return 1

    # --- send ---
    timeout -k 5 $((seconds + 30)) ip netns exec "$NETNS" "$BLAST" "$TAP" "$GUEST_MAC" "$threads" "$seconds" \
        >"$dir/blast.out" 2>&1 &
    local blast_pid=$!
    RUN_PIDS+=("$blast_pid")
    wait "$blast_pid" || { vut_log "sender failed: $(cat "$dir/blast.out")"; return 1; }
    local blast sent secs
    blast=$(cat "$dir/blast.out")
    sent=$(kv "$blast" sent)
    secs=$(sed -n 's/.*seconds=\([0-9.]*\).*/\1/p' <<<"$blast")
    if ! counts_ok "$sent" || [[ ! $secs =~ ^[0-9]+\.[0-9]+$ ]]; then
        vut_log "sender said: $blast"
        return 1
    fi

    # --- drain, then read every counter while the backend still holds the tap ---
    sleep "$DRAIN_SECS"
    local reports final
    reports=$(xdp_counts "$console" | wc -l)
    final=$(wait_quiescent "$console" "$reports" "$qemu_pid") || return 1
    local q_kind q_sent q_drops q_backlog tun_drops tap_tx
    read -r q_kind q_sent q_drops q_backlog < <(qdisc_stats)
    tun_drops=$(tap_stat tx_dropped)
    tap_tx=$(tap_stat tx_packets)
    if ! counts_ok "$final" "$q_sent" "$q_drops" "$q_backlog" "$tun_drops" "$tap_tx"; then
        vut_log "unreadable counters: guest=$final qdisc=$q_kind/$q_sent/$q_drops/$q_backlog tap=$tun_drops/$tap_tx"
        return 1
    fi

    # --- stop: QEMU first (the daemon then sees the frontend leave), then the daemon ---
    kill -TERM "$qemu_pid" 2>/dev/null
    wait "$qemu_pid" 2>/dev/null
    local daemon_drops=0 daemon_rx=-
    if [[ -n $daemon_pid ]]; then
        kill -TERM "$daemon_pid" 2>/dev/null
        local status=0
        wait "$daemon_pid" || status=$?
        ((status == 0)) || { vut_log "daemon exited with status $status on SIGTERM"; return 1; }
        # Its counters, one "queue pair N: rx_frames=.. rx_dropped_oversize=.."
        # line per pair, logged once at exit; summed over the pairs.
        local lines field
        lines=$(grep -a 'queue pair [0-9]*: rx_frames=' "$dir/daemon.log")
        [[ -n $lines ]] || { vut_log "no counter line in $dir/daemon.log"; return 1; }
        daemon_rx=0
        # Every RX drop reason the daemon counts (today: rx_dropped_oversize).
        # tx_dropped_* concern guest -> host frames, not these.
        while read -r field; do
            counts_ok "${field#*=}" || return 1
            case $field in
            rx_frames=*) daemon_rx=$((daemon_rx + ${field#*=})) ;;
            *) daemon_drops=$((daemon_drops + ${field#*=})) ;;
            esac
        done < <(grep -oE '(rx_frames|rx_dropped_[a-z_]*)=[0-9]+' <<<"$lines")
        # Its start-up line on IFF_BACKPRESSURE ("backpressure off (stock mode)").
        [[ -n $DAEMON_BACKPRESSURE ]] ||
            DAEMON_BACKPRESSURE=$(grep -ao 'backpressure o[nf]*[^:;]*' "$dir/daemon.log" | head -n1)
    fi
    RUN_PIDS=()

    local received=$((final - baseline))
    local lost=$((q_drops + tun_drops + daemon_drops))
    local in_flight=$((sent - received - lost))
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
        "$backend" "$threads" "$run" "$secs" "$sent" "$received" "$q_drops" "$tun_drops" \
        "$daemon_drops" "$in_flight" "$q_sent" "$q_backlog" "$tap_tx" "$daemon_rx" "$mode" \
        "$boot_s" "$q_kind" >>"$RESULTS"
    vut_log "$(printf '%-10s %d thr run %d: sent %d = received %d + lost %d (qdisc %d, tun %d, daemon %d) + in flight %d; boot %ss' \
        "$backend" "$threads" "$run" "$sent" "$received" "$lost" "$q_drops" "$tun_drops" \
        "$daemon_drops" "$in_flight" "$boot_s")"
    if ((in_flight != 0)); then
        vut_log "error: $backend run does not add up: $in_flight frames neither received nor counted as lost"
        return 1
    fi
    if [[ -n $daemon_pid ]] && ((daemon_rx != received)); then
        vut_log "error: the daemon delivered $daemon_rx frames, the guest counted $received"
        return 1
    fi
}

vut_log "QEMU $QMAJ.$QMIN.$QMIC, accel $ACCEL, ${seconds}s x $runs run(s), threads ${THREADS[*]}, backends ${BACKENDS[*]}, qdisc $qdisc"
vut_log "output: $out"
BENCH_START=$(now)
# Other work on the host competes with the guest, the backend and the sender: say how much.
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
for threads in "${THREADS[@]}"; do
    for run in $(seq 1 "$runs"); do
        for backend in "${BACKENDS[@]}"; do
            [[ -z ${NA[$backend]:-} ]] || continue
            if ! run_one "$backend" "$threads" "$run"; then
                FAILED=1
                vut_log "run $backend threads=$threads #$run failed; logs in $out/runs/$backend-t$threads-r$run"
                stop_run_pids
            fi
        done
    done
done
BENCH_SECS=$(elapsed_since "$BENCH_START")

# --- table, JSON, chart ---------------------------------------------------------
if [[ $ACCEL == tcg ]]; then
    ACCEL_LABEL="TCG (no KVM: emulated guest, absolute numbers are far below a KVM host's)"
else
    ACCEL_LABEL="KVM${cpu_model:+ (-cpu $cpu_model)}"
fi
NA_LIST=$(for b in "${!NA[@]}"; do printf '%s,' "$b"; done)

# One awk program renders all three outputs from runs.tsv, so they cannot disagree.
awk -F'\t' -v backends="${BACKENDS[*]}" -v na="$NA_LIST" -v threads="${THREADS[*]}" \
    -v out="$out" -v qemu_line="$QEMU_LINE" -v accel="$ACCEL" -v accel_label="$ACCEL_LABEL" \
    -v host_kernel="$HOST_KERNEL" -v host_cpu="$HOST_CPU" -v host_cpus="$HOST_CPUS" \
    -v guest_kernel="${GUEST_KERNEL:-?}" -v smp="$smp" -v qdisc="$qdisc" -v secs="$seconds" \
    -v runs="$runs" -v intx="$INTX_NOTE" -v backpressure="${DAEMON_BACKPRESSURE:-}" \
    -v bench_secs="$BENCH_SECS" -v load_start="$LOAD_START" -v load_end="$(cut -d' ' -f1-3 /proc/loadavg)" -v daemon_args="${DAEMON_ARGS[*]}" -v failed="$FAILED" '
function label(b) {
    return b == "vhost-user" ? "vhost-user-tap" : b == "tap" ? "QEMU tap" : "vhost-net"
}
function sublabel(b) {
    return b == "vhost-user" ? "(this daemon)" : b == "tap" ? "(vhost=off)" : "(vhost=on)"
}
function rate(v) {
    if (v == "") return "n/a"
    if (v >= 10000) return sprintf("%.3f Mpps", v / 1e6)
    return sprintf("%d pps", v + 0.5)
}
function jstr(s) { gsub(/\\/, "\\\\", s); gsub(/"/, "\\\"", s); return "\"" s "\"" }
function line(   s, i) {
    s = "+------------+-------------+"
    for (i = 1; i <= nb; i++) s = s "----------------+" (i > 1 ? "----------+" : "")
    return s
}
NR == 1 { next }
{
    k = $1 SUBSEP $2
    n[k]++
    rx[k] += $6 / $4
    lost[k] += ($7 + $8 + $9) / $4
    sent[k] += $5 / $4
    run_line[++nr] = $0
    if (!($17 in kinds)) { kinds[$17] = 1; kind_list = kind_list (kind_list == "" ? "" : "/") $17 }
}
END {
    nb = split(backends, B, " ")
    nt = split(threads, T, " ")
    split(na, NAs, ",")
    for (i in NAs) if (NAs[i] != "") isna[NAs[i]] = 1
    for (t = 1; t <= nt; t++) for (i = 1; i <= nb; i++) {
        k = B[i] SUBSEP T[t]
        if (n[k] > 0) { mrx[k] = rx[k] / n[k]; mlost[k] = lost[k] / n[k]; msent[k] = sent[k] / n[k] }
    }

    txt = out "/table.txt"
    if (kind_list == "") kind_list = qdisc
    hdr = sprintf("XDP-drop guest benchmark: 64-byte frames (60 B + FCS) into the tap through qdisc %s, %d s x %d run(s) per cell\n", kind_list, secs, runs)
    hdr = hdr sprintf("QEMU: %s, accel: %s%s\n", qemu_line, accel_label, intx)
    hdr = hdr sprintf("host: Linux %s, %s (%d CPUs), load average %s at start, %s at end; guest: Linux %s, %d vCPU, XDP_DROP in virtio_net\n", host_kernel, host_cpu, host_cpus, load_start, load_end, guest_kernel, smp)
    if (backpressure != "" || daemon_args != "") hdr = hdr sprintf("daemon: %s%s\n", backpressure, daemon_args == "" ? "" : "; options: " daemon_args)
    printf "%s", hdr > txt
    sep = line()
    for (t = 1; t <= nt; t++) {
        print sep > txt
        s1 = sprintf("| %-10s  %-13s|", T[t] " thread" (T[t] == 1 ? "" : "s"), "")
        s2 = sprintf("| %-10s  %-13s|", "sending", "")
        for (i = 1; i <= nb; i++) {
            s1 = s1 sprintf(" %-14s |", label(B[i]))
            s2 = s2 sprintf(" %-14s |", sublabel(B[i]))
            if (i > 1) { s1 = s1 sprintf(" %-8s |", "diff"); s2 = s2 sprintf(" %-8s |", "") }
        }
        print s1 > txt; print s2 > txt; print sep > txt
        r1 = sprintf("| %-10s | %-11s |", "XDP drop", "Received")
        r2 = sprintf("| %-10s | %-11s |", "in guest", "Lost/s")
        r3 = sprintf("| %-10s | %-11s |", "", "Sent/s")
        base = B[1] SUBSEP T[t]
        for (i = 1; i <= nb; i++) {
            k = B[i] SUBSEP T[t]
            has = (k in mrx)
            r1 = r1 sprintf(" %-14s |", has ? rate(mrx[k]) : "n/a")
            r2 = r2 sprintf(" %-14s |", has ? rate(mlost[k]) : "n/a")
            r3 = r3 sprintf(" %-14s |", has ? rate(msent[k]) : "n/a")
            if (i > 1) {
                d = (has && (base in mrx) && mrx[base] > 0) ? sprintf("%+.1f%%", (mrx[k] / mrx[base] - 1) * 100) : ""
                r1 = r1 sprintf(" %-8s |", d); r2 = r2 sprintf(" %-8s |", ""); r3 = r3 sprintf(" %-8s |", "")
            }
        }
        print r1 > txt; print r2 > txt; print r3 > txt
    }
    print sep > txt
    printf "Received = frames counted by the guest'\''s XDP program / T; Lost/s = (qdisc drops + tun ring drops\n" > txt
    printf "(tap tx_dropped) + daemon RX drops) / T; Sent/s = frames handed to the kernel / T. Means over runs.\n" > txt
    printf "diff: Received vs the first column. n/a: backend not available on this host.\n\n" > txt
    printf "Per run (frames): sent = received + qdisc + tun + daemon (+ in flight, 0 after the drain)\n" > txt
    printf "%-10s %3s %3s %7s %11s %11s %10s %11s %7s %6s %7s %6s\n", "backend", "thr", "run", "seconds", "sent", "received", "qdisc", "tun", "daemon", "flight", "xdp", "boot_s" > txt
    for (r = 1; r <= nr; r++) {
        split(run_line[r], f, "\t")
        printf "%-10s %3d %3d %7.3f %11d %11d %10d %11d %7d %6d %7s %6s\n", f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9], f[10], f[15], f[16] > txt
    }
    printf "\nTotal benchmark time: %s s%s\n", bench_secs, failed ? " (SOME RUNS FAILED: see runs/*/)" : "" > txt
    close(txt)

    js = out "/results.json"
    printf "{\n  \"qemu\": %s,\n  \"accel\": %s,\n  \"host_kernel\": %s,\n  \"host_cpu\": %s,\n  \"host_cpus\": %d,\n  \"host_loadavg_start\": %s,\n  \"host_loadavg_end\": %s,\n", jstr(qemu_line), jstr(accel), jstr(host_kernel), jstr(host_cpu), host_cpus, jstr(load_start), jstr(load_end) > js
    printf "  \"guest_kernel\": %s,\n  \"guest_vcpus\": %d,\n  \"qdisc\": %s,\n  \"seconds\": %d,\n  \"runs\": %d,\n  \"frame_bytes\": 60,\n", jstr(guest_kernel), smp, jstr(kind_list), secs, runs > js
    printf "  \"daemon_backpressure\": %s,\n  \"daemon_args\": %s,\n  \"failed\": %s,\n  \"unavailable\": [", jstr(backpressure), jstr(daemon_args), failed ? "true" : "false" > js
    c = 0; for (b in isna) printf "%s%s", (c++ ? ", " : ""), jstr(b) > js
    printf "],\n  \"summary\": [\n" > js
    c = 0
    for (t = 1; t <= nt; t++) for (i = 1; i <= nb; i++) {
        k = B[i] SUBSEP T[t]
        if (!(k in mrx)) continue
        printf "%s    {\"backend\": %s, \"threads\": %d, \"runs\": %d, \"received_pps\": %.0f, \"lost_pps\": %.0f, \"sent_pps\": %.0f}", (c++ ? ",\n" : ""), jstr(B[i]), T[t], n[k], mrx[k], mlost[k], msent[k] > js
    }
    printf "\n  ],\n  \"runs\": [\n" > js
    for (r = 1; r <= nr; r++) {
        split(run_line[r], f, "\t")
        printf "%s    {\"backend\": %s, \"threads\": %d, \"run\": %d, \"seconds\": %s, \"sent\": %d, \"received\": %d, \"qdisc_drops\": %d, \"tun_drops\": %d, \"daemon_drops\": %d, \"in_flight\": %d, \"qdisc_sent\": %d, \"qdisc_backlog\": %d, \"tap_tx_packets\": %d, \"daemon_rx_frames\": %s, \"xdp_mode\": %s, \"boot_seconds\": %s}", (r > 1 ? ",\n" : ""), jstr(f[1]), f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9], f[10], f[11], f[12], f[13], (f[14] == "-" ? "null" : f[14]), jstr(f[15]), f[16] > js
    }
    printf "\n  ]\n}\n" > js
    close(js)

    dat = out "/chart.dat"
    printf "# threads" > dat
    for (i = 1; i <= nb; i++) printf "\t%s_rx_mpps", B[i] > dat
    for (i = 1; i <= nb; i++) printf "\t%s_lost_mpps", B[i] > dat
    printf "\n" > dat
    for (t = 1; t <= nt; t++) {
        printf "\"%s thread%s\"", T[t], (T[t] == 1 ? "" : "s") > dat
        for (i = 1; i <= nb; i++) { k = B[i] SUBSEP T[t]; printf "\t%s", (k in mrx) ? sprintf("%.6f", mrx[k] / 1e6) : "NaN" > dat }
        for (i = 1; i <= nb; i++) { k = B[i] SUBSEP T[t]; printf "\t%s", (k in mrx) ? sprintf("%.6f", mlost[k] / 1e6) : "NaN" > dat }
        printf "\n" > dat
    }
    close(dat)
}' "$RESULTS"

# Grouped bars: Received and Lost/s per thread count, one bar per backend
# that ran (n/a ones are named in the subtitle).
nb=${#BACKENDS[@]}
title="XDP-drop guest, 64-byte frames, qdisc $qdisc, ${seconds}s x $runs run(s): QEMU $QMAJ.$QMIN.$QMIC, ${ACCEL^^}"
[[ $ACCEL == tcg ]] && title+=" (emulated guest: not KVM numbers)"
subtitle="host Linux $HOST_KERNEL, $HOST_CPU ($HOST_CPUS CPUs); guest Linux ${GUEST_KERNEL:-?}, $smp vCPU"
rx_plot='' lost_plot=''
for i in $(seq 1 "$nb"); do
    b=${BACKENDS[i - 1]}
    case $b in vhost-user) name="vhost-user-tap" ;; tap) name="QEMU tap (vhost=off)" ;; *) name="vhost-net (vhost=on)" ;; esac
    if [[ -n ${NA[$b]:-} ]]; then
        subtitle+="; $name: n/a"
        continue
    fi
    sep=''
    [[ -n $rx_plot ]] && sep=', '
    rx_plot+="${sep}'$out/chart.dat' using $((i + 1)):xtic(1) title '$name'"
    lost_plot+="${sep}'$out/chart.dat' using $((nb + i + 1)):xtic(1) title '$name'"
done
if [[ -n $rx_plot ]]; then
    gnuplot <<EOF || { vut_log "gnuplot failed"; FAILED=1; }
set terminal png size 1200,540 font ",10"
set output '$out/chart.png'
set termoption noenhanced
set multiplot layout 1,2 title "$title\n$subtitle"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set boxwidth 0.9
set grid ytics
set yrange [0:*]
set offsets 0, 0, graph 0.15, 0
set key top center horizontal
set datafile missing 'NaN'
set title 'Received (Mpps, higher is better)'
set ylabel 'Mpps'
plot $rx_plot
set title 'Lost/s (Mpps: qdisc + tun ring + daemon drops)'
plot $lost_plot
unset multiplot
EOF
else
    vut_log "no run completed: no chart"
    FAILED=1
fi

cat "$out/table.txt"
vut_log "wrote $out/table.txt, $out/results.json, $out/chart.png (per-run logs in $out/runs/)"
exit "$FAILED"
