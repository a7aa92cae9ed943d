#!/usr/bin/env bash
# ARCHIVED (moved from benchmarks/): the orchestration of the GPU runs behind results/gpu and the
# base-pair sweeps, written for one lent multi-GPU machine (watch loops, detached runs, archives,
# carried wip/ trees). Kept as the record of how those results were produced; the reusable
# measurements are the Python scripts in benchmarks/.
#
# Issues 4 and 5 on one 4-GPU machine (the device tool), in three calls of under 10 minutes each on
# the same warm machine (runs/ persists between them):
#
#   scripts/archive/gpu_base_pair.sh train     GPU0: base drafter, GPU tests, roofline
#                                         GPU1-3: three candidate base verifiers (presets base,
#                                         base_deep, base_wide)
#   scripts/archive/gpu_base_pair.sh sweep1    the best verifier by validation BLEU becomes runs/base/verifier;
#                                         GPU0: test-set evaluation of the pair + head-to-head benchmark
#                                         GPU1-3: sweep workers 1-3
#   scripts/archive/gpu_base_pair.sh sweep2    GPU0-3: sweep workers 0-3 (1-3 resume where they stopped)
#
# Second sweep (session 3), one detached run that outlives the device calls which watch it:
#
#   scripts/archive/gpu_base_pair.sh pipeline  starts it (setsid): GPU0 drafter then GPU tests, GPU1 base
#                                         verifier, GPU2 roofline + kernel profile + GEMV floor, GPU3 the
#                                         1B roofline with inductor's coordinate-descent tuning; then
#                                         sweep workers 0-3 (T = 0, then T = 0.5) into runs/sweep_base_b
#                                         (TEMPS="1" SWEEP_DIR=runs/sweep_base_c: other temperatures, another
#                                         file set; a new set uses the geometric seq_cascade grid)
#   scripts/archive/gpu_base_pair.sh watch S   waits up to S seconds for it, then copies everything it has
#                                         produced so far to $OUT
#
# Third sweep (session 4, when only 2-GPU machines are lent; a machine is held at most 30 minutes):
#
#   scripts/archive/gpu_base_pair.sh pipeline2 GPU0 drafter, then (when a wip/ tree was carried) the GPU
#                                         tests and a backend comparison of that tree; GPU1 verifier;
#                                         then sweep workers 0-1 (WORKER_METHODS_C) at $TEMPS into
#                                         $SWEEP_DIR. Watched with `watch S` as above.
#
# Each sweep worker owns a set of methods and its own JSONL file, with its own verifier_only
# baseline per temperature (relative latency is always against the same worker, same GPU).
# Results and logs go to $OUT. Wheels for sacrebleu (not on the device image) are in .whl.
set -uo pipefail
phase="${1:?train|sweep1|sweep2}"
limit="${2:-500}"
out="${OUT:-/tmp/out}"
cd "$(dirname "$0")/../.."
mkdir -p "$out/logs" runs/base runs/cand runs/sweep_base
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
py=python3

ALPHAS='lossy=0,0.5,0.9;lossy_tuned=0,0.5,0.9;bild_star=0.5,2,6;chow=0.3,0.6,0.9;diff=0,0.15,0.4;opt=0,1,10;chow_log=0.5,1.5,3;diff_log=0,1,2;opt_log=0,1,10;token_v1=0,0.2,0.5;token_v2=0,0.2,0.5;token_v3=0.3,0.6,0.9;token_cascade=0.3,0.6,0.9;seq_cascade=0.5,0.9,0.99;oracle_diff=0,0.15,0.4;bild=1,2,4'
WORKER_METHODS=(
  "token_v1,token_v2,chow_log,diff_log,opt_log"          # worker 0 (second call only)
  "drafter_only,sd,token_v3,opt,seq_cascade"            # worker 1: Table 2's main rows first
  "diff,chow,token_cascade,lossy_tuned"                 # worker 2
  "lossy,bild_star,bild,oracle_diff"                    # worker 3
)

# second sweep: balanced by the first sweep's cell times (about 420-500 s of cells per temperature each)
WORKER_METHODS_B=(
  "token_v1,token_v2,chow_log,diff_log,drafter_only"
  "sd,token_v3,opt,seq_cascade,opt_log"
  "diff,chow,token_cascade,lossy_tuned,oracle_diff"
  "lossy,bild_star,bild"
)

# third sweep, two GPUs: balanced by the first sweep's T = 1 cell times (about 1000 s each)
WORKER_METHODS_C=(
  "sd,token_v3,opt_log,opt,seq_cascade,token_v1,token_v2,chow_log,diff_log,drafter_only"
  "diff,chow,lossy,bild,bild_star,token_cascade,lossy_tuned,oracle_diff"
)

