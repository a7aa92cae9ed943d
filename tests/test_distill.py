"""Sequence-level distillation (train/distill.py): the verifier's own translations become a
drafter's training set; tiny scale, the shipped pair."""

import gzip
import json
import math
from pathlib import Path

import pytest
import torch

from speccascade.cli import main
from speccascade.errors import SpecCascadeError
from speccascade.models.loading import TOKENIZER_DIR, embedded_pair_dirs, load_causal_lm, load_tokenizer
from speccascade.train.distill import distill, read_pairs
from speccascade.train.trainer import train

SRC_ROOT = Path(__file__).resolve().parents[1]


def test_distill_writes_the_verifiers_own_translations(tmp_path):
    from speccascade.data.bible import load_split
    from speccascade.eval.tasks import translate_pairs

    _, v_dir = embedded_pair_dirs("tiny")
    verifier, tok = load_causal_lm(v_dir), load_tokenizer(TOKENIZER_DIR)
    out = tmp_path / "d.jsonl.gz"
    summary = distill(verifier, tok, out, temperatures=(0.0,), limit=5, batch_size=5, max_new_tokens=24,
                      with_references=True)
    rows = [json.loads(line) for line in gzip.open(out, "rt", encoding="utf-8")]
    pairs = load_split("train")[:5]
    greedy, _ = translate_pairs(verifier, verifier, tok, pairs, temperature=0.0, batch_size=5, max_new_tokens=24)
    assert [r["es"] for r in rows[:5]] == [p["es"] for p in pairs]          # the references first
    assert [r["es"] for r in rows[5:]] == [h for h in greedy if h.strip()]  # then the verifier's greedy output
    assert all(r["en"] == pairs[r["index"]]["en"] for r in rows)
    assert summary["rows"] == len(rows) and not (tmp_path / "d.jsonl.gz.partial").exists()


def test_a_repeated_temperature_gives_that_many_different_samples(tmp_path):
    from speccascade.data.bible import load_split
    from speccascade.eval.tasks import translate_pairs

    _, v_dir = embedded_pair_dirs("tiny")
    verifier, tok = load_causal_lm(v_dir), load_tokenizer(TOKENIZER_DIR)
    out = tmp_path / "d.jsonl"
    summary = distill(verifier, tok, out, temperatures=(1.0, 0.0, 1.0), limit=6, batch_size=6, max_new_tokens=16,
                      seed=3)
    rows = [json.loads(line) for line in open(out, encoding="utf-8")]
    by_seed = {}
    for r in rows:
        if r["temperature"] == 1.0:
            by_seed.setdefault(r["seed"], {})[r["index"]] = r["es"]
    assert sorted(by_seed) == [3, 4]                         # the second T = 1 pass drew with seed + 1
    pairs = load_split("train")[:6]
    for s_, hyps in by_seed.items():                         # each pass is translate_pairs with its seed
        ref, _ = translate_pairs(verifier, verifier, tok, pairs, temperature=1.0, batch_size=6, max_new_tokens=16,
                                 seed=s_)
        assert hyps == {i: h for i, h in enumerate(ref) if h.strip()}
    assert by_seed[3] != by_seed[4]                          # two different samples of the sources
    assert summary["temperatures"] == [1.0, 0.0, 1.0] and summary["rows"] == len(rows)


def test_drafter_trains_on_a_distilled_file(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"en": f"In the beginning {i}", "es": f"En el principio {i}"}) for i in range(7)))
    log = train("tiny", "drafter", tmp_path / "drafter", TOKENIZER_DIR, epochs=1.0, max_minutes=1.0, progress=False,
                bleu_pairs=0, train_file=f)
    assert log["train_pairs"] == 7 and log["train_file"] == str(f) and log["steps"] == 1
    assert load_causal_lm(tmp_path / "drafter").config.num_hidden_layers == 1


def test_bad_training_files_are_clear_errors(tmp_path):
    with pytest.raises(SpecCascadeError, match="does not exist"):
        read_pairs(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"en": "x"}) + "\n")
    with pytest.raises(SpecCascadeError, match="needs string fields 'en' and 'es'"):
        read_pairs(bad)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SpecCascadeError, match="has no rows"):
        read_pairs(tmp_path / "empty.jsonl")


