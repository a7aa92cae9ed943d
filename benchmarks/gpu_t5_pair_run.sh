#!/usr/bin/env bash
# Issue 16: train the T5 pair (preset t5: a 2+2-layer drafter, a 6+6-layer verifier), measure it on the
# test split (DIR/pair.json), sweep every method at T = 0 and T = 1 on 500 test examples, and report.
# Everything lands in DIR: the checkpoints (DIR/drafter, DIR/verifier), pair.json, sweep.jsonl, report/,
# one log per step and run.log (each step's command, exit status and seconds). The sweep runs the fused
# T5 backend (models/fused_t5.py: the encoder once per request, our compiled decoder step, the whole
# speculative block one CUDA graph) in float32, so greedy sd is the verifier's own greedy output;
# BACKEND=seq2seq runs the eager seq2seq backend instead (hours at eager speed). On a CPU the fused
# backend runs eagerly.
#   bash benchmarks/gpu_t5_pair_run.sh [DIR]            (default runs/t5_pair)
# It runs longer than one device call: start it with
#   bash benchmarks/gpu_session.sh start t5_pair 150 bash benchmarks/gpu_t5_pair_run.sh runs/t5_pair
# and poll with bash benchmarks/gpu_session.sh wait t5_pair 540. Re-running it resumes the sweep (the
# pair is not retrained when DIR/pair.json exists; delete it to retrain).
# The two models do not depend on each other and train at once: one GPU each with GPUS=2, both on the
# one GPU otherwise (a training step of models this small leaves most of an H200 idle), while the GPU
# smoke test of the fused T5 path runs beside them (DIR/gpu_smoke.log). The sweep then runs Table 2's
# methods at both temperatures first, then the others, 3 alphas each (ALPHAS below), one worker per GPU.
# Settings (environment; the defaults are the GPU run's):
#   PRESET=t5  DEVICE=cuda  DTYPE=float32 (the sweep's)  EPOCHS= MINUTES= (the preset's: 5 and 8)
#   TEST_PAIRS=1000  EXAMPLES=500  TEMPERATURES="0 1"  METHODS=all  MAX_NEW_TOKENS=128
#   GPUS=1  WORKERS=GPUS (sweep workers)  TRAIN_TOGETHER=1 (0: one model after the other on one GPU)
#   BACKEND=fused (or seq2seq, auto)  SKIP_TESTS=0  TRAIN_ONLY=0 (1: stop once the pair is trained; run again to sweep)  ALPHAS= (a grid "method=a,b;method=..."; default below)
#   SWEEP_ARGS= (more sweep arguments)
# CPU rehearsal (2 minutes on two cores, most of it the two trainings and their BLEU):
#   PRESET=t5_tiny DEVICE=cpu MINUTES=0.2 TEST_PAIRS=4 EXAMPLES=2 MAX_NEW_TOKENS=8 \
#     METHODS=verifier_only,sd,diff,seq_cascade,token_v1 bash benchmarks/gpu_t5_pair_run.sh /tmp/t5r
# On a share of a bigger machine, give the GPUs: CUDA_VISIBLE_DEVICES=2,3 GPUS=2 bash benchmarks/gpu_t5_pair_run.sh
# Run 1 (one H200, MINUTES=7): results/t5_pair/NOTE.md.
set -uo pipefail
dir="${1:-runs/t5_pair}"
preset="${PRESET:-t5}"; device="${DEVICE:-cuda}"; dtype="${DTYPE:-float32}"; gpus="${GPUS:-1}"
mkdir -p "$dir"
root="$(cd "$(dirname "$0")/.." && pwd)"
source "$root/scripts/gpus.sh"   # gpu_id N: the N-th of the GPUs this script was given
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

step() {  # step NAME CMD...: run CMD with its output in DIR/NAME.log; its status and time in DIR/run.log
  local name="$1" start rc; shift
  start=$(date +%s)
  echo "$(date -u +%FT%TZ) $name: $*" >> "$dir/run.log"
  "$@" > "$dir/$name.log" 2>&1
  rc=$?
  echo "$(date -u +%FT%TZ) $name rc=$rc $(( $(date +%s) - start ))s" | tee -a "$dir/run.log"
  return $rc
}

