#!/usr/bin/env bash
# Start a QEMU VM whose NIC is served by vhost-user-tap, with the command line
# spelled right for the QEMU version found.
#
# Usage: qemu-scripts/run-vm.sh [options] [-- extra QEMU arguments]
#
#   --qemu PATH          QEMU binary (default: $QEMU, else qemu-system-x86_64)
#   --kernel PATH        boot this kernel (with --initrd PATH, --append STR)
#   --initrd PATH
#   --disk PATH          or boot this disk image (virtio-blk; raw or qcow2)
#                        Neither: the test guest of build-guest.sh, which
#                        configures eth0 as 10.77.0.2/24 and gives a shell.
#   --append STR         kernel command line (default with --kernel:
#                        "console=ttyS0"; with the test guest:
#                        "console=ttyS0 quiet panic=-1 vut.mode=shell")
#   --socket PATH        the daemon's socket (default /tmp/vhost-user-tap.sock)
#   --queues N           queue pairs (default 1): -netdev ...,queues=N and,
#                        for N > 1, virtio-net-pci mq=on,vectors=2N+2. The
#                        daemon must serve as many pairs.
#   --mem SIZE           guest memory, QEMU syntax (default 512M); also the
#                        size of the shared memfd backend
#   --smp N              vCPUs (default 1; for multiqueue use --smp N too)
#   --mac MAC            guest MAC (default 52:54:00:12:34:56)
#   --reconnect SECS     reconnect to the socket SECS s after the daemon went
#                        away (QEMU < 9.2: reconnect=SECS; newer: reconnect-ms)
#   --accel auto|kvm|tcg default auto: KVM only if a kernel really boots
#                        with it (probed once and cached, see lib-qemu.sh)
#   --xdp                turn the guest offloads off (guest_csum, guest_tso4,
#                        ... as far as this QEMU has them): Linux virtio_net
#                        refuses native XDP while they are negotiated, and
#                        QEMU cannot switch them off later for vhost-user
#   --tap NAME           compare: use QEMU's own tap backend on tap NAME
#                        instead of the daemon (-netdev tap,vhost=off)
#   --vhost-net          with --tap: kernel vhost-net (vhost=on)
#   --vectors N          override the MSI-X vector count (0: INTx)
#   --qmp PATH           a QMP socket at PATH (unix, QEMU listens): what
#                        migrate-vm.sh and any other QMP client drive the VM
#                        through (migration is only reachable by a monitor)
#   --incoming URI       start as a migration destination: the same devices,
#                        connected to the daemon on --socket, waiting for the
#                        migration stream on URI (unix:PATH, tcp:HOST:PORT,
#                        exec:CMD to restore a saved VM, defer) instead of
#                        booting. Give it the source's options (--mem,
#                        --queues, --mac, --kernel/--disk, ...): QEMU refuses
#                        a stream from a machine that differs.
#   --dry-run            print the QEMU command line and exit
#   --help               this text
#
# Without --dry-run the script execs QEMU (its pid is QEMU's); the console is
# the serial port on stdio (-nographic: Ctrl-A X quits). Start the daemon
# first, e.g.
#   vhost-user-tap --socket-path /tmp/vhost-user-tap.sock --tap vut0
#   ip addr add 10.77.0.1/24 dev vut0; ip link set vut0 up
#
# Live migration (both hosts run a daemon for the VM's socket; see README):
#   destination: run-vm.sh --socket B.sock --qmp dst.qmp --incoming unix:/tmp/mig.sock
#   source:      qemu-scripts/migrate-vm.sh --qmp src.qmp --to unix:/tmp/mig.sock
# Save and restore:
#   migrate-vm.sh --qmp src.qmp --to "exec:cat > vm.state"   (then quit the source)
#   run-vm.sh ... --incoming "exec:cat vm.state"
#
# Why each piece:
# - memory-backend-memfd,share=on + -numa node,memdev=: the daemon maps guest
#   memory from the fds QEMU sends; private memory would be invisible to it.
# - QEMU 7.2 under TCG crashes (SIGSEGV in msix_set_vector_notifiers) when a
#   vhost-user NIC uses MSI-X: vectors=0 (INTx) there. Not with KVM, not >= 8.
# - The reconnect option was renamed: reconnect=<s> (until 9.1, removed in
#   10.2), reconnect-ms=<ms> (9.2 and later).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VUT_LOG_PREFIX=run-vm
# shellcheck source=lib-vm.sh
source "$SCRIPT_DIR/lib-vm.sh"
# shellcheck source=lib-qemu.sh
source "$SCRIPT_DIR/lib-qemu.sh"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
bad_usage() {
    echo "run-vm: $*" >&2
    echo "run-vm: see --help" >&2
    exit 2
}

