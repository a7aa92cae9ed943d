"""The one speculative loop: draft, score, verify, advance (Algorithm 4 with any rule).

Lossless SD, lossy SD, BiLD* and every speculative cascade run through ``speculative_decode``;
they differ only in the rule that builds pi (:mod:`.rules`). Rows of a batch advance
independently: each accepts its own number of drafts per block.

Per block (Algorithm 4 of arXiv 2405.19261):
1. Draft: gamma + 1 drafter calls of one token per row. Calls 0 .. gamma-1 give q_t .. q_{t+gamma-1}
   and the drafts x_t .. x_{t+gamma-1}; call gamma feeds the last draft and gives q_{t+gamma}, which
   the bonus token's pi_{t+gamma} = T(q_{t+gamma}, p_{t+gamma}) needs. When all drafts are accepted
   that call is the one the next block needs anyway (its result stays in the cache); on a rejection
   it is rolled back with the rest. Where the bonus token comes from p instead (sd and lossy SD:
   ``MethodSpec.bonus_from_verifier``), q_{t+gamma} is never used, so the block makes gamma calls:
   a row whose drafts were all accepted carries its last draft into the next block, whose first
   call feeds [that draft, the pending token] (a ragged feed of 2; 1 for the other rows). In a captured
   block on a GPU, call gamma runs on a second CUDA stream beside the verifier's call (step 2), which
   needs only the drafts (:func:`bonus_draft_beside`): it then costs the block almost nothing.
2. Score: one verifier call on [pending, x_t .. x_{t+gamma-1}] gives p_t .. p_{t+gamma}.
3. Verify: pi_{t+j} = T(q_{t+j}, p_{t+j}); accept / recover / bonus (:func:`.verify.verify_block`).
4. Advance: both caches keep the pending token and the accepted drafts; the new token becomes the
   pending one. Output is truncated at EOS and at ``max_new_tokens`` even when a block overshoots.

A drafter that reads the verifier's states (:mod:`.models.features`, EAGLE-style; ``state.feed``)
runs through the same block: call 0 re-feeds the last block's accepted drafts and its new token with
the verifier's states from its scoring call (:class:`FeatureFeed`, a ragged feed of up to gamma + 1),
later calls feed each draft with the drafter's own last state, the verifier's call also returns its
states, and the drafter keeps only call 0's tokens, so its cache holds true-feature states only.

The block (:func:`speculative_block`) is one function of device state (:class:`DecodeState`)
and the request (:class:`DecodeRequest`): it makes no host read and keeps no host-side
bookkeeping, so :mod:`.runner` either calls it in a host loop (any backend; what the CPU tests
exercise) or captures it as one CUDA graph and replays it (the fused backend on a GPU). The host
learns whether every row is done (and whether a logit was non-finite) once per block, never per
token, through :class:`.runner.StepSync`: on a GPU it reads each block's flags one block late, so
it queues block i + 1 while the device still runs block i; the block computed past the end is
masked out of the counters on the device. A block in which the drafter gives EOS at least
``NEAR_END_EOS_PROB`` at some position (or after which the next block may reach ``max_new_tokens``)
tells the host that the end is near, and the host then reads the next block's flags before queuing
another, so a decode whose end the drafter foresaw runs no block past it (``Stats.steps_past_end``).
``HFBackend.commit`` adds one sync per model and block (to crop its dynamic cache); the static and
fused backends add none.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from . import runner
from .errors import SpecCascadeError
from .models.base import Backend, first_pending, prefill_calls
from .registry import MethodSpec
from .rules import Dists
from .runner import StepSync, run_steps, step_flags
from .sampling import SamplingConfig, confidence_probs, draw_with, exponential_noise, sampling_probs, wide_argmax
from .stats import Stats
from .verify import verify_block


def make_dists(draft_logits: torch.Tensor, target_logits: torch.Tensor, cfg: SamplingConfig,
               draft_probs: torch.Tensor | None = None) -> Dists:
    """Both models' sampling and confidence distributions from their logits.  # [..., V] each
    (``draft_probs``: the drafter's sampling distributions if already computed.)"""
    plain = cfg.temperature == 1.0 and cfg.top_k == 0 and cfg.top_p == 1.0
    q = sampling_probs(draft_logits, cfg) if draft_probs is None else draft_probs
    p = sampling_probs(target_logits, cfg)
    return Dists(draft_probs=q, target_probs=p,
                 draft_conf=q if plain else confidence_probs(draft_logits),
                 target_conf=p if plain else confidence_probs(target_logits),
                 greedy=cfg.greedy)


class Emitter:
    """Collects each row's output tokens with EOS / ``max_new_tokens`` truncation, on the device."""

    def __init__(self, batch: int, max_new_tokens: int, width: int, eos_token_id, device):
        self.max_new = max_new_tokens
        self.out = torch.zeros(batch, max_new_tokens + width, dtype=torch.long, device=device)
        self.n_out = torch.zeros(batch, dtype=torch.long, device=device)
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        self.eos = torch.tensor(eos, dtype=torch.long, device=device)

    def emit(self, tokens: torch.Tensor, produced: torch.Tensor) -> torch.Tensor:
        """Append the first ``produced[b]`` of ``tokens[b]  # [B, k]`` to each active row; returns
        how many were kept per row after truncation.  # [B]"""
        B, k = tokens.shape
        pos = torch.arange(k, device=tokens.device).unsqueeze(0)
        count = torch.minimum(produced, self.max_new - self.n_out)
        if self.eos.numel():
            is_eos = torch.isin(tokens, self.eos) & (pos < count.unsqueeze(1))
            hit = is_eos.any(1)
            count = torch.where(hit, is_eos.long().argmax(1) + 1, count)
        else:
            hit = torch.zeros_like(self.done)
        count = torch.where(self.done, 0, count)
        idx = self.n_out.unsqueeze(1) + pos
        keep = pos < count.unsqueeze(1)
        self.out.scatter_(1, idx, torch.where(keep, tokens, self.out.gather(1, idx)))
        self.n_out += count
        self.done |= (self.n_out >= self.max_new) | hit
        return count

    def tokens(self) -> list[list[int]]:
        n = self.n_out.tolist()
        return [row[:m] for row, m in zip(self.out.tolist(), n)]


def prefill_both(drafter: Backend, verifier: Backend, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> torch.Tensor:
    """Pre-fill the verifier, then the drafter; returns ``input_ids`` on the verifier's device.

    On a GPU the calls are asynchronous: while the device runs the verifier's pre-fill (the longer
    one), the host does the drafter's, whose host work would otherwise run with the device idle at
    the start of every decode (on an H200, timed alone, the deep pair's 1-layer drafter's pre-fill
    took 0.55 ms, half a verifier step). The prompt goes to the device first, once: a copy from host
    memory inside either ``reset`` would make the host wait for the device there."""
    input_ids, attention_mask = input_ids.to(verifier.device), attention_mask.to(verifier.device)
    for backend in (verifier, drafter) if PREFILL_VERIFIER_FIRST else (drafter, verifier):
        backend.reset(input_ids, attention_mask)
    return input_ids


#: the pre-fills' order (benchmarks/end_wait.py switches it off to time the drafter-first order it replaced)
PREFILL_VERIFIER_FIRST = True


def prefill_with_states(drafter: Backend, verifier: Backend, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`prefill_both` for a feature drafter (:mod:`.models.features`): the verifier first, whose
    states of the prompt are the drafter's features; returns ``input_ids`` on the device and the
    verifier's state of each row's last cached prompt token  # [B, H]  (None: one-token prompts)."""
    from .models.features import prompt_features

    input_ids, attention_mask = input_ids.to(verifier.device), attention_mask.to(verifier.device)
    before, last = prompt_features(verifier.reset_hidden(input_ids, attention_mask), attention_mask)
    drafter.reset(input_ids, attention_mask, features=before)
    return input_ids, last


def check_feature_pair(drafter: Backend, verifier: Backend) -> bool:
    """True where the drafter reads the verifier's states (:mod:`.models.features`); then the verifier's
    backend must give them (the dynamic and fused ones do)."""
    from .models.features import is_feature_drafter

    if not is_feature_drafter(drafter):
        return False
    if not getattr(verifier, "gives_states", False):
        raise SpecCascadeError(f"the drafter reads the verifier's states, which the verifier's "
                               f"{type(verifier).__name__} does not give: run both models on the dynamic or "
                               f"fused backend (e.g. --backend fused)")
    width = getattr(verifier, "state_size", None)
    if width is not None and width != drafter.feature_size:
        raise SpecCascadeError(f"the drafter reads states {drafter.feature_size} wide; the verifier's are {width}: "
                               f"a feature drafter is made for its verifier's width")
    return True


def start_both(drafter: Backend, verifier: Backend, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               stats: Stats, max_new_tokens: int, eos_token_id, width: int) -> tuple[torch.Tensor, Emitter]:
    """Pre-fill both models; returns each row's pending token  # [B]  and an output collector."""
    input_ids = prefill_both(drafter, verifier, input_ids, attention_mask)
    stats.prefill_calls += prefill_calls(drafter, input_ids) + prefill_calls(verifier, input_ids)
    pending = first_pending(verifier, input_ids).to(drafter.device)
    return pending, Emitter(input_ids.shape[0], max_new_tokens, width, eos_token_id, drafter.device)


def check_finite(logits: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """A device flag: some active row has a non-finite logit.  # logits [B, ..., V]; active [B]"""
    bad = ~torch.isfinite(logits).flatten(1).all(1)
    return (bad & active).any()


# ---------------------------------------------------------------------------------------------
# the request, the device state, the block


@dataclass(frozen=True)
class DecodeRequest:
    """What a speculative decode was asked for (everything but the prompts and the randomness)."""

    spec: MethodSpec
    alpha: float | None
    gamma: int
    sampling: SamplingConfig
    max_new_tokens: int
    eos_token_id: int | list[int] | None = None

    def key(self) -> tuple:
        """What a captured block depends on (alpha is read from the state, so it is not part of it)."""
        eos = self.eos_token_id if not isinstance(self.eos_token_id, list) else tuple(self.eos_token_id)
        return (self.spec.name, self.gamma, self.sampling, self.max_new_tokens, eos)


class BlockCounters:
    """The block counters of a decode, on the device, per row and by name (conventions: :mod:`.stats`).

    ``rows[b, i]`` sums column ``FIELDS[i]`` of row b over the blocks in which it was active;
    ``positions[b, j]`` counts row b's blocks whose draft j was accepted; ``calls`` counts the
    blocks in which any row was active (the model calls they made).
    """

    FIELDS = ("blocks", "drafted", "accepted", "rejected", "bonus", "deferred", "emitted", "truncated")

    def __init__(self, batch: int, positions: int, device):
        self.rows = torch.zeros(batch, len(self.FIELDS), dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, positions, dtype=torch.long, device=device)
        self.calls = torch.zeros((), dtype=torch.long, device=device)

    def zero_(self) -> None:
        for t in (self.rows, self.positions, self.calls):
            t.zero_()

    def add(self, active: torch.Tensor, columns: dict[str, torch.Tensor], accepted_upto: torch.Tensor) -> None:
        """Add one block: ``columns[name]  # [B]`` per field, ``accepted_upto  # [B]`` accepted drafts."""
        live = active.unsqueeze(1)
        self.rows += torch.stack([columns[f].long() for f in self.FIELDS], 1) * live
        self.calls += active.any().long()
        pos = torch.arange(self.positions.shape[1], device=active.device)
        self.positions += (pos.unsqueeze(0) < accepted_upto.unsqueeze(1)) & live

    def add_to(self, stats: Stats, drafter_calls_per_block: int, verifier_calls_per_block: int) -> None:
        c = dict(zip(self.FIELDS, self.rows.sum(0).tolist()))
        calls = int(self.calls)
        stats.add(Stats(drafter_calls=calls * drafter_calls_per_block, verifier_calls=calls * verifier_calls_per_block,
                        recovered=c["rejected"], accepted_per_position=self.positions.sum(0).tolist(), **c))


class DecodeState:
    """Everything a block reads and writes, as device tensors at fixed addresses (so a captured
    block can be replayed on new prompts after their values are copied in)."""

    def __init__(self, batch: int, req: DecodeRequest, width: int, positions: int, device, models: int = 2):
        self.pending = torch.zeros(batch, dtype=torch.long, device=device)       # [B] the token fed next
        self.emitter = Emitter(batch, req.max_new_tokens, width, req.eos_token_id, device)
        self.counters = BlockCounters(batch, positions, device)
        self.nonfinite = torch.zeros(models, dtype=torch.bool, device=device)   # per model, sticky
        self.flags = torch.zeros(models + 3, dtype=torch.long, device=device)   # see runner.step_flags
        self.alpha = torch.zeros(batch, dtype=torch.float64, device=device)     # [B] per row (rules.per_row)
        # [B] a draft accepted but not yet fed to the drafter (sd / lossy: see extend_carried)
        self.carry = torch.zeros(batch, dtype=torch.long, device=device)
        self.carried = torch.zeros(batch, dtype=torch.bool, device=device)
        self.feed: FeatureFeed | None = None   # a drafter that reads the verifier's states (with_features)

    def with_features(self, gamma: int, size: int) -> "DecodeState":
        """The state of a decode whose drafter reads the verifier's states (:mod:`.models.features`)."""
        self.feed = FeatureFeed(self.pending.shape[0], gamma, size, self.pending.device)
        return self

    def start(self, pending: torch.Tensor, alpha) -> None:
        """Copy a new request's prompts' last tokens and ``alpha`` (a float, or one per row) in."""
        self.pending.copy_(pending)
        e = self.emitter
        for t in (e.out, e.n_out, e.done, self.nonfinite, self.flags, self.carry, self.carried):
            t.zero_()
        self.counters.zero_()
        if isinstance(alpha, torch.Tensor):
            self.alpha.copy_(alpha)
        else:
            self.alpha.fill_(0.0 if alpha is None else float(alpha))

    def end_step(self, active: torch.Tensor, finite_flags: list[torch.Tensor], near_end: torch.Tensor) -> None:
        """Record the step's non-finite flags and write ``flags`` for the host (no host read; the
        layout of :func:`.runner.step_flags`). ``near_end  # [B]``: rows whose next step is likely
        their last (the host then reads that step's flags before queuing another)."""
        self.nonfinite |= torch.stack(finite_flags)
        e = self.emitter   # the non-finite flags are sticky, the token count cumulative
        self.flags.copy_(step_flags(e.done, list(self.nonfinite.unbind()), e.n_out, near_end))

    def near_limit(self, per_step: int) -> torch.Tensor:
        """Rows that the next step, emitting up to ``per_step`` tokens, may take to ``max_new_tokens``.  # [B]"""
        return self.emitter.n_out + per_step >= self.emitter.max_new


class FeatureFeed:
    """A feature drafter's next first feed (:mod:`.models.features`): the last block's accepted drafts
    and its new token, each with the verifier's state at the position before, from the verifier's
    scoring call; row b's first ``lengths[b]`` are real."""

    def __init__(self, batch: int, gamma: int, size: int, device):
        self.tokens = torch.zeros(batch, gamma + 1, dtype=torch.long, device=device)   # [B, gamma + 1]
        self.states = torch.zeros(batch, gamma + 1, size, device=device)              # [B, gamma + 1, H]
        self.lengths = torch.ones(batch, dtype=torch.long, device=device)             # [B]

    def start(self, pending: torch.Tensor, before: torch.Tensor | None) -> None:
        """A decode's first feed: each row's pending token with the verifier's state of the prompt's
        last cached token  # [B, H]  (None: one-token prompts, no state)."""
        self.tokens.zero_()
        self.tokens[:, 0] = pending
        self.states.zero_()
        if before is not None:
            self.states[:, 0] = before
        self.lengths.fill_(1)

    def advance(self, drafts: torch.Tensor, n_acc: torch.Tensor, new_token: torch.Tensor,
                verifier_states: torch.Tensor) -> None:
        """After a block: [x_t+1 .. x_t+n_acc (accepted drafts), new token], whose states before them
        are the verifier's at the block's positions t .. t + n_acc  (``verifier_states  # [B, gamma + 1, H]``)."""
        slot = torch.arange(self.tokens.shape[1], device=drafts.device).unsqueeze(0)
        tokens = torch.cat([drafts, new_token.unsqueeze(1)], 1)
        self.tokens.copy_(torch.where(slot == n_acc.unsqueeze(1), new_token.unsqueeze(1), tokens))
        self.states.copy_(verifier_states)
        self.lengths.copy_(n_acc + 1)

    def extend(self, drafter: Backend) -> tuple[torch.Tensor, torch.Tensor]:
        """A block's first drafter call: this feed, ragged; returns each row's logits and the drafter's
        own state after its last real token (its pending one).  # [B, V], [B, H]"""
        logits, own = drafter.extend_features(self.tokens, self.states, self.lengths)
        last = (self.lengths - 1).view(-1, 1, 1)
        return (logits.gather(1, last.expand(-1, 1, logits.shape[-1])).squeeze(1),
                own.gather(1, last.expand(-1, 1, own.shape[-1])).squeeze(1))


#: a cascade's last drafter call of a block (q at the bonus position) on a second CUDA stream, beside the
#: verifier's call, in a captured block (:func:`bonus_draft_beside`); ``SPECCASCADE_BONUS_DRAFT_BESIDE=0``
#: runs it before the verifier's call instead, on the one stream
BONUS_DRAFT_BESIDE = os.environ.get("SPECCASCADE_BONUS_DRAFT_BESIDE", "1") != "0"

_SIDE_STREAMS: dict = {}


def bonus_draft_beside(drafter: Backend, verifier: Backend, req: DecodeRequest, compiled: bool) -> bool:
    """Whether a block's call at the bonus position (call gamma: q_{t+gamma}, no draw) runs beside the
    verifier's call rather than before it: in a captured, compiled block on a GPU (where the block's
    calls are launched back to back and a batch-1 call leaves most of the GPU idle), for the methods
    that make that call (their bonus token comes from pi, not p), with no tensor parallelism (two
    streams could order two models' collectives differently on different ranks). Same draws, same
    result: the call draws nothing, and nothing before the verification reads it."""
    return (BONUS_DRAFT_BESIDE and compiled and not req.spec.bonus_from_verifier
            and drafter.device.type == "cuda"
            and getattr(drafter, "tp", 1) == 1 and getattr(verifier, "tp", 1) == 1)


@contextlib.contextmanager
def beside(device: torch.device):
    """Work queued inside runs on a side stream of ``device``, after what the current stream has
    queued so far; :func:`join` makes the current stream wait for it. Elsewhere than on CUDA (the CPU
    tests of the reordered block), a plain block."""
    if device.type != "cuda":
        yield
        return
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    side = _SIDE_STREAMS[device]
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        yield


def join(device: torch.device) -> None:
    """The current stream waits for the work queued :func:`beside` it."""
    if device.type == "cuda" and device in _SIDE_STREAMS:
        torch.cuda.current_stream(device).wait_stream(_SIDE_STREAMS[device])


def speculative_block(drafter: Backend, verifier: Backend, state: DecodeState, req: DecodeRequest,
                      alpha, generator: torch.Generator | None, compiled: bool = False) -> None:
    """One block of Algorithm 4 (GenSpecSample) for every row, in place on ``state``; no host read.

    The random draws are made apart from the arithmetic (in the same order as the arithmetic
    would make them), so that with ``compiled`` the arithmetic between the model calls runs as a
    few torch.compile'd kernels: a draft's sampling (:func:`draft_token`) and everything after the
    verifier's call (:func:`finish_block`)."""
    gamma, cfg = req.gamma, req.sampling
    sample = _compiled(draft_token) if compiled else draft_token
    finish = _compiled(finish_block) if compiled else finish_block
    active = ~state.emitter.done                                             # [B]
    # 1. draft: gamma + 1 drafter calls (gamma where q at the bonus position is unused)
    feed = state.feed   # a feature drafter: the verifier's states in, its own between drafts
    carry = req.spec.bonus_from_verifier and feed is None
    token, own, q_logits, q_probs, drafts = state.pending, None, [], [], []

    def call(j: int, token: torch.Tensor, own: torch.Tensor | None):
        """Drafter call j of the block on the last token: its logits  # [B, V] (and a feature drafter's state)."""
        if feed is not None:
            if j == 0:
                return feed.extend(drafter)                                  # [B, V], [B, H]
            logits, own = drafter.extend_features(token.unsqueeze(1), own.unsqueeze(1))
            return logits[:, -1], own[:, -1]
        if j == 0 and carry:
            return extend_carried(drafter, state, token), None               # [B, V]
        return drafter.extend(token.unsqueeze(1))[:, -1], None               # [B, V]

    calls = req.spec.drafter_calls_per_block(gamma)
    late = calls > gamma and bonus_draft_beside(drafter, verifier, req, compiled)   # call gamma beside step 2
    for j in range(gamma if late else calls):
        logits, own = call(j, token, own)
        draw = j < gamma   # (greedy: the draft is the argmax, no noise is made)
        noise = exponential_noise(logits.shape, logits, generator) if draw and not cfg.greedy else None
        probs, token = sample(logits, noise, cfg, draw)                      # [B, V], [B]
        q_logits.append(logits)
        q_probs.append(probs)
        if j < gamma:
            drafts.append(token)
    if req.spec.bonus_from_verifier:   # a stand-in at the bonus position, where nothing is drawn from pi
        q_logits.append(q_logits[-1])
        q_probs.append(q_probs[-1])
    # 2. score: one verifier call on gamma + 1 positions
    scored = torch.stack([state.pending, *drafts], 1)                        # [B, gamma + 1]: pending, drafts
    drafts = scored[:, 1:]                                                   # [B, gamma]
    if late:   # call gamma (q_{t+gamma}, nothing drawn) on a side stream, while the verifier scores
        with beside(scored.device):
            logits, _ = call(gamma, token, own)
            q_logits.append(logits)
            q_probs.append(sample(logits, None, cfg, False)[0])
    if feed is None:
        p_logits, states = verifier.extend(scored), None                     # [B, gamma + 1, V]
    else:
        p_logits, states = verifier.extend_hidden(scored)                    # and its states  # [B, gamma + 1, H]
    if late:
        join(scored.device)
    # 3.-4. verify, advance, emit (the draws of Algorithm 4 first)
    u = torch.rand((drafts.shape[0], gamma), generator=generator, dtype=torch.float32, device=drafts.device)
    noise = exponential_noise(p_logits[:, 0].shape, p_logits, generator, cfg.greedy)
    finish(drafter, verifier, state, req, alpha, active, q_logits, q_probs, drafts, p_logits, u, noise, states)


def extend_carried(drafter: Backend, state: DecodeState, pending: torch.Tensor) -> torch.Tensor:
    """A block's first drafter call where the last block may not have fed its last draft (all its
    drafts accepted, ``state.carried``): [that draft, pending] for those rows, [pending] for the
    others, as one ragged feed; returns each row's logits after its pending token.  # [B, V]"""
    lengths = 1 + state.carried.long()                                       # [B]
    feed = torch.stack([torch.where(state.carried, state.carry, pending), pending], 1)   # [B, 2]
    logits = drafter.extend(feed, lengths)                                   # [B, 2, V]
    return logits.gather(1, (lengths - 1).view(-1, 1, 1).expand(-1, 1, logits.shape[-1])).squeeze(1)


def draft_token(logits: torch.Tensor, noise: torch.Tensor | None, cfg: SamplingConfig, draw: bool = True):
    """The drafter's sampling distribution at one position and, with ``draw``, its draw: the exponential
    race with Exp(1) ``noise``, or at T = 0 the argmax (the one-hot's only token, which any race draws;
    one reduction a draft instead of two, and no noise)."""
    probs = sampling_probs(logits, cfg)
    if not draw:
        return probs, None
    return probs, (wide_argmax(logits.float()) if cfg.greedy else draw_with(probs, noise))


def finish_block(drafter: Backend, verifier: Backend, state: DecodeState, req: DecodeRequest, alpha,
                 active: torch.Tensor, q_logits: list, q_probs: list, drafts: torch.Tensor,
                 p_logits: torch.Tensor, u: torch.Tensor, noise: torch.Tensor,
                 verifier_states: torch.Tensor | None = None) -> None:
    """Steps 3 and 4 of a block: pi = T(q, p), Algorithm 4's accept / recover / bonus with the
    given draws (``u  # [B, gamma]``, ``noise  # [B, V]``), both caches committed, the tokens
    emitted, the counters and the host's flags updated."""
    gamma, spec = req.gamma, req.spec
    q_logits = torch.stack(q_logits, 1)                                      # [B, gamma + 1, V]
    d = make_dists(q_logits, p_logits, req.sampling, draft_probs=torch.stack(q_probs, 1))
    target = spec.fn(d, alpha)
    bonus = d.target_probs[:, gamma] if spec.bonus_from_verifier else target.pi[:, gamma]
    res = verify_block(drafts, d.draft_probs[:, :gamma], target.pi[:, :gamma], bonus, None, u=u, noise=noise)
    n_acc = res.n_accepted                                                   # [B]
    if state.feed is not None:   # keep the first call's feed (true features); re-feed the rest next block
        drafter.commit(state.feed.lengths)
        state.feed.advance(drafts, n_acc, res.new_token, verifier_states)
    elif spec.bonus_from_verifier:   # the drafter fed [carried draft,] pending and drafts 0 .. gamma-2
        all_in = n_acc == gamma
        drafter.commit(state.carried.long() + torch.where(all_in, gamma, n_acc + 1))
        state.carry.copy_(drafts[:, -1])
        state.carried.copy_(all_in)
    else:
        drafter.commit(n_acc + 1)
    verifier.commit(n_acc + 1)
    state.pending.copy_(res.new_token)
    kept = state.emitter.emit(res.tokens, n_acc + 1)                         # [B]
    # counters: a draft is examined up to and including the first rejection
    examined = torch.arange(gamma, device=n_acc.device).unsqueeze(0) < torch.clamp(n_acc + 1, max=gamma).unsqueeze(1)
    defer = target.defer[:, :gamma].expand(-1, -1, target.pi.shape[-1]) if target.defer.shape[-1] == 1 \
        else target.defer[:, :gamma]
    deferred = defer.gather(-1, drafts.unsqueeze(-1)).squeeze(-1) & examined                # [B, gamma]
    state.counters.add(active, {"blocks": active, "drafted": active * gamma, "accepted": n_acc,
                                "rejected": n_acc < gamma, "bonus": n_acc == gamma, "deferred": deferred.sum(1),
                                "emitted": kept, "truncated": n_acc + 1 - kept}, n_acc)
    # near the end: the drafter gave EOS at least NEAR_END_EOS_PROB at some position of this block
    # (it sees the end coming: the next block likely emits it), or the next block may reach
    # max_new_tokens
    e = state.emitter
    near = state.near_limit(gamma + 1)
    if e.eos.numel():
        near = near | (d.draft_conf[..., e.eos].sum(-1) >= NEAR_END_EOS_PROB).any(1)
    state.end_step(active, [check_finite(q_logits, active), check_finite(p_logits, active)], near)


#: the drafter's probability of EOS (untempered; summed over the EOS ids) at some position of a block
#: above which the host waits for the next block's flags before queuing another (the end is near).
#: A wait costs the device one idle gap (a graph launch); a block run past the end costs a block.
NEAR_END_EOS_PROB = 0.05

_COMPILED: dict = {}


def _compiled(fn):
    """``fn`` under torch.compile (inductor, no CUDA graphs of its own: the caller captures),
    made once per function; each method / sampling setting is one specialisation of it."""
    if fn not in _COMPILED:
        from .models.static import _raise_recompile_limit

        _raise_recompile_limit(256)
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def speculative_decode(drafter: Backend, verifier: Backend, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       req: DecodeRequest, generator: torch.Generator | None, stats: Stats,
                       progress=None, streamer=None) -> list[list[int]]:
    """Algorithm 4 (GenSpecSample) repeated until every row is done, with target T = ``req.spec.fn``.

    Blocks run eagerly, or, where both backends can be captured on a GPU (:func:`.runner.can_capture`),
    as replays of one CUDA graph of ``runner.BLOCKS_PER_REPLAY`` blocks. ``streamer``: a
    :class:`speccascade.streaming.BlockHook`, called after each block and given the per-row
    counters at the end. ``req.alpha``: a float, or a per-row tensor ``[B]``."""
    device = drafter.device
    B = input_ids.shape[0]
    captured, per_replay = None, runner.BLOCKS_PER_REPLAY
    features = check_feature_pair(drafter, verifier)
    capturable = runner.can_capture(drafter, verifier)
    if capturable:
        key = ("speculative", B, per_replay, req.key(), id(drafter), drafter.generation, verifier.generation,
               BONUS_DRAFT_BESIDE)
        captured = runner.graph_cache(verifier).get(key)
    state = captured.state if captured else DecodeState(B, req, req.gamma + 1, req.gamma, device)
    if features and state.feed is None:   # (a captured program's state has its feed already)
        state.with_features(req.gamma, drafter.feature_size)

    def start() -> None:
        if features:
            ids, before = prefill_with_states(drafter, verifier, input_ids, attention_mask)
        else:
            ids = prefill_both(drafter, verifier, input_ids, attention_mask)
        state.start(first_pending(verifier, ids), req.alpha)
        if features:
            state.feed.start(state.pending, before)

    start()
    stats.prefill_calls += prefill_calls(drafter, input_ids) + prefill_calls(verifier, input_ids)
    if capturable:
        alpha = state.alpha if req.spec.alpha is not None else None
        compiled = bool(getattr(verifier, "compiled", False))  # the math too, where the models are compiled

        def step(gen):
            speculative_block(drafter, verifier, state, req, alpha, gen, compiled=compiled)

        if captured is None:
            captured = runner.graph_cache(verifier)[key] = runner.capture(step, state, device, per_replay, start)
        sync = StepSync(device, stats, ["drafter", "verifier"], progress, cumulative=True)
        run_steps(step, state, sync, generator, captured, after=streamer)
    else:
        sync = StepSync(device, stats, ["drafter", "verifier"], progress, generator, cumulative=True)
        run_steps(lambda gen: speculative_block(drafter, verifier, state, req, req.alpha, gen),
                  state, sync, generator, after=streamer)
    state.counters.add_to(stats, req.spec.drafter_calls_per_block(req.gamma), 1)
    if streamer is not None:
        streamer.totals(state.counters.rows, state.counters.positions)
    return state.emitter.tokens()


def row_counts(active: torch.Tensor, columns: list[torch.Tensor]) -> torch.Tensor:
    """Each per-row column  # [B] each (bool or long)  summed over the rows active at the block's
    start: one stack and one masked sum, whatever the number of counters.  # [len(columns)]"""
    return (torch.stack(columns, 1) * active.unsqueeze(1)).sum(0)


def add_block_counters(stats: Stats, c: list[int], hist: list[int]) -> None:
    """Add the device counters of a block loop (order: blocks, drafted, accepted, rejected, bonus,
    deferred, emitted, truncated; rejected drafts are all recovered) to ``stats``."""
    blocks, drafted, accepted, rejected, bonus, deferred, emitted, truncated = c
    stats.add(Stats(blocks=blocks, drafted=drafted, accepted=accepted, rejected=rejected, recovered=rejected,
                    bonus=bonus, deferred=deferred, emitted=emitted, truncated=truncated,
                    accepted_per_position=list(hist)))
