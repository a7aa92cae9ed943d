"""The fast path on a GPU: the static backend under torch.compile with CUDA graphs, and the loop
reading its flags one block late (StepSync). Skipped where no GPU exists (CI); run on the device
machine with ``python -m pytest tests/test_gpu.py``.

1. Greedy outputs equal the plain (dynamic-cache, eager) verifier's; sampled outputs equal the
   dynamic backend's with the same seed (ragged batch, several methods and feed widths).
2. Exact law: 20,000 rows through the compiled backend, the empirical law of 3 tokens against the
   law of Algorithm 4 enumerated (tests/reference.py) from the same models' fresh forward passes.
"""

import pytest
import torch

import speccascade as sc

from helpers import (
    LAW_LEVEL,
    LAW_PROMPT,
    LAW_ROWS,
    LAW_TOKENS,
    check_feature_law,
    check_loop_law,
    check_static_matches_dynamic,
    check_unrolled_training,
    chi2_pvalue,
    empirical,
    feature_pair,
    logits_at,
)
from reference import algorithm4_law, sampling_dist
from tiny_models import tiny_pair

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

def test_compiled_static_backend_on_gpu_matches_plain_path():
    check_static_matches_dynamic(compile=True, device="cuda")


def test_graph_backend_on_gpu_matches_plain_path():
    from speccascade.models import GraphHFBackend

    check_static_matches_dynamic(compile=True, device="cuda",
                                 factory=lambda m, name, n, compile: GraphHFBackend(m, name, n))


def test_graph_backend_rejects_non_bucket_widths():
    from speccascade.errors import SpecCascadeError
    from speccascade.models import GraphHFBackend

    d, _ = (m.to("cuda") for m in tiny_pair(0, noise=0.05))
    with pytest.raises(SpecCascadeError, match="bucket widths"):
        GraphHFBackend(d, "drafter", 64, widths=(1, 3))


@pytest.fixture(scope="module", params=["compiled", "graphs"])
def compiled_pair(request):
    from speccascade.models import make_backend

    d, v = (m.to("cuda") for m in tiny_pair(1, noise=0.8, vocab=4))
    return d, v, make_backend(d, "drafter", request.param, 128), make_backend(v, "verifier", request.param, 128)


@pytest.mark.parametrize("name,alpha", [("sd", None), ("token_v3", 0.5), ("lossy_tuned", 0.4), ("chow", 0.35),
                                        ("bild_star", 1.2)])
def test_compiled_loop_law_on_gpu(name, alpha, compiled_pair):
    check_loop_law(name, alpha, *compiled_pair)


# ---------------------------------------------------------------------------------------------
# the fused backend: the whole block captured as one CUDA graph (speccascade.runner)


def fused_pair(seed=1, noise=0.8, vocab=4, compile=False):
    from speccascade.models import FusedLlamaBackend

    d, v = (m.to("cuda") for m in tiny_pair(seed, noise=noise, vocab=vocab))
    return d, v, FusedLlamaBackend(d, "drafter", compile=compile), FusedLlamaBackend(v, "verifier", compile=compile)


@pytest.mark.parametrize("name,alpha,compile", [
    ("sd", None, False), ("token_v3", 0.5, False), ("lossy_tuned", 0.4, False), ("chow", 0.35, False),
    ("bild_star", 1.2, False), ("opt", 0.5, False), ("token_v1", 0.0, False),
    ("sd", None, True), ("token_v3", 0.5, True), ("lossy", 0.4, True), ("diff", 0.05, True)])
def test_captured_block_law_on_gpu(name, alpha, compile):
    """20,000 rows through the captured block (one CUDA graph per block) against Algorithm 4's law;
    ``compile``: the models and the block's arithmetic torch.compile'd, prompts pre-filled by graphs."""
    from speccascade import runner

    pair = fused_pair(compile=compile)
    check_loop_law(name, alpha, *pair)
    assert runner.graph_cache(pair[3]), "the block was not captured"


@pytest.mark.parametrize("name,alpha", [("sd", None), ("diff", 0.05)])
def test_captured_block_law_with_the_split_argmax_on_gpu(name, alpha, monkeypatch):
    """The captured, compiled block with its argmaxes split into chunks (sampling.wide_argmax; V = 4 in
    chunks of 2, as a 49,152-token row in chunks of 1,024) against Algorithm 4's law."""
    from speccascade import loop, runner, sampling

    monkeypatch.setattr(sampling, "ARGMAX_CHUNK", 2)
    monkeypatch.setattr(loop, "_COMPILED", {})   # compiled afresh under the patched chunk
    torch._dynamo.reset()
    pair = fused_pair(compile=True)
    check_loop_law(name, alpha, *pair)
    assert runner.graph_cache(pair[3]), "the block was not captured"
    torch._dynamo.reset()