def test_distill_cli(tmp_path, capsys):
    _, v_dir = embedded_pair_dirs("tiny")
    out = tmp_path / "d.jsonl"
    assert main(["distill", "--verifier", str(v_dir), "--tokenizer", str(TOKENIZER_DIR), "--out", str(out),
                 "--temperatures", "1", "--limit", "3", "--max-new-tokens", "12", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["sources"] == 3 and summary["rows"] == len(read_pairs(out))
    assert main(["distill", "--verifier", str(v_dir), "--out", str(out), "--limit", "0"]) == 2
    assert main(["distill", "--verifier", str(v_dir), "--out", str(out), "--sources", "kjv,nope"]) == 2
    assert "choose one or more of kjv, web" in capsys.readouterr().err


def test_distill_on_the_uncompiled_fused_backend_writes_the_dynamic_backends_greedy_rows(tmp_path, capsys):
    """``distill --backend fused_eager`` (the fused step without torch.compile, for the GPU's batches
    of 1,024 rows: CUDA graphs without compile time): a ragged batch's greedy translations, in
    float32, are row for row those of the default dynamic backend; the backend is the fused one,
    uncompiled, for a Llama-family verifier and for a T5."""
    from tiny_seq2seq import tiny_seq2seq_pair

    from speccascade.models import FusedLlamaBackend, FusedT5Backend, make_backend

    _, v_dir = embedded_pair_dirs("tiny")
    rows = {}
    for backend in ("dynamic", "fused_eager"):
        out = tmp_path / f"{backend}.jsonl"
        assert main(["distill", "--verifier", str(v_dir), "--tokenizer", str(TOKENIZER_DIR), "--out", str(out),
                     "--temperatures", "0", "--limit", "5", "--batch-size", "5", "--max-new-tokens", "16",
                     "--backend", backend, "--quiet"]) == 0
        rows[backend] = [r["es"] for r in read_pairs(out)]
    assert len(rows["dynamic"]) == 5 and rows["fused_eager"] == rows["dynamic"]
    be = make_backend(load_causal_lm(v_dir), "verifier", "fused_eager")
    assert isinstance(be, FusedLlamaBackend) and not be.compiled
    t5 = make_backend(tiny_seq2seq_pair("t5", noise=0.1)[1], "verifier", "fused_eager")
    assert isinstance(t5, FusedT5Backend) and not t5.compiled


def test_distill_translates_each_english_source_of_the_training_verses(tmp_path):
    """``sources=("kjv", "web")``: the first N verses of each source, the World English Bible's text
    of the same verses (ids ``@web``) translated by the verifier like the King James text."""
    from speccascade.data.bible import load_split
    from speccascade.eval.tasks import translate_pairs

    _, v_dir = embedded_pair_dirs("tiny")
    verifier, tok = load_causal_lm(v_dir), load_tokenizer(TOKENIZER_DIR)
    out = tmp_path / "d.jsonl"
    summary = distill(verifier, tok, out, temperatures=(0.0,), limit=3, batch_size=6, max_new_tokens=16,
                      sources=("kjv", "web"))
    rows = [json.loads(line) for line in open(out, encoding="utf-8")]
    kjv, web = load_split("train")[:3], load_split("train_web")[:3]
    assert [r["id"] for r in rows] == [p["id"] for p in kjv + web] and rows[3]["id"].endswith("@web")
    assert [r["en"] for r in rows] == [p["en"] for p in kjv + web] and rows[0]["en"] != rows[3]["en"]
    greedy, _ = translate_pairs(verifier, verifier, tok, kjv + web, temperature=0.0, batch_size=6, max_new_tokens=16)
    assert [r["es"] for r in rows] == greedy
    assert summary["sources"] == 6 and summary["english"] == ["kjv", "web"]
    with pytest.raises(SpecCascadeError, match="choose one or more of kjv, web"):
        distill(verifier, tok, out, sources=())


# --- the trainer: length buckets, the time plan, logit distillation ---------------------------------

def test_length_batches_hold_each_pair_once_with_similar_lengths():
    import random
    import statistics

    from speccascade.train.trainer import length_batches

    rng = random.Random(1)
    lengths = [rng.randint(5, 300) for _ in range(5000)]
    batches = length_batches(lengths, 64, random.Random(0), pool=10)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(5000))
    assert batches == length_batches(lengths, 64, random.Random(0), pool=10)   # seeded
    def spread(bs):
        return statistics.mean(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in bs)

    # a random batch of 64 of lengths 5..300 spans ~280 tokens; a sorted pool of 640 pairs ~30 per batch
    assert spread(batches) < 40 and spread(length_batches(lengths, 64, random.Random(0), pool=1)) > 250
    assert batches != sorted(batches, key=lambda b: lengths[b[0]])                     # batches are shuffled


def test_distill_loss_is_kl_of_teacher_to_student_on_target_positions():
    import torch

    from speccascade.train.trainer import distill_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    targets = torch.tensor([[-100, 3, 4, -100, -100], [1, 2, 3, 4, -100]])   # aligned with the logits
    keep = [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3)]
    want = torch.stack([torch.nn.functional.kl_div(torch.log_softmax(s[b, i], -1), torch.log_softmax(t[b, i], -1),
                                                   log_target=True, reduction="sum") for b, i in keep]).mean()
    assert torch.allclose(distill_loss(s, t, targets), want, atol=1e-6)
    assert float(distill_loss(t, t, targets)) == pytest.approx(0.0, abs=1e-6)
    s2 = s.clone()
    s2[0, 0] += 100.0                                            # a position not scored changes nothing
    assert torch.allclose(distill_loss(s2, t, targets), want, atol=1e-6)


def test_logit_distillation_brings_the_drafter_closer_to_its_teacher(tmp_path):
    """Forty steps on eight pairs: with the distillation term alone the drafter ends nearer the
    teacher's distribution on those pairs (KL(p || q), the quantity the term minimises) than
    with the cross-entropy alone; the teacher is the shipped verifier."""
    import torch

    from speccascade.data.bible import load_split
    from speccascade.train.trainer import collate, distill_loss, encode_pairs

    _, v_dir = embedded_pair_dirs("tiny")
    tok = load_tokenizer(TOKENIZER_DIR)
    pairs = load_split("validation")[:8]
    f = tmp_path / "pairs.jsonl"
    f.write_text("\n".join(json.dumps(p) for p in pairs))
    inputs, targets = collate(encode_pairs(tok, pairs), torch.device("cpu"))
    teacher = load_causal_lm(v_dir)
    kl = {}
    for w in (0.0, 1.0):
        log = train("tiny", "drafter", tmp_path / f"w{w}", TOKENIZER_DIR, epochs=40, progress=False, bleu_pairs=0,
                    train_file=f, teacher=v_dir if w else None, distill_weight=w, validation_pairs=4)
        assert log["steps"] == 40 and log["distill_weight"] == w and log["teacher"] == (str(v_dir) if w else None)
        with torch.no_grad():
            kl[w] = float(distill_loss(load_causal_lm(tmp_path / f"w{w}")(**inputs).logits, teacher(**inputs).logits,
                                       targets))
    assert kl[1.0] < 0.9 * kl[0.0], kl     # measured 3.53 against 4.17; equal if the term were ignored


