"""The fused T5 backend (``FusedT5Backend``) on the CPU, against transformers' T5 and the seq2seq backend.

1. Logits equal a fresh teacher-forced transformers forward (fp32) after ragged extends with
   ``lengths`` and rollbacks by ``commit``, for a ragged batch of encoder inputs (left and right
   padding, and a longer source that grows the cross-attention buffers): ReLU and gated-GELU
   feed-forwards, the tied head (decoder output scaled by d_model ** -0.5) and an untied one.
2. Greedy ``sd`` with a fused T5 drafter and verifier equals the verifier's own
   ``generate(do_sample=False)``, batched, encoder inputs of different lengths.
3. Exact law (Algorithm 4, enumerated from fresh transformers calls; tests/reference.py) for
   speculative methods through the fused backend, and the captured path's bookkeeping (the
   ``simulated_capture`` fixture: a program captured once, reused across requests, re-captured when
   the cross-attention buffers grow) against the eager seq2seq backend.
4. Backend choice and bad inputs: ``fused`` on BART, mixed architectures.

5. (slow) ``compile=True``: the prologue, one layer and the head each trace as one graph
   (``fullgraph=True``, dynamo + AOT autograd with the ``aot_eager`` backend) and give the eager
   logits.

The CUDA-graph capture and the inductor (GPU) compile of this backend are not exercised here (CPU only).
"""

import pytest
import torch
from tiny_seq2seq import (
    GAMMA,
    LEVEL,
    N_ROWS,
    N_TOKENS,
    SOURCES,
    hf_greedy,
    law_models,
    tiny_seq2seq,
    tiny_seq2seq_pair,
)

import speccascade as sc
from speccascade.errors import SpecCascadeError
from speccascade.models import FusedT5Backend, Seq2SeqBackend, UnsupportedModel, make_backend

from helpers import ALPHA, chi2_pvalue, empirical, seq2seq_loop_law_pvalue
from reference import algorithm4_law, reference_rule, sampling_dist, softmax

VARIANTS = {"relu-tied": {}, "gated-tied": {"feed_forward_proj": "gated-gelu"},
            "relu-untied": {"tie_word_embeddings": False},
            "gated-untied": {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}}


def t5(variant: str, seed: int = 0):
    """A tiny T5 whose decoder positions matter (a scaled position-bias table); untied: its own LM
    head weights and no output scaling."""
    extra = VARIANTS[variant]
    m = tiny_seq2seq("t5", seed=seed, **extra)
    with torch.no_grad():
        m.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.mul_(8.0)
        if extra.get("tie_word_embeddings") is False:
            m.lm_head.weight = torch.nn.Parameter(torch.randn_like(m.lm_head.weight))
    assert (m.lm_head.weight.data_ptr() == m.shared.weight.data_ptr()) == ("untied" not in variant)
    return m


def padded(srcs, padding):
    L = max(map(len, srcs))
    ids = [[0] * (L - len(s)) + s if padding == "left" else s + [0] * (L - len(s)) for s in srcs]
    mask = [[0] * (L - len(s)) + [1] * len(s) if padding == "left" else [1] * len(s) + [0] * (L - len(s))
            for s in srcs]
    return torch.tensor(ids), torch.tensor(mask)


