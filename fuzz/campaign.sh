#!/usr/bin/env bash
# One fuzzing session of one target, logged to fuzz/campaign.log: start and stop times, the
# command, libFuzzer's final stats. One process, one job, niced (the machine is shared).
#   fuzz/campaign.sh TARGET SECONDS [extra libFuzzer flags]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
target=$1 secs=$2
shift 2
log=campaign.log
mkdir -p corpus-work/"$target" artifacts/"$target"
start=$(date -u +%FT%TZ)
out=$(mktemp)
echo "== $target: start $start, $secs s, flags: $*" >>"$log"
nice -n 10 ./target/x86_64-unknown-linux-gnu/release/"$target" \
    corpus-work/"$target" corpus/"$target" \
    -jobs=1 -workers=1 -max_total_time="$secs" -print_final_stats=1 \
    -artifact_prefix=artifacts/"$target"/ "$@" >"$out" 2>&1
rc=$?
echo "== $target: stop $(date -u +%FT%TZ), exit $rc" >>"$log"
grep -E '^(stat::|#[0-9]+ +DONE|==[0-9]+==|SUMMARY|artifact_prefix|Test unit written)' "$out" >>"$log"
tail -n 3 "$out" | sed 's/^/   last: /' >>"$log"
mv "$out" artifacts/"$target"/last-run.log
