"""The fused backend and the device-resident block, on the CPU.

1. (The fused step's logits against transformers' after ragged feeds and rollbacks:
   tests/test_hf_backend.py, with the other backends.)
2. Every method gives the dynamic backend's tokens through it (greedy and seeded): the same block
   function, on other state.
3. The captured path's bookkeeping (a captured program reused across calls: state copied in, the
   caches re-filled, the generator carried over) with the CUDA capture replaced by a simulation
   that replays the same step function (the ``simulated_capture`` fixture of conftest.py); its
   output equals the eager path's.
4. Capacity is settled before decoding: the issue's failing case (prompt 3, 40 new tokens,
   gamma 5) runs, and a static cache too small for a request is refused up front.
"""

import pytest
import torch

import speccascade as sc
from speccascade import runner
from speccascade.errors import SpecCascadeError
from speccascade.models import FusedLlamaBackend, UnsupportedModel, make_backend

from tiny_models import tiny_pair


def test_fused_refuses_other_architectures_and_auto_falls_back():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=48, n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    with pytest.raises(UnsupportedModel, match="use --backend graphs or compiled"):
        make_backend(gpt2, "verifier", "fused")
    with pytest.warns(UserWarning, match="falling back to the dynamic backend"):
        be = make_backend(gpt2, "verifier", "auto")
    assert type(be).__name__ == "HFBackend"


PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16], [17]]
METHODS = [("sd", None, {}), ("token_v3", 0.5, {}), ("lossy_tuned", 0.3, {}), ("bild_star", 1.5, {}),
           ("opt", 0.5, {}), ("verifier_only", None, {}), ("drafter_only", None, {}), ("token_cascade", 0.4, {}),
           ("bild", 2.0, {}), ("oracle_diff", 0.0, {}), ("seq_cascade", 0.5, {"length_normalized": True})]


@pytest.mark.parametrize("name,alpha,extra", METHODS, ids=[m[0] for m in METHODS])
def test_fused_backend_gives_the_dynamic_backends_tokens(name, alpha, extra):
    d, v = tiny_pair(0, noise=0.05)
    fd, fv = FusedLlamaBackend(d, "drafter"), FusedLlamaBackend(v, "verifier")
    for temperature, seed in ((0.0, 0), (1.0, 3)):
        kw = dict(method=name, alpha=alpha, gamma=3, temperature=temperature, max_new_tokens=14, seed=seed,
                  eos_token_id=[], **extra)
        ref = sc.generate(d, v, PROMPTS, **kw)
        out = sc.generate(fd, fv, PROMPTS, **kw)
        assert out.tokens == ref.tokens
        assert out.stats.to_dict() | {"wall_time_s": 0, "tokens_per_second": 0} == \
            ref.stats.to_dict() | {"wall_time_s": 0, "tokens_per_second": 0}


def test_only_what_the_backend_keeps_moves_to_its_device():
    """``device=``: the backend's tensors are copied there (tied embeddings and head stay one
    tensor), the model stays where it is: under --tp the whole verifier stays on the host while each
    rank's GPU holds its shard. On the model's own device nothing is copied."""
    from speccascade.distributed import mark_tp

    _, v = tiny_pair(0, noise=0.05)
    v.lm_head.weight = v.model.embed_tokens.weight   # tied, as most small LMs are
    fv = FusedLlamaBackend(v, "verifier", device="meta")
    kept = [fv.embed, fv.final_norm, fv.lm_head, fv.inv_freq] + [t for layer in fv.layers
                                                                  for t in layer.values() if t is not None]
    assert fv.device.type == "meta" and all(t.device.type == "meta" for t in kept)
    assert all(p.device.type == "cpu" for p in v.parameters())
    assert fv.embed is fv.lm_head   # one copy of the tied matrix
    same = FusedLlamaBackend(v, "verifier", device="cpu")
    assert same.embed.data_ptr() == v.get_input_embeddings().weight.data_ptr()
    assert make_backend(mark_tp(v, 1, "meta"), "verifier", "fused").device.type == "meta"


