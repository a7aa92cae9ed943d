#!/usr/bin/env bash
# Issue 17 on a machine with >= 2 GPUs (not run yet): the multi-GPU tests, the tensor-parallel speed
# benchmark (Llama-3.1-8B shape, random weights), and a data-parallel sweep of the tiny pair on every
# GPU against the same sweep on one (same cells; wall time). Everything lands in DIR.
#   bash benchmarks/gpu_multigpu_run.sh [DIR]          (default runs/multigpu)
set -uo pipefail
dir="${1:-runs/multigpu}"
mkdir -p "$dir"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
n=$(python -c "import torch; print(torch.cuda.device_count())")
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$dir/gpu.txt" 2>&1
python -m pytest tests/test_multigpu.py -x -rA > "$dir/pytest_multigpu.log" 2>&1
echo "multigpu tests rc=$?"
torchrun --standalone --nproc-per-node 2 benchmarks/tp_speed.py --out "$dir/tp_H200.json" > "$dir/tp_speed.log" 2>&1
echo "tp_speed rc=$? (copy $dir/tp_H200.json to results/multigpu/ once checked)"
grid=(--methods sd,opt,token_v3,token_cascade --temperatures 0 1 --batch-sizes 1 8 --examples 100 --max-new-tokens 64
      --device cuda --quiet)
for w in 1 "$n"; do
  rm -f "$dir/sweep_w$w.jsonl"
  start=$(date +%s)
  python -m speccascade sweep "${grid[@]}" --workers "$w" --out "$dir/sweep_w$w.jsonl" > "$dir/sweep_w$w.log" 2>&1
  echo "sweep --workers $w rc=$? wall=$(( $(date +%s) - start ))s"
done
