"""``generate``: the library's one entry point. Validates input, then runs a method of METHODS.

Defaults are defined once, in :data:`DEFAULTS`, and shared by the command line. Every bad argument
is a :class:`SpecCascadeError` naming the argument, the value and what is expected; nothing is
silently converted (``top_k=2.5``, ``max_new_tokens="64"``, ``length_normalized="yes"`` are errors).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch

from . import baselines, rules  # noqa: F401  (register the sequential and the speculative methods)
from .checks import as_bool, as_int
from .errors import DeviceError, SpecCascadeError
from .loop import DecodeRequest, speculative_decode
from .models.base import Backend, as_backend, reserve_request
from .registry import METHODS, get_method
from .sampling import SamplingConfig
from .stats import Stats
from .streaming import BlockHook


@dataclass(frozen=True)
class Defaults:
    """The defaults of :func:`generate` and of ``speccascade generate`` (one definition for both).

    ``temperature=0`` (greedy) as in ``transformers``' ``generate``; ``alpha=None`` takes the
    method's own default (``speccascade methods``); the EOS token is the verifier's own
    (``generation_config.eos_token_id``, else ``config.eos_token_id``; the CLI takes its
    tokenizer's), see :func:`resolve_eos_token_id`.
    """

    method: str = "token_v3"
    alpha: float | None = None
    gamma: int = 5
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0


DEFAULTS = Defaults()


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # the new tokens of each row (EOS kept, nothing after it)
    stats: Stats
    method: str
    alpha: float | list[float] | None  # a list: one alpha per row
    eos_token_id: list[int] = field(default_factory=list)  # the EOS ids that stopped rows ([]: none)


def _token_row(row, i: int) -> list[int]:
    """One prompt row (a list / tuple of ints or a 1-D integer tensor) -> a list of ints."""
    if isinstance(row, torch.Tensor):
        if row.dim() != 1:
            raise SpecCascadeError(f"row {i} of input_ids is a {row.dim()}-D tensor; a list of prompts holds 1-D "
                                   f"token tensors or token lists (or pass one 2-D left-padded tensor)")
        if row.dtype.is_floating_point or row.dtype == torch.bool or row.dtype.is_complex:
            raise SpecCascadeError(f"row {i} of input_ids must hold integer token ids, got dtype {row.dtype}")
        return row.tolist()
    if hasattr(row, "tolist") and getattr(row, "ndim", None) == 1:  # a numpy array
        row = row.tolist()
    if not isinstance(row, (list, tuple)):
        raise SpecCascadeError(f"row {i} of input_ids must be a list of token ids or a 1-D tensor, "
                               f"got {type(row).__name__}")
    out = []
    for t in row:
        if isinstance(t, bool) or not isinstance(t, int):
            if hasattr(t, "item") and getattr(t, "ndim", 1) == 0 and not isinstance(t.item(), (bool, float)):
                t = t.item()
            else:
                raise SpecCascadeError(f"row {i} of input_ids holds {t!r} ({type(t).__name__}); token ids are "
                                       f"integers (did you pass text? encode it with the tokenizer first)")
        out.append(int(t))
    return out


def _as_long(name: str, x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x
    else:
        try:
            t = torch.tensor(x)
        except (TypeError, ValueError, RuntimeError):
            raise SpecCascadeError(f"{name} must be a tensor or a rectangular list of lists of integers") from None
    if t.dtype.is_floating_point or t.dtype.is_complex:
        raise SpecCascadeError(f"{name} must hold integers, got dtype {t.dtype}")
    return t


def as_batch(input_ids, attention_mask=None, pad_token_id: int = 0,
             encoder: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids  # [B, L]`` and ``attention_mask  # [B, L]`` from

    * a list of token lists / 1-D tensors (one prompt each, of any lengths; left-padded here), or a
      single token list;
    * a 1-D or 2-D integer tensor, with an optional ``attention_mask`` (0 = padding, on the left);
    * a rectangular list of lists *with* an ``attention_mask`` (a padded batch as a tokenizer
      returns it without ``return_tensors``): used as the tensor case;
    * a ``transformers`` ``BatchEncoding`` / dict with ``input_ids`` (and ``attention_mask``).

    ``encoder``: the rows are an encoder-decoder's encoder inputs; errors say so, and a padded
    tensor may also be right-padded (each row's mask 0...0 1...1 0...0).
    """
    what = "encoder input" if encoder else "prompt"
    if isinstance(input_ids, Mapping):
        if "input_ids" not in input_ids:
            raise SpecCascadeError(f"input_ids is a mapping without an 'input_ids' entry (keys: {sorted(input_ids)})")
        if attention_mask is None:
            attention_mask = input_ids.get("attention_mask")
        input_ids = input_ids["input_ids"]
    if isinstance(input_ids, (list, tuple)):
        if len(input_ids) == 0:
            raise SpecCascadeError(f"empty {what}: input_ids is an empty list; give at least one token")
        first = input_ids[0]
        single = isinstance(first, int) or (getattr(first, "ndim", None) == 0 and hasattr(first, "item"))
        rows = [_token_row(input_ids, 0)] if single else [_token_row(r, i) for i, r in enumerate(input_ids)]
        if any(len(r) == 0 for r in rows):
            raise SpecCascadeError(f"empty {what}: every row of input_ids needs at least one token")
        if attention_mask is not None:
            if len({len(r) for r in rows}) != 1:
                raise SpecCascadeError(
                    "attention_mask was given with prompt rows of different lengths "
                    f"({sorted({len(r) for r in rows})}); "
                    "give either a padded batch (equal-length rows) with its attention_mask, or unpadded token "
                    "lists without one (they are left-padded for you)")
            input_ids = torch.tensor(rows, dtype=torch.long)
        else:
            L = max(len(r) for r in rows)
            ids = torch.tensor([[pad_token_id] * (L - len(r)) + r for r in rows], dtype=torch.long)
            mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
            return ids, mask
    if not isinstance(input_ids, torch.Tensor):
        raise SpecCascadeError(f"input_ids must be a tensor or a list of token lists, got {type(input_ids).__name__}"
                               + (" (text? encode it with the tokenizer first)" if isinstance(input_ids, str) else ""))
    if input_ids.dim() not in (1, 2):
        raise SpecCascadeError(f"input_ids must be 1-D or 2-D [batch, length], got shape {tuple(input_ids.shape)}")
    ids = input_ids.unsqueeze(0) if input_ids.dim() == 1 else input_ids
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise SpecCascadeError(
            f"empty {what}: input_ids must have shape [batch, length >= 1], got {tuple(input_ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise SpecCascadeError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
    if attention_mask is None:
        mask = torch.ones_like(ids)
    else:
        mask = _as_long("attention_mask", attention_mask)
        mask = mask.unsqueeze(0) if mask.dim() == 1 else mask
        if mask.shape != ids.shape:
            raise SpecCascadeError(
                f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(ids.shape)}")
        mask = mask.to(ids.device)
        if bool(((mask != 0) & (mask != 1)).any()):
            raise SpecCascadeError("attention_mask must hold only 0 (padding) and 1 (a token)")
    mask = mask.long()
    if bool((mask.sum(1) == 0).any()):
        raise SpecCascadeError(f"empty {what}: a row of attention_mask has no tokens")
    if encoder:
        runs = (mask[:, 1:] > mask[:, :-1]).long().sum(1) + mask[:, 0]   # runs of 1s per row
        if bool((runs != 1).any()):
            raise SpecCascadeError("encoder inputs must be left- or right-padded: each row's attention_mask must be "
                                   "one run of 1s (0...0 1...1 0...0)")
        return ids.long(), mask
    if bool((mask[:, -1] == 0).any()) or bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise SpecCascadeError("prompts must be left-padded: each row's attention_mask must be 0...0 1...1 "
                               "(with a tokenizer: tokenizer.padding_side = 'left')")
    return ids.long(), mask


def _model_of(model):
    """The ``transformers`` model behind ``model``: itself, or the model a backend (or a backend
    wrapping a backend, e.g. ``TimedBackend.inner``) holds; None for a backend without one."""
    for _ in range(4):
        if model is None or isinstance(model, torch.nn.Module):
            return model
        model = getattr(model, "model", None) or getattr(model, "inner", None)
    return None


def model_eos_token_id(model) -> list[int]:
    """The model's own EOS ids: ``generation_config.eos_token_id``, else ``config.eos_token_id``
    (``model`` a ``transformers`` model or a backend wrapping one); [] if it declares none."""
    m = _model_of(model)
    declared = getattr(model, "eos_token_id", None)  # a backend without a transformers model may declare it
    if m is None and declared is not None:
        return [int(declared)] if isinstance(declared, int) else [int(e) for e in declared]
    for source in (getattr(m, "generation_config", None), getattr(m, "config", None)):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is not None:
            return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]
    return []


def resolve_eos_token_id(eos_token_id, verifier, vocab: int) -> list[int]:
    """``eos_token_id`` -> the checked list of EOS ids. ``None`` (the default, as in
    ``transformers``): the verifier's own; an int or a list of ints: those; ``[]``: no EOS (every
    row runs to ``max_new_tokens``)."""
    source = "eos_token_id"
    if eos_token_id is None:
        ids, source = model_eos_token_id(verifier), "the verifier's config eos_token_id"
    elif isinstance(eos_token_id, torch.Tensor):
        if eos_token_id.dim() > 1:
            raise SpecCascadeError(f"eos_token_id must be an int or a list of ints, got a tensor of shape "
                                   f"{tuple(eos_token_id.shape)}")
        ids = eos_token_id.reshape(-1).tolist()
    elif isinstance(eos_token_id, (list, tuple, set, frozenset)):
        ids = list(eos_token_id)
    else:
        ids = [eos_token_id]
    out = []
    for e in ids:
        if isinstance(e, bool) or not isinstance(e, int):
            if isinstance(e, float) and e.is_integer():
                e = int(e)
            else:
                raise SpecCascadeError(
                    f"eos_token_id must be a token id (an int), a list of ids, [] for no EOS or None for the model's "
                    f"own; got {e!r}" + (" (a token string? use tokenizer.convert_tokens_to_ids)"
                                          if isinstance(e, str) else ""))
        if not 0 <= e < vocab:
            raise SpecCascadeError(f"{source} holds {e}, which is not a token id of this vocabulary [0, {vocab}); "
                                   f"give the id of the end-of-sequence token, or [] for no EOS")
        out.append(int(e))
    return out


def _describe(backend, model) -> str:
    m = _model_of(model) if _model_of(model) is not None else _model_of(backend)
    return type(m if m is not None else backend).__name__


def _check_architectures(drafter: Backend, verifier: Backend, d_model, v_model) -> bool:
    """Both models decoder-only, or both encoder-decoders (then True); else an error naming both."""
    d_ed, v_ed = (bool(getattr(b, "encoder_decoder", False)) for b in (drafter, verifier))
    if d_ed != v_ed:
        kind = {True: "an encoder-decoder model", False: "a decoder-only model"}
        raise SpecCascadeError(
            f"the drafter ({_describe(drafter, d_model)}) is {kind[d_ed]} and the verifier "
            f"({_describe(verifier, v_model)}) is {kind[v_ed]}; both must be decoder-only (causal LMs) or both "
            f"encoder-decoders (T5, BART, Marian, ...) sharing one tokenizer")
    if d_ed and drafter.decoder_start_token_id != verifier.decoder_start_token_id:
        raise SpecCascadeError(
            f"the drafter and verifier decoders start from different tokens (decoder_start_token_id "
            f"{drafter.decoder_start_token_id} vs {verifier.decoder_start_token_id}); both models must share one "
            f"tokenizer and start token")
    return d_ed


def _check_seq2seq(drafter: Backend, verifier: Backend, longest: int, max_new_tokens: int, gamma: int) -> None:
    """Encoder-decoders: the source fits the encoder; the decoder's start token + new tokens + a
    block fit the decoder's positions (the prompt is not part of the decoder's sequence)."""
    for model in (drafter, verifier):
        source = getattr(model, "max_source_positions", None)
        if source and longest > source:
            raise SpecCascadeError(f"encoder input too long for the {model.name}: {longest} tokens exceed its "
                                   f"encoder's {source} positions; shorten the input")
        if model.max_positions and 1 + max_new_tokens + gamma + 1 > model.max_positions:
            raise SpecCascadeError(
                f"max_new_tokens={max_new_tokens} too large for the {model.name}'s decoder: the start token + "
                f"{max_new_tokens} new tokens (+ {gamma + 1} for a draft block) exceed its {model.max_positions} "
                f"decoder positions; lower max_new_tokens")


def _check_models(drafter: Backend, verifier: Backend, ids, mask, max_new_tokens, gamma) -> None:
    if drafter.vocab_size != verifier.vocab_size:
        raise SpecCascadeError(
            f"the drafter and verifier vocabularies differ ({drafter.vocab_size} vs {verifier.vocab_size} logits); "
            "both models must share one tokenizer")
    if torch.device(drafter.device) != torch.device(verifier.device):
        raise DeviceError(f"the drafter is on {drafter.device} and the verifier on {verifier.device}; put both "
                          f"models on one device (e.g. model.to('{verifier.device}'))")
    vocab = min(getattr(m, "source_vocab_size", m.vocab_size) for m in (drafter, verifier))  # encoder's, if any
    real = ids[mask.bool()]
    if int(real.max()) >= vocab or int(real.min()) < 0:
        bad = int(real.max()) if int(real.max()) >= vocab else int(real.min())
        raise SpecCascadeError(f"input_ids hold token id {bad}, outside the vocabulary [0, {vocab})")
    longest = int(mask.sum(1).max())
    if getattr(verifier, "encoder_decoder", False):
        _check_seq2seq(drafter, verifier, longest, max_new_tokens, gamma)
        return
    for model in (drafter, verifier):
        if model.max_positions and longest + max_new_tokens + gamma + 1 > model.max_positions:
            raise SpecCascadeError(
                f"prompt too long for the {model.name}: {longest} prompt tokens + max_new_tokens={max_new_tokens} "
                f"(+ {gamma + 1} for a draft block) exceed its context of {model.max_positions} positions; "
                f"lower max_new_tokens (default {DEFAULTS.max_new_tokens}) or shorten the prompt")


def check_settings(method=DEFAULTS.method, alpha=DEFAULTS.alpha, gamma=DEFAULTS.gamma,
                   temperature=DEFAULTS.temperature, top_k=DEFAULTS.top_k, top_p=DEFAULTS.top_p,
                   max_new_tokens=DEFAULTS.max_new_tokens, seed=DEFAULTS.seed, **method_options):
    """Every setting of :func:`generate` that needs no model, checked (the CLI calls it before
    loading models). Returns (spec, alpha, options, gamma, SamplingConfig, max_new_tokens, seed)."""
    spec = get_method(method)
    alpha = spec.check_alpha(alpha)
    method_options = spec.check_options(method_options)
    gamma = as_int("gamma (the draft block size)", gamma, minimum=1)
    cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    max_new_tokens = as_int("max_new_tokens", max_new_tokens, minimum=1)
    seed = as_int("seed", seed, minimum=0, allow_none=True)
    return spec, alpha, method_options, gamma, cfg, max_new_tokens, seed


def generate(drafter, verifier, input_ids, *, method: str = DEFAULTS.method, alpha: float | None = DEFAULTS.alpha,
             gamma: int = DEFAULTS.gamma, temperature: float = DEFAULTS.temperature, top_k: int = DEFAULTS.top_k,
             top_p: float = DEFAULTS.top_p, max_new_tokens: int = DEFAULTS.max_new_tokens,
             eos_token_id: int | list[int] | None = None, attention_mask: torch.Tensor | None = None,
             seed: int | None = DEFAULTS.seed, generator: torch.Generator | None = None, progress: bool = False,
             streamer=None, **method_options) -> GenerationOutput:
    """Decode up to ``max_new_tokens`` tokens after each prompt with the drafter and the verifier.

    ``drafter`` and ``verifier`` are Hugging Face causal LMs sharing one vocabulary, on one device
    (or :class:`speccascade.models.Backend` objects). ``input_ids``: see :func:`as_batch`.
    Both may also be encoder-decoders (T5, BART, Marian, ...: ``config.is_encoder_decoder``):
    ``input_ids`` is then the encoder's input (left- or right-padded), every row's decoder starts
    from ``decoder_start_token_id``, and the output is the decoder's new tokens.
    ``method`` is a name in ``METHODS``; ``alpha`` its threshold (``None`` takes the method's
    default; ``sd``, ``verifier_only`` and ``drafter_only`` take none). ``method_options`` are a
    method's typed extra options (``alpha_f`` and ``max_drafter_run`` for ``bild``,
    ``max_drafter_run`` for ``token_cascade``, ``length_normalized`` for ``seq_cascade``).
    ``temperature=0`` is greedy; ``0 < temperature < 1e-4`` is refused. ``eos_token_id``:
    ``None`` takes the verifier's own (its generation config, else its config), an id or a list of
    ids stop a row, ``[]`` means no EOS. Draws use ``generator`` if given, else a new one seeded
    with ``seed`` (``None``: nondeterministic). Defaults: :data:`DEFAULTS`.

    ``alpha`` may also be a list with one threshold per row (speculative methods; each is checked;
    equal values are one alpha). ``streamer``: an object with ``put(new_tokens)``, called with each
    row's new tokens (``list[list[int]]``) after every block (one host read per block), and
    ``end()``; see :mod:`speccascade.streaming` (``seq_cascade`` puts everything at the end).
    """
    alpha, row_alpha = _split_alpha(get_method(method) if method in METHODS else None, method, alpha)
    spec, alpha, method_options, gamma, cfg, max_new_tokens, seed = check_settings(
        method, alpha, gamma, temperature, top_k, top_p, max_new_tokens, seed, **method_options)
    progress = as_bool("progress", progress)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise SpecCascadeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    d, v = as_backend(drafter, "drafter"), as_backend(verifier, "verifier")
    seq2seq = _check_architectures(d, v, drafter, verifier)
    ids, mask = as_batch(input_ids, attention_mask, encoder=seq2seq)
    if row_alpha is not None and len(row_alpha) != ids.shape[0]:
        raise SpecCascadeError(
            f"alpha has {len(row_alpha)} values for {ids.shape[0]} rows of input_ids: give one per row")
    _check_models(d, v, ids, mask, max_new_tokens, gamma)
    eos = resolve_eos_token_id(eos_token_id, verifier, min(d.vocab_size, v.vocab_size))
    if generator is None:
        generator = torch.Generator(device=d.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
    elif torch.device(generator.device).type != torch.device(d.device).type:
        raise DeviceError(f"the generator is on {generator.device} but the models on {d.device}; "
                          f"create it with torch.Generator(device='{d.device}')")
    ids, mask = ids.to(d.device), mask.to(d.device)
    alpha_arg = alpha if row_alpha is None else _row_alpha_tensor(row_alpha, ids.shape[0], d.device)
    hook = None if streamer is None else BlockHook(streamer, ids.shape[0])
    hooked = {} if hook is None else {"streamer": hook}
    for model in (d, v):   # caches are sized (fused) or checked (static) before decoding starts
        reserve_request(model, ids.shape[0], ids.shape[1], max_new_tokens, gamma)
        if hasattr(model, "check_capacity") and (spec.kind == "speculative" or spec.name.endswith("_only")):
            model.check_capacity(ids.shape[1], max_new_tokens, gamma if spec.kind == "speculative" else None)

    stats = Stats()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_new_tokens * ids.shape[0], desc=method, unit="tok", leave=False)
    start = time.perf_counter()
    try:
        with torch.no_grad():
            if spec.kind == "speculative":
                req = DecodeRequest(spec, alpha_arg, gamma, cfg, max_new_tokens, eos or None)
                tokens = speculative_decode(d, v, ids, mask, req, generator, stats, bar, **hooked)
            else:
                tokens = spec.fn(d, v, ids, mask, alpha, cfg, max_new_tokens, eos or None, generator, stats, bar,
                                 **method_options, **hooked)
        if d.device.type == "cuda":
            torch.cuda.synchronize(d.device)
    finally:
        if bar is not None:
            # rows that stopped at EOS leave the bar short of its total: end it where decoding ended
            bar.total = bar.n
            bar.refresh()
            bar.close()
    stats.wall_time_s = time.perf_counter() - start
    if hook is not None:
        hook.finish(tokens)
    return GenerationOutput(tokens=tokens, stats=stats, method=method, alpha=alpha if row_alpha is None else row_alpha,
                            eos_token_id=eos)


def _split_alpha(spec, method: str, alpha):
    """``alpha`` as (one value, None), or, given per row (a list, tuple or 1-D tensor) with
    differing values, (the first, the checked list). Equal per-row values are one alpha."""
    if spec is None or not isinstance(alpha, (list, tuple, torch.Tensor)):
        return alpha, None
    if isinstance(alpha, torch.Tensor) and alpha.dim() == 0:
        return float(alpha), None
    values = alpha.tolist() if isinstance(alpha, torch.Tensor) else list(alpha)
    if isinstance(alpha, torch.Tensor) and alpha.dim() != 1 or not values:
        raise SpecCascadeError(f"a per-row alpha must be a non-empty list of numbers, got {alpha!r}")
    if spec.alpha is None:
        raise SpecCascadeError(f"method {method!r} takes no alpha (got alpha={values!r})")
    values = [spec.check_alpha(a) for a in values]
    if all(a == values[0] for a in values):
        return values[0], None
    if spec.kind != "speculative":
        raise SpecCascadeError(f"one alpha per row needs a speculative method; {method!r} takes one alpha per call")
    return values[0], values


def _row_alpha_tensor(values: list[float], rows: int, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, device=device)  # [B]


def defaults() -> dict:
    """:data:`DEFAULTS` as a dict (what ``speccascade generate --help`` shows)."""
    return asdict(DEFAULTS)
