#!/usr/bin/env bash
# Issue 16 (not run on a GPU yet): train the T5 pair (preset t5: a 2+2-layer drafter, a 6+6-layer
# verifier), measure it on the test split (DIR/pair.json), sweep every method at T = 0 and T = 1 on
# 500 test examples, and report. Everything lands in DIR: the checkpoints (DIR/drafter, DIR/verifier),
# pair.json, sweep.jsonl, report/, one log per step and run.log (each step's command, exit status and
# seconds). The sweep runs the fused T5 backend (models/fused_t5.py: the encoder once per request, our
# compiled decoder step, the whole speculative block one CUDA graph); BACKEND=seq2seq runs the eager
# seq2seq backend instead (hours at eager speed). On a CPU the fused backend runs eagerly.
#   bash benchmarks/gpu_t5_pair_run.sh [DIR]            (default runs/t5_pair)
# It runs longer than one short device call (training alone is up to 5 + 8 minutes): start it with
#   scripts/detached.sh start runs/t5_detached bash benchmarks/gpu_t5_pair_run.sh runs/t5_pair
# and poll with scripts/detached.sh wait runs/t5_detached 540. Re-running it resumes the sweep (the
# pair is not retrained when DIR/pair.json exists; delete it to retrain).
# Settings (environment; the defaults are the GPU run's):
#   PRESET=t5  DEVICE=cuda  DTYPE=bfloat16  EPOCHS= MINUTES= (the preset's)  TEST_PAIRS=1000
#   EXAMPLES=500  TEMPERATURES="0 1"  METHODS=all  MAX_NEW_TOKENS=128  WORKERS=GPUS (one sweep worker per GPU)
#   GPUS=1 (2: the drafter and the verifier train at once, one GPU each, and the sweep has 2 workers)
#   BACKEND=fused (or seq2seq, auto)
#   SWEEP_ARGS= (more sweep arguments, e.g. "--alphas ...")
# CPU rehearsal (about 12 minutes on two busy cores, most of it the two trainings and their BLEU):
#   PRESET=t5_tiny DEVICE=cpu DTYPE=float32 MINUTES=0.5 TEST_PAIRS=8 EXAMPLES=3 MAX_NEW_TOKENS=16 \
#     bash benchmarks/gpu_t5_pair_run.sh /tmp/t5_rehearsal
set -uo pipefail
dir="${1:-runs/t5_pair}"
preset="${PRESET:-t5}"; device="${DEVICE:-cuda}"; dtype="${DTYPE:-bfloat16}"
mkdir -p "$dir"
root="$(cd "$(dirname "$0")/.." && pwd)"
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
git -C "$root" rev-parse HEAD >> "$dir/versions.txt" 2>/dev/null

if [ ! -f "$dir/pair.json" ]; then
  budget=(); [ -n "${EPOCHS:-}" ] && budget+=(--epochs "$EPOCHS"); [ -n "${MINUTES:-}" ] && budget+=(--minutes "$MINUTES")
  if [ "${GPUS:-1}" -ge 2 ]; then   # the two models do not depend on each other: one GPU each, at once
    for r in 0 1; do
      role=$([ $r = 0 ] && echo drafter || echo verifier)
      (export CUDA_VISIBLE_DEVICES=$r; step "train_$role" python -m speccascade train --arch t5 --preset "$preset" \
         --role "$role" --out "$dir/$role" --device "$device" "${budget[@]}") &
    done
    wait || true
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
python - "$dir/pair.json" <<'EOF' | tee -a "$dir/run.log"
import json, sys
r = json.load(open(sys.argv[1]))
print({k: r[k] for k in ("preset", "arch", "verifier_params", "drafter_params", "verifier_test_bleu_greedy",
                         "verifier_test_bleu_T1", "drafter_test_bleu_greedy", "drafter_test_bleu_T1",
                         "sd_acceptance_T1")})
EOF

# shellcheck disable=SC2206
sweep=(python -m speccascade sweep --drafter "$dir/drafter" --verifier "$dir/verifier" --methods "${METHODS:-all}"
       --temperatures ${TEMPERATURES:-0 1} --examples "${EXAMPLES:-500}" --max-new-tokens "${MAX_NEW_TOKENS:-128}"
       --device "$device" --dtype "$dtype" --backend "${BACKEND:-fused}" --workers "${WORKERS:-${GPUS:-1}}" --out "$dir/sweep.jsonl"
       --quiet ${SWEEP_ARGS:-})
step sweep "${sweep[@]}" || { echo "sweep failed: see $dir/sweep.log"; exit 1; }
step report python -m speccascade report "$dir/sweep.jsonl" --out "$dir/report" \
  || { echo "report failed: see $dir/report.log"; exit 1; }
echo "done: $dir/pair.json, $dir/sweep.jsonl, $dir/report"
