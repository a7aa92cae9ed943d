#!/usr/bin/env bash
# The committed record of a deep pair run (benchmarks/gpu_deep_pair_run.sh's DIR, as unpacked from
# benchmarks/gpu_session.sh's tarball) in DEST, as results/deep_pair/run*/ keep it:
#   bash benchmarks/record_deep_run.sh runs/deep15 results/deep_pair/run15
# * the run's small files as they are: code.sha1, commit.txt, gpu.txt, stages.log, feature_drafter.json,
#   feature_drafter_trained.json (`train --features`' drafter measured offline, where the run has it),
#   block_arithmetic.json (ARITHMETIC=1), calibration.json (CALIBRATION=1);
# * pair.json without the hypotheses (BLEU and chrF per role and temperature stay), with the feature
#   drafters' keys from feature_drafter.json and feature_drafter_trained.json (`feature_drafters`; the
#   trainer's one as `train_features`) and the feature sweep's drafter id;
# * each sweep (sweep.jsonl, sweep_features.jsonl, sweep_features_gammas.jsonl: the feature drafter's
#   `sd` at other block sizes, where a run has it) gzipped, its `speccascade report` summaries
#   (report/, report_features/: summary.json and summary.md only, not the plots) and its
#   benchmarks/sd_speedup_analysis.py record (analysis.json, analysis_features.json);
# * logs/: every stage's log without progress bars and weight-loading lines (the GPU tests' log: its
#   PASSED / FAILED / ERROR lines and its summary), and each trained model's training.json.
# What it does not write: NOTE.md, the run's account, which a person writes from these.
set -euo pipefail
src="${1:?run directory}"; dest="${2:?destination, e.g. results/deep_pair/run15}"
py="${PYTHON:-python}"
[ -f "$src/stages.log" ] || { echo "$src has no stages.log: not a run of gpu_deep_pair_run.sh" >&2; exit 2; }
mkdir -p "$dest/logs"
for f in code.sha1 commit.txt gpu.txt stages.log feature_drafter.json feature_drafter_trained.json block_arithmetic.json calibration.json; do
  [ -f "$src/$f" ] && cp "$src/$f" "$dest/"
done
if [ -f "$src/pair.json" ]; then
  "$py" - "$src/pair.json" "$dest/pair.json" "$src/feature_drafter.json" "$src/feature_drafter_trained.json" \
      "$src/sweep_features.jsonl" <<'EOF'
import json, os, sys
pair = json.load(open(sys.argv[1]))
for role in pair.get("test", {}).values():
    role.pop("hypotheses", None)

def keys(params: int, measured: dict, source: str) -> dict:
    """The pair's keys for one feature drafter, from benchmarks/feature_drafter.py's measurement."""
    return {"drafter_params": params,
            "sd_acceptance_T1": measured["teacher_forced"]["acceptance_T1"],
            "top1_agreement": measured["teacher_forced"]["top1_agreement"],
            "block_T0_mean_accepted": measured.get("block_T0", {}).get("mean_accepted"),
            "drafter_test_bleu": "none: it reads the verifier's states, so it does not translate alone",
            "source": f"{source} (benchmarks/feature_drafter.py, teacher-forced on its test verses)"}

drafters = {}  # the feature drafters beside the token drafter: the benchmark's, and `train --features`' one
if os.path.exists(sys.argv[3]):
    bench = json.load(open(sys.argv[3]))
    drafters |= {name: keys(r["parameters"], r["trained"], "feature_drafter.json")
                 for name, r in bench.get("results", {}).items()}
if os.path.exists(sys.argv[4]):
    ref = json.load(open(sys.argv[4]))["reference_drafter"]
    drafters["train_features"] = keys(ref["parameters"], ref, "feature_drafter_trained.json")
if drafters:
    pair["feature_drafters"] = drafters
if os.path.exists(sys.argv[5]):  # which one the feature sweep ran (its weights fingerprint)
    for line in open(sys.argv[5]):
        row = json.loads(line)
        if row.get("type") == "costs":
            pair["feature_sweep_drafter"] = row["signature"]["drafter"]
            break
json.dump(pair, open(sys.argv[2], "w"), indent=1)
EOF
fi
for role in verifier drafter feature_drafter; do
  [ -f "$src/$role/training.json" ] && cp "$src/$role/training.json" "$dest/logs/${role}_training.json"
done
for log in "$src"/*.log; do
  name="$(basename "$log")"
  [ "$name" = stages.log ] && continue
  if [ "$name" = pytest_gpu.log ]; then
    { grep -E "^(PASSED|FAILED|ERROR)" "$log" || true; tail -n 1 "$log"; } > "$dest/logs/$name"
  else
    tr '\r' '\n' < "$log" | grep -vE "it/s\]|s/it\]|Loading weights|Writing model shards|%\||^\s*$" > "$dest/logs/$name" || true
  fi
done
for sweep in sweep sweep_features sweep_features_gammas; do
  [ -s "$src/$sweep.jsonl" ] || continue
  gzip -c "$src/$sweep.jsonl" > "$dest/$sweep.jsonl.gz"
  suffix="${sweep#sweep}"   # "", "_features" or "_features_gammas"
  tmp="$(mktemp -d)"
  "$py" -m speccascade report "$dest/$sweep.jsonl.gz" --out "$tmp" > "$tmp/report.log" 2>&1 \
    || { cat "$tmp/report.log" >&2; exit 1; }
  mkdir -p "$dest/report$suffix"
  cp "$tmp/summary.json" "$tmp/summary.md" "$dest/report$suffix/"
  rm -rf "$tmp"
  "$py" benchmarks/sd_speedup_analysis.py "$dest/$sweep.jsonl.gz" --out "$dest/analysis$suffix.json" > /dev/null
done
du -sh "$dest"
