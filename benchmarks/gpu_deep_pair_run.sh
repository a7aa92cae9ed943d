#!/usr/bin/env bash
# Issue 12 on a machine with two GPUs (or one: GPUS=1): train the deep pair, then Table 2 in wall-clock.
#   bash benchmarks/gpu_deep_pair_run.sh [DIR]        (default runs/deep; everything lands in DIR)
#
# With GPUS=1 the verifier trains on the one GPU, and what GPU 1 does below (smoke test, T = 1
# distillation, GPU tests) runs beside the main stage on GPU 0; the sweep has one worker, so a
# session's device time covers about Table 2's methods (T = 0 first); give VERIFIER_MINUTES and
# DRAFTER_MINUTES less to leave it more.
#
# First, on every GPU: the 30-layer verifier (`train --preset deep`), data-parallel under torchrun
# (a batch of VERIFIER_BATCH sequences a step over the ranks: the step is overhead-bound, so each rank
# takes a full recipe batch). Then the verifier's own translations of the training sources (`distill`:
# greedy on GPU 0, T = 1 on GPU 1), the 1-layer drafter trained on them with the verifier as teacher,
# started from the verifier's embeddings and first layer (`train --train-file --teacher --init-from`,
# GPU 0; DRAFTER_INIT=0: from random weights) and the pair's test-set record (pair.json), while GPU 1 runs
# the GPU tests; then the sweep on both GPUs (`sweep --workers 2`): every method at gamma = 5, T = 0
# and 1, 500 test examples, batch 1, fused backend, bfloat16 (run 3 swept in float32, where greedy sd is
# the verifier's own output, and measured why not to: a 6-token verifier call costs 1.68 one-token steps
# in float32 against 1.03 in bfloat16, and sd ran at 0.95x; in bfloat16, run 2's greedy sd differed from
# the verifier on 40 of 500 examples, rounding near-ties, within noise);
# Table 2's methods first, then gamma = 3 and 8 for sd, diff and opt_log, then the other methods.
# GPU 1 first runs a smoke test of the compiled paths (read it in the first device call's output); with
# one GPU the whole GPU test file runs then instead (beside the verifier, not the drafter).
# WARM_PROCS > 0 adds `sweep --warm-up-only` processes on random weights of the pair's shapes (torch's
# on-disk compile caches; the fused step is compiled per layer region, so the sweep's own compile
# took ~30 s in run 2 and the default is 0).
# Each stage logs to DIR/<stage>.log and its start / end / rc to DIR/stages.log; a failed stage
# does not stop the independent ones; run again, the stages that ended well are skipped. Knobs (environment): DEVICE (cuda), GPUS (2), VERIFIER_MINUTES (7.5),
# VERIFIER_GPUS (GPUS: data-parallel ranks for the verifier), VERIFIER_BATCH (128 a rank), VERIFIER_LR (8e-4) and
# VERIFIER_EPOCHS (12; the time budget trims it) with 2 ranks (one rank: the recipe's unless given), DRAFTER_MINUTES (3), DISTILL_BATCH (1024), DISTILL_LIMIT (all), DISTILL_SAMPLES (1: T = 1 translations a source;
# SmolLM2's drafter gained most from more of its verifier's answers, docs/smollm2.md), DISTILL_SOURCES (kjv: the
# English sides translated, kjv,web adds the World English Bible's text of the same verses), EXAMPLES (500), PRESET (deep),
# TEMPERATURES ("0 1": the sweep's, in this order), SEEDS ("0": each sampled cell once a seed; T = 0 runs the first
# only; the report pools them), EXTRA_GAMMAS (3,8: the block sizes swept after Table 2's gamma 5, in this order),
# METHODS (all; none: no sweep of the token drafter), ALPHAS (the grid, below), SKIP_TESTS (0), GPU_TESTS (all: a
# pytest -k expression choosing the GPU tests), BACKEND (fused: the sweep's), SWEEP_DTYPE (bfloat16), TEST_PAIRS (1000), WARM_PROCS (0),
# ARITHMETIC (0; 1: the block's arithmetic and kernels on the trained pair's vocabulary, after the sweeps;
# ARITHMETIC_METHODS: sd,diff,opt_log; ARITHMETIC_ONLY=1: without the pair's call costs),
# CALIBRATION (0; 1: benchmarks/sampler_calibration.py on the pair, last),
# EXTRAS (1: after Table 2's methods, benchmarks/call_costs.py and benchmarks/end_wait.py on the trained pair;
# first: before the sweep; end_wait: only benchmarks/end_wait.py, after the sweep; 0: not at all),
# COSTS_FIRST (0: 1 measures the machine's call costs first, below; COSTS_AUTOTUNE=0 leaves out its
# autotuned half), SWEEP_AUTOTUNE (auto; below),
# VERIFIER_EMA (none: a decay, e.g. 0.998, keeps a moving average of the verifier's weights, `train --ema-decay`),
# DRAFTER_BATCH / DRAFTER_LR (the recipe's: 128, 2e-3; each step also runs the 30-layer teacher, so a larger
# batch amortises its per-step launches: runs 4-6 trained 17-28 steps/s), DRAFTER_INTERMEDIATE (below).
# `distill` decodes batches of 1024 ragged rows with DISTILL_BACKEND (below; the compiled fused one would compile per batch shape).
# TRAIN_PROFILE (0): 1 profiles each role's eager training step first (below). TRAIN_COMPILE (0): 1 trains the verifier and the drafter with `train --compile` (each decoder layer compiled,
# the teacher's too); auto first times both ways on random weights of the pair's shapes (stage train_step,
# benchmarks/train_step.py) and compiles a role only where the compiled steps fit at least 3% more of its
# budget (TRAIN_STEP_OPTS: more of its options, e.g. "--warm-up 1 --steps 1" in a CPU rehearsal). A compiled
# training that fails is run again eagerly. Run 9 (one H200) found no gain for either role
# (results/deep_pair/run9/NOTE.md), hence the default 0.
# A CPU rehearsal of the plumbing:
#   DEVICE=cpu PRESET=tiny VERIFIER_MINUTES=0.2 DRAFTER_MINUTES=0.2 DISTILL_LIMIT=16 EXAMPLES=2 TEST_PAIRS=10 \
#     METHODS=verifier_only,sd,token_v3,opt SKIP_TESTS=1 BACKEND=dynamic bash benchmarks/gpu_deep_pair_run.sh runs/rehearsal
set -uo pipefail
dir="${1:-runs/deep}"
DEVICE="${DEVICE:-cuda}"; GPUS="${GPUS:-2}"; PRESET="${PRESET:-deep}"; METHODS="${METHODS:-all}"
VERIFIER_MINUTES="${VERIFIER_MINUTES:-7.5}"; VERIFIER_GPUS="${VERIFIER_GPUS:-$GPUS}"; DRAFTER_MINUTES="${DRAFTER_MINUTES:-3}"
one_rank=()   # the verifier on one GPU: the recipe's batch, learning rate and epochs, or those given
[ -n "${VERIFIER_BATCH:-}" ] && one_rank+=(--batch-size "$VERIFIER_BATCH")
[ -n "${VERIFIER_LR:-}" ] && one_rank+=(--lr "$VERIFIER_LR")
[ -n "${VERIFIER_EPOCHS:-}" ] && one_rank+=(--epochs "$VERIFIER_EPOCHS")
ema=(); [ -n "${VERIFIER_EMA:-}" ] && ema=(--ema-decay "$VERIFIER_EMA")   # the verifier's weights averaged (any rank count)
drafter_opts=()   # DRAFTER_BATCH / DRAFTER_LR: the drafter's batch and peak learning rate (default: the recipe's)
[ -n "${DRAFTER_BATCH:-}" ] && drafter_opts+=(--batch-size "$DRAFTER_BATCH")
[ -n "${DRAFTER_LR:-}" ] && drafter_opts+=(--lr "$DRAFTER_LR")
# DRAFTER_INTERMEDIATE: the drafter's MLP width (the recipe's 1536 unless given; wider keeps one layer, and
# with DRAFTER_INIT=1 starts as the verifier's first layer, its extra units' outputs at zero)
[ -n "${DRAFTER_INTERMEDIATE:-}" ] && drafter_opts+=(--intermediate "$DRAFTER_INTERMEDIATE")
VERIFIER_BATCH="${VERIFIER_BATCH:-128}"; VERIFIER_LR="${VERIFIER_LR:-8e-4}"; VERIFIER_EPOCHS="${VERIFIER_EPOCHS:-12}"
DISTILL_BATCH="${DISTILL_BATCH:-1024}"; DISTILL_SAMPLES="${DISTILL_SAMPLES:-1}"; DISTILL_SOURCES="${DISTILL_SOURCES:-kjv}"
TEMPERATURES="${TEMPERATURES:-0 1}"; SEEDS="${SEEDS:-0}"; EXAMPLES="${EXAMPLES:-500}"; SKIP_TESTS="${SKIP_TESTS:-0}"
BACKEND="${BACKEND:-fused}"; TEST_PAIRS="${TEST_PAIRS:-1000}"; WARM_PROCS="${WARM_PROCS:-0}"
SWEEP_DTYPE="${SWEEP_DTYPE:-bfloat16}"; DRAFTER_INIT="${DRAFTER_INIT:-$([ "$PRESET" = deep ] && echo 1 || echo 0)}"
mkdir -p "$dir"; rm -f "$dir/stop_side"
source scripts/gpus.sh   # gpu_id N: the N-th of the GPUs this script was given (CUDA_VISIBLE_DEVICES=2,3: GPU 2, 3)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# VERIFIER_INIT (none): a pretrained model of the preset's shape to start the verifier from, with its own
# tokenizer (`train --init-from V --tokenizer V`: a .gguf file or a checkpoint folder); smollm2: SmolLM2-135M-
# Instruct's GGUF (the deep shape: 30 x 576, 9/3 heads), carried in parts (scripts/smollm2_gguf.sh). Every
# later stage reads the verifier's tokenizer (saved with it); the drafters train with it (--tokenizer).
start=(); dtok=()
if [ -n "${VERIFIER_INIT:-}" ]; then
  vinit="$VERIFIER_INIT"
  if [ "$vinit" = smollm2 ]; then
    source scripts/smollm2_gguf.sh
    export PYTHONPATH="$PYTHONPATH:/tmp/site"   # the gguf package, installed from .whl/ where it is missing
    vinit="$(smollm2_gguf "$dir")" || { echo "$(date -u +%FT%TZ) no SmolLM2 GGUF: stop" >> "$dir/stages.log"; exit 1; }
  fi
  echo "$(date -u +%FT%TZ) the verifier starts from $vinit" >> "$dir/stages.log"
  # VERIFIER_TOKENIZER: its tokenizer, where it is not beside it (the shipped models': src/speccascade/assets/tokenizer)
  start=(--init-from "$vinit" --tokenizer "${VERIFIER_TOKENIZER:-$vinit}"); dtok=(--tokenizer "$dir/verifier")
