"""Encoder-decoder pairs (T5, BART, Marian) through the seq2seq backend, on tiny random models.

1. The backend's decoder cache after ragged extend / commit gives the logits of a fresh forward
   pass (encoder input left- or right-padded).
2. Exact law: 20,000 rows of one encoder input, 3 decoder tokens, every speculative method (T5;
   a subset for BART, to keep the file fast on one core) against Algorithm 4's law enumerated from
   fresh model calls on the decoder prefix (tests/reference.py); the sequential cascades against
   sequential sampling from their rule.
3. Greedy ``sd`` equals the verifier's own ``generate(do_sample=False)``, batched with encoder
   inputs of different lengths (T5, BART, Marian).
4. Defaults (EOS from the config), stats, decoder position limits, the CLI loader, bad inputs.
"""

import json

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
from speccascade.models import Seq2SeqBackend, make_backend

from helpers import ALPHA, chi2_pvalue, empirical, seq2seq_loop_law_pvalue
from reference import reference_rule, sampling_dist, sequential_law, softmax

# -- 1. the cache ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["t5", "bart", "marian"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_ragged_extend_commit_matches_fresh_forward(kind, padding):
    model = tiny_seq2seq(kind)
    be = Seq2SeqBackend(model, "verifier")
    g = torch.Generator().manual_seed(0)
    srcs = [[5, 6, 7, 8, 9], [11, 12], [13]]
    L = max(map(len, srcs))
    pad = [[0] * (L - len(s)) for s in srcs]
    ids = torch.tensor([p + s if padding == "left" else s + p for p, s in zip(pad, srcs)])
    mask = torch.tensor([[0] * len(p) + [1] * len(s) if padding == "left" else [1] * len(s) + [0] * len(p)
                         for p, s in zip(pad, srcs)])
    be.reset(ids, mask)
    assert be.first_pending(ids).tolist() == [model.config.decoder_start_token_id] * 3
    seqs = [[] for _ in srcs]  # each row's committed decoder tokens

    def fresh(b, seq):
        with torch.no_grad():
            return model(input_ids=torch.tensor([srcs[b]]), decoder_input_ids=torch.tensor([seq])).logits[0, -1]

    for step in range(12):
        k = int(torch.randint(1, 5, (1,), generator=g))
        tokens = torch.randint(3, 40, (3, k), generator=g)
        if step == 0:
            tokens[:, 0] = be.decoder_start_token_id
        lengths = torch.randint(1, k + 1, (3,), generator=g)
        logits = be.extend(tokens, lengths)
        assert logits.dtype == torch.float32 and logits.shape == (3, k, be.vocab_size)
        for b in range(3):
            for i in range(int(lengths[b])):
                torch.testing.assert_close(logits[b, i], fresh(b, seqs[b] + tokens[b, :i + 1].tolist()),
                                           atol=2e-5, rtol=1e-4)
        low = 1 if step == 0 else 0  # keep the start token
        n_keep = torch.stack([torch.randint(low, int(lengths[b]) + 1, (1,), generator=g)[0] for b in range(3)])
        be.commit(n_keep)
        for b in range(3):
            seqs[b] = seqs[b] + tokens[b, :int(n_keep[b])].tolist()
    # the cache holds no slot that no row uses, and each row's tokens are right-aligned
    assert be.valid.shape[1] == max(map(len, seqs))
    assert be.n_pos.tolist() == [len(s) for s in seqs]
    for b, s in enumerate(seqs):
        assert be.valid[b].tolist() == [False] * (be.valid.shape[1] - len(s)) + [True] * len(s)


# -- 2. the law ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def law_pairs():
    return {}


def law_pair(cache, kind):
    if kind not in cache:
        cache[kind] = law_models(kind)
    return cache[kind]


@pytest.mark.parametrize("kind,name", [(k, m) for k in ("t5", "bart") for m in ALPHA])
def test_loop_law_matches_algorithm4(kind, name, law_pairs):
    d, v, src, lq, lp = law_pair(law_pairs, kind)
    assert seq2seq_loop_law_pvalue(d, v, name, ALPHA[name], src, lq, lp, v.config.decoder_start_token_id, N_ROWS,
                                   N_TOKENS, GAMMA) > LEVEL


@pytest.mark.parametrize("name,alpha,extra", [("oracle_diff", 0.05, {}),
                                              ("token_cascade", 0.35, {"max_drafter_run": None})])
