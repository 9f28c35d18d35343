#!/bin/sh
# shellcheck shell=sh
# PID 1 of the kernel lab VM (copied into the initramfs as /init by
# qemu-scripts/kernel-lab.sh; busybox sh).
#
# The VM is the *host* of the project's integration tests: it runs the test
# binary of tests/daemon.rs (built on the real host, /usr/bin/vut-daemon-tests)
# on the kernel under test. Each test makes its own network namespace, tap,
# daemon (/usr/bin/vhost-user-tap, found through VUT_DAEMON_BIN) and
# in-process synthetic guest, exactly as on the real host.
#
# Parameters come on the kernel command line:
#   vut.tests=NAME,NAME,...   tests to run, one libtest invocation each
#   vut.test_timeout=S        seconds a test may take before it is killed
#   vut.env=K=V,K=V           environment for the tests (quick mode sizes,
#                             VUT_DAEMON_BIN for kernel-lab.sh --daemon-args)
# Results go to the serial console as one-line markers kernel-lab.sh parses:
#   VUT-KLAB-BOOT kernel=RELEASE ...    the kernel that really booted
#   VUT-KLAB-MODULE NAME ok|failed      each insmod
#   VUT-KLAB-DAEMON LINE                the daemon's startup log on this kernel
#   VUT-KLAB-TESTS-START count=N        the tests begin (no VM retry after this)
#   VUT-KLAB-TEST-START NAME
#   VUT-KLAB-RESULT test NAME ... ok|FAILED|timeout   (libtest's line)
#   VUT-KLAB-OUT NAME| LINE             a failed or killed test's whole output
#   VUT-KLAB-TEST-END NAME rc=RC ms=MS
#   VUT-KLAB-KMSG LINE                  kernel warnings and errors logged during the tests
#   VUT-KLAB-ERROR MESSAGE, VUT-KLAB-DONE
# A test that does not exist in the binary prints no RESULT line ("running 0
# tests"): the host reports it as not run.
#
# Debian's busybox-static runs its own applets before anything in PATH
# (standalone shell), so this script calls iproute2's ip by path. The tests
# themselves are not busybox: they find iproute2's ip, tc and ss first in PATH.
export PATH=/usr/sbin:/usr/bin:/bin
IP=/usr/sbin/ip
TESTS_BIN=/usr/bin/vut-daemon-tests
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
exec </dev/console >/dev/console 2>&1

finish() {
    echo VUT-KLAB-DONE
    # -f: there is no init to ask; reboot(RB_POWER_OFF) makes QEMU exit.
    poweroff -f
    # PID 1 must never return.
    while :; do sleep 3600; done
}