def test_greedy_sd_equals_verifier_only_and_transformers_generate():
    d, v = tiny_pair(1, noise=0.3)
    fd, fv = FusedLlamaBackend(d, "drafter"), FusedLlamaBackend(v, "verifier")
    prompt = [5, 6, 7, 8]
    sd = sc.generate(fd, fv, [prompt], method="sd", gamma=4, temperature=0, max_new_tokens=20,
                     eos_token_id=[]).tokens[0]
    alone = sc.generate(fd, fv, [prompt], method="verifier_only", temperature=0, max_new_tokens=20,
                        eos_token_id=[]).tokens[0]
    hf = v.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20, min_new_tokens=20,
                    eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert sd == alone == hf


@pytest.mark.parametrize("per_replay", [1, 3])
def test_captured_path_bookkeeping_matches_eager(simulated_capture, monkeypatch, per_replay):
    """A program captured once serves later calls with other prompts and seeds (state and caches
    re-filled, the caller's generator carried in and out); steps past the end change nothing."""
    monkeypatch.setattr(runner, "BLOCKS_PER_REPLAY", per_replay)
    monkeypatch.setattr(runner, "TOKENS_PER_REPLAY", per_replay)
    d, v = tiny_pair(0, noise=0.05)
    fd, fv = FusedLlamaBackend(d, "drafter"), FusedLlamaBackend(v, "verifier")
    batches = [[[5, 6, 7], [8, 9, 10]], [[11, 12, 13], [14, 15, 16]], [[17, 18, 19], [20, 21, 22]]]
    for method, alpha in (("token_v3", 0.5), ("verifier_only", None)):
        for i, prompts in enumerate(batches):
            kw = dict(method=method, alpha=alpha, gamma=3, temperature=1.0, max_new_tokens=12, eos_token_id=7)
            g_eager, g_graph = torch.Generator().manual_seed(i), torch.Generator().manual_seed(i)
            ref = sc.generate(d, v, prompts, generator=g_eager, **kw)
            out = sc.generate(fd, fv, prompts, generator=g_graph, **kw)
            assert out.tokens == ref.tokens
            s, r = out.stats, ref.stats
            assert (s.accepted, s.rejected, s.blocks, s.drafter_calls, s.verifier_calls, s.emitted) == \
                (r.accepted, r.rejected, r.blocks, r.drafter_calls, r.verifier_calls, r.emitted)
    assert simulated_capture == [per_replay, per_replay]  # one capture per method, reused by later calls


@pytest.mark.parametrize("lag", [False, True])
def test_a_captured_run_leaves_the_generator_where_the_eager_run_does(simulated_capture, monkeypatch, lag):
    """With the flags read one step late (as on a GPU), the step queued past the end draws random
    numbers whose output is dropped; the caller's generator must be put back before them, on the
    captured path as on the eager one, so a method that runs two programs in turn (seq_cascade's
    verifier pass after the drafter's) or a caller's next request draws what it would have drawn.
    (On the GPU, seq_cascade's re-decoded rows came out shifted by a token before the fix.)"""
    from speccascade.loop import StepSync

    monkeypatch.setattr(StepSync, "lagged", lag)
    d, v = tiny_pair(0, noise=0.3)
    fd, fv = FusedLlamaBackend(d, "drafter"), FusedLlamaBackend(v, "verifier")
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16], [17]]
    for method, alpha in (("sd", None), ("verifier_only", None), ("seq_cascade", 0.5)):
        kw = dict(method=method, alpha=alpha, gamma=3, temperature=1.0, max_new_tokens=12, eos_token_id=[])
        g_eager, g_graph = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        ref = sc.generate(d, v, prompts, generator=g_eager, **kw)
        out = sc.generate(fd, fv, prompts, generator=g_graph, **kw)
        assert out.tokens == ref.tokens, method
        assert torch.equal(g_graph.get_state(), g_eager.get_state()), method
    if method == "seq_cascade":
        assert ref.stats.deferred > 0   # the verifier's pass ran: it draws after the drafter's


