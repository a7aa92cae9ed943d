"""Verification of one draft block: Algorithm 4 (GenSpecSample) of the paper, as pure functions.

Given gamma drafted tokens x_t .. x_{t+gamma-1}, the drafter's distributions q_{t+j} and the
target distributions pi_{t+j} at the gamma + 1 positions j = 0 .. gamma:

1. a_j ~ Bernoulli(min{1, pi_{t+j}(x_{t+j}) / q_{t+j}(x_{t+j})}) for j < gamma;
2. j* = the first j with a_j = 0 (gamma if all drafts are accepted);
3. the new token at t + j* is drawn from norm(max{0, pi_{t+j*} - q_{t+j*}}) if j* < gamma (the
   *recovered* token), else from the bonus distribution pi_{t+gamma} (p_{t+gamma} for sd / lossy).

The one-step law of steps 1-3 is pi (Leviathan et al. 2023, Thm. 1; Algorithm 4 of arXiv 2405.19261):
P(out = v) = q(v) min{1, pi(v)/q(v)} + (sum_u max{0, q(u) - pi(u)}) norm(max{0, pi - q})(v) = pi(v)
for normalised pi. No host synchronisation happens here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import draw_with, exponential_noise, uniform

#: Floor of q(x) in the ratio pi(x)/q(x), so that a zero q(x) gives a finite ratio; only numerical zeros meet it.
MIN_PROB = 1e-10


@dataclass
class BlockResult:
    n_accepted: torch.Tensor  # [B] long, j*: accepted drafts before the first rejection
    new_token: torch.Tensor   # [B] long, the recovered or bonus token placed at t + j*
    tokens: torch.Tensor      # [B, gamma + 1] long: accepted drafts, new token, then padding
    accepted: torch.Tensor    # [B, gamma] bool, a_j (True after j* is meaningless)


def acceptance_probs(pi: torch.Tensor, draft_probs: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
    """min{1, pi(x) / q(x)} for each drafted token x.  # pi, q [..., V]; drafts [...] -> [...]"""
    pi_x = pi.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
    q_x = draft_probs.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
    return (pi_x / q_x.clamp_min(MIN_PROB)).clamp(max=1.0)


def residual(pi: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """max{0, pi - q}, unnormalised, guarded against 0/0.  # [..., V]

    The residual is all-zero only where pi <= q everywhere, i.e. where every draft is accepted with
    probability 1 and it is never sampled (so it must not be normalised blindly); float rounding can still land
    there, so such rows fall back to pi itself rather than to a NaN.
    """
    res = (pi - draft_probs).clamp_min(0)
    empty = res.sum(-1, keepdim=True) <= 0
    return torch.where(empty, pi.clamp_min(0), res)


def verify_block(drafts: torch.Tensor, draft_probs: torch.Tensor, pi: torch.Tensor,
                 bonus_probs: torch.Tensor, generator: torch.Generator | None,
                 u: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> BlockResult:
    """Algorithm 4, steps "a_j", "j*", "p_res" and the draw, for a batch of blocks.

    drafts       # [B, gamma]      x_{t+j}
    draft_probs  # [B, gamma, V]   q_{t+j}, the distributions the drafts were drawn from
    pi           # [B, gamma, V]   pi_{t+j}
    bonus_probs  # [B, V]          pi_{t+gamma} (or p_{t+gamma})
    u            # [B, gamma]      U[0, 1) draws for the tests (drawn here from ``generator`` if None)
    noise        # [B, V]          Exp(1) draws for the new token (likewise)
    """
    B, gamma = drafts.shape
    accept_p = acceptance_probs(pi, draft_probs, drafts)                     # [B, gamma]
    if u is None:
        u = uniform((B, gamma), accept_p, generator)
    accepted = u < accept_p                                                  # [B, gamma]
    n_accepted = accepted.long().cumprod(-1).sum(-1)                         # [B]
    # the distribution of the new token: residual at j* < gamma, bonus at j* = gamma
    res = residual(pi, draft_probs)                                          # [B, gamma, V]
    res = torch.cat([res, bonus_probs.unsqueeze(1).to(res.dtype)], dim=1)    # [B, gamma + 1, V]
    idx = n_accepted.view(B, 1, 1).expand(B, 1, res.shape[-1])
    new_dist = res.gather(1, idx).squeeze(1)                                 # [B, V]
    if noise is None:
        noise = exponential_noise(new_dist.shape, new_dist, generator)
    new_token = draw_with(new_dist, noise)                                   # [B]
    pos = torch.arange(gamma + 1, device=drafts.device).unsqueeze(0)        # [1, gamma + 1]
    padded = torch.nn.functional.pad(drafts, (0, 1))
    tokens = torch.where(pos < n_accepted.unsqueeze(1), padded,
                         torch.where(pos == n_accepted.unsqueeze(1), new_token.unsqueeze(1), 0))
    return BlockResult(n_accepted=n_accepted, new_token=new_token, tokens=tokens, accepted=accepted)
