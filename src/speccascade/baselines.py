"""Sequential methods: single-model decoding, token / sequence cascades, the oracle, original BiLD.

These do not run the speculative loop; they are short, follow the paper's definitions line by
line, and double as test oracles (``token_cascade`` with alpha = 0 is ``verifier_only``, with
alpha = 1 and no cap it is ``drafter_only``). Each draws one categorical sample per row and step
from the distribution it chose, so that, with the same seed, methods that choose the same
distribution produce the same tokens.
"""

from __future__ import annotations

import math

import torch

from . import runner
from .loop import (
    DecodeRequest,
    DecodeState,
    StepSync,
    _compiled,
    add_block_counters,
    check_finite,
    make_dists,
    row_counts,
    start_both,
)
from .models.base import Backend, first_pending, prefill_calls
from .registry import AlphaRange, register
from .rules import bild_discrepancy, diff
from .runner import run_steps
from .sampling import SamplingConfig, confidence_probs, draw, draw_with, exponential_noise, sampling_probs
from .stats import Stats

MAX_DRAFTER_RUN = 10  # App. E.1: "the small model predicts for a maximum of 10 tokens" (after Kim et al.)


def _ones(B, device):
    return torch.ones(B, dtype=torch.long, device=device)


def single_step(backend: Backend, state: DecodeState, cfg: SamplingConfig, generator, score=None,
                compiled: bool = False) -> None:
    """One token of auto-regressive sampling for every row, in place on ``state``; no host read
    (with ``compiled``, the arithmetic after the model call is torch.compile'd)."""
    active = ~state.emitter.done                                                   # [B]
    logits = backend.extend(state.pending.unsqueeze(1))[:, -1]                     # [B, V]
    noise = exponential_noise(logits.shape, logits, generator, cfg.greedy)
    (_compiled(finish_single) if compiled else finish_single)(backend, state, cfg, active, logits, noise, score)


def finish_single(backend: Backend, state: DecodeState, cfg: SamplingConfig, active, logits, noise, score) -> None:
    token = draw_with(sampling_probs(logits, cfg), noise)                          # [B]
    one = torch.ones_like(token)                                                   # [B] one token per row
    backend.commit(one)
    kept = state.emitter.emit(token.unsqueeze(1), one)
    if score is not None:
        logp = torch.log_softmax(logits.double(), -1).gather(-1, token.unsqueeze(1)).squeeze(1)
        score += torch.where(kept > 0, logp, torch.zeros_like(logp))
    state.pending.copy_(token)
    state.counters.calls += active.any().long()
    state.end_step(active, [check_finite(logits, active)], state.near_limit(1))   # (no look-ahead for EOS)


def single_model(backend: Backend, role: str, input_ids, attention_mask, cfg: SamplingConfig, max_new_tokens: int,
                 eos_token_id, generator, stats: Stats, progress=None, log_scores: bool = False, streamer=None):
    """Auto-regressive sampling from one model. Returns the tokens and, with ``log_scores``, each
    row's sum of untempered log-probabilities of its emitted tokens (for eq. 1). On a GPU with a
    capturable backend, ``runner.TOKENS_PER_REPLAY`` tokens are one replay of a captured CUDA graph."""
    device = backend.device
    B = input_ids.shape[0]
    per_replay = runner.TOKENS_PER_REPLAY
    req = (role, cfg, max_new_tokens, eos_token_id if not isinstance(eos_token_id, list) else tuple(eos_token_id))
    capturable = runner.can_capture(backend)
    key = ("single", B, per_replay, req, log_scores, backend.generation) if capturable else None
    captured = runner.graph_cache(backend).get(key) if capturable else None
    state = captured.state if captured else \
        DecodeState(B, DecodeRequest(None, None, 1, cfg, max_new_tokens, eos_token_id), 1, 0, device, models=1)
    if log_scores and captured is None:   # the scores live with the state (a captured program writes them)
        state.score = torch.zeros(B, dtype=torch.float64, device=device)
    score = state.score if log_scores else None

    def start() -> None:
        backend.reset(input_ids, attention_mask)
        state.start(first_pending(backend, input_ids), None)
        if score is not None:
            score.zero_()

    compiled = capturable and bool(getattr(backend, "compiled", False))

    def step(gen) -> None:
        single_step(backend, state, cfg, gen, score, compiled)

    start()
    stats.prefill_calls += prefill_calls(backend, input_ids)
    if capturable:
        if captured is None:
            captured = runner.graph_cache(backend)[key] = runner.capture(step, state, device, per_replay, start)
        run_steps(step, state, StepSync(device, stats, [role], progress, cumulative=True), generator, captured,
                  after=streamer)
    else:
        run_steps(step, state, StepSync(device, stats, [role], progress, generator, cumulative=True), generator,
                  after=streamer)
    calls = int(state.counters.calls)
    if role == "verifier":
        stats.verifier_calls += calls
    else:
        stats.drafter_calls += calls
    tokens = state.emitter.tokens()
    stats.emitted += sum(len(t) for t in tokens)
    if role == "verifier":
        stats.deferred += sum(len(t) for t in tokens)
    return (tokens, score.clone()) if log_scores else tokens   # (a captured program's buffer: copied)


