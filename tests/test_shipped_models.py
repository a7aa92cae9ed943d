"""The embedded tiny pair loads, shares one vocabulary, stays within its size budget, and translates."""

import pytest

import speccascade as sc
from speccascade.cli import main
from speccascade.data.prompt import EOS, decode, encode_prompt
from speccascade.models.loading import TOKENIZER_DIR, embedded_pair_dirs, load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def pair():
    d_dir, v_dir = embedded_pair_dirs("tiny")
    return load_causal_lm(d_dir), load_causal_lm(v_dir), load_tokenizer(TOKENIZER_DIR)


def test_size_budget_and_shapes(pair):
    d_dir, v_dir = embedded_pair_dirs("tiny")
    size = sum(f.stat().st_size for f in list(d_dir.iterdir()) + list(v_dir.iterdir()))
    assert size <= 40 * 2**20
    drafter, verifier, tok = pair
    assert drafter.config.vocab_size == verifier.config.vocab_size == len(tok)
    assert sum(p.numel() for p in verifier.parameters()) > 20 * sum(p.numel() for p in drafter.parameters())


def test_translates_and_sd_greedy_equals_verifier(pair):
    drafter, verifier, tok = pair
    prompts = [encode_prompt(tok, s) for s in ("And God said, Let there be light: and there was light.",
                                               "In the beginning God created the heaven and the earth.")]
    ref = sc.generate(drafter, verifier, prompts, method="verifier_only", temperature=0, eos_token_id=EOS,
                      max_new_tokens=40)
    out = sc.generate(drafter, verifier, prompts, method="sd", temperature=0, eos_token_id=EOS, max_new_tokens=40)
    assert out.tokens == ref.tokens
    text = decode(tok, ref.tokens[0])
    assert "Dios" in text and "luz" in text


def test_cli_generate_and_methods(capsys):
    assert main(["generate", "And God said, Let there be light", "--quiet", "--threads", "1", "--json"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "token_v3" and out["text"] and out["stats"]["emitted"] == len(out["tokens"])
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in sc.METHODS)
    assert main(["generate", "x", "--method", "chow", "--alpha", "3", "--quiet"]) == 2
    assert "outside the range" in capsys.readouterr().err
    # the static-cache backend gives the same greedy translation
    assert main(["generate", "And God said, Let there be light", "--quiet", "--threads", "1", "--json",
                 "--backend", "static"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == out["tokens"]


def test_cli_with_explicit_model_paths_raw_prompt(capsys):
    import json

    d_dir, v_dir = embedded_pair_dirs("tiny")
    code = main(["generate", "In the beginning", "--drafter", str(d_dir), "--verifier", str(v_dir), "--format", "raw",
                 "--tokenizer", str(TOKENIZER_DIR),
                 "--method", "opt", "--alpha", "0.3", "--temperature", "1", "--max-new-tokens", "7",
                 "--quiet", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "opt" and out["alpha"] == 0.3 and len(out["tokens"]) <= 7
    assert main(["generate", "x", "--drafter", str(d_dir), "--quiet"]) == 2
    assert "both --drafter and --verifier" in capsys.readouterr().err


def test_the_trained_drafter_foresees_some_ends_so_no_block_runs_past_them(pair, monkeypatch):
    """With the flags read one block late (as on a GPU), a block in which the drafter gives EOS at
    least loop.NEAR_END_EOS_PROB makes the host wait for the next block's flags: on the shipped pair
    some translations end without a block past the end (the drafter saw it coming; 128 new tokens
    is far away), some with one, and every output is the unlagged run's."""
    from speccascade.eval.tasks import get_task
    from speccascade.loop import StepSync

    drafter, verifier, tok = pair
    task = get_task()
    past = []
    for ex in task.examples(12):
        ids = task.encode(tok, ex.input)
        runs = []
        for lag in (False, True):
            monkeypatch.setattr(StepSync, "lagged", lag)
            out = sc.generate(drafter, verifier, [ids], method="sd", gamma=5, temperature=0, eos_token_id=EOS,
                              max_new_tokens=128)
            runs.append((out.tokens, out.stats.blocks, out.stats.steps_past_end))
        (tok0, blocks0, past0), (tok1, blocks1, past1) = runs
        assert tok1 == tok0 and blocks1 == blocks0 and past0 == 0 and tok0[0][-1] == EOS
        past.append(past1)
    assert 0 in past and 1 in past and set(past) == {0, 1}
