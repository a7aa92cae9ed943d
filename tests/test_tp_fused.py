"""The tensor-parallel fused backend (issue 17), on a CPU: two ranks over gloo.

1. Its logits equal the unsharded fused backend's (float32) after prefill, ragged extends and
   rollbacks, for a Llama (GQA) and a Qwen2 (q/k/v biases), on every rank; each rank's cache holds
   only its KV heads.
2. ``sd`` and ``verifier_only`` through it give ``--tp 1``'s tokens: greedy, and seeded at T = 1
   (the same draws on both ranks); ``sd``, ``token_v3`` and ``chow`` through it sample Algorithm 4's
   law exactly (20,000 rows, chi-square against the law enumerated from the whole models).
3. The GPU path's program: the sharded step under torch.compile (the all-reduce a functional
   collective, fullgraph) inside a (simulated) captured block gives ``--tp 1``'s tokens.
4. ``--tp 2 --backend fused`` on the command line (torchrun, gloo) prints ``--tp 1``'s tokens.
5. Errors: KV heads that do not divide by N; a non-Llama-family verifier with ``--backend fused``.
6. On 2 GPUs (NCCL; skipped without them): the law check of 2, eager and compiled, each block
   captured as a CUDA graph with its all-reduces.

A sharding mistake (a missing all-reduce, a head block of the wrong rank, a bias added twice)
changes the logits by far more than the tolerance, so 1 fails on it; 2 and 4 then see other tokens;
3 fails without the compiled path's all-reduce.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo over localhost")

SRC = Path(__file__).resolve().parent.parent / "src"
ENV = os.environ | {"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [13], [14, 15, 16]]


def _ranks(rank, store, out_dir):
    """Each check on this rank (one process group for all: starting ranks is what costs); rank r
    writes ``{check: None or the failure}`` to ``out_dir/rank{r}.json``."""
    import traceback

    import torch.distributed as dist

    _init(rank, store)
    results = {}
    for name, check in (("logits llama", lambda: _check_logits(rank, "llama")),
                        ("logits qwen2", lambda: _check_logits(rank, "qwen2")),
                        ("generate", lambda: _check_generate(rank, out_dir)),
                        ("law", _check_law),
                        ("compiled and captured", _check_compiled_captured)):   # last: it patches torch.compile
        try:
            check()
            results[name] = None
        except Exception:  # noqa: BLE001 - reported by the test that reads it
            results[name] = traceback.format_exc()
        dist.barrier()
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
    from speccascade.distributed import shutdown

    shutdown()   # bounded: the teardown after captured all-reduces can hang


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The checks of :func:`_ranks` run once on 2 gloo ranks (processes): {check: [rank 0's, rank 1's failure]}."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("tp")
    mp.spawn(_ranks, args=(str(out / "store"), str(out)), nprocs=2, join=True)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return {k: [r[k] for r in ranks] for k in ranks[0]}, out


def _passed(two_ranks, name):
    failures = two_ranks[0][name]
    assert failures == [None, None], "\n".join(f for f in failures if f)


def _init(rank: int, store: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)


def _model(arch: str):
    """A tiny Qwen2 (q/k/v biases), or a tiny Llama with a bias on every projection (set random, so
    that a bias dropped, or added on both ranks, would show)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny_models import tiny_qwen2

    if arch == "qwen2":
        return tiny_qwen2(0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         attention_bias=True, mlp_bias=True)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (*(getattr(layer.self_attn, f"{x}_proj") for x in "qkvo"),
                         *(getattr(layer.mlp, f"{x}_proj") for x in ("gate", "up", "down"))):
                proj.bias.normal_(0, 0.5)
    return model


