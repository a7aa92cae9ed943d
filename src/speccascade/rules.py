"""Target distributions pi = T(q, p): one pure function per speculative method.

Each rule maps a :class:`Dists` (the drafter's and verifier's distributions at the same prefixes)
and a threshold ``alpha`` to a :class:`Target`: ``pi`` and the deferral mask. They are what
distinguishes lossless SD, lossy SD, BiLD* and every speculative cascade; the loop that runs them
(:mod:`.loop`, Algorithm 4) is shared. Equation, algorithm and table numbers follow arXiv 2405.19261 v2
(Narasimhan et al., "Faster Cascades via Speculative Decoding").

``alpha`` is a float, or a tensor with one threshold per row  # [B]  (``generate(alpha=[...])``): every rule
is elementwise in alpha, and :func:`per_row` broadcasts it against the statistic it is compared
with (``[B, 1]`` for a per-position statistic ``[B, gamma + 1]``, ``[B, 1, 1]`` for a per-token one
``[B, gamma + 1, V]``). A float takes the same code path as before; a row of a tensor gives exactly
what a float with that row's value gives (expressions of alpha alone, such as ``1 - alpha``, are
formed in float64 first, as Python forms them for a float).

Temperature: deferral statistics (max-probabilities, entropies, token thresholds, BiLD's
discrepancy) use the untempered ``*_conf`` softmaxes; the mixture and D_TV use the sampling
distributions ``*_probs``. The paper states this split only for greedy decoding (App. C.3, Lemma 8);
the authors' reference implementation applies it at every temperature, and so does this code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .registry import AlphaRange, register
from .sampling import wide_argmax

INF = math.inf
LENIENCE = AlphaRange(0.0, 1.0, high_open=True, default=0.3,
                      meaning="lenience: 0 = exact SD, towards 1 accepts more drafts")


@dataclass
class Dists:
    draft_probs: torch.Tensor   # [..., V] q, sampling distribution (tempered / filtered / one-hot)
    target_probs: torch.Tensor  # [..., V] p, sampling distribution
    draft_conf: torch.Tensor    # [..., V] q at T = 1, unfiltered
    target_conf: torch.Tensor   # [..., V] p at T = 1, unfiltered
    greedy: bool = False


@dataclass
class Target:
    pi: torch.Tensor     # [..., V] target distribution (unnormalised only for ``lossy``)
    defer: torch.Tensor  # [..., V] or [..., 1] bool: True where the verifier's distribution is demanded


# ---------------------------------------------------------------------------------------------
# shared pieces


def total_variation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """D_TV(p, q) = sum_v max(0, p(v) - q(v)).  # [...]"""
    return (p - q).clamp_min(0).sum(-1)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """-sum_v probs(v) log probs(v), with 0 log 0 = 0.  # [...]"""
    return -torch.special.xlogy(probs, probs).sum(-1)


def mixture(d: Dists, defer: torch.Tensor) -> Target:
    """Eq. (6): T_delta(q, p) = (1 - delta) q + delta p, with ``defer`` = delta.  # defer [...]"""
    defer = defer.unsqueeze(-1)
    return Target(pi=torch.where(defer, d.target_probs, d.draft_probs), defer=defer)


def token_mixture(d: Dists, defer: torch.Tensor) -> Target:
    """Eq. (11): pi(v) = q(v) (1 - r(v)) + p(v) eta, eta = sum_v' r(v') q(v').  # defer [..., V]"""
    q, p = d.draft_probs, d.target_probs
    eta = (q * defer).sum(-1, keepdim=True)
    return Target(pi=q * (~defer) + p * eta, defer=defer)


def _max(conf: torch.Tensor) -> torch.Tensor:
    return conf.max(-1).values


def per_row(value, like: torch.Tensor):
    """``value`` (a float, or a per-row tensor ``[B]`` of alpha or an expression of it) ready to
    combine with ``like  # [B, ...]``: a float is returned as is; a tensor is cast to ``like``'s
    dtype and device and shaped ``[B, 1, ..., 1]`` with ``like.dim()`` dimensions."""
    if not isinstance(value, torch.Tensor):
        return value
    return value.to(dtype=like.dtype, device=like.device).reshape(value.shape + (1,) * (like.dim() - value.dim()))


def _one_minus(alpha):
    """1 - alpha, in float64 for a tensor (as Python computes it for a float)."""
    return 1.0 - (alpha.double() if isinstance(alpha, torch.Tensor) else alpha)


# ---------------------------------------------------------------------------------------------
# speculative decoding and its lossy variants


@register("sd", kind="speculative", title="SpecDecode (lossless)", paper="Alg. 1 / Alg. 4 with T = p",
          bonus_from_verifier=True)
def sd(d: Dists, alpha=None) -> Target:
    """Lossless speculative decoding (Leviathan et al. 2023): pi = p."""
    return Target(pi=d.target_probs, defer=torch.ones_like(d.target_probs[..., :1], dtype=torch.bool))


