#!/usr/bin/env bash
# Build the bootable test guest for tests/qemu_e2e.rs, run-vm.sh and
# xdp-bench.sh: Debian's kernel plus a tiny initramfs (busybox-static, the
# virtio-net modules, a static UDP counter, the static XDP-drop counter
# vut-xdp built from vut-xdp.c, and an /init that runs the test script and
# powers off).
#
# Usage: qemu-scripts/build-guest.sh [OUT_DIR]
#   OUT_DIR defaults to ${VUT_CACHE:-$HOME/.cache/vhost-user-tap}/guest and
#   receives vmlinuz and initrd.img. Prints both paths on stdout at the end.
#
# Idempotent and cached: the kernel .deb is downloaded and extracted once into
# $VUT_CACHE/kernel/, and OUT_DIR is rebuilt only when this script, lib-vm.sh,
# vut-xdp.c, the kernel package or busybox changed. Needs root (apt-get
# install, and a /dev/console node in the initramfs). Installs nothing but
# Debian packages; the kernel is only extracted, never installed on the host.
#
# Guest protocol (kernel command line -> serial console markers), all
# optional with the defaults shown:
#   vut.ip=10.77.0.2/24          address of eth0
#   vut.peer=10.77.0.1           host side address, pinged by the guest
#   vut.peer_mac=                if set, a static ARP entry for the peer
#   vut.ping_count=3             echo requests; VUT-PING-OK only if all answered
#   vut.udp_port=5000            UDP port counted by vut-udpcount
#   vut.udp_count=1000           datagrams expected (0: skip the UDP phase)
#   vut.udp_timeout=90           seconds the counter waits in total
#   vut.shell=1                  drop to a shell instead of powering off
#   vut.mode=e2e                 what the guest does (see below)
#   vut.xdp_secs=60              xdp mode: seconds to count (0: until powered off)
#   vut.xdp_interval_ms=1000     xdp mode: report interval
#   vut.tcp_port=5001            migrate mode: TCP port of the stream sink
# Modes:
#   e2e    (default) the end-to-end test: configure eth0, ping the peer, count
#          UDP datagrams (the parameters above), power off.
#   xdp    the XDP-drop guest of xdp-bench.sh: bring eth0 up (no address, so
#          the guest answers nothing), attach vut-xdp's program that counts and
#          drops every frame, report, power off. Needs a NIC without guest
#          offloads (run-vm.sh --xdp) for native XDP.
#   shell  configure eth0 like e2e, then give a shell on the console.
#   probe  print VUT-PROBE-OK as soon as userspace runs and power off (the
#          KVM probe of lib-qemu.sh: proves a kernel really boots).
#   migrate  the live-migration test (tests/qemu_migration.rs): configure eth0
#          like e2e and stay up (the kernel answers pings) while a sink takes
#          one TCP stream after another on vut.tcp_port and reports each
#          one's length and SHA-256: the guest checks every byte it received,
#          across a migration or a save/restore, without storing the stream.
#          Boot it with init_on_alloc=0: Debian's kernel otherwise zeroes
#          every page it allocates, which makes QEMU copy the NIC's receive
#          buffers again and hides a backend that does not log its writes.
# Markers (one per line, always at the start of a write):
#   VUT-BOOT, VUT-NET mac=.. ip=.., VUT-UDP-LISTENING <port>, VUT-READY,
#   VUT-PING-OK | VUT-PING-FAIL, VUT-UDP-COUNT <n> (every second and at the
#   end), VUT-UDP-RESULT total=<n> distinct=<n> invalid=<n> duplicate=<n>,
#   VUT-UDP-DONE ok|timeout, VUT-SNMP ..., VUT-ERROR <msg>, VUT-DONE;
#   xdp mode: VUT-XDP-READY mode=native|generic prog_id=<id>,
#   VUT-XDP <seconds> <frames> <pps> (every interval, frames cumulative),
#   VUT-XDP-RESULT seconds=.. frames=.. bytes=.. mode=.., VUT-NIC ...;
#   probe mode: VUT-PROBE-OK;
#   migrate mode: VUT-STREAM-LISTENING n=<k> port=<p> (ready for stream k),
#   VUT-STREAM n=<k> bytes=<n> sha256=<hex> (stream k ended: the sender
#   closed its side).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VUT_LOG_PREFIX=build-guest
# shellcheck source=lib-vm.sh
source "$SCRIPT_DIR/lib-vm.sh"

OUT_DIR=${1:-$VUT_CACHE/guest}
KERNEL_CACHE=$VUT_CACHE/kernel