def _check_logits(rank, arch):
    import torch.distributed as dist

    from speccascade.models import FusedLlamaBackend

    model = _model(arch)
    whole, shard = FusedLlamaBackend(model, "verifier"), FusedLlamaBackend(model, "verifier", tp=2)
    cfg = model.config
    assert shard.tp_rank == rank and shard.n_kv == cfg.num_key_value_heads // 2
    assert shard.n_heads == cfg.num_attention_heads // 2
    g = torch.Generator().manual_seed(0)
    L = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in PROMPTS])
    for be in (whole, shard):
        be.reserve(4, 80)
        be.reset(ids, mask)
    assert shard.k_cache.shape[2] == cfg.num_key_value_heads // 2   # only this rank's heads are cached
    first = shard.extend(ids[:, -1:])
    torch.testing.assert_close(first, whole.extend(ids[:, -1:]), atol=1e-5, rtol=1e-5)   # after the prefill
    one = torch.ones(4, dtype=torch.long)
    whole.commit(one)
    shard.commit(one)
    for _ in range(8):
        k = int(torch.randint(1, 6, (1,), generator=g))
        tokens = torch.randint(3, cfg.vocab_size, (4, k), generator=g)
        lengths = torch.randint(1, k + 1, (4,), generator=g)
        a, b = whole.extend(tokens, lengths), shard.extend(tokens, lengths)
        for r in range(4):   # the real tokens' logits (padding's are never read)
            torch.testing.assert_close(b[r, :int(lengths[r])], a[r, :int(lengths[r])], atol=1e-5, rtol=1e-5)
        n_keep = torch.stack([torch.randint(0, int(lengths[r]) + 1, (1,), generator=g)[0] for r in range(4)])
        whole.commit(n_keep)   # a rollback: fewer tokens kept than fed
        shard.commit(n_keep)
    assert shard.n_pos.tolist() == whole.n_pos.tolist()
    # both ranks computed the same logits (whole, not a half each)
    both = [torch.zeros_like(b) for _ in range(2)]
    dist.all_gather(both, b)
    assert torch.equal(both[0], both[1])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sharded_logits_equal_unsharded_after_prefill_ragged_extend_and_rollback(arch, two_ranks):
    _passed(two_ranks, f"logits {arch}")


def _check_generate(rank, out_dir):
    import torch.distributed as dist

    import speccascade as sc
    from speccascade.models import FusedLlamaBackend

    from tiny_models import tiny_pair

    d, v = tiny_pair(0, noise=0.05, hidden=64)
    fd, fv1, fv2 = FusedLlamaBackend(d, "drafter"), FusedLlamaBackend(v, "verifier"), \
        FusedLlamaBackend(v, "verifier", tp=2)
    got = {}
    for method in ("sd", "verifier_only"):
        for temperature, seed in ((0.0, 0), (1.0, 3)):
            kw = dict(method=method, gamma=3, temperature=temperature, max_new_tokens=12, seed=seed, eos_token_id=[])
            one, two = sc.generate(fd, fv1, PROMPTS, **kw), sc.generate(fd, fv2, PROMPTS, **kw)
            assert two.tokens == one.tokens, (method, temperature)
            assert two.stats.verifier_calls == one.stats.verifier_calls
            assert two.stats.drafter_calls == one.stats.drafter_calls
            got[f"{method} T={temperature}"] = two.tokens
    ranks = [None, None]
    dist.all_gather_object(ranks, got)
    assert ranks[0] == ranks[1]   # every rank drew the same tokens
    if rank == 0:
        (Path(out_dir) / "tokens.json").write_text(json.dumps(got))


#: the speculative methods whose whole-loop law is checked through the sharded verifier
LAW_METHODS = ("sd", "token_v3", "chow")


def _check_law():
    """Exact law through the sharded verifier: LAW_ROWS rows of each method in LAW_METHODS with the
    verifier split over the ranks, against Algorithm 4's law enumerated from the whole models'
    forward passes (tests/helpers.py); every rank samples (the same rows)."""
    from speccascade.models import FusedLlamaBackend

    from helpers import ALPHA, check_loop_law
    from tiny_models import tiny_pair

    d, v = tiny_pair(1, noise=0.8, vocab=4)
    for name in LAW_METHODS:
        check_loop_law(name, ALPHA[name], d, v, FusedLlamaBackend(d, "drafter"),
                       FusedLlamaBackend(v, "verifier", tp=2))


def test_exact_law_through_the_sharded_verifier(two_ranks):
    """(Replacing the row-parallel all-reduce by a rank's own partial sum fails it; a subtler numeric
    error is the logits check's to catch.)"""
    _passed(two_ranks, "law")


