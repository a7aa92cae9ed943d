"""Issue 17 (beyond one GPU), the parts a CPU can test: data-parallel sweeps (``--workers``: same
cells as one process, resumable after a kill, every cell once), tensor parallelism (``--tp``:
greedy output under ``torchrun --nproc-per-node 2`` over gloo equals ``--tp 1``; the error paths)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from speccascade.cli import main
from speccascade.distributed import check_tp, check_tp_plan, load_tp_verifier
from speccascade.errors import DeviceError, SpecCascadeError
from speccascade.eval.parallel import (
    assign,
    cell_cost,
    parts_dir,
    run_parallel_sweep,
    start_process,
    visible_gpu,
    worker_cells,
)
from speccascade.eval.sweep import Cell, SweepConfig, read_records, run_sweep
from speccascade.eval.tasks import get_task

from helpers import kill_after_cells

SRC = Path(__file__).resolve().parent.parent / "src"
ENV = os.environ | {"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
CPU_ENV = ENV | {"CUDA_VISIBLE_DEVICES": ""}   # the gloo tests, on a machine with GPUs too
LOAD = {"drafter": None, "verifier": None, "tokenizer": None, "pair": "tiny", "device": "cpu", "dtype": "float32"}
TASK = ("bible_en_es", None, None)


def config(**kw):
    base = {"methods": ["sd", "opt", "token_cascade"], "alphas": {"opt": [0.0, 1.0], "token_cascade": [0.5]},
                "temperatures": [0.0, 1.0], "n_examples": 2, "max_new_tokens": 5}
    return SweepConfig(**(base | kw))


def cells_of(records):
    return {r["key"]: r for r in records if r["type"] == "cell"}


@pytest.fixture(scope="module")
def shipped():
    from speccascade.models.loading import (
        TOKENIZER_DIR,
        embedded_pair_dirs,
        load_causal_lm,
        load_tokenizer,
    )

    d, v = embedded_pair_dirs("tiny")
    return load_causal_lm(d), load_causal_lm(v), load_tokenizer(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def reference(shipped, tmp_path_factory):
    """The grid of :func:`config` swept by one process."""
    out = tmp_path_factory.mktemp("ref") / "one.jsonl"
    return run_sweep(*shipped, get_task(), config(), out, progress=False)


def same_results(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k]["quality"] == b[k]["quality"], k
        for s in ("emitted", "verifier_calls", "drafter_calls", "accepted", "deferred"):
            assert a[k]["stats"].get(s) == b[k]["stats"].get(s), (k, s)


# --------------------------------------------------------------------------------------------
# the plan: who runs what


def test_assign_covers_every_cell_once_balanced_and_deterministic():
    cfg = config(methods=["sd", "chow", "drafter_only"], alphas={"chow": [0.1, 0.2, 0.3, 0.4]},
                 temperatures=[0.0, 1.0], batch_sizes=[1, 4], n_examples=8, max_new_tokens=16)
    grid = cfg.cells()
    shares = assign(grid, 3, 8, 16)
    assert sorted(c.key for s in shares for c in s) == sorted(c.key for c in grid)
    assert assign(grid, 3, 8, 16) == shares
    # cells that share a compiled program (only alpha differs) stay on one worker
    def program(c):
        return c.method, c.gamma, c.temperature, c.batch_size, c.options

    owner = {}
    for w, s in enumerate(shares):
        for c in s:
            assert owner.setdefault(program(c), w) == w, c.key
    # a worker's load counts the baselines it runs for its groups; balanced to within one program
    loads = [sum(cell_cost(c, 8, 16) for c in worker_cells(s, grid)) for s in shares]
    biggest = max(sum(cell_cost(c, 8, 16) for c in grid if program(c) == p) for p in owner)
    assert max(loads) - min(loads) <= biggest
    # cost model: a speculative cell costs less per token than verifier_only, a drafter cell least;
    # a batch of 4 is cheaper than 4 single rows
    sd, base, small = (Cell(m, None, 5, 0.0, 0, 1) for m in ("sd", "verifier_only", "drafter_only"))
    assert cell_cost(small, 8, 16) < cell_cost(sd, 8, 16) < cell_cost(base, 8, 16)
    assert cell_cost(Cell("sd", None, 5, 0.0, 0, 4), 8, 16) < cell_cost(sd, 8, 16)
    # a worker's run order: each group's baseline first, then its cells (grid order)
    for share in shares:
        order = worker_cells(share, grid)
        for i, c in enumerate(order):
            if c.method != "verifier_only":
                assert any(b.method == "verifier_only" and (b.temperature, b.seed, b.batch_size)
                           == (c.temperature, c.seed, c.batch_size) for b in order[:i])
        assert len({c.key for c in order}) == len(order)
    # more workers than cells: the extra shares are empty; a baseline and one cell stay together (a
    # second worker would have to run the baseline again)
    few = assign(grid[:2], 4, 8, 16)
    assert [len(s) for s in few] == [2, 0, 0, 0]


# --------------------------------------------------------------------------------------------
# data-parallel sweeps


def test_two_workers_give_the_cells_of_one_process(reference, tmp_path):
    out = tmp_path / "two.jsonl"
    records = run_parallel_sweep(LOAD, TASK, config(), out, workers=2, threads=1, progress=False)
    assert records == read_records(out)
    same_results(cells_of(reference), cells_of(records))
    keys = [r["key"] for r in records if r["type"] == "cell"]
    assert len(keys) == len(set(keys)) == len(config().cells())
    assert {r["worker"] for r in records if r["type"] == "cell"} == {0, 1}
    assert sum(r["type"] == "costs" for r in records) == 1
    for r in records:
        if r["type"] == "cell":
            assert r["relative_latency"] > 0 and r["signature"]["tp"] == 1
            if r["method"] == "verifier_only":
                assert r["relative_latency"] == 1.0
    assert not parts_dir(out).exists()  # removed once --out holds the grid
    # nothing left to do: no worker starts, the file is unchanged
    text = out.read_text()
    assert run_parallel_sweep(LOAD, TASK, config(), out, workers=2, progress=False) == records
    assert out.read_text() == text


def test_leftovers_of_a_killed_run_are_merged_once(reference, tmp_path):
    """A killed run leaves --out part-way (a torn last line) and the workers' part files (one cell
    already merged, cells not yet merged, a torn line); the next run merges each cell once."""
    out = tmp_path / "s.jsonl"
    ref_lines = [json.dumps(r) for r in reference]
    cells = [r for r in reference if r["type"] == "cell"]
    costs = [r for r in reference if r["type"] == "costs"]
    out.write_text("\n".join(json.dumps(r) for r in costs + cells[:2]) + "\n" + ref_lines[-1][:40])
    parts = parts_dir(out)
    parts.mkdir()
    (parts / "worker-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in costs + cells[1:6]))
    (parts / "worker-1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in costs + cells[6:])
                                          + ref_lines[3][:25])
    (parts / "worker-1.gpu").write_text("GPU-b\n")  # worker 1 ran on a GPU (worker 0 did not say)
    notes = []
    records = run_parallel_sweep(LOAD, TASK, config(), out, workers=2, progress=False, notes=notes)
    keys = [r["key"] for r in records if r["type"] == "cell"]
    assert keys == [c["key"] for c in cells]  # every cell once, in the order they landed
    assert sum(r["type"] == "costs" for r in records) == 1
    assert any("removed a torn last line" in n for n in notes) and any("merged 8 cells" in n for n in notes)
    assert [r.get("worker") for r in records if r["type"] == "cell"] == [None, None] + [0] * 4 + [1] * 4
    assert [r.get("gpu") for r in records if r["type"] == "cell"] == [None] * 6 + ["GPU-b"] * 4
    assert not parts.exists()


def test_a_killed_parallel_sweep_resumes_with_every_cell_once(reference, tmp_path):
    out = tmp_path / "s.jsonl"
    cfg = config(max_new_tokens=12)
    args = [sys.executable, "-m", "speccascade", "sweep", "--methods", "sd,opt,token_cascade", "--alphas",
            "opt=0,1;token_cascade=0.5", "--temperatures", "0", "1", "--examples", "2", "--max-new-tokens", "12",
            "--workers", "2", "--quiet", "--out", str(out)]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    kill_after_cells(proc, out, 1, timeout=90)  # the parent; its workers die with it (PR_SET_PDEATHSIG)
    done_before = [r["key"] for r in read_records(out) if r["type"] == "cell"]
    assert 1 <= len(done_before) < len(cfg.cells())
    records = run_parallel_sweep(LOAD, TASK, cfg, out, workers=2, progress=False)
    keys = [r["key"] for r in records if r["type"] == "cell"]
    assert keys[:len(done_before)] == done_before
    assert sorted(keys) == sorted(c.key for c in cfg.cells()) and len(keys) == len(set(keys))
    assert all(json.loads(x) for x in out.read_text().splitlines())


def test_workers_bad_input(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)   # "no CUDA GPU" on a machine with GPUs too
    sweep = ["sweep", "--examples", "2", "--max-new-tokens", "3", "--quiet", "--methods", "sd",
             "--out", str(tmp_path / "s.jsonl")]
    for extra, fragment in ((["--workers", "0"], "--workers must be an integer >= 1, got 0"),
                            (["--workers", "2", "--device", "cuda"], "no CUDA GPU"),
                            (["--workers", "2", "--device", "cuda:1"], "give --device cuda (worker i uses cuda:i)"),
                            (["--workers", "2", "--device", "mps"], "--workers runs on --device cpu or cuda"),
                            (["--workers", "2", "--tp", "2"], "--workers and --tp do not combine yet")):
        assert main(sweep + extra) == 2, extra
        assert fragment in capsys.readouterr().err, extra
    with pytest.MonkeyPatch.context() as mp:  # under torchrun, each rank would start N workers
        mp.setenv("WORLD_SIZE", "2")
        assert main([*sweep, "--workers", "2"]) == 2
        assert "starts its own worker processes: run it without torchrun" in capsys.readouterr().err
    assert not (tmp_path / "s.jsonl").exists() and not parts_dir(tmp_path / "s.jsonl").exists()


def test_a_worker_that_fails_stops_the_sweep_with_its_message(tmp_path):
    out = tmp_path / "s.jsonl"
    bad = LOAD | {"drafter": str(tmp_path / "nope"), "verifier": str(tmp_path / "nope")}
    with pytest.raises(SpecCascadeError, match=r"sweep worker [01] \(cpu\) failed: the drafter path .*nope' does not "
                                               r"exist"):
        run_parallel_sweep(bad, TASK, config(), out, workers=2, progress=False)
    assert not out.exists()


def test_each_gpu_worker_sees_its_gpu_alone_as_cuda0():
    """A GPU worker's CUDA_VISIBLE_DEVICES: the i-th of those this process was given (so that every
    worker's programs are cuda:0's and one compile cache serves them all)."""
    assert [visible_gpu(i, None) for i in range(3)] == ["0", "1", "2"]
    assert [visible_gpu(i, "2,3") for i in range(2)] == ["2", "3"]
    assert visible_gpu(1, " GPU-aa , GPU-bb ") == "GPU-bb"
    with pytest.raises(DeviceError, match="names only 1 GPU"):
        visible_gpu(1, "5")


def test_a_spawned_worker_starts_with_the_environment_given_and_ours_is_kept(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    seen = tmp_path / "seen.txt"
    code = f"import os; open({str(seen)!r}, 'w').write(os.environ.get('CUDA_VISIBLE_DEVICES', '-'))"
    p = start_process(mp.get_context("spawn"), {"CUDA_VISIBLE_DEVICES": "5"}, target=exec, args=(code,))
    p.join(60)
    assert p.exitcode == 0 and seen.read_text() == "5"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5"


def test_gpu_workers_are_started_on_their_own_gpu_as_cuda0(tmp_path, monkeypatch):
    import speccascade.eval.parallel as parallel

    started = []

    class Stop(Exception):
        pass

    def fake_start(ctx, env, target, args, name):
        started.append((env, args[1]["device"], args[1]["load"]["device"]))
        if len(started) == 2:
            raise Stop

    monkeypatch.setattr(parallel, "worker_devices", lambda device, workers: [f"cuda:{i}" for i in range(workers)])
    monkeypatch.setattr(parallel, "start_process", fake_start)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7")
    with pytest.raises(Stop):
        run_parallel_sweep(LOAD | {"device": "cuda"}, TASK, config(), tmp_path / "s.jsonl", workers=2, progress=False)
    assert started == [({"CUDA_VISIBLE_DEVICES": "6"}, "cuda:0", "cuda:0"),
                       ({"CUDA_VISIBLE_DEVICES": "7"}, "cuda:0", "cuda:0")]


def test_part_files_of_other_settings_are_refused(tmp_path):
    out = tmp_path / "s.jsonl"
    parts = parts_dir(out)
    parts.mkdir()
    rec = {"type": "cell", "key": "x", "signature": {"drafter": "d:1:ab", "verifier": "v:1:cd", "task": "bible_en_es",
                                                      "examples_sha1": "0", "max_new_tokens": 99}}
    (parts / "worker-0.jsonl").write_text(json.dumps(rec) + "\n")
    out.write_text(json.dumps(rec | {"signature": rec["signature"] | {"max_new_tokens": 5}}) + "\n")
    with pytest.raises(SpecCascadeError, match="computed with max_new_tokens=5, but this run has max_new_tokens=99"):
        run_parallel_sweep(LOAD, TASK, config(), out, workers=2, progress=False)


# --------------------------------------------------------------------------------------------
# tensor parallelism


def test_tp_error_paths(tmp_path, monkeypatch, capsys):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert check_tp(1) == 1
    with pytest.raises(SpecCascadeError, match=r"launch with torchrun --nproc-per-node 2 -m speccascade sweep --tp 2"):
        check_tp(2, "cpu", "dynamic", "sweep")
    with pytest.raises(SpecCascadeError, match="--tp must be an integer >= 1, got 0"):
        check_tp(0)
    for backend in ("static", "compiled", "graphs", "seq2seq"):
        with pytest.raises(SpecCascadeError, match=f"--tp 2 needs --backend dynamic, fused or auto: the '{backend}' "
                                                   f"backend cannot"):
            check_tp(2, "cpu", backend)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SpecCascadeError, match="under a launch of 4 processes: give torchrun --nproc-per-node 2"):
        check_tp(2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        check_tp(2, "cuda")
    with pytest.raises(DeviceError, match="runs on --device cuda"):
        check_tp(2, "mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match="--tp 2 is more than the 1 CUDA GPU"):
        check_tp(2, "cuda")
    from speccascade.models.loading import embedded_pair_dirs

    # transformers shards onto a GPU whenever torch sees one: --device cpu there is refused, with the fix
    with pytest.raises(DeviceError, match=r"--device cpu on a machine with a CUDA GPU: .*CUDA_VISIBLE_DEVICES="):
        load_tp_verifier(embedded_pair_dirs("tiny")[1], 2, "cpu", torch.float32)
    # a model type without a tensor-parallel plan is named
    gpt = tmp_path / "gpt2"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2}))
    with pytest.raises(SpecCascadeError, match=r"the verifier \(gpt2, .*\) has no tensor-parallel plan"):
        check_tp_plan(gpt)
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5", "is_encoder_decoder": True}))
    with pytest.raises(SpecCascadeError, match=r"--tp takes a causal LM verifier; .* is an encoder-decoder \(t5"):
        check_tp_plan(t5)
    check_tp_plan(embedded_pair_dirs("tiny")[1])  # llama has one
    # the command line: before any model loads, exit 2 with the fix
    monkeypatch.delenv("WORLD_SIZE")
    for argv in (["generate", "--tp", "2", "x"], ["generate", "--tp", "2", "--backend", "static", "x"],
                 ["sweep", "--tp", "2", "--methods", "sd", "--examples", "1", "--out", str(tmp_path / "s.jsonl")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "--tp 2" in err and ("torchrun --nproc-per-node 2" in err or "needs --backend dynamic, fused" in err), \
            err


PROMPT = "In the beginning God created the heaven and the earth."


def greedy_tp1(capsys, n=10):
    assert main(["generate", "--temperature", "0", "--max-new-tokens", str(n), "--json", "--quiet", PROMPT]) == 0
    return json.loads(capsys.readouterr().out)


def torchrun(args, tmp_path, gpus=False):
    """``torchrun --standalone --nproc-per-node 2 -m speccascade ARGS`` in its own session; without
    ``gpus`` the GPUs are hidden (the ranks talk over gloo on the CPU on any machine)."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "speccascade", *args], env=ENV if gpus else CPU_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, start_new_session=True)