fi
# VERIFIER_DROPOUT: the verifier's residual dropout (the recipe's 0.3 unless given; e.g. 0.1 from a pretrained start)
[ -n "${VERIFIER_DROPOUT:-}" ] && start+=(--dropout "$VERIFIER_DROPOUT")
# VERIFIER_LABEL_SMOOTHING: the verifier's label smoothing (the recipe's 0.1 unless given)
[ -n "${VERIFIER_LABEL_SMOOTHING:-}" ] && start+=(--label-smoothing "$VERIFIER_LABEL_SMOOTHING")
sc() { python -m speccascade "$@"; }
stage() {  # stage NAME CMD... : run, log, record rc; a stage that ended well in DIR before is skipped
  local name="$1"; shift
  [ -f "$dir/$name.done" ] && { echo "$(date -u +%FT%TZ) skip $name (done before)" >> "$dir/stages.log"; return 0; }
  echo "$(date -u +%FT%TZ) start $name" >> "$dir/stages.log"
  "$@" > "$dir/$name.log" 2>&1
  local rc=$?
  echo "$(date -u +%FT%TZ) end $name rc=$rc" >> "$dir/stages.log"
  [ $rc -eq 0 ] && touch "$dir/$name.done"
  return $rc
}
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$dir/gpu.txt" 2>&1
# the card's clocks and power limit too (runs 5 and 6 priced a multi-token call higher than runs 2 and 4)
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,power.max_limit,pstate,pci.bus_id \
    --format=csv >> "$dir/gpu.txt" 2>&1
# and the host's CPU: the loops' host work between replays, the distillation's and the tests' speeds follow
# it (on the same card, run 9 took 34% longer than run 8 over the GPU tests and 37% longer over the distillation)
[ "$DEVICE" = cuda ] && { echo "host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) CPUs"; } >> "$dir/gpu.txt" 2>&1
git rev-parse HEAD > "$dir/commit.txt" 2>/dev/null || true   # can be stale on the device: code.sha1 is the files
(source scripts/parts.sh; code_hash > "$dir/code.sha1")