def test_sequential_cascade_law(name, alpha, extra, law_pairs):
    d, v, src, lq, lp = law_pair(law_pairs, "t5")
    rule = {"oracle_diff": "diff", "token_cascade": "chow"}[name]
    out = sc.generate(d, v, torch.tensor([src] * N_ROWS), method=name, alpha=alpha, max_new_tokens=N_TOKENS, seed=5,
                      temperature=1.0, eos_token_id=[], **extra)
    law = sequential_law(lambda q, p, pre: reference_rule(rule, q, p, softmax(lq(pre)), softmax(lp(pre)), alpha)[0],
                         lambda pre: sampling_dist(lq(pre)), lambda pre: sampling_dist(lp(pre)),
                         [v.config.decoder_start_token_id], N_TOKENS)
    assert chi2_pvalue(empirical(out.tokens), law, N_ROWS) > LEVEL


# -- 3. greedy -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["t5", "bart", "marian"])
def test_greedy_sd_equals_verifier_generate(kind):
    d, v = tiny_seq2seq_pair(kind, noise=0.3)
    n = 16
    ref = [hf_greedy(v, s, n) for s in SOURCES]
    assert sc.generate(d, v, SOURCES, method="verifier_only", max_new_tokens=n, eos_token_id=[]).tokens == ref
    for gamma in (1, 4):
        out = sc.generate(d, v, SOURCES, method="sd", gamma=gamma, max_new_tokens=n, eos_token_id=[])
        assert out.tokens == ref
        assert out.stats.prefill_calls == 2 and out.stats.emitted == n * len(SOURCES)
    # the same batch right-padded (a tokenizer's default for these models)
    L = max(map(len, SOURCES))
    ids = torch.tensor([s + [0] * (L - len(s)) for s in SOURCES])
    mask = torch.tensor([[1] * len(s) + [0] * (L - len(s)) for s in SOURCES])
    assert sc.generate(d, v, ids, attention_mask=mask, method="sd", gamma=3, max_new_tokens=n,
                       eos_token_id=[]).tokens == ref
    # the drafter alone, greedy, equals its own generate
    assert sc.generate(d, v, SOURCES, method="drafter_only", max_new_tokens=n, eos_token_id=[]).tokens == \
        [hf_greedy(d, s, n) for s in SOURCES]


def test_every_method_runs_and_stops_at_the_config_eos():
    """Every method of METHODS on a BART pair, sampled, with the API defaults' EOS (the verifier's
    config eos_token_id): rows end at EOS or at max_new_tokens; a seed gives the same output twice."""
    d, v = tiny_seq2seq_pair("bart", noise=0.3, vocab=12, init_std=0.3)
    stopped = 0
    for name in sc.METHODS:
        kw = dict(method=name, temperature=1.0, max_new_tokens=12, seed=4)
        srcs = [[5, 6, 7], [8, 9, 10, 11, 3], [4]]
        a, b = sc.generate(d, v, srcs, **kw), sc.generate(d, v, srcs, **kw)
        assert a.tokens == b.tokens, name
        assert a.eos_token_id == [v.config.eos_token_id] == [2]
        for t in a.tokens:
            assert 1 <= len(t) <= 12 and (len(t) == 12 or t[-1] == 2) and 2 not in t[:-1], (name, t)
            stopped += len(t) < 12
    assert stopped > 0  # some rows did stop at EOS


@pytest.mark.parametrize("kind,eos", [("t5", 1), ("bart", 2), ("marian", 0)])
def test_default_eos_is_the_config_eos(kind, eos):
    d, v = tiny_seq2seq_pair(kind, noise=0.1)
    out = sc.generate(d, v, SOURCES, method="sd", max_new_tokens=4)
    assert out.eos_token_id == [eos]
    assert sc.api.resolve_eos_token_id(None, Seq2SeqBackend(v, "verifier"), v.config.vocab_size) == [eos]


# -- 4. limits, loading, bad inputs ------------------------------------------------------------------


def test_decoder_limit_counts_new_tokens_only():
    """BART's 64 positions bound the decoder (start + new tokens + a block), not source + new tokens."""
    d, v = tiny_seq2seq_pair("bart", max_positions=64)
    src = list(range(3, 43))  # 40 source tokens
    out = sc.generate(d, v, [src], method="sd", gamma=2, max_new_tokens=40, eos_token_id=[])
    assert len(out.tokens[0]) == 40
    with pytest.raises(SpecCascadeError, match="decoder positions"):
        sc.generate(d, v, [src], method="sd", gamma=2, max_new_tokens=61, eos_token_id=[])
    with pytest.raises(SpecCascadeError, match="encoder input too long"):
        sc.generate(d, v, [[5] * 65], method="sd", max_new_tokens=4, eos_token_id=[])
    t5d, t5v = tiny_seq2seq_pair("t5")  # relative positions: no limit
    assert Seq2SeqBackend(t5v, "verifier").max_positions is None