@register("verifier_only", kind="sequential", title="Large model alone", paper="baseline")
def verifier_only(drafter, verifier, input_ids, attention_mask, alpha, cfg, max_new_tokens, eos_token_id,
                  generator, stats, progress=None, streamer=None, **_):
    return single_model(verifier, "verifier", input_ids, attention_mask, cfg, max_new_tokens, eos_token_id,
                        generator, stats, progress, streamer=streamer)


@register("drafter_only", kind="sequential", title="Small model alone", paper="baseline")
def drafter_only(drafter, verifier, input_ids, attention_mask, alpha, cfg, max_new_tokens, eos_token_id,
                 generator, stats, progress=None, streamer=None, **_):
    return single_model(drafter, "drafter", input_ids, attention_mask, cfg, max_new_tokens, eos_token_id,
                        generator, stats, progress, streamer=streamer)


# ---------------------------------------------------------------------------------------------


@register("token_cascade", kind="sequential", title="TokenCascade [Chow]", paper="Alg. 2, eq. (2)",
          alpha=AlphaRange(0.0, 1.0, default=0.5,
                           meaning="defer when max q < 1 - alpha: 0 = always (verifier), 1 = never (drafter)"),
          extra={"max_drafter_run": MAX_DRAFTER_RUN})
def token_cascade(drafter, verifier, input_ids, attention_mask, alpha, cfg, max_new_tokens, eos_token_id,
                  generator, stats, progress=None, max_drafter_run: int | None = MAX_DRAFTER_RUN, streamer=None, **_):
    """Algorithm 2 with Chow's rule (eq. 2). The verifier is called only on deferral, and then
    first catches up on the tokens it has not seen; after ``max_drafter_run`` drafter tokens in a
    row a deferral is forced (App. E.1; ``None`` switches the cap off).

    Host reads: one per token (``defer.any()``): the verifier is called only when some row defers,
    which is the method's cost model (Algorithm 2); calling it unconditionally would remove the
    read but cost a verifier call per token, so this loop is not captured as a graph. The
    deferral count stays on the device until the end."""
    device = drafter.device
    B = input_ids.shape[0]
    pending, emitter = start_both(drafter, verifier, input_ids, attention_mask, stats, max_new_tokens, eos_token_id, 1)
    lag = torch.zeros(B, max_new_tokens + 1, dtype=torch.long, device=device)  # tokens the verifier lacks
    lag[:, 0] = pending
    lag_len = _ones(B, device)
    deferred = torch.zeros((), dtype=torch.long, device=device)
    run = torch.zeros(B, dtype=torch.long, device=device)
    rows = torch.arange(B, device=device)
    one = _ones(B, device)
    sync = StepSync(device, stats, ["drafter", "verifier"], progress, generator)
    while True:
        active = ~emitter.done
        q_logits = drafter.extend(pending.unsqueeze(1))[:, -1]                     # [B, V]
        drafter.commit(one)
        stats.drafter_calls += 1
        probs = sampling_probs(q_logits, cfg)
        defer = confidence_probs(q_logits).max(-1).values < 1.0 - alpha
        if max_drafter_run is not None:
            defer |= run >= max_drafter_run
        defer &= active
        flags = [check_finite(q_logits, active)]
        if bool(defer.any()):
            lengths = torch.where(defer, lag_len, 0)
            width = int(lengths.max())
            p_logits = verifier.extend(lag[:, :width], lengths)                   # [B, width, V]
            verifier.commit(lengths)
            stats.verifier_calls += 1
            p_last = p_logits[rows, (lengths - 1).clamp_min(0)]                    # [B, V]
            probs = torch.where(defer.unsqueeze(1), sampling_probs(p_last, cfg), probs)
            flags.append(check_finite(p_last, defer))
        else:
            flags.append(torch.zeros((), dtype=torch.bool, device=device))
        token = draw(probs, generator, cfg.greedy)
        kept = emitter.emit(token.unsqueeze(1), one)
        deferred += (defer & (kept > 0)).sum()
        # the verifier now lacks only the new token (deferred rows) or one more token (others)
        lag[rows, torch.where(defer, 0, lag_len)] = token
        lag_len = torch.where(defer, 1, lag_len + 1)
        run = torch.where(defer, 0, run + 1)
        pending = token
        if streamer is not None:  # streaming hook (speccascade.streaming)
            streamer(emitter)
        if sync.end_step(emitter.done, flags, kept):
            break
    stats.deferred += int(deferred)
    tokens = emitter.tokens()
    stats.emitted += sum(len(t) for t in tokens)
    return tokens