def test_host_driven_calls_replay_graphs_of_the_step(simulated_capture, simulated_calls):
    """The compiled fused backend's host-driven calls (the pre-fill, and every model call of the
    sequential methods that read the host per token) replay a graph of the step captured per
    (batch, width, logits); calls inside the runner's own programs (sd, verifier_only, both passes
    of seq_cascade) do not. Same tokens and
    counters as the eager backends, over ragged prompts and calls that reuse earlier graphs."""
    d, v = tiny_pair(0, noise=0.3)
    fd, fv = FusedLlamaBackend(d, "drafter"), FusedLlamaBackend(v, "verifier")
    fd.compiled = fv.compiled = True
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    cases = [("token_cascade", 0.5), ("bild", 1.0), ("oracle_diff", 0.0), ("sd", None), ("verifier_only", None),
             ("token_cascade", 0.5), ("seq_cascade", 0.5), ("seq_cascade", 0.978)]   # seq_cascade re-sizes the
    # verifier's batch: last; its second request (length-normalised: some rows defer, some do not)
    # reuses the drafter pass's program, whose scores must start from 0 again
    new_graphs, replays = [], []
    for i, (method, alpha) in enumerate(cases):
        kw = dict(method=method, alpha=alpha, gamma=3, temperature=1.0, max_new_tokens=12, eos_token_id=[])
        if i == len(cases) - 1:
            kw["length_normalized"] = True   # alpha 0.978: one row of three defers
        ref = sc.generate(d, v, prompts, generator=torch.Generator().manual_seed(3), **kw)
        before, replayed = len(simulated_calls), simulated_calls.replays
        out = sc.generate(fd, fv, prompts, generator=torch.Generator().manual_seed(3), **kw)
        new_graphs.append(len(simulated_calls) - before)
        replays.append(simulated_calls.replays - replayed)
        assert out.tokens == ref.tokens, method
        s, r = out.stats, ref.stats
        assert (s.drafter_calls, s.verifier_calls, s.deferred, s.emitted) == \
            (r.drafter_calls, r.verifier_calls, r.deferred, r.emitted), method
    # token_cascade: graphs of the two pre-fills, the drafter's width 1 and the verifier's catch-up
    # widths; the second token_cascade run reuses them all. Every model call of the sequential
    # methods is a replay (one per call, plus a pre-fill per model), but sd's and verifier_only's
    # steps are the runner's programs: they replay the pre-fills only and capture nothing new (this
    # fails if the fused backend replays its own graphs inside the runner's programs).
    assert new_graphs[0] >= 4 and new_graphs[3] == new_graphs[4] == new_graphs[5] == 0
    for i in (0, 1, 2, 5):
        assert replays[i] > 12, cases[i]   # at least a replay per token
    # pre-fills only (again after the runner's warm-up); seq_cascade's passes are single-model programs
    assert replays[3] <= 4 and replays[4] <= 2 and replays[6] <= 4, replays


def test_new_alpha_reuses_the_captured_block(simulated_capture):
    d, v = tiny_pair(0, noise=0.3)
    fd, fv = FusedLlamaBackend(d, "drafter"), FusedLlamaBackend(v, "verifier")
    for alpha in (0.1, 0.9):
        ref = sc.generate(d, v, PROMPTS, method="chow", alpha=alpha, temperature=0, max_new_tokens=10, eos_token_id=[])
        out = sc.generate(fd, fv, PROMPTS, method="chow", alpha=alpha, temperature=0, max_new_tokens=10,
                          eos_token_id=[])
        assert out.tokens == ref.tokens and out.stats.deferred == ref.stats.deferred
    assert len(simulated_capture) == 1


def test_capacity_is_settled_before_decoding():
    """The fused cache is sized from the request; a static cache that a request could outgrow is
    refused before decoding, naming the size it needs, instead of failing mid-way by the seed."""
    d, v = tiny_pair(0, noise=0.5)
    fd, fv = FusedLlamaBackend(d, "drafter"), FusedLlamaBackend(v, "verifier")
    for seed in range(5):
        out = sc.generate(fd, fv, [[1, 2, 3]], method="sd", gamma=5, temperature=1, max_new_tokens=40, seed=seed,
                          eos_token_id=[])
        assert len(out.tokens[0]) == 40
    sd_, sv = make_backend(d, "drafter", "static", 128), make_backend(v, "verifier", "static", 128)
    with pytest.raises(SpecCascadeError, match="static cache of 128 slots.*needs up to"):
        sc.generate(sd_, sv, [[1, 2, 3]], method="sd", gamma=5, temperature=1, max_new_tokens=40, seed=0)