qemu=${QEMU:-qemu-system-x86_64}
kernel='' initrd='' disk='' append='' append_set=0
socket=/tmp/vhost-user-tap.sock
queues=1 mem=512M smp=1 mac=52:54:00:12:34:56 reconnect='' accel=auto
xdp=0 tap='' vhost_net=0 vectors='' dry_run=0 qmp='' incoming=''
extra=()

need_arg() { [[ $# -ge 2 ]] || bad_usage "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case $1 in
    --qemu) need_arg "$@"; qemu=$2; shift 2 ;;
    --kernel) need_arg "$@"; kernel=$2; shift 2 ;;
    --initrd) need_arg "$@"; initrd=$2; shift 2 ;;
    --disk) need_arg "$@"; disk=$2; shift 2 ;;
    --append) need_arg "$@"; append=$2; append_set=1; shift 2 ;;
    --socket) need_arg "$@"; socket=$2; shift 2 ;;
    --queues) need_arg "$@"; queues=$2; shift 2 ;;
    --mem) need_arg "$@"; mem=$2; shift 2 ;;
    --smp) need_arg "$@"; smp=$2; shift 2 ;;
    --mac) need_arg "$@"; mac=$2; shift 2 ;;
    --reconnect) need_arg "$@"; reconnect=$2; shift 2 ;;
    --accel) need_arg "$@"; accel=$2; shift 2 ;;
    --xdp) xdp=1; shift ;;
    --tap) need_arg "$@"; tap=$2; shift 2 ;;
    --vhost-net) vhost_net=1; shift ;;
    --vectors) need_arg "$@"; vectors=$2; shift 2 ;;
    --qmp) need_arg "$@"; qmp=$2; shift 2 ;;
    --incoming) need_arg "$@"; incoming=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) bad_usage "unknown argument $1" ;;
    esac
done

# --- validation ----------------------------------------------------------------
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
if ! is_uint "$queues" || ((queues < 1 || queues > 128)); then bad_usage "--queues $queues: 1..128"; fi
if ! is_uint "$smp" || ((smp < 1)); then bad_usage "--smp $smp: a positive number"; fi
[[ $mem =~ ^[0-9]+[MGT]?$ ]] || bad_usage "--mem $mem: e.g. 512M or 2G"
[[ $mac =~ ^([0-9A-Fa-f]{2}:){5}[0-9A-Fa-f]{2}$ ]] || bad_usage "--mac $mac: six hex bytes"
((16#${mac:1:1} % 2 == 0)) || bad_usage "--mac $mac: a multicast address"
if [[ -n $reconnect ]] && { ! is_uint "$reconnect" || ((reconnect < 1)); }; then
    bad_usage "--reconnect $reconnect: seconds, 1 or more"
fi
[[ -z $vectors ]] || is_uint "$vectors" || bad_usage "--vectors $vectors: a number"
case $accel in auto | kvm | tcg) ;; *) bad_usage "--accel $accel: auto, kvm or tcg" ;; esac
[[ $vhost_net -eq 0 || -n $tap ]] || bad_usage "--vhost-net needs --tap NAME"
[[ -z $disk || (-z $kernel && -z $initrd) ]] || bad_usage "--disk excludes --kernel/--initrd"
[[ -z $initrd || -n $kernel ]] || bad_usage "--initrd needs --kernel"
[[ $qmp != *,* ]] || bad_usage "--qmp $qmp: a path without commas (QEMU's option syntax)"
command -v "$qemu" >/dev/null || vut_die "QEMU $qemu not found (--qemu PATH; Debian: apt-get install qemu-system-x86)"

test_guest=0
if [[ -z $kernel && -z $disk ]]; then
    kernel=$VUT_CACHE/guest/vmlinuz
    initrd=$VUT_CACHE/guest/initrd.img
    test_guest=1
    [[ -f $kernel && -f $initrd ]] ||
        vut_die "no --kernel or --disk given and the test guest is not built: run qemu-scripts/build-guest.sh"
fi
for f in "$kernel" "$initrd" "$disk"; do
    [[ -z $f || -f $f ]] || vut_die "$f: no such file"
done
if [[ $append_set -eq 0 && -n $kernel ]]; then
    if [[ $test_guest -eq 1 ]]; then
        # The test guest's shell mode: eth0 10.77.0.2/24, then a shell.
        append="console=ttyS0 quiet panic=-1 vut.mode=shell"
    else
        append="console=ttyS0"
    fi
fi

read -r qmaj qmin _ < <(vut_qemu_version "$qemu")
qver=$((qmaj * 100 + qmin))

