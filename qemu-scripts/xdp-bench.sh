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
# This script boots, sends, drains and collects every counter verbatim; the
# accounting, the table, the JSON and the chart data come from vut-report
# (crates/vhost-user-tap-guest/src/report/xdp.rs).
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
#   --report PATH      vut-report binary (default: cargo build --release -p
#                      vhost-user-tap-guest --bin vut-report)
#   --daemon-args STR  extra daemon options, e.g. "--busy-poll-us 50"
#   --qdisc KIND       root qdisc on the tap (default fq_codel, as in the seed;
#                      pfifo_fast where the kernel has no fq_codel)
#   --smp N            guest vCPUs (default 1)
#   --out DIR          output directory (default ./xdp-bench-<date>)
#   --help
#
# Every VM boots fresh for each run (backend x threads x run), so each run's
# counters -- the tap's, the qdisc's, the daemon's (its --metrics scrape) and
# the guest's -- start at zero and belong to that run alone. Each run's
# directory, OUT/runs/BACKEND-tTHREADS-rRUN/, keeps what was collected:
# run.txt (boot time, the guest's XDP count before and after), blast.out
# (the sender), qdisc.json and link.json (tc -s -j, ip -s -j), metrics.txt
# (the daemon's scrape), console.log, daemon.log, qemu.err.
#
# Accounting, per run (all frame counts; the JSON has every term):
#   sent     = frames the sender handed to the kernel (vut-blast.c: accepted
#              by the qdisc or refused by it at enqueue)
#   received = frames the guest's XDP program counted
#   lost     = qdisc drops (tc -s) + tun ring drops (the tap's tx_dropped)
#              + daemon RX drops (daemon_dropped_frames_total{direction="rx"}
#              in its --metrics scrape, taken after QEMU left and right
#              before the daemon is stopped)
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
# Writes OUT/table.txt, results.json, chart.dat, chart.gp (gnuplot's program)
# and chart.png.
#
# Needs root (namespaces, taps; apt-get install gnuplot-nox gcc curl if missing).
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
qemu=${QEMU:-qemu-system-x86_64} accel=auto daemon='' report='' qdisc=fq_codel qdisc_explicit=0 smp=1 out=''
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
    --report) need_arg "$@"; report=$2; shift 2 ;;
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
for a in "${DAEMON_ARGS[@]}"; do
    [[ $a != --metrics* ]] || bad_usage "--daemon-args: --metrics is set by this script (it reads the daemon's counters there)"
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
# gnuplot-nox: PNG output (libgd) without X11; gcc builds the sender; curl
# scrapes the daemon's metrics.
vut_apt_install gnuplot-nox gcc libc6-dev curl
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
if [[ -z $report ]]; then
    command -v cargo >/dev/null || vut_die "cargo not found: pass --report PATH"
    vut_log "cargo build --release (vut-report)"
    (cd "$REPO_DIR" && cargo build --release --quiet -p vhost-user-tap-guest --bin vut-report) >&2
    report=${CARGO_TARGET_DIR:-$REPO_DIR/target}/release/vut-report
fi
[[ -x $report ]] || vut_die "vut-report $report is not an executable"

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