def finish(proc, timeout):
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its ranks
        proc.communicate()
        raise


@pytest.mark.skipif(sys.platform != "linux", reason="gloo over localhost")
def test_tp2_over_gloo_equals_tp1(tmp_path, capsys):
    """transformers' tensor parallelism runs on a CPU over gloo: the tiny verifier split over two
    ranks decodes (greedy) exactly what it decodes whole, and only rank 0 prints."""
    a = greedy_tp1(capsys)
    proc = torchrun(["generate", "--temperature", "0", "--max-new-tokens", "10", "--json", "--quiet", PROMPT,
                     "--tp", "2"], tmp_path)
    stdout, stderr = finish(proc, 150)
    assert proc.returncode == 0, stderr[-3000:]
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 0 alone
    b = json.loads(lines[0])
    assert a["tokens"] == b["tokens"] and a["text"] == b["text"]
    for k in ("verifier_calls", "drafter_calls", "accepted"):
        assert a["stats"][k] == b["stats"][k]


@pytest.mark.skipif(sys.platform != "linux", reason="gloo over localhost")
def test_serve_tp2_over_gloo(tmp_path, capsys):
    """serve --tp 2: rank 0 answers, rank 1 decodes every batch with it (greedy = --tp 1; a
    streamed request and a per-row stop string keep the ranks in step)."""
    import socket
    import urllib.request

    pytest.importorskip("fastapi")
    a = greedy_tp1(capsys)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = torchrun(["serve", "--tp", "2", "--port", str(port), "--log-level", "warning"], tmp_path)

    def post(body):
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                     {"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.read().decode()

    try:
        deadline = time.time() + 150
        while True:
            assert proc.poll() is None and time.time() < deadline, "the server did not start"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        got = json.loads(post({"prompt": PROMPT, "temperature": 0, "max_tokens": 10}))
        assert got["choices"][0]["token_ids"] == a["tokens"]
        assert "data: [DONE]" in post({"prompt": PROMPT, "temperature": 0, "max_tokens": 6, "stream": True})
        two = json.loads(post({"prompt": [PROMPT, "And God said"], "temperature": 0, "max_tokens": 12,
                               "stop": ["cielo"]}))
        assert two["choices"][0]["text"].startswith("En el principio") and "cielo" not in two["choices"][0]["text"]
        again = json.loads(post({"prompt": PROMPT, "temperature": 0, "max_tokens": 10}))  # still in step
        assert again["choices"][0]["token_ids"] == a["tokens"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def test_tp_speed_benchmark_parses_and_refuses_without_gpus():
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "tp_speed.py"
    ok = subprocess.run([sys.executable, str(script), "--help"], env=ENV, capture_output=True, text=True, check=False,
                        timeout=60)
    assert ok.returncode == 0 and "--tp" in ok.stdout
    import torch

    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs: the benchmark would run")
    no = subprocess.run([sys.executable, str(script)], env=ENV, capture_output=True, text=True, check=False, timeout=60)
    assert no.returncode == 2 and "tp_speed: error: needs 2 CUDA GPUs" in no.stderr


def test_allreduce_latency_benchmark_parses_and_refuses_without_gpus():
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "allreduce_latency.py"
    ok = subprocess.run([sys.executable, str(script), "--help"], env=ENV, capture_output=True, text=True, check=False,
                        timeout=60)
    assert ok.returncode == 0 and "--chain" in ok.stdout
    no = subprocess.run([sys.executable, str(script)], env=CPU_ENV, capture_output=True, text=True, check=False,
                        timeout=60)
    assert no.returncode == 2 and "allreduce_latency: error: needs 2 CUDA GPUs" in no.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="gloo over localhost")
def test_tp_greedy_agreement_benchmark_on_two_gloo_ranks(tmp_path):
    """benchmarks/tp_greedy_agreement.py on a CPU: the record counts rows and differences per method;
    over gloo in float32 --tp 2 decodes exactly --tp 1's tokens (its logits agree to 1e-5)."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "tp_greedy_agreement.py"
    out = tmp_path / "agreement.json"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(script), "--device", "cpu", "--prompts", "4", "--batch-size", "2",
                             "--max-new-tokens", "8", "--out", str(out)], env=CPU_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, start_new_session=True)
    _, stderr = finish(proc, 300)
    assert proc.returncode == 0, stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["prompts"] == 4 and record["ranks"] == 2 and record["dtype"] == "float32"
    for method in ("verifier_only", "sd"):
        m = record["methods"][method]
        assert m["rows"] == 4 and m["identical"] == 4 and m["fraction_identical"] == 1.0 and m["differing"] == []


def test_tp_speed_merges_stages_into_ratios(tmp_path):
    """The stage files of benchmarks/tp_speed.py merge into one record: tokens/s, ratios (tp 2 over
    tp 1, fused over transformers'), the issue's target, and a note for each missing stage or failed
    cell."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tp_speed", SRC.parent / "benchmarks" / "tp_speed.py")
    tp_speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tp_speed)

    def stage(backend, tp, speeds):
        rows = [{"backend": backend, "tp": tp, "batch": b, "method": m, "tokens_per_second": x}
                for (b, m), x in speeds.items()]
        rows.append({"backend": backend, "tp": tp, "batch": 16, "method": "opt", "error": "RuntimeError: boom"})
        path = tmp_path / f"{backend}_tp{tp}.json"
        path.write_text(json.dumps({"stage": f"{backend} tp={tp}", "gpu": "G", "dtype": "bfloat16", "rows": rows}))
        return path

    paths = [stage("fused", 1, {(1, "sd"): 100.0, (1, "verifier_only"): 50.0}),
             stage("fused", 2, {(1, "sd"): 180.0, (1, "verifier_only"): 40.0}),
             stage("hf", 2, {(1, "sd"): 20.0}), tmp_path / "hf_tp1.json"]
    rec = tp_speed.merge(paths, tmp_path / "out" / "tp.json")
    assert json.loads((tmp_path / "out" / "tp.json").read_text()) == rec
    assert rec["ratios"] == {"fused tp2/tp1 sd batch=1": 1.8, "fused tp2/tp1 verifier_only batch=1": 0.8,
                             "fused/hf tp2 sd batch=1": 9.0}
    assert rec["target_tp2_faster_than_tp1_at_batch1_fused"] == {"verifier_only": False, "sd": True}
    assert rec["card"]["gpu"] == "G" and rec["settings"]["dtype"] == "bfloat16"
    assert sum("boom" in n for n in rec["notes"]) == 3 and any("hf_tp1.json: not read" in n for n in rec["notes"])
    assert rec["where_time_goes_batch1"] == {}   # the stages carry no shape
    assert rec["data_parallel_sweep"] is None
    walls = {"benchmark": "sweep_walls", "grid": "--methods sd", "runs": [{"workers": 1, "rc": 0, "wall_s": 30},
                                                                         {"workers": 2, "rc": 0, "wall_s": 16}]}
    (tmp_path / "sweep_walls.json").write_text(json.dumps(walls))
    again = tp_speed.merge([*paths, tmp_path / "sweep_walls.json"], tmp_path / "out" / "tp.json")
    assert again["data_parallel_sweep"] == walls and again["ratios"] == rec["ratios"]   # not a stage

    # the batch-1 time model, by hand: 1 layer of hidden 4, 2 heads (2 KV heads: k, v 4 x 4), MLP 8, vocab 10
    shape = {"hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
             "num_key_value_heads": 2, "vocab_size": 10}
    layer = 4 * 16 + 3 * 32   # q, k, v, o; gate, up, down
    assert tp_speed.weight_bytes_per_rank(shape, 1, 2) == (layer + 40) * 2
    assert tp_speed.weight_bytes_per_rank(shape, 2, 2) == (layer / 2 + 40) * 2
    speed = {("fused", 1, 1, "verifier_only"): 1000.0, ("fused", 2, 1, "verifier_only"): 1250.0}
    peak = (layer + 40) * 2 / 0.5e-3   # --tp 1 at 1 ms a token reaches half the ceiling
    model = tp_speed.where_time_goes(speed, shape, "bfloat16", peak=peak)
    assert model["hbm_fraction_reached_tp1"] == pytest.approx(0.5)
    assert model["tp2_ms_at_tp1_fraction_with_free_all_reduces"] == pytest.approx((layer / 2 + 40) / (layer + 40))
    assert model["us_per_all_reduce"] == pytest.approx((0.8 - (layer / 2 + 40) / (layer + 40)) * 1e3 / 2)