# KVM: the host CPU's model when the probe booted with it. TCG: QEMU's
# default model, which TCG emulates completely.
cpu=default
if [[ $accel == auto ]]; then
    read -r accel cpu < <(vut_detect_accel "$qemu" "$kernel" "$initrd")
elif [[ $accel == kvm ]]; then
    cpu=host
fi

# --- the command line ------------------------------------------------------------
cmd=("$qemu" -accel "$accel")
[[ $cpu == host ]] && cmd+=(-cpu host)
cmd+=(-m "$mem" -smp "$smp" -nographic)
cmd+=(-object "memory-backend-memfd,id=mem,size=$mem,share=on" -numa "node,memdev=mem")
if [[ -n $kernel ]]; then
    cmd+=(-kernel "$kernel")
    [[ -n $initrd ]] && cmd+=(-initrd "$initrd")
    cmd+=(-append "$append")
    # The test guest powers off when done; panic=-1 reboots on a panic, and
    # -no-reboot turns both into QEMU exiting.
    [[ $test_guest -eq 1 ]] && cmd+=(-no-reboot)
else
    format=raw
    [[ $(head -c 4 "$disk" | od -An -tx1 | tr -d ' \n') == 514649fb ]] && format=qcow2
    cmd+=(-drive "file=$disk,if=virtio,format=$format")
fi

if [[ -n $tap ]]; then
    netdev="tap,id=net0,ifname=$tap,script=no,downscript=no,vhost=$([[ $vhost_net -eq 1 ]] && echo on || echo off)"
else
    chardev="socket,id=chr0,path=$socket"
    if [[ -n $reconnect ]]; then
        if ((qver >= 902)); then
            chardev+=",reconnect-ms=$((reconnect * 1000))"
        else
            chardev+=",reconnect=$reconnect"
        fi
    fi
    cmd+=(-chardev "$chardev")
    netdev="vhost-user,id=net0,chardev=chr0"
fi
netdev+=",queues=$queues"
cmd+=(-netdev "$netdev")

device="virtio-net-pci,netdev=net0,mac=$mac"
if ((queues > 1)); then
    device+=",mq=on"
    # One vector per virtqueue (2 per pair), one for the control queue, one for config changes.
    [[ -n $vectors ]] || vectors=$((2 * queues + 2))
fi
if [[ -z $tap && $accel == tcg && $qmaj -lt 8 ]]; then
    # README: QEMU 7.2 + TCG + vhost-user + MSI-X = SIGSEGV; INTx avoids it
    # (whatever --vectors said: the alternative is a crash).
    [[ ${vectors:-0} == 0 ]] || vut_log "QEMU $qmaj.$qmin under TCG: vectors=0 instead of $vectors (MSI-X crashes it with vhost-user)"
    vectors=0
fi
[[ -z $vectors ]] || device+=",vectors=$vectors"
if [[ $xdp -eq 1 ]]; then
    # Ask this QEMU which of the guest offload properties it has (guest_uso4/6
    # appeared in 8.2); setting an unknown one is a fatal error.
    props=$("$qemu" -device virtio-net-pci,help 2>/dev/null) || true
    for p in guest_csum guest_tso4 guest_tso6 guest_ecn guest_ufo guest_uso4 guest_uso6; do
        if grep -q "^ *$p=" <<<"$props"; then
            device+=",$p=off"
        fi
    done
fi
cmd+=(-device "$device")
# wait=off: QEMU starts without waiting for a client; one connects when needed.
[[ -z $qmp ]] || cmd+=(-qmp "unix:$qmp,server=on,wait=off")
[[ -z $incoming ]] || cmd+=(-incoming "$incoming")
cmd+=("${extra[@]}")

if [[ $dry_run -eq 1 ]]; then
    # One option per line, quoted only where the shell needs it: copy-pasteable.
    quote() {
        if [[ $1 =~ ^[A-Za-z0-9_.,:=/+@%-]+$ ]]; then
            printf '%s' "$1"
        else
            printf "'%s'" "${1//\'/\'\\\'\'}"
        fi
    }
    out=$(quote "${cmd[0]}")
    for arg in "${cmd[@]:1}"; do
        if [[ $arg == -* ]]; then
            out+=$' \\\n    '
        else
            out+=' '
        fi
        out+=$(quote "$arg")
    done
    echo "$out"
    exit 0
fi

if [[ -z $tap && ! -S $socket ]]; then
    vut_die "$socket is not a socket: start the daemon first (vhost-user-tap --socket-path $socket --tap NAME)"
fi
vut_log "QEMU $qmaj.$qmin, accel $accel, $queues queue pair(s)$([[ -n $tap ]] && echo ", tap $tap" || echo ", socket $socket")${incoming:+, waiting for a migration on $incoming}"
exec "${cmd[@]}"