sweep_worker() {  # worker gpu seconds [out dir] [temperatures] [log dir]
  local w=$1 g=$2 secs=$3 dir=${4:-runs/sweep_base} temps=${5:-1 0.5 0} logs=${6:-$out/logs} methods
  if [ "$dir" = runs/sweep_base ]; then methods=${WORKER_METHODS[$w]}; else methods=${WORKER_METHODS_B[$w]}; fi
  [ "${GPUS:-4}" = 2 ] && methods=${WORKER_METHODS_C[$w]}
  # shellcheck disable=SC2086
  CUDA_VISIBLE_DEVICES=$g timeout "$secs" $py -m speccascade.cli sweep \
    --drafter runs/base/drafter --verifier runs/base/verifier --methods "$methods" \
    --alphas "$ALPHAS" --alpha-f 0.5 --examples 500 --gammas 5 --temperatures $temps --max-new-tokens 96 \
    --device cuda --dtype bfloat16 --backend compiled --quiet --out "$dir/worker$w.jsonl" \
    >> "$logs/sweep_worker$w.log" 2>&1
  [ "$dir" = runs/sweep_base ] && cp "$dir/worker$w.jsonl" "$out/" 2>/dev/null
  return 0
}

export TEMPS="${TEMPS:-0 0.5}" SWEEP_DIR="${SWEEP_DIR:-runs/sweep_base_b}"
if [ "$SWEEP_DIR" != runs/sweep_base_b ]; then  # eq. (1)'s raw response probability is far below 0.01
  ALPHAS="${ALPHAS/seq_cascade=0.5,0.9,0.99/seq_cascade=0.999999,0.999999999999,0.999999999999999}"
fi

wait_for() { while [ ! -e "$1" ]; do sleep 5; done; }

start_detached() {  # phase: run it outside this call (setsid), logging to runs/pipe/logs
  rm -rf runs/pipe && mkdir -p runs/pipe/logs runs/pipe/out "$SWEEP_DIR"
  setsid nohup bash "$0" "$1" > runs/pipe/logs/pipeline.log 2>&1 < /dev/null &
  sleep 2
  echo "$1 started: $(cat runs/pipe/logs/pipeline.log)"
}

train_role() {  # role gpu seconds: train runs/base/ROLE, then mark it done
  CUDA_VISIBLE_DEVICES=$2 timeout "$3" $py -m speccascade.cli train --preset base --role "$1" \
    --out "runs/base/$1" --device cuda > "runs/pipe/logs/train_$1.log" 2>&1
  touch "runs/pipe/$1.done"
}

case "$phase" in
pipeline)
  start_detached _pipeline
  ;;
_pipeline)
  L=runs/pipe/logs O=runs/pipe/out
  (
    train_role drafter 0 400
    CUDA_VISIBLE_DEVICES=0 timeout 240 $py -m pytest -p no:cacheprovider tests/test_gpu.py > $L/pytest_gpu.log 2>&1
    wait_for runs/pipe/verifier.done
    sweep_worker 0 0 2400 "$SWEEP_DIR" "$TEMPS" $L
    CUDA_VISIBLE_DEVICES=0 timeout 300 $py benchmarks/train_pair.py --preset base --roles "" --out runs/base \
      --device cuda > $L/pair_eval.log 2>&1
    cp runs/base/pair.json $O/pair.json
  ) &
  (
    train_role verifier 1 600
    wait_for runs/pipe/drafter.done
    sweep_worker 1 1 2400 "$SWEEP_DIR" "$TEMPS" $L
  ) &
  (
    CUDA_VISIBLE_DEVICES=2 timeout 420 $py benchmarks/gpu_speed.py --pair-dir runs/base --skip-h2h \
      --out $O/roofline.json > $L/roofline.log 2>&1
    wait_for runs/pipe/verifier.done; wait_for runs/pipe/drafter.done
    sweep_worker 2 2 2400 "$SWEEP_DIR" "$TEMPS" $L
  ) &
  (
    CUDA_VISIBLE_DEVICES=3 timeout 420 $py benchmarks/gpu_speed.py --pair-dir runs/base --skip-h2h \
      --shapes llama_1B --roofline-kinds static+compile --skip-hf --inductor coordinate_descent_tuning=1 \
      --out $O/roofline_cdt.json > $L/roofline_cdt.log 2>&1
    wait_for runs/pipe/verifier.done; wait_for runs/pipe/drafter.done
    sweep_worker 3 3 2400 "$SWEEP_DIR" "$TEMPS" $L
  ) &
  wait
  touch runs/pipe/all.done
  ;;
pipeline2)
  start_detached _pipeline2
  ;;
