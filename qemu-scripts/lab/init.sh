#!/bin/sh
# shellcheck shell=sh
# PID 1 of the backpressure lab VM (copied into the initramfs as /init by
# qemu-scripts/backpressure-lab.sh; busybox sh, iproute2's ip and tc).
#
# This VM is the *host* of the experiment: the tap, its qdisc, the daemon,
# the synthetic guest (a vhost-user frontend process, no second VM) and the
# UDP sender all run here, on the Linux 7.3 kernel that has IFF_BACKPRESSURE.
#
#   vut-udpsend --UDP--> 10.200.0.2 via vut0 (qdisc -> tun ring)
#        --> vhost-user-tap --> vhost-user-tap-guest (harvests at --rx-rate)
#
# Parameters come on the kernel command line (vut.*=, see below); results go
# to the serial console as one-line markers, raw counters only (the host's
# vut-report does the accounting, crates/vhost-user-tap-guest/src/report/):
#   VUT-LAB-BOOT, VUT-LAB-TUN, VUT-LAB-SYSCTL, VUT-LAB-CASE-START,
#   VUT-LAB-SEND(-THREAD), VUT-LAB-STALL, VUT-LAB-LOG (daemon lines about
#   backpressure, qdisc, metrics), VUT-LAB-QDISC (tc -s -j, verbatim),
#   VUT-LAB-GUEST (the synthetic guest's JSON report, verbatim),
#   VUT-LAB-RESULT (k=v: the sender's counts, the tap's sysfs counters, the
#   sampler's and the drain's findings), VUT-LAB-METRIC (the daemon's
#   --metrics scrape, a line each: its counters come from there),
#   VUT-LAB-SKIP, VUT-LAB-WARN, VUT-LAB-ERROR, VUT-LAB-DONE.
export PATH=/usr/bin:/bin
# Debian's busybox-static runs its own applets before anything in PATH
# (standalone shell): iproute2's ip and tc must be called by path. Busybox's
# tc can neither set up fq_codel nor print qdisc statistics.
IP=/usr/sbin/ip
TC=/usr/sbin/tc
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
exec </dev/console >/dev/console 2>&1

finish() {
    echo VUT-LAB-DONE
    # -f: there is no init to ask; reboot(RB_POWER_OFF) makes QEMU exit.
    poweroff -f
    # PID 1 must never return.
    while :; do sleep 3600; done
}

seconds=10
rx_rate=5000
threads=1,2
modes=stock,backpressure
qdiscs=fq_codel,pfifo
pfifo_limit=1000
payload=18
drain_max=30
bp_flag=1
qdisc_flag=1
read -r cmdline </proc/cmdline
for arg in $cmdline; do
    case "$arg" in
    vut.seconds=*) seconds=${arg#*=} ;;
    vut.rx_rate=*) rx_rate=${arg#*=} ;;
    vut.threads=*) threads=${arg#*=} ;;
    vut.modes=*) modes=${arg#*=} ;;
    vut.qdiscs=*) qdiscs=${arg#*=} ;;
    vut.pfifo_limit=*) pfifo_limit=${arg#*=} ;;
    vut.payload=*) payload=${arg#*=} ;;
    vut.drain_max=*) drain_max=${arg#*=} ;;
    vut.bp_flag=*) bp_flag=${arg#*=} ;;
    vut.qdisc_flag=*) qdisc_flag=${arg#*=} ;;
    esac
done

TAP=vut0
SOCK=/run/vut.sock
HOST_IP=10.200.0.1
GUEST_IP=10.200.0.2
# The synthetic guest takes its MAC from the daemon's config space (--mac);
# the permanent neighbour entry uses the same one, so no ARP ever runs.
GUEST_MAC=52:54:00:12:34:56
METRICS_ADDR=127.0.0.1:9100

echo "VUT-LAB-BOOT kernel=$(uname -r) cpus=$(nproc) seconds=$seconds rx_rate=$rx_rate" \
    "threads=$threads modes=$modes qdiscs=$qdiscs pfifo_limit=$pfifo_limit payload=$payload"
while read -r m; do
    insmod "/lib/modules/$m.ko" || {
        echo "VUT-LAB-ERROR insmod $m failed"
        finish
    }
done </etc/vut-modules
"$IP" link set lo up
vut-tunfeatures || finish
echo "VUT-LAB-SYSCTL wmem_default=$(cat /proc/sys/net/core/wmem_default)" \
    "default_qdisc=$(cat /proc/sys/net/core/default_qdisc)"

now_ms() { awk '{ printf "%d\n", $1 * 1000 }' /proc/uptime; }

# First number after "KEY": in stdin (tc -j is one line; the first match is
# the root qdisc's field). Only for the sampler and the drain: the reported
# numbers are tc's JSON itself.
json_num() {
    awk -v k="\"$1\":" '{ i = index($0, k); if (i) { s = substr($0, i + length(k));
        if (match(s, /^-?[0-9]+/)) print substr(s, 1, RLENGTH); exit } }'
}