if [ "$device" != cpu ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$dir/gpu.txt" 2>&1
fi
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  > "$dir/versions.txt" 2>&1
git -C "$root" rev-parse HEAD >> "$dir/versions.txt" 2>/dev/null   # can be stale on the device: code.sha1 is the files
(source "$root/scripts/parts.sh"; code_hash > "$dir/code.sha1")

# the GPU smoke test of the fused T5 path, beside the training (read it in the first device call's output)
if [ "$device" = cuda ] && [ "${SKIP_TESTS:-0}" != 1 ]; then
  (export CUDA_VISIBLE_DEVICES=$(gpu_id $((gpus - 1))); step gpu_smoke python -m pytest "$root/tests/test_gpu.py" -x -q \
     -p no:cacheprovider -k "fused_t5 or captured_greedy") &
  smoke_pid=$!
fi
if [ ! -f "$dir/pair.json" ]; then
  budget=(); [ -n "${EPOCHS:-}" ] && budget+=(--epochs "$EPOCHS"); [ -n "${MINUTES:-}" ] && budget+=(--minutes "$MINUTES")
  if [ "$gpus" -ge 2 ] || [ "${TRAIN_TOGETHER:-1}" = 1 ]; then   # independent models: at once, a GPU each if there are 2
    for r in 0 1; do
      role=$([ $r = 0 ] && echo drafter || echo verifier)
      (export CUDA_VISIBLE_DEVICES=$(gpu_id $((r % gpus))); [ "$device" = cpu ] && unset CUDA_VISIBLE_DEVICES
       step "train_$role" python -m speccascade train --arch t5 --preset "$preset" \
         --role "$role" --out "$dir/$role" --device "$device" "${budget[@]}") &
    done
    wait $(jobs -p | grep -vx "${smoke_pid:-none}") 2>/dev/null || true
    [ -f "$dir/drafter/training.json" ] && [ -f "$dir/verifier/training.json" ] \
      || { echo "training failed: see $dir/train_*.log"; exit 1; }
    roles=""
  else
    roles="drafter,verifier"
  fi
  step train_pair python "$root/benchmarks/train_pair.py" --arch t5 --preset "$preset" --out "$dir" --device "$device" \
       --test-pairs "${TEST_PAIRS:-1000}" --roles "$roles" "${budget[@]}" \
    || { echo "training failed: see $dir/train_pair.log"; exit 1; }
fi
[ -n "${smoke_pid:-}" ] && wait "$smoke_pid"
[ "${TRAIN_ONLY:-0}" = 1 ] && { echo "trained: $dir/pair.json (TRAIN_ONLY=1: no sweep)"; exit 0; }
python - "$dir/pair.json" <<'EOF' | tee -a "$dir/run.log"
import json, sys
r = json.load(open(sys.argv[1]))
print({k: r[k] for k in ("preset", "arch", "verifier_params", "drafter_params", "verifier_test_bleu_greedy",
                         "verifier_test_bleu_T1", "drafter_test_bleu_greedy", "drafter_test_bleu_T1",
                         "sd_acceptance_T1")})
EOF

# 3 alphas a method, from the SD end of its rule to the drafter end
ALPHAS="${ALPHAS:-lossy=0.05,0.3,0.8;lossy_tuned=0.05,0.3,0.8;bild_star=1,3,8;chow=0.2,0.6,0.9;diff=-0.2,0,0.2}"
ALPHAS+=";opt=-1,0,1;chow_log=0.5,2,5;diff_log=-1,0.5,2;opt_log=-1,0,3;token_v1=-0.2,0.1,0.5;token_v2=-0.2,0.1,0.3"
ALPHAS+=";token_v3=0.2,0.5,0.9;token_cascade=0.2,0.6,0.9;seq_cascade=0.3,0.6,0.9;oracle_diff=-0.2,0.1,0.4;bild=1,2,4"
methods="${METHODS:-all}"
[ "$methods" = all ] && methods=$(python -c "from speccascade.registry import METHODS; print(','.join(METHODS))")
alphas_for() {  # alphas_for METHODS: the grids of these methods
  local out="" part; IFS=';' read -ra parts <<< "$ALPHAS"
  for part in "${parts[@]}"; do [[ ",$1," == *",${part%%=*},"* ]] && out+="${out:+;}$part"; done
  echo "$out"
}
FIRST="verifier_only,drafter_only,sd,lossy,bild_star,chow,diff,opt,opt_log,token_v3"   # Table 2's, first
first=$(echo "$methods" | tr , '\n' | grep -xF -f <(echo "$FIRST" | tr , '\n') | paste -sd,)
rest=$(echo "$methods" | tr , '\n' | grep -vxF -f <(echo "$FIRST" | tr , '\n') | paste -sd,)
sweep_part() {  # sweep_part NAME METHODS: their cells at every temperature into DIR/sweep.jsonl
  [ -n "$2" ] || return 0
  local opt=(); [[ ",$2," == *",seq_cascade,"* ]] && opt=(--option seq_cascade.length_normalized=true)
  local grid; grid=$(alphas_for "$2")
  # shellcheck disable=SC2206
  step "$1" python -m speccascade sweep --drafter "$dir/drafter" --verifier "$dir/verifier" --methods "$2" \
       ${grid:+--alphas "$grid"} "${opt[@]}" --temperatures ${TEMPERATURES:-0 1} --examples "${EXAMPLES:-500}" \
       --max-new-tokens "${MAX_NEW_TOKENS:-128}" --device "$device" --dtype "$dtype" --backend "${BACKEND:-fused}" \
       --workers "${WORKERS:-$gpus}" --out "$dir/sweep.jsonl" --quiet ${SWEEP_ARGS:-}
}
sweep_part sweep "$first" || { echo "sweep failed: see $dir/sweep.log"; exit 1; }
sweep_part sweep_rest "$rest" || { echo "sweep failed: see $dir/sweep_rest.log"; exit 1; }
step report python -m speccascade report "$dir/sweep.jsonl" --out "$dir/report" \
  || { echo "report failed: see $dir/report.log"; exit 1; }
echo "done: $dir/pair.json, $dir/sweep.jsonl, $dir/report"
