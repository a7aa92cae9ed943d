"""Issue 16: `speccascade train --arch t5` trains an encoder-decoder pair on the Bible pairs.

CPU, small: the t5_tiny preset on 40 training and 16 validation pairs (the splits are replaced for
the test), a handful of steps. The checkpoints load as encoder-decoders, and greedy speculative
decoding with them reproduces the verifier's own ``generate``.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from tiny_seq2seq import tiny_seq2seq

import speccascade as sc
import speccascade.train.trainer as trainer
from speccascade.cli import main
from speccascade.data.bible import load_split
from speccascade.data.prompt import EOS, PAD, encode_prompt, encode_target
from speccascade.errors import SpecCascadeError
from speccascade.eval.agreement import _scored_probs, teacher_forced_agreement
from speccascade.models.loading import TOKENIZER_DIR, load_causal_lm, load_tokenizer

from tiny_models import tiny_llama, tiny_pair

SPLITS = {"train": load_split("train")[:40], "validation": load_split("validation")[:16]}


@pytest.fixture()
def small_splits(monkeypatch):
    monkeypatch.setattr(trainer, "load_split", lambda name: SPLITS[name])


@pytest.fixture(scope="module")
def t5_pair(tmp_path_factory):
    """A t5_tiny pair trained with the command line for 4 steps each (once for the module)."""
    out = tmp_path_factory.mktemp("t5") / "pair"
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.setattr(trainer, "load_split", lambda name: SPLITS[name])
        assert main(["train", "--arch", "t5", "--preset", "t5_tiny", "--out", str(out), "--epochs", "4"]) == 0
    lines = [json.loads(x) for x in stdout.getvalue().splitlines() if x.startswith("{")]
    assert [(x["preset"], x["arch"], x["role"]) for x in lines] == [("t5_tiny", "t5", "drafter"),
                                                                    ("t5_tiny", "t5", "verifier")]
    return out


def test_train_t5_writes_encoder_decoder_checkpoints(t5_pair):
    for role, layers in (("drafter", 1), ("verifier", 2)):
        log = json.loads((t5_pair / role / "training.json").read_text())
        assert log["arch"] == "t5" and log["steps"] == 4 and log["train_pairs"] == 40
        assert len(log["evals"]) == 4 and log["best"]["val_loss"] == min(e["val_loss"] for e in log["evals"])
        assert log["evals"][-1]["val_loss"] < log["evals"][0]["val_loss"]  # it learns
        assert set(log["validation_bleu"]) >= {"bleu", "chrf"} and log["validation_bleu"]["pairs"] == 16
        model = load_causal_lm(t5_pair / role, role=role)
        cfg = model.config
        assert type(model).__name__ == "T5ForConditionalGeneration" and cfg.is_encoder_decoder
        assert (cfg.num_layers, cfg.num_decoder_layers, cfg.feed_forward_proj) == (layers, layers, "gated-gelu")
        assert (cfg.pad_token_id, cfg.decoder_start_token_id, cfg.eos_token_id) == (PAD, PAD, EOS)
        assert model.generation_config.decoder_start_token_id == PAD
        assert len(load_tokenizer(t5_pair / role)) == 8000  # saved with the tokenizer
        saved = json.loads((t5_pair / role / "config.json").read_text())
        assert saved["dtype"] == "float16"


def test_greedy_sd_with_the_trained_pair_equals_the_verifiers_generate(t5_pair):
    drafter = load_causal_lm(t5_pair / "drafter", role="drafter")
    verifier = load_causal_lm(t5_pair / "verifier", role="verifier")
    tok = load_tokenizer(TOKENIZER_DIR)
    prompts = [encode_prompt(tok, p["en"]) for p in load_split("test")[:3]]
    n = 12
    ref = []
    for src in prompts:
        out = verifier.generate(torch.tensor([src]), do_sample=False, num_beams=1, max_new_tokens=n,
                                min_new_tokens=n, eos_token_id=None)
        assert out[0, 0].item() == PAD  # the decoder start
        ref.append(out[0, 1:].tolist())
    for gamma in (1, 3):
        got = sc.generate(drafter, verifier, prompts, method="sd", gamma=gamma, temperature=0.0,
                          max_new_tokens=n, eos_token_id=[])
        assert got.tokens == ref
        assert got.stats.drafted > 0


def test_teacher_forced_agreement_of_an_encoder_decoder_pair(t5_pair):
    drafter = load_causal_lm(t5_pair / "drafter", role="drafter")
    verifier = load_causal_lm(t5_pair / "verifier", role="verifier")
    tok = load_tokenizer(TOKENIZER_DIR)
    seqs = []
    for p in load_split("test")[:5]:
        src = encode_prompt(tok, p["en"])
        seqs.append((src + encode_target(tok, p["es"]), len(src)))
    same = teacher_forced_agreement(verifier, verifier, seqs)
    assert same["sd_acceptance_T1"] == pytest.approx(1.0) and same["top1_agreement"] == 1.0
    assert same["positions"] == sum(len(s) - start for s, start in seqs)  # every Spanish token and </s>
    a, b = teacher_forced_agreement(drafter, verifier, seqs), teacher_forced_agreement(drafter, verifier, seqs, 1)
    assert 0 < a["sd_acceptance_T1"] < 1 and a["sd_acceptance_T1"] == pytest.approx(b["sd_acceptance_T1"], abs=1e-5)
    # the first scored position: the verifier's distribution after the decoder start token
    src, start = seqs[0]
    logits = verifier(input_ids=torch.tensor([src[:start]]), decoder_input_ids=torch.tensor([[PAD]])).logits[0, 0]
    assert torch.allclose(_scored_probs(verifier, seqs[:1], "cpu", True)[0], torch.softmax(logits.float(), -1))


def test_seq2seq_batches_put_the_prompt_in_the_encoder():
    seqs = [([1, 10, 11, 3, 20, 21, 2], 4), ([1, 12, 3, 22, 2], 3)]
    inputs, targets = trainer.collate_seq2seq(seqs, "cpu")
    assert inputs["input_ids"].tolist() == [[1, 10, 11, 3], [1, 12, 3, 0]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert inputs["decoder_input_ids"].tolist() == [[0, 20, 21], [0, 22, 0]]
    assert targets.tolist() == [[20, 21, 2], [22, 2, -100]]
    # the decoder-only layout scores the same tokens, each from the position before it
    inputs, targets = trainer.collate(seqs, "cpu")
    assert targets.tolist() == [[-100, -100, -100, 20, 21, 2, -100], [-100, -100, 22, 2, -100, -100, -100]]


def test_training_is_deterministic_for_a_seed(t5_pair, small_splits, tmp_path):
    """The API with the command line's defaults (seed 0) writes the very weights the CLI wrote."""
    from safetensors.torch import load_file

    trainer.train("t5_tiny", "drafter", tmp_path / "again", TOKENIZER_DIR, epochs=4, progress=False, bleu_pairs=0)
    a, b = load_file(t5_pair / "drafter" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_presets_and_architectures():
    assert trainer.resolve_preset(None, None) == "tiny" and trainer.resolve_preset(None, "t5") == "t5"
    assert trainer.resolve_preset("t5_tiny", None) == "t5_tiny"
    assert {trainer.preset_arch(p) for p in ("tiny", "base", "deep")} == {"llama"}
    with pytest.raises(SpecCascadeError, match="unknown architecture 'gpt'; choose one of llama, t5"):
        trainer.check_train_args(None, "drafter", arch="gpt")
    with pytest.raises(SpecCascadeError, match="preset .base. is a llama preset, not t5; with --arch t5 use"):
        trainer.train("base", "drafter", "unused", TOKENIZER_DIR, arch="t5")
    # the GPU pair's shapes: a drafter of ~6M and a verifier of ~51M parameters
    for role, (low, high) in (("drafter", (5e6, 7e6)), ("verifier", (45e6, 55e6))):
        recipe = trainer.PRESETS["t5"][role]
        with torch.device("meta"):  # shapes only, no initialisation
            model = trainer.build_model(recipe.shape, 8000, recipe.attention_dropout, recipe.dropout)
        assert low < sum(p.numel() for p in model.parameters()) < high
        assert model.config.dropout_rate == 0.1 and recipe.label_smoothing == 0.1


def test_cli_arch_errors(tmp_path, capsys):
    assert main(["train", "--arch", "t5", "--preset", "base", "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["speccascade: error: preset 'base' is a llama preset, not t5; with --arch t5 use --preset t5 or "
                   "t5_tiny"]
    with pytest.raises(SystemExit) as e:
        main(["train", "--arch", "gpt2", "--out", str(tmp_path / "t")])
    assert e.value.code == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("speccascade: error:")]
    assert len(lines) == 1 and "argument --arch: invalid choice: 'gpt2'" in lines[0]
    assert "llama" in lines[0] and "t5" in lines[0]
    assert not (tmp_path / "t").exists()


def test_teacher_forced_agreement_of_a_decoder_only_pair_is_unchanged():
    """The decoder-only path: the logits at t - 1 score token t; two kinds of model are refused."""
    d, v = tiny_pair(0)
    seqs = [([5, 6, 7, 8, 9], 3), ([5, 6, 10], 1)]
    same = teacher_forced_agreement(v, v, seqs)
    assert same["sd_acceptance_T1"] == pytest.approx(1.0) and same["positions"] == 4
    logits = v(input_ids=torch.tensor([seqs[0][0]])).logits[0]
    assert torch.allclose(_scored_probs(v, seqs[:1], "cpu", False), torch.softmax(logits[2:4].float(), -1))
    assert teacher_forced_agreement(d, v, seqs)["sd_acceptance_T1"] == pytest.approx(
        teacher_forced_agreement(d, v, seqs, 1)["sd_acceptance_T1"], abs=1e-6)
    with pytest.raises(SpecCascadeError, match="two decoder-only or two encoder-decoder models"):
        teacher_forced_agreement(tiny_llama(0), tiny_seq2seq("t5"), seqs)


def test_rounded_batch_widths_change_no_t5_loss():
    """The GPU trainer rounds both widths of an encoder-decoder batch up (SHAPE_MULTIPLE): the extra
    encoder padding is masked and the extra decoder padding (causal, after the targets) is not
    scored, so the loss is the same; a scored padding position changes it (the check can fail)."""
    torch.manual_seed(0)
    model = trainer.build_t5(trainer.PRESETS["t5_tiny"]["verifier"].shape, 64).eval()
    seqs = [([1, 10, 11, 12, 3, 20, 21, 22, 2], 5), ([1, 12, 3, 22, 2], 3), ([1, 13, 14, 3, 23, 24, 25, 26, 2], 4)]
    cpu = torch.device("cpu")
    losses = []
    for multiple in (1, 16):
        inputs, targets = trainer.collate_seq2seq(seqs, cpu, multiple)
        assert inputs["input_ids"].shape[1] % multiple == 0 and inputs["decoder_input_ids"].shape[1] % multiple == 0
        with torch.no_grad():
            losses.append(float(trainer.token_loss(model, inputs, targets, cpu)))
    assert abs(losses[0] - losses[1]) < 1e-5, losses
    targets[1, -1] = 7
    with torch.no_grad():
        assert abs(float(trainer.token_loss(model, inputs, targets, cpu)) - losses[0]) > 1e-4
