#!/usr/bin/env bash
# Migrate a running QEMU VM through its QMP socket, wait until the migration
# has completed, and report how long it took.
#
# Usage: qemu-scripts/migrate-vm.sh --qmp PATH --to URI [options]
#
#   --qmp PATH             the source QEMU's QMP socket (run-vm.sh --qmp PATH)
#   --to URI               where the migration stream goes: unix:PATH or
#                          tcp:HOST:PORT (a destination started with
#                          run-vm.sh --incoming URI), or "exec:cat > FILE" to
#                          save the VM to a file
#   --bandwidth BYTES      cap the migration at BYTES per second (QEMU's
#                          max-bandwidth; its default is 128 MiB/s). Lower
#                          means more passes over RAM while the guest runs.
#   --downtime-limit MS    the longest pause QEMU may plan for the final pass
#                          (its default is 300 ms)
#   --timeout SECS         give up (and cancel the migration) after SECS
#                          seconds (default 600)
#   --help                 this text
#
# Output on stdout, one key=value per line, once the migration completed:
#   status=completed
#   elapsed_ms=...         measured here, from the migrate command to the event
#   total_time_ms=...      QEMU's total-time
#   downtime_ms=...        QEMU's downtime: how long the guest was paused
#   setup_time_ms=...
#   ram_transferred_bytes=... ram_passes=... (dirty-sync-count)
# On failure: status=failed (or cancelled, timeout) and error=..., exit 1.
# The source stays paused after a completed migration (quit it:
# {"execute":"quit"} on the same socket); the destination runs.
#
# Save and restore (the same as `virsh save` / `virsh restore`):
#   migrate-vm.sh --qmp src.qmp --to "exec:cat > vm.state"
#   (quit the source), then start the same VM with
#   run-vm.sh ... --incoming "exec:cat vm.state"
# Both ends need the daemon serving the VM's socket: the destination QEMU
# connects to it before the stream arrives.
#
# Why each piece:
# - QMP, not the human monitor: its replies and events are JSON, so the
#   script waits on QEMU's MIGRATION event (capability "events") instead of
#   polling and parsing text.
# - socat carries the QMP socket (bash has no unix sockets), jq reads JSON;
#   both are installed from Debian if missing.
# - On a timeout the script cancels the migration, so the source keeps
#   running instead of being left half-migrated.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VUT_LOG_PREFIX=migrate-vm
# shellcheck source=lib-vm.sh
source "$SCRIPT_DIR/lib-vm.sh"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }
bad_usage() {
    echo "migrate-vm: $*" >&2
    echo "migrate-vm: see --help" >&2
    exit 2
}

qmp='' to='' bandwidth='' downtime='' timeout=600
need_arg() { [[ $# -ge 2 ]] || bad_usage "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case $1 in
    --qmp) need_arg "$@"; qmp=$2; shift 2 ;;
    --to) need_arg "$@"; to=$2; shift 2 ;;
    --bandwidth) need_arg "$@"; bandwidth=$2; shift 2 ;;
    --downtime-limit) need_arg "$@"; downtime=$2; shift 2 ;;
    --timeout) need_arg "$@"; timeout=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) bad_usage "unknown argument $1" ;;
    esac
done
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
[[ -n $qmp ]] || bad_usage "--qmp PATH is required"
[[ -n $to ]] || bad_usage "--to URI is required"
[[ -z $bandwidth ]] || is_uint "$bandwidth" || bad_usage "--bandwidth $bandwidth: bytes per second"
[[ -z $downtime ]] || is_uint "$downtime" || bad_usage "--downtime-limit $downtime: milliseconds"
if ! is_uint "$timeout" || ((timeout < 1)); then bad_usage "--timeout $timeout: seconds, 1 or more"; fi
[[ -S $qmp ]] || vut_die "$qmp is not a socket (start QEMU with run-vm.sh --qmp $qmp)"

if ! command -v socat >/dev/null || ! command -v jq >/dev/null; then
    vut_apt_install socat jq
fi

coproc QMP { exec socat - "UNIX-CONNECT:$qmp"; }
# Kept: the coproc's variables go when it exits, and the end must still be reapable.
# shellcheck disable=SC2153 # set by coproc
qmp_pid=$QMP_PID
qmp_in=${QMP[1]} qmp_out=${QMP[0]}
trap 'kill "$qmp_pid" 2>/dev/null || true' EXIT