# Modules the guest needs for a virtio-net-pci NIC. Their dependencies are
# resolved from the modules themselves (the .deb ships no modules.dep), so
# this also works if a future kernel splits or merges modules.
ROOT_MODULES=(virtio_pci virtio_net)

# --- packages --------------------------------------------------------------
# gcc + libc6-dev build the static UDP counter: busybox-static's nc has no -u,
# and no busybox applet can receive UDP on an arbitrary port.
vut_apt_install busybox-static cpio xz-utils gzip gcc libc6-dev qemu-system-x86 iputils-ping

# --- kernel package ----------------------------------------------------------
# linux-image-amd64 is a metapackage depending on the current ABI's image with
# an exact version, e.g. "Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)".
# Resolve it from the local apt lists (one apt-cache call: this machine's apt
# keeps no pkgcache.bin, so each call parses all lists, ~0.5 s); only empty
# lists force apt-get update.
resolve_kernel_pkg() {
    apt-cache show --no-all-versions linux-image-amd64 2>/dev/null |
        sed -n 's/^Depends:.*\(linux-image-[0-9][^ ,]*\)\( (= \([^)]*\))\)\?.*/\1 \3/p' | head -n1
}
read -r KPKG KVER < <(resolve_kernel_pkg) || true
if [[ -z ${KPKG:-} ]]; then
    vut_apt_update_once
    read -r KPKG KVER < <(resolve_kernel_pkg) || true
fi
[[ -n ${KPKG:-} ]] || vut_die "cannot resolve linux-image-amd64 to a kernel package (apt lists?)"
if [[ -z ${KVER:-} ]]; then
    KVER=$(vut_apt_candidate "$KPKG")
fi
[[ -n $KVER ]] || vut_die "no candidate version for $KPKG"
BUSYBOX_VER=$(dpkg-query -W -f='${Version}' busybox-static)
GCC_VER=$(gcc -dumpfullversion)

INPUTS="build-guest=$(sha256sum "$0" | cut -d' ' -f1)
lib-vm=$(sha256sum "$SCRIPT_DIR/lib-vm.sh" | cut -d' ' -f1)
vut-xdp=$(sha256sum "$SCRIPT_DIR/vut-xdp.c" | cut -d' ' -f1)
kernel=$KPKG=$KVER
busybox-static=$BUSYBOX_VER
gcc=$GCC_VER"

if [[ -f $OUT_DIR/vmlinuz && -f $OUT_DIR/initrd.img && -f $OUT_DIR/inputs ]] &&
    [[ $(cat "$OUT_DIR/inputs") == "$INPUTS" ]]; then
    vut_log "up to date ($KPKG $KVER)"
    echo "$OUT_DIR/vmlinuz"
    echo "$OUT_DIR/initrd.img"
    exit 0
fi

vut_require_root "mknod /dev/console in the initramfs"

KDIR=$KERNEL_CACHE/$(vut_sanitize "${KPKG}_$KVER")
if [[ ! -f $KDIR/extracted ]]; then
    # A partial download/extraction from an interrupted run is discarded.
    rm -rf "$KDIR"
    vut_log "downloading $KPKG=$KVER"
    deb=$(vut_apt_download "$KPKG" "$KVER" "$KDIR/deb")
    vut_log "extracting $(basename "$deb")"
    dpkg -x "$deb" "$KDIR/root"
    touch "$KDIR/extracted"
fi

