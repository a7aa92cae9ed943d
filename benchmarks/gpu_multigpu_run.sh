#!/usr/bin/env bash
# Issue 17 on a machine with >= 2 GPUs. Steps (each with its own log in DIR and its own time limit;
# a step that fails or times out is reported and the next one runs):
#   smoke                               a minute's check that the fused backend's all-reduces compile and
#                                       capture on 2 GPUs: tp_speed at tiny shapes (2 layers, hidden 256),
#                                       tp 1 and tp 2, batch 1 (DIR/smoke_tp<N>.json / .log)
#   fused_tp1 fused_tp2 hf_tp1 hf_tp2   benchmarks/tp_speed.py stages: verifier_only and sd tokens/s at
#                                       batch 1 and 16, Llama-3.1-8B shape, random weights, bf16; fused =
#                                       the engine's fast path (sharded fused backend, all-reduces inside
#                                       the captured block), hf = transformers' tp_plan (the reference).
#                                       One launch per batch size (DIR/<stage>_b<batch>.json / .log); a
#                                       step such as fused_tp2_b1 runs one batch size alone
#   merge                               the stages into DIR/tp_H200.json (ratios; the target: fused tp2 >
#                                       fused tp1 at batch 1)
#   tests                               tests/test_multigpu.py and tests/test_tp_fused.py (the GPU ones run,
#                                       among them the exact law through the sharded verifier)
#   allreduce                           one all-reduce's cost inside a CUDA graph, NCCL vs a one-shot over
#                                       symmetric memory (benchmarks/allreduce_latency.py; DIR/allreduce_latency.json)
#   agreement                           greedy --tp 2 vs --tp 1 on the trained tiny pair in float32:
#                                       benchmarks/tp_greedy_agreement.py (DIR/tp_greedy_agreement.json)
#   sweeps                              a data-parallel sweep of the tiny pair on every GPU vs on one
#                                       (fused backend, 500 examples, warm compile caches; SWEEP_EXAMPLES,
#                                       SWEEP_WORKERS="1 2", SWEEP_DEVICE=cpu for a rehearsal): DIR/sweep_walls.json
#
#   bash benchmarks/gpu_multigpu_run.sh [DIR] [STEPS]     (default runs/multigpu, every step in the order above)
#   bash benchmarks/gpu_multigpu_run.sh runs/multigpu "fused_tp1 fused_tp2 merge"   # the headline numbers only
#   bash benchmarks/gpu_multigpu_run.sh runs/multigpu "fused_tp2_b16 merge"         # one launch (batch 16)
# Environment: PYTHON (default: python, else python3), STAGE_TIMEOUT (seconds per tp_speed launch,
# default 540: one launch fits a 10-minute command), BATCHES (default "1 16"), TP_SPEED_ARGS (extra
# arguments to every launch, e.g. "--device cpu --tiny --layers 2 --new-tokens 8 --repeats 1" for a CPU
# rehearsal), PYTEST_K (the tests step's -k filter; default "two_gpus or gpu_": the 4 tests that need the GPUs,
# the others run in CI; PYTEST_K= runs both files whole), TESTS_TIMEOUT (the tests step's limit in seconds, default 1200).
# NVLink multicast stays off.
set -uo pipefail
dir="${1:-runs/multigpu}"
steps="${2:-smoke fused_tp1 fused_tp2 hf_tp1 hf_tp2 merge allreduce tests agreement sweeps}"
mkdir -p "$dir"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}" TORCH_SYMM_MEM_DISABLE_MULTICAST="${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}" \
  NVSHMEM_DISABLE_NVLS="${NVSHMEM_DISABLE_NVLS:-1}"
py="${PYTHON:-$(command -v python || command -v python3)}"   # the device image has python3 only
limit="${STAGE_TIMEOUT:-540}"
batches="${BATCHES:-1 16}"
read -r -a extra <<< "${TP_SPEED_ARGS:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$dir/gpu.txt" 2>&1
nvidia-smi topo -m >> "$dir/gpu.txt" 2>&1
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())" \
  >> "$dir/gpu.txt" 2>&1

stage() {  # stage BACKEND TP BATCH
  local name="$1_tp$2_b$3" start rc
  start=$(date +%s)
  timeout --signal=TERM --kill-after=30 "$limit" "$py" -m torch.distributed.run --standalone --nproc-per-node "$2" benchmarks/tp_speed.py \
    --backend "$1" --tp "$2" --batch-sizes "$3" --out "$dir/$name.json" "${extra[@]}" > "$dir/$name.log" 2>&1
  rc=$?
  echo "tp_speed $name rc=$rc wall=$(( $(date +%s) - start ))s cells_failed=$(grep -c '"error"' "$dir/$name.log")" \
    "(log $dir/$name.log)"
}

