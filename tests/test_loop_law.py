"""The law of the whole speculative loop, statistically, on tiny models with known distributions.

For every speculative method and gamma in {1, 2, 4}: 20,000 seeded rows (one batch, so rows also
advance raggedly) generate 3 tokens; the empirical law of the 3 tokens is tested against the
exact law of Algorithm 4 enumerated by reference.py, with a chi-square test at a fixed seed and
level 1e-3. Separately and analytically, that enumerated law equals sequential sampling from
pi_t = T(q_t, p_t) (to 1e-12) for every rule whose bonus comes from pi, and from p for sd.
"""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

import speccascade as sc

from helpers import ALPHA, chi2_pvalue, empirical
from reference import algorithm4_law, lossy_law, reference_rule, sampling_dist, sequential_law, softmax
from tables import TableBackend, make_table, prefix_hash

V = 4
PROMPT = [1, 2]
N_ROWS = 20_000
N_TOKENS = 3
LEVEL = 1e-3
SPECULATIVE = list(ALPHA)
Q_TABLE, P_TABLE = make_table(11, V), make_table(12, V)


def reference_parts(name, alpha, temperature=1.0, top_k=0):
    def q_at(prefix):
        return sampling_dist(Q_TABLE[prefix_hash(prefix)].numpy(), temperature, top_k)

    def p_at(prefix):
        return sampling_dist(P_TABLE[prefix_hash(prefix)].numpy(), temperature, top_k)

    def target_at(q, p, prefix):
        qc = softmax(Q_TABLE[prefix_hash(prefix)].numpy())
        pc = softmax(P_TABLE[prefix_hash(prefix)].numpy())
        return reference_rule(name, q, p, qc, pc, alpha, greedy=temperature == 0)[0]

    spec = sc.METHODS[name]
    bonus_at = (lambda q, p, pi: p) if spec.bonus_from_verifier else (lambda q, p, pi: pi)
    return q_at, p_at, target_at, bonus_at


def run(name, gamma, temperature=1.0, top_k=0, seed=0, **kw):
    drafter, verifier = TableBackend(Q_TABLE, "drafter", 24), TableBackend(P_TABLE, "verifier", 24)
    ids = torch.tensor([PROMPT] * N_ROWS)
    return sc.generate(drafter, verifier, ids, method=name, alpha=ALPHA.get(name, kw.pop("alpha", None)),
                       gamma=gamma, temperature=temperature, top_k=top_k, max_new_tokens=N_TOKENS, seed=seed, **kw)


@pytest.mark.parametrize("gamma", [1, 2, 4])
@pytest.mark.parametrize("name", SPECULATIVE)
def test_loop_law_matches_algorithm4(name, gamma):
    out = run(name, gamma)
    law = algorithm4_law(*reference_parts(name, ALPHA[name]), gamma=gamma, prompt=PROMPT, n=N_TOKENS)
    assert abs(sum(law.values()) - 1) < 1e-9
    assert all(len(t) == N_TOKENS for t in out.tokens)
    assert chi2_pvalue(empirical(out.tokens), law, N_ROWS) > LEVEL


@pytest.mark.parametrize("name,temperature,top_k", [("opt", 0.5, 3), ("token_v3", 0.7, 0), ("chow", 0.5, 2),
                                                    ("lossy", 0.6, 3), ("sd", 0.5, 0), ("bild_star", 0.5, 0)])
def test_loop_law_with_temperature_and_top_k(name, temperature, top_k):
    out = run(name, 2, temperature=temperature, top_k=top_k)
    law = algorithm4_law(*reference_parts(name, ALPHA[name], temperature, top_k), gamma=2, prompt=PROMPT, n=N_TOKENS)
    assert chi2_pvalue(empirical(out.tokens), law, N_ROWS) > LEVEL