@register("lossy", kind="speculative", title="SpecDecode [Lossy], beta = 1", paper="eq. (16)-(17), Lemma 2",
          alpha=LENIENCE,
          bonus_from_verifier=True)
def lossy(d: Dists, alpha) -> Target:
    """Tran-Thien lossy SD with beta = 1 through Lemma 2: pi = max{min{q, p/(1-alpha)}, p/beta}.

    Verifying against this (unnormalised) pi accepts with kappa = min{1, p/((1-alpha) q)} (16) and
    resamples from norm(max{0, p/beta - q}) (17); the bonus token comes from p.
    """
    return _lossy_pi(d, alpha, beta=torch.ones_like(d.target_probs[..., :1]))


@register("lossy_tuned", kind="speculative", title="SpecDecode [Lossy*], beta solved per position",
          paper="eq. (16)-(17), Tran-Thien's condition",
          alpha=LENIENCE,
          bonus_from_verifier=True)
def lossy_tuned(d: Dists, alpha) -> Target:
    """Lossy SD with beta solved exactly (not by grid search) from Tran-Thien's condition

        sum_v max{0, q(v) - p(v)/(1-alpha)} = sum_v max{0, p(v)/beta - q(v)},

    which makes pi = max{min{q, p/(1-alpha)}, p/beta} a normalised distribution (beta >= 1-alpha).
    """
    return _lossy_pi(d, alpha, beta=solve_lossy_beta(d.draft_probs, d.target_probs, alpha))


def _lossy_pi(d: Dists, alpha, beta: torch.Tensor) -> Target:
    q, p = d.draft_probs, d.target_probs
    inv_beta = torch.where(torch.isinf(beta), torch.zeros_like(beta), 1.0 / beta)
    pi = torch.maximum(torch.minimum(q, p / per_row(_one_minus(alpha), p)), p * inv_beta)
    return Target(pi=pi, defer=torch.ones_like(q[..., :1], dtype=torch.bool))


def solve_lossy_beta(q: torch.Tensor, p: torch.Tensor, alpha) -> torch.Tensor:
    """The beta of Tran-Thien's condition, exactly, per position.  # [..., 1]

    With u = 1/beta, g(u) = sum_v max{0, u p(v) - q(v)} is convex, piecewise linear and
    non-decreasing, with breakpoints u_v = q(v)/p(v). Sorting the breakpoints, on the segment
    after the k-th one g(u) = u P_k - Q_k (P, Q: cumulative sums of p and q over the sorted
    tokens), so g(u) = c solves to u = (c + Q_k) / P_k on the segment containing the crossing.
    When c = 0 any beta >= max p/q works and pi = q; beta = inf is returned.
    """
    c = (q - p / per_row(_one_minus(alpha), p)).clamp_min(0).sum(-1, keepdim=True)  # [..., 1]
    breaks = torch.where(p > 0, q / p.clamp_min(torch.finfo(p.dtype).tiny), torch.full_like(p, INF))
    breaks, order = torch.sort(breaks, dim=-1)
    P = torch.cumsum(torch.gather(p, -1, order), -1)
    Q = torch.cumsum(torch.gather(q, -1, order), -1)
    # g at each breakpoint: g(u_k) = u_k P_{k-1} - Q_{k-1} (nothing before the first)
    P_prev = torch.nn.functional.pad(P[..., :-1], (1, 0))
    Q_prev = torch.nn.functional.pad(Q[..., :-1], (1, 0))
    g_at = torch.where(torch.isinf(breaks), torch.full_like(breaks, INF), breaks * P_prev - Q_prev)
    # the crossing lies after the last breakpoint whose g is <= c
    k = ((g_at <= c).sum(-1, keepdim=True) - 1).clamp_min(0)
    u = (c + torch.gather(Q, -1, k)) / torch.gather(P, -1, k).clamp_min(torch.finfo(p.dtype).tiny)
    beta = torch.where(c > 0, 1.0 / u, torch.full_like(u, INF))
    return beta


# ---------------------------------------------------------------------------------------------
# BiLD*


@register("bild_star", kind="speculative", title="BiLD*", paper="Table 1; Kim et al. 2023",
          alpha=AlphaRange(0.0, INF, default=2.0,
                           meaning="defer when D(q,p) > alpha; the paper sweeps [0, 10]"))
def bild_star(d: Dists, alpha) -> Target:
    """T_BiLD = 1(D <= alpha) q + 1(D > alpha) p, with D = -sum_v q(v) log p(v) (T > 0) or
    D = -log p(argmax q) (greedy), on the untempered distributions."""
    D = bild_discrepancy(d)
    return mixture(d, D > per_row(alpha, D))


