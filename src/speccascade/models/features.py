"""A drafter that reads the verifier's features (EAGLE-style), and the backend that feeds it.

A 1-layer drafter that sees only tokens must find, in its one attention layer, where in the prompt
the continuation stands; the verifier has already worked that out, and its last hidden state says
so. :class:`LlamaFeatureDrafter` is a Llama causal LM whose input at position i is not the token's
embedding alone but ``W [embed(x_i); s(f_{i-1})]``: the token x_i beside ``f_{i-1}``, the
verifier's last hidden state (after its final norm: what its head reads) at the position before,
which is the state from which the verifier predicted x_i (Li et al., 2024, EAGLE). ``s`` scales
each feature vector to ``config.feature_scale`` RMS (the embeddings' scale: a normed state is ~30x
larger). ``W`` (``feature_mix``) starts as [I, 0] when the drafter is made from a token-only one,
so it starts as that drafter.

Where the loop has no verifier state yet (a block's later drafts: the verifier has not seen the
earlier drafts), the drafter reads its own last hidden state at the position before instead
(hence ``feature_size == hidden_size``). The speculative loop (:mod:`speccascade.loop`) keeps the
drafter's cache on true features only: each block's first drafter call re-feeds the last block's
accepted drafts and its new token with the verifier's states from its scoring call, and everything
the drafter fed after that call is dropped at the block's end. The drafter's q at a position is then
a function of the prefix and of where the block started; Algorithm 4 uses it as it is, so every
method's law is Algorithm 4's with that q (``sd`` stays lossless).

:class:`FeatureHFBackend` (dynamic) and :class:`.fused.FusedFeatureBackend` (fused: the features are
mixed in the compiled prologue, and the block stays one capturable program) run such a drafter: their
``reset`` and ``extend_features`` take the features of the fed positions and return the drafter's
own states beside the logits. The verifier's states come from ``extend_hidden`` / ``reset_hidden``
(:class:`.dynamic.HFBackend`, :class:`.fused.FusedLlamaBackend`; ``gives_states``). Measured offline
on the deep pair's verifier (``benchmarks/feature_drafter.py``, run 13): acceptance at T = 1 0.76
against 0.56 for the same drafter without features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from ..errors import SpecCascadeError
from .dynamic import HFBackend


class LlamaFeatureDrafter(LlamaForCausalLM):
    """A Llama causal LM reading the verifier's feature beside each token (module docstring).
    ``config.feature_size``: the verifier's hidden size (= ``hidden_size``); ``config.feature_scale``:
    the RMS each feature vector is scaled to."""

    def __init__(self, config):
        super().__init__(config)
        if getattr(config, "feature_size", None) != config.hidden_size:
            raise SpecCascadeError(f"a feature drafter reads the verifier's states and, for a block's later drafts, "
                                   f"its own: config.feature_size ({getattr(config, 'feature_size', None)}) must "
                                   f"equal its hidden_size ({config.hidden_size})")
        H = config.hidden_size
        self.feature_mix = torch.nn.Linear(2 * H, H, bias=False)
        with torch.no_grad():
            self.feature_mix.weight.zero_()
            self.feature_mix.weight[:, :H].copy_(torch.eye(H))

    @classmethod
    def from_drafter(cls, drafter: LlamaForCausalLM) -> "LlamaFeatureDrafter":
        """A feature drafter that starts as ``drafter`` (its weights; the feature map [I, 0]); the
        features' scale is its embeddings' RMS."""
        cfg = drafter.config.__class__(**drafter.config.to_dict())
        cfg.feature_size = cfg.hidden_size
        cfg.feature_scale = float(drafter.get_input_embeddings().weight.detach().float().pow(2).mean().sqrt())
        cfg.architectures = [cls.__name__]
        model = cls(cfg).to(device=drafter.device, dtype=drafter.dtype)
        missing, unexpected = model.load_state_dict(drafter.state_dict(), strict=False)
        if unexpected or set(missing) != {"feature_mix.weight"}:
            raise SpecCascadeError(f"cannot start a feature drafter from {type(drafter).__name__}: "
                                   f"missing {missing}, unexpected {unexpected}")
        return model

    def feature_embeddings(self, input_ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``W [embed(x_i); s(f_{i-1})]`` for ``input_ids  # [B, k]`` and ``features  # [B, k, H]``
        (``features[:, i]``: the state of the position before token i; zeros where there is none).  # [B, k, H]"""
        return mix_features(self.get_input_embeddings()(input_ids), features, self.config.feature_scale,
                            self.feature_mix.weight)


