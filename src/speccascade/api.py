"""``generate``: the library's one entry point. Validates input, then runs a method of METHODS."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from . import baselines  # noqa: F401  (registers the sequential methods)
from . import rules  # noqa: F401  (registers the speculative methods)
from .errors import SpecCascadeError
from .loop import speculative_decode
from .models.base import Backend, as_backend
from .registry import get_method
from .sampling import SamplingConfig
from .stats import Stats
from .streaming import BlockHook


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # the new tokens of each row (EOS kept, nothing after it)
    stats: Stats
    method: str
    alpha: float | list[float] | None  # a list: one alpha per row


def as_batch(input_ids, attention_mask=None, pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids  # [B, L]`` and ``attention_mask  # [B, L]`` from a tensor (1-D or
    2-D) or a list of token lists."""
    if isinstance(input_ids, (list, tuple)):
        rows = [list(r) for r in input_ids] if input_ids and isinstance(input_ids[0], (list, tuple)) else [list(input_ids)]
        if not rows or any(len(r) == 0 for r in rows):
            raise SpecCascadeError("empty prompt: every row of input_ids needs at least one token")
        L = max(len(r) for r in rows)
        ids = torch.tensor([[pad_token_id] * (L - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        return ids, mask
    if not isinstance(input_ids, torch.Tensor):
        raise SpecCascadeError(f"input_ids must be a tensor or a list of token lists, got {type(input_ids).__name__}")
    ids = input_ids.unsqueeze(0) if input_ids.dim() == 1 else input_ids
    if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise SpecCascadeError(f"empty prompt: input_ids must have shape [batch, length >= 1], got {tuple(input_ids.shape)}")
    if ids.dtype not in (torch.long, torch.int, torch.int32, torch.int16):
        raise SpecCascadeError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
    if attention_mask is None:
        mask = torch.ones_like(ids)
    else:
        mask = attention_mask.unsqueeze(0) if attention_mask.dim() == 1 else attention_mask
        if mask.shape != ids.shape:
            raise SpecCascadeError(f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(ids.shape)}")
    mask = mask.long()
    if bool((mask.sum(1) == 0).any()):
        raise SpecCascadeError("empty prompt: a row of attention_mask has no tokens")
    if bool((mask[:, -1] == 0).any()) or bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise SpecCascadeError("prompts must be left-padded: each row's attention_mask must be 0...0 1...1")
    return ids.long(), mask


def _check_models(drafter: Backend, verifier: Backend, spec, ids, mask, max_new_tokens, gamma) -> None:
    if drafter.vocab_size != verifier.vocab_size:
        raise SpecCascadeError(
            f"the drafter and verifier vocabularies differ ({drafter.vocab_size} vs {verifier.vocab_size} logits); "
            "both models must share one tokenizer")
    vocab = min(drafter.vocab_size, verifier.vocab_size)
    if int(ids[mask.bool()].max()) >= vocab or int(ids[mask.bool()].min()) < 0:
        raise SpecCascadeError(f"input_ids hold a token id outside the vocabulary [0, {vocab})")
    longest = int(mask.sum(1).max())
    for model in (drafter, verifier):
        if model.max_positions and longest + max_new_tokens + gamma + 1 > model.max_positions:
            raise SpecCascadeError(
                f"prompt too long for the {model.name}: {longest} prompt tokens + max_new_tokens={max_new_tokens} "
                f"(+ {gamma + 1} for a draft block) exceed its context of {model.max_positions} positions")


def generate(drafter, verifier, input_ids, *, method: str = "opt", alpha: float | None = None, gamma: int = 5,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, max_new_tokens: int = 64,
             eos_token_id: int | list[int] | None = None, attention_mask: torch.Tensor | None = None,
             seed: int | None = 0, generator: torch.Generator | None = None, progress: bool = False,
             streamer=None, **method_options) -> GenerationOutput:
    """Decode ``max_new_tokens`` tokens after each prompt with the drafter and the verifier.

    ``drafter`` and ``verifier`` are Hugging Face causal LMs sharing one vocabulary (or
    :class:`speccascade.models.Backend` objects). ``method`` is a name in ``METHODS``; ``alpha`` its
    threshold (``None`` takes the method's default; ``sd``, ``verifier_only`` and ``drafter_only``
    take none). ``method_options`` are a method's extra options (``alpha_f`` and
    ``max_drafter_run`` for ``bild``, ``max_drafter_run`` for ``token_cascade``,
    ``length_normalized`` for ``seq_cascade``). Draws use ``generator`` if given, else a new one
    seeded with ``seed`` (``None``: nondeterministic).

    ``alpha`` may also be a list with one threshold per row (speculative methods; each is checked;
    equal values are one alpha). ``streamer``: an object with ``put(new_tokens)``, called with each
    row's new tokens (``list[list[int]]``) after every block (one host read per block), and
    ``end()``; see :mod:`speccascade.streaming` (methods without a per-block hook, ``seq_cascade``,
    put everything at the end).
    """
    spec = get_method(method)
    alpha, row_alpha = _split_alpha(spec, method, alpha)
    if spec.alpha is None:
        if alpha is not None:
            raise SpecCascadeError(f"method {method!r} takes no alpha (got alpha={alpha!r})")
    else:
        alpha = spec.alpha.default if alpha is None else spec.alpha.check(method, alpha)
    unknown = set(method_options) - set(spec.extra)
    if unknown:
        raise SpecCascadeError(f"method {method!r} has no option(s) {sorted(unknown)}; it takes {sorted(spec.extra) or 'none'}")
    for name, rng in spec.extra.items():
        if name in method_options and hasattr(rng, "check"):
            method_options[name] = rng.check(method, method_options[name], name)
        elif name == "max_drafter_run" and method_options.get(name) is not None and int(method_options[name]) < 1:
            raise SpecCascadeError(f"max_drafter_run must be >= 1 or None, got {method_options[name]!r}")
    if isinstance(gamma, bool) or int(gamma) != gamma or gamma < 1:
        raise SpecCascadeError(f"gamma (the draft block size) must be an integer >= 1, got {gamma!r}")
    gamma = int(gamma)
    if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise SpecCascadeError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    cfg = SamplingConfig(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
    d, v = as_backend(drafter, "drafter"), as_backend(verifier, "verifier")
    ids, mask = as_batch(input_ids, attention_mask)
    _check_models(d, v, spec, ids, mask, max_new_tokens, gamma)
    if generator is None:
        generator = torch.Generator(device=d.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(seed))
    ids, mask = ids.to(d.device), mask.to(d.device)
    alpha_arg = alpha if row_alpha is None else _row_alpha_tensor(row_alpha, ids.shape[0], d.device)
    hook = None if streamer is None else BlockHook(streamer, ids.shape[0])
    hooked = {} if hook is None else {"streamer": hook}

    stats = Stats()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_new_tokens * ids.shape[0], desc=method, unit="tok", leave=False)
    start = time.perf_counter()
    with torch.no_grad():
        if spec.kind == "speculative":
            tokens = speculative_decode(d, v, ids, mask, spec, alpha_arg, gamma, cfg, max_new_tokens, eos_token_id,
                                        generator, stats, bar, **hooked)
        else:
            tokens = spec.fn(d, v, ids, mask, alpha, cfg, max_new_tokens, eos_token_id, generator, stats, bar,
                             **method_options, **hooked)
    if d.device.type == "cuda":
        torch.cuda.synchronize(d.device)
    stats.wall_time_s = time.perf_counter() - start
    if bar is not None:
        bar.close()
    if hook is not None:
        hook.finish(tokens)
    return GenerationOutput(tokens=tokens, stats=stats, method=method, alpha=alpha if row_alpha is None else row_alpha)


def _split_alpha(spec, method: str, alpha):
    """``alpha`` as (one value, None), or, given per row (a list, tuple or 1-D tensor) with
    differing values, (the first, the checked list). Equal per-row values are one alpha."""
    if not isinstance(alpha, (list, tuple, torch.Tensor)):
        return alpha, None
    if isinstance(alpha, torch.Tensor) and alpha.dim() == 0:
        return float(alpha), None
    values = alpha.tolist() if isinstance(alpha, torch.Tensor) else list(alpha)
    if isinstance(alpha, torch.Tensor) and alpha.dim() != 1 or not values:
        raise SpecCascadeError(f"a per-row alpha must be a non-empty list of numbers, got {alpha!r}")
    if spec.alpha is None:
        raise SpecCascadeError(f"method {method!r} takes no alpha (got alpha={values!r})")
    values = [spec.alpha.check(method, a) for a in values]
    if all(a == values[0] for a in values):
        return values[0], None
    if spec.kind != "speculative":
        raise SpecCascadeError(f"one alpha per row needs a speculative method; {method!r} takes one alpha per call")
    return values[0], values


def _row_alpha_tensor(values: list[float], rows: int, device) -> torch.Tensor:
    if len(values) != rows:
        raise SpecCascadeError(f"alpha has {len(values)} values for {rows} rows of input_ids: give one per row")
    return torch.tensor(values, dtype=torch.float64, device=device)  # [B]
