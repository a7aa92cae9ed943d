"""Every rule against its literal definition (reference.py), and the properties the paper pins."""

import math

import numpy as np
import pytest
import torch

from speccascade import METHODS
from speccascade.rules import Dists, opt, solve_lossy_beta, token_v3, total_variation

from reference import reference_beta, reference_rule, sampling_dist, softmax

SPECULATIVE = [m for m, s in METHODS.items() if s.kind == "speculative"]
ALPHAS = {
    "sd": [None], "lossy": [0.0, 0.3, 0.9], "lossy_tuned": [0.0, 0.3, 0.9], "bild_star": [0.0, 0.7, 2.0],
    "chow": [0.0, 0.4, 1.0], "diff": [-1.0, -0.1, 0.2, 1.0], "opt": [-5.0, 0.0, 0.5, 5.0],
    "chow_log": [0.0, 0.5, 1.2], "diff_log": [-0.5, 0.0, 0.3], "opt_log": [-2.0, 0.0, 2.0],
    "token_v1": [-1.0, -0.2, 0.1, 1.0], "token_v2": [-1.0, 0.0, 0.3, 1.0], "token_v3": [0.0, 0.4, 1.0],
}


def cases(seed=0, n=40, V=5):
    rng = np.random.default_rng(seed)
    for i in range(n):
        ql = rng.normal(size=V) * rng.choice([0.3, 1.0, 4.0])
        pl = rng.normal(size=V) * rng.choice([0.3, 1.0, 4.0])
        if i % 7 == 0:
            pl = ql.copy()  # q == p
        yield ql, pl


def to_dists(ql, pl, temperature=1.0, top_k=0):
    q, p = sampling_dist(ql, temperature, top_k), sampling_dist(pl, temperature, top_k)
    qc, pc = softmax(ql), softmax(pl)
    t = lambda x: torch.tensor(np.asarray(x), dtype=torch.float64)  # noqa: E731
    return (q, p, qc, pc), Dists(t(q), t(p), t(qc), t(pc), greedy=temperature == 0)


@pytest.mark.parametrize("name", SPECULATIVE)
@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.5, 3), (0.0, 0)])
def test_rule_matches_reference(name, temperature, top_k):
    for ql, pl in cases(V=5):
        (q, p, qc, pc), d = to_dists(ql, pl, temperature, top_k)
        for alpha in ALPHAS[name]:
            target = METHODS[name].fn(d, alpha)
            if name == "lossy_tuned" and temperature == 0:
                # one-hot q and p: where they differ Tran-Thien's condition gives beta = 1, so pi = p;
                # where they agree pi = q = p: greedy lossy* is exact SD
                np.testing.assert_array_equal(target.pi.numpy(), np.asarray(p))
            ref_pi, ref_defer = reference_rule(name, q, p, qc, pc, alpha, greedy=temperature == 0)
            np.testing.assert_allclose(target.pi.numpy(), ref_pi, atol=1e-9, rtol=1e-9)
            if isinstance(ref_defer, list):
                assert target.defer.tolist() == ref_defer
            else:
                assert bool(target.defer.all()) == ref_defer and bool(target.defer.any()) == ref_defer


@pytest.mark.parametrize("name", [m for m in SPECULATIVE if m != "lossy"])
def test_targets_are_distributions(name):
    """Every pi but lossy's (beta = 1, unnormalised by design: Table 1 / Lemma 2) sums to 1."""
    for ql, pl in cases(seed=1):
        _, d = to_dists(ql, pl)
        for alpha in ALPHAS[name]:
            pi = METHODS[name].fn(d, alpha).pi
            assert torch.all(pi >= 0)
            assert abs(float(pi.sum()) - 1.0) < 1e-12


def test_lossy_beta_one_sums_above_one():
    _, d = to_dists(np.array([2.0, 0.0, -1.0]), np.array([0.0, 1.5, 0.0]))
    assert float(METHODS["lossy"].fn(d, 0.3).pi.sum()) > 1.0 + 1e-6