mapfile -t vmlinuz_candidates < <(find "$KDIR/root/boot" -maxdepth 1 -name 'vmlinuz-*')
[[ ${#vmlinuz_candidates[@]} -eq 1 ]] ||
    vut_die "expected exactly one vmlinuz in $KDIR/root/boot, found ${#vmlinuz_candidates[@]}"
VMLINUZ=${vmlinuz_candidates[0]}
KREL=${VMLINUZ##*/vmlinuz-}
MODDIR=$KDIR/root/lib/modules/$KREL
[[ -d $MODDIR/kernel ]] || vut_die "no modules for $KREL in $MODDIR"

# --- staging -----------------------------------------------------------------
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/vut-guest.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE"/{bin,dev,etc,proc,sys,tmp,lib/modules}

# Modules: find the file for a module name (file names may use '-' where the
# module name has '_'), read depends= from its .modinfo section, load
# dependencies first. .ko.xz/.ko.zst are decompressed because busybox insmod
# takes a plain ELF file.
module_pattern() { echo "${1//[-_]/[-_]}"; }
module_file() {
    find "$MODDIR/kernel" -regextype posix-extended \
        -regex ".*/$(module_pattern "$1")\.ko(\.xz|\.zst|\.gz)?" -print -quit
}
module_cat() {
    case $1 in
    *.ko.xz) xz -dc "$1" ;;
    *.ko.zst) zstd -dcq "$1" ;;
    *.ko.gz) gzip -dc "$1" ;;
    *) cat "$1" ;;
    esac
}
module_builtin() {
    grep -Eq "/$(module_pattern "$1")\.ko$" "$MODDIR/modules.builtin" 2>/dev/null
}
declare -A MOD_DONE=()
MOD_ORDER=()
add_module() {
    local name=$1 file deps dep
    [[ -n ${MOD_DONE[$name]:-} ]] && return 0
    MOD_DONE[$name]=1
    if module_builtin "$name"; then
        return 0
    fi
    file=$(module_file "$name")
    [[ -n $file ]] || vut_die "module $name not found under $MODDIR"
    deps=$(module_cat "$file" | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n1)
    for dep in ${deps//,/ }; do
        add_module "$dep"
    done
    module_cat "$file" >"$STAGE/lib/modules/$name.ko"
    MOD_ORDER+=("$name")
}
for m in "${ROOT_MODULES[@]}"; do
    add_module "$m"
done
printf '%s\n' "${MOD_ORDER[@]}" >"$STAGE/etc/vut-modules"
vut_log "modules (load order): ${MOD_ORDER[*]}"

# busybox-static with relative applet links (busybox --install would link to
# the host's absolute path of the binary).
cp /bin/busybox "$STAGE/bin/busybox"
for applet in $(/bin/busybox --list); do
    [[ $applet == busybox ]] || ln -s busybox "$STAGE/bin/$applet"
done

# The kernel opens /dev/console for init before anything is mounted.
mknod -m 600 "$STAGE/dev/console" c 5 1

# --- vut-udpcount: count UDP datagrams, not bytes ---------------------------
# Each datagram the test sends starts with its ASCII decimal sequence number
# (0..expected-1), padded to a random length. recv() returns exactly one
# datagram, so "total" is a datagram count; "distinct" proves that every
# sequence number arrived once (duplicates or garbage are counted apart).
cat >"$STAGE/vut-udpcount.c" <<'EOF'
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* One write() per line so lines from concurrent writers on the console stay whole. */
static void say(const char *fmt, ...) {
    char line[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if (n > (int)sizeof line - 2) n = sizeof line - 2;
    line[n++] = '\n';
    (void)!write(1, line, n);
}

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000LL + ts.tv_nsec / 1000000;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        say("VUT-ERROR usage: vut-udpcount PORT EXPECTED TIMEOUT_SECONDS");
        return 2;
    }
    int port = atoi(argv[1]);
    long expected = atol(argv[2]);
    long timeout_s = atol(argv[3]);
    if (port <= 0 || port > 65535 || expected <= 0 || timeout_s <= 0) {
        say("VUT-ERROR vut-udpcount: bad arguments");
        return 2;
    }
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) {
        say("VUT-ERROR socket: %s", strerror(errno));
        return 2;
    }
    /* A large receive buffer so a slow (TCG) guest's socket queue is not
     * where datagrams get lost: the test is about the NIC path. FORCE
     * ignores rmem_max; we are root in the guest. */
    int rcvbuf = 8 << 20;
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf) < 0)
        (void)setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        say("VUT-ERROR bind port %d: %s", port, strerror(errno));
        return 2;
    }
    unsigned char *seen = calloc(expected, 1);
    if (!seen) {
        say("VUT-ERROR out of memory");
        return 2;
    }
    say("VUT-UDP-LISTENING %d", port);

    long total = 0, distinct = 0, invalid = 0, duplicate = 0;
    long long deadline = now_ms() + timeout_s * 1000;
    long long next_report = now_ms() + 1000;
    char buf[65536];
    while (total < expected) {
        long long now = now_ms();
        if (now >= deadline) break;
        if (now >= next_report) {
            say("VUT-UDP-COUNT %ld", total);
            next_report = now + 1000;
        }
        long long wake = next_report < deadline ? next_report : deadline;
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int r = poll(&p, 1, (int)(wake - now));
        if (r < 0 && errno != EINTR) {
            say("VUT-ERROR poll: %s", strerror(errno));
            return 2;
        }
        if (r <= 0) continue;
        while (total < expected) {
            ssize_t len = recv(fd, buf, sizeof buf - 1, MSG_DONTWAIT);
            if (len < 0) {
                if (errno == EAGAIN || errno == EINTR) break;
                say("VUT-ERROR recv: %s", strerror(errno));
                return 2;
            }
            total++;
            buf[len] = 0;
            char *end;
            long seq = strtol(buf, &end, 10);
            if (end == buf || seq < 0 || seq >= expected) {
                invalid++;
            } else if (seen[seq]) {
                duplicate++;
            } else {
                seen[seq] = 1;
                distinct++;
            }
        }
    }
    say("VUT-UDP-COUNT %ld", total);
    say("VUT-UDP-RESULT total=%ld distinct=%ld invalid=%ld duplicate=%ld", total, distinct, invalid,
        duplicate);
    int ok = total == expected && distinct == expected;
    say("VUT-UDP-DONE %s", ok ? "ok" : (total < expected ? "timeout" : "bad"));
    return ok ? 0 : 1;
}
EOF
gcc -O2 -static -Wall -Wextra -Werror -s -o "$STAGE/bin/vut-udpcount" "$STAGE/vut-udpcount.c" ||
    vut_die "compiling vut-udpcount failed"
