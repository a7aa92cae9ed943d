"""The one speculative loop: draft, score, verify, advance (Algorithm 4 with any rule).

Lossless SD, lossy SD, BiLD* and every speculative cascade run through ``speculative_decode``;
they differ only in the rule that builds pi (:mod:`.rules`). Rows of a batch advance
independently: each accepts its own number of drafts per block.

Per block (PAPER.md section 3.2):
1. Draft: gamma + 1 drafter calls of one token per row. Calls 0 .. gamma-1 give q_t .. q_{t+gamma-1}
   and the drafts x_t .. x_{t+gamma-1}; call gamma feeds the last draft and gives q_{t+gamma}, which
   the bonus token's pi_{t+gamma} = T(q_{t+gamma}, p_{t+gamma}) needs. When all drafts are accepted
   that call is the one the next block needs anyway (its result stays in the cache); on a rejection
   it is rolled back with the rest.
2. Score: one verifier call on [pending, x_t .. x_{t+gamma-1}] gives p_t .. p_{t+gamma}.
3. Verify: pi_{t+j} = T(q_{t+j}, p_{t+j}); accept / recover / bonus (:func:`.verify.verify_block`).
4. Advance: both caches keep the pending token and the accepted drafts; the new token becomes the
   pending one. Output is truncated at EOS and at ``max_new_tokens`` even when a block overshoots.

The host learns whether every row is done (and whether a logit was non-finite) once per block,
never per token, through :class:`StepSync`: on a GPU it reads each block's flags one block late,
so it queues block i + 1 while the device still runs block i, and one block is computed past the
end and discarded (not counted in the stats). ``HFBackend.commit`` adds one sync per model and
block (to crop its dynamic cache); ``StaticHFBackend`` adds none.
"""

from __future__ import annotations

import torch

from .errors import NonFiniteLogitsError
from .models.base import Backend
from .registry import MethodSpec
from .rules import Dists
from .sampling import SamplingConfig, confidence_probs, draw, sampling_probs
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


def start_both(drafter: Backend, verifier: Backend, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               stats: Stats, max_new_tokens: int, eos_token_id, width: int) -> tuple[torch.Tensor, Emitter]:
    """Pre-fill both models; returns each row's pending token  # [B]  and an output collector."""
    drafter.reset(input_ids, attention_mask)
    verifier.reset(input_ids, attention_mask)
    stats.prefill_calls += 2 if input_ids.shape[1] > 1 else 0
    pending = input_ids[:, -1].to(drafter.device)
    return pending, Emitter(input_ids.shape[0], max_new_tokens, width, eos_token_id, drafter.device)


def check_finite(logits: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """A device flag: some active row has a non-finite logit.  # logits [B, ..., V]; active [B]"""
    bad = ~torch.isfinite(logits).flatten(1).all(1)
    return (bad & active).any()


def raise_if_nonfinite(flags: list[bool], names: list[str]) -> None:
    for flag, name in zip(flags, names):
        if flag:
            raise NonFiniteLogitsError(f"the {name} returned non-finite (NaN or inf) logits; "
                                       f"check its weights and dtype (fp16 overflow?)")


class StepSync:
    """The end of a decoding step: the one point where the host reads device state.

    ``end_step`` copies [all rows done, a non-finite flag per model, tokens kept] to the host. On a
    CPU it reads them at once. On a GPU the copy is asynchronous and the host reads the flags of
    the *previous* step, so the device always has the next step queued and never waits for the
    host; when those flags say "done", the step queued after them is wasted work: its output is
    already ignored (every row is done), its model calls are taken back out of the stats and the
    random generator is put back to where that step found it, so results do not depend on the lag.
    """

    #: read flags one step late: None = on a GPU only (tests force it on the CPU)
    lagged: bool | None = None

    def __init__(self, device: torch.device, stats: Stats, names: list[str], progress=None,
                 generator: torch.Generator | None = None):
        self.generator = generator
        self.cuda = device.type == "cuda"
        self.lag = self.cuda if self.lagged is None else self.lagged
        self.stats, self.names, self.progress = stats, names, progress
        self.pending = None
        self._host: list[torch.Tensor] = []   # two pinned buffers and events, used in turn
        self._events: list = []
        self._turn = 0

    def end_step(self, done: torch.Tensor, finite_flags: list[torch.Tensor], kept: torch.Tensor) -> bool:
        """True when every row is done (as of the last step whose flags the host has read)."""
        flags = torch.stack([done.all().long(), *(f.long() for f in finite_flags), kept.sum()])
        calls = (self.stats.drafter_calls, self.stats.verifier_calls)
        if not self.lag:
            return self._read(flags.tolist(), calls)
        host, event = flags, None
        if self.cuda:
            if not self._host:
                self._host = [torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True) for _ in range(2)]
                self._events = [torch.cuda.Event() for _ in range(2)]
            # buffer `turn` was last written two steps ago and has been read since
            host, event = self._host[self._turn], self._events[self._turn]
            host.copy_(flags, non_blocking=True)
            event.record()
            self._turn ^= 1
        if self.generator is not None:
            calls = calls + (self.generator.get_state(),)
        previous, self.pending = self.pending, (host, event, calls)
        if previous is None:
            return False
        if previous[1] is not None:
            previous[1].synchronize()
        return self._read(previous[0].tolist(), previous[2])

    def _read(self, values: list[int], calls: tuple[int, int]) -> bool:
        raise_if_nonfinite(values[1:-1], self.names)
        if self.progress is not None:
            self.progress.update(values[-1])
        if values[0]:
            self.stats.drafter_calls, self.stats.verifier_calls = calls[:2]  # drop a step run past the end
            if len(calls) > 2:
                self.generator.set_state(calls[2])
            return True
        return False