def test_lossy_tuned_beta_solves_tran_thien_condition():
    for ql, pl in cases(seed=2, n=60, V=6):
        q, p = softmax(ql), softmax(pl)
        for alpha in (0.0, 0.2, 0.5, 0.95):
            beta = float(solve_lossy_beta(torch.tensor(q), torch.tensor(p), alpha))
            lhs = sum(max(0.0, q[v] - p[v] / (1 - alpha)) for v in range(6))
            if lhs == 0:
                assert math.isinf(beta)
                continue
            rhs = sum(max(0.0, p[v] / beta - q[v]) for v in range(6))
            assert abs(lhs - rhs) < 1e-12
            assert beta >= 1 - alpha - 1e-12
            assert abs(beta - reference_beta(q, p, alpha)) < 1e-9 * max(1.0, beta)


def test_opt_sign_larger_disagreement_defers_less():
    """Eq. (10): for alpha > 0, D_TV *raises* the bar for deferral (a larger disagreement, less deferral)."""
    q_conf = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    p_conf = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    close = Dists(q_conf, torch.tensor([0.55, 0.27, 0.18], dtype=torch.float64), q_conf, p_conf)
    far = Dists(q_conf, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), q_conf, p_conf)
    assert float(total_variation(far.target_probs, far.draft_probs)) > 0.5
    # max q = 0.5 < max p - 0.5 * D_TV: true when p is close to q, false when it is far
    assert bool(opt(close, 0.5).defer.all()) and not bool(opt(far, 0.5).defer.any())
    # negative alpha reaches SD: always defer when q != p
    assert bool(opt(far, -10.0).defer.all())


def test_token_v3_draft_with_r0_always_accepted_and_alpha1_is_drafter():
    _, d = to_dists(np.array([1.0, 0.2, -0.5, 0.0]), np.array([0.3, 1.0, 0.9, -2.0]))
    t = token_v3(d, 0.4)
    keep = ~t.defer
    assert torch.all(t.pi[keep] >= d.draft_probs[keep] - 1e-15)
    assert torch.allclose(token_v3(d, 1.0).pi, d.draft_probs)


def test_temperature_split_confidences_untempered():
    """Chow's max-probability is taken on the T = 1 softmax even when sampling at T = 0.1."""
    ql, pl = np.array([1.0, 0.9, 0.0]), np.array([3.0, 0.0, 0.0])
    _, d_cold = to_dists(ql, pl, temperature=0.1)
    # untempered max q ~ 0.44 < 1 - 0.3 -> defer, although the tempered max q is ~0.73
    assert float(d_cold.draft_probs.max()) > 0.7
    assert bool(METHODS["chow"].fn(d_cold, 0.3).defer.all())


def test_top_p_sampling_probs_match_reference():
    """sampling_probs with top-p (alone, after temperature, after top-k) against the literal loop of
    reference.sampling_dist: keep the most probable tokens until their mass reaches top_p."""
    from speccascade.sampling import SamplingConfig, sampling_probs

    # a hand-computed case: probs (1/2, 1/4, 1/8, 1/8); top_p = 0.6 keeps the first two (mass before
    # the third is 3/4 >= 0.6), renormalised to (2/3, 1/3); top_p = 0.3 keeps only the first
    logits = torch.log(torch.tensor([[0.125, 0.5, 0.125, 0.25]]))
    np.testing.assert_allclose(sampling_probs(logits, SamplingConfig(top_p=0.6)).numpy(),
                               [[0.0, 2 / 3, 0.0, 1 / 3]], atol=1e-6)
    assert sampling_probs(logits, SamplingConfig(top_p=0.3)).tolist() == [[0.0, 1.0, 0.0, 0.0]]
    rng = np.random.default_rng(5)
    for _ in range(30):
        ql = rng.normal(size=7) * rng.choice([0.5, 1.0, 3.0])
        for temperature, top_k, top_p in ((1.0, 0, 0.9), (1.0, 0, 0.5), (0.7, 0, 0.8), (1.3, 4, 0.6),
                                          (1.0, 3, 0.95), (0.5, 0, 0.2)):
            cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
            got = sampling_probs(torch.tensor(ql), cfg).numpy()
            ref = sampling_dist(ql, temperature, top_k, top_p)
            assert ((got > 0) == (ref > 0)).all(), (ql, cfg)     # the same kept set
            np.testing.assert_allclose(got, ref, atol=1e-6)