@register("seq_cascade", kind="sequential", title="SeqCascade [Chow]", paper="eq. (1)",
          alpha=AlphaRange(0.0, 1.0, default=0.5,
                           meaning="defer the whole response when q(response) < 1 - alpha"),
          extra={"length_normalized": False})
def seq_cascade(drafter, verifier, input_ids, attention_mask, alpha, cfg, max_new_tokens, eos_token_id,
                generator, stats, progress=None, length_normalized: bool = False, **_):
    """Eq. (1): the drafter writes the whole response; it is regenerated by the verifier iff
    q(x_m .. x_{m+n} | x_<m) < 1 - alpha (the raw, untempered sequence probability). With
    ``length_normalized`` the per-token geometric mean exp(mean log q) is compared instead."""
    tokens, score = single_model(drafter, "drafter", input_ids, attention_mask, cfg, max_new_tokens,
                                 eos_token_id, generator, stats, progress, log_scores=True)
    if length_normalized:
        lengths = torch.tensor([max(len(t), 1) for t in tokens], dtype=torch.float64, device=score.device)
        score = score / lengths
    threshold = math.log(1.0 - alpha) if alpha < 1.0 else -math.inf
    defer = (score < threshold).tolist()
    rows = [b for b, d in enumerate(defer) if d]
    if rows:
        idx = torch.tensor(rows, device=input_ids.device)
        stats.emitted -= sum(len(tokens[b]) for b in rows)
        redo = single_model(verifier, "verifier", input_ids[idx], attention_mask[idx], cfg, max_new_tokens,
                            eos_token_id, generator, stats, None)
        stats.deferred -= sum(len(t) for t in redo)  # single_model counted tokens; count rows here
        for b, t in zip(rows, redo):
            tokens[b] = t
    stats.deferred += len(rows)
    return tokens


@register("oracle_diff", kind="sequential", title="Oracle [Diff]", paper="Alg. 3, eq. (5)",
          alpha=AlphaRange(-1.0, 1.0, default=0.0,
                           meaning="defer when max q < max p - alpha (both models run every step)"))
def oracle_diff(drafter, verifier, input_ids, attention_mask, alpha, cfg, max_new_tokens, eos_token_id,
                generator, stats, progress=None, streamer=None, **_):
    """Algorithm 3: both q_t and p_t are computed at every step; sample from p_t if Diff defers.
    No host read but the step's flags (one step late on a GPU)."""
    device = drafter.device
    B = input_ids.shape[0]
    pending, emitter = start_both(drafter, verifier, input_ids, attention_mask, stats, max_new_tokens, eos_token_id, 1)
    one = _ones(B, device)
    deferred = torch.zeros((), dtype=torch.long, device=device)
    sync = StepSync(device, stats, ["drafter", "verifier"], progress, generator)
    while True:
        active = ~emitter.done
        q_logits = drafter.extend(pending.unsqueeze(1))[:, -1]
        p_logits = verifier.extend(pending.unsqueeze(1))[:, -1]
        drafter.commit(one)
        verifier.commit(one)
        stats.drafter_calls += 1
        stats.verifier_calls += 1
        target = diff(make_dists(q_logits, p_logits, cfg), alpha)
        token = draw(target.pi, generator, cfg.greedy)
        kept = emitter.emit(token.unsqueeze(1), one)
        deferred += (target.defer.squeeze(-1) & (kept > 0)).sum()
        pending = token
        if streamer is not None:  # streaming hook (speccascade.streaming)
            streamer(emitter)
        if sync.end_step(emitter.done, [check_finite(q_logits, active), check_finite(p_logits, active)], kept):
            break
    stats.deferred += int(deferred)
    tokens = emitter.tokens()
    stats.emitted += sum(len(t) for t in tokens)
    return tokens