def test_loader_detects_encoder_decoder_checkpoints(tmp_path):
    from speccascade.models.loading import load_causal_lm

    for kind in ("t5", "bart"):
        m = tiny_seq2seq(kind)
        m.save_pretrained(tmp_path / kind)
        loaded = load_causal_lm(tmp_path / kind, role="drafter")
        assert type(loaded) is type(m) and loaded.config.is_encoder_decoder
        assert torch.equal(loaded.lm_head.weight, m.lm_head.weight)


def test_cli_generate_with_t5_checkpoints(tmp_path, capsys):
    from speccascade.cli import main
    from speccascade.models.loading import TOKENIZER_DIR, load_tokenizer

    tok = load_tokenizer(TOKENIZER_DIR)
    d, v = tiny_seq2seq_pair("t5", vocab=len(tok), hidden=16, heads=2, noise=0.3)
    d.save_pretrained(tmp_path / "d")
    v.save_pretrained(tmp_path / "v")
    rc = main(["generate", "in the beginning", "--drafter", str(tmp_path / "d"), "--verifier", str(tmp_path / "v"),
               "--tokenizer", str(TOKENIZER_DIR), "--method", "sd", "--gamma", "3", "--max-new-tokens", "6", "--json",
               "--quiet"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0
    src = tok.encode("in the beginning")
    assert res["tokens"] == sc.generate(d, v, [src], method="verifier_only", max_new_tokens=6,
                                        eos_token_id=tok.eos_token_id).tokens[0]


def test_mixed_architectures_are_refused():
    from tiny_models import tiny_llama

    llama, t5 = tiny_llama(0), tiny_seq2seq("t5")
    for d, v in ((llama, t5), (t5, llama)):
        with pytest.raises(SpecCascadeError, match="encoder-decoder") as e:
            sc.generate(d, v, [[5, 6, 7]], method="sd", max_new_tokens=4)
        assert "LlamaForCausalLM" in str(e.value) and "T5ForConditionalGeneration" in str(e.value)
        assert "decoder-only" in str(e.value)


def test_mismatched_vocabularies_are_refused():
    with pytest.raises(SpecCascadeError, match="vocabularies differ"):
        sc.generate(tiny_seq2seq("t5", vocab=40), tiny_seq2seq("t5", vocab=48), [[5, 6]], method="sd")
    d, v = tiny_seq2seq_pair("t5")
    with pytest.raises(SpecCascadeError, match=r"token id 48, outside the vocabulary \[0, 48\)"):
        sc.generate(d, v, [[5, 48]], method="sd")


def test_empty_encoder_input_is_refused():
    d, v = tiny_seq2seq_pair("t5")
    for ids, mask in (([[]], None), ([[5, 6], []], None), (torch.zeros(1, 0, dtype=torch.long), None),
                      (torch.tensor([[5, 6], [0, 0]]), torch.tensor([[1, 1], [0, 0]]))):
        with pytest.raises(SpecCascadeError, match="empty encoder input"):
            sc.generate(d, v, ids, attention_mask=mask, method="sd", max_new_tokens=4)
    with pytest.raises(SpecCascadeError, match="empty encoder input"):
        Seq2SeqBackend(v, "verifier").reset(torch.tensor([[5, 6], [0, 0]]), torch.tensor([[1, 1], [0, 0]]))
    with pytest.raises(SpecCascadeError, match="one run of 1s"):
        sc.generate(d, v, torch.tensor([[5, 6, 7]]), attention_mask=torch.tensor([[1, 0, 1]]), method="sd")


@pytest.mark.parametrize("kind", ["graphs", "compiled", "static"])
def test_fast_paths_refuse_encoder_decoders(kind):
    with pytest.raises(SpecCascadeError, match=f"the {kind} backend is for decoder-only.*encoder-decoder.*seq2seq"):
        make_backend(tiny_seq2seq("t5"), "drafter", kind)


def test_backend_choice():
    from speccascade.models import FusedLlamaBackend, HFBackend, as_backend

    from tiny_models import tiny_llama

    t5 = tiny_seq2seq("t5")
    for kind in ("dynamic", "auto", "seq2seq"):
        assert isinstance(make_backend(t5, "drafter", kind), Seq2SeqBackend)
    assert isinstance(as_backend(t5, "drafter"), Seq2SeqBackend)
    with pytest.raises(SpecCascadeError, match="is an encoder-decoder model"):
        HFBackend(t5, "drafter")
    with pytest.raises(SpecCascadeError, match="fused backend is for decoder-only"):
        FusedLlamaBackend(t5, "drafter")
    with pytest.raises(SpecCascadeError, match="seq2seq backend is for encoder-decoder models"):
        make_backend(tiny_llama(0), "drafter", "seq2seq")
    with pytest.raises(SpecCascadeError, match="encoder-decoder model"):
        Seq2SeqBackend(tiny_llama(0), "drafter")