# --------------------------------------------------------------------------------------------
# on the device machine (skipped without 2 CUDA GPUs)


def _gpus():
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


needs_2_gpus = pytest.mark.skipif(_gpus() < 2, reason="needs 2 CUDA GPUs")


@needs_2_gpus
@pytest.mark.parametrize("backend", ["dynamic", "fused"])
def test_gpu_tp2_equals_tp1(tmp_path, backend):
    """Greedy --tp 2 prints --tp 1's tokens (float32): transformers' sharding, and the sharded fused
    backend with its all-reduces captured in the block's CUDA graphs."""
    common = ["generate", "--device", "cuda", "--temperature", "0", "--max-new-tokens", "16", "--json", "--quiet",
              "--backend", backend, PROMPT]
    one = subprocess.run([sys.executable, "-m", "speccascade", *common], env=ENV, capture_output=True, text=True,
                         check=False,
                         timeout=300)
    assert one.returncode == 0, one.stderr
    proc = torchrun(common + ["--tp", "2"], tmp_path, gpus=True)
    stdout, stderr = finish(proc, 300)
    assert proc.returncode == 0, stderr[-3000:]
    b = json.loads(next(line for line in stdout.splitlines() if line.startswith("{")))
    assert json.loads(one.stdout)["tokens"] == b["tokens"]


