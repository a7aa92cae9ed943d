"""Sequence-level distillation (train/distill.py): the verifier's own translations become a
drafter's training set; tiny scale, the shipped pair."""

import gzip
import json

import pytest

from speccascade.cli import main
from speccascade.errors import SpecCascadeError
from speccascade.models.loading import TOKENIZER_DIR, embedded_pair_dirs, load_causal_lm, load_tokenizer
from speccascade.train.distill import distill, read_pairs
from speccascade.train.trainer import train


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