@pytest.mark.parametrize("gamma", [1, 2, 4])
@pytest.mark.parametrize("name", [m for m in SPECULATIVE if m not in ("lossy", "lossy_tuned")])
def test_algorithm4_law_is_sequential_pi(name, gamma):
    """Algorithm 4's guarantee (arXiv 2405.19261; Leviathan et al. 2023, Thm. 1): tokens are distributed
    as sequential draws from pi."""
    q_at, p_at, target_at, bonus_at = reference_parts(name, ALPHA[name])
    law = algorithm4_law(q_at, p_at, target_at, bonus_at, gamma=gamma, prompt=PROMPT, n=N_TOKENS)
    seq = sequential_law(target_at, q_at, p_at, PROMPT, N_TOKENS)
    for k in set(law) | set(seq):
        assert abs(law.get(k, 0.0) - seq.get(k, 0.0)) < 1e-12


def test_lossy_first_token_law_is_eq16_17():
    out = run("lossy", 3)
    q = softmax(Q_TABLE[prefix_hash(PROMPT)].numpy())
    p = softmax(P_TABLE[prefix_hash(PROMPT)].numpy())
    expected = lossy_law(q, p, ALPHA["lossy"])
    counts = np.bincount([t[0] for t in out.tokens], minlength=V)
    assert chisquare(counts, expected * N_ROWS).pvalue > LEVEL


@pytest.mark.parametrize("name,alpha", [("chow", 0.0), ("chow", 1.0), ("opt", 0.5), ("token_v3", 0.3), ("sd", None)])
def test_lemma3_rejection_rate(name, alpha):
    """Lemma 3: P(reject) = delta * D_TV(p, q) for mixture rules; sum_v max(0, q - pi) in general."""
    drafter, verifier = TableBackend(Q_TABLE, "drafter", 24), TableBackend(P_TABLE, "verifier", 24)
    out = sc.generate(drafter, verifier, torch.tensor([PROMPT] * N_ROWS), method=name, alpha=alpha, gamma=1,
                      max_new_tokens=1, seed=3, temperature=1.0)
    q = softmax(Q_TABLE[prefix_hash(PROMPT)].numpy())
    p = softmax(P_TABLE[prefix_hash(PROMPT)].numpy())
    pi, defer = reference_rule(name, q, p, q, p, alpha)
    expected = float(np.clip(q - pi, 0, None).sum())
    if not isinstance(defer, list):
        assert abs(expected - defer * float(np.clip(p - q, 0, None).sum())) < 1e-12
    s = out.stats
    assert s.accepted + s.rejected == N_ROWS
    sigma = np.sqrt(max(expected * (1 - expected), 1e-12) / N_ROWS)
    assert abs(s.rejection_rate - expected) < 5 * sigma + 1e-12


@pytest.mark.parametrize("name,alpha,extra",
                         [("oracle_diff", 0.05, {}), ("token_cascade", 0.35, {"max_drafter_run": None})])
def test_sequential_cascade_law(name, alpha, extra):
    rule = {"oracle_diff": "diff", "token_cascade": "chow"}[name]
    drafter, verifier = TableBackend(Q_TABLE, "drafter", 24), TableBackend(P_TABLE, "verifier", 24)
    out = sc.generate(drafter, verifier, torch.tensor([PROMPT] * N_ROWS), method=name, alpha=alpha,
                      max_new_tokens=N_TOKENS, seed=5, temperature=1.0, **extra)
    q_at, p_at, target_at, _ = reference_parts(rule, alpha)
    law = sequential_law(target_at, q_at, p_at, PROMPT, N_TOKENS)
    assert chi2_pvalue(empirical(out.tokens), law, N_ROWS) > LEVEL


@pytest.fixture
def bonus_draft_late(monkeypatch):
    """The block's call at the bonus position made after the drafts are stacked and before the verifier's
    call returns, as a captured block on a GPU makes it (on a side stream there: loop.bonus_draft_beside)."""
    from speccascade import loop

    monkeypatch.setattr(loop, "bonus_draft_beside", lambda drafter, verifier, req, compiled: True)


@pytest.mark.parametrize("name", ["diff", "opt_log", "token_v3", "chow"])
def test_loop_law_with_the_bonus_draft_beside_the_verifier(name, bonus_draft_late):
    out = run(name, 2)
    law = algorithm4_law(*reference_parts(name, ALPHA[name]), gamma=2, prompt=PROMPT, n=N_TOKENS)
    assert chi2_pvalue(empirical(out.tokens), law, N_ROWS) > LEVEL