def test_split_argmax_compiled_on_gpu_is_argmax():
    """On the GPU and compiled, as the block runs it: the split argmax of 49,152-token rows (random,
    bf16 rounded to many ties, a maximum at a chunk's border) is torch.argmax's index."""
    from speccascade.sampling import wide_argmax

    g = torch.Generator(device="cuda").manual_seed(0)
    rows = [torch.randn(1, 49152, device="cuda", generator=g), torch.randn(6, 49152, device="cuda", generator=g),
            torch.randn(2, 49152, device="cuda", generator=g).bfloat16().float().round(),
            torch.full((1, 50000), -3.0, device="cuda")]
    rows[3][0, [2047, 2048, 49999]] = 1.0
    split = torch.compile(wide_argmax)
    for x in rows:
        assert torch.equal(split(x), x.argmax(-1))
    assert split(rows[3]).item() == 2047


@pytest.mark.parametrize("name,temperature", [("diff", 1.0), ("opt_log", 0.0), ("token_v3", 1.0)])
def test_bonus_draft_beside_the_verifier_on_gpu(name, temperature, monkeypatch):
    """In a captured, compiled block a cascade's call at the bonus position runs on a second stream
    beside the verifier's call (loop.bonus_draft_beside; its law: test_captured_block_law_on_gpu with
    compile). Against the one-stream block, the same seed draws the same tokens, row for row."""
    from speccascade import loop, runner

    d, v, fd, fv = fused_pair(compile=True, vocab=16)
    ids = torch.randint(3, 16, (8, 5), generator=torch.Generator().manual_seed(0))
    kw = dict(method=name, alpha=sc.METHODS[name].check_alpha(None), gamma=4, max_new_tokens=24, seed=3,
              temperature=temperature, eos_token_id=[])
    assert loop.bonus_draft_beside(fd, fv, loop.DecodeRequest(sc.METHODS[name], None, 4, None, 24), compiled=True)
    beside = sc.generate(fd, fv, ids, **kw)
    monkeypatch.setattr(loop, "BONUS_DRAFT_BESIDE", False)
    serial = sc.generate(fd, fv, ids, **kw)
    assert beside.tokens == serial.tokens
    assert beside.stats.accepted == serial.stats.accepted
    # each block captured as its own program (the switch is part of a program's key): the beside one ran
    assert {key[-1] for key in runner.graph_cache(fv) if key[0] == "speculative"} == {True, False}


@pytest.mark.parametrize("name", ["sd", "opt"])
def test_captured_feature_drafter_law_on_gpu(name):
    """A drafter reading the verifier's states (speccascade.models.features) through the compiled
    fused backends, the whole block captured: Algorithm 4's law with that drafter's q."""
    from speccascade import runner
    from speccascade.models import make_backend

    fd, v = feature_pair(device="cuda")
    bd, bv = make_backend(fd, "drafter", "fused"), make_backend(v, "verifier", "fused")
    assert bd.compiled and bv.compiled
    check_feature_law(name, fd, v, bd, bv)
    assert runner.graph_cache(bv), "the block was not captured"


def test_captured_single_model_law_on_gpu():
    from speccascade import runner

    d, v, fd, fv = fused_pair()
    out = sc.generate(fd, fv, torch.tensor([LAW_PROMPT] * LAW_ROWS), method="verifier_only",
                      max_new_tokens=LAW_TOKENS, seed=0, temperature=1.0, eos_token_id=[])
    assert runner.graph_cache(fv)
    lp = logits_at(v)
    law = algorithm4_law(lambda pre: sampling_dist(lp(pre)), lambda pre: sampling_dist(lp(pre)),
                         lambda q, p, pre: p, lambda q, p, pi: p, gamma=1, prompt=LAW_PROMPT, n=LAW_TOKENS)
    assert chi2_pvalue(empirical(out.tokens), law, LAW_ROWS) > LAW_LEVEL


