"""The shell scripts that run long GPU jobs over several device calls (scripts/detached.sh,
benchmarks/gpu_session.sh) and turn a run into its committed record (benchmarks/record_deep_run.sh)."""
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DETACHED = ROOT / "scripts" / "detached.sh"


def _detached(tmp_path, *args, timeout=60):
    return subprocess.run(["bash", str(DETACHED), *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=timeout)


def test_detached_job_runs_and_wait_reports_its_status(tmp_path):
    started = _detached(tmp_path, "start", "runs/j_job", "bash", "-c", "echo hello; exit 7")
    assert started.returncode == 0 and "started" in started.stdout
    waited = _detached(tmp_path, "wait", "runs/j_job", "30", "copy")
    assert waited.returncode == 0, waited.stderr
    assert "hello" in waited.stdout and "ended: rc=7" in waited.stdout
    assert (tmp_path / "copy" / "rc").read_text().strip() == "7"


def test_wait_for_a_running_job_says_so_after_its_seconds(tmp_path):
    # the job runs until the test lets it end (the wait polls every 5 s, so a job of fixed length races it)
    _detached(tmp_path, "start", "runs/slow_job", "bash", "-c", "while [ ! -f stop ]; do sleep 0.2; done")
    try:
        waited = _detached(tmp_path, "wait", "runs/slow_job", "1")
        assert waited.returncode == 3 and "still running" in waited.stdout
    finally:
        (tmp_path / "stop").touch()
    assert _detached(tmp_path, "wait", "runs/slow_job", "30").returncode == 0


def test_a_new_start_does_not_report_the_previous_jobs_status(tmp_path):
    # run 21's session: a start whose GGUF check failed left rc = 1; the start after it (the parts complete)
    # ran, but every wait read the old rc, reported "ended: rc=1" at once, and the machine went idle and
    # was given back with the job
    _detached(tmp_path, "start", "runs/again_job", "bash", "-c", "echo first; exit 1")
    assert "ended: rc=1" in _detached(tmp_path, "wait", "runs/again_job", "30").stdout
    _detached(tmp_path, "start", "runs/again_job", "bash", "-c", "echo second; while [ ! -f stop ]; do sleep 0.2; done")
    try:
        waited = _detached(tmp_path, "wait", "runs/again_job", "1")
        assert waited.returncode == 3 and "still running" in waited.stdout, waited.stdout
        assert "first" not in waited.stdout
    finally:
        (tmp_path / "stop").touch()
    waited = _detached(tmp_path, "wait", "runs/again_job", "30")
    assert waited.returncode == 0 and "ended: rc=0" in waited.stdout and "second" in waited.stdout


def test_a_second_start_while_the_job_runs_is_refused(tmp_path):
    _detached(tmp_path, "start", "runs/busy_job", "bash", "-c", "while [ ! -f stop ]; do sleep 0.2; done")
    try:
        again = _detached(tmp_path, "start", "runs/busy_job", "bash", "-c", "touch second_ran")
        assert again.returncode == 5 and "already running in runs/busy_job" in again.stderr
        time.sleep(0.5)
        assert not (tmp_path / "second_ran").exists()
        assert _detached(tmp_path, "wait", "runs/busy_job", "1").returncode == 3
    finally:
        (tmp_path / "stop").touch()
    assert _detached(tmp_path, "wait", "runs/busy_job", "30").returncode == 0


def test_wait_on_a_machine_without_the_job_ends_at_once(tmp_path):
    # a device machine given back between calls comes back fresh, without the job's folder: a wait there
    # used to spend all its seconds (585 in one session) before saying "still running"
    begun = time.monotonic()
    waited = _detached(tmp_path, "wait", "runs/gone_job", "120", timeout=30)
    assert waited.returncode == 4
    assert "no job in runs/gone_job" in waited.stderr and "start it again" in waited.stderr
    assert time.monotonic() - begun < 10
    assert not (tmp_path / "runs").exists()


def test_gpu_session_wait_without_the_job_packs_nothing(tmp_path):
    out = _session_folder(tmp_path)
    session = ROOT / "benchmarks" / "gpu_session.sh"
    env = {"OUT": str(out), "PATH": "/usr/bin:/bin"}
    waited = subprocess.run(["bash", str(session), "wait", "gone", "120"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=30, env=env)
    assert waited.returncode == 4, waited.stdout + waited.stderr
    assert list(out.iterdir()) == []


def _session_folder(tmp_path):
    """A working folder where benchmarks/gpu_session.sh finds scripts/detached.sh, and its $OUT."""
    (tmp_path / "scripts").mkdir()
    shutil.copy2(DETACHED, tmp_path / "scripts" / "detached.sh")
    out = tmp_path / "out"
    out.mkdir()
    return out


def test_gpu_session_wait_cut_short_still_leaves_the_jobs_files(tmp_path):
    # the session's last call ends where its device time does, killed with everything it runs: the files
    # come back only if a tarball is already in $OUT, so the wait packs between rounds, not only at its end
    out = _session_folder(tmp_path)
    _detached(tmp_path, "start", "runs/cut_job", "bash", "-c",
              "mkdir -p runs/cut; echo 'stage one done' > runs/cut/stages.log; while [ ! -f stop ]; do sleep 0.2; done")
    session = ROOT / "benchmarks" / "gpu_session.sh"
    env = {"OUT": str(out), "PATH": "/usr/bin:/bin", "PACK_EVERY": "1"}
    waiting = subprocess.Popen(["bash", str(session), "wait", "cut", "300"], cwd=tmp_path, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (out / "cut.tgz").exists() and time.monotonic() < deadline and waiting.poll() is None:
            time.sleep(0.2)
        assert waiting.poll() is None, "the wait ended although the job still runs"
    finally:
        subprocess.run(["pkill", "-KILL", "-s", str(waiting.pid)], check=False)   # as the device's time limit does
        waiting.wait(timeout=10)
        (tmp_path / "stop").touch()
    listed = subprocess.run(["tar", "tzf", str(out / "cut.tgz")], capture_output=True, text=True, check=True)
    assert "runs/cut/stages.log" in listed.stdout.split()
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    subprocess.run(["tar", "xzf", str(out / "cut.tgz"), "-C", str(unpacked)], check=True)
    assert (unpacked / "runs" / "cut" / "stages.log").read_text() == "stage one done\n"


def test_gpu_session_wait_packs_the_ended_job_and_reports_it(tmp_path):
    out = _session_folder(tmp_path)
    _detached(tmp_path, "start", "runs/done_job", "bash", "-c",
              "mkdir -p runs/done; echo 'all stages' > runs/done/stages.log; touch runs/done/weights.safetensors")
    session = ROOT / "benchmarks" / "gpu_session.sh"
    waited = subprocess.run(["bash", str(session), "wait", "done", "60"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=90, env={"OUT": str(out), "PATH": "/usr/bin:/bin"})
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert "ended: rc=0" in waited.stdout and "all stages" in waited.stdout
    listed = subprocess.run(["tar", "tzf", str(out / "done.tgz")], capture_output=True, text=True, check=True)
    names = listed.stdout.split()
    assert "runs/done/stages.log" in names and "runs/done_job/rc" in names
    assert not any(n.endswith(".safetensors") for n in names)   # weights stay on the machine
    assert sorted(p.name for p in out.iterdir()) == ["done.tgz"]   # no partial tarball left beside it


def test_record_deep_run_rebuilds_a_committed_record(tmp_path):
    # benchmarks/record_deep_run.sh turns an unpacked run into results/deep_pair/run*/: here run 18's own
    # files, put back as the run left them (the sweep unzipped, the hypotheses in pair.json, a log with
    # progress bars), must give back its committed pair.json, report and analysis
    import gzip
    import json

    record = ROOT / "results" / "deep_pair" / "run18"
    run = tmp_path / "runs" / "deep18"
    run.mkdir(parents=True)
    for name in ("stages.log", "gpu.txt", "code.sha1", "commit.txt", "feature_drafter_trained.json"):
        shutil.copy2(record / name, run / name)
    (run / "sweep_features.jsonl").write_bytes(gzip.decompress((record / "sweep_features.jsonl.gz").read_bytes()))
    pair = json.loads((record / "pair.json").read_text())
    del pair["feature_drafters"], pair["feature_sweep_drafter"]   # the script adds them from the run's files
    for role in pair["test"].values():
        role["hypotheses"] = ["Y dijo Dios"]
    (run / "pair.json").write_text(json.dumps(pair))
    (run / "verifier").mkdir()
    shutil.copy2(record / "logs" / "verifier_training.json", run / "verifier" / "training.json")
    (run / "train_verifier.log").write_text("step 10\r 50%|#####     | 1/2 [00:01<00:01, 1.0it/s]\rloss 1.1\n")
    dest = tmp_path / "record"
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "record_deep_run.sh"), str(run), str(dest)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stdout + done.stderr
    rebuilt = json.loads((dest / "pair.json").read_text())
    assert all("hypotheses" not in role for role in rebuilt["test"].values())
    assert rebuilt == json.loads((record / "pair.json").read_text())
    assert rebuilt["feature_drafters"]["train_features"]["sd_acceptance_T1"] == pytest.approx(0.7243, abs=1e-4)
    summary = json.loads((dest / "report_features" / "summary.json").read_text())
    committed = json.loads((record / "report_features" / "summary.json").read_text())
    assert summary["table2"] == committed["table2"]
    assert summary["table2"]["T=0 gamma=5 batch=1"]["methods"]["sd"]["speedup_at_verifier_quality"] == \
        pytest.approx(1.7825, abs=1e-4)
    assert json.loads((dest / "analysis_features.json").read_text()) == \
        json.loads((record / "analysis_features.json").read_text())
    assert (dest / "logs" / "verifier_training.json").exists()
    assert (dest / "logs" / "train_verifier.log").read_text() == "step 10\nloss 1.1\n"   # no progress bars