@pytest.mark.slow
def test_compiled_block_arithmetic_matches_eager(simulated_capture, monkeypatch):
    """The arithmetic between model calls, traced by torch.compile (dynamo + AOT autograd, the
    ``aot_eager`` backend: the same graph inductor would compile, without its C++ build), gives the
    eager tokens and counters: in-place updates of the state and of the caches survive tracing."""
    from speccascade import loop

    real_compile = torch.compile
    monkeypatch.setattr(loop, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="aot_eager", dynamic=False))
    d, v = tiny_pair(0, noise=0.3)
    fd, fv = FusedLlamaBackend(d, "drafter"), FusedLlamaBackend(v, "verifier")
    fd.compiled = fv.compiled = True   # the models stay eager; the block's arithmetic is compiled
    for method, alpha, T in (("sd", None, 0.0), ("token_v3", 0.5, 1.0), ("verifier_only", None, 1.0)):
        kw = dict(method=method, alpha=alpha, gamma=3, temperature=T, max_new_tokens=10, seed=2, eos_token_id=[])
        ref = sc.generate(d, v, PROMPTS, **kw)
        out = sc.generate(fd, fv, PROMPTS, **kw)
        assert out.tokens == ref.tokens
        assert (out.stats.accepted, out.stats.deferred, out.stats.verifier_calls) == \
            (ref.stats.accepted, ref.stats.deferred, ref.stats.verifier_calls)
    assert len(loop._COMPILED) == 3   # draft_token, finish_block, finish_single


def test_compiled_fused_backend_pads_ragged_feeds_to_bucket_widths():
    """A compiled fused backend meets a few feed widths only (1, 2, 4, 8, ...): ragged feeds of
    token_cascade / BiLD are padded up; tokens are unchanged."""
    d, v = tiny_pair(0, noise=0.05)
    fd, fv = FusedLlamaBackend(d, "drafter"), FusedLlamaBackend(v, "verifier")
    fd.compiled = fv.compiled = True   # the compiled path's padding, with the eager step
    widths = []
    step = fv._step_fn
    fv._step_fn = lambda tokens, *a, **k: widths.append(tokens.shape[1]) or step(tokens, *a, **k)
    for m, a in (("token_cascade", 0.4), ("bild", 2.0), ("sd", None), ("verifier_only", None)):
        for T in (0.0, 1.0):
            kw = dict(method=m, alpha=a, gamma=3, temperature=T, max_new_tokens=14, seed=3, eos_token_id=[])
            assert sc.generate(fd, fv, PROMPTS, **kw).tokens == sc.generate(d, v, PROMPTS, **kw).tokens, (m, T)
    assert set(widths) <= {1, 2, 4, 8, 16} and 4 in widths


def test_a_new_batch_size_keeps_the_requests_capacity():
    """seq_cascade re-decodes its deferred rows with the verifier alone: a smaller batch on the
    same fused backend, which must keep the capacity generate reserved for the request (here past
    one 64-slot bucket), not shrink to the prompt's."""
    import torch

    from speccascade.baselines import single_model
    from speccascade.sampling import SamplingConfig
    from speccascade.stats import Stats

    d, v = tiny_pair(0, noise=0.5)
    fv = FusedLlamaBackend(v, "verifier")
    sc.generate(fv, fv, PROMPTS, method="verifier_only", max_new_tokens=90, eos_token_id=[])  # reserves 4 x 128
    ids, mask = torch.tensor([[5, 6, 7], [0, 11, 12]]), torch.tensor([[1, 1, 1], [0, 1, 1]])
    args = (ids, mask, SamplingConfig(temperature=0.0), 90, None, None, Stats())
    from speccascade.models import HFBackend

    assert single_model(fv, "verifier", *args) == single_model(HFBackend(v, "verifier"), "verifier", *args)


def test_a_compiled_fused_backend_allows_a_sweeps_worth_of_specialisations():
    """One compiled step per (batch, feed width, cache size): a sweep meets dozens. torch's default
    of 8 recompiles per function stopped a sweep on an H200 (FailOnRecompileLimitHit)."""
    import torch._dynamo

    from speccascade.models import FusedLlamaBackend
    from speccascade.models.loading import embedded_pair_dirs, load_causal_lm

    FusedLlamaBackend(load_causal_lm(embedded_pair_dirs("tiny")[1]), "verifier", compile=True)
    assert torch._dynamo.config.recompile_limit >= 1024