_pipeline2)
  L=runs/pipe/logs O=runs/pipe/out GPUS=2
  (
    train_role drafter 0 400
    if [ -d wip ]; then  # an unmerged tree (e.g. the graphs backend): its GPU tests, then its speed
      [ -e wip/src/speccascade/assets ] || ln -s "$PWD/src/speccascade/assets" wip/src/speccascade/assets
      ( cd wip && CUDA_VISIBLE_DEVICES=0 PYTHONPATH="$PWD/src:${PYTHONPATH#*:}" timeout 200 $py -m pytest -rA \
          --durations=0 -p no:cacheprovider tests/test_gpu.py ) > $L/wip_pytest_gpu.log 2>&1
      ( cd wip && CUDA_VISIBLE_DEVICES=0 PYTHONPATH="$PWD/src:${PYTHONPATH#*:}" timeout 150 $py benchmarks/gpu_speed.py \
          --pair-dir src/speccascade/assets/models/tiny --shapes base_verifier_29M \
          --roofline-kinds static+compile,graphs --skip-hf --kinds static+compile,graphs --scaling-batches "" \
          --out ../$O/wip_speed.json ) > $L/wip_speed.log 2>&1
    fi
    wait_for runs/pipe/verifier.done
    sweep_worker 0 0 2400 "$SWEEP_DIR" "$TEMPS" $L
  ) &
  (
    train_role verifier 1 600
    wait_for runs/pipe/drafter.done
    sweep_worker 1 1 2400 "$SWEEP_DIR" "$TEMPS" $L
  ) &
  wait
  touch runs/pipe/all.done
  ;;
watch)
  t0=$(date +%s)
  while [ ! -e runs/pipe/all.done ] && [ $(($(date +%s) - t0)) -lt "$limit" ]; do sleep 10; done
  cp "$SWEEP_DIR"/*.jsonl "$out/" 2>/dev/null  # everything else in one archive (few files come back per call)
  for f in "$SWEEP_DIR"/*.jsonl; do echo "$f: $(grep -c '"type": "cell"' "$f") cells"; done
  (cd runs && tar czf "$out/pipe.tgz" pipe "${SWEEP_DIR#runs/}" base/drafter/training.json base/verifier/training.json 2>/dev/null)
  ls runs/pipe
  tail -n 2 runs/pipe/logs/*.log
  exit 0
  ;;
train)
  (
    CUDA_VISIBLE_DEVICES=0 timeout "$limit" $py -m speccascade.cli train --preset base --role drafter \
      --out runs/base/drafter --device cuda > "$out/logs/train_drafter.log" 2>&1
    cp runs/base/drafter/training.json "$out/drafter_training.json"
    CUDA_VISIBLE_DEVICES=0 timeout 170 $py -m pytest -p no:cacheprovider tests/test_gpu.py > "$out/logs/pytest_gpu.log" 2>&1
    CUDA_VISIBLE_DEVICES=0 timeout 230 $py benchmarks/gpu_speed.py --pair-dir runs/base --skip-h2h \
      --out "$out/roofline.json" > "$out/logs/roofline.log" 2>&1
  ) &
  presets=(base base_deep base_wide)
  for i in 1 2 3; do
    p=${presets[$((i - 1))]}
    ( CUDA_VISIBLE_DEVICES=$i timeout "$limit" $py -m speccascade.cli train --preset "$p" --role verifier \
        --out "runs/cand/$p" --device cuda > "$out/logs/train_$p.log" 2>&1
      cp "runs/cand/$p/training.json" "$out/${p}_verifier_training.json" ) &
  done
  wait
  ;;
sweep1)
  $py - <<'EOF' > "$out/choice.json"
import json, pathlib, shutil
logs = {p.parent.name: json.loads(p.read_text()) for p in pathlib.Path("runs/cand").glob("*/training.json")}
bleu = {k: v.get("validation_bleu", {}).get("bleu", -1) for k, v in logs.items()}
best = max(bleu, key=bleu.get)
dst = pathlib.Path("runs/base/verifier")
if dst.exists():
    shutil.rmtree(dst)
shutil.copytree(pathlib.Path("runs/cand") / best, dst)
print(json.dumps({"validation_bleu": bleu, "chosen": best}))
EOF
  cat "$out/choice.json"
  (
    CUDA_VISIBLE_DEVICES=0 timeout 200 $py benchmarks/train_pair.py --preset base --roles "" --out runs/base \
      --device cuda > "$out/logs/pair_eval.log" 2>&1
    cp runs/base/pair.json "$out/pair.json"
    CUDA_VISIBLE_DEVICES=0 timeout $((limit - 200)) $py benchmarks/gpu_speed.py --pair-dir runs/base --skip-roofline \
      --kinds dynamic,static+compile --out "$out/h2h.json" > "$out/logs/h2h.log" 2>&1
  ) &
  for w in 1 2 3; do sweep_worker $w $w "$limit" & done
  wait
  ;;
sweep2)
  for w in 0 1 2 3; do sweep_worker $w $w "$limit" & done
  wait
  ;;
esac
tail -n 3 "$out"/logs/*.log
ls -la "$out"