# The sweep's grid: every method, 3-4 alphas each, from the SD end to the drafter end of its rule.
# Denser where run 2's curves crossed the verifier's quality (diff, opt, opt_log between the SD end
# and alpha 0; lossy below 0.2, where it never reached the verifier at T = 1).
# With one GPU (one sweep worker) Table 2's methods get 3-4 alphas each, so that T = 0 ends in about
# 10 minutes. ALPHAS (environment) replaces the grid. Run 4 on one H200 (results/deep_pair/run4/NOTE.md):
# the verifier at 256 sequences a step ran 6.2 steps/s (plan VERIFIER_EPOCHS=12, as run 3's best came at epoch
# 7 of a 12-epoch schedule; run 4's 7-epoch plan left it weaker), greedy + 2 T = 1 distillation passes side by
# side took 2 min 55 s, and Table 2's methods at T = 0 and 1 took 13.5 minutes.
REST_ALPHAS="chow_log=0.5,2,5;diff_log=-1,0.5,2;token_v1=-0.2,0.1,0.5;token_v2=-0.2,0.1,0.3"
REST_ALPHAS+=";token_cascade=0.2,0.6,0.9;seq_cascade=0.3,0.6,0.9;oracle_diff=-0.2,0.1,0.4;bild=1,2,4"
if [ -n "${ALPHAS:-}" ]; then :
elif [ "$GPUS" -ge 2 ]; then
  ALPHAS="lossy=0.05,0.2,0.5,0.8;lossy_tuned=0.05,0.2,0.5,0.8;bild_star=1,3,8;chow=0.2,0.6,0.9"
  ALPHAS+=";diff=-0.5,-0.2,-0.1,0,0.1,0.3;opt=-1,-0.3,0,0.5,2;opt_log=-1,0,1,10;token_v3=0.2,0.4,0.6,0.9;$REST_ALPHAS"
else
  ALPHAS="lossy=0.05,0.3,0.8;lossy_tuned=0.05,0.3,0.8;bild_star=1,3,8;chow=0.2,0.6,0.9"
  ALPHAS+=";diff=-0.5,-0.2,0,0.2;opt=-1,0,0.5;opt_log=-1,0,1;token_v3=0.2,0.5,0.9;$REST_ALPHAS"
fi
# gamma 3 and 8: sd and run 2's two best cascades at T = 1 (opt_log 1.89x, diff 1.82x), at the
# alphas around their crossing of the verifier's quality
GAMMA_ALPHAS="diff=-0.2,0;opt_log=-1,0"
alphas_for() {  # keep only the grids of the swept methods
  local out="" m part grids; IFS=';' read -ra grids <<< "$1"   # (not the global parts: the sweep's stages)
  for part in "${grids[@]}"; do
    m="${part%%=*}"
    if [ "$METHODS" = all ] || [[ ",$METHODS," == *",$m,"* ]]; then out+="${out:+;}$part"; fi
  done
  echo "$out"
}
# MAX_NEW_TOKENS (128): the sweep's cap on new tokens (the shipped tokenizer's longest test verse is 118 tokens;
# SmolLM2's is 177, 2 of the first 500 over 128: give 192 with VERIFIER_INIT=smollm2)
grid=(--temperatures $TEMPERATURES --seeds $SEEDS --examples "$EXAMPLES" --max-new-tokens "${MAX_NEW_TOKENS:-128}" --device "$DEVICE" --backend "$BACKEND" --quiet)
[ "$DEVICE" = cuda ] && grid+=(--dtype "$SWEEP_DTYPE")