def test_near_the_end_the_host_waits_for_the_last_block_instead_of_queuing_one_past_it(simulated_capture,
                                                                                       monkeypatch):
    """With the flags read one block late (as on a GPU), each decode used to run one block past its
    end. A block whose drafts contain EOS, or after which the next block may reach max_new_tokens,
    says the end is near; the host then reads the block just queued before queuing another, so a
    decode whose end was foreseen runs no block past it (replays == blocks), and one whose end was
    not runs one (replays == blocks + 1). The tokens, counters and the caller's generator are
    always the unlagged run's."""
    from speccascade import loop
    from speccascade.loop import StepSync

    real_end, foreseen = StepSync.end, []

    def end(self, flags):
        done = real_end(self, flags)
        if done:   # read through the wait (nothing queued after it), or one block late (one queued)
            foreseen.append(self.pending is None)
        return done

    monkeypatch.setattr(StepSync, "end", end)
    d, v = tiny_pair(0, noise=0.3)
    fd, fv = FusedLlamaBackend(d, "drafter"), FusedLlamaBackend(v, "verifier")
    cases = [([5, 6, 7, 8, 9, 10], []), ([11, 12], []), ([13, 14, 15, 16], [])]   # the token limit only
    for prompt, _ in list(cases):   # EOS: a token the verifier first emits late, so the decode ends there
        toks = sc.generate(d, v, [prompt], method="verifier_only", max_new_tokens=12, eos_token_id=[]).tokens[0]
        cases += [(prompt, [toks[i]]) for i in range(8, len(toks)) if toks[i] not in toks[:i]][:1]   # 2+ blocks
    ends = []
    for prompt, eos in cases:
        runs = {}
        for lag in (False, True):
            monkeypatch.setattr(StepSync, "lagged", lag)
            gen = torch.Generator().manual_seed(1)
            before = {k: c.replays for k, c in runner.graph_cache(fv).items()}
            # EOS: greedy (it ends where the verifier's greedy decode emits it), far from the token limit
            out = sc.generate(fd, fv, [prompt], method="sd", gamma=3, temperature=0.0 if eos else 1.0,
                              eos_token_id=eos, max_new_tokens=40 if eos else 12, generator=gen)
            replays = sum(c.replays - before.get(k, 0) for k, c in runner.graph_cache(fv).items()
                          if k[0] == "speculative")
            runs[lag] = (out.tokens, out.stats.blocks, out.stats.accepted, gen.get_state(), replays, foreseen[-1])
        (tok0, blocks0, acc0, gen0, replays0, _), (tok1, blocks1, acc1, gen1, replays1, seen) = runs[False], runs[True]
        assert tok1 == tok0 and (blocks1, acc1) == (blocks0, acc0) and torch.equal(gen1, gen0), (prompt, eos)
        assert replays0 == blocks0                                 # read at once: never past the end
        assert replays1 == blocks1 + (0 if seen else 1) == blocks1 + out.stats.steps_past_end, (prompt, eos)
        ends.append((tok1[0][-1:] == eos, seen))   # (ended by EOS, foreseen)
    assert (False, True) in ends   # the token limit foreseen
    assert (True, False) in ends   # an EOS these random drafters did not see coming: one block past it
    # every block says "near" (a threshold of 0): each end is foreseen, each block waited for
    monkeypatch.setattr(loop, "NEAR_END_EOS_PROB", 0.0)
    for prompt, eos in cases[3:]:
        monkeypatch.setattr(StepSync, "lagged", True)
        before = {k: c.replays for k, c in runner.graph_cache(fv).items()}
        out = sc.generate(fd, fv, [prompt], method="sd", gamma=3, temperature=0.0, eos_token_id=eos, max_new_tokens=40)
        replays = sum(c.replays - before.get(k, 0) for k, c in runner.graph_cache(fv).items() if k[0] == "speculative")
        assert out.tokens[0][-1:] == eos and foreseen[-1] and replays == out.stats.blocks
        assert out.stats.steps_past_end == 0
    # one-model decoding foresees the token limit too (it has no look-ahead for EOS)
    before = {k: c.replays for k, c in runner.graph_cache(fv).items()}
    out = sc.generate(fd, fv, [[11, 12]], method="verifier_only", max_new_tokens=12, eos_token_id=[])
    replays = sum(c.replays - before.get(k, 0) for k, c in runner.graph_cache(fv).items() if k[0] == "single")
    assert foreseen[-1] and replays == len(out.tokens[0]) == 12


