# Sourced by the scripts that run several GPU jobs in one session (benchmarks/gpu_x2_run.sh,
# benchmarks/gpu_x4_run.sh).
#   parts_begin DIR       make DIR, log parts to DIR/parts.log (benchmarks/gpu_session.sh prints its tail
#                         after every call), and record the code: DIR/commit.txt (git HEAD, which on the
#                         device machine can be stale: its copy's git metadata is not the working tree's)
#                         and DIR/code.sha1 (code_hash below, which is the files the run read)
#   note TEXT...          a time-stamped line in DIR/parts.log (and on stdout)
#   part NAME CMD...      run CMD with its output in DIR/NAME.log; its start, end and exit status in parts.log
#   code_hash             one SHA-1 over the contents of src/, benchmarks/ and scripts/ (run from the
#                         repository root); the same in a checkout of a commit tells whether a run ran it
parts_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
code_hash() {  # in Python: the shell pipeline it replaced (find | sort | sha1sum) gave another hash on the device
  (cd "$parts_root" && python3 -c '
import hashlib, pathlib
h = hashlib.sha1()
for p in sorted(str(q) for d in ("src", "benchmarks", "scripts") for q in pathlib.Path(d).rglob("*")
                if q.suffix in (".py", ".sh") and q.is_file()):
    h.update(p.encode() + b"\0" + pathlib.Path(p).read_bytes() + b"\0")
print(h.hexdigest())')
}
parts_begin() {
  PARTS_DIR="$1"
  mkdir -p "$PARTS_DIR"
  git -C "$parts_root" rev-parse HEAD > "$PARTS_DIR/commit.txt" 2>/dev/null || true
  code_hash > "$PARTS_DIR/code.sha1"
  nvidia-smi topo -m > "$PARTS_DIR/topo.txt" 2>&1
}
note() { echo "$(date -u +%FT%TZ) $*" | tee -a "$PARTS_DIR/parts.log"; }
part() {
  local name="$1" rc; shift
  note "start $name"
  "$@" > "$PARTS_DIR/$name.log" 2>&1
  rc=$?
  note "end $name rc=$rc"
  return $rc
}
