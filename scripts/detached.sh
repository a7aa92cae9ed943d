#!/usr/bin/env bash
# Run a long job detached from the calling shell, then wait for it in later calls.
#   scripts/detached.sh start DIR CMD...   start CMD (in its own session) logging to DIR/log; DIR/rc when it ends
#                                          (a previous job's log and rc are cleared first; exit 5 if one still runs)
#   scripts/detached.sh wait DIR SECONDS [DEST]   wait up to SECONDS for it to end; then copy DIR's files
#                                                 (not folders) to DEST if given; exit 0 if ended, 3 if still running,
#                                                 4 at once if DIR is not here (no job was started on this machine)
set -uo pipefail
cmd="${1:?start|wait}"; dir="${2:?DIR}"; shift 2
case "$cmd" in
  start)
    # one job per DIR: a second start while the first runs would interleave their logs and statuses
    if [ -f "$dir/pid" ] && [ ! -f "$dir/rc" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
      echo "a job is already running in $dir (pid $(cat "$dir/pid")): wait for it, or use another NAME" >&2; exit 5
    fi
    # a new job's status is its own: a start after an ended (or failed) one must not report the old rc
    mkdir -p "$dir"; rm -f "$dir/rc" "$dir/log" "$dir/pid"
    setsid nohup bash -c 'cd "$0" && "${@:2}" > "$1/log" 2>&1; echo $? > "$1/rc"' "$PWD" "$dir" "$@" \
      < /dev/null > /dev/null 2>&1 &
    echo $! > "$dir/pid"
    echo "started: $*" ;;
  wait)
    secs="${1:?SECONDS}"; dest="${2:-}"
    # a machine given back between calls comes back fresh, without DIR: waiting there would only burn time
    [ -d "$dir" ] || { echo "no job in $dir on this machine: never started here, or the machine was given back" \
        "since (its files are gone); start it again" >&2; exit 4; }
    end=$((SECONDS + secs))
    while [ ! -f "$dir/rc" ] && [ $SECONDS -lt $end ]; do sleep 5; done
    tail -n 40 "$dir/log" 2>/dev/null
    if [ -n "$dest" ]; then mkdir -p "$dest"; find "$dir" -maxdepth 1 -type f -exec cp {} "$dest/" \; ; fi
    if [ -f "$dir/rc" ]; then echo "ended: rc=$(cat "$dir/rc")"; exit 0; fi
    echo "still running"; exit 3 ;;
  *) echo "usage: $0 start|wait DIR ..." >&2; exit 2 ;;
esac