def _gpu_law_ranks(rank, store, out_dir):
    """On GPU ``rank`` (NCCL): the law check of :func:`_check_law` through the sharded fused verifier,
    eager and compiled; its blocks are captured as CUDA graphs with the all-reduces inside."""
    import traceback

    import torch.distributed as dist

    from speccascade import runner
    from speccascade.models import FusedLlamaBackend

    from helpers import ALPHA, check_loop_law
    from tiny_models import tiny_pair

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=2)
    results = {}
    d, v = (m.to("cuda") for m in tiny_pair(1, noise=0.8, vocab=4))
    for compile in (False, True):
        fd = FusedLlamaBackend(d, "drafter", compile=compile)
        fv = FusedLlamaBackend(v, "verifier", compile=compile, tp=2)
        for name in LAW_METHODS:
            try:
                check_loop_law(name, ALPHA[name], d, v, fd, fv)
                assert runner.graph_cache(fv), "the block was not captured"
                results[f"{name} compile={compile}"] = None
            except Exception:  # noqa: BLE001 - reported by the test
                results[f"{name} compile={compile}"] = traceback.format_exc()
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
    from speccascade.distributed import shutdown

    shutdown()   # bounded: the teardown after captured all-reduces can hang


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_exact_law_through_the_sharded_verifier_on_two_gpus(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_gpu_law_ranks, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    failures = [f for r in range(2) for f in json.loads((tmp_path / f"rank{r}.json").read_text()).values() if f]
    assert not failures, "\n".join(failures)


def _check_compiled_captured():
    """The GPU path's program on a CPU: the sharded step traced by torch.compile (fullgraph, the
    all-reduce a functional collective; ``aot_eager``: the graph inductor would compile, without
    its C++ build) and the block run as replays of a captured program (simulated as in
    tests/helpers.py: a replay calls the same step on the same state). Tokens equal --tp 1's."""
    import speccascade as sc
    from speccascade import loop, runner
    from speccascade.models import FusedLlamaBackend

    from helpers import SimulatedCalls, simulated_capture_graph
    from tiny_models import tiny_pair

    real_capture_error_mode = runner.capture_error_mode
    real_compile = torch.compile
    torch.compile = lambda fn, **kw: real_compile(fn, backend="aot_eager", dynamic=False, fullgraph=True)
    loop._COMPILED.clear()
    captures = []

    runner.can_capture = lambda *bs: all(getattr(b, "capturable", False) for b in bs)
    runner.capture_graph = simulated_capture_graph(captures)
    runner.capture_call = SimulatedCalls().capture_call
    d, v = tiny_pair(0, noise=0.05, hidden=64)
    fd, fv1 = FusedLlamaBackend(d, "drafter"), FusedLlamaBackend(v, "verifier")
    fv2 = FusedLlamaBackend(v, "verifier", compile=True, tp=2)
    assert fv2.compiled and fv2._layer_fn is not fv2._layer
    for method, temperature in (("sd", 0.0), ("sd", 1.0), ("verifier_only", 1.0)):
        kw = dict(method=method, gamma=3, temperature=temperature, max_new_tokens=10, seed=5, eos_token_id=[])
        runner.can_capture = lambda *bs: False
        one = sc.generate(fd, fv1, PROMPTS, **kw)
        runner.can_capture = lambda *bs: all(getattr(b, "capturable", False) for b in bs)
        two = sc.generate(fd, fv2, PROMPTS, **kw)
        assert two.tokens == one.tokens, (method, temperature)
    assert captures   # the block ran as replays
    # on CUDA, captured with the NCCL watchdog thread running: only this thread's calls may break it
    assert real_capture_error_mode() == "thread_local"


def test_compiled_and_captured_sharded_block_equals_tp1(two_ranks):
    _passed(two_ranks, "compiled and captured")


def test_sd_and_verifier_only_through_the_sharded_verifier_equal_tp1(two_ranks):
    _passed(two_ranks, "generate")
    got = json.loads((two_ranks[1] / "tokens.json").read_text())
    assert len(got) == 4
    assert got["sd T=1.0"] != got["sd T=0.0"]   # the seeded run did sample


PROMPT = "In the beginning God created the heaven and the earth."


def test_cli_tp2_fused_equals_tp1(tmp_path, capsys):
    """``torchrun --nproc-per-node 2 -m speccascade generate --tp 2 --backend fused`` (gloo): greedy
    ``sd`` and its ``--compare`` ``verifier_only`` run print ``--tp 1``'s tokens and text; the
    embedded verifier (6 query heads, 2 KV heads) is split 3 + 1 per rank."""
    from speccascade.cli import main

    argv = ["generate", "--temperature", "0", "--max-new-tokens", "10", "--json", "--quiet", "--compare",
            "--backend", "fused", PROMPT]
    assert main(argv) == 0
    a = json.loads(capsys.readouterr().out)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "speccascade", *argv, "--tp", "2"], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1   # rank 0 alone prints
    b = json.loads(lines[0])
    assert b["tokens"] == a["tokens"] and b["text"] == a["text"]
    assert b["verifier_only"]["text"] == a["verifier_only"]["text"]
    for k in ("verifier_calls", "drafter_calls", "accepted"):
        assert b["stats"][k] == a["stats"][k]


