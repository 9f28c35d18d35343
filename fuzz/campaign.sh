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
# With -jobs, the fuzzing process is a child logging to fuzz-0.log.
[[ -f fuzz-0.log ]] && cat fuzz-0.log >>"$out" && rm -f fuzz-0.log
grep -E '^(stat::|#[0-9]+ +(DONE|pulse|NEW|REDUCE).* cov:|==[0-9]+==|SUMMARY|artifact_prefix|Test unit written|.*panicked at)' "$out" \
    | grep -Ev '(NEW|REDUCE|pulse)' >>"$log"
grep -E '^#[0-9]+ ' "$out" | tail -n 1 | sed 's/^/   last: /' >>"$log"
mv "$out" artifacts/"$target"/last-run.log