def test_the_time_budget_plans_the_schedule(tmp_path, monkeypatch):
    import speccascade.train.trainer as trainer

    monkeypatch.setattr(trainer, "PROBE_STEPS", (2, 4))
    log = train("tiny", "drafter", tmp_path / "d", TOKENIZER_DIR, epochs=500, max_minutes=0.2, progress=False,
                bleu_pairs=0, validation_pairs=4)
    assert log["planned_steps"] < 500 * 231 and log["steps"] == log["planned_steps"], log.get("plan_note")
    assert "reproduces it" in log["plan_note"]


def _nan_loss_at(monkeypatch, steps):
    """Make the training loss NaN at these (1-based) optimisation steps; evaluation is untouched."""
    import speccascade.train.trainer as trainer

    real, calls = trainer.cross_entropy, [0]

    def cross_entropy(*args, **kwargs):
        loss = real(*args, **kwargs)
        if not torch.is_grad_enabled():   # evaluate_loss runs under no_grad
            return loss
        calls[0] += 1
        return loss * float("nan") if steps(calls[0]) else loss

    monkeypatch.setattr(trainer, "cross_entropy", cross_entropy)


def test_a_step_with_a_non_finite_gradient_is_skipped(tmp_path, monkeypatch):
    """Two NaN losses mid-run: those steps leave the weights alone, so the run ends finite (without
    the guard the NaN gradient reaches every weight and the final validation loss is NaN)."""
    _nan_loss_at(monkeypatch, lambda k: k in (2, 3))
    log = train("tiny", "drafter", tmp_path / "d", TOKENIZER_DIR, epochs=0.03, progress=False, bleu_pairs=0,
                validation_pairs=4)
    assert log["steps"] == 7 and log["skipped_steps"] == 2 and "diverged" not in log
    assert json.loads((tmp_path / "d" / "training.json").read_text())["skipped_steps"] == 2
    assert math.isfinite(log["evals"][-1]["val_loss"]) and log["best"]["step"] == 7
    weights = load_causal_lm(tmp_path / "d", dtype=torch.float32).state_dict().values()
    assert all(bool(torch.isfinite(w).all()) for w in weights)


def test_a_diverged_run_stops_and_says_so(tmp_path, monkeypatch):
    """NaN from step 3 on: the run stops at the first count check (every NONFINITE_CHECK_EVERY steps)
    once 25 steps in a row were skipped, says why, and saves step 2's weights: the same weights as a
    run told to stop after one bad step (the skipped steps, weight decay included, changed nothing)."""
    import speccascade.train.trainer as trainer

    _nan_loss_at(monkeypatch, lambda k: k >= 3)
    log = train("tiny", "drafter", tmp_path / "d", TOKENIZER_DIR, epochs=0.3, progress=False, bleu_pairs=0,
                validation_pairs=4)
    assert trainer.MAX_NONFINITE_STEPS == 25 and trainer.NONFINITE_CHECK_EVERY == 8
    assert log["steps"] == 32 and log["skipped_steps"] == 30   # 25 in a row by step 27, read at step 32
    assert "not finite for 30 steps in a row" in log["diverged"] and "--lr" in log["diverged"]
    # no evaluation came before: the checkpoint holds the last weights, those of step 2
    assert log["best"]["step"] == 32 and "not evaluated" in log["best"]["note"]
    weights = load_causal_lm(tmp_path / "d", dtype=torch.float32).state_dict()
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())
    monkeypatch.undo()   # the real loss again, then a fresh step count
    _nan_loss_at(monkeypatch, lambda k: k >= 3)
    monkeypatch.setattr(trainer, "MAX_NONFINITE_STEPS", 1)
    short = train("tiny", "drafter", tmp_path / "e", TOKENIZER_DIR, epochs=0.3, progress=False, bleu_pairs=0,
                  validation_pairs=4)
    assert short["steps"] == 8 and short["skipped_steps"] == 6
    again = load_causal_lm(tmp_path / "e", dtype=torch.float32).state_dict()
    assert all(torch.equal(weights[k], again[k]) for k in weights)


def test_optimizer_step_skips_on_the_device_and_takes_only_a_fused_optimiser():
    """The step decides on the device (found_inf): a NaN loss leaves the weights, a finite one moves
    them; a non-fused optimiser, which would need a host sync to decide, is refused."""
    from speccascade.train.trainer import optimizer_step

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    before = [p.detach().clone() for p in model.parameters()]
    assert not bool(optimizer_step(model(torch.ones(1, 4)).sum() * float("nan"), model, opt, sched))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert bool(optimizer_step(model(torch.ones(1, 4)).sum(), model, opt, sched))
    assert not any(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    plain = torch.optim.AdamW(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="takes a fused optimiser"):
        optimizer_step(model(torch.ones(1, 4)).sum(), model, plain, sched)


def test_train_lm_trains_a_small_llama(tmp_path):
    """benchmarks/smollm2_drafter.py's pre-training loop (train.lm) through optimizer_step: a few
    steps on a repeating token stream lower the validation loss, and the model is saved."""
    import numpy as np

    from speccascade.train.lm import train_lm
    from speccascade.train.trainer import Shape

    tokens = np.tile(np.arange(16), 400)
    log = train_lm(tokens, 16, Shape(32, 1, 2, 1, 64), tmp_path / "lm", device="cpu", seq_len=16, batch_size=8,
                   lr=1e-2, epochs=3, max_minutes=1.0)
    assert log["steps"] > 100 and log["final_val_loss"] < math.log(16) - 1.0
    assert load_causal_lm(tmp_path / "lm", dtype=torch.float32).config.vocab_size == 16


def test_bad_distillation_settings_are_clear_errors(tmp_path):
    with pytest.raises(SpecCascadeError, match="needs a teacher"):
        train("tiny", "drafter", tmp_path / "d", TOKENIZER_DIR, epochs=0.01, progress=False, bleu_pairs=0,
              distill_weight=0.5)
    _, v_dir = embedded_pair_dirs("tiny")
    with pytest.raises(SpecCascadeError, match=r"distill-weight must be in \[0, 1\]"):
        train("tiny", "drafter", tmp_path / "d", TOKENIZER_DIR, epochs=0.01, progress=False, bleu_pairs=0,
              teacher=v_dir, distill_weight=2.0)
    assert main(["train", "--preset", "tiny", "--role", "both", "--teacher", str(v_dir), "--out",
                 str(tmp_path / "x")]) == 2
    assert main(["train", "--preset", "tiny", "--role", "drafter", "--teacher", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "x"), "--epochs", "0.01"]) == 2


