#!/usr/bin/env bash
# Several issues' GPU work in one session on a 2-GPU machine (nvidia-h200-x2), one part after the other so
# that nothing timed shares a GPU. The parts, run in the order PARTS names them (default "dp t5 allreduce",
# the 2026-12-01 run):
#   dp          issue 17: the data-parallel sweep's wall on 1 GPU and on 2 (benchmarks/gpu_multigpu_run.sh
#               DIR/multigpu sweeps: the tiny pair, warm compile caches; DIR/multigpu/sweep_walls.json)
#   t5          issue 16: the T5 pair, one model a GPU (benchmarks/gpu_t5_pair_run.sh DIR/t5_pair; T5_MINUTES
#               each, default 5), then every method at T = 0 and 1 on 500 test examples, one worker a GPU,
#               and the report (logs: DIR/t5_train.log, DIR/t5_sweep.log)
#   allreduce   issue 17: one all-reduce's cost inside a CUDA graph, NCCL vs one-shot (DIR/multigpu)
#   deep        issue 12: the deep pair trained and swept on both GPUs (benchmarks/gpu_deep_pair_run.sh DIR/deep)
# DIR/parts.log has each part's start, end and exit status; each part writes its own logs in its folder.
#   bash benchmarks/gpu_session.sh start x2 240 bash benchmarks/gpu_x2_run.sh runs/x2
#   bash benchmarks/gpu_session.sh start x2 240 env PARTS="dp allreduce deep" bash benchmarks/gpu_x2_run.sh runs/x2
#   bash benchmarks/gpu_session.sh wait x2 590        (again, until it has ended or the device time is spent)
set -uo pipefail
dir="${1:-runs/x2}"
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../scripts/parts.sh"   # parts_begin, note, part
parts_begin "$dir"

for p in ${PARTS:-dp t5 allreduce}; do
  case "$p" in
    dp) part multigpu_sweeps bash "$here/gpu_multigpu_run.sh" "$dir/multigpu" sweeps ;;
    t5) (export GPUS=2 SKIP_TESTS=1
         MINUTES="${T5_MINUTES:-5}" TRAIN_ONLY=1 part t5_train bash "$here/gpu_t5_pair_run.sh" "$dir/t5_pair" &&
         part t5_sweep bash "$here/gpu_t5_pair_run.sh" "$dir/t5_pair") ;;
    allreduce) part multigpu_allreduce bash "$here/gpu_multigpu_run.sh" "$dir/multigpu" allreduce ;;
    deep) (export GPUS=2; part deep bash "$here/gpu_deep_pair_run.sh" "$dir/deep") ;;
    *) note "unknown part $p (parts: dp t5 allreduce deep)" ;;
  esac
done
note "all parts ended"