def speculative_decode(drafter: Backend, verifier: Backend, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       spec: MethodSpec, alpha: float | None, gamma: int, cfg: SamplingConfig,
                       max_new_tokens: int, eos_token_id, generator: torch.Generator | None,
                       stats: Stats, progress=None, streamer=None) -> list[list[int]]:
    """Algorithm 4 (GenSpecSample) repeated until every row is done, with target T = ``spec.fn``.
    ``streamer``: a :class:`speccascade.streaming.BlockHook`, called once per block."""
    device = drafter.device
    pending, emitter = start_both(drafter, verifier, input_ids, attention_mask, stats, max_new_tokens,
                                  eos_token_id, gamma + 1)
    positions = torch.arange(gamma, device=device)
    sync = StepSync(device, stats, ["drafter", "verifier"], progress, generator)
    counters = torch.zeros(8, dtype=torch.long, device=device)
    per_position = torch.zeros(gamma, dtype=torch.long, device=device)
    drafted = torch.full((input_ids.shape[0],), gamma, dtype=torch.long, device=device)   # [B]

    while True:
        active = ~emitter.done                                               # [B]
        # 1. draft: gamma + 1 drafter calls
        token, q_logits, q_probs, drafts = pending, [], [], []
        for j in range(gamma + 1):
            logits = drafter.extend(token.unsqueeze(1))[:, -1]               # [B, V]
            q_logits.append(logits)
            q_probs.append(sampling_probs(logits, cfg))
            if j < gamma:
                token = draw(q_probs[-1], generator)                         # [B]
                drafts.append(token)
        q_logits = torch.stack(q_logits, 1)                                  # [B, gamma + 1, V]
        drafts = torch.stack(drafts, 1)                                      # [B, gamma]
        # 2. score: one verifier call on gamma + 1 positions
        p_logits = verifier.extend(torch.cat([pending.unsqueeze(1), drafts], 1))  # [B, gamma + 1, V]
        # 3. verify against pi = T(q, p)
        d = make_dists(q_logits, p_logits, cfg, draft_probs=torch.stack(q_probs, 1))
        target = spec.fn(d, alpha)
        bonus = d.target_probs[:, gamma] if spec.bonus_from_verifier else target.pi[:, gamma]
        res = verify_block(drafts, d.draft_probs[:, :gamma], target.pi[:, :gamma], bonus, generator)
        # 4. advance both caches and emit
        drafter.commit(res.n_accepted + 1)
        verifier.commit(res.n_accepted + 1)
        pending = res.new_token
        kept = emitter.emit(res.tokens, res.n_accepted + 1)

        n_acc = res.n_accepted
        examined = positions.unsqueeze(0) < torch.clamp(n_acc + 1, max=gamma).unsqueeze(1)   # [B, gamma]
        defer = target.defer[:, :gamma].expand(-1, -1, target.pi.shape[-1]) if target.defer.shape[-1] == 1 \
            else target.defer[:, :gamma]
        deferred = defer.gather(-1, drafts.unsqueeze(-1)).squeeze(-1) & examined            # [B, gamma]
        columns = [active, drafted, n_acc, n_acc < gamma, n_acc == gamma, deferred.sum(1), kept, n_acc + 1 - kept]
        counters += row_counts(active, columns)
        per_position += ((positions.unsqueeze(0) < n_acc.unsqueeze(1)) & active.unsqueeze(1)).sum(0)
        stats.drafter_calls += gamma + 1
        stats.verifier_calls += 1
        if streamer is not None:  # streaming hook (speccascade.streaming): new tokens, per-row counters
            streamer(emitter, active, columns, positions.unsqueeze(0) < n_acc.unsqueeze(1))

        if sync.end_step(emitter.done, [check_finite(q_logits, active), check_finite(p_logits, active)], kept):
            break

    add_block_counters(stats, counters.tolist(), per_position.tolist())
    return emitter.tokens()


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