@pytest.mark.parametrize("name", SPECULATIVE)
def test_at_t0_every_rule_builds_a_one_hot_target_so_greedy_draws_need_no_noise(name):
    """At T = 0, q and p are one-hot; every rule's pi (and the residual a rejection draws from) is then
    one-hot as well, which is why the loop draws no Exp(1) noise at T = 0 (``exponential_noise(...,
    greedy=True)``: any positive noise gives the same draw). Checked on every alpha of the grid."""
    from speccascade.verify import residual

    for ql, pl in cases(seed=3):
        _, d = to_dists(ql, pl, temperature=0.0)
        for alpha in ALPHAS[name]:
            pi = METHODS[name].fn(d, alpha).pi
            assert sorted(pi.tolist()) == [0.0] * (len(ql) - 1) + [1.0], (name, alpha, pi)
            draft = int(d.draft_probs.argmax())
            if pi[draft] < 1:  # the draft can be rejected: the residual is one-hot too
                r = residual(pi.unsqueeze(0), d.draft_probs.unsqueeze(0))[0]
                assert int((r > 0).sum()) == 1, (name, alpha, r)


def test_greedy_noise_is_ones_and_draws_nothing():
    from speccascade.sampling import draw_with, exponential_noise

    g = torch.Generator().manual_seed(0)
    like = torch.zeros(2, 7)
    before = g.get_state()
    noise = exponential_noise(like.shape, like, g, greedy=True)
    assert torch.equal(noise, torch.ones(2, 7)) and torch.equal(g.get_state(), before)
    one_hot = torch.zeros(2, 7).index_fill_(1, torch.tensor([3]), 1.0)
    assert draw_with(one_hot, noise).tolist() == [3, 3]
    assert not torch.equal(exponential_noise(like.shape, like, g), torch.ones(2, 7))


@pytest.mark.parametrize("V", [2047, 2048, 2049, 3000, 8000, 49152])
def test_the_split_argmax_is_argmax_ties_and_infinities_included(V):
    """A row's argmax taken over chunks of ARGMAX_CHUNK and then over the chunks (sampling.wide_argmax)
    gives torch.argmax's index, the first maximum: on random rows, rows of many ties (integers 0-2: the
    first 2 wins, whichever chunk it is in), a maximum in the padded last chunk, all -inf rows (0), and
    a maximum repeated at a chunk's border."""
    from speccascade import sampling

    g = torch.Generator().manual_seed(V)
    rows = [torch.randn(3, V, generator=g), torch.randint(0, 3, (2, 6, V), generator=g).float(),
            torch.full((2, V), float("-inf")), torch.full((1, V), -5.0)]
    rows[2][1, -1] = 0.0            # the last entry, in the padded chunk where V is not a multiple
    rows[3][0, [1023, 1024]] = 7.0  # the same maximum either side of the first chunk's border
    for x in rows:
        assert torch.equal(sampling.wide_argmax(x), x.argmax(-1)), (V, x.shape)
    assert sampling.wide_argmax(rows[3]).item() == 1023


def test_the_argmax_is_split_only_where_the_row_is_long_and_the_switch_is_on(monkeypatch):
    """Two chunks of ARGMAX_CHUNK or more: split (the row viewed as chunks); shorter, or with
    SPLIT_ARGMAX off (SPECCASCADE_SPLIT_ARGMAX=0), the plain argmax."""
    from speccascade import sampling

    views = []
    real = torch.Tensor.unflatten
    monkeypatch.setattr(torch.Tensor, "unflatten", lambda self, *a: views.append(a) or real(self, *a))
    sampling.wide_argmax(torch.randn(1, 2047))
    assert views == []
    sampling.wide_argmax(torch.randn(1, 2048))
    assert views == [(-1, (2, 1024))]
    monkeypatch.setattr(sampling, "SPLIT_ARGMAX", False)
    sampling.wide_argmax(torch.randn(1, 49152))
    assert len(views) == 1


def test_the_split_argmax_runs_compiled():
    """The form the block compiles: the same index under torch.compile."""
    from speccascade.sampling import wide_argmax

    x = torch.randn(2, 6, 5000, generator=torch.Generator().manual_seed(1))
    x[1, 2, 4999] = 100.0
    assert torch.equal(torch.compile(wide_argmax)(x), x.argmax(-1))