# --------------------------------------------------------------------------------------------
# errors


def _save(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def test_kv_heads_that_do_not_divide_are_refused(tmp_path, monkeypatch, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from speccascade.cli import main
    from speccascade.errors import SpecCascadeError
    from speccascade.models import FusedLlamaBackend
    from speccascade.models.loading import TOKENIZER_DIR, embedded_pair_dirs

    cfg = LlamaConfig(vocab_size=8000, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=3, num_key_value_heads=3, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    with pytest.raises(SpecCascadeError, match=r"--tp 2: the verifier's 3 key/value heads \(3 query heads\) do not "
                                               r"divide by 2"):
        FusedLlamaBackend(model, "verifier", tp=2)   # before any process group is needed
    odd = _save(model, tmp_path / "odd")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    for backend in ("fused", "auto"):   # before any process group starts or weights load
        assert main(["generate", "--tp", "2", "--backend", backend, "--drafter", str(embedded_pair_dirs("tiny")[0]),
                     "--verifier", str(odd), "--tokenizer", str(TOKENIZER_DIR), "--format", "raw", "x"]) == 2
        err = capsys.readouterr().err
        assert "3 key/value heads (3 query heads) do not divide by 2" in err, err
    import torch.distributed as dist

    assert not dist.is_initialized()


def test_non_llama_verifier_with_backend_fused_tp2_is_refused(tmp_path, monkeypatch, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from speccascade.cli import main
    from speccascade.distributed import check_tp, tp_uses_fused
    from speccascade.errors import SpecCascadeError
    from speccascade.models.loading import TOKENIZER_DIR, embedded_pair_dirs

    gpt = _save(GPT2LMHeadModel(GPT2Config(vocab_size=8000, n_embd=32, n_layer=1, n_head=2, n_positions=64)),
                tmp_path / "gpt2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(["generate", "--tp", "2", "--backend", "fused", "--drafter", str(embedded_pair_dirs("tiny")[0]),
                 "--verifier", str(gpt), "--tokenizer", str(TOKENIZER_DIR), "--format", "raw", "x"]) == 2
    err = capsys.readouterr().err
    assert "--tp 2 --backend fused: the fused backend implements llama, qwen2, mistral models; the verifier is " \
           "gpt2" in err and "give --backend dynamic" in err, err
    assert tp_uses_fused(gpt, 2, "auto") is False   # auto: transformers' sharding for it
    assert tp_uses_fused(embedded_pair_dirs("tiny")[1], 2, "auto") is True
    assert tp_uses_fused(embedded_pair_dirs("tiny")[1], 2, "dynamic") is False
    for backend in ("static", "compiled", "graphs"):
        with pytest.raises(SpecCascadeError, match=f"--tp 2 needs --backend dynamic, fused or auto: the '{backend}'"):
            check_tp(2, "cpu", backend)
    import torch.distributed as dist

    assert not dist.is_initialized()


def test_a_model_sharded_by_transformers_is_not_sharded_again():
    """auto on a verifier transformers sharded (``--tp --backend dynamic``'s) gives the dynamic backend."""
    from speccascade.models import make_backend

    from tiny_models import tiny_llama

    model = tiny_llama(0)
    model._tp_size = 2   # what transformers' from_pretrained(distributed_config=...) leaves
    assert type(make_backend(model, "verifier", "auto")).__name__ == "HFBackend"
    from speccascade.runner import capture_error_mode

    assert capture_error_mode() == "global"   # one process: torch's default capture checks

