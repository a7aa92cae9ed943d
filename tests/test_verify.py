"""Exact one-step law of verification, analytically in float64, for every rule and edge case.

The law of one verification computed from the library's own acceptance_probs / residual must equal
pi (and, for lossy, the law eqs. (16)-(17) define), to 1e-12.
"""

import numpy as np
import pytest
import torch

from speccascade import METHODS
from speccascade.rules import Dists
from speccascade.verify import acceptance_probs, residual, verify_block

from reference import lossy_law, reference_rule, softmax

SPECULATIVE = [m for m, s in METHODS.items() if s.kind == "speculative"]


def library_law(pi: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """P(out = v) = sum_x q(x) [a(x) 1(v = x) + (1 - a(x)) res(v) / sum res], with a and res from verify.py."""
    V = q.shape[-1]
    drafts = torch.arange(V)
    a = acceptance_probs(pi.expand(V, V), q.expand(V, V), drafts)      # [V]
    res = residual(pi, q)
    res = res / res.sum()
    return q * a + (q * (1 - a)).sum() * res


def random_pairs(seed, V):
    rng = np.random.default_rng(seed)
    for _ in range(20):
        yield softmax(rng.normal(size=V) * 2), softmax(rng.normal(size=V) * 2)


def edge_pairs(V):
    one_hot = lambda i: np.eye(V)[i]  # noqa: E731
    yield one_hot(0), softmax(np.arange(V) * 1.0)            # one-hot q
    yield softmax(np.arange(V) * 1.0), one_hot(V - 1)         # one-hot p
    yield one_hot(1), one_hot(1)                              # both one-hot, equal
    yield one_hot(0), one_hot(V - 1)                          # both one-hot, disjoint (T -> 0)
    q = softmax(np.arange(V) * 1.0)
    q[0] = 0.0
    yield q / q.sum(), softmax(-np.arange(V) * 1.0)           # q has zeros where p > 0
    yield softmax(np.ones(V)), softmax(np.ones(V))            # q == p (residual 0/0)


@pytest.mark.parametrize("V", [2, 3, 6])
@pytest.mark.parametrize("name", SPECULATIVE)
def test_one_step_law_equals_target(name, V):
    alphas = {"sd": [None], "lossy": [0.0, 0.5], "lossy_tuned": [0.0, 0.5, 0.9], "bild_star": [0.0, 1.0],
              "chow": [0.0, 0.5, 1.0], "diff": [-1.0, 0.1, 1.0], "opt": [-3.0, 0.3, 3.0], "chow_log": [0.0, 0.5],
              "diff_log": [-0.5, 0.2], "opt_log": [-1.0, 1.0], "token_v1": [-1.0, 0.0, 0.5],
              "token_v2": [-1.0, 0.1, 0.5], "token_v3": [0.0, 0.5, 1.0]}[name]
    for q, p in list(random_pairs(V, V)) + list(edge_pairs(V)):
        t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
        d = Dists(t(q), t(p), t(q), t(p))
        for alpha in alphas:
            pi = METHODS[name].fn(d, alpha).pi
            law = library_law(pi, d.draft_probs).numpy()
            assert not np.isnan(law).any()
            if name == "lossy":
                np.testing.assert_allclose(law, lossy_law(q, p, alpha), atol=1e-12)
            else:
                np.testing.assert_allclose(law, pi.numpy() / pi.numpy().sum(), atol=1e-12)
            ref_pi, _ = reference_rule(name, q, p, q, p, alpha)
            np.testing.assert_allclose(pi.numpy(), ref_pi, atol=1e-12)


def test_residual_guard_no_nan_when_pi_equals_q():
    q = torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64)
    res = residual(q, q)
    assert torch.isfinite(res).all() and float(res.sum()) > 0


def test_verify_block_edge_cases_pi_equals_q_accepts_everything():
    g = torch.Generator().manual_seed(0)
    B, gamma, V = 64, 3, 4
    q = torch.softmax(torch.randn(B, gamma, V, generator=g, dtype=torch.float64), -1)
    drafts = torch.multinomial(q.reshape(-1, V), 1, generator=g).reshape(B, gamma)
    bonus = torch.softmax(torch.randn(B, V, generator=g, dtype=torch.float64), -1)
    r = verify_block(drafts, q, q, bonus, g)
    assert torch.all(r.n_accepted == gamma)
    assert torch.equal(r.tokens[:, :gamma], drafts)


def test_verify_block_one_hot_disjoint_rejects_first_and_recovers_target():
    g = torch.Generator().manual_seed(0)
    q = torch.tensor([[[1.0, 0.0, 0.0]]], dtype=torch.float64)
    pi = torch.tensor([[[0.0, 0.0, 1.0]]], dtype=torch.float64)
    r = verify_block(torch.tensor([[0]]), q, pi, torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64), g)
    assert int(r.n_accepted) == 0 and int(r.new_token) == 2


def test_verify_block_forced_draws_table():
    """Algorithm 4 on a 3-token vocabulary with given uniforms u and Exp(1) noise, every outcome
    computed by hand. gamma = 2; every row has the same distributions:

    position 0: q = (.5, .3, .2), pi = (.2, .3, .5): accept x with min(1, pi/q) = (.4, 1, 1);
                residual max(0, pi - q) = (0, 0, .3), so a rejection there recovers token 2;
    position 1: q = (.2, .2, .6), pi = (.5, .3, .2): accept (1, 1, 1/3); residual (.3, .1, 0);
    bonus (.1, .6, .3).
    The new token is argmax(dist / noise): noise (1, 1, 1) picks the most probable token."""
    q = torch.tensor([[.5, .3, .2], [.2, .2, .6]], dtype=torch.float64)
    pi = torch.tensor([[.2, .3, .5], [.5, .3, .2]], dtype=torch.float64)
    bonus = torch.tensor([.1, .6, .3], dtype=torch.float64)
    ones, favour_1, favour_0 = [1.0, 1.0, 1.0], [1.0, 0.1, 1.0], [0.01, 1.0, 1.0]
    #       drafts   u             noise      accepted         j*  new  tokens
    table = [([0, 1], [0.39, 0.99], ones,     [True, True],    2,  1,  [0, 1, 1]),  # bonus: argmax (.1,.6,.3)
             ([0, 1], [0.40, 0.00], ones,     [False, True],   0,  2,  [2, 0, 0]),  # u = .4 is not < .4
             ([1, 2], [0.70, 0.34], ones,     [True, False],   1,  0,  [1, 0, 0]),  # .34 >= 1/3: residual (.3,.1,0)
             ([1, 2], [0.70, 0.33], ones,     [True, True],    2,  1,  [1, 2, 1]),  # .33 < 1/3
             ([2, 2], [0.99, 0.50], favour_1, [True, False],   1,  1,  [2, 1, 0]),  # (.3/1, .1/.1, 0): token 1
             ([1, 0], [0.00, 0.999], favour_0, [True, True],   2,  0,  [1, 0, 0])]  # (.1/.01, .6, .3): token 0
    B = len(table)
    drafts = torch.tensor([row[0] for row in table])
    u = torch.tensor([row[1] for row in table], dtype=torch.float64)
    noise = torch.tensor([row[2] for row in table], dtype=torch.float64)
    r = verify_block(drafts, q.expand(B, 2, 3), pi.expand(B, 2, 3), bonus.expand(B, 3), None, u=u, noise=noise)
    assert r.accepted.tolist() == [row[3] for row in table]
    assert r.n_accepted.tolist() == [row[4] for row in table]
    assert r.new_token.tolist() == [row[5] for row in table]
    assert r.tokens.tolist() == [row[6] for row in table]
