"""generate() on real (tiny, random) transformers models: greedy equivalence, the sequential methods
against their definitions, stats that add up, truncation, determinism."""

import pytest
import torch

import speccascade as sc

from tiny_models import tiny_pair

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16], [17]]
SPECULATIVE = [m for m, s in sc.METHODS.items() if s.kind == "speculative"]


@pytest.fixture(scope="module")
def pair():
    return tiny_pair(0, noise=0.05)


def gen(pair, method, prompts=PROMPTS, **kw):
    d, v = pair
    kw.setdefault("max_new_tokens", 16)
    kw.setdefault("temperature", 1.0)  # these tests were written for T = 1 and no EOS (the API's defaults
    kw.setdefault("eos_token_id", [])  # are now greedy and the verifier's own EOS)
    return sc.generate(d, v, prompts, method=method, **kw)


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_greedy_sd_equals_verifier_greedy_batched(pair, gamma):
    ref = gen(pair, "verifier_only", temperature=0)
    out = gen(pair, "sd", temperature=0, gamma=gamma)
    assert out.tokens == ref.tokens
    # the pair agrees sometimes, not always: rows advanced raggedly through accepts and rejects
    assert 0 < out.stats.accepted < out.stats.drafted
    for row, prompt in zip(ref.tokens, PROMPTS):  # batching changes nothing
        assert gen(pair, "verifier_only", prompts=[prompt], temperature=0).tokens[0] == row


def test_greedy_rollback_methods_at_alpha_zero_equal_verifier(pair):
    ref = gen(pair, "verifier_only", temperature=0).tokens
    assert gen(pair, "bild_star", alpha=0.0, temperature=0, gamma=4).tokens == ref
    assert gen(pair, "bild", alpha=0.0, alpha_f=0.9, temperature=0).tokens == ref
    assert gen(pair, "lossy", alpha=0.0, temperature=0, gamma=3).tokens == ref
    assert gen(pair, "chow", alpha=0.0, temperature=0, gamma=3).tokens == ref
    assert gen(pair, "diff", alpha=-1.0, temperature=0, gamma=3).tokens == ref


def test_never_deferring_cascades_equal_drafter_greedy(pair):
    ref = gen(pair, "drafter_only", temperature=0).tokens
    for method, alpha in [("chow", 1.0), ("diff", 1.0), ("token_v3", 1.0), ("opt", 1e9)]:
        out = gen(pair, method, alpha=alpha, temperature=0, gamma=4)
        assert out.tokens == ref, method
        assert out.stats.rejected == 0


def test_token_cascade_endpoints(pair):
    """TokenCascade [Chow]: alpha = 0 is verifier_only, alpha = 1 without the cap is drafter_only,
    token for token at T = 1 with the same seed."""
    assert gen(pair, "token_cascade", alpha=0.0, seed=3).tokens == gen(pair, "verifier_only", seed=3).tokens
    assert gen(pair, "token_cascade", alpha=1.0, max_drafter_run=None, seed=4).tokens == \
        gen(pair, "drafter_only", seed=4).tokens


def test_token_cascade_cap_forces_deferral(pair):
    out = gen(pair, "token_cascade", alpha=1.0, max_new_tokens=23, prompts=[[5, 6]])
    # never deferring by the rule, the cap hands tokens 11 and 22 to the verifier
    assert out.stats.deferred == 2