for step in $steps; do
  case "$step" in
    smoke)
      for t in 1 2; do
        start=$(date +%s)
        timeout --signal=TERM --kill-after=30 300 "$py" -m torch.distributed.run --standalone --nproc-per-node "$t" benchmarks/tp_speed.py \
          --backend fused --tp "$t" --tiny --layers 2 --new-tokens 16 --prompt-tokens 16 --repeats 1 --batch-sizes 1 \
          --out "$dir/smoke_tp$t.json" "${extra[@]}" > "$dir/smoke_tp$t.log" 2>&1
        echo "smoke tp$t rc=$? wall=$(( $(date +%s) - start ))s cells_failed=$(grep -c '"error"' "$dir/smoke_tp$t.log")" \
          "(log $dir/smoke_tp$t.log)"
      done ;;
    fused_tp[0-9]*|hf_tp[0-9]*)
      backend="${step%%_tp*}" rest="${step#*_tp}"
      tp="${rest%%_b*}"
      if [[ "$rest" == *_b* ]]; then for_batches="${rest#*_b}"; else for_batches="$batches"; fi
      for b in $for_batches; do stage "$backend" "$tp" "$b"; done ;;
    merge)
      "$py" benchmarks/tp_speed.py --merge "$dir"/fused_tp*_b*.json "$dir"/hf_tp*_b*.json "$dir"/sweep_walls.json \
        --out "$dir/tp_H200.json" > "$dir/merge.log" 2>&1
      echo "merge rc=$? (copy $dir/tp_H200.json to results/multigpu/ once checked)"
      cat "$dir/merge.log" ;;
    tests)
      k_filter="${PYTEST_K-two_gpus or gpu_}"
      timeout "${TESTS_TIMEOUT:-1200}" "$py" -m pytest tests/test_multigpu.py tests/test_tp_fused.py -rA ${k_filter:+-k "$k_filter"} \
        > "$dir/pytest_multigpu.log" 2>&1
      echo "multigpu tests rc=$?" ;;
    allreduce)
      timeout 300 "$py" -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/allreduce_latency.py \
        --out "$dir/allreduce_latency.json" > "$dir/allreduce.log" 2>&1
      echo "allreduce rc=$?"
      grep '^{' "$dir/allreduce.log" ;;
    agreement)
      timeout 600 "$py" -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/tp_greedy_agreement.py \
        --out "$dir/tp_greedy_agreement.json" > "$dir/agreement.log" 2>&1
      echo "agreement rc=$? (copy $dir/tp_greedy_agreement.json to results/multigpu/ once checked)"
      grep -E "^(verifier_only|sd) " "$dir/agreement.log" ;;
    sweeps)
      # the same grid on 1 worker and on every GPU, both timed with warm compile caches (an untimed
      # --warm-up-only pass compiles and captures every shape first), so the walls compare the sweeps
      n=$("$py" -c "import torch; print(torch.cuda.device_count())")
      grid=(--methods sd,opt,token_v3 --alphas "opt=0,1;token_v3=0.4,0.9" --temperatures 0 1 --batch-sizes 1
            --examples "${SWEEP_EXAMPLES:-500}" --max-new-tokens 64 --backend fused --device "${SWEEP_DEVICE:-cuda}" --quiet)
      start=$(date +%s)
      timeout 900 "$py" -m speccascade sweep "${grid[@]}" --warm-up-only > "$dir/sweep_warm_up.log" 2>&1
      echo "sweep --warm-up-only rc=$? wall=$(( $(date +%s) - start ))s"
      walls=()
      for w in ${SWEEP_WORKERS:-1 $n}; do
        rm -rf "$dir/sweep_w$w.jsonl" "$dir/sweep_w$w.jsonl.parts"
        start=$(date +%s.%N)
        timeout 1800 "$py" -m speccascade sweep "${grid[@]}" --workers "$w" --out "$dir/sweep_w$w.jsonl" \
          > "$dir/sweep_w$w.log" 2>&1
        rc=$?
        wall=$("$py" -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$start" "$(date +%s.%N)")
        echo "sweep --workers $w rc=$rc wall=${wall}s"
        walls+=("{\"workers\": $w, \"rc\": $rc, \"wall_s\": $wall}")
      done
      # the merge step puts these walls into tp_H200.json
      gs="${grid[*]}"
      (IFS=,; echo "{\"benchmark\": \"sweep_walls\", \"grid\": \"${gs//\"/}\", \"runs\": [${walls[*]}]}") \
        > "$dir/sweep_walls.json"
      cat "$dir/sweep_walls.json" ;;
    *) echo "unknown step $step (steps: smoke fused_tp1 fused_tp2 hf_tp1 hf_tp2 [each with _b<batch>] merge allreduce" \
            "tests agreement sweeps)" ;;
  esac
done