@pytest.mark.parametrize("compile", [False, True])
def test_captured_greedy_sd_equals_verifier_and_transformers_on_gpu(compile):
    """fp32: greedy sd through the captured block == greedy verifier_only == transformers' greedy
    generate, batched with ragged prompts; and a seed gives the same sampled output twice."""
    d, v, fd, fv = fused_pair(seed=0, noise=0.05, vocab=48, compile=compile)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16], [17]]
    ref = sc.generate(d, v, prompts, method="verifier_only", temperature=0, max_new_tokens=24, eos_token_id=[]).tokens
    for gamma in (1, 4):
        assert sc.generate(fd, fv, prompts, method="sd", temperature=0, gamma=gamma, max_new_tokens=24,
                           eos_token_id=[]).tokens == ref
    assert sc.generate(fv, fv, prompts, method="verifier_only", temperature=0, max_new_tokens=24,
                       eos_token_id=[]).tokens == ref
    for p, r in zip(prompts, ref):
        hf = v.generate(torch.tensor([p], device="cuda"), do_sample=False, max_new_tokens=24, min_new_tokens=24,
                        eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert hf == r
    a = sc.generate(fd, fv, prompts, method="token_v3", alpha=0.5, temperature=1, max_new_tokens=24, seed=7)
    b = sc.generate(fd, fv, prompts, method="token_v3", alpha=0.5, temperature=1, max_new_tokens=24, seed=7)
    assert a.tokens == b.tokens and a.stats.accepted == b.stats.accepted


@pytest.mark.parametrize("compile", [False, True])
def test_host_driven_methods_replay_graphs_of_the_fused_step_on_gpu(compile):
    """fp32: the sequential methods that read the host per token (token_cascade, BiLD, the oracle,
    seq_cascade) on a compiled fused pair replay a CUDA graph of the step per model call (and the
    pre-fills): greedy and seeded outputs equal the dynamic backend's."""
    d, v, fd, fv = fused_pair(seed=0, noise=0.3, vocab=48, compile=compile)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16], [17]]
    for method, alpha in (("token_cascade", 0.5), ("bild", 1.0), ("oracle_diff", 0.0), ("seq_cascade", 0.5)):
        for temperature in (0.0, 1.0):
            kw = dict(method=method, alpha=alpha, temperature=temperature, max_new_tokens=16, seed=3, eos_token_id=[])
            ref, out = sc.generate(d, v, prompts, **kw), sc.generate(fd, fv, prompts, **kw)
            assert out.tokens == ref.tokens, (method, temperature)
            assert out.stats.verifier_calls == ref.stats.verifier_calls, (method, temperature)
    assert bool(fv._graphs) == compile   # compiled: host-driven calls were graph replays


@pytest.mark.parametrize("compile", [False, True])
def test_fused_t5_on_gpu(compile):
    """fp32: the fused T5 pair (compiled per region, the block captured) gives transformers' greedy
    generate through greedy sd, and the eager seq2seq backend's seeded samples (captured sd and
    token_v3, host-driven token_cascade), batched with sources of different lengths."""
    from tiny_seq2seq import tiny_seq2seq_pair

    from speccascade import runner
    from speccascade.models.fused_t5 import FusedT5Backend

    d, v = (m.to("cuda") for m in tiny_seq2seq_pair("t5", noise=0.1, feed_forward_proj="gated-gelu"))
    fd, fv = FusedT5Backend(d, "drafter", compile=compile), FusedT5Backend(v, "verifier", compile=compile)
    srcs = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16], [17]]
    greedy = sc.generate(fd, fv, srcs, method="sd", gamma=3, temperature=0, max_new_tokens=16, eos_token_id=[]).tokens
    for src, got in zip(srcs, greedy):
        hf = v.generate(torch.tensor([src], device="cuda"), do_sample=False, max_new_tokens=16, min_new_tokens=16,
                        eos_token_id=None)[0, 1:].tolist()
        assert got == hf
    for method, alpha in (("sd", None), ("token_v3", 0.5), ("token_cascade", 0.5)):
        kw = dict(method=method, alpha=alpha, gamma=3, temperature=1.0, max_new_tokens=16, seed=5, eos_token_id=[])
        assert sc.generate(fd, fv, srcs, **kw).tokens == sc.generate(d, v, srcs, **kw).tokens, method
    assert runner.graph_cache(fv), "the block was not captured"


def test_unrolled_feature_training_on_gpu():
    """``train --feature-unroll``'s unrolled forward and backward on CUDA under bf16 autocast (the
    trainer's): each depth's logits within 5% (of the largest) of the loop's q from its definition
    (float32, on the CPU); gradients finite. (On the CPU, the whole pair in bf16 is within 0.9%
    of float32 at every depth, and one depth's logits differ from the next's by ~70%: 5% tells rounding
    from a wrong chain or mask.) The GPU run trains the feature drafter unrolled only where this passed
    (benchmarks/gpu_deep_pair_run.sh, FEATURE_UNROLL)."""
    check_unrolled_training("cuda", tolerance=0.05)