def test_rounded_batch_widths_change_no_loss_and_overrides_are_recorded(tmp_path):
    """The GPU trainer rounds batch widths up (SHAPE_MULTIPLE): the extra right padding is masked, not
    scored and unseen by the real tokens, so the loss is the same (this fails if padding were scored or
    seen). ``batch_size`` / ``lr`` replace the recipe's and the log says so; bad ones are clear errors."""
    from speccascade.data.bible import load_split
    from speccascade.train.trainer import collate, encode_pairs, token_loss

    _, v_dir = embedded_pair_dirs("tiny")
    tok = load_tokenizer(TOKENIZER_DIR)
    model = load_causal_lm(v_dir).float().eval()
    rows = encode_pairs(tok, load_split("validation")[:5])
    cpu = torch.device("cpu")
    losses = []
    for multiple in (1, 16, 64):
        inputs, targets = collate(rows, cpu, multiple)
        assert inputs["input_ids"].shape[1] % multiple == 0
        with torch.no_grad():
            losses.append(float(token_loss(model, inputs, targets, cpu)))
    assert max(losses) - min(losses) < 1e-5, losses
    inputs, targets = collate(rows, cpu, 64)
    targets[0, -1] = 5   # a scored padding position moves the loss: the check above can fail
    with torch.no_grad():
        assert abs(float(token_loss(model, inputs, targets, cpu)) - losses[0]) > 1e-4

    log = train("tiny", "drafter", tmp_path / "d", TOKENIZER_DIR, epochs=0.01, progress=False, bleu_pairs=0,
                validation_pairs=4, batch_size=16, lr=1e-4)
    assert log["recipe"]["batch_size"] == 16 and log["recipe"]["lr"] == 1e-4
    assert log["planned_steps"] == round(0.01 * math.ceil(log["train_pairs"] / 16))
    for kw, name in ((dict(batch_size=0), "--batch-size"), (dict(lr=-1.0), "--lr")):
        with pytest.raises(SpecCascadeError, match=f"{name} must be > 0"):
            train("tiny", "drafter", tmp_path / "e", TOKENIZER_DIR, epochs=0.01, progress=False, bleu_pairs=0, **kw)
    assert main(["train", "--preset", "tiny", "--role", "drafter", "--out", str(tmp_path / "x"), "--epochs", "0.01",
                 "--batch-size", "0"]) == 2


def test_init_from_starts_a_drafter_with_the_verifiers_embeddings_and_first_layer(tmp_path):
    """``--init-from``: a 1-layer drafter as wide as the verifier starts as the verifier cut after its
    first layer (same embeddings, tied head, final norm, layer 0): its logits equal that truncated
    verifier's. Another width, or an encoder-decoder, is a clear error naming the difference."""
    from speccascade.train.tokenizer import load_tokenizer as tokenizer_of
    from speccascade.train.trainer import (
        PRESETS,
        Shape,
        build_model,
        copy_first_layers,
        load_init_source,
        save_checkpoint,
    )

    _, v_dir = embedded_pair_dirs("tiny")
    verifier = load_causal_lm(v_dir).float().eval()
    torch.manual_seed(0)
    drafter = build_model(Shape(384, 1, 6, 2, 1024), verifier.config.vocab_size).eval()   # the tiny verifier's width
    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    before = drafter(input_ids=ids).logits
    copied = copy_first_layers(drafter, load_init_source(v_dir))
    assert "model.embed_tokens.weight" in copied and "model.norm.weight" in copied
    assert any(k.startswith("model.layers.0.") for k in copied) and not any(".layers.1." in k for k in copied)
    verifier.model.layers = verifier.model.layers[:1]   # the verifier cut after its first layer
    with torch.no_grad():
        after, cut = drafter(input_ids=ids).logits, verifier(input_ids=ids).logits
    assert torch.allclose(after, cut, atol=1e-5) and not torch.allclose(before, cut, atol=1e-2)

    narrow = build_model(PRESETS["tiny"]["drafter"].shape, verifier.config.vocab_size)
    with pytest.raises(SpecCascadeError, match="hidden_size 64 vs 384"):
        copy_first_layers(narrow, load_init_source(v_dir))
    t5 = build_model(PRESETS["t5_tiny"]["drafter"].shape, verifier.config.vocab_size)
    with pytest.raises(SpecCascadeError, match="not a T5"):
        copy_first_layers(t5, load_init_source(v_dir))
    with pytest.raises(SpecCascadeError):
        copy_first_layers(drafter, load_init_source(tmp_path / "missing"))
    # the deep drafter is as wide as the deep verifier, not the tiny one
    with pytest.raises(SpecCascadeError, match="hidden_size 576 vs 384"):
        train("deep", "drafter", tmp_path / "d", TOKENIZER_DIR, epochs=0.001, progress=False, bleu_pairs=0,
              init_from=v_dir)
    wide = tmp_path / "wide"   # a 2-layer model of the deep verifier's width
    save_checkpoint(build_model(Shape(576, 2, 9, 3, 1536), verifier.config.vocab_size), tokenizer_of(TOKENIZER_DIR),
                    wide)
    log = train("deep", "drafter", tmp_path / "d", TOKENIZER_DIR, epochs=0.001, progress=False, bleu_pairs=0,
                validation_pairs=4, init_from=wide)
    assert log["init_from"] == str(wide)