# -- 1. logits ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_equal_transformers_after_ragged_feeds_and_rollbacks(variant):
    model = t5(variant)
    be = FusedT5Backend(model, "verifier")
    assert be.encoder_decoder and be.capturable and be.max_positions is None
    g = torch.Generator().manual_seed(1)
    requests = [([[5, 6, 7, 8, 9], [11, 12], [13]], "left"), ([[13, 14], [5, 6, 7], [8]], "right"),
                ([list(range(3, 23)), [11, 12], [30, 31, 32]], "left")]   # 20 tokens: the source buffers grow
    generations = []
    for srcs, padding in requests:
        ids, mask = padded(srcs, padding)
        be.reserve(3, 40, source_length=ids.shape[1])
        generations.append(be.generation)
        be.reset(ids, mask)
        assert be.first_pending(ids).tolist() == [model.config.decoder_start_token_id] * 3
        seqs = [[] for _ in srcs]   # each row's committed decoder tokens

        def fresh(b, seq, srcs=srcs):
            with torch.no_grad():
                return model(input_ids=torch.tensor([srcs[b]]), decoder_input_ids=torch.tensor([seq])).logits[0]

        for step in range(7):
            # first a long full feed, kept whole (distances past max_distance reach the last bucket), then
            # ragged feeds (lengths) or full ones, each partly rolled back
            k = 14 if step == 0 else int(torch.randint(1, 5, (1,), generator=g))
            tokens = torch.randint(2, 48, (3, k), generator=g)
            if step == 0:
                tokens[:, 0] = be.decoder_start_token_id
            lengths = torch.randint(1, k + 1, (3,), generator=g) if step % 3 else None
            logits = be.extend(tokens, lengths)
            assert logits.dtype == torch.float32 and logits.shape == (3, k, be.vocab_size)
            n = lengths if lengths is not None else torch.full((3,), k)
            for b in range(3):
                m = int(n[b])
                # float32 rounding only (the products' reduction order differs from transformers'); a
                # wrong slot, bias or mask moves logits by orders of magnitude more
                torch.testing.assert_close(logits[b, :m], fresh(b, seqs[b] + tokens[b, :m].tolist())[-m:],
                                           atol=3e-5, rtol=1e-4)
            n_keep = torch.stack([torch.randint(0, int(n[b]) + 1, (1,), generator=g)[0] for b in range(3)])
            if step == 0:
                n_keep = n.clone()
            be.commit(n_keep)
            for b in range(3):
                seqs[b] = seqs[b] + tokens[b, :int(n_keep[b])].tolist()
        assert be.n_pos.tolist() == be.n_committed.tolist() == [len(s) for s in seqs]
    # the buffers (and so a captured graph) are kept while they fit, reallocated when a source outgrows them
    assert generations[0] == generations[1] < generations[2]


# -- 2. greedy -------------------------------------------------------------------------------------


def test_greedy_sd_equals_verifier_generate():
    d, v = tiny_seq2seq_pair("t5", noise=0.3, feed_forward_proj="gated-gelu")
    fd, fv = make_backend(d, "drafter", "fused"), make_backend(v, "verifier", "fused")
    assert isinstance(fv, FusedT5Backend) and not fv.compiled   # CPU: eager
    n = 16
    ref = [hf_greedy(v, s, n) for s in SOURCES]
    for gamma in (1, 4):
        out = sc.generate(fd, fv, SOURCES, method="sd", gamma=gamma, max_new_tokens=n, eos_token_id=[])
        assert out.tokens == ref
        assert out.stats.prefill_calls == 2 and out.stats.emitted == n * len(SOURCES)
    ids, mask = padded(SOURCES, "right")
    assert sc.generate(fd, fv, ids, attention_mask=mask, method="sd", gamma=3, max_new_tokens=n,
                       eos_token_id=[]).tokens == ref
    assert sc.generate(fd, fv, SOURCES, method="verifier_only", max_new_tokens=n, eos_token_id=[]).tokens == ref


# -- 3. the law, and the captured path -------------------------------------------------------------

LAW_METHODS = ["sd", "lossy", "opt", "token_v3"]   # targets p, a lossy mix, a deferral rule, token-level


@pytest.fixture(scope="module")
def law_pair():
    return law_models("t5")


@pytest.mark.parametrize("name", LAW_METHODS)
def test_loop_law_matches_algorithm4(name, law_pair):
    d, v, src, lq, lp = law_pair
    fd, fv = FusedT5Backend(d, "drafter"), FusedT5Backend(v, "verifier")
    assert seq2seq_loop_law_pvalue(fd, fv, name, ALPHA[name], src, lq, lp, v.config.decoder_start_token_id, N_ROWS,
                                   N_TOKENS, GAMMA) > LEVEL


