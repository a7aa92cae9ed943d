"""Bad input gets a clear error that names the problem."""

import pytest
import torch

import speccascade as sc
from speccascade import NonFiniteLogitsError, SpecCascadeError

from tiny_models import tiny_llama, tiny_pair


@pytest.fixture(scope="module")
def pair():
    return tiny_pair(0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="nope"), "unknown method 'nope'"),
    (dict(method="chow", alpha=1.5), r"alpha=1.5 is outside the range of method 'chow'"),
    (dict(method="lossy", alpha=1.0), "outside the range of method 'lossy'"),
    (dict(method="token_v3", alpha=-0.1), "outside the range"),
    (dict(method="bild_star", alpha=-1), "outside the range"),
    (dict(method="diff", alpha=float("nan")), "NaN"),
    (dict(method="sd", alpha=0.3), "takes no alpha"),
    (dict(method="bild", alpha_f=2.0), "alpha_f=2.0 is outside"),
    (dict(method="opt", gamma=0), "gamma"),
    (dict(method="opt", gamma=2.5), "gamma"),
    (dict(method="opt", max_new_tokens=0), "max_new_tokens"),
    (dict(method="opt", temperature=-1), "temperature"),
    (dict(method="opt", top_p=0.0), "top_p"),
    (dict(method="opt", top_k=-3), "top_k"),
    (dict(method="chow", length_normalized=True), "has no option"),
])
def test_bad_arguments(pair, kwargs, match):
    with pytest.raises(SpecCascadeError, match=match):
        sc.generate(*pair, [[5, 6, 7]], **kwargs)


def test_empty_prompt(pair):
    for bad in ([[]], [], torch.zeros(1, 0, dtype=torch.long), [[5, 6], []]):
        with pytest.raises(SpecCascadeError, match="empty prompt"):
            sc.generate(*pair, bad)


def test_right_padding_rejected(pair):
    with pytest.raises(SpecCascadeError, match="left-padded"):
        sc.generate(*pair, torch.tensor([[5, 6, 0]]), attention_mask=torch.tensor([[1, 1, 0]]))


def test_mismatched_vocabularies():
    d, v = tiny_llama(0, vocab=48), tiny_llama(1, vocab=50)
    with pytest.raises(SpecCascadeError, match="vocabularies differ"):
        sc.generate(d, v, [[5, 6]])


def test_token_outside_vocabulary(pair):
    with pytest.raises(SpecCascadeError, match="outside the vocabulary"):
        sc.generate(*pair, [[5, 600]])


def test_prompt_too_long(pair):
    with pytest.raises(SpecCascadeError, match="prompt too long for the drafter"):
        sc.generate(*pair, [[5] * 120], max_new_tokens=10)


def test_non_finite_logits_named():
    d, v = tiny_pair(0)
    with torch.no_grad():
        v.lm_head.weight[3, 0] = float("nan")
    with pytest.raises(NonFiniteLogitsError, match="verifier"):
        sc.generate(d, v, [[5, 6]], method="opt", max_new_tokens=64)
    with pytest.raises(NonFiniteLogitsError, match="verifier"):
        sc.generate(d, v, [[5, 6]], method="verifier_only", max_new_tokens=64)


def test_not_a_model():
    with pytest.raises(SpecCascadeError, match="causal LM"):
        sc.generate(object(), object(), [[1, 2]])