@needs_2_gpus
def test_gpu_two_workers_use_two_gpus(reference, tmp_path):
    out = tmp_path / "gpu.jsonl"
    records = run_parallel_sweep(LOAD | {"device": "cuda"}, TASK, config(), out, workers=2, progress=False)
    cells = cells_of(records)
    assert cells.keys() == cells_of(reference).keys() and {r["worker"] for r in cells.values()} == {0, 1}
    # each worker saw its GPU as cuda:0, yet they ran on two different GPUs
    gpus = {r["worker"]: r["gpu"] for r in cells.values()}
    assert len(set(gpus.values())) == 2, gpus


@pytest.mark.skipif(sys.platform != "linux", reason="gloo over localhost")
def test_sweep_tp2_over_gloo_resumes_like_tp1(shipped, tmp_path):
    """sweep --tp 2: every rank skips the cells --out already holds (the other ranks sweep a copy),
    rank 0 alone writes --out, and the cells equal --tp 1's."""
    cfg = SweepConfig(methods=["sd", "opt"], alphas={"opt": [0.0]}, temperatures=[0.0], n_examples=2, max_new_tokens=4)
    ref = run_sweep(*shipped, get_task(), cfg, tmp_path / "tp1.jsonl", progress=False)
    out = tmp_path / "tp2.jsonl"
    # a --tp 2 run that stopped after its baseline
    first = [r | {"signature": r["signature"] | {"tp": 2}} for r in ref[:2]]
    out.write_text("".join(json.dumps(r) + "\n" for r in first))
    proc = torchrun(["sweep", "--tp", "2", "--methods", "sd,opt", "--alphas", "opt=0", "--temperatures", "0",
                     "--examples", "2", "--max-new-tokens", "4", "--quiet", "--out", str(out)], tmp_path)
    stdout, stderr = finish(proc, 150)
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("3 cells in") == 1  # rank 0 alone prints
    records = read_records(out)
    assert records[:2] == first
    same_results(cells_of(ref), cells_of(records))
    assert [r["signature"]["tp"] for r in records] == [2] * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tp1.jsonl", "tp2.jsonl"]  # no scratch copy left
    # a --tp 1 run does not extend a --tp 2 file
    with pytest.raises(SpecCascadeError, match="computed with tp=2, but this run has tp=1"):
        run_sweep(*shipped, get_task(), cfg, out, progress=False)


def test_a_hung_teardown_ends_the_process_with_its_status(tmp_path):
    """On two H200s, destroy_process_group after captured NCCL all-reduces never returned: shutdown
    gives it a time limit, then ends the process with the run's status (and says so)."""
    code = textwrap.dedent("""
        import os
        import time

        import torch.distributed as dist
        from speccascade.distributed import shutdown
        dist.init_process_group("gloo", rank=0, world_size=1, init_method="file://" + os.environ["STORE"])
        dist.destroy_process_group = lambda *a, **k: time.sleep(600)   # a teardown that hangs
        print("written", flush=True)
        shutdown(timeout_s=1, exit_code=3)
        print("not reached")
    """)
    run = subprocess.run([sys.executable, "-c", code], env=CPU_ENV | {"STORE": str(tmp_path / "store")},
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 3, run.stderr
    assert run.stdout.split() == ["written"]
    assert "teardown did not end in 1 s; exiting without it" in run.stderr
