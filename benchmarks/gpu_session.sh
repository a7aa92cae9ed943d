#!/usr/bin/env bash
# A GPU job longer than one device call (10 minutes), run as a few calls in one session:
#   bash benchmarks/gpu_session.sh start NAME SECONDS CMD...   start CMD detached, wait up to SECONDS, pack
#   bash benchmarks/gpu_session.sh wait NAME SECONDS            wait up to SECONDS more, pack
# CMD writes into runs/NAME (e.g. `bash benchmarks/gpu_deep_pair_run.sh runs/deep` with NAME=deep); the
# job's own log and exit status go to runs/NAME_job (scripts/detached.sh). Each call ends by packing
# runs/NAME and runs/NAME_job, without weights, tensors, compressed data or the random warm-up pair, into
# $OUT/NAME.tgz (the device tool brings $OUT back), and a wait also packs once a minute, so that a call cut
# short by the end of the session's device time still brings back the job's files of a minute before.
# Issue the calls back to back, in one batch (start, then every wait): an idle machine is given back after
# 30 s, and the job with it. A `wait` on a machine that was given back since (a fresh one, without the job)
# ends at once with status 4 and packs nothing: the job and its files went with the old machine.
# Example (issue 12): start deep 150 bash benchmarks/gpu_deep_pair_run.sh runs/deep (its GPU smoke test is
# in the tarball by then), then wait deep 590 until it has ended.
set -uo pipefail
verb="${1:?start|wait}"; name="${2:?NAME}"; secs="${3:?SECONDS}"; shift 3
job="runs/${name}_job"
case "$verb" in
  start) scripts/detached.sh start "$job" "$@" || exit $? ;;   # 5: a job already runs under NAME
  wait) ;;
  *) echo "usage: $0 start|wait NAME SECONDS [CMD...]" >&2; exit 2 ;;
esac
# pack: runs/NAME and the job's folder, less what is large (weights, tensors, compressed data), into
# $OUT/NAME.tgz, written beside it and renamed, so that a cut in the middle leaves the last whole one
pack() {
  [ -n "${OUT:-}" ] || return 0
  tar czf "$OUT/$name.tgz.part" --exclude='*.safetensors' --exclude='*.jsonl.gz' --exclude='*.bin' --exclude='*.pt' \
    --exclude='*.gguf' --exclude="runs/$name/random" "runs/$name" "$job" 2>/dev/null
  mv -f "$OUT/$name.tgz.part" "$OUT/$name.tgz"
}
# Wait in rounds of PACK_EVERY seconds (60), packing after each: a call that the session's device time cuts
# short (its last one) still brings back what the job had done up to a minute before.
end=$((SECONDS + secs)); every="${PACK_EVERY:-60}"
while :; do
  left=$((end - SECONDS)); [ $left -lt 1 ] && left=1
  scripts/detached.sh wait "$job" $((left < every ? left : every)) > "/tmp/gpu_session_$name.wait" 2>&1
  status=$?
  [ $status -eq 4 ] && { cat "/tmp/gpu_session_$name.wait" >&2; exit 4; }   # no job on this machine (it says why)
  [ $status -eq 3 ] && [ $SECONDS -lt $end ] || break
  pack
done
cat "/tmp/gpu_session_$name.wait"
for f in runs/"$name"/{stages,run,parts}.log runs/"$name"/*/{stages,run}.log; do   # the progress logs, nested ones too
  [ -f "$f" ] && { echo "-- $f"; tail -n 20 "$f"; }
done
pack
[ -n "${OUT:-}" ] && ls -la "$OUT"
nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
exit $status