def test_the_cache_layout_benchmark_compares_equal_attention(monkeypatch):
    """benchmarks/cache_layout.py times the head-major cache's attention (the backend's own
    ``gqa_attention``) against the slot-major one it replaced: on the same inputs the two give the
    same output (GQA: 4 query heads over 2 KV heads, a feed of 3 at positions 5..7, slots past them
    and the trash slot masked) and write the feed's K/V to the same slots, so the benchmark compares
    equal work. The output also equals attention computed head by head from scratch."""
    from pathlib import Path

    from speccascade.train.trainer import Shape

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import cache_layout as cl

    shape = Shape(hidden=32, layers=1, heads=4, kv_heads=2, intermediate=16)
    out, written = {}, {}
    for layout, fn in cl.LAYOUTS.items():
        caches, q, k, v, rows, slots, bias = cl.inputs(layout, shape, 20, 5, 3, "cpu", torch.float32)
        out[layout] = fn(q, k, v, caches[0][0], caches[1][0], rows, slots, bias, 0.25)
        kc = caches[0][0] if layout == "head_major" else caches[0][0].transpose(1, 2)   # -> [B, Hkv, n, D]
        written[layout] = kc[0, :, :8]
    torch.testing.assert_close(out["head_major"], out["slot_major"])
    torch.testing.assert_close(written["head_major"], written["slot_major"])
    # the backend allocates the layout the benchmark times: head-major, rows of a multiple of 8 slots
    from speccascade.models.fused import CACHE_ALIGN

    model = tiny_pair()[1]
    be = FusedLlamaBackend(model, "verifier")
    be.reserve(2, 70)   # 128 slots + the trash slot -> 136
    cfg = model.config
    assert be.k_cache.shape == (cfg.num_hidden_layers, 2, cfg.num_key_value_heads, 136, be.head_dim)
    assert be.k_cache.shape[3] % CACHE_ALIGN == 0 and be.slots == 128
    # from scratch: query head h (KV head h // 2) at position 5 + i sees slots 0 .. 5 + i
    caches, q, k, v, *_ = cl.inputs("head_major", shape, 20, 5, 3, "cpu", torch.float32)
    kc, vc = caches[0][0, 0], caches[1][0, 0]          # [Hkv, n, D], before the feed is written
    kc[:, 5:8], vc[:, 5:8] = k[0].transpose(0, 1), v[0].transpose(0, 1)
    for h in range(4):
        for i in range(3):
            att = torch.softmax(kc[h // 2, : 6 + i] @ q[0, i, h] * 0.25, -1)
            torch.testing.assert_close(out["head_major"][0, i, h * 8:(h + 1) * 8], att @ vc[h // 2, : 6 + i])


def test_a_replayed_decode_of_one_row_reads_its_flags_at_once_on_a_gpu(simulated_capture, monkeypatch):
    """StepSync's policy: on a GPU the flags are read one step late, except in a replayed (captured)
    decode of one row, which reads each replay's at once (runner.AT_ONCE_ROWS); a forced ``lagged``
    wins, and a CPU never lags unless forced. ``run_steps`` tells the sync the replayed rows: a
    captured batch-1 decode on the simulated capture asks for one row, a batch of two for two."""
    from speccascade.runner import StepSync
    from speccascade.stats import Stats

    def lag(device, rows, forced=None):
        monkeypatch.setattr(StepSync, "lagged", forced)
        sync = StepSync(torch.device(device), Stats(), ["verifier"])   # (builds no CUDA state)
        if rows is not None:
            sync.replayed(rows)
        return sync.lag

    assert lag("cuda", None) and lag("cuda", 2) and not lag("cuda", 1)   # eager steps and batches: late
    assert lag("cuda", 1, forced=True) and not lag("cuda", 2, forced=False)
    assert not lag("cpu", None) and not lag("cpu", 2) and lag("cpu", 1, forced=True)
    monkeypatch.setattr(StepSync, "lagged", None)

    seen = []
    replayed = StepSync.replayed
    monkeypatch.setattr(StepSync, "replayed", lambda self, rows: (seen.append(rows), replayed(self, rows))[1])
    d, v = tiny_pair(0, noise=0.3)
    fd, fv = FusedLlamaBackend(d, "drafter"), FusedLlamaBackend(v, "verifier")
    for prompts in ([[5, 6, 7]], [[5, 6, 7], [8, 9]]):
        for method in ("sd", "verifier_only"):
            sc.generate(fd, fv, prompts, method=method, gamma=3, max_new_tokens=6, temperature=1.0,
                        generator=torch.Generator().manual_seed(0))
    assert seen == [1, 1, 2, 2] and runner.AT_ONCE_ROWS == 1


def test_an_extend_launches_one_device_op_of_its_own(monkeypatch):
    """The feed's positions are worked out inside the step (its compiled prologue, from each row's
    first position: a view of the cached-token count), so a plain ``extend`` dispatches one device
    op of its own, the count's update, and a ragged one two (its mask, the update); before, a plain
    extend made three (positions, mask, update), each a kernel in every call of a speculative
    block. The step still sees each row's count before the update."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.in_step = [], False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            view = not func._schema.is_mutable and any(r.alias_info for r in func._schema.returns)
            if not view and not self.in_step:   # (a view, e.g. slice or unsqueeze, launches no kernel)
                self.ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    d, _ = tiny_pair(0)
    fd = FusedLlamaBackend(d, "drafter")
    fd.reserve(2, 32)
    fd.reset(torch.tensor([[5, 6, 7], [0, 8, 9]]), torch.tensor([[1, 1, 1], [0, 1, 1]]))
    seen, count = [], Count()
    out = torch.zeros(2, 3, fd.vocab_size)

    def step(tokens, positions, valid, k_cache, v_cache):   # the step's own ops are not the extend's
        count.in_step = True
        seen.append((fd._feed(positions, valid, tokens.shape[1])[0].clone(), valid))
        count.in_step = False
        return out

    monkeypatch.setattr(fd, "_step_fn", step)
    ragged = (torch.tensor([[3, 4, 5], [6, 7, 8]]), torch.tensor([3, 1]), ["lt.Tensor", "add_.Tensor"])
    for feed, lengths, own in ((torch.tensor([[3], [4]]), None, ["add_.Tensor"]), ragged):
        before = fd.n_pos.clone()
        count.ops = []
        with count:
            fd.extend(feed, lengths)
        assert count.ops == own
        positions, valid = seen[-1]
        assert positions.tolist() == (before.unsqueeze(1) + torch.arange(feed.shape[1])).tolist()
        assert (valid is None) == (lengths is None)
        assert fd.n_pos.tolist() == (before + (feed.shape[1] if lengths is None else lengths)).tolist()


def test_compiled_regions_trace_whole_and_match_eager(monkeypatch):
    """``compile=True`` compiles the prologue (which now makes a feed's positions from each row's
    first position), one decoder layer and the head, each with ``fullgraph=True``; traced by dynamo +
    AOT autograd (``aot_eager``: the graph inductor would compile, without its C++ build), a compiled
    backend gives the eager one's logits, ragged feeds (padded to bucket widths) and a rollback included."""
    import torch._dynamo

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **(kw | {"backend": "aot_eager",
                                                                                     "options": None})))
    d, _ = tiny_pair(0)
    compiled, eager = FusedLlamaBackend(d, "d", compile=True), FusedLlamaBackend(d, "d")
    assert compiled.compiled
    outs = []
    for be in (compiled, eager):
        be.reserve(2, 24)
        be.reset(torch.tensor([[5, 6, 7], [0, 8, 9]]), torch.tensor([[1, 1, 1], [0, 1, 1]]))
        a = be.extend(torch.tensor([[3, 5, 6], [4, 7, 8]]))
        be.commit(torch.tensor([2, 3]))
        b = be.extend(torch.tensor([[9, 10, 4], [11, 3, 4]]), torch.tensor([1, 3]))
        c = be.extend(torch.tensor([[12], [13]]))
        outs.append(torch.cat([a, b, c], 1))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-6)
