#!/usr/bin/env bash
# The issue-4 reproduction on the embedded tiny pair, on CPU cores: one worker per core, each pinned
# to one core and one torch thread, each with its own verifier_only baseline in its own JSONL file
# (relative latency is always measured against the baseline of the same worker). Resumable: run
# it again with the same OUT and each worker skips the cells it has.
#   benchmarks/sweep_tiny_cpu.sh OUT_DIR [WORKERS] [SECONDS]
set -uo pipefail
out="${1:?output folder}"; workers="${2:-16}"; limit="${3:-540}"
mkdir -p "$out"
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)/src${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
ALPHAS='lossy=0,0.3,0.6,0.9;lossy_tuned=0,0.3,0.6,0.9;bild_star=0.5,1.5,3,6;chow=0,0.3,0.6,0.9;diff=-1,0,0.15,0.4;opt=-10,0,1,10;chow_log=0.5,1.5,3,5;diff_log=-1,0,1,2;opt_log=-10,0,1,10;token_v1=-1,0,0.2,0.5;token_v2=-1,0,0.2,0.5;token_v3=0,0.3,0.6,0.9;token_cascade=0,0.3,0.6,0.9;seq_cascade=0,0.9,0.99,1;oracle_diff=-1,0,0.15,0.4;bild=0,1,2,4'
methods=(drafter_only,sd token_v3 opt diff chow token_cascade lossy lossy_tuned bild_star seq_cascade oracle_diff bild token_v1 token_v2 chow_log diff_log opt_log)
for ((i = 0; i < workers; i++)); do
  mine=""
  for ((j = i; j < ${#methods[@]}; j += workers)); do mine="${mine:+$mine,}${methods[$j]}"; done
  [ -z "$mine" ] && continue
  taskset -c "$i" timeout "$limit" python3 -m speccascade.cli sweep --pair tiny --methods "$mine" --alphas "$ALPHAS" \
    --alpha-f 0.5 --examples 200 --gammas 5 --temperatures 1 --max-new-tokens 96 --threads 1 --quiet \
    --out "$out/worker$i.jsonl" > "$out/worker$i.log" 2>&1 &
done
wait
grep -c '"type": "cell"' "$out"/worker*.jsonl   # report them together: speccascade report "$out"/*.jsonl