def test_seq_cascade_endpoints(pair):
    out0 = gen(pair, "seq_cascade", alpha=0.0, seed=1)
    assert out0.stats.deferred == len(PROMPTS)          # q(response) < 1: every row is regenerated
    out1 = gen(pair, "seq_cascade", alpha=1.0, seed=1)
    assert out1.stats.deferred == 0 and out1.tokens == gen(pair, "drafter_only", seed=1).tokens
    # length-normalised: the rows whose drafter response has a per-token geometric mean probability
    # below 1 - alpha (computed here by a fresh forward of the drafter) are exactly those regenerated
    drafted = out1.tokens
    d, _ = pair
    means = []
    for prompt, row in zip(PROMPTS, drafted):
        with torch.no_grad():
            logq = d(torch.tensor([prompt + row])).logits[0].float().log_softmax(-1)
        means.append(sum(float(logq[len(prompt) - 1 + i, t]) for i, t in enumerate(row)) / len(row))
    ranked = sorted(means, reverse=True)
    threshold = (ranked[1] + ranked[2]) / 2                   # two rows above it, two below
    normed = gen(pair, "seq_cascade", alpha=1 - float(torch.tensor(threshold).exp()), length_normalized=True,
                 seed=1)
    expect = [m < threshold for m in means]
    assert sum(expect) == 2 and normed.stats.deferred == 2
    for row, deferred, drafter_row in zip(normed.tokens, expect, drafted):
        assert (row == drafter_row) != deferred


def test_oracle_diff_endpoints(pair):
    assert gen(pair, "oracle_diff", alpha=-1.0, seed=2).tokens == gen(pair, "verifier_only", seed=2).tokens
    assert gen(pair, "oracle_diff", alpha=1.0, seed=2).tokens == gen(pair, "drafter_only", seed=2).tokens


@pytest.mark.parametrize("method", SPECULATIVE + ["bild"])
def test_stats_add_up(pair, method):
    out = gen(pair, method, gamma=3, max_new_tokens=13, eos_token_id=7)
    s = out.stats
    assert s.emitted == sum(len(t) for t in out.tokens)
    assert s.emitted + s.truncated == s.accepted + s.recovered + s.bonus
    assert s.recovered == s.rejected
    assert s.accepted + s.rejected + s.discarded == s.drafted and s.discarded >= 0
    assert s.verifier_calls >= 1 and s.drafter_calls >= s.verifier_calls
    if method != "bild":
        # gamma + 1 drafter calls per block; gamma where the bonus token comes from p (sd, lossy*)
        per_block = 3 if sc.METHODS[method].bonus_from_verifier else 4
        assert s.drafter_calls == per_block * s.verifier_calls == sc.METHODS[method].drafter_calls_per_block(3) \
            * s.verifier_calls
        assert s.drafted == 3 * s.blocks
        assert sum(s.accepted_per_position) == s.accepted
        assert all(a >= b for a, b in zip(s.accepted_per_position, s.accepted_per_position[1:]))


@pytest.mark.parametrize("method", SPECULATIVE + ["verifier_only", "token_cascade", "bild", "oracle_diff"])
def test_eos_and_max_new_tokens_truncation(pair, method):
    out = gen(pair, method, gamma=4, max_new_tokens=11, eos_token_id=[7, 9], seed=0)
    for row in out.tokens:
        assert 1 <= len(row) <= 11
        stops = [i for i, t in enumerate(row) if t in (7, 9)]
        assert stops == [] or stops == [len(row) - 1]     # EOS kept, nothing after it
        if not stops:
            assert len(row) == 11                        # max_new_tokens exactly


def test_same_seed_same_tokens_and_stats(pair):
    a, b = gen(pair, "token_v3", seed=7), gen(pair, "token_v3", seed=7)
    assert a.tokens == b.tokens and a.stats.accepted == b.stats.accepted
    g = torch.Generator().manual_seed(7)
    assert gen(pair, "token_v3", generator=g).tokens == a.tokens


def test_single_token_prompt_and_1d_tensor(pair):
    out = gen(pair, "opt", prompts=torch.tensor([9]), max_new_tokens=5)
    assert len(out.tokens) == 1 and len(out.tokens[0]) == 5


@pytest.mark.parametrize("method", list(sc.METHODS))
def test_greedy_decoding_draws_no_exponential_noise(pair, method, monkeypatch):
    """At T = 0 every draw is from a one-hot distribution, so no method draws Exp(1) noise (a draft's
    worth of time on a CPU). (That the tokens are the verifier's greedy ones, or the rule's, is the
    business of the tests above.)"""

    def refuse(*args, **kwargs):
        raise AssertionError("Exp(1) noise drawn at T = 0")

    monkeypatch.setattr(torch.Tensor, "exponential_", refuse)
    assert gen(pair, method, temperature=0, gamma=3).stats.emitted > 0