rm "$STAGE/vut-udpcount.c"

# --- vut-xdp: the XDP-drop counter of xdp-bench.sh ------------------------------
# Its BPF program is raw instructions in the C source, so gcc and the kernel
# headers of libc6-dev (linux-libc-dev) are all it needs: no clang, no libbpf.
gcc -O2 -static -Wall -Wextra -Werror -s -o "$STAGE/bin/vut-xdp" "$SCRIPT_DIR/vut-xdp.c" ||
    vut_die "compiling vut-xdp failed"

# --- /init --------------------------------------------------------------------
cat >"$STAGE/init" <<'EOF'
#!/bin/sh
# PID 1 of the vhost-user-tap test guest (generated by qemu-scripts/build-guest.sh).
# Prints VUT-* markers on the console; see build-guest.sh for the protocol.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
exec </dev/console >/dev/console 2>&1

shell=0
finish() {
    echo VUT-DONE
    if [ "$shell" = 1 ]; then
        exec setsid cttyhack sh
    fi
    # -f: no init to signal; reboot(RB_POWER_OFF) makes QEMU exit.
    poweroff -f
    # Only reached if ACPI power-off failed; PID 1 must not exit or return.
    while :; do sleep 3600; done
}
fail() {
    echo "VUT-ERROR $*"
    finish
}

ip_cidr=10.77.0.2/24
peer=10.77.0.1
peer_mac=
ping_count=3
udp_port=5000
udp_count=1000
udp_timeout=90
mode=e2e
xdp_secs=60
xdp_interval_ms=1000
tcp_port=5001
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    vut.ip=*) ip_cidr=${arg#*=} ;;
    vut.peer=*) peer=${arg#*=} ;;
    vut.peer_mac=*) peer_mac=${arg#*=} ;;
    vut.ping_count=*) ping_count=${arg#*=} ;;
    vut.udp_port=*) udp_port=${arg#*=} ;;
    vut.udp_count=*) udp_count=${arg#*=} ;;
    vut.udp_timeout=*) udp_timeout=${arg#*=} ;;
    vut.shell=*) shell=${arg#*=} ;;
    vut.mode=*) mode=${arg#*=} ;;
    vut.xdp_secs=*) xdp_secs=${arg#*=} ;;
    vut.xdp_interval_ms=*) xdp_interval_ms=${arg#*=} ;;
    vut.tcp_port=*) tcp_port=${arg#*=} ;;
    esac
done
echo "VUT-BOOT kernel=$(uname -r)"
case "$mode" in
e2e | xdp | shell | migrate) ;;
probe)
    # Userspace runs: the kernel booted. Nothing else to prove.
    echo VUT-PROBE-OK
    finish
    ;;
*) fail "unknown vut.mode=$mode (e2e, xdp, shell, probe, migrate)" ;;
esac

for m in $(cat /etc/vut-modules); do
    insmod "/lib/modules/$m.ko" || fail "insmod $m failed"
done

# virtio_pci probes asynchronously; eth0 shows up shortly after insmod.
i=0
while [ ! -e /sys/class/net/eth0 ]; do
    i=$((i + 1))
    [ $i -gt 300 ] && fail "no eth0 after 30 s (is the NIC a virtio-net-pci?)"
    sleep 0.1
done
ip link set lo up || fail "ip link set lo up"
ip link set eth0 up || fail "ip link set eth0 up"