tests=
test_timeout=300
env=
read -r cmdline </proc/cmdline
for arg in $cmdline; do
    case "$arg" in
    vut.tests=*) tests=${arg#*=} ;;
    vut.test_timeout=*) test_timeout=${arg#*=} ;;
    vut.env=*) env=${arg#*=} ;;
    esac
done

now_ms() { awk '{ printf "%d\n", $1 * 1000 }' /proc/uptime; }

# Wait up to $1 tenths of a second for the command "$2..." to succeed.
wait_for() {
    wf_tries=$1
    shift
    while ! "$@" 2>/dev/null; do
        wf_tries=$((wf_tries - 1))
        [ "$wf_tries" -le 0 ] && return 1
        sleep 0.1
    done
}

echo "VUT-KLAB-BOOT kernel=$(uname -r) version=$(tr ' ' '_' </proc/version | cut -c1-120)" \
    "cpus=$(nproc) mem_kb=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)"
while read -r m; do
    [ -n "$m" ] || continue
    if out=$(insmod "/lib/modules/$m.ko" 2>&1); then
        echo "VUT-KLAB-MODULE $m ok"
    else
        echo "VUT-KLAB-MODULE $m failed: $out"
    fi
done </etc/vut-modules
"$IP" link set lo up
[ -c /dev/net/tun ] || echo "VUT-KLAB-ERROR no /dev/net/tun (tun not loaded?)"
if [ -r /proc/sys/kernel/io_uring_disabled ]; then
    echo "VUT-KLAB-SYSCTL kernel.io_uring_disabled=$(cat /proc/sys/kernel/io_uring_disabled)"
fi

export VUT_DAEMON_BIN=/usr/bin/vhost-user-tap
# Failed tests show the daemon's log lines with their own output.
export VUT_ECHO_DAEMON=1
export RUST_BACKTRACE=0
for kv in $(echo "$env" | tr , ' '); do
    # shellcheck disable=SC2163 # exporting the assignment "K=V" itself
    export "$kv"
done

# The daemon's startup report on this kernel (tun features, backpressure, TX
# write path, seccomp), for the record: start it in a namespace of its own,
# let it report, stop it.
probe_daemon() {
    "$IP" netns add vutprobe || return 0
    RUST_LOG=info "$IP" netns exec vutprobe "$VUT_DAEMON_BIN" \
        --socket-path /run/vutprobe.sock --tap vutp0 2>/tmp/probe.log &
    pd_pid=$!
    wait_for 200 grep -q "listening on" /tmp/probe.log ||
        echo "VUT-KLAB-ERROR the daemon did not report 'listening on' within 20 s"
    kill -TERM "$pd_pid" 2>/dev/null
    wait "$pd_pid"
    pd_rc=$?
    sed 's/^/VUT-KLAB-DAEMON /' /tmp/probe.log
    echo "VUT-KLAB-DAEMON exit status $pd_rc"
    "$IP" netns del vutprobe
}
probe_daemon

# Whatever a killed test left behind: its daemons (matched by executable, we
# are the only user of this VM) and namespaces.
cleanup() {
    for p in /proc/[0-9]*; do
        [ "$(readlink "$p/exe" 2>/dev/null)" = /usr/bin/vhost-user-tap ] && kill -KILL "${p#/proc/}" 2>/dev/null
    done
    for ns in $("$IP" netns list 2>/dev/null | awk '{ print $1 }'); do
        case "$ns" in vut-*) "$IP" netns del "$ns" ;; esac
    done
}

count=0
for t in $(echo "$tests" | tr , ' '); do count=$((count + 1)); done
echo "VUT-KLAB-TESTS-START count=$count test_timeout=$test_timeout env=$env"
dmesg -c >/dev/null
for t in $(echo "$tests" | tr , ' '); do
    echo "VUT-KLAB-TEST-START $t"
    t0=$(now_ms)
    timeout "$test_timeout" "$TESTS_BIN" --exact "$t" --test-threads=1 >/tmp/test.out 2>&1
    rc=$?
    t1=$(now_ms)
    # The summary line decides (output of a child process may split
    # libtest's "test NAME ... ok" line); "running 0 tests" has neither.
    if grep -q '^test result: ok\. 1 passed' /tmp/test.out; then
        echo "VUT-KLAB-RESULT test $t ... ok"
    elif grep -q '^test result: FAILED\. 0 passed; 1 failed' /tmp/test.out; then
        echo "VUT-KLAB-RESULT test $t ... FAILED"
    elif [ "$rc" = 143 ]; then
        # busybox timeout SIGTERMs the test binary: 128 + 15.
        echo "VUT-KLAB-RESULT test $t ... timeout (killed after ${test_timeout}s)"
    elif ! grep -q '^running 0 tests' /tmp/test.out; then
        echo "VUT-KLAB-RESULT test $t ... FAILED (no libtest summary, exit status $rc)"
    fi
    if [ "$rc" != 0 ] || ! grep -q '^test result: ok\. 1 passed' /tmp/test.out; then
        sed "s/^/VUT-KLAB-OUT $t| /" /tmp/test.out
    fi
    echo "VUT-KLAB-TEST-END $t rc=$rc ms=$((t1 - t0))"
    cleanup
done
# Kernel warnings and errors (levels 0-4) logged while the tests ran.
dmesg -r | grep '^<[0-4]>' | sed 's/^/VUT-KLAB-KMSG /'
finish