# GPU 1, from the start: warm the compile caches on random weights of the pair's shapes (compiling
# is CPU work, and the verifier's training leaves the CPUs idle; 4 compile threads a process)
warm() {
  export TORCHINDUCTOR_COMPILE_THREADS="${TORCHINDUCTOR_COMPILE_THREADS:-4}"
  # first a smoke test of the compiled fused paths the sweep uses (a minute; read it in the first call's
  # output: a fix made then reaches the stages that start later, as each device call re-sends the tree)
  # with one GPU the whole GPU test file runs here instead, beside the verifier's training (mostly
  # compiling, on the CPUs), so that it does not slow the drafter's
  if [ "$SKIP_TESTS" != 1 ] && [ "$SIDE" -eq 0 ]; then
    # (at most 11 minutes: a hung test must not hold the sweep; cut, it leaves no summary, and the sweep
    # then runs without the bonus draft beside the verifier, below)
    stage pytest_gpu timeout 660 python -m pytest tests/test_gpu.py -rA -p no:cacheprovider ${GPU_TESTS:+-k "$GPU_TESTS"}
  elif [ "$SKIP_TESTS" != 1 ]; then
    stage gpu_smoke python -m pytest tests/test_gpu.py -x -q -p no:cacheprovider \
        -k "captured_greedy or host_driven or fused_t5"
  fi
  [ "$WARM_PROCS" -gt 0 ] || return 0
  stage random_pair python -c "import sys, pathlib; from speccascade.train.trainer import save_random_pair
print(save_random_pair(sys.argv[2], pathlib.Path(sys.argv[1])))" "$dir/random" "$PRESET"
  [ -f "$dir/stop_side" ] && return 0
  # compiling is mostly CPU work: WARM_PROCS processes share the GPU, each warming a share of the methods
  local all i group pids=()
  all=$([ "$METHODS" = all ] && python -c "from speccascade.registry import METHODS; print(','.join(METHODS))" \
        || echo "$METHODS")
  IFS=',' read -ra names <<< "$all"
  for ((i = 0; i < WARM_PROCS; i++)); do
    group=""; for ((j = i; j < ${#names[@]}; j += WARM_PROCS)); do group+="${group:+,}${names[j]}"; done
    [ -z "$group" ] && continue
    local opt=(); [[ ",$group," == *",seq_cascade,"* ]] && opt=(--option seq_cascade.length_normalized=true)
    (METHODS="$group"; stage "warm_up$i" sc sweep --drafter "$dir/random/drafter" --verifier "$dir/random/verifier" \
      --methods "$group" --alphas "$(alphas_for "$ALPHAS")" "${opt[@]}" "${grid[@]}" --warm-up-only) &
    pids+=($!)
  done
  wait "${pids[@]}"
}
# COSTS_FIRST=1: before anything else, on the idle GPU 0, this machine's call costs on random weights of
# the pair's shapes (benchmarks/call_costs.py: every feed width, the verifier's kernels at width 1 and 6,
# the block's arithmetic alone; run 7 on an H200: 1.6 min, and 3.2 min autotuned), once as torch.compile builds the step by default and once
# with inductor's GEMM autotuning (TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=1). Runs 5 and 6 measured b = 1.24 /
# 1.17 for the 6-token verifier call where runs 2 and 4 had 1.04. SWEEP_AUTOTUNE (auto): 1 sweeps with the
# autotuned GEMMs, 0 without; auto uses them only where the check found the 6-token call >= 3% cheaper
# and the one-token step no dearer (so that the baseline, verifier_only, is never made slower).
AUTOTUNE_CACHE="${AUTOTUNE_CACHE:-/tmp/speccascade_inductor_autotune}"   # outside DIR: not packed
if [ "${COSTS_FIRST:-0}" = 1 ]; then
  costs=(python benchmarks/call_costs.py --preset "$PRESET" --device "$DEVICE" --examples "$EXAMPLES")
  [ "$DEVICE" = cuda ] && costs+=(--dtype "$SWEEP_DTYPE")
  (export CUDA_VISIBLE_DEVICES=$(gpu_id 0); [ "$DEVICE" = cpu ] && unset CUDA_VISIBLE_DEVICES
   stage costs_default "${costs[@]}" --profile --arithmetic-methods sd,diff --out "$dir/costs_default.json"
   # the attention in the cache layout before and after models.fused.CACHE_ALIGN (run 7's profile), same machine
   stage cache_layout python benchmarks/cache_layout.py --preset "$PRESET" --device "$DEVICE" --out "$dir/cache_layout.json"
   [ "${COSTS_AUTOTUNE:-1}" = 1 ] || exit 0   # COSTS_AUTOTUNE=0: not the autotuned check (run 7: 3.2 min)
   export TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=1 TORCHINDUCTOR_CACHE_DIR="$AUTOTUNE_CACHE"
   # (widths 1 and 6 only: autotuning benchmarks kernel candidates for every GEMM shape it compiles)
   stage costs_autotune "${costs[@]}" --widths 1,6 --arithmetic-methods "" --out "$dir/costs_autotune.json")
fi
autotune_pays() {  # 1 where the costs check found the autotuned GEMMs cheaper (see above), else 0
  python -c '
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
step_ok = b["verifier_step_s"] <= 1.01 * a["verifier_step_s"]
wide = b["verifier_call_s"]["6"] <= 0.97 * a["verifier_call_s"]["6"]
print(1 if step_ok and wide else 0)' "$dir/costs_default.json" "$dir/costs_autotune.json" 2>/dev/null || echo 0
}
TRAIN_COMPILE="${TRAIN_COMPILE:-0}"
if [ "$TRAIN_COMPILE" = auto ]; then   # on the idle GPU 0, before anything trains: eager vs compiled steps
  (export CUDA_VISIBLE_DEVICES=$(gpu_id 0); [ "$DEVICE" = cpu ] && unset CUDA_VISIBLE_DEVICES
   stage train_step python benchmarks/train_step.py --preset "$PRESET" --roles verifier,drafter --device "$DEVICE" \
       --batch-sizes "verifier=$VERIFIER_BATCH${DRAFTER_BATCH:+,drafter=$DRAFTER_BATCH}" \
       --budget-minutes "verifier=$VERIFIER_MINUTES,drafter=$DRAFTER_MINUTES" ${TRAIN_STEP_OPTS:-} --out "$dir/train_step.json")
fi
# TRAIN_PROFILE=1: first, on the idle GPU 0, what bounds each role's eager training step (the device's
# kernels or the host), 20 timed steps and 5 profiled, random weights (benchmarks/train_step.py --profile-steps;
# ~1 minute on an H200): the verifier's test BLEU follows the steps a session's minutes fit
if [ "${TRAIN_PROFILE:-0}" = 1 ]; then
  (export CUDA_VISIBLE_DEVICES=$(gpu_id 0); [ "$DEVICE" = cpu ] && unset CUDA_VISIBLE_DEVICES
   stage train_profile python benchmarks/train_step.py --preset "$PRESET" --roles verifier,drafter --device "$DEVICE" \
       --modes eager --batch-sizes "verifier=$VERIFIER_BATCH${DRAFTER_BATCH:+,drafter=$DRAFTER_BATCH}" --warm-up 5 \
       --steps 20 $([ "$DEVICE" = cuda ] && echo --profile-steps 5) ${TRAIN_STEP_OPTS:-} --out "$dir/train_profile.json")
fi
compile_flag() {  # compile_flag ROLE: --compile where TRAIN_COMPILE says so for ROLE (auto: the benchmark's `pays`)
  case "$TRAIN_COMPILE" in
    1) echo --compile ;;
    auto) python -c 'import json, sys; print("--compile" if json.load(open(sys.argv[1]))["roles"][sys.argv[2]]["pays"] else "")' \
            "$dir/train_step.json" "$1" 2>/dev/null ;;
  esac
}
train_stage() {  # train_stage NAME ROLE CMD...: the stage with ROLE's compile flag; failed compiled, again eagerly
  local name="$1" flag; flag="$(compile_flag "$2")"; shift 2
  [ -n "$flag" ] && echo "$(date -u +%FT%TZ) $name with $flag" >> "$dir/stages.log"
  stage "$name" "$@" $flag && return 0
  [ -z "$flag" ] && return 1
  echo "$(date -u +%FT%TZ) $name failed with $flag: again eagerly" >> "$dir/stages.log"
  cp "$dir/$name.log" "$dir/${name}_compiled.log" 2>/dev/null
  stage "$name" "$@"
}
SIDE=$((GPUS - 1))   # the GPU of the side tasks (smoke test, T = 1 distillation, GPU tests): with one GPU, GPU 0
(export CUDA_VISIBLE_DEVICES=$(gpu_id $SIDE); warm) &
warm_pid=$!
# every GPU: the verifier, data-parallel (one rank per GPU, each a VERIFIER_BATCH-sequence share of a step)
if [ "$VERIFIER_GPUS" -ge 2 ]; then
  train_stage train_verifier verifier python -m torch.distributed.run --standalone --nproc-per-node "$VERIFIER_GPUS" \
      -m speccascade train --preset "$PRESET" --role verifier --out "$dir/verifier" --device "$DEVICE" \
      --minutes "$VERIFIER_MINUTES" --batch-size $((VERIFIER_BATCH * VERIFIER_GPUS)) --lr "$VERIFIER_LR" \
      --epochs "$VERIFIER_EPOCHS" "${ema[@]}" "${start[@]}" \
    || echo "$(date -u +%FT%TZ) the data-parallel verifier failed: GPU 0 trains it alone" >> "$dir/stages.log"
fi
limit=(); [ -n "${DISTILL_LIMIT:-}" ] && limit=(--limit "$DISTILL_LIMIT")
# DISTILL_BACKEND (fused_eager): the backend that decodes the verifier's translations; where another one
# fails, the stage is run again on the dynamic backend. Runs 2-10 decoded on the dynamic backend (~360
# rows/s a process on an H200; run 7's fused_eager try predates models.fused.CACHE_ALIGN); run 11 timed
# both on its trained verifier (results/deep_pair/run11/decode_batch.json: fused_eager 7.2x faster at
# 1,024 rows) and distilled 117,558 rows on fused_eager in 2 min 5 s (run 10, dynamic: 5 min 38 s).
# auto times both on the trained verifier first and takes the faster (below; DECODE_BATCH_OPTS: more options)
DISTILL_BACKEND="${DISTILL_BACKEND:-fused_eager}"
distill_at() {  # distill_at GPU SEED TEMPERATURE...: the verifier's translations at these temperatures
  local gpu="$1" seed="$2" tag; shift 2
  tag=$(IFS=_; echo "$*")$([ "$seed" -gt 0 ] && echo "_s$seed")   # 1 with seed 2 -> 1_s2
  (export CUDA_VISIBLE_DEVICES=$(gpu_id "$gpu"); [ "$DEVICE" = cpu ] && unset CUDA_VISIBLE_DEVICES
   run() {
     stage "distill_T$tag" sc distill --verifier "$dir/verifier" --out "$dir/distill_T$tag.jsonl.gz" \
       --temperatures "$@" --seed "$seed" --sources "$DISTILL_SOURCES" --batch-size "$DISTILL_BATCH" --device "$DEVICE" \
       "${limit[@]}" --quiet $([ "$DEVICE" = cuda ] && echo --dtype bfloat16)
   }
   run "$@" --backend "$DISTILL_BACKEND" && exit 0
   [ "$DISTILL_BACKEND" = dynamic ] && exit 1
   echo "$(date -u +%FT%TZ) distill_T$tag failed on $DISTILL_BACKEND: again on dynamic" >> "$dir/stages.log"
   cp "$dir/distill_T$tag.log" "$dir/distill_T${tag}_$DISTILL_BACKEND.log" 2>/dev/null
   run "$@" --backend dynamic)
}
# GPU 0: the verifier alone if it is not trained yet; then its translations (T = 1 on GPU 1 meanwhile)
(
  export CUDA_VISIBLE_DEVICES=$(gpu_id 0)
  [ "$DEVICE" = cpu ] && unset CUDA_VISIBLE_DEVICES
  train_stage train_verifier verifier sc train --preset "$PRESET" --role verifier --out "$dir/verifier" \
      --device "$DEVICE" --minutes "$VERIFIER_MINUTES" "${one_rank[@]}" "${ema[@]}" "${start[@]}"
) && {
  # DISTILL_BACKEND=auto: the backend that decodes the distillation's batches faster, timed on the trained
  # verifier first (benchmarks/decode_batch.py: one batch of DISTILL_BATCH rows, 200 tokens a row, dynamic
  # against fused_eager; ~30 s on an H200 at run 10's rate); fused_eager where it is at least 1.1x faster
  if [ "$DISTILL_BACKEND" = auto ]; then
    (export CUDA_VISIBLE_DEVICES=$(gpu_id 0); [ "$DEVICE" = cpu ] && unset CUDA_VISIBLE_DEVICES
     stage decode_batch python benchmarks/decode_batch.py --verifier "$dir/verifier" --device "$DEVICE" \
         --batch-size "$DISTILL_BATCH" ${DECODE_BATCH_OPTS:-} --out "$dir/decode_batch.json")
    DISTILL_BACKEND=$(python -c 'import json, sys; print("fused_eager" if json.load(open(sys.argv[1])).get("fused_eager_pays") else "dynamic")' \
        "$dir/decode_batch.json" 2>/dev/null || echo dynamic)
    echo "$(date -u +%FT%TZ) distill on $DISTILL_BACKEND" >> "$dir/stages.log"
  fi
  # DISTILL_SAMPLES T = 1 translations of every source, side by side, one process each (seeds 0, 1, ...;
  # files distill_T1, distill_T1_s1, ...), beside the greedy ones on GPU 0; with two GPUs the samples
  # alternate between GPU 1 and GPU 0 (seed 0 on GPU 1), so that each GPU decodes a like share
  t1_pids=()
  for ((s = 0; s < DISTILL_SAMPLES; s++)); do distill_at $(( (SIDE + s * (GPUS - 1)) % GPUS )) "$s" 1 & t1_pids+=($!); done
  distill_at 0 0 0; rc0=$?
  t1_ok=1; for pid in "${t1_pids[@]}"; do wait "$pid" || t1_ok=0; done
  [ $t1_ok = 1 ] && [ $rc0 -eq 0 ]
} && stage distill bash -c "cat $dir/distill_T*.jsonl.gz > $dir/distill.jsonl.gz"
distill_rc=$?
# the side GPU, beside the drafter's training: the GPU tests on this engine (they end before the sweep)
if [ "$SKIP_TESTS" != 1 ] && [ "$SIDE" -ne 0 ]; then
  (export CUDA_VISIBLE_DEVICES=$(gpu_id $SIDE); stage pytest_gpu timeout 660 python -m pytest tests/test_gpu.py -rA \
       -p no:cacheprovider ${GPU_TESTS:+-k "$GPU_TESTS"}) &
  side_pid=$!
fi

# GPU 0: the drafter and the pair's record
pair_backend="$([ "$DISTILL_BACKEND" = auto ] && echo dynamic || echo "$DISTILL_BACKEND")"
pair_record() {  # pair_record BACKEND: the pair's test BLEU and agreement (benchmarks/train_pair.py)
  stage pair python benchmarks/train_pair.py --preset "$PRESET" --roles "" --out "$dir" --device "$DEVICE" \
      --test-pairs "$TEST_PAIRS" --backend "$1"
}
[ $distill_rc -eq 0 ] && (
  export CUDA_VISIBLE_DEVICES=$(gpu_id 0)
  [ "$DEVICE" = cpu ] && unset CUDA_VISIBLE_DEVICES
  train_stage train_drafter drafter sc train --preset "$PRESET" --role drafter --out "$dir/drafter" --device "$DEVICE" \
      --train-file "$dir/distill.jsonl.gz" --teacher "$dir/verifier" --minutes "$DRAFTER_MINUTES" "${drafter_opts[@]}" "${dtok[@]}" \
      $([ "$DRAFTER_INIT" = 1 ] && echo --init-from "$dir/verifier") &&
  # the test set's decode on the distillation's backend (auto: the one decode_batch.py found faster); where
  # that backend fails, again on the dynamic backend (as the distillation does)
  { pair_record "$pair_backend" ||
    { [ "$pair_backend" != dynamic ] &&
      echo "$(date -u +%FT%TZ) pair failed on $pair_backend: again on dynamic" >> "$dir/stages.log" &&
      { cp "$dir/pair.log" "$dir/pair_$pair_backend.log" 2>/dev/null; pair_record dynamic; }; }; }
)
pair_rc=$?
if [ -n "${warm_pid:-}" ]; then  # the sweep needs every GPU to itself: stop the warm-up if it still runs
  touch "$dir/stop_side"; pkill -f -- "--warm-up-only" 2>/dev/null; wait "$warm_pid"
  [ "$WARM_PROCS" -gt 0 ] && echo "$(date -u +%FT%TZ) warm-up stopped (warm-ups that had not ended were cut)" >> "$dir/stages.log"
fi
[ -n "${side_pid:-}" ] && wait "$side_pid"   # the GPU tests
# a cascade's call at the bonus position runs beside the verifier's call in a captured block
# (src/speccascade/loop.py, bonus_draft_beside): where the GPU tests found a captured law or that path
# wrong, or ended without pytest's summary (a crash), the sweeps run it on one stream
# (SPECCASCADE_BONUS_DRAFT_BESIDE=0), as before it existed
gpu_tests_doubt() {  # gpu_tests_doubt PATTERN: a GPU test matching PATTERN failed, or the tests ended without a summary
  grep -qE "^(FAILED|ERROR) .*($1)" "$dir"/pytest_gpu.log "$dir"/gpu_smoke.log 2>/dev/null ||
    { [ -f "$dir/pytest_gpu.log" ] && ! tail -n 1 "$dir/pytest_gpu.log" | grep -qE "[0-9]+ (passed|failed)"; }
}
if gpu_tests_doubt "beside|law_on_gpu"; then
  export SPECCASCADE_BONUS_DRAFT_BESIDE=0
fi
echo "$(date -u +%FT%TZ) a cascade's bonus draft beside the verifier: ${SPECCASCADE_BONUS_DRAFT_BESIDE:-1}" >> "$dir/stages.log"
# the vocabulary's argmaxes split into chunks (sampling.wide_argmax): where its GPU tests failed, whole
if grep -qE "^(FAILED|ERROR) .*split_argmax" "$dir"/pytest_gpu.log 2>/dev/null; then
  export SPECCASCADE_SPLIT_ARGMAX=0
fi
echo "$(date -u +%FT%TZ) the vocabulary's argmaxes split into chunks: ${SPECCASCADE_SPLIT_ARGMAX:-1}" >> "$dir/stages.log"
# the feature drafter's later drafts trained as the loop makes them (FEATURE_UNROLL, `train --feature-unroll`):
# not where its GPU test (test_unrolled_feature_training_on_gpu) failed, or the GPU tests ended without a summary
if [ "${FEATURE_UNROLL:-0}" != 0 ] && gpu_tests_doubt unrolled; then
  FEATURE_UNROLL=0
fi
[ "${FEATURES:-0}" = 1 ] && echo "$(date -u +%FT%TZ) the feature drafter's depths trained beyond the first: ${FEATURE_UNROLL:-0}" >> "$dir/stages.log"
[ $pair_rc -ne 0 ] && { echo "the pair failed (rc=$pair_rc): no sweep" >> "$dir/stages.log"; exit $pair_rc; }

pair=(--drafter "$dir/drafter" --verifier "$dir/verifier")
SWEEP_AUTOTUNE="${SWEEP_AUTOTUNE:-auto}"
[ "$SWEEP_AUTOTUNE" = auto ] && SWEEP_AUTOTUNE=$(autotune_pays)
if [ "$SWEEP_AUTOTUNE" = 1 ]; then   # the sweep and the measurements after it, with the check's autotune cache
  export TORCHINDUCTOR_MAX_AUTOTUNE_GEMM=1 TORCHINDUCTOR_CACHE_DIR="$AUTOTUNE_CACHE"
fi
echo "$(date -u +%FT%TZ) sweep with inductor's GEMM autotuning: $SWEEP_AUTOTUNE" >> "$dir/stages.log"
# with every method: Table 2's methods first (the session's end may cut a sweep; cells land as they
# finish), then the rest into the same file (with --workers 2 each worker re-times its own verifier_only for
# them; one process, whose baseline key is already in the file, times them against the first stage's)
FIRST="verifier_only,drafter_only,sd,lossy,lossy_tuned,bild_star,chow,diff,opt,opt_log,token_v3"
if [ "$METHODS" = all ]; then
  rest=$(python -c "from speccascade.registry import METHODS; f='$FIRST'.split(','); print(','.join(m for m in METHODS if m not in f))")
  parts=(sweep "$FIRST" sweep_rest "$rest")
elif [ "$METHODS" = none ]; then   # no sweep of the token drafter (the feature drafter's sweep has its own baseline)
  parts=()
else
  parts=(sweep "$METHODS")
fi
sweep_part() {  # sweep_part STAGE METHODS: gamma 5 cells of these methods into the sweep file
  local ms="$2" a opt=(); [[ ",$ms," == *",seq_cascade,"* ]] && opt=(--option seq_cascade.length_normalized=true)
  a="$(METHODS=$ms alphas_for "$ALPHAS")"   # (empty when no method of ms has an alpha)
  stage "$1" sc sweep "${pair[@]}" --methods "$ms" ${a:+--alphas "$a"} "${opt[@]}" \
      "${grid[@]}" --gammas 5 --workers "$GPUS" --out "$dir/sweep.jsonl"
}
# two short measurements on the trained pair (EXTRAS=0 skips them; EXTRAS=first runs them before the
# sweep, 1 after Table 2's methods; end_wait: only the second, after them): the per-width call costs (is a 6-token verifier call ~1.04 one-token
# steps on this machine, as in runs 2 and 4, or 1.17-1.24, as in runs 5 and 6?) and what the host's wait
# near the end of a decode buys (benchmarks/end_wait.py)
extras() {
  (export CUDA_VISIBLE_DEVICES=$(gpu_id $SIDE); [ "$DEVICE" = cpu ] && unset CUDA_VISIBLE_DEVICES
   # with COSTS_FIRST=1 the machine's costs are measured already (random weights of the same shapes)
   [ "${COSTS_FIRST:-0}" = 1 ] || [ "$EXTRAS" = end_wait ] ||
   stage call_costs python benchmarks/call_costs.py "${pair[@]}" --device "$DEVICE" --examples "$EXAMPLES" \
       $([ "$DEVICE" = cuda ] && echo --dtype "$SWEEP_DTYPE") --arithmetic-methods "" --out "$dir/call_costs.json"
   # the same shapes with random weights: the machine's costs apart from the trained weights, the verifier's
   # kernels and the block's arithmetic
   [ "${COSTS_FIRST:-0}" = 1 ] || [ "$EXTRAS" = end_wait ] ||
   stage call_costs_random python benchmarks/call_costs.py --preset "$PRESET" --device "$DEVICE" --examples "$EXAMPLES" \
       $([ "$DEVICE" = cuda ] && echo --dtype "$SWEEP_DTYPE") --profile --arithmetic-methods sd,diff \
       --out "$dir/call_costs_random.json") &
  local costs_pid=$!
  [ "$SIDE" -ne 0 ] || wait "$costs_pid"   # one GPU: not beside the timed run
  (export CUDA_VISIBLE_DEVICES=$(gpu_id 0); [ "$DEVICE" = cpu ] && unset CUDA_VISIBLE_DEVICES
   # 100 verses (or EXAMPLES, if fewer), 3 rounds of 3 modes: ~1.5 minutes on an H200
   stage end_wait python benchmarks/end_wait.py "${pair[@]}" --device "$DEVICE" --examples $((EXAMPLES < 100 ? EXAMPLES : 100)) \
       --size-examples "$EXAMPLES" \
       $([ "$DEVICE" = cuda ] && echo --dtype "$SWEEP_DTYPE") --rounds 3 --out "$dir/end_wait.json")
  wait "$costs_pid"
}
EXTRAS="${EXTRAS:-1}"
[ "$EXTRAS" = first ] && extras
[ ${#parts[@]} -gt 0 ] && sweep_part "${parts[0]}" "${parts[1]}"
{ [ "$EXTRAS" = 1 ] || [ "$EXTRAS" = end_wait ]; } && extras
# FEATURES=1: the offline EAGLE question on the trained verifier (benchmarks/feature_drafter.py, ~2-3 minutes
# on an H200): 1-layer drafters with and without its features, teacher-forced and in greedy blocks of 5,
# beside the trained drafter measured the same way; each is saved under feature_drafters/. FEATURE_OPTS
# replaces its training options. FEATURE_SWEEP=1 then sweeps the feature drafter (with EAGLE's regression) in
# the loop (speccascade.models.features; the fused backends), Table 2's gamma 5 cells of FEATURE_METHODS
# (verifier_only,sd,diff,opt_log), into sweep_features.jsonl (its own verifier_only baseline).
# FEATURE_DATA=distill trains them on the verifier's own translations (distill.jsonl.gz, the token drafter's
# rows: the prefixes the drafter meets when the verifier decides), where that file exists; else the reference verses.
# FEATURE_BENCHMARK=0 leaves the benchmark's drafters out (~5 minutes with SmolLM2's vocabulary in run 16): then
# the feature drafter is the production trainer's alone (FEATURE_TRAIN_MINUTES, below).
if [ "${FEATURES:-0}" = 1 ]; then
  fdata=(); [ "${FEATURE_DATA:-}" = distill ] && [ -s "$dir/distill.jsonl.gz" ] && fdata=(--train-file "$dir/distill.jsonl.gz")
  [ "${FEATURE_BENCHMARK:-1}" = 1 ] && (export CUDA_VISIBLE_DEVICES=$(gpu_id 0); [ "$DEVICE" = cpu ] && unset CUDA_VISIBLE_DEVICES
   stage feature_drafter python benchmarks/feature_drafter.py --verifier "$dir/verifier" --reference-drafter "$dir/drafter" \
       --device "$DEVICE" ${FEATURE_OPTS:---train-pairs 30000 --test-pairs 500 --epochs 3 --batch-size 64 --objective kl} \
       "${fdata[@]}" --save "$dir/feature_drafters" --out "$dir/feature_drafter.json")
  # FEATURE_TRAIN_MINUTES > 0: also the production trainer's feature drafter (`train --features`, from the
  # verifier's embeddings and first layer, KL to it on the verifier's translations, that many minutes, at the
  # benchmark's learning rate FEATURE_TRAIN_LR, 1e-3; FEATURE_UNROLL, 0: the block's later drafts trained too,
  # `train --feature-unroll`), measured offline as the benchmark's drafters are
  # (feature_drafter_trained.json); the feature sweep then sweeps it where it is accepted at least as often
  # at T = 1 as the benchmark's with regression, else the benchmark's (also where its training failed)
  fdrafter="$dir/feature_drafters/features_and_regression"
  if [ "${FEATURE_TRAIN_MINUTES:-0}" != 0 ]; then
    train_features() {  # train_features DEPTHS
      stage train_feature_drafter sc train --preset "$PRESET" --role drafter --features --out "$dir/feature_drafter" \
          --device "$DEVICE" --train-file "$dir/distill.jsonl.gz" --teacher "$dir/verifier" --init-from "$dir/verifier" \
          --distill-weight 1 --lr "${FEATURE_TRAIN_LR:-1e-3}" --minutes "$FEATURE_TRAIN_MINUTES" --feature-unroll "$1" \
          "${dtok[@]}"
    }
    # (where the unrolled training fails, e.g. out of memory, the drafter is trained again on depth 0 alone)
    (export CUDA_VISIBLE_DEVICES=$(gpu_id 0); [ "$DEVICE" = cpu ] && unset CUDA_VISIBLE_DEVICES
     train_features "${FEATURE_UNROLL:-0}" ||
       { [ "${FEATURE_UNROLL:-0}" != 0 ] && mv "$dir/train_feature_drafter.log" "$dir/train_feature_drafter_unrolled.log" &&
         echo "$(date -u +%FT%TZ) the unrolled feature drafter failed: again on depth 0" >> "$dir/stages.log" &&
         train_features 0; })
    # measured offline as the benchmark's are (its test verses: FEATURE_OPTS' --test-pairs), and swept where it is
    # accepted at least as often at T = 1 as the benchmark's with regression (or where that one is missing)
    if [ -f "$dir/train_feature_drafter.done" ]; then
      ftp="$(echo "${FEATURE_OPTS:-}" | grep -oE -- '--test-pairs [0-9]+' | grep -oE '[0-9]+$' || true)"
      (export CUDA_VISIBLE_DEVICES=$(gpu_id 0); [ "$DEVICE" = cpu ] && unset CUDA_VISIBLE_DEVICES
       stage measure_feature_drafter python benchmarks/feature_drafter.py --verifier "$dir/verifier" \
           --reference-drafter "$dir/feature_drafter" --variants "" --device "$DEVICE" --test-pairs "${ftp:-500}" \
           --out "$dir/feature_drafter_trained.json")
      fdrafter="$(python - "$dir" "$fdrafter" <<'EOF'
import json, os, sys
d, benchmark = sys.argv[1], sys.argv[2]
def acceptance(path, key):
    try:
        r = json.load(open(path))
        return (r["reference_drafter"] if key is None else r["results"][key]["trained"])["teacher_forced"]["acceptance_T1"]
    except (OSError, KeyError, ValueError):
        return None
trained = acceptance(f"{d}/feature_drafter_trained.json", None)
bench = acceptance(f"{d}/feature_drafter.json", "features_and_regression") if os.path.isdir(benchmark) else None
print(f"{d}/feature_drafter" if trained is not None and (bench is None or trained >= bench) else benchmark)
EOF
)"
    fi
    echo "$(date -u +%FT%TZ) feature sweep drafter: $fdrafter" >> "$dir/stages.log"
  fi
  if [ "${FEATURE_SWEEP:-0}" = 1 ] && [ -d "$fdrafter" ]; then
    fm="${FEATURE_METHODS:-verifier_only,sd,diff,opt_log}"
    fa="$(METHODS=$fm alphas_for "$ALPHAS")"
    stage sweep_features sc sweep --drafter "$fdrafter" --verifier "$dir/verifier" \
        --methods "$fm" ${fa:+--alphas "$fa"} "${grid[@]}" --gammas 5 --workers "$GPUS" --out "$dir/sweep_features.jsonl"
    # FEATURE_GAMMAS (e.g. 8,3): the feature drafter at other block sizes, one stage each, in that order:
    # FEATURE_GAMMA_METHODS (verifier_only,sd; cascades at GAMMA_ALPHAS) into sweep_features_gammas.jsonl,
    # each stage against the verifier_only it times first
    fgm="${FEATURE_GAMMA_METHODS:-verifier_only,sd}"
    fga="$(METHODS=$fgm alphas_for "$GAMMA_ALPHAS")"
    for g in $(echo "${FEATURE_GAMMAS:-}" | tr , " "); do
      stage "sweep_features_gamma$g" sc sweep --drafter "$fdrafter" --verifier "$dir/verifier" --methods "$fgm" \
          ${fga:+--alphas "$fga"} "${grid[@]}" --gammas "$g" --workers "$GPUS" --out "$dir/sweep_features_gammas.jsonl"
    done
  fi
fi
# then gamma 3, then 8 (EXTRA_GAMMAS: these instead, in this order; the issue's block-size cells; gamma 3 first, both temperatures: at run 10's acceptance
# it was the faster block, sd 1.55x against 1.47x at T = 0), then the other methods: the session's end cuts
# the last. Each stage times its cells against the verifier_only it runs first (same process).
gm="sd,diff,opt_log"; [ "$METHODS" = all ] || gm="$(echo "$gm" | tr , '\n' | grep -xF -f <(echo "$METHODS" | tr , '\n') | paste -sd,)"
gma="$(METHODS=$gm alphas_for "$GAMMA_ALPHAS")"   # (empty when only sd is swept)
for g in $(echo "${EXTRA_GAMMAS-3,8}" | tr , " "); do   # (EXTRA_GAMMAS= : none)
  [ -n "$gm" ] && stage "sweep_gamma$g" sc sweep "${pair[@]}" --methods "$gm" ${gma:+--alphas "$gma"} \
      "${grid[@]}" --gammas "$g" --workers "$GPUS" --out "$dir/sweep.jsonl"
done
[ ${#parts[@]} -gt 2 ] && sweep_part "${parts[2]}" "${parts[3]}"
# ARITHMETIC=1, after the sweeps and before the calibration (run 20's session ended before it): where a
# block's time outside its priced model calls goes, on the trained pair's vocabulary (benchmarks/call_costs.py:
# the block's arithmetic on stand-in models for ARITHMETIC_METHODS (sd,diff,opt_log) at T = 0 and 1, with its
# kernels, with the vocabulary's argmaxes split and whole, and, unless ARITHMETIC_ONLY=1, the pair's call costs
# and the verifier's kernels at widths 1 and 6)
if [ "${ARITHMETIC:-0}" = 1 ] && [ -d "$dir/drafter" ]; then
  (export CUDA_VISIBLE_DEVICES=$(gpu_id 0); [ "$DEVICE" = cpu ] && unset CUDA_VISIBLE_DEVICES
   stage block_arithmetic python benchmarks/call_costs.py "${pair[@]}" --device "$DEVICE" --examples "$EXAMPLES" \
       $([ "$DEVICE" = cuda ] && echo --dtype "$SWEEP_DTYPE") --widths 1,6 --rounds 1 --profile \
       --arithmetic-methods "${ARITHMETIC_METHODS:-sd,diff,opt_log}" --split-argmax both \
       $([ "${ARITHMETIC_ONLY:-0}" = 1 ] && echo --arithmetic-only) --out "$dir/block_arithmetic.json")
fi
# CALIBRATION=1, last (a cut loses only it): is the sweep's sampling the verifier's law on this pair?
# (benchmarks/sampler_calibration.py: verifier_only and sd at T = 1 with the sweep's drafter, the mean over
# every generated token of its surprisal minus the entropy of the verifier's distribution, recomputed
# teacher-forced: 0 within noise for a lossless decode; CALIBRATION_EXAMPLES verses, 300; ~1.5 minutes)
if [ "${CALIBRATION:-0}" = 1 ] && [ -d "$dir/verifier" ]; then
  (export CUDA_VISIBLE_DEVICES=$(gpu_id 0); [ "$DEVICE" = cpu ] && unset CUDA_VISIBLE_DEVICES
   stage calibration python benchmarks/sampler_calibration.py --drafter "${fdrafter:-$dir/drafter}" \
       --verifier "$dir/verifier" --device "$DEVICE" $([ "$DEVICE" = cuda ] && echo --dtype "$SWEEP_DTYPE") \
       --backend "$BACKEND" --examples "${CALIBRATION_EXAMPLES:-300}" --max-new-tokens "${MAX_NEW_TOKENS:-128}" \
       --out "$dir/calibration.json")
fi
echo "$(date -u +%FT%TZ) all done" >> "$dir/stages.log"