nic_stats() {
    echo "VUT-NIC rx_packets=$(cat /sys/class/net/eth0/statistics/rx_packets)" \
        "rx_dropped=$(cat /sys/class/net/eth0/statistics/rx_dropped)" \
        "tx_packets=$(cat /sys/class/net/eth0/statistics/tx_packets)"
}
if [ "$mode" = xdp ]; then
    # No address: the guest must not answer (ARP, ICMP) or originate IPv4
    # traffic; every frame the host sends is counted and dropped by XDP.
    echo "VUT-NET mac=$(cat /sys/class/net/eth0/address) ip=none"
    vut-xdp eth0 "$xdp_secs" "$xdp_interval_ms"
    echo "VUT-XDP-EXIT $?"
    nic_stats
    finish
fi

ip addr add "$ip_cidr" dev eth0 || fail "ip addr add $ip_cidr dev eth0"
# busybox ip has no `neigh replace ... lladdr`; arp -s is the way.
if [ -n "$peer_mac" ]; then
    arp -i eth0 -s "$peer" "$peer_mac" || fail "arp -s $peer $peer_mac"
fi
echo "VUT-NET mac=$(cat /sys/class/net/eth0/address) ip=$ip_cidr"
if [ "$mode" = shell ]; then
    echo VUT-READY
    shell=1
    finish
fi
if [ "$mode" = migrate ]; then
    echo VUT-READY
    # busybox sh has no process substitution: tee feeds a fifo that wc counts,
    # so the stream is hashed and counted as it passes and never stored.
    n=0
    while :; do
        n=$((n + 1))
        mkfifo "/tmp/stream.$n"
        wc -c <"/tmp/stream.$n" >"/tmp/bytes.$n" &
        counter=$!
        nc -l -p "$tcp_port" | tee "/tmp/stream.$n" | sha256sum >"/tmp/sum.$n" &
        sink=$!
        # The marker promises a listening socket, and nc says nothing when it
        # has one: the kernel's socket table does (state 0A, LISTEN; busybox
        # nc listens on IPv6's any address, which takes IPv4 too).
        port_hex=$(printf %04X "$tcp_port")
        while ! cat /proc/net/tcp /proc/net/tcp6 2>/dev/null |
            grep -q ":$port_hex [0-9A-F]*:0000 0A"; do
            sleep 0.05
        done
        echo "VUT-STREAM-LISTENING n=$n port=$tcp_port"
        wait "$sink"
        wait "$counter"
        sum=$(cat "/tmp/sum.$n")
        echo "VUT-STREAM n=$n bytes=$(cat "/tmp/bytes.$n") sha256=${sum%% *}"
        rm -f "/tmp/stream.$n" "/tmp/bytes.$n" "/tmp/sum.$n"
    done
fi

counter=
if [ "$udp_count" -gt 0 ]; then
    vut-udpcount "$udp_port" "$udp_count" "$udp_timeout" &
    counter=$!
fi
echo VUT-READY

ping_out=$(ping -q -c "$ping_count" -w 30 "$peer" 2>&1)
ping_stats=$(echo "$ping_out" | grep 'packets transmitted')
echo "VUT-PING-STATS $ping_stats"
case "$ping_stats" in
"$ping_count packets transmitted, $ping_count packets received"*) echo VUT-PING-OK ;;
*) echo VUT-PING-FAIL ;;
esac

if [ -n "$counter" ]; then
    wait "$counter"
    echo "VUT-UDP-EXIT $?"
fi
# Kernel view, for diagnosing losses: Udp InDatagrams/RcvbufErrors and the NIC's counters.
echo "VUT-SNMP $(grep '^Udp:' /proc/net/snmp | tail -n1)"
nic_stats
finish
EOF
chmod 755 "$STAGE/init"

# --- pack ---------------------------------------------------------------------
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR/inputs"
(cd "$STAGE" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --owner=0:0 --quiet) |
    gzip -6 >"$OUT_DIR/initrd.img.tmp"
cp "$VMLINUZ" "$OUT_DIR/vmlinuz.tmp"
mv "$OUT_DIR/initrd.img.tmp" "$OUT_DIR/initrd.img"
mv "$OUT_DIR/vmlinuz.tmp" "$OUT_DIR/vmlinuz"
# Written last: its presence means the two outputs above are complete.
echo "$INPUTS" >"$OUT_DIR/inputs"
vut_log "built guest for $KREL ($(du -h "$OUT_DIR/initrd.img" | cut -f1) initramfs)"
echo "$OUT_DIR/vmlinuz"
echo "$OUT_DIR/initrd.img"
