# Sourced by the GPU run scripts. `gpu_id N` prints the N-th GPU (from 0) that the script was started
# with: the N-th entry of the CUDA_VISIBLE_DEVICES it inherited, or N itself when that was unset. A script
# that pins a step to `CUDA_VISIBLE_DEVICES=$(gpu_id 1)` then runs unchanged on a share of a bigger machine
# (e.g. CUDA_VISIBLE_DEVICES=2,3 bash benchmarks/gpu_t5_pair_run.sh on a 4-GPU host).
SCRIPT_GPUS="${SCRIPT_GPUS-${CUDA_VISIBLE_DEVICES-}}"
gpu_id() {
  if [ -z "$SCRIPT_GPUS" ]; then echo "$1"; return; fi
  local ids; IFS=',' read -ra ids <<< "$SCRIPT_GPUS"
  [ "$1" -lt "${#ids[@]}" ] || { echo "gpu_id $1: only ${#ids[@]} GPUs given (CUDA_VISIBLE_DEVICES=$SCRIPT_GPUS)" >&2; return 1; }
  echo "${ids[$1]}"
}
