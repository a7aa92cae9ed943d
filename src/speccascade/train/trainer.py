"""Train a translation model on the Bible EN->ES pairs: a decoder-only ``transformers`` Llama
(``arch="llama"``) or an encoder-decoder T5 (``arch="t5"``, T5 v1.1-style).

It reports progress (tqdm: train and validation loss), and at the end the greedy BLEU / chrF of the
best checkpoint on 200 validation pairs. The result is an ordinary Hugging Face checkpoint
(``config.json``, ``model.safetensors``,
tokenizer files) plus ``training.json`` (the preset, steps, losses, BLEU, time and device).
The loss is on the Spanish side only. The best checkpoint by validation loss is written to disk
at each evaluation, so an interrupted run keeps what it had (early stopping against memorising
the 30k training pairs).

Both architectures share the data, the loop, the schedule, the evaluation and the checkpoints;
they differ in how the model is built and how a batch is laid out (:data:`ARCHS`):

* llama: one sequence ``<s>{english}<2es>{spanish}</s>``, the loss on the Spanish tokens;
* t5: the encoder reads ``<s>{english}<2es>`` (the prompt the Bible task gives every model, so
  that evaluation, ``generate``, ``serve`` and ``distill`` feed a T5 exactly what it was trained
  on), the decoder starts from ``<pad>`` (T5's ``decoder_start_token_id``, id 0 of the shared
  tokenizer) and is trained to emit ``{spanish}</s>``.

Batches are drawn from length buckets (pairs of similar length together, the batches in seeded
random order), so little of a batch is padding. A time budget (``max_minutes``) plans the run's
length from the throughput of steps 50-150 (evaluations excluded): the cosine schedule then ends
within the budget, and ``training.json`` logs the planned step count, so ``--epochs`` reproduces
the run. With a ``teacher`` (a trained verifier sharing the tokenizer), a drafter is trained on
the teacher's distribution as well as on the targets (logit distillation; the loss mixes
KL(p_teacher || q) at T = 1 with the cross-entropy): the acceptance of a draft is
1 - D_TV(p, q), so matching p, not only its argmax, is what a drafter is for.

    speccascade train --preset tiny --role verifier --out models/tiny/verifier --device cuda
    speccascade train --arch t5 --role both --out runs/t5 --device cuda
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from ..data.bible import load_split
from .tokenizer import PAD, encode_prompt, encode_target, load_tokenizer, train_tokenizer


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


@dataclass(frozen=True)
class T5Shape:
    """An encoder-decoder's shape (T5 v1.1-style: gated-GELU feed-forward of width ``d_ff``,
    pre-norm RMS layer norms, relative position biases, heads of ``d_model // heads``)."""
    d_model: int
    encoder_layers: int
    decoder_layers: int
    heads: int
    d_ff: int


@dataclass(frozen=True)
class Recipe:
    shape: Shape | T5Shape
    epochs: float
    lr: float
    batch_size: int = 128
    weight_decay: float = 0.1
    attention_dropout: float = 0.0
    dropout: float = 0.0          # on the embeddings and on each attention / MLP output (before the residual add)
    label_smoothing: float = 0.0
    max_minutes: float = 9.0
    distill_weight: float = 0.0   # with a teacher: weight of KL(p_teacher || q) against the cross-entropy
    sources: tuple[str, ...] = ("kjv",)   # English sides of the training verses: "kjv" and/or "web" (SOURCES)
    # an exponential moving average of the weights over the steps, with this decay (None: none); each
    # evaluation scores the trained and the averaged weights, and saves the better (see train)
    ema_decay: float | None = None

    @property
    def arch(self) -> str:
        return "t5" if isinstance(self.shape, T5Shape) else "llama"


#: training sources: the name a recipe or ``--sources`` gives -> the shipped split (data/bible.py)
SOURCES = {"kjv": "train", "web": "train_web"}


def check_sources(sources) -> tuple[str, ...]:
    """``sources`` as a tuple of known names of :data:`SOURCES` (at least one), else a clear error."""
    from ..errors import SpecCascadeError

    sources = tuple(sources)
    if not sources or any(x not in SOURCES for x in sources):
        raise SpecCascadeError(f"--sources {','.join(sources)!r}: choose one or more of {', '.join(SOURCES)} "
                               f"(comma-separated), e.g. --sources kjv,web")
    return sources


PRESETS: dict[str, dict[str, Recipe]] = {
    # the embedded default pair: >= 10x per-token decode cost apart on one CPU thread, <= 40 MB together (fp16)
    "tiny": {
        "drafter": Recipe(Shape(64, 1, 2, 1, 128), epochs=12, lr=3e-3),
        "verifier": Recipe(Shape(384, 8, 6, 2, 1024), epochs=10, lr=1e-3, attention_dropout=0.1),
    },
    # the GPU pair: a 2-layer drafter (3.6M) and an 8-layer verifier (29M). 30k pairs are few:
    # without dropout an 82M verifier overfitted by epoch 5 and ended below a 5M drafter
    # (results/pairs/base_gpu_train_v1.json), hence residual dropout and label smoothing. The
    # verifier recipe won a comparison with two others trained beside it on the same budget
    # (base_deep, base_wide; results/pairs/base_candidates).
    "base": {
        "drafter": Recipe(Shape(256, 2, 4, 2, 768), epochs=12, lr=2e-3, label_smoothing=0.1),
        "verifier": Recipe(Shape(512, 8, 8, 4, 1536), epochs=30, lr=1e-3, attention_dropout=0.1, dropout=0.3,
                           label_smoothing=0.1, max_minutes=7.0),
    },
    "base_deep": {"verifier": Recipe(Shape(512, 12, 8, 4, 1536), epochs=30, lr=1e-3, attention_dropout=0.1,
                                     dropout=0.3, label_smoothing=0.1, max_minutes=7.0)},
    "base_wide": {"verifier": Recipe(Shape(768, 12, 12, 4, 2048), epochs=30, lr=6e-4, attention_dropout=0.1,
                                     dropout=0.3, label_smoothing=0.1, max_minutes=7.0)},
    # a pair with room for speculation to pay: a verifier of a real small LM's shape (SmolLM2-135M's
    # 30 layers x 576, GQA 9/3 heads; 111M parameters with this vocabulary), regularised like base,
    # and a 1-layer drafter meant to be trained on the verifier's own translations
    # (`speccascade distill`, then `train --train-file`), so that it learns the verifier, not the task
    # On an H200 the verifier trains at ~7 steps/s (~33 s an epoch); 3.8 epochs reached only 7.1 test
    # BLEU (results/deep_pair/run1): it needs the base verifier's ~15 epochs' worth of steps, hence 8
    # epochs over both English sources of the training verses (KJV and the World English Bible: twice
    # the pairs, the same Spanish), which a 111M model over-fits less than 16 passes over one.
    # The drafter is as wide as the verifier so that it can start from the verifier's embeddings (tied
    # head), final norm and first layer (`train --init-from VERIFIER`): on a CPU, distilling the tiny
    # verifier (also 384 wide) for 96 steps, that start ended at validation loss 3.32 against 4.89
    # from random weights (benchmarks/drafter_init.py, results/pairs/drafter_init_cpu.json). Run 2
    # trained a 384-wide drafter from random weights (results/deep_pair/pair.json).
    "deep": {
        "drafter": Recipe(Shape(576, 1, 9, 3, 1536), epochs=12, lr=2e-3, label_smoothing=0.0, max_minutes=5.0,
                          distill_weight=0.7),
        "verifier": Recipe(Shape(576, 30, 9, 3, 1536), epochs=8, lr=6e-4, attention_dropout=0.1, dropout=0.3,
                           label_smoothing=0.1, max_minutes=9.0, sources=("kjv", "web")),
    },
    # an encoder-decoder pair (T5 v1.1-style, tied embeddings; not yet trained): a scaled-down
    # T5-small drafter (2+2 layers of 256, 5.9M) and a 6+6-layer verifier of T5-small's width
    # (512, 51M). Dropout 0.1 everywhere (T5's dropout_rate: attention weights, residual branches,
    # feed-forward hidden) and label smoothing 0.1 like the base pair. The per-token decode cost is
    # the decoders' (2 x 256 against 6 x 512 with cross-attention): about 12x apart in FLOPs, 4.8x
    # in time on one (busy) CPU thread (`benchmarks/pair_latency.py --preset-shapes t5`).
    "t5": {
        # the learning rates are half the Llama presets': on an H200 (bf16 autocast, AdamW) 2e-3 and 1e-3
        # diverged, both losses NaN by step ~690 (results/t5_pair/run1/diverged_attempt; T5 does not scale
        # its attention logits by 1 / sqrt(d_kv)). The drafter's 12 epochs took 2.4 of its 5 minutes
        # there, its validation loss still falling: 24, the time budget trims them
        "drafter": Recipe(T5Shape(256, 2, 2, 4, 768), epochs=24, lr=1e-3, dropout=0.1, label_smoothing=0.1,
                          max_minutes=5.0),
        "verifier": Recipe(T5Shape(512, 6, 6, 8, 1536), epochs=30, lr=5e-4, dropout=0.1, label_smoothing=0.1,
                           max_minutes=8.0),
    },
    # a T5 pair small enough for CPU smoke runs (tests, the GPU script's rehearsal); not a measured pair
    "t5_tiny": {
        "drafter": Recipe(T5Shape(64, 1, 1, 2, 128), epochs=1, lr=3e-3, max_minutes=1.0),
        "verifier": Recipe(T5Shape(128, 2, 2, 4, 256), epochs=1, lr=2e-3, dropout=0.1, label_smoothing=0.1,
                           max_minutes=1.0),
    },
}
#: the preset each architecture trains when none is named
DEFAULT_PRESETS = {"llama": "tiny", "t5": "t5"}
MAX_POSITIONS = 512
#: the steps whose throughput plans a time-budgeted run (the first ones warm up; evaluations in the
#: window are not counted as training time). Measured on an H200: beside a compiling process on the
#: other GPU, steps 10-40 ran at 3.0 steps/s against 6-8 later; a 1-layer drafter (below) was still
#: speeding up at step 150. A plan made that early leaves much of the budget unused.
PROBE_STEPS = (300, 500)