# Wait up to $1 tenths of a second for the command "$2..." to succeed.
# (sh has no local variables: every function uses names of its own.)
wait_for() {
    wf_tries=$1
    shift
    while ! "$@" 2>/dev/null; do
        wf_tries=$((wf_tries - 1))
        [ "$wf_tries" -le 0 ] && return 1
        sleep 0.1
    done
}

stat_of() { cat "/sys/class/net/$TAP/statistics/$1"; }

# The options each qdisc runs with beyond its kind ("" = the kernel's defaults).
qdisc_options() {
    case "$1" in
    # Kernel defaults (limit 10240p, target 5ms, interval 100ms): what this
    # kernel gives a tap anyway (net.core.default_qdisc), and what the seed
    # benchmarked.
    fq_codel) echo "" ;;
    # A plain tail-drop FIFO: no AQM, so every drop it makes is a capacity
    # drop. Its limit is set explicitly (see backpressure-lab.sh).
    pfifo) echo "limit $pfifo_limit" ;;
    # Not in the default matrix: the kernel's lockless (TCQ_F_NOLOCK) FIFO,
    # with which several CPUs can be in tun's xmit at once (--qdiscs
    # pfifo_fast shows what that does to the LLTX race).
    pfifo_fast) echo "" ;;
    *) return 1 ;;
    esac
}

stop_pid() {
    [ -n "$1" ] || return 0
    kill -TERM "$1" 2>/dev/null
    wait "$1" 2>/dev/null
}

# Address, qdisc options, and a permanent neighbour entry for the guest (the
# host stack then sends without ARP).
configure_tap() {
    "$IP" link set "$TAP" up || return 1
    "$IP" addr add "$HOST_IP/24" dev "$TAP" || return 1
    # shellcheck disable=SC2086 # $2 (options) is a list of words on purpose
    if [ "$qdisc_flag" != 1 ]; then
        "$TC" qdisc replace dev "$TAP" root "$1" $2 || return 1
    elif [ -n "$2" ]; then
        "$TC" qdisc change dev "$TAP" root "$1" $2 || return 1
    fi
    "$IP" neigh replace "$GUEST_IP" lladdr "$GUEST_MAC" dev "$TAP" nud permanent
}

