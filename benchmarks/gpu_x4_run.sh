#!/usr/bin/env bash
# Issues 12, 16 and 17 at once on one 4-GPU machine (nvidia-h200-x4), each on GPUs of its own, so that
# one session's device time serves all three:
#   GPUs 0, 1   issue 12: the deep pair, trained and swept (benchmarks/gpu_deep_pair_run.sh DIR/deep),
#               until the session's end cuts its sweep
#   GPUs 2, 3   first, at once (neither times anything): issue 17's GPU tests (the exact law through the
#               sharded verifier among them; benchmarks/gpu_multigpu_run.sh DIR/multigpu tests) and issue
#               16's T5 pair training (benchmarks/gpu_t5_pair_run.sh DIR/t5_pair with TRAIN_ONLY=1);
#               then, on quiet GPUs, the steps that time something, one after the other: issue 17's
#               data-parallel sweep on 1 and 2 GPUs (step sweeps), issue 16's sweep of every method and
#               its report, and issue 17's all-reduce microbenchmark (step allreduce)
# Every part writes its own logs in its folder; DIR/parts.log has each part's start, end and exit status.
#   bash benchmarks/gpu_session.sh start x4 150 bash benchmarks/gpu_x4_run.sh runs/x4
#   bash benchmarks/gpu_session.sh wait x4 590        (again, until the session's device time is spent)
# Knobs (environment): T5_MINUTES (each T5 model's training budget, default 6), TESTS_TIMEOUT (the
# issue-17 tests' limit in seconds, default 480: they must not run into the timed steps), and each
# script's own (e.g. VERIFIER_MINUTES for the deep pair).
set -uo pipefail
dir="${1:-runs/x4}"
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../scripts/parts.sh"   # parts_begin, note, part
parts_begin "$dir"

(export CUDA_VISIBLE_DEVICES=0,1 GPUS=2
 part deep bash "$here/gpu_deep_pair_run.sh" "$dir/deep") &
(
  export CUDA_VISIBLE_DEVICES=2,3
  (export TESTS_TIMEOUT="${TESTS_TIMEOUT:-480}"; part multigpu_tests bash "$here/gpu_multigpu_run.sh" "$dir/multigpu" tests) &
  tests_pid=$!
  export GPUS=2 SKIP_TESTS=1
  MINUTES="${T5_MINUTES:-6}" TRAIN_ONLY=1 part t5_train bash "$here/gpu_t5_pair_run.sh" "$dir/t5_pair"
  wait "$tests_pid"
  part multigpu_sweeps bash "$here/gpu_multigpu_run.sh" "$dir/multigpu" sweeps
  part t5_sweep bash "$here/gpu_t5_pair_run.sh" "$dir/t5_pair"
  part multigpu_allreduce bash "$here/gpu_multigpu_run.sh" "$dir/multigpu" allreduce
) &
wait
note "all parts ended"