def fit_in_budget(step: int, rate: float, seconds_left: float, per_eval_s: float, eval_every: int) -> tuple[int, int]:
    """The last step of a time-budgeted schedule planned at ``step``: the steps that fit 95% of
    ``seconds_left`` at ``rate`` steps/s together with the evaluations they bring (``per_eval_s`` each,
    every ``eval_every`` steps, made more frequent so that at least ~12 remain). Returns (last step,
    evaluation interval)."""
    left = 0.95 * seconds_left
    every = max(1, min(eval_every, int(rate * left) // 12 or 1))
    return step + int(left / (1 / rate + per_eval_s / every)), every


#: batch widths are rounded up to this on a GPU: a few shapes instead of one per padded length (each new
#: shape is slow the first time: kernel selection), so a run reaches its steady rate sooner. In the deep
#: pair's run 2 (2 x H200, widths not rounded) the drafter ran at 6.5 steps/s at step 70, 11 at step 180
#: and 18 from step 400 on, and its plan, made from steps 50-150 at 7.5 steps/s, used 74 s of its 120.
SHAPE_MULTIPLE = 16
MAX_PAIR_TOKENS = 320


#: consecutive steps with a non-finite loss or gradient after which training stops (diverged); the
#: count is read every NONFINITE_CHECK_EVERY steps (a host sync), so a run stops within that many more
MAX_NONFINITE_STEPS = 25
NONFINITE_CHECK_EVERY = 8


def make_optimizer(model, recipe: Recipe) -> torch.optim.AdamW:
    """The recipe's AdamW: weight decay on the matrices only, fused (on a CPU too: ``optimizer_step``
    skips a bad step on the device)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.98), fused=True)


def optimizer_step(loss: torch.Tensor, model, opt, sched, clip: float = 1.0) -> torch.Tensor:
    """One clipped step of a fused optimiser (``torch.optim.AdamW(..., fused=True)``). A step whose
    gradient norm is not finite (an overflow, or a diverging run) leaves the weights and optimiser
    state as they were; returns whether the step was taken (a bool tensor on the model's device).
    The decision stays on the device, as under ``torch.amp.GradScaler``: the optimiser's
    ``found_inf`` tensor makes the fused step a no-op, with no host sync. The schedule advances
    either way."""
    if not (opt.defaults.get("fused") and getattr(opt, "_step_supports_amp_scaling", False)):
        raise ValueError("optimizer_step takes a fused optimiser (e.g. torch.optim.AdamW(..., fused=True)): it skips "
                         "a non-finite step on the device")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    finite = torch.isfinite(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
    opt.found_inf = (~finite).float()
    opt.step()
    sched.step()
    return finite


def build_model(shape: Shape | T5Shape, vocab_size: int, attention_dropout: float = 0.0, dropout: float = 0.0,
                like=None):
    """A randomly initialised model of ``shape`` (a Llama for :class:`Shape`, a T5 for
    :class:`T5Shape`) with the shared tokenizer's special tokens; ``like``: a Llama config whose
    position encoding and norm epsilon it takes (see :func:`build_llama`)."""
    if isinstance(shape, T5Shape):
        return build_t5(shape, vocab_size, attention_dropout, dropout)
    return build_llama(shape, vocab_size, attention_dropout, dropout, like)


def build_llama(shape: Shape, vocab_size: int, attention_dropout: float = 0.0, dropout: float = 0.0, like=None):
    """``like``: the config of the model that will start this one (``train --init-from``), whose RoPE
    parameters and RMS-norm epsilon it takes, so that a model started from all of another's layers
    (e.g. a pretrained SmolLM2-135M, RoPE base 100,000, epsilon 1e-5) computes what that model does;
    otherwise transformers' defaults (10,000 and 1e-6), as every preset was trained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .tokenizer import BOS, EOS

    inherited = {} if like is None else {"rope_parameters": dict(like.rope_parameters),
                                         "rms_norm_eps": float(like.rms_norm_eps)}
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                      num_key_value_heads=shape.kv_heads, max_position_embeddings=MAX_POSITIONS,
                      tie_word_embeddings=True, attention_dropout=attention_dropout,
                      bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, **inherited)
    model = LlamaForCausalLM(cfg)
    add_dropout(model, dropout)
    return model


def build_t5(shape: T5Shape, vocab_size: int, attention_dropout: float = 0.0, dropout: float = 0.0):
    """A T5 v1.1-style encoder-decoder. T5 has one dropout rate (attention weights, residual
    branches, feed-forward hidden): ``dropout``; a separate ``attention_dropout`` is refused. The
    output head is tied to the shared embedding (with T5's d_model ** -0.5 scaling of the decoder
    output): transformers 5 always ties T5's head, and with one 8k vocabulary for both languages
    and 30k pairs, tying also spares the parameters, as the Llama presets do. The decoder starts
    from ``<pad>``, as T5 does."""
    from transformers import T5Config, T5ForConditionalGeneration

    from ..errors import SpecCascadeError
    from .tokenizer import BOS, EOS

    if attention_dropout:
        raise SpecCascadeError("T5 has a single dropout rate (Recipe.dropout); leave attention_dropout at 0")
    if shape.d_model % shape.heads:
        raise SpecCascadeError(f"T5 shape: d_model {shape.d_model} is not a multiple of heads {shape.heads}")
    cfg = T5Config(vocab_size=vocab_size, d_model=shape.d_model, d_kv=shape.d_model // shape.heads, d_ff=shape.d_ff,
                   num_layers=shape.encoder_layers, num_decoder_layers=shape.decoder_layers, num_heads=shape.heads,
                   feed_forward_proj="gated-gelu", dropout_rate=dropout, tie_word_embeddings=True,
                   bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, decoder_start_token_id=PAD)
    return T5ForConditionalGeneration(cfg)


def add_dropout(model, p: float) -> None:
    """Residual dropout as in the original Transformer, on a ``transformers`` Llama (which has only
    attention dropout): forward hooks on the embeddings and on each attention and MLP output
    projection, active in training mode only. Hooks are not saved with the checkpoint."""
    if p <= 0:
        return

    def hook(module, args, output):
        return torch.nn.functional.dropout(output, p, module.training)

    model.model.embed_tokens.register_forward_hook(hook)
    for layer in model.model.layers:
        layer.self_attn.o_proj.register_forward_hook(hook)
        layer.mlp.down_proj.register_forward_hook(hook)


def encode_pairs(tokenizer, pairs: list[dict]) -> list[tuple[list[int], int]]:
    """(prompt + target token ids, prompt length) per pair, dropping over-long pairs."""
    out = []
    for p in pairs:
        src, tgt = encode_prompt(tokenizer, p["en"]), encode_target(tokenizer, p["es"])
        if len(src) + len(tgt) <= MAX_PAIR_TOKENS:
            out.append((src + tgt, len(src)))
    return out


def length_batches(lengths: list[int], batch_size: int, rng: random.Random, pool: int = 50) -> list[list[int]]:
    """One epoch's batches of indices: shuffled, then cut into pools of ``pool`` batches, each pool
    sorted by length and cut into batches, the batches shuffled again. Each index appears once."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for i in range(0, len(order), batch_size * pool):
        chunk = sorted(order[i:i + batch_size * pool], key=lambda j: lengths[j])
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over scored positions (``targets`` != -100, aligned with the logits) of KL(p || q),
    p = softmax(teacher), q = softmax(student), T = 1."""
    keep = targets != -100
    log_q = torch.log_softmax(logits[keep].float(), -1)
    log_p = torch.log_softmax(teacher_logits[keep].float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean()


def copy_first_layers(model, source) -> list[str]:
    """Copy ``source``'s token embeddings (tied to the output head), final norm and first
    ``len(model.model.layers)`` decoder layers into ``model``: a decoder-only model as wide as
    ``source`` (e.g. a 1-layer drafter of a 30-layer verifier) that then starts as ``source`` cut
    after those layers. Its MLPs may be wider (``train --intermediate``): each copied MLP fills the
    first units, and the other units' output weights start at zero, so the model still starts as
    ``source`` cut, with the extra units free to learn. Returns the copied parameter names; another
    width, head layout or vocabulary, a narrower MLP, or an encoder-decoder, is a clear error."""
    from ..errors import SpecCascadeError
    from ..models.base import is_encoder_decoder

    if is_encoder_decoder(model) or is_encoder_decoder(source):
        raise SpecCascadeError("--init-from copies a decoder-only model's layers into a decoder-only model "
                               "(--arch llama), not a T5")
    keys = ("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads")
    mine, theirs = ({k: getattr(m.config, k) for k in keys} for m in (model, source))
    if mine != theirs:
        diff = ", ".join(f"{k} {mine[k]} vs {theirs[k]}" for k in keys if mine[k] != theirs[k])
        raise SpecCascadeError(f"--init-from: the model's shape differs from this one's ({diff}); it must be as "
                               f"wide as the model trained here (only the number of layers and a wider MLP may differ)")
    wide, narrow = model.config.intermediate_size, source.config.intermediate_size
    if wide < narrow:
        raise SpecCascadeError(f"--init-from: the model's MLP has {narrow} units, this one's {wide}: give "
                               f"--intermediate {narrow} or more (a wider MLP starts with the copied units)")
    n = len(model.model.layers)
    if len(source.model.layers) < n:
        raise SpecCascadeError(f"--init-from: the model has {len(source.model.layers)} layers; this one has {n}")
    theirs = source.state_dict()
    copied = [k for k in model.state_dict()
              if k.startswith(("model.embed_tokens.", "model.norm.", "lm_head."))
              or any(k.startswith(f"model.layers.{i}.") for i in range(n))]
    with torch.no_grad():
        mine = model.state_dict()
        for k in copied:
            if mine[k].shape == theirs[k].shape:
                mine[k].copy_(theirs[k])
                continue
            # an MLP wider than the source's: gate / up [units, hidden], down [hidden, units]
            mine[k][tuple(slice(0, d) for d in theirs[k].shape)].copy_(theirs[k])
            if ".mlp.down_proj." in k:
                mine[k][:, narrow:].zero_()
    return copied


def with_intermediate(shape: Shape | T5Shape, units: int) -> Shape | T5Shape:
    """``shape`` with its feed-forward width set to ``units`` (``train --intermediate``)."""
    return replace(shape, d_ff=units) if isinstance(shape, T5Shape) else replace(shape, intermediate=units)


def load_init_source(path: Path):
    """The model at ``path`` (``train --init-from``: a checkpoint folder or a .gguf file), in float32."""
    from ..models.loading import check_model_path, load_causal_lm

    check_model_path(str(path), "--init-from")
    return load_causal_lm(path, dtype=torch.float32)


def load_teacher(path: Path, vocab_size: int, device: torch.device):
    """A trained checkpoint to distil from, frozen; it must share the tokenizer (same vocabulary)."""
    from ..errors import SpecCascadeError
    from ..models.loading import check_model_path, load_causal_lm

    check_model_path(str(path), "--teacher")
    teacher = load_causal_lm(path, device=str(device), dtype=torch.float32).eval()
    if teacher.config.vocab_size != vocab_size:
        raise SpecCascadeError(f"the teacher {str(path)!r} has a vocabulary of {teacher.config.vocab_size}, the "
                               f"tokenizer {vocab_size}: distil from a model trained with the same tokenizer")
    teacher.requires_grad_(False)
    return teacher


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def collate(batch: list[tuple[list[int], int]], device, multiple: int = 1) -> tuple[dict, torch.Tensor]:
    """A decoder-only batch: (model inputs, targets aligned with the logits: the next token where
    it is Spanish, -100 elsewhere). The width is rounded up to ``multiple`` (right padding: masked,
    not scored, unseen by the real tokens of a causal model)."""
    L = _round_up(max(len(ids) for ids, _ in batch), multiple)
    ids = torch.full((len(batch), L), PAD, dtype=torch.long)
    targets = torch.full((len(batch), L), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), L), dtype=torch.long)
    for i, (seq, n_src) in enumerate(batch):
        ids[i, :len(seq)] = torch.tensor(seq)
        targets[i, n_src - 1:len(seq) - 1] = torch.tensor(seq[n_src:])  # loss on the Spanish side only
        mask[i, :len(seq)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}, targets.to(device)


def collate_seq2seq(batch: list[tuple[list[int], int]], device, multiple: int = 1) -> tuple[dict, torch.Tensor]:
    """An encoder-decoder batch: the prompt to the encoder (right-padded, masked), the decoder fed
    ``<pad>`` (its start token) then the Spanish shifted right; targets: the Spanish + ``</s>``,
    -100 on padding. The decoder is causal, so its right padding needs no mask. Both widths are
    rounded up to ``multiple``."""
    S = _round_up(max(n_src for _, n_src in batch), multiple)
    T = _round_up(max(len(seq) - n_src for seq, n_src in batch), multiple)
    src = torch.full((len(batch), S), PAD, dtype=torch.long)
    mask = torch.zeros((len(batch), S), dtype=torch.long)
    dec = torch.full((len(batch), T), PAD, dtype=torch.long)
    targets = torch.full((len(batch), T), -100, dtype=torch.long)
    for i, (seq, n_src) in enumerate(batch):
        tgt = seq[n_src:]
        src[i, :n_src] = torch.tensor(seq[:n_src])
        mask[i, :n_src] = 1
        dec[i, 1:len(tgt)] = torch.tensor(tgt[:-1])   # dec[i, 0] = PAD, the decoder start token
        targets[i, :len(tgt)] = torch.tensor(tgt)
    return ({"input_ids": src.to(device), "attention_mask": mask.to(device), "decoder_input_ids": dec.to(device)},
            targets.to(device))


@dataclass(frozen=True)
class Arch:
    """What differs between architectures: the model builder and the batch layout."""
    name: str
    build: Callable
    collate: Callable


ARCHS = {"llama": Arch("llama", build_llama, collate), "t5": Arch("t5", build_t5, collate_seq2seq)}


def model_logits(model, inputs: dict, device: torch.device) -> torch.Tensor:
    """The model's logits for a batch (bf16 autocast on CUDA; no KV cache: a training or scoring
    pass over whole sequences has no later step to serve)."""
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return model(**inputs, use_cache=False).logits


def default_distill_weight(recipe: Recipe, has_teacher: bool) -> float:
    """The distillation term's weight when none is given: the recipe's (0.5 if it has none) with a
    teacher, 0 without."""
    return (recipe.distill_weight or 0.5) if has_teacher else 0.0


def step_loss(net, inputs: dict, targets: torch.Tensor, device: torch.device, label_smoothing: float = 0.0,
              teacher=None, distill_weight: float = 0.0) -> torch.Tensor:
    """A training step's loss: the cross-entropy of ``net``'s logits against ``targets``, and with a
    ``teacher``, (1 - ``distill_weight``) of it plus ``distill_weight`` × KL(p_teacher || q)."""
    logits = model_logits(net, inputs, device)
    loss = cross_entropy(logits, targets, label_smoothing)
    if teacher is not None:
        with torch.no_grad():
            teacher_logits = model_logits(teacher, inputs, device)
        loss = (1 - distill_weight) * loss + distill_weight * distill_loss(logits, teacher_logits, targets)
    return loss


def previous_features(states: torch.Tensor) -> torch.Tensor:
    """What a feature drafter reads at each position of a right-padded batch (:func:`collate`):
    ``states  # [B, L, H]`` (the teacher's last hidden states) shifted one position on, so that
    position i reads f_{i-1}, the state from which the teacher predicted x_i, and the first position
    (every row's first real token) reads zeros (Li et al., 2024, EAGLE). The padding after a row's
    end reads padding states, unseen by its real tokens (causal) and not scored.  # [B, L, H]"""
    return torch.nn.functional.pad(states[:, :-1], (0, 0, 1, 0))


@torch.no_grad()
def teacher_view(teacher, inputs: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of the (frozen) teacher over a batch: its logits  # [B, L, V]  and its last hidden
    states  # [B, L, H]  (after its final norm: what its head reads, and what a feature drafter
    reads; float32)."""
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        states = teacher.model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                               use_cache=False).last_hidden_state
        return teacher.lm_head(states), states.float()


def feature_forward(model, inputs: dict, states: torch.Tensor, device: torch.device):
    """A :class:`~speccascade.models.LlamaFeatureDrafter`'s logits  # [B, L, V]  and last hidden
    states  # [B, L, H]  (after its final norm) over a batch, fed the teacher's ``states`` of it
    shifted by :func:`previous_features` (bf16 autocast on CUDA). A token-only Llama reads its tokens
    alone (``states`` unused): the same loss for a drafter compared without features
    (``benchmarks/feature_drafter.py``)."""
    from ..models.features import is_feature_drafter

    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        ids = inputs["input_ids"]
        embeds = (model.feature_embeddings(ids, previous_features(states)) if is_feature_drafter(model)
                  else model.get_input_embeddings()(ids))
        hidden = model.model(inputs_embeds=embeds, attention_mask=inputs.get("attention_mask"),
                             use_cache=False).last_hidden_state
        return model.lm_head(hidden), hidden


def unrolled_feature_forward(model, inputs: dict, states: torch.Tensor, device: torch.device, depth: int):
    """A feature drafter's logits and last hidden states at each depth 0..``depth`` of a block, over a
    right-padded batch (:func:`collate`): the training-time test of EAGLE-3 (Li et al., 2025), which
    trains the drafter on what it reads in the loop. In a block (:mod:`speccascade.models.features`),
    the first draft reads the verifier's state; the draft k positions later reads the drafter's own
    state of the position before, computed k - 1 positions into the block, and attends to the prefix
    up to the block's start (fed with the verifier's states) and to its own k positions of the block.
    So depth k's query at position j, for the block started at t = j - k, reads the token x_j beside
    depth k - 1's state at j - 1, and attends to depth 0's keys at positions <= t and to depth m's key at
    position t + m (m = 1..k). Depth 0 is :func:`feature_forward` (plain causal attention). The tokens
    are the batch's (teacher-forced): a depth is reached only where every draft before it was accepted,
    i.e. equals them. Returns ([logits # [B, L, V]], [hidden # [B, L, H]]), one per depth; depth k's
    rows j < k (no block starts there) are computed but meaningless (:func:`feature_loss` masks them)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    ids = inputs["input_ids"]
    B, L = ids.shape
    core = model.model
    positions = torch.arange(L, device=ids.device)
    position_ids = positions.expand(B, L)
    j, i = positions.view(L, 1), positions.view(1, L)
    keys = [[] for _ in core.layers]     # per layer, per depth: (k, v)  # [B, Hkv, L, D]
    logits, hiddens = [], []
    features = previous_features(states)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for k in range(depth + 1):
            h = model.feature_embeddings(ids, features)
            cos, sin = core.rotary_emb(h, position_ids)
            # keys seen by depth k's queries: depth 0 at i <= j - k, then depth m (1..k) at i = j - k + m
            seen = [i <= j - k] + [i == j - k + m for m in range(1, k + 1)]
            mask = torch.cat(seen, 1)                                              # [L, (k + 1) L]
            for layer, cache in zip(core.layers, keys):
                att = layer.self_attn
                x = layer.input_layernorm(h)
                q = att.q_proj(x).view(B, L, -1, att.head_dim).transpose(1, 2)
                kk = att.k_proj(x).view(B, L, -1, att.head_dim).transpose(1, 2)
                v = att.v_proj(x).view(B, L, -1, att.head_dim).transpose(1, 2)
                q, kk = apply_rotary_pos_emb(q, kk, cos, sin)
                cache.append((kk, v))
                K = torch.cat([c[0] for c in cache], 2).repeat_interleave(att.num_key_value_groups, 1)
                V = torch.cat([c[1] for c in cache], 2).repeat_interleave(att.num_key_value_groups, 1)
                o = torch.nn.functional.scaled_dot_product_attention(
                    q, K.to(q.dtype), V.to(q.dtype), attn_mask=mask, scale=att.scaling,
                    dropout_p=att.attention_dropout if model.training else 0.0)
                h = h + att.o_proj(o.transpose(1, 2).reshape(B, L, -1))
                h = h + layer.mlp(layer.post_attention_layernorm(h))
            hidden = core.norm(h)
            logits.append(model.lm_head(hidden))
            hiddens.append(hidden)
            features = previous_features(hidden)   # depth k + 1 reads this depth's state of the position before
    return logits, hiddens


def feature_regression(hidden: torch.Tensor, states: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """EAGLE's feature regression (Li et al., 2024): the mean over the scored positions (``keep``, a
    bool mask) of ||h_i - f_i||^2 / ||f_i||^2, the drafter's last hidden state h_i (what its head reads)
    against the teacher's state f_i at the same position, a squared error relative to the state's size.
    It teaches the drafter's own state to stand in for the teacher's, which a block's later drafts read
    (the verifier has not scored the earlier drafts yet)."""
    h, f = hidden[keep].float(), states[keep].float()
    return ((h - f).pow(2).sum(-1) / f.pow(2).sum(-1)).mean()


def feature_loss(model, inputs: dict, targets: torch.Tensor, teacher_logits: torch.Tensor,
                 teacher_states: torch.Tensor, device: torch.device, label_smoothing: float = 0.0,
                 distill_weight: float = 0.0, regression: float = 1.0,
                 unroll: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A feature drafter's training loss on a batch, given the teacher's logits and last hidden states
    of it (:func:`teacher_view`): fed the states shifted by one position (:func:`feature_forward`),
    the token loss of :func:`step_loss` ((1 - ``distill_weight``) × the cross-entropy against
    ``targets`` + ``distill_weight`` × KL(p_teacher || q)) plus ``regression`` × :func:`feature_regression`
    at the scored positions. With ``unroll`` = K > 0, the mean of that loss over a block's depths 0..K
    (:func:`unrolled_feature_forward`), depth k scored where a block starting k positions before is
    (both positions scored). Returns (the loss, the regression term alone, detached). The one
    definition, for ``train(features=True)`` and ``benchmarks/feature_drafter.py``."""
    if unroll:
        all_logits, all_hidden = unrolled_feature_forward(model, inputs, teacher_states, device, unroll)
    else:
        logits, hidden = feature_forward(model, inputs, teacher_states, device)
        all_logits, all_hidden = [logits], [hidden]
    scored = targets != -100
    total, reg_total = 0.0, 0.0
    for k, (logits, hidden) in enumerate(zip(all_logits, all_hidden)):
        # depth k at j: a block started at j - k, which must be a scored position too
        keep = scored & torch.nn.functional.pad(scored, (k, 0))[:, :scored.shape[1]] if k else scored
        t = targets.masked_fill(~keep, -100) if k else targets
        # (pure distillation computes no cross-entropy: its weight, and its gradient, would be 0)
        loss = cross_entropy(logits, t, label_smoothing) if distill_weight < 1 else 0.0
        if distill_weight:
            loss = (1 - distill_weight) * loss + distill_weight * distill_loss(logits, teacher_logits, t)
        reg = feature_regression(hidden, teacher_states, keep)
        total, reg_total = total + loss + regression * reg, reg_total + reg.detach()
    n = len(all_logits)
    return total / n, reg_total / n


def check_feature_args(features: bool, role: str, arch: str, teacher, regression: float | None = None,
                       unroll: int = 0) -> float:
    """``train --features``'s settings: a Llama drafter (``arch``, ``role``) with a ``teacher`` whose
    states it reads; ``regression`` (None: 1.0) a weight >= 0, and ``unroll`` (the depths of a block
    trained beyond the first, :func:`feature_loss`) a whole number >= 0, each given only with
    ``features``. Returns the regression's weight (0 without features)."""
    from ..checks import as_real
    from ..errors import SpecCascadeError

    if isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 0:
        raise SpecCascadeError(f"--feature-unroll must be a whole number >= 0 (the depths of a block trained beyond "
                               f"its first draft, e.g. 2), got {unroll!r}")
    if not features:
        if regression is not None:
            raise SpecCascadeError("--feature-regression weighs the feature regression of a feature drafter: "
                                   "give --features too")
        if unroll:
            raise SpecCascadeError("--feature-unroll trains a feature drafter on its own states, as a block drafts: "
                                   "give --features too")
        return 0.0
    if role != "drafter":
        raise SpecCascadeError(f"--features trains a drafter that reads its verifier's states, not a {role}: "
                               f"give --role drafter")
    if arch != "llama":
        raise SpecCascadeError(f"--features trains a decoder-only (Llama) feature drafter, not a {arch}: "
                               f"give --arch llama (a Llama preset)")
    if teacher is None:
        raise SpecCascadeError("--features trains a drafter on its verifier's states: give --teacher VERIFIER")
    regression = 1.0 if regression is None else as_real("--feature-regression", regression)
    if not regression >= 0:
        raise SpecCascadeError(f"--feature-regression must be a finite number >= 0, got {regression}")
    return regression


def as_feature_drafter(model, teacher, dropout: float = 0.0):
    """``model`` (a Llama drafter, as built and started) as a :class:`~speccascade.models.LlamaFeatureDrafter`
    that starts as it (feature map [I, 0]; :meth:`~speccascade.models.LlamaFeatureDrafter.from_drafter`),
    with the recipe's residual ``dropout`` (:func:`add_dropout`: hooks are not copied). Its hidden size
    must equal ``teacher``'s: it reads the teacher's states."""
    from ..errors import SpecCascadeError
    from ..models.features import LlamaFeatureDrafter

    mine, theirs = model.config.hidden_size, teacher.config.hidden_size
    if mine != theirs:
        raise SpecCascadeError(f"--features: a feature drafter reads its teacher's states, so it must be as wide: "
                               f"the drafter's hidden size is {mine}, the teacher's {theirs}; train a drafter of "
                               f"the teacher's width (a --preset whose drafter is {theirs} wide, or --init-from a "
                               f"model {theirs} wide with such a preset)")
    model = LlamaFeatureDrafter.from_drafter(model)
    add_dropout(model, dropout)
    return model


def compile_layers(model) -> int:
    """``torch.compile`` each decoder layer of a Llama in place (regional compilation): the layers
    run the same code, so they share one compiled program per mode (training, scoring) and the
    compile costs about one layer's whatever the depth; shapes are dynamic from the start, as the
    batches vary in length. The weights and the checkpoint are unchanged. Returns the layers compiled;
    an encoder-decoder is a clear error. Whether it pays is the machine's: the steps must save more
    than the compile costs (``benchmarks/train_step.py`` measures both)."""
    from ..errors import SpecCascadeError
    from ..models.base import is_encoder_decoder

    if is_encoder_decoder(model):
        raise SpecCascadeError("--compile compiles a decoder-only model's layers (--arch llama); train a T5 without it")
    for layer in model.model.layers:
        layer.compile(dynamic=True)
    return len(model.model.layers)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0,
                  reduction: str = "mean") -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=-100, label_smoothing=label_smoothing, reduction=reduction)


def token_loss(model, inputs: dict, targets: torch.Tensor, device: torch.device, label_smoothing: float = 0.0,
               reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the model's logits against ``targets`` (-100: not scored); bf16 autocast on CUDA."""
    return cross_entropy(model_logits(model, inputs, device), targets, label_smoothing, reduction)


@torch.no_grad()
def evaluate_loss(model, data, device, batch_size=128, collate_fn=collate, teacher=None) -> float:
    """Mean per-token cross-entropy (no label smoothing) over ``data``. ``teacher``: for a feature
    drafter, the model whose states it is fed (:func:`feature_forward`; it cannot run without them)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        inputs, targets = collate_fn(data[i:i + batch_size], device)
        if teacher is not None:
            logits = feature_forward(model, inputs, teacher_view(teacher, inputs, device)[1], device)[0]
            total += float(cross_entropy(logits, targets, reduction="sum"))
        else:
            total += float(token_loss(model, inputs, targets, device, reduction="sum"))
        count += int((targets != -100).sum())
    model.train()
    return total / max(count, 1)


def ensure_tokenizer(path: Path, vocab_size: int = 8000):
    """Load the tokenizer at ``path`` (a folder, or a .gguf file: a pretrained model's own, e.g. to
    start from SmolLM2-135M with ``--init-from`` the same file) or train it on the training split
    and save it there."""
    if path.suffix == ".gguf" and path.is_file():
        from ..models.loading import load_tokenizer as load_any

        return load_any(path)
    if (path / "tokenizer.json").exists():
        return load_tokenizer(path)
    if (path / "config.json").exists():   # a model's folder: never write a new tokenizer into it
        from ..errors import SpecCascadeError

        raise SpecCascadeError(f"--tokenizer {str(path)!r} holds a model (config.json) but no tokenizer.json: give "
                               f"the folder of the tokenizer that model was trained with (the shipped models': "
                               f"the default), or the model's .gguf file")
    train = load_split("train")
    tok = train_tokenizer((t for p in train for t in (p["en"], p["es"])), vocab_size=vocab_size)
    path.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(path))
    return tok


def resolve_preset(preset: str | None = None, arch: str | None = None) -> str:
    """The preset to train: ``preset``, or the default one of ``arch`` (llama: tiny, t5: t5), or
    tiny. An unknown preset or architecture, or a preset of another architecture than ``arch``, is
    an error."""
    from ..errors import SpecCascadeError

    if arch is not None and arch not in ARCHS:
        raise SpecCascadeError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if preset is None:
        return DEFAULT_PRESETS[arch or "llama"]
    if preset not in PRESETS:
        raise SpecCascadeError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    have = preset_arch(preset)
    if arch is not None and arch != have:
        others = [name for name in PRESETS if preset_arch(name) == arch]
        raise SpecCascadeError(f"preset {preset!r} is a {have} preset, not {arch}; with --arch {arch} use "
                               f"--preset {' or '.join(others)}")
    return preset


def preset_arch(preset: str) -> str:
    """The architecture of a preset's recipes (one per preset: a pair shares its architecture)."""
    return next(iter(PRESETS[preset].values())).arch


def check_train_args(preset: str | None, role: str, epochs: float | None = None, max_minutes: float | None = None,
                     arch: str | None = None) -> str:
    """A preset (see :func:`resolve_preset`) that has ``role``, and a positive epoch count and time
    budget (None: the recipe's). Returns the preset's name."""
    from ..checks import as_real
    from ..errors import SpecCascadeError

    preset = resolve_preset(preset, arch)
    if role not in PRESETS[preset]:
        raise SpecCascadeError(f"preset {preset!r} has no {role} recipe (it has: {', '.join(PRESETS[preset])}); "
                               f"use --role {' or '.join(PRESETS[preset])}")
    for name, v in (("--epochs", epochs), ("--minutes", max_minutes)):
        if v is not None and as_real(name, v) <= 0:
            raise SpecCascadeError(f"{name} must be > 0, got {v}")
    return preset


def train(preset: str | None, role: str, out: Path, tokenizer_dir: Path, device: str = "cpu", seed: int = 0,
          epochs: float | None = None, max_minutes: float | None = None, progress: bool = True,
          bleu_pairs: int = 200, train_file: Path | None = None, arch: str | None = None,
          teacher: Path | None = None, distill_weight: float | None = None,
          validation_pairs: int | None = None, sources: tuple[str, ...] | None = None,
          batch_size: int | None = None, lr: float | None = None, init_from: Path | None = None,
          ema_decay: float | None = None, compile: bool = False, intermediate: int | None = None,
          features: bool = False, feature_regression: float | None = None, dropout: float | None = None,
          label_smoothing: float | None = None, feature_unroll: int = 0) -> dict:
    """Train ``preset``'s ``role`` model and save it to ``out`` (the best checkpoint by validation
    loss). However short the budget, one step runs and a usable checkpoint is saved: when no evaluation fell inside
    ``max_minutes``, the last weights are saved (``log["best"]["val_loss"]`` is None).
    ``train_file``: JSONL rows ``{"en", "es"}`` to train on instead of the training split (e.g. a
    verifier's own translations, :mod:`.distill`); validation stays on the validation split.
    ``arch``: "llama" or "t5"; None: the preset's (a preset of another architecture is an error;
    ``preset=None``: the architecture's default preset). ``sources``: the English sides of the
    training verses to train on (:data:`SOURCES`; default the recipe's, e.g. ``("kjv", "web")``: each
    verse twice, from two translations). ``validation_pairs``: validate on the first N
    validation pairs only (smoke runs). ``teacher``: a checkpoint to distil from (``distill_weight``,
    default the recipe's or 0.5, of the loss is KL(p_teacher || q); validation stays plain cross-entropy).
    ``batch_size`` / ``lr``: replace the recipe's (sequences per optimisation step, over all ranks; peak
    learning rate); the log's ``recipe`` holds what was used. ``init_from``: a trained model of the
    same width whose embeddings, final norm and first layers start this one (:func:`load_init_source`,
    :func:`copy_first_layers`; with all of its layers, also its RoPE and norm epsilon: :func:`build_llama`).
    ``dropout``: the residual dropout, replacing the recipe's (e.g. less to fine-tune a pretrained
    start, ``init_from`` with all of its layers). ``label_smoothing``: the training loss's label
    smoothing, replacing the recipe's (validation stays plain cross-entropy).
    ``intermediate``: the feed-forward width, replacing the recipe's (e.g. a 1-layer drafter with a
    wider MLP: more capacity at almost the same decode cost, where a step is bound by launches).
    ``ema_decay`` (default the recipe's): also keep an exponential moving average of the weights
    (``torch.optim.swa_utils.AveragedModel``, updated after every step), the checkpoint averaging that
    translation models gain from; each evaluation scores both, and a new best is saved from whichever
    scored lower (``log["evals"][i]["val_loss_ema"]``; ``log["best"]["weights"]``: "trained" or "ema").
    ``compile``: ``torch.compile`` the model's decoder layers, and the teacher's (:func:`compile_layers`;
    Llama only); the compile time counts against ``max_minutes``.
    ``features``: train the drafter as a :class:`~speccascade.models.LlamaFeatureDrafter`, which reads
    the ``teacher``'s last hidden state of the position before beside each token (Li et al., 2024,
    EAGLE): the preset's drafter, built and started (``init_from``) as usual and as wide as the
    teacher, then :meth:`~speccascade.models.LlamaFeatureDrafter.from_drafter`. Each step runs the
    teacher once for its logits and states; the loss is :func:`feature_loss` (the distillation loss
    plus ``feature_regression``, default 1.0, × EAGLE's feature regression); validation feeds the
    teacher's states too, and the validation BLEU is skipped (a feature drafter cannot decode alone).
    ``feature_unroll`` = K > 0: train on a block's depths 0..K as the loop drafts them, each later draft
    reading the drafter's own state (EAGLE-3's training-time test, :func:`unrolled_feature_forward`),
    the loss their mean; validation stays at depth 0. Not data-parallel.

    **Data-parallel** under ``torchrun --nproc-per-node N`` (PyTorch's DistributedDataParallel, NCCL
    on GPUs, gloo on a CPU): every rank draws the same batches and takes its 1/N share of each
    batch's sequences, so the recipe's batch, learning rate and schedule are unchanged; each
    rank's loss is scaled by its share of the batch's scored tokens, so the averaged gradient is
    the whole batch's (the same steps as one process, to float rounding). Rank 0 decides when the
    time budget ends, evaluates, saves and writes the log."""
    from tqdm.auto import tqdm

    from ..distributed import world
    from ..models.loading import check_device

    preset = check_train_args(preset, role, epochs, max_minutes, arch)
    check_device(device, f"{role} to train")
    recipe = PRESETS[preset][role]
    regression = check_feature_args(features, role, recipe.arch, teacher, feature_regression, feature_unroll)
    for name, value in (("--batch-size", batch_size), ("--lr", lr), ("--intermediate", intermediate)):
        if value is not None and not value > 0:
            from ..errors import SpecCascadeError

            raise SpecCascadeError(f"{name} must be > 0, got {value}")
    if ema_decay is not None and not 0.0 < ema_decay < 1.0:
        from ..errors import SpecCascadeError

        raise SpecCascadeError(f"--ema-decay must be in (0, 1), e.g. 0.998, got {ema_decay}")
    for name, value in (("--dropout", dropout), ("--label-smoothing", label_smoothing)):
        if value is not None and not 0.0 <= value < 1.0:
            from ..errors import SpecCascadeError

            raise SpecCascadeError(f"{name} must be in [0, 1), e.g. 0.1, got {value}")
    recipe = replace(recipe, batch_size=recipe.batch_size if batch_size is None else int(batch_size),
                     lr=recipe.lr if lr is None else float(lr),
                     ema_decay=recipe.ema_decay if ema_decay is None else float(ema_decay),
                     dropout=recipe.dropout if dropout is None else float(dropout),
                     label_smoothing=recipe.label_smoothing if label_smoothing is None else float(label_smoothing),
                     shape=recipe.shape if intermediate is None else with_intermediate(recipe.shape, int(intermediate)))
    layout = ARCHS[recipe.arch]
    if compile and recipe.arch != "llama":
        from ..errors import SpecCascadeError

        raise SpecCascadeError(f"--compile compiles a decoder-only model's layers (--arch llama); preset {preset!r} "
                               f"is a {recipe.arch}: train it without --compile")
    if distill_weight is None:
        distill_weight = default_distill_weight(recipe, teacher is not None)
    if teacher is None and distill_weight:
        from ..errors import SpecCascadeError

        raise SpecCascadeError("a distillation weight needs a teacher: give --teacher (a trained verifier)")
    if not 0.0 <= float(distill_weight) <= 1.0:
        from ..errors import SpecCascadeError

        raise SpecCascadeError(f"--distill-weight must be in [0, 1], got {distill_weight}")
    epochs = recipe.epochs if epochs is None else epochs
    max_minutes = recipe.max_minutes if max_minutes is None else max_minutes
    if sources is not None and train_file is not None:
        from ..errors import SpecCascadeError

        raise SpecCascadeError("--sources picks the shipped training splits; --train-file replaces them: give one")
    sources = check_sources(recipe.sources if sources is None else sources)
    dev = torch.device(device)
    rank, local, n_ranks = world()
    if features and n_ranks > 1:
        from ..errors import SpecCascadeError

        raise SpecCascadeError("--features trains on one process (the feature drafter's step is not data-parallel "
                               "yet): run it without torchrun")
    if n_ranks > 1:
        import torch.distributed as dist

        from ..distributed import init_tp

        init_tp(device)   # nccl on CUDA (this rank's GPU), gloo on a CPU
        if dev.type == "cuda":
            dev = torch.device("cuda", local)
    lead = rank == 0   # evaluates, saves, logs
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = ensure_tokenizer(tokenizer_dir)
    if train_file is not None:
        from .distill import read_pairs

        train_data = encode_pairs(tokenizer, read_pairs(train_file))
    else:
        train_data = encode_pairs(tokenizer, [p for src in sources for p in load_split(SOURCES[src])])
    val_data = encode_pairs(tokenizer, load_split("validation")[:validation_pairs])
    source = load_init_source(init_from) if init_from is not None else None
    like = {} if source is None or recipe.arch != "llama" else {"like": source.config}
    model = layout.build(recipe.shape, len(tokenizer), recipe.attention_dropout, recipe.dropout, **like)
    if source is not None:
        copy_first_layers(model, source)
        del source
    model = model.to(dev)
    teacher_model = load_teacher(teacher, len(tokenizer), dev) if teacher is not None else None
    if features:
        model = as_feature_drafter(model, teacher_model, recipe.dropout)
    states_of = teacher_model if features else None   # evaluate_loss feeds a feature drafter its teacher's states
    net = model   # what the training steps call: the model, or its DistributedDataParallel wrapper
    if n_ranks > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local] if dev.type == "cuda" else None)
        torch.manual_seed(seed + 1000 * rank)   # each rank its own dropout masks
    n_params = sum(p.numel() for p in model.parameters())
    averaged = None   # the moving average of the weights (rank 0 evaluates and saves it)
    if recipe.ema_decay is not None and lead:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(recipe.ema_decay), use_buffers=True)
    if compile:   # (after the average's copy, which stays eager)
        compile_layers(model)
        if teacher_model is not None:
            compile_layers(teacher_model)
    opt = make_optimizer(model, recipe)
    steps_per_epoch = math.ceil(len(train_data) / recipe.batch_size)
    total_steps = max(1, round(epochs * steps_per_epoch))
    warmup = min(200, total_steps // 10 + 1)
    plan = {"total": total_steps}  # lowered once the throughput is known (the time budget)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / plan["total"]))))
    eval_every = max(1, steps_per_epoch // 2) if epochs <= 12 else steps_per_epoch
    try:
        if lead:
            out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from ..errors import SpecCascadeError

        raise SpecCascadeError(f"cannot create the output folder {str(out)!r}: {e.strerror or e}") from None
    log = {"preset": preset, "role": role, "arch": recipe.arch, "params": n_params, "recipe": asdict(recipe),
           "epochs": epochs, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "seed": seed,
           "train_pairs": len(train_data), "validation_pairs": len(val_data), "evals": [],
           "train_file": None if train_file is None else str(train_file),
           "sources": None if train_file is not None else list(sources),
           "teacher": None if teacher is None else str(teacher), "distill_weight": distill_weight,
           "init_from": None if init_from is None else str(init_from),
           "features": features, "feature_regression": regression if features else None,
           "feature_unroll": feature_unroll if features else None,
           "planned_steps": total_steps, "planned_epochs": epochs, "ranks": n_ranks, "compiled": compile,
           "skipped_steps": 0}   # steps skipped for a non-finite gradient (optimizer_step); set at the end
    best, start, step = math.inf, time.perf_counter(), 0
    bar = tqdm(total=total_steps, desc=f"train {preset}/{role}", disable=not progress or not lead)
    model.train()
    lengths = [len(ids) for ids, _ in train_data]
    batches: list[list[int]] = []
    probe = PROBE_STEPS
    eval_seconds = 0.0   # time spent evaluating and saving checkpoints (not training)
    # steps skipped for a non-finite gradient, in all and in a row (device tensors: no sync a step)
    skipped = torch.zeros((), dtype=torch.long, device=dev)
    nonfinite_run = torch.zeros((), dtype=torch.long, device=dev)
    rank_tokens = torch.zeros((), dtype=torch.long, device=dev)   # scored tokens this rank trained on
    while step < plan["total"]:
        if step > 0 and (n_ranks == 1 or step % 8 == 0) and \
                _agree(lead and (time.perf_counter() - start) >= max_minutes * 60, n_ranks, dev):
            break   # the time budget (rank 0's clock, asked every 8 steps across ranks); at least one step runs
        if not batches:
            batches = length_batches(lengths, recipe.batch_size, rng)
        batch = batches.pop()
        if len(batch) < n_ranks:
            continue   # (data-parallel: a remnant batch too small to share; every rank skips it)
        inputs, targets = layout.collate([train_data[i] for i in batch[rank::n_ranks]], dev,
                                         SHAPE_MULTIPLE if dev.type == "cuda" else 1)
        if features:
            loss, reg = feature_loss(net, inputs, targets, *teacher_view(teacher_model, inputs, dev), dev,
                                     recipe.label_smoothing, distill_weight, regression, feature_unroll)
        else:
            loss = step_loss(net, inputs, targets, dev, recipe.label_smoothing, teacher_model, distill_weight)
        scored = (targets != -100).sum()
        rank_tokens += scored
        if n_ranks > 1:   # this rank's mean times its share of the batch's scored tokens (times N: DDP averages)
            total = scored.float().clone()
            dist.all_reduce(total)
            loss = loss * (n_ranks * scored / total)
        bad = ~optimizer_step(loss, model, opt, sched)
        if averaged is not None:
            averaged.update_parameters(model)
        skipped += bad
        nonfinite_run = (nonfinite_run + 1) * bad
        step += 1
        bar.update(1)
        if step % NONFINITE_CHECK_EVERY == 0 and int(nonfinite_run) >= MAX_NONFINITE_STEPS:
            log["diverged"] = (f"the loss or its gradient was not finite for {int(nonfinite_run)} steps in a row "
                               f"(up to step {step}): training stopped, and the skipped steps left the weights as "
                               f"they were; the checkpoint is the best one evaluated (else those weights). "
                               f"A lower --lr may help")
            bar.write(log["diverged"])
            break
        if step == probe[0]:
            probe_start, probe_evals = time.perf_counter(), eval_seconds
        elif step == probe[1]:
            # the steps that fit the rest of the budget at the window's rate, with the evaluations
            # (at their measured cost) they bring, and a 5% margin
            rate = (probe[1] - probe[0]) / max(time.perf_counter() - probe_start - (eval_seconds - probe_evals), 1e-9)
            per_eval = eval_seconds / len(log["evals"]) if log["evals"] else 0.0
            fit, every = fit_in_budget(step, rate, max_minutes * 60 - (time.perf_counter() - start), per_eval,
                                       eval_every)
            if n_ranks > 1:   # rank 0's plan for every rank
                agreed = [fit, every]
                dist.broadcast_object_list(agreed, src=0)
                fit, every = agreed
            if fit < plan["total"]:
                plan["total"] = fit
                eval_every = every
                log["planned_steps"] = fit
                log["planned_epochs"] = fit / steps_per_epoch
                log["plan_note"] = (f"the time budget ({max_minutes:g} min at {rate:.1f} steps/s) fits {fit} of "
                                    f"{total_steps} steps; the schedule ends there (--epochs "
                                    f"{fit / steps_per_epoch!r} reproduces it)")
        if (step % eval_every == 0 or step == plan["total"]) and not lead:
            dist.barrier()   # while rank 0 evaluates and saves
        elif step % eval_every == 0 or step == plan["total"]:
            eval_start = time.perf_counter()
            val = evaluate_loss(model, val_data, dev, collate_fn=layout.collate, teacher=states_of)
            log["skipped_steps"] = int(skipped)
            log["evals"].append({"step": step, "epoch": step / steps_per_epoch, "train_loss": loss.item(),
                                 "val_loss": val, "seconds": time.perf_counter() - start})
            if features:
                log["evals"][-1]["train_regression"] = reg.item()
            chosen, weights = model, "trained"
            if averaged is not None:
                val_ema = evaluate_loss(averaged.module, val_data, dev, collate_fn=layout.collate, teacher=states_of)
                log["evals"][-1]["val_loss_ema"] = val_ema
                if val_ema < val:
                    chosen, weights, val = averaged.module, "ema", val_ema
            bar.set_postfix(train=f"{loss.item():.3f}", val=f"{val:.3f}")
            if val < best:
                best = val
                save_checkpoint(chosen, tokenizer, out)
                log["best"] = log["evals"][-1] | {"weights": weights, "val_loss": val}
            (out / "training.json").write_text(json.dumps(log, indent=2))
            eval_seconds += time.perf_counter() - eval_start
            if n_ranks > 1:
                dist.barrier()
    bar.close()
    log["skipped_steps"] = int(skipped)
    log["steps"] = step
    log["train_seconds"] = time.perf_counter() - start
    log["rank_tokens"] = int(rank_tokens)
    if not lead:
        return log
    if "best" not in log:  # the budget ended before the first evaluation: save what there is (unevaluated)
        save_checkpoint(model, tokenizer, out)
        log["best"] = {"step": step, "epoch": step / steps_per_epoch, "train_loss": loss.item() if step else None,
                       "val_loss": None, "seconds": time.perf_counter() - start,
                       "note": "the time budget ended before the first evaluation: the last weights, not evaluated"}
    if bleu_pairs and features:   # validation_bleu decodes with the model alone
        log["validation_bleu"] = {"skipped": "a feature drafter reads its verifier's states and cannot decode "
                                             "alone; measure it in the speculative loop (speccascade sweep "
                                             "--drafter ... --verifier ...)"}
        bar.write(f"validation BLEU skipped: {log['validation_bleu']['skipped']}")
    elif bleu_pairs:
        log["validation_bleu"] = validation_bleu(out, dev, bleu_pairs)
        bleu = log["validation_bleu"]["bleu"]
        bar.write(f"validation BLEU (greedy, {log['validation_bleu']['pairs']} pairs, best checkpoint): {bleu:.2f}")
    (out / "training.json").write_text(json.dumps(log, indent=2))
    return log


def _agree(flag: bool, n_ranks: int, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (data-parallel training: all stop at the same step)."""
    if n_ranks == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def validation_bleu(checkpoint: Path, device: torch.device, n_pairs: int = 200) -> dict:
    """Greedy BLEU / chrF of the saved (best) checkpoint on the first ``n_pairs`` validation pairs."""
    from ..eval.tasks import score_pairs, translate_pairs
    from ..models.loading import load_causal_lm
    from .tokenizer import load_tokenizer

    model = load_causal_lm(checkpoint, device=device, dtype=torch.float32)  # a causal LM or an encoder-decoder
    pairs = load_split("validation")[:n_pairs]
    hyps, _ = translate_pairs(model, model, load_tokenizer(checkpoint), pairs, method="verifier_only", temperature=0.0,
                              batch_size=100)
    return score_pairs(hyps, pairs) | {"pairs": len(pairs)}


def save_random_pair(preset: str, out: Path) -> tuple[Path, Path]:
    """Random weights (seed 0) of ``preset``'s drafter and verifier shapes with the embedded tokenizer,
    saved as ``out/drafter`` and ``out/verifier`` (compile warm-ups and cost probes of a pair's shapes)."""
    from ..models.loading import TOKENIZER_DIR
    from .tokenizer import load_tokenizer

    tok = load_tokenizer(TOKENIZER_DIR)
    for role in ("drafter", "verifier"):
        torch.manual_seed(0)
        save_checkpoint(build_model(PRESETS[preset][role].shape, len(tok)), tok, out / role)
    return out / "drafter", out / "verifier"


def save_checkpoint(model, tokenizer, out: Path) -> None:
    """Save an fp16 copy (the model being trained is left untouched)."""
    import copy

    half = copy.deepcopy(model).to("cpu", torch.float16)
    half.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