@register("bild", kind="sequential", title="BiLD (original)", paper="Kim et al. 2023; arXiv 2405.19261 App. E.5",
          alpha=AlphaRange(0.0, math.inf, default=2.0,
                           meaning="rollback threshold: roll back at the first draft with D(q,p) > alpha"),
          extra={"alpha_f": AlphaRange(0.0, 1.0, default=0.5,
                                       meaning="fallback threshold: stop drafting when max q < 1 - alpha_f"),
                 "max_drafter_run": MAX_DRAFTER_RUN})
def bild(drafter, verifier, input_ids, attention_mask, alpha, cfg, max_new_tokens, eos_token_id, generator,
         stats, progress=None, alpha_f: float = 0.5, max_drafter_run: int | None = MAX_DRAFTER_RUN, streamer=None,
         **_):
    """Original BiLD. *Fallback*: the drafter drafts until max q < 1 - alpha_f or
    ``max_drafter_run`` drafts. *Rollback*: one verifier call scores the drafts; the first draft
    with D(q, p) > alpha is replaced by a draw from p and the rest dropped (deterministic, no
    coin); if none, the token after the drafts is drawn from p.

    Host reads: one per drafted token (``drafting.any()``, the fallback window's data-dependent
    length) and one per window (its longest draft): the window cannot be a fixed-shape graph."""
    device = drafter.device
    B = input_ids.shape[0]
    window = max_drafter_run if max_drafter_run is not None else max_new_tokens
    pending, emitter = start_both(drafter, verifier, input_ids, attention_mask, stats, max_new_tokens,
                                  eos_token_id, window + 1)
    counters = torch.zeros(8, dtype=torch.long, device=device)
    per_position = torch.zeros(window, dtype=torch.long, device=device)
    sync = StepSync(device, stats, ["drafter", "verifier"], progress, generator)
    while True:
        active = ~emitter.done
        # fallback phase: draft while confident, at most `window` drafts
        token, drafting = pending, active.clone()
        n_draft = torch.zeros(B, dtype=torch.long, device=device)
        q_logits, drafts = [], []
        for j in range(window + 1):
            logits = drafter.extend(token.unsqueeze(1))[:, -1]
            stats.drafter_calls += 1
            q_logits.append(logits)
            if j == window:
                break
            go = drafting & (confidence_probs(logits).max(-1).values >= 1.0 - alpha_f)
            new = draw(sampling_probs(logits, cfg), generator, cfg.greedy)
            token = torch.where(go, new, token)
            drafts.append(token)
            n_draft += go.long()
            drafting = go
            if not bool(drafting.any()):
                break
        K = int(n_draft.max())
        q_logits = torch.stack(q_logits, 1)[:, :K + 1]                          # [B, K + 1, V]
        drafts = torch.stack(drafts, 1)[:, :K] if K else pending.new_zeros(B, 0)  # [B, K]
        # rollback phase: one verifier call
        p_logits = verifier.extend(torch.cat([pending.unsqueeze(1), drafts], 1), n_draft + 1)
        stats.verifier_calls += 1
        d = make_dists(q_logits, p_logits, cfg)
        pos = torch.arange(K + 1, device=device).unsqueeze(0)
        too_far = (bild_discrepancy(d) > alpha) | (pos >= n_draft.unsqueeze(1))  # [B, K + 1]
        n_acc = too_far.long().argmax(1)                                          # first such position
        new = draw(d.target_probs[torch.arange(B, device=device), n_acc], generator, cfg.greedy)
        tokens = torch.where(pos < n_acc.unsqueeze(1), torch.nn.functional.pad(drafts, (0, 1)),
                             torch.where(pos == n_acc.unsqueeze(1), new.unsqueeze(1), 0))
        drafter.commit(n_acc + 1)
        verifier.commit(n_acc + 1)
        pending = new
        kept = emitter.emit(tokens, n_acc + 1)
        rejected = n_acc < n_draft  # a rejected draft is deferred to the verifier
        counters += row_counts(active, [active, n_draft, n_acc, rejected, n_acc == n_draft, rejected, kept,
                                        n_acc + 1 - kept])
        per_position[:K] += ((pos[:, :K] < n_acc.unsqueeze(1)) & active.unsqueeze(1)).sum(0)
        if streamer is not None:  # streaming hook (speccascade.streaming)
            streamer(emitter)
        if sync.end_step(emitter.done, [check_finite(q_logits, active), check_finite(p_logits, active)], kept):
            break
    add_block_counters(stats, counters.tolist(), per_position.tolist())
    return emitter.tokens()
