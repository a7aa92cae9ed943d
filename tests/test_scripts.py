"""The shell scripts that run long GPU jobs over several device calls (scripts/detached.sh)."""
import shutil
import subprocess
import time
from pathlib import Path

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
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "scripts").mkdir()
    shutil.copy2(DETACHED, tmp_path / "scripts" / "detached.sh")   # gpu_session.sh runs it from the working folder
    session = ROOT / "benchmarks" / "gpu_session.sh"
    env = {"OUT": str(out), "PATH": "/usr/bin:/bin"}
    waited = subprocess.run(["bash", str(session), "wait", "gone", "120"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=30, env=env)
    assert waited.returncode == 4, waited.stdout + waited.stderr
    assert list(out.iterdir()) == []
