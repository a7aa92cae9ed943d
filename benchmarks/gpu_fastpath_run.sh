#!/usr/bin/env bash
# The GPU checks of the device-resident block, in order: its GPU tests, the fast-path benchmark,
# then the rest of the GPU tests. Each writes into DIR (default runs/gpu_fastpath).
#   bash benchmarks/gpu_fastpath_run.sh [DIR] [SECTIONS]
set -uo pipefail
dir="${1:-runs/gpu_fastpath}"; sections="${2:-tiny,deep,profile,llama1B,hf,batch}"
mkdir -p "$dir"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$dir/gpu.txt" 2>&1
python -m pytest tests/test_gpu.py -x -rA -k captured > "$dir/pytest_gpu_fused.log" 2>&1
echo "fused GPU tests rc=$?"
python benchmarks/fastpath.py --out "$dir/fastpath.json" --sections "$sections" > "$dir/fastpath.log" 2>&1
echo "fastpath rc=$?"
python -m pytest tests/test_gpu.py -rA -k "not captured" > "$dir/pytest_gpu_rest.log" 2>&1
echo "other GPU tests rc=$?"