def test_captured_law(simulated_capture, law_pair):
    """The law again, through the captured path (a program captured once, its state re-filled)."""
    d, v, src, lq, lp = law_pair
    fd, fv = FusedT5Backend(d, "drafter"), FusedT5Backend(v, "verifier")
    name, alpha = "token_v3", ALPHA["token_v3"]
    law = algorithm4_law(lambda pre: sampling_dist(lq(pre)), lambda pre: sampling_dist(lp(pre)),
                         lambda q, p, pre: reference_rule(name, q, p, softmax(lq(pre)), softmax(lp(pre)), alpha)[0],
                         lambda q, p, pi: pi, gamma=GAMMA, prompt=[v.config.decoder_start_token_id], n=N_TOKENS)
    for seed in (0, 1):
        out = sc.generate(fd, fv, torch.tensor([src] * N_ROWS), method=name, alpha=alpha, gamma=GAMMA,
                          max_new_tokens=N_TOKENS, seed=seed, temperature=1.0, eos_token_id=[])
        assert chi2_pvalue(empirical(out.tokens), law, N_ROWS) > LEVEL
    assert simulated_capture == [1]   # the second request replayed the first one's program


def test_captured_path_bookkeeping_matches_eager(simulated_capture):
    """Captured (simulated), the fused T5 pair gives the eager seq2seq backend's tokens and counters
    for request after request (other sources, other seeds); a source that outgrows the
    cross-attention buffers is a new ``generation``, so its request captures anew."""
    d, v = tiny_seq2seq_pair("t5", noise=0.1, feed_forward_proj="gated-gelu")
    fd, fv = FusedT5Backend(d, "drafter"), FusedT5Backend(v, "verifier")
    batches = [[[5, 6, 7], [8, 9]], [[11, 12, 13, 14], [15]], [list(range(3, 23)), [16, 17]]]
    for method, alpha in (("token_v3", 0.5), ("verifier_only", None)):
        for i, srcs in enumerate(batches):
            kw = dict(method=method, alpha=alpha, gamma=3, temperature=1.0, max_new_tokens=12, eos_token_id=7)
            ref = sc.generate(d, v, srcs, generator=torch.Generator().manual_seed(i), **kw)
            out = sc.generate(fd, fv, srcs, generator=torch.Generator().manual_seed(i), **kw)
            assert out.tokens == ref.tokens, (method, i)
            s, r = out.stats, ref.stats
            assert (s.accepted, s.rejected, s.blocks, s.drafter_calls, s.verifier_calls, s.emitted) == \
                (r.accepted, r.rejected, r.blocks, r.drafter_calls, r.verifier_calls, r.emitted)
    # token_v3: its first request, and the one whose source outgrew the buffers (a new generation);
    # verifier_only: its first request only (the grown buffers hold every source since)
    assert simulated_capture == [1, 1, 1]


def test_host_driven_calls_replay_graphs_of_the_step(simulated_calls):
    """Compiled, the sequential methods that read the host per token (token_cascade, BiLD) run each
    decoder call of the fused T5 pair as a replay of a graph of the step (simulated), with the
    eager seq2seq backend's tokens and counters; sd's calls are its own program's."""
    d, v = tiny_seq2seq_pair("t5", noise=0.3, feed_forward_proj="gated-gelu")
    fd, fv = FusedT5Backend(d, "drafter"), FusedT5Backend(v, "verifier")
    fd.compiled = fv.compiled = True   # the replay path, with the eager step
    srcs = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    for method, alpha in (("token_cascade", 0.5), ("bild", 1.0), ("sd", None)):
        kw = dict(method=method, alpha=alpha, gamma=3, temperature=1.0, max_new_tokens=10, eos_token_id=[])
        ref = sc.generate(d, v, srcs, generator=torch.Generator().manual_seed(2), **kw)
        before = simulated_calls.replays
        out = sc.generate(fd, fv, srcs, generator=torch.Generator().manual_seed(2), **kw)
        assert out.tokens == ref.tokens, method
        s, r = out.stats, ref.stats
        assert (s.drafter_calls, s.verifier_calls, s.deferred, s.emitted) == \
            (r.drafter_calls, r.verifier_calls, r.deferred, r.emitted), method
        replays = simulated_calls.replays - before
        assert replays == (0 if method == "sd" else s.drafter_calls + s.verifier_calls), method


# -- 4. backend choice, bad inputs -----------------------------------------------------------------


