#!/usr/bin/env bash
# A GPU job longer than one device call (10 minutes), run as a few calls in one session:
#   bash benchmarks/gpu_session.sh start NAME SECONDS CMD...   start CMD detached, wait up to SECONDS, pack
#   bash benchmarks/gpu_session.sh wait NAME SECONDS            wait up to SECONDS more, pack
# CMD writes into runs/NAME (e.g. `bash benchmarks/gpu_deep_pair_run.sh runs/deep` with NAME=deep); the
# job's own log and exit status go to runs/NAME_job (scripts/detached.sh). Each call ends by packing
# runs/NAME and runs/NAME_job, without weights, tensors, compressed data or the random warm-up pair, into
# $OUT/NAME.tgz (the device tool brings $OUT back), so whatever the session's end cuts, the last
# call's files are here. Issue the next call at once: an idle machine is given back after 30 s. A `wait`
# on a machine that was given back since (a fresh one, without the job) ends at once with status 4 and
# packs nothing: the job and its files went with the old machine, so start it again.
# Example (issue 12): start deep 150 bash benchmarks/gpu_deep_pair_run.sh runs/deep (its GPU smoke test is
# in the tarball by then), then wait deep 590 until it has ended.
set -uo pipefail
verb="${1:?start|wait}"; name="${2:?NAME}"; secs="${3:?SECONDS}"; shift 3
job="runs/${name}_job"
case "$verb" in
  start) scripts/detached.sh start "$job" "$@" ;;
  wait) ;;
  *) echo "usage: $0 start|wait NAME SECONDS [CMD...]" >&2; exit 2 ;;
esac
scripts/detached.sh wait "$job" "$secs"
status=$?
[ $status -eq 4 ] && exit 4   # no job on this machine (scripts/detached.sh said why)
for f in runs/"$name"/{stages,run,parts}.log runs/"$name"/*/{stages,run}.log; do   # the progress logs, nested ones too
  [ -f "$f" ] && { echo "-- $f"; tail -n 20 "$f"; }
done
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/$name.tgz" --exclude='*.safetensors' --exclude='*.jsonl.gz' --exclude='*.bin' --exclude='*.pt' --exclude='*.gguf' \
    --exclude="runs/$name/random" "runs/$name" "$job" 2>/dev/null
  ls -la "$OUT"
fi
nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
exit $status