FAILED=0

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
# drain, save every counter verbatim into the run's directory, stop; run.txt,
# written last, says the run's counters are all there (vut-report reads
# them). Called as `if ! run_one`, where errexit does not apply: every step
# checks for itself.
run_one() {
    local backend=$1 threads=$2 run=$3
    local dir=$out/runs/$backend-t$threads-r$run
    rm -rf "$dir"
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
        # Its counters come from its metrics, on a unix socket in the run's directory.
        timeout -k 5 "$LIFETIME" ip netns exec "$NETNS" env RUST_LOG=info "$daemon" \
            --socket-path "$sock" --tap "$TAP" --metrics "unix:$dir/metrics.sock" "${DAEMON_ARGS[@]}" \
            </dev/null >"$dir/daemon.log" 2>&1 &
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
    local boot_s
    boot_s=$(elapsed_since "$start")
    # The count before sending: the first report (0 unless something else reached the guest).
    wait_for_line "$console" 'VUT-XDP [0-9.]+ [0-9]+ [0-9]+' "$qemu_pid" 30 "first XDP report" || return 1
    local baseline
    baseline=$(xdp_counts "$console" | tail -n1)

    # --- send ---
    timeout -k 5 $((seconds + 30)) ip netns exec "$NETNS" "$BLAST" "$TAP" "$GUEST_MAC" "$threads" "$seconds" \
        >"$dir/blast.out" 2>&1 &
    local blast_pid=$!
    RUN_PIDS+=("$blast_pid")
    wait "$blast_pid" || { vut_log "sender failed: $(cat "$dir/blast.out")"; return 1; }

    # --- drain, then save the tap's and the qdisc's counters while the backend still holds the tap ---
    sleep "$DRAIN_SECS"
    local reports final
    reports=$(xdp_counts "$console" | wc -l)
    final=$(wait_quiescent "$console" "$reports" "$qemu_pid") || return 1
    tc -n "$NETNS" -s -j qdisc show dev "$TAP" >"$dir/qdisc.json" ||
        { vut_log "tc -s -j qdisc show dev $TAP failed"; return 1; }
    ip -n "$NETNS" -s -j link show dev "$TAP" >"$dir/link.json" ||
        { vut_log "ip -s -j link show dev $TAP failed"; return 1; }

    # --- stop: QEMU first (the daemon then sees the frontend leave), then the daemon ---
    kill -TERM "$qemu_pid" 2>/dev/null
    wait "$qemu_pid" 2>/dev/null
    if [[ -n $daemon_pid ]]; then
        # Its counters: one scrape once the frontend has left (its workers
        # stopped, every count final), right before it is stopped.
        i=0
        until curl -sf --max-time 5 --unix-socket "$dir/metrics.sock" -o "$dir/metrics.txt" http://localhost/metrics &&
            grep -qx 'vhost_user_tap_frontend_connected 0' "$dir/metrics.txt"; do
            ((++i < 50)) || { vut_log "no metrics scrape without a frontend from the daemon in 5 s"; return 1; }
            sleep 0.1
        done
        kill -TERM "$daemon_pid" 2>/dev/null
        local status=0
        wait "$daemon_pid" || status=$?
        ((status == 0)) || { vut_log "daemon exited with status $status on SIGTERM"; return 1; }
    fi
    RUN_PIDS=()
    printf 'boot_seconds=%s\nxdp_before=%s\nxdp_after=%s\n' "$boot_s" "$baseline" "$final" >"$dir/run.txt"
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
# vut-report reads every run's directory, checks that each adds up and writes
# table.txt, results.json, chart.dat and chart.gp; it fails when a run failed
# or did not add up (the reports are written anyway).
NA_LIST=$(IFS=,; echo "${!NA[*]}")
report_args=(--out "$out" --backends "$(IFS=,; echo "${BACKENDS[*]}")" --unavailable="$NA_LIST"
    --threads "$threads_list" --seconds "$seconds" --runs "$runs" --qdisc "$qdisc"
    --qemu-line="$QEMU_LINE" --qemu-version "$QMAJ.$QMIN.$QMIC" --accel "$ACCEL" --cpu-model="$cpu_model"
    --host-kernel="$HOST_KERNEL" --host-cpu="$HOST_CPU" --host-cpus "$HOST_CPUS" --smp "$smp"
    --load-start="$LOAD_START" --load-end="$(cut -d' ' -f1-3 /proc/loadavg)"
    --daemon-args="${DAEMON_ARGS[*]}" --bench-seconds "$BENCH_SECS")
[[ -z $INTX_NOTE ]] || report_args+=(--intx)
"$report" xdp-bench "${report_args[@]}" || FAILED=1

rm -f "$out/chart.png"
if [[ -f $out/chart.gp ]]; then
    gnuplot "$out/chart.gp" || { vut_log "gnuplot failed"; FAILED=1; }
else
    FAILED=1
fi

cat "$out/table.txt"
vut_log "wrote $out/table.txt, $out/results.json, $out/chart.png (per-run logs in $out/runs/)"
exit "$FAILED"