def test_backend_choice_and_refusals():
    from tiny_models import tiny_llama

    t5m, bart = tiny_seq2seq("t5"), tiny_seq2seq("bart")
    assert isinstance(make_backend(t5m, "drafter", "fused"), FusedT5Backend)
    assert isinstance(make_backend(t5m, "drafter", "auto"), Seq2SeqBackend)   # on a CPU: unchanged
    assert isinstance(make_backend(bart, "drafter", "auto"), Seq2SeqBackend)
    with pytest.raises(SpecCascadeError, match=r"the drafter is bart \(BartForConditionalGeneration\).*--backend "
                                               r"seq2seq"):
        make_backend(bart, "drafter", "fused")
    with pytest.raises(UnsupportedModel, match="the verifier is bart.*use --backend seq2seq"):
        FusedT5Backend(bart, "verifier")
    with pytest.raises(SpecCascadeError, match="not an encoder-decoder"):
        FusedT5Backend(tiny_llama(0), "verifier")
    llama = make_backend(tiny_llama(0), "verifier", "fused")
    for d, v in ((FusedT5Backend(t5m, "drafter"), llama), (llama, FusedT5Backend(t5m, "verifier"))):
        with pytest.raises(SpecCascadeError, match="encoder-decoder.*decoder-only|decoder-only.*encoder-decoder"):
            sc.generate(d, v, [[5, 6, 7]], method="sd", max_new_tokens=4)


@pytest.mark.slow
def test_compiled_regions_trace_whole_and_match_eager(monkeypatch):
    """``compile=True`` compiles the prologue, one decoder layer and the head, each with
    ``fullgraph=True`` (no graph break); traced by dynamo + AOT autograd (the ``aot_eager`` backend:
    the graph inductor would compile, without its C++ build), a compiled backend gives the eager
    one's logits, ragged feeds (padded to bucket widths) and a rollback included."""
    import torch._dynamo

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **(kw | {"backend": "aot_eager",
                                                                                     "options": None})))
    m = tiny_seq2seq("t5", feed_forward_proj="gated-gelu")
    compiled, eager = FusedT5Backend(m, "v", compile=True), FusedT5Backend(m, "v")
    assert compiled.compiled and torch._dynamo.config.recompile_limit >= 1024
    ids, mask = padded([[5, 6, 7], [8, 9, 10, 11]], "right")
    outs = []
    for be in (compiled, eager):
        be.reserve(2, 20, source_length=4)
        be.reset(ids, mask)
        a = be.extend(torch.tensor([[0, 5, 6], [0, 7, 8]]))
        be.commit(torch.tensor([2, 3]))
        b = be.extend(torch.tensor([[9, 10, 4], [11, 3, 4]]), torch.tensor([1, 3]))
        outs.append(torch.cat([a, b], 1))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-6)


def test_sweep_warm_up_sizes_the_cross_attention_buffers_for_the_longest_source():
    """After a sweep's warm-up no timed cell reallocates the fused T5 buffers (a new ``generation``
    would recompile and re-capture inside the timing): the warm-up reserves the decoder cache and
    the cross-attention buffers for the longest source of the sweep, not the probes' only."""
    from speccascade.eval.sweep import Cell, run_cell, warm_up
    from speccascade.eval.tasks import BibleTask
    from speccascade.models.loading import TOKENIZER_DIR, load_tokenizer

    task, tok = BibleTask(), load_tokenizer(TOKENIZER_DIR)
    d, v = tiny_seq2seq_pair("t5", vocab=len(tok), hidden=16, heads=2, noise=0.3)
    fd, fv = make_backend(d, "drafter", "fused"), make_backend(v, "verifier", "fused")
    pool = task.examples(None)
    n = {ex.id: len(task.encode(tok, ex.input)) for ex in pool}
    # one probe width (both under 64 tokens), two source capacities (32, 64): the probe alone meets the smaller
    examples = [next(e for e in pool if n[e.id] < 30), next(e for e in pool if 40 <= n[e.id] <= 60)]
    cells = [Cell("verifier_only", None, 3, 0.0, 0, 1), Cell("sd", None, 3, 0.0, 0, 1)]
    warm_up(fd, fv, tok, task, examples, cells, 8)
    generations = (fd.generation, fv.generation)
    for cell in cells:
        run_cell(fd, fv, tok, task, examples, cell, 8)
    assert (fd.generation, fv.generation) == generations
    assert fv.source_slots >= max(n[e.id] for e in examples)