def bild_discrepancy(d: Dists) -> torch.Tensor:
    """BiLD's D(q, p).  # [...]"""
    log_p = torch.log(d.target_conf)
    if d.greedy:
        return -log_p.gather(-1, wide_argmax(d.draft_conf).unsqueeze(-1)).squeeze(-1)
    return -(d.draft_conf * log_p).nan_to_num(nan=0.0, neginf=-INF).sum(-1)


# ---------------------------------------------------------------------------------------------
# speculative cascades with a deferral rule delta(q, p) (Algorithm 5)

@register("chow", kind="speculative", title="SpecCascade [Chow]", paper="eq. (2), Alg. 5",
          alpha=AlphaRange(0.0, 1.0, default=0.5,
                           meaning="defer when max q < 1 - alpha: 0 = always (SD), 1 = never (drafter)"))
def chow(d: Dists, alpha) -> Target:
    m = _max(d.draft_conf)
    return mixture(d, m < per_row(_one_minus(alpha), m))


@register("diff", kind="speculative", title="SpecCascade [Diff]", paper="eq. (5), Alg. 5",
          alpha=AlphaRange(-1.0, 1.0, default=0.0,
                           meaning="defer when max q < max p - alpha: -1 = always (SD), 1 = never"))
def diff(d: Dists, alpha) -> Target:
    m = _max(d.target_conf)
    return mixture(d, _max(d.draft_conf) < m - per_row(alpha, m))


@register("opt", kind="speculative", title="SpecCascade [OPT]", paper="eq. (10), Lemma 4, Alg. 5",
          alpha=AlphaRange(-INF, INF, default=0.5,
                           meaning="defer when max q < max p - alpha * D_TV(p,q): -inf = SD, +inf = never"))
def opt(d: Dists, alpha) -> Target:
    """Eq. (10). Note the sign: for alpha > 0 a larger disagreement D_TV makes deferral *less* likely."""
    tv = total_variation(d.target_probs, d.draft_probs)
    return mixture(d, _max(d.draft_conf) < _max(d.target_conf) - per_row(alpha, tv) * tv)


@register("chow_log", kind="speculative", title="SpecCascade [ChowLog]", paper="eq. (24), App. Table 3",
          alpha=AlphaRange(0.0, INF, default=1.0,
                           meaning="defer when entropy(q) > alpha (nats): 0 = nearly always, log V = never"))
def chow_log(d: Dists, alpha) -> Target:
    h = entropy(d.draft_conf)
    return mixture(d, h > per_row(alpha, h))


@register("diff_log", kind="speculative", title="SpecCascade [DiffLog]", paper="eq. (25), App. Table 3",
          alpha=AlphaRange(-INF, INF, default=0.0,
                           meaning="defer when entropy(p) < entropy(q) - alpha (nats)"))
def diff_log(d: Dists, alpha) -> Target:
    h = entropy(d.draft_conf)
    return mixture(d, entropy(d.target_conf) < h - per_row(alpha, h))


@register("opt_log", kind="speculative", title="SpecCascade [OPTLog]", paper="eq. (26), App. Table 3",
          alpha=AlphaRange(-INF, INF, default=0.5,
                           meaning="defer when entropy(p) < entropy(q) - alpha * D_TV(p,q)"))
def opt_log(d: Dists, alpha) -> Target:
    tv = total_variation(d.target_probs, d.draft_probs)
    return mixture(d, entropy(d.target_conf) < entropy(d.draft_conf) - per_row(alpha, tv) * tv)


# ---------------------------------------------------------------------------------------------
# token-specific speculative cascades (Algorithm 6)


@register("token_v1", kind="speculative", title="SpecCascade [TokenV1]", paper="eq. (11), (13), Alg. 6",
          alpha=AlphaRange(-1.0, 1.0, default=0.0,
                           meaning="defer token v when q(v) < max p - alpha"))
def token_v1(d: Dists, alpha) -> Target:
    m = _max(d.target_conf).unsqueeze(-1)
    return token_mixture(d, d.draft_conf < m - per_row(alpha, m))


@register("token_v2", kind="speculative", title="SpecCascade [TokenV2]", paper="eq. (11), (14), Alg. 6",
          alpha=AlphaRange(-1.0, 1.0, default=0.0,
                           meaning="defer token v when p(v) < max p - alpha"))
def token_v2(d: Dists, alpha) -> Target:
    m = _max(d.target_conf).unsqueeze(-1)
    return token_mixture(d, d.target_conf < m - per_row(alpha, m))


@register("token_v3", kind="speculative", title="SpecCascade [Token] (V3)", paper="eq. (11), (15), Alg. 6",
          alpha=AlphaRange(0.0, 1.0, default=0.5,
                           meaning="defer token v when p(v) < max p * (1 - alpha): 1 = never (drafter)"))
def token_v3(d: Dists, alpha) -> Target:
    m = _max(d.target_conf).unsqueeze(-1)
    return token_mixture(d, d.target_conf < m * per_row(_one_minus(alpha), m))
