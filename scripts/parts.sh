# Sourced by the scripts that run several GPU jobs in one session (benchmarks/gpu_x2_run.sh,
# benchmarks/gpu_x4_run.sh). Set PARTS_LOG first (DIR/parts.log): it gets one line per part's start and
# end with its exit status, and benchmarks/gpu_session.sh prints its tail after every call.
#   note TEXT...          a time-stamped line in PARTS_LOG (and on stdout)
#   part NAME CMD...      run CMD with its output in DIR/NAME.log (DIR: PARTS_LOG's folder)
note() { echo "$(date -u +%FT%TZ) $*" | tee -a "$PARTS_LOG"; }
part() {
  local name="$1" rc; shift
  note "start $name"
  "$@" > "$(dirname "$PARTS_LOG")/$name.log" 2>&1
  rc=$?
  note "end $name rc=$rc"
  return $rc
}