@pytest.mark.parametrize("name,temperature", [("diff", 1.0), ("opt_log", 0.0), ("token_v3", 0.7)])
def test_bonus_draft_beside_the_verifier_draws_the_same_tokens(name, temperature, monkeypatch):
    """Moving the bonus position's call (it draws nothing) leaves every draw where it was: the same seed
    gives the same tokens and counters, token for token."""
    from speccascade import loop

    serial = run(name, 3, temperature=temperature, seed=5)
    moved = []
    monkeypatch.setattr(loop, "bonus_draft_beside", lambda drafter, verifier, req, compiled: moved.append(1) or True)
    late = run(name, 3, temperature=temperature, seed=5)
    assert moved, "the reordered block did not run"
    assert late.tokens == serial.tokens
    assert late.stats.accepted == serial.stats.accepted and late.stats.blocks == serial.stats.blocks


def test_bonus_draft_beside_only_where_the_block_makes_that_call():
    """sd and lossy SD draw the bonus token from p and make no call at the bonus position; a cascade's
    call moves only in a compiled, captured block on a GPU."""
    from speccascade import loop
    from speccascade.loop import DecodeRequest
    from speccascade.sampling import SamplingConfig

    drafter, verifier = TableBackend(Q_TABLE, "drafter", 24), TableBackend(P_TABLE, "verifier", 24)

    def req(name):
        return DecodeRequest(spec=sc.METHODS[name], alpha=None, gamma=3, sampling=SamplingConfig(), max_new_tokens=4)

    assert not loop.bonus_draft_beside(drafter, verifier, req("diff"), compiled=True)   # a CPU backend
    cuda = type("CudaLike", (), {"device": torch.device("cuda"), "tp": 1})()
    assert loop.bonus_draft_beside(cuda, cuda, req("diff"), compiled=True)
    assert not loop.bonus_draft_beside(cuda, cuda, req("diff"), compiled=False)
    assert not loop.bonus_draft_beside(cuda, cuda, req("sd"), compiled=True)
    split = type("Split", (), {"device": torch.device("cuda"), "tp": 2})()
    assert not loop.bonus_draft_beside(cuda, split, req("diff"), compiled=True)


@pytest.mark.parametrize("chunk", [1, 2])
@pytest.mark.parametrize("name,temperature", [("sd", 1.0), ("diff", 1.0), ("opt_log", 0.7), ("token_v3", 1.0)])
def test_loop_law_with_the_split_argmax(name, temperature, chunk, monkeypatch):
    """The block's argmaxes (greedy tokens, exponential races) taken over chunks of the vocabulary, as a
    49,152-token row is taken in chunks of 1,024 (sampling.wide_argmax): here V = 4 in chunks of 1 or 2.
    (The padded last chunk, V not a multiple: test_rules.)"""
    from speccascade import sampling

    monkeypatch.setattr(sampling, "ARGMAX_CHUNK", chunk)
    out = run(name, 2, temperature=temperature)
    law = algorithm4_law(*reference_parts(name, ALPHA[name], temperature), gamma=2, prompt=PROMPT, n=N_TOKENS)
    assert chi2_pvalue(empirical(out.tokens), law, N_ROWS) > LEVEL


@pytest.mark.parametrize("name,temperature", [("sd", 1.0), ("diff", 0.0), ("opt_log", 1.0)])
def test_the_split_argmax_draws_the_same_tokens(name, temperature, monkeypatch):
    """Split or not, the argmax is the same index, so a seed gives the same tokens and counters."""
    from speccascade import sampling

    monkeypatch.setattr(sampling, "SPLIT_ARGMAX", False)
    whole = run(name, 3, temperature=temperature, seed=7)
    monkeypatch.setattr(sampling, "SPLIT_ARGMAX", True)
    monkeypatch.setattr(sampling, "ARGMAX_CHUNK", 2)
    calls = []
    real = torch.Tensor.unflatten
    monkeypatch.setattr(torch.Tensor, "unflatten", lambda self, *a: calls.append(a) or real(self, *a))
    split = run(name, 3, temperature=temperature, seed=7)
    assert calls, "no argmax was split"
    assert split.tokens == whole.tokens
    assert split.stats.accepted == whole.stats.accepted and split.stats.blocks == whole.stats.blocks