def test_init_from_all_layers_of_a_pretrained_model_computes_what_it_does(tmp_path):
    """``--init-from`` a model with as many layers (a pretrained start, e.g. SmolLM2-135M: RoPE base
    100,000, RMS-norm epsilon 1e-5): the built model takes the source's position encoding and norm
    epsilon, so after the copy its logits are the source's; built with transformers' defaults (10,000,
    1e-6), the same weights compute something else. ``train`` builds it so and saves the source's
    settings in the trained checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from speccascade.train.tokenizer import load_tokenizer as tokenizer_of
    from speccascade.train.trainer import PRESETS, build_model, copy_first_layers, save_checkpoint

    shape = PRESETS["tiny"]["verifier"].shape
    tok = tokenizer_of(TOKENIZER_DIR)
    torch.manual_seed(0)
    source = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        rms_norm_eps=1e-5)).eval()
    with torch.no_grad():   # norm weights far from 1, so that the epsilon matters where activations are small
        for name, w in source.named_parameters():
            if "norm" in name:
                w.uniform_(0.5, 1.5)
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 110, 120, 130, 140, 150]])
    with torch.no_grad():
        want = source(input_ids=ids).logits
        like = build_model(shape, len(tok), like=source.config).eval()
        copy_first_layers(like, source)
        default = build_model(shape, len(tok)).eval()
        copy_first_layers(default, source)
        torch.testing.assert_close(like(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(default(input_ids=ids).logits, want, atol=1e-3)

    src_dir = tmp_path / "pretrained"
    save_checkpoint(source, tok, src_dir)
    train("tiny", "verifier", tmp_path / "v", TOKENIZER_DIR, epochs=0.001, progress=False, bleu_pairs=0,
          validation_pairs=4, init_from=src_dir)
    trained = load_causal_lm(tmp_path / "v")
    assert trained.config.rope_parameters["rope_theta"] == 100000.0
    assert trained.config.rms_norm_eps == pytest.approx(1e-5)


def test_train_dropout_replaces_the_recipes(tmp_path):
    """``train --dropout``: the residual dropout the model is built with (and the log's recipe) is the
    one given, not the recipe's (the tiny verifier's is 0)."""
    from speccascade.train.trainer import PRESETS

    assert PRESETS["tiny"]["verifier"].dropout == 0.0
    log = train("tiny", "verifier", tmp_path / "v", TOKENIZER_DIR, epochs=0.001, progress=False, bleu_pairs=0,
                validation_pairs=4, dropout=0.5)
    assert log["recipe"]["dropout"] == 0.5


def test_train_label_smoothing_replaces_the_recipes(tmp_path):
    """``train --label-smoothing``: the training loss is smoothed by the value given, not the recipe's
    (the tiny verifier's is 0): from the same seed (the same weights and batch) the first step's
    training loss differs, and the log's recipe holds the value used."""
    from speccascade.train.trainer import PRESETS

    assert PRESETS["tiny"]["verifier"].label_smoothing == 0.0
    kw = dict(epochs=0.001, progress=False, bleu_pairs=0, validation_pairs=4, seed=3)
    plain = train("tiny", "verifier", tmp_path / "plain", TOKENIZER_DIR, **kw)
    smooth = train("tiny", "verifier", tmp_path / "smooth", TOKENIZER_DIR, label_smoothing=0.5, **kw)
    assert plain["recipe"]["label_smoothing"] == 0.0 and smooth["recipe"]["label_smoothing"] == 0.5
    assert plain["steps"] == smooth["steps"] == 1
    assert smooth["best"]["train_loss"] != pytest.approx(plain["best"]["train_loss"], rel=1e-6)


def test_init_from_into_a_wider_mlp_starts_as_the_cut_verifier(tmp_path):
    """``train --intermediate``: a 1-layer drafter whose MLP is wider than the verifier's starts, after
    ``--init-from``, with exactly the truncated verifier's logits (the copied units first, the new units'
    output weights zero, the other new weights random). A narrower MLP is a clear error naming
    --intermediate; the trained model keeps the width it was given; a width of 0 is a clear error."""
    from speccascade.train.trainer import Shape, build_model, copy_first_layers, load_init_source

    _, v_dir = embedded_pair_dirs("tiny")
    verifier = load_causal_lm(v_dir).float().eval()
    units = verifier.config.intermediate_size
    torch.manual_seed(0)
    drafter = build_model(Shape(384, 1, 6, 2, 3 * units), verifier.config.vocab_size).eval()
    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    copy_first_layers(drafter, load_init_source(v_dir))
    down = drafter.model.layers[0].mlp.down_proj.weight
    assert torch.count_nonzero(down[:, units:]) == 0 and torch.count_nonzero(down[:, :units]) > 0
    assert torch.count_nonzero(drafter.model.layers[0].mlp.up_proj.weight[units:]) > 0   # random, so gradients flow
    verifier.model.layers = verifier.model.layers[:1]
    with torch.no_grad():
        assert torch.allclose(drafter(input_ids=ids).logits, verifier(input_ids=ids).logits, atol=1e-5)

    with pytest.raises(SpecCascadeError, match="--intermediate"):
        copy_first_layers(build_model(Shape(384, 1, 6, 2, units // 2), verifier.config.vocab_size),
                          load_init_source(v_dir))
    log = train("tiny", "drafter", tmp_path / "d", TOKENIZER_DIR, epochs=0.002, progress=False, bleu_pairs=0,
                validation_pairs=4, intermediate=3 * units)
    assert log["recipe"]["shape"]["intermediate"] == 3 * units
    assert load_causal_lm(tmp_path / "d").config.intermediate_size == 3 * units
    with pytest.raises(SpecCascadeError, match="--intermediate must be > 0"):
        train("tiny", "drafter", tmp_path / "e", TOKENIZER_DIR, epochs=0.002, progress=False, intermediate=0)


def test_a_wider_mlp_learns_past_its_zero_start(tmp_path):
    """The new units' output weights (zero after ``--init-from``) take gradient: one optimiser step on
    a batch moves them off zero."""
    from speccascade.train.trainer import Shape, build_model, copy_first_layers, load_init_source

    _, v_dir = embedded_pair_dirs("tiny")
    config = load_causal_lm(v_dir).config
    units = config.intermediate_size
    torch.manual_seed(0)
    drafter = build_model(Shape(384, 1, 6, 2, 2 * units), config.vocab_size)
    copy_first_layers(drafter, load_init_source(v_dir))
    drafter.train()
    opt = torch.optim.SGD(drafter.parameters(), lr=0.1)
    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    drafter(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert torch.count_nonzero(drafter.model.layers[0].mlp.down_proj.weight[:, units:]) > 0


def test_gpu_distill_script_brings_the_drafter_closer_to_its_teacher(tmp_path, monkeypatch):
    """benchmarks/smollm2_gpu_distill.py's ``distill`` step, run on a CPU with the shipped tiny pair
    (the verifier as the teacher, the drafter as the start) on the verifier's own greedy answers to
    24 training sources: after 40 steps the drafter agrees more with the verifier on the answers to 8
    other sources (top-1 and E[sum min(p, q)], which the whole-distribution term pulls towards), the
    saved drafter loads, and training.json records the run."""
    import torch

    from speccascade.data.bible import load_split
    from speccascade.data.prompt import encode_prompt

    monkeypatch.syspath_prepend(str(SRC_ROOT / "benchmarks"))
    import smollm2_gpu_distill

    d_dir, v_dir = embedded_pair_dirs("tiny")
    verifier, tok = load_causal_lm(v_dir), load_tokenizer(TOKENIZER_DIR)
    items = []
    for i, pair in enumerate(load_split("train")[:32]):
        prompt = encode_prompt(tok, pair["en"])
        with torch.no_grad():
            out = verifier.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                    pad_token_id=tok.pad_token_id)
        items.append({"prompt": prompt, "answer": out[0, len(prompt):].tolist(), "temperature": 0.0, "key": str(i)})
    tdir = tmp_path / "gpu_teacher"
    tdir.mkdir()
    torch.save(items[:24], tdir / "p00_c00000.pt")
    torch.save(items[24:], tdir / "heldout.pt")
    smollm2_gpu_distill.distill(tmp_path, str(v_dir), d_dir, tmp_path / "drafter", minutes=5, steps=40,
                                batch_tokens=256, lr=3e-3, soft_weight=0.5, seed=0, eval_every=40, device="cpu")
    log = json.loads((tmp_path / "drafter" / "training.json").read_text())
    before, after = log["evals"][0], log["final"]
    assert log["steps"] == 40 and log["train_items"] == 24 and log["val_items"] == 8
    assert after["sd_acceptance_T1"] > before["sd_acceptance_T1"] + 0.03   # 0.466 -> 0.532 here; lr 0 fails it
    assert after["top1_agreement"] > before["top1_agreement"]
    assert load_causal_lm(tmp_path / "drafter").config.num_hidden_layers == 1


def test_the_train_step_benchmark_times_the_same_steps_eager_and_compiled(tmp_path, monkeypatch):
    """benchmarks/train_step.py runs the trainer's own step on the same batches eagerly and with the
    layers compiled (a dropout-free tiny drafter distilled from a teacher of the verifier's shape):
    both modes see the same losses, and the record's budget arithmetic is its rates' and warm-ups'."""
    import sys

    from speccascade.data.bible import load_split

    monkeypatch.syspath_prepend(str(SRC_ROOT / "benchmarks"))
    import train_step

    monkeypatch.setattr(train_step, "load_split", lambda name: load_split(name)[:64])
    out = tmp_path / "train_step.json"
    monkeypatch.setattr(sys, "argv", ["train_step.py", "--preset", "tiny", "--roles", "drafter", "--device", "cpu",
                                      "--batch-sizes", "drafter=16", "--warm-up", "1", "--steps", "2",
                                      "--budget-minutes", "drafter=1", "--sources", "kjv", "--out", str(out)])
    train_step.main()
    rec = json.loads(out.read_text())
    role = rec["roles"]["drafter"]
    eager, compiled = role["eager"], role["compiled"]
    assert abs(eager["first_loss"] - compiled["first_loss"]) < 1e-4
    assert abs(eager["last_loss"] - compiled["last_loss"]) < 1e-4 and eager["last_loss"] != eager["first_loss"]
    for m in (eager, compiled):
        assert m["steps_in_budget"] == max(0, int((60 - m["warm_up_excess_s"]) * m["steps_per_s"]))
        assert m["warm_up_excess_s"] == max(0.0, m["warm_up_s"] - m["warm_up_steps"] / m["steps_per_s"])
    assert eager["warm_up_steps"] == compiled["warm_up_steps"] >= 1
    assert role["pays"] == (compiled["steps_in_budget"] >= 1.03 * max(eager["steps_in_budget"], 1))
    assert rec["card"].startswith("cpu") and rec["threads"] == 1


def test_the_train_step_benchmark_times_one_mode_and_profiles_per_step(tmp_path, monkeypatch):
    """``--modes eager`` times the eager mode alone (no compile, no verdict); ``--profile-steps`` is a
    GPU's (a clear error on a CPU), and its per-step figures are the profiled run's divided by its steps."""
    import sys

    from speccascade.data.bible import load_split

    monkeypatch.syspath_prepend(str(SRC_ROOT / "benchmarks"))
    import gpu_speed
    import train_step

    monkeypatch.setattr(train_step, "load_split", lambda name: load_split(name)[:32])
    out = tmp_path / "train_step.json"
    argv = ["train_step.py", "--preset", "tiny", "--roles", "drafter", "--device", "cpu", "--batch-sizes",
            "drafter=16", "--warm-up", "1", "--steps", "1", "--sources", "kjv", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv + ["--modes", "eager"])
    train_step.main()
    role = json.loads(out.read_text())["roles"]["drafter"]
    assert set(role) == {"eager"} and role["eager"]["steps_per_s"] > 0 and "profile" not in role["eager"]
    for bad, says in ((["--modes", "eager", "--profile-steps", "2"], "--device cuda"),
                      (["--modes", "fast"], "eager and / or compiled")):
        monkeypatch.setattr(sys, "argv", argv + bad)
        with pytest.raises(SystemExit, match=says):
            train_step.main()
    # the profile on a CPU (no device kernels; the sync is a GPU's), then its per-step arithmetic on a
    # profile of known totals
    monkeypatch.setattr(gpu_speed, "sync", lambda: None)
    runs = []
    prof = train_step.profile_steps_of(lambda: runs.append(torch.ones(8, 8) @ torch.ones(8, 8)), 4)
    assert len(runs) == 2   # once unprofiled, once profiled
    assert prof["steps"] == 4 and prof["wall_s_per_step"] > 0
    assert prof["kernel_s_per_step"] == prof["kernels_per_step"] == prof["device_busy_fraction"] == 0
    totals = {"wall_s": 2.0, "device_kernel_s": 1.0, "device_busy_fraction": 0.5, "kernel_launches": 40,
              "top_kernels": [{"name": "gemm", "calls": 8, "total_s": 0.6}]}
    monkeypatch.setattr(gpu_speed, "kernel_time_share", lambda fn, top: totals)
    prof = train_step.profile_steps_of(lambda: None, 4)
    assert (prof["wall_s_per_step"], prof["kernel_s_per_step"], prof["kernels_per_step"]) == (0.5, 0.25, 10)
    assert prof["top"] == [{"name": "gemm", "per_step": 2, "s_per_step": 0.15}]


def test_the_decode_batch_benchmark_decodes_the_same_tokens_on_both_backends(tmp_path, monkeypatch):
    """benchmarks/decode_batch.py (DISTILL_BACKEND=auto's measurement): both backends decode the same
    batches for exactly --max-new-tokens tokens a row, greedily to the same tokens (float32), and the
    verdict is the rates'."""
    import sys

    monkeypatch.syspath_prepend(str(SRC_ROOT / "benchmarks"))
    import decode_batch

    out = tmp_path / "decode_batch.json"
    monkeypatch.setattr(sys, "argv", ["decode_batch.py", "--preset", "tiny", "--device", "cpu", "--batch-size", "3",
                                      "--batches", "2", "--max-new-tokens", "3", "--reference-float32",
                                      "--out", str(out)])
    decode_batch.main()
    rec = json.loads(out.read_text())
    dyn, fused = rec["backends"]["dynamic"], rec["backends"]["fused_eager"]
    assert dyn["tokens"] == fused["tokens"] == 2 * 3 * 3 and len(dyn["walls_s"]) == len(fused["walls_s"]) == 2
    assert fused["rows_equal_to_first"] == fused["rows_equal_to_first_to_eos"] == 1.0
    assert fused["mean_first_difference"] == 3
    assert dyn["against_float32"]["rows_equal_to_first"] == fused["against_float32"]["rows_equal_to_first"] == 1.0
    rates = {k: v["tokens_per_s"] for k, v in rec["backends"].items()}
    assert rec["faster"] == max(rates, key=rates.get)
    assert rec["speedup"] == max(rates.values()) / min(rates.values())
    assert rec["fused_eager_pays"] == (rates["fused_eager"] >= decode_batch.PAYS * rates["dynamic"])


def test_the_decode_batch_agreement_counts_rows_up_to_the_first_eos(monkeypatch):
    """A row that differs only after the first backend's EOS counts as equal up to the EOS, not as a
    whole row; the first difference is the first position where the rows part."""
    monkeypatch.syspath_prepend(str(SRC_ROOT / "benchmarks"))
    import decode_batch

    first = [[5, 6, 2, 7, 7], [5, 6, 8, 9, 9], [4, 2, 3, 3, 3]]
    other = [[5, 6, 2, 8, 8], [5, 6, 8, 9, 9], [4, 3, 3, 3, 3]]
    got = decode_batch.agreement(other, first, eos=2)
    assert got == {"rows_equal_to_first": 1 / 3, "rows_equal_to_first_to_eos": 2 / 3,
                   "mean_first_difference": (3 + 5 + 1) / 3}
    assert decode_batch.agreement(other, first, eos=None)["rows_equal_to_first_to_eos"] == 1 / 3


def test_the_train_step_benchmark_warms_up_every_width_it_times(monkeypatch):
    """Both modes meet each padded width of the timed steps once before the timing (a width's first step
    is slow): the warm-up adds one batch per width the timed batches meet and the first steps did not."""
    from speccascade.train.trainer import collate

    monkeypatch.syspath_prepend(str(SRC_ROOT / "benchmarks"))
    import train_step

    def batch(n):   # one pair of n source tokens and one target token
        return [(list(range(3, 3 + n)), 1)]

    warm, timed = [batch(5)], [batch(6), batch(20), batch(7), batch(21), batch(40)]
    widths = [train_step.width(b, collate, 8) for b in warm + timed]
    assert widths[0] == widths[1] == widths[3] and widths[2] == widths[4] != widths[0] != widths[5]
    assert train_step.width_warm_ups(warm, timed, collate, 8) == [timed[1], timed[4]]
    assert train_step.width_warm_ups(warm, timed, collate, 1) == timed   # unrounded, every length is new


def test_feature_drafter_experiment_starts_equal_and_reads_the_features(monkeypatch):
    """benchmarks/feature_drafter.py compares a 1-layer drafter fed the verifier's features with one
    that is not. The two start equal (the feature map is [I, 0]: the comparison is of what training
    makes of the features), the feature drafter's logits at position i depend on the verifier's
    feature at i - 1 and not at i (it reads the state that predicted x_i, never the future), and
    the measured acceptance is E[sum min(p, q)], 1 for the verifier against itself."""
    monkeypatch.syspath_prepend(str(SRC_ROOT / "benchmarks"))
    import feature_drafter as fd

    verifier, data, test = fd.load(8, 4, 0)
    ids, _ = next(fd.batches(data, 4))
    _, feats = fd.verifier_view(verifier, ids)
    torch.manual_seed(0)
    plain, featured = fd.Drafter(verifier, False).eval(), fd.Drafter(verifier, True).eval()   # (no dropout)
    torch.testing.assert_close(plain(ids, feats), featured(ids, feats))
    with torch.no_grad():
        featured.lm.feature_mix.weight.normal_(0, 0.05)
    i = 5
    moved = feats.clone()
    moved[:, i - 1] += 1.0
    later = feats.clone()
    later[:, i] += 1.0
    base = featured(ids, feats)
    assert not torch.allclose(featured(ids, moved)[:, i], base[:, i])
    torch.testing.assert_close(featured(ids, later)[:, : i + 1], base[:, : i + 1])

    class Itself(torch.nn.Module):
        def forward(self, ids, feats):
            return fd.verifier_view(verifier, ids)[0]

    same = fd.measure(Itself(), verifier, test, 4)
    assert same["acceptance_T1"] == pytest.approx(1.0, abs=1e-5) and same["top1_agreement"] == 1.0


def test_feature_drafter_blocks_read_the_drafters_own_states_and_count_the_verifiers_tokens(monkeypatch):
    """benchmarks/feature_drafter.py's block measurement (T = 0): from position n the first draft reads
    the verifier's feature f_{n-1}, each later one the drafter's own last state at the position before,
    over a cache of true-feature states; a draft counts while the block's drafts so far are the
    verifier's own greedy tokens. Checked against the definition recomputed without a cache, and the
    verifier measured against itself accepts every draft a sequence has room for."""
    monkeypatch.syspath_prepend(str(SRC_ROOT / "benchmarks"))
    import feature_drafter as fd

    verifier, _, test = fd.load(8, 4, 0)
    seqs = fd.greedy_sequences(verifier, test, 4)
    assert all(len(s) > start for s, start in seqs)
    gamma = 3
    me = fd.Drafter(verifier, False, lm=verifier)
    r = fd.block_acceptance(me, verifier, seqs, gamma, 4)
    starts = [(n, len(s)) for s, start in seqs for n in range(start - 1, len(s) - 1)]
    assert r["blocks"] == len(starts)
    expected = [sum(n + k < length for n, length in starts) / len(starts) for k in range(1, gamma + 1)]
    assert r["p_at_least"] == pytest.approx(expected, abs=1e-12)
    assert r["mean_accepted"] == pytest.approx(sum(expected))
    assert sum(r["per_position_equivalent"] ** k for k in range(1, gamma + 1)) == pytest.approx(sum(expected))

    torch.manual_seed(0)
    d = fd.Drafter(verifier, True).eval()
    with torch.no_grad():
        d.lm.feature_mix.weight.normal_(0, 0.05)
    seq, start = seqs[0]
    ids = torch.tensor([seq])
    feats = fd.verifier_view(verifier, ids)[1]
    n = start + 1
    _, full = d.hidden(ids, feats, use_cache=True)
    drafts, states = fd.draft_block(d, fd._prefix_cache(full.past_key_values, n, d.lm.config), ids[:, n],
                                    feats[:, n - 1], n, gamma)
    assert drafts.shape == (1, gamma) and states.shape == (1, gamma, feats.shape[-1])
    with torch.no_grad():
        for j in range(gamma):   # without a cache: x_0..x_n, then the drafts; f_{n+i} replaced by the own state
            x = torch.cat([ids[:, :n + 1], drafts[:, :j]], 1)
            f = feats[:, :n + 1 + j].clone()
            f[:, n:n + j] = states[:, :j]
            h = d.hidden(x, f)[0][:, -1]
            torch.testing.assert_close(h, states[:, j], rtol=1e-4, atol=1e-4)
            assert int(d.lm.lm_head(h).argmax(-1)) == int(drafts[0, j])
        # and the own states are read: with the true features at the later positions the drafts' states differ
        f = feats[:, :n + gamma].clone()
        x = torch.cat([ids[:, :n + 1], drafts[:, :gamma - 1]], 1)
        assert not torch.allclose(d.hidden(x, f[:, :x.shape[1]])[0][:, -1], states[:, -1], atol=1e-4)