run_case() {
    q=$1 mode=$2 n=$3
    tag="qdisc=$q mode=$mode threads=$n"
    echo "VUT-LAB-CASE-START $tag"
    qopts=$(qdisc_options "$q") || {
        echo "VUT-LAB-ERROR $tag: unknown qdisc"
        return
    }
    flags=""
    if [ "$bp_flag" = 1 ]; then
        case "$mode" in
        stock) flags="--backpressure off" ;;
        backpressure) flags="--backpressure auto" ;;
        esac
    elif [ "$mode" = backpressure ]; then
        echo "VUT-LAB-SKIP $tag: the daemon has no --backpressure option"
        return
    fi
    # The daemon's counters are read from its metrics.
    flags="$flags --metrics $METRICS_ADDR"
    # The daemon installs the qdisc itself where it can (--qdisc KIND, the
    # way users are told to run it); tc then only adds the options.
    [ "$qdisc_flag" = 1 ] && flags="$flags --qdisc $q"
    rm -f "$SOCK"
    # shellcheck disable=SC2086 # $flags is a list of words on purpose
    RUST_LOG=info vhost-user-tap --socket-path "$SOCK" --tap "$TAP" --mac "$GUEST_MAC" \
        $flags 2>/tmp/daemon.log &
    dpid=$!
    gpid=
    if ! wait_for 100 test -S "$SOCK" || ! wait_for 100 test -e "/sys/class/net/$TAP"; then
        echo "VUT-LAB-ERROR $tag: daemon did not start: $(tr '\n' '|' </tmp/daemon.log)"
        stop_pid "$dpid"
        return
    fi
    if ! configure_tap "$q" "$qopts"; then
        echo "VUT-LAB-ERROR $tag: configuring $TAP failed: $(tr '\n' '|' </tmp/daemon.log)"
        stop_pid "$dpid"
        return
    fi
    vhost-user-tap-guest --socket-path "$SOCK" --rx-rate "$rx_rate" --json \
        >/tmp/guest.json 2>/tmp/guest.err &
    gpid=$!
    # The daemon starts its RX worker once the guest's rings are set up;
    # "frontend connected" comes just before that, so allow a moment more.
    if ! wait_for 100 grep -q "frontend connected" /tmp/daemon.log; then
        echo "VUT-LAB-ERROR $tag: the synthetic guest did not connect: $(tr '\n' '|' </tmp/guest.err)"
        stop_pid "$gpid"
        stop_pid "$dpid"
        return
    fi
    sleep 0.5
    grep -iE 'backpressure|qdisc|metrics' /tmp/daemon.log | sed "s/^/VUT-LAB-LOG $tag: /"

    vut-udpsend "$GUEST_IP" 9 "$n" "$seconds" "$payload" >/tmp/send.out &
    spid=$!
    # While the senders run, sample every 0.5 s plus the time tc takes (a
    # few hundred milliseconds under TCG):
    # - how full the qdisc gets: how much margin the zero-loss runs had;
    # - stalls: when neither the qdisc nor the daemon moved a frame since the
    #   last sample, the counters are frozen and exact, so the tun ring's
    #   occupancy (handed to tun - tun drops - read by the daemon) says who
    #   is stuck: a full ring means the daemon (or the guest behind it)
    #   stopped reading; an empty ring with a queued qdisc means the kernel
    #   left the tap's queue stopped. Each stall episode is reported once,
    #   with the daemon's RX counters from its metrics;
    # - the longest gap between two samples (normally about 1 s): much more
    #   means the sampler did not get a CPU, because the senders saturate the
    #   vCPUs or the host's CPUs are busy elsewhere (then the VM stands still,
    #   which also shows as slower Received and, at worst, sender timeouts).
    peak_qlen=0 samples=0 stalls=0 prev_sent=-1 prev_read=-1 in_stall=0
    t_prev=$(now_ms) max_gap=0
    while kill -0 "$spid" 2>/dev/null; do
        t_now=$(now_ms)
        [ $((t_now - t_prev)) -gt "$max_gap" ] && max_gap=$((t_now - t_prev))
        t_prev=$t_now
        sq=$("$TC" -s -j qdisc show dev "$TAP")
        s_read=$(stat_of tx_packets)
        s_qlen=$(echo "$sq" | json_num qlen)
        s_sent=$(echo "$sq" | json_num packets)
        [ "${s_qlen:-0}" -gt "$peak_qlen" ] && peak_qlen=$s_qlen
        if [ "$s_read" = "$prev_read" ] && [ "$s_sent" = "$prev_sent" ]; then
            if [ "$in_stall" = 0 ]; then
                stalls=$((stalls + 1))
                rx=$(wget -q -O - "http://$METRICS_ADDR/metrics" |
                    grep -E '^vhost_user_tap_rx_(stops|wakes|kicks|notify_races)_total' |
                    sed 's/^vhost_user_tap_\([a-z_]*\)_total{[^}]*} /\1=/' | tr '\n' ' ')
                echo "VUT-LAB-STALL $tag: t=$(now_ms)ms nothing moved since the last sample: qdisc_qlen=$s_qlen" \
                    "tun_ring=$((s_sent - $(stat_of tx_dropped) - s_read)) read=$s_read $rx"
            fi
            in_stall=1
        else
            in_stall=0
        fi
        prev_read=$s_read prev_sent=$s_sent
        samples=$((samples + 1))
        sleep 0.5
    done
    wait "$spid" || echo "VUT-LAB-ERROR $tag: vut-udpsend failed: $(tr '\n' '|' </tmp/send.out)"
    # What the daemon had taken from the tap by the end of the sending window:
    # the basis of "Received pps" (delivery continues while queues drain).
    read_in_window=$(stat_of tx_packets)
    cat /tmp/send.out

    # Drain: the guest keeps harvesting at rx_rate; wait until the qdisc is
    # empty and the daemon has read nothing from the tap for 1 s. Only then
    # are the frames the kernel cannot show us (tun ring, daemon staging,
    # guest ring) known to be zero, so the totals can be compared exactly.
    t0=$(now_ms)
    prev=-1 still=0 drained=no
    while :; do
        backlog=$("$TC" -s -j qdisc show dev "$TAP" | json_num qlen)
        read_now=$(stat_of tx_packets)
        if [ "$backlog" = 0 ] && [ "$read_now" = "$prev" ]; then
            still=$((still + 1))
        else
            still=0
        fi
        prev=$read_now
        if [ "$still" -ge 4 ]; then
            drained=yes
            break
        fi
        [ $(($(now_ms) - t0)) -gt $((drain_max * 1000)) ] && break
        sleep 0.25
    done
    drain_ms=$(($(now_ms) - t0))
    [ "$drained" = yes ] || echo "VUT-LAB-WARN $tag: not drained after ${drain_max}s (backlog $backlog)"

    # The kernel's counters, verbatim: tc's JSON and the tap's sysfs
    # statistics (nothing moves any more).
    echo "VUT-LAB-QDISC $tag: $("$TC" -s -j qdisc show dev "$TAP")"
    tap_stats="tap_tx_packets=$(stat_of tx_packets) tap_tx_dropped=$(stat_of tx_dropped)"
    tap_stats="$tap_stats tap_tx_errors=$(stat_of tx_errors) tap_rx_packets=$(stat_of rx_packets)"

    stop_pid "$gpid"
    if [ -s /tmp/guest.json ]; then
        echo "VUT-LAB-GUEST $tag: $(head -n 1 /tmp/guest.json)"
    else
        echo "VUT-LAB-WARN $tag: no JSON from the synthetic guest: $(tr '\n' '|' </tmp/guest.err)"
    fi
    # The daemon's counters: one scrape after the guest left (its workers
    # stopped, every count final), right before the daemon is stopped.
    rm -f /tmp/metrics.txt
    sc_tries=50
    until wget -q -O /tmp/metrics.txt "http://$METRICS_ADDR/metrics" &&
        grep -qx 'vhost_user_tap_frontend_connected 0' /tmp/metrics.txt; do
        sc_tries=$((sc_tries - 1))
        if [ "$sc_tries" -le 0 ]; then
            echo "VUT-LAB-WARN $tag: no scrape of http://$METRICS_ADDR/metrics without a frontend in 5 s"
            break
        fi
        sleep 0.1
    done
    stop_pid "$dpid"
    send_line=$(sed -n 's/^VUT-LAB-SEND threads=[0-9]* //p' /tmp/send.out)
    echo "VUT-LAB-RESULT $tag $send_line read_in_window=$read_in_window $tap_stats" \
        "drained=$drained drain_ms=$drain_ms" \
        "peak_qdisc_qlen=$peak_qlen samples=$samples stalls=$stalls max_sample_gap_ms=$max_gap"
    if [ -s /tmp/metrics.txt ]; then
        grep -v '^#' /tmp/metrics.txt | sed "s/^/VUT-LAB-METRIC $tag: /"
    fi
}

for each_qdisc in $(echo "$qdiscs" | tr , ' '); do
    for each_mode in $(echo "$modes" | tr , ' '); do
        for each_threads in $(echo "$threads" | tr , ' '); do
            run_case "$each_qdisc" "$each_mode" "$each_threads"
        done
    done
done
finish