def mix_features(emb: torch.Tensor, features: torch.Tensor, scale: float, weight: torch.Tensor) -> torch.Tensor:
    """``W [emb; s(f)]``: each feature vector scaled to RMS ``scale`` (zeros stay zeros), beside the
    token's embedding, through ``weight`` (W).  # [..., H]"""
    f = features.to(emb.dtype)
    f = f * (scale / f.float().pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()).to(emb.dtype)
    return F.linear(torch.cat([emb, f], -1), weight)


def is_feature_drafter(model) -> bool:
    """True for a :class:`LlamaFeatureDrafter` or a backend holding one."""
    return bool(getattr(model, "takes_features", False)) or isinstance(model, LlamaFeatureDrafter)


class FeatureHFBackend(HFBackend):
    """The dynamic backend for a :class:`LlamaFeatureDrafter`: every feed carries the features of its
    positions, and each call keeps the drafter's own last hidden states."""

    takes_features = True

    def __init__(self, model: LlamaFeatureDrafter, name: str = "drafter"):
        if not isinstance(model, LlamaFeatureDrafter):
            raise SpecCascadeError(f"the {name} is not a feature drafter ({type(model).__name__})")
        super().__init__(model, name)
        self.feature_size = model.config.feature_size
        self._features = None
        self._keep_hidden = True

    @torch.no_grad()
    def reset(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              features: torch.Tensor | None = None) -> None:
        """As :meth:`HFBackend.reset`; ``features  # [B, L - 1, H]``: those of the cached prompt tokens
        (:func:`prompt_features`)."""
        if features is None and input_ids.shape[1] > 1:
            raise SpecCascadeError(f"the {self.name} is a feature drafter: its prompt needs the verifier's states "
                                   f"(the speculative loop passes them; methods that run the drafter alone cannot)")
        self._features = features
        super().reset(input_ids, attention_mask)

    @torch.no_grad()
    def extend_features(self, tokens: torch.Tensor, features: torch.Tensor, lengths: torch.Tensor | None = None):
        """Feed ``tokens  # [B, k]`` with their ``features  # [B, k, H]``; returns the logits
        # [B, k, V]  and the drafter's own last hidden states  # [B, k, H]  (float32)."""
        self._features = features
        logits = self.extend(tokens, lengths)
        return logits, self.hidden.float()

    def _inputs(self, tokens: torch.Tensor) -> dict:
        if self._features is None:
            raise SpecCascadeError(f"the {self.name} is a feature drafter: it is fed with the verifier's states "
                                   f"(extend_features), not tokens alone")
        features, self._features = self._features, None
        return {"inputs_embeds": self.model.feature_embeddings(tokens, features.to(self.device))}


def prompt_features(states: torch.Tensor | None, attention_mask: torch.Tensor):
    """From the verifier's states of the cached prompt tokens (``states  # [B, L - 1, H]``, left
    padding; None for one-token prompts), the drafter's features for those tokens (each the state of
    the position before, zeros at a row's first real token)  # [B, L - 1, H]  and the pending (last)
    token's  # [B, H]."""
    if states is None:
        return None, None
    valid = attention_mask[:, :-1].to(states.device).bool()                       # [B, L - 1]
    before = F.pad(states[:, :-1], (0, 0, 1, 0)) * F.pad(valid[:, :-1], (1, 0)).unsqueeze(-1)
    return before, states[:, -1] * valid[:, -1:].to(states.dtype)


def timing_feed(backend, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """One feed whose cost alone matters (warm-ups, call timings): ``backend.extend``, or for a feature
    drafter ``extend_features`` with zero features (a call of the same shapes).  # -> logits"""
    if not getattr(backend, "takes_features", False):
        return backend.extend(tokens, lengths)
    zeros = torch.zeros(*tokens.shape, backend.feature_size, device=backend.device)
    return backend.extend_features(tokens, zeros, lengths)[0]


def timing_reset(backend, input_ids: torch.Tensor, attention_mask: torch.Tensor, states: bool = False) -> None:
    """``backend.reset`` for a warm-up or a timing: a feature drafter's prompt with zero features;
    with ``states``, a verifier's pre-fill for a feature drafter (``reset_hidden``)."""
    if states:
        backend.reset_hidden(input_ids, attention_mask)
        return
    if not getattr(backend, "takes_features", False) or input_ids.shape[1] < 2:
        return backend.reset(input_ids, attention_mask)
    B, L = input_ids.shape
    backend.reset(input_ids, attention_mask, features=torch.zeros(B, L - 1, backend.feature_size,
                                                                 device=backend.device))