@pytest.mark.parametrize("method", ["sd", "lossy", "token_v3"])
@pytest.mark.parametrize("backend", ["dynamic", "static", "fused"])
def test_a_drafter_equal_to_the_verifier_has_every_greedy_draft_accepted(method, backend):
    """With the drafter the verifier itself, greedy drafts are the verifier's own picks, so every draft of
    every block is accepted when the drafter's cache holds the right tokens (a token left out or fed twice
    makes drafts the verifier rejects). This catches a wrong drafter context, which the law tests cannot
    (sd's output law is p for any q; feeding no carried draft here fails 6 of the 9): sd and lossy SD make gamma
    drafter calls a block and feed an all-accepted block's last draft with the next block's first call;
    here every block after the first does that, on ragged prompts."""
    from speccascade.models import make_backend

    from tiny_models import tiny_llama

    v = tiny_llama(0)
    d_be, v_be = make_backend(v, "drafter", backend), make_backend(v, "verifier", backend)
    out = sc.generate(d_be, v_be, PROMPTS, method=method, alpha=None if method == "sd" else 0.5, gamma=3,
                      temperature=0.0, max_new_tokens=20, eos_token_id=[])
    ref = sc.generate(v, v, PROMPTS, method="verifier_only", temperature=0.0, max_new_tokens=20, eos_token_id=[])
    s = out.stats
    assert out.tokens == ref.tokens
    assert s.blocks >= 5 * len(PROMPTS) and s.accepted == s.drafted and s.rejected == 0
    assert s.drafter_calls == sc.METHODS[method].drafter_calls_per_block(3) * s.verifier_calls


@pytest.mark.parametrize("method", ["sd", "token_v3", "token_cascade"])
def test_the_verifier_is_prefilled_before_the_drafter(method, monkeypatch):
    """Both models' pre-fills see the same prompt, the verifier's first: on a GPU the drafter's pre-fill
    is host work that then overlaps the verifier's on the device (``loop.prefill_both``). A spy on each
    backend's ``reset`` records the order and the prompt each was given; the benchmarks' switch
    (``loop.PREFILL_VERIFIER_FIRST``, off) restores the drafter-first order with the same tokens."""
    from speccascade import loop
    from speccascade.models import make_backend

    d, v = tiny_pair(0, noise=0.05)
    calls = []
    backends = {name: make_backend(m, name, "fused") for name, m in (("drafter", d), ("verifier", v))}
    for name, be in backends.items():
        def spy(ids, mask, _name=name, _reset=be.reset):
            calls.append((_name, ids.tolist(), mask.tolist()))
            return _reset(ids, mask)
        be.reset = spy
    out = sc.generate(backends["drafter"], backends["verifier"], [[5, 6, 7, 8]], method=method,
                      alpha=None if method == "sd" else 0.5, temperature=0.0, max_new_tokens=6, eos_token_id=[])
    assert [c[0] for c in calls] == ["verifier", "drafter"]
    assert calls[0][1:] == calls[1][1:] == ([[5, 6, 7, 8]], [[1, 1, 1, 1]])
    if method == "sd":
        ref = sc.generate(d, v, [[5, 6, 7, 8]], method="verifier_only", temperature=0.0, max_new_tokens=6,
                          eos_token_id=[])
        assert out.tokens == ref.tokens
    calls.clear()
    monkeypatch.setattr(loop, "PREFILL_VERIFIER_FIRST", False)
    again = sc.generate(backends["drafter"], backends["verifier"], [[5, 6, 7, 8]], method=method,
                        alpha=None if method == "sd" else 0.5, temperature=0.0, max_new_tokens=6, eos_token_id=[])
    assert [c[0] for c in calls] == ["drafter", "verifier"] and again.tokens == out.tokens