deadline=$((SECONDS + timeout))
# The next JSON line from QEMU into $line; fails at the deadline or when QEMU
# closes the socket.
qmp_read() {
    local left=$((deadline - SECONDS))
    ((left > 0)) || return 1
    IFS= read -r -t "$left" -u "$qmp_out" line
}
# Events that arrived while a command's reply was awaited, one per line.
events=''
# Run a command (JSON); its "return" value into $reply. A QMP error ends the
# script with QEMU's description.
qmp_cmd() {
    printf '%s\n' "$1" >&"$qmp_in"
    while qmp_read || vut_die "no reply from QEMU to $1 (timed out or QMP closed)"; do
        if jq -e 'has("return")' >/dev/null <<<"$line"; then
            reply=$(jq -c '.return' <<<"$line")
            return 0
        fi
        if jq -e 'has("error")' >/dev/null <<<"$line"; then
            vut_die "QEMU refused $1: $(jq -r '.error.desc' <<<"$line")"
        fi
        events+=$line$'\n'
    done
}

qmp_read || vut_die "no QMP greeting on $qmp"
jq -e 'has("QMP")' >/dev/null <<<"$line" || vut_die "not a QMP greeting: $line"
qmp_cmd '{"execute":"qmp_capabilities"}'
qmp_cmd '{"execute":"query-status"}'
state=$(jq -r '.status' <<<"$reply")
[[ $state == running || $state == paused ]] ||
    vut_die "the VM is $state: nothing to migrate (already migrated, or still starting?)"
qmp_cmd '{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"events","state":true}]}}'
params=$(jq -cn --arg bw "$bandwidth" --arg dt "$downtime" \
    '{} + (if $bw != "" then {"max-bandwidth": ($bw|tonumber)} else {} end)
        + (if $dt != "" then {"downtime-limit": ($dt|tonumber)} else {} end)')
if [[ $params != '{}' ]]; then
    qmp_cmd "{\"execute\":\"migrate-set-parameters\",\"arguments\":$params}"
fi

vut_log "migrating ($state) to $to${bandwidth:+, at most $bandwidth bytes/s}${downtime:+, downtime limit $downtime ms}"
start_ms=$(date +%s%3N)
qmp_cmd "$(jq -cn --arg uri "$to" '{"execute":"migrate","arguments":{"uri":$uri}}')"

# The MIGRATION event with a final status, after the one that says this
# migration started ("setup"): a VM that was itself a migration's destination
# reports that migration's end too. The first events may already be in $events.
final='' started=0
migration_status() { jq -r 'select(.event == "MIGRATION") | .data.status'; }
status_seen() {
    case $1 in
    setup) started=1 ;;
    completed | failed | cancelled) ((started == 0)) || final=$1 ;;
    esac
}
while IFS= read -r st; do
    [[ -n $final ]] || status_seen "$st"
done < <(migration_status <<<"$events")
while [[ -z $final ]]; do
    if ! qmp_read; then
        vut_log "no end of the migration within ${timeout}s: cancelling it (the source keeps running)"
        printf '%s\n' '{"execute":"migrate_cancel"}' >&"$qmp_in" || true
        echo "status=timeout"
        echo "error=not completed within ${timeout}s"
        exit 1
    fi
    status_seen "$(migration_status <<<"$line")"
done
end_ms=$(date +%s%3N)

qmp_cmd '{"execute":"query-migrate"}'
# QEMU 7.2 sends the completed event before it fills in the times (total-time
# reads 0 right after it); nothing signals when they are there, so ask again
# for up to 5 s.
tries=0
while [[ $final == completed && $(jq -r '."total-time" // 0' <<<"$reply") == 0 ]] && ((tries < 250)); do
    sleep 0.02
    qmp_cmd '{"execute":"query-migrate"}'
    tries=$((tries + 1))
done
if [[ $final != completed ]]; then
    echo "status=$final"
    echo "error=$(jq -r '."error-desc" // "QEMU gave no reason"' <<<"$reply")"
    exit 1
fi
echo "status=completed"
echo "elapsed_ms=$((end_ms - start_ms))"
jq -r '"total_time_ms=\(."total-time")",
       "downtime_ms=\(.downtime)",
       "setup_time_ms=\(."setup-time")",
       "ram_transferred_bytes=\(.ram.transferred)",
       "ram_passes=\(.ram."dirty-sync-count")"' <<<"$reply"
