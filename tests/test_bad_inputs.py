"""Issue 14: every bad input is a clear error; sweep files cannot be silently wrong; the defaults a
Hugging Face user expects.

Each row of the tables names the bad input, the error class it must raise and a fragment its message
must carry (what is wrong and, where there is one, the fix). API rows run on tiny random models
(milliseconds); CLI rows call ``cli.main`` in-process (``speccascade: error: ...`` on stderr, exit 2);
a handful run ``python -m speccascade`` in a subprocess to check that no traceback ever reaches the user.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import speccascade as sc
from speccascade.api import DEFAULTS
from speccascade.cli import build_parser, main
from speccascade.errors import DeviceError, ModelLoadError, NonFiniteLogitsError, SpecCascadeError, SweepFileError
from speccascade.eval.report import report
from speccascade.eval.sweep import SweepConfig, _Locked, read_records, run_sweep
from speccascade.eval.tasks import get_task
from speccascade.models.loading import TOKENIZER_DIR, embedded_pair_dirs, load_causal_lm, load_tokenizer
from speccascade.sampling import SamplingConfig

from helpers import kill_after_cells
from tiny_models import tiny_pair

SRC = Path(sc.__file__).resolve().parents[1]
D_DIR, V_DIR = embedded_pair_dirs("tiny")


@pytest.fixture(scope="module")
def pair():
    return tiny_pair(0)


@pytest.fixture(scope="module")
def shipped():
    return load_causal_lm(D_DIR, role="drafter"), load_causal_lm(V_DIR, role="verifier"), load_tokenizer(TOKENIZER_DIR)


# --------------------------------------------------------------------------------------------
# the API: generate's arguments, types and ranges


def G(ids=((5, 6, 7),), **kw):
    """A call of sc.generate on the tiny random pair with ``kw`` (4 tokens unless given)."""
    kw.setdefault("max_new_tokens", 4)

    def call(pair):
        ids_ = [list(r) for r in ids] if isinstance(ids, tuple) else ids
        return sc.generate(*pair, ids_, **kw)
    return call


API_CASES = [
    # sampling settings
    ("top_k float", G(top_k=2.5), SpecCascadeError, "top_k must be an integer >= 0 (0 = off), got 2.5"),
    ("top_k str", G(top_k="3"), SpecCascadeError, "top_k must be an integer >= 0 (0 = off), got '3' (str)"),
    ("top_k bool", G(top_k=True), SpecCascadeError, "top_k must be an integer"),
    ("top_k negative", G(top_k=-3), SpecCascadeError, "top_k must be an integer >= 0 (0 = off), got -3"),
    ("top_p 0", G(top_p=0.0), SpecCascadeError, "top_p must be in (0, 1] (1 = off), got 0.0"),
    ("top_p 1.5", G(top_p=1.5), SpecCascadeError, "top_p must be in (0, 1]"),
    ("temperature tiny", G(temperature=1e-38), SpecCascadeError,
     "temperature=1e-38 is too small to sample from (the softmax of logits / T underflows); use temperature=0"),
    ("temperature 5e-5", G(temperature=5e-5), SpecCascadeError, "or a temperature >= 0.0001"),
    ("temperature negative", G(temperature=-1), SpecCascadeError, "temperature must be a finite number >= 0"),
    ("temperature nan", G(temperature=float("nan")), SpecCascadeError, "temperature is NaN"),
    ("temperature inf", G(temperature=float("inf")), SpecCascadeError, "temperature must be a finite number"),
    ("temperature str", G(temperature="1"), SpecCascadeError, "temperature must be a number >= 0 (0 = greedy), got '1'"),
    # lengths and seeds
    ("max_new_tokens float", G(max_new_tokens=2.5), SpecCascadeError, "max_new_tokens must be an integer >= 1, got 2.5"),
    ("max_new_tokens str", G(max_new_tokens="64"), SpecCascadeError, "max_new_tokens must be an integer >= 1, got '64'"),
    ("max_new_tokens 0", G(max_new_tokens=0), SpecCascadeError, "max_new_tokens must be an integer >= 1, got 0"),
    ("max_new_tokens too many", G(max_new_tokens=200), SpecCascadeError,
     "exceed its context of 128 positions; lower max_new_tokens"),
    ("gamma 0", G(gamma=0), SpecCascadeError, "gamma (the draft block size) must be an integer >= 1, got 0"),
    ("gamma float", G(gamma=2.5), SpecCascadeError, "gamma (the draft block size) must be an integer >= 1, got 2.5"),
    ("gamma bool", G(gamma=True), SpecCascadeError, "gamma (the draft block size) must be an integer >= 1, got True"),
    ("seed negative", G(seed=-1), SpecCascadeError, "seed must be an integer >= 0 or None, got -1"),
    ("seed float", G(seed=1.5), SpecCascadeError, "seed must be an integer >= 0 or None, got 1.5"),
    ("progress str", G(progress="yes"), SpecCascadeError, "progress must be True or False, got 'yes' (str)"),
    ("generator", G(generator=42), SpecCascadeError, "generator must be a torch.Generator or None, got int"),
    # methods, alphas, typed options
    ("method unknown", G(method="nope"), SpecCascadeError, "unknown method 'nope'; choose one of: sd,"),
    ("method not a str", G(method=3), SpecCascadeError, "unknown method 3"),
    ("alpha str", G(method="opt", alpha="0.3"), SpecCascadeError, "alpha for method 'opt' must be a number"),
    ("alpha inf", G(method="opt", alpha=float("inf")), SpecCascadeError, "alpha for method 'opt' must be a finite number"),
    ("alpha out of range", G(method="chow", alpha=1.5), SpecCascadeError,
     "alpha=1.5 is outside the range of method 'chow': [0, 1]"),
    ("alpha for sd", G(method="sd", alpha=0.3), SpecCascadeError, "method 'sd' takes no alpha (got alpha=0.3)"),
    ("length_normalized 'yes'", G(method="seq_cascade", length_normalized="yes"), SpecCascadeError,
     "option length_normalized of method 'seq_cascade' must be True or False, got 'yes' (str)"),
    ("length_normalized 'false'", G(method="seq_cascade", length_normalized="false"), SpecCascadeError,
     "must be True or False, got 'false' (str)"),
    ("length_normalized 1", G(method="seq_cascade", length_normalized=1), SpecCascadeError,
     "must be True or False, got 1"),
    ("max_drafter_run 0", G(method="token_cascade", max_drafter_run=0), SpecCascadeError,
     "option max_drafter_run of method 'token_cascade' must be an integer >= 1 or None, got 0"),
    ("max_drafter_run float", G(method="bild", max_drafter_run=2.5), SpecCascadeError,
     "option max_drafter_run of method 'bild' must be an integer >= 1 or None, got 2.5"),
    ("alpha_f str", G(method="bild", alpha_f="0.5"), SpecCascadeError, "alpha_f for method 'bild' must be a number"),
    ("alpha_f out of range", G(method="bild", alpha_f=2.0), SpecCascadeError, "alpha_f=2.0 is outside"),
    ("option of another method", G(method="chow", length_normalized=True), SpecCascadeError,
     "method 'chow' has no option(s) ['length_normalized']; it takes none"),
    # EOS
    ("eos 99999", G(eos_token_id=99999), SpecCascadeError,
     "eos_token_id holds 99999, which is not a token id of this vocabulary [0, 48)"),
    ("eos -1", G(eos_token_id=-1), SpecCascadeError, "eos_token_id holds -1, which is not a token id"),
    ("eos in a list", G(eos_token_id=[2, 60]), SpecCascadeError, "eos_token_id holds 60"),
    ("eos str", G(eos_token_id="</s>"), SpecCascadeError, "(a token string? use tokenizer.convert_tokens_to_ids)"),
    ("eos float", G(eos_token_id=[2, 2.5]), SpecCascadeError, "or None for the model's own; got 2.5"),
    ("eos bool", G(eos_token_id=True), SpecCascadeError, "eos_token_id must be a token id (an int)"),
    # input_ids and attention_mask
    ("text prompt", G(ids="And God said"), SpecCascadeError, "got str (text? encode it with the tokenizer first)"),
    ("text rows", G(ids=["And God said"]), SpecCascadeError, "row 0 of input_ids must be a list of token ids"),
    ("float token", G(ids=[[5, 6.5]]), SpecCascadeError, "row 0 of input_ids holds 6.5 (float); token ids are integers"),
    ("2-D tensor in a list", G(ids=[torch.tensor([[5, 6]])]), SpecCascadeError, "row 0 of input_ids is a 2-D tensor"),
    ("float tensor in a list", G(ids=[torch.tensor([5.0, 6.0])]), SpecCascadeError,
     "row 0 of input_ids must hold integer token ids, got dtype torch.float32"),
    ("3-D tensor", G(ids=torch.zeros(1, 2, 3, dtype=torch.long)), SpecCascadeError,
     "input_ids must be 1-D or 2-D [batch, length], got shape (1, 2, 3)"),
    ("float tensor", G(ids=torch.tensor([[5.0, 6.0]])), SpecCascadeError, "input_ids must hold integer token ids"),
    ("mask with ragged lists", G(ids=[[5, 6], [7]], attention_mask=[[1, 1], [0, 1]]), SpecCascadeError,
     "attention_mask was given with prompt rows of different lengths ([1, 2])"),
    ("mask values", G(ids=torch.tensor([[5, 6]]), attention_mask=torch.tensor([[2, 1]])), SpecCascadeError,
     "attention_mask must hold only 0 (padding) and 1 (a token)"),
    ("mask shape", G(ids=torch.tensor([[5, 6]]), attention_mask=torch.tensor([[1, 1, 1]])), SpecCascadeError,
     "attention_mask shape (1, 3) differs from input_ids (1, 2)"),
    ("right padding as lists", G(ids=[[5, 6, 0]], attention_mask=[[1, 1, 0]]), SpecCascadeError,
     "prompts must be left-padded"),
    ("mapping without input_ids", G(ids={"attention_mask": [[1]]}), SpecCascadeError,
     "input_ids is a mapping without an 'input_ids' entry"),
    ("token outside vocabulary", G(ids=[[5, 600]]), SpecCascadeError, "input_ids hold token id 600, outside the vocabulary [0, 48)"),
    ("empty list", G(ids=[]), SpecCascadeError, "empty prompt"),
]


@pytest.mark.parametrize("name,call,exc,fragment", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input(pair, name, call, exc, fragment):
    with pytest.raises(exc) as e:
        call(pair)
    assert fragment in str(e.value)


def test_models_on_different_devices(pair):
    d, v = tiny_pair(0)
    v = v.to("meta")
    with pytest.raises(DeviceError, match=r"the drafter is on cpu and the verifier on meta; put both models on one device"):
        sc.generate(d, v, [[5, 6]], max_new_tokens=2)


def test_sampling_config_checks_itself():
    with pytest.raises(SpecCascadeError, match="top_k must be an integer >= 0 \\(0 = off\\), got 2.5"):
        SamplingConfig(top_k=2.5)
    assert SamplingConfig(top_k=2.0).top_k == 2 and isinstance(SamplingConfig(top_k=2.0).top_k, int)
    assert SamplingConfig(temperature=1e-4).temperature == 1e-4  # the smallest temperature sampled from


def test_every_error_is_a_speccascade_error():
    for cls in (ModelLoadError, DeviceError, SweepFileError, NonFiniteLogitsError):
        assert issubclass(cls, SpecCascadeError) and issubclass(cls, ValueError)
    assert issubclass(NonFiniteLogitsError, RuntimeError)  # as before


# --------------------------------------------------------------------------------------------
# inputs that are accepted, and what they mean


def test_attention_mask_with_lists_is_used(pair):
    plain = sc.generate(*pair, [[5, 6, 7], [8, 9]], max_new_tokens=5, eos_token_id=[]).tokens
    padded = sc.generate(*pair, [[5, 6, 7], [0, 8, 9]], attention_mask=[[1, 1, 1], [0, 1, 1]], max_new_tokens=5,
                         eos_token_id=[]).tokens
    tensors = sc.generate(*pair, [torch.tensor([5, 6, 7]), torch.tensor([8, 9])], max_new_tokens=5, eos_token_id=[]).tokens
    encoding = sc.generate(*pair, {"input_ids": [[5, 6, 7], [0, 8, 9]], "attention_mask": [[1, 1, 1], [0, 1, 1]]},
                           max_new_tokens=5, eos_token_id=[]).tokens
    assert plain == padded == tensors == encoding and [len(t) for t in plain] == [5, 5]
    # the mask is not ignored: without it the pad token 0 would be part of row 2's prompt
    unmasked = sc.generate(*pair, [[5, 6, 7], [0, 8, 9]], max_new_tokens=5, eos_token_id=[]).tokens
    assert unmasked[0] == plain[0]


def test_eos_defaults_to_the_verifiers_own_and_empty_list_means_none(pair):
    d, v = pair
    assert v.generation_config.eos_token_id == 2
    prompts = [[p, p + 1] for p in range(5, 45, 3)]
    none = sc.generate(d, v, prompts, method="verifier_only", max_new_tokens=30, eos_token_id=[])
    default = sc.generate(d, v, prompts, method="verifier_only", max_new_tokens=30)
    assert none.eos_token_id == [] and default.eos_token_id == [2]
    assert all(len(t) == 30 for t in none.tokens)
    stopped = 0
    for full, cut in zip(none.tokens, default.tokens):  # greedy: the same tokens, cut after the first EOS
        expected = full[:full.index(2) + 1] if 2 in full else full
        assert cut == expected
        stopped += 2 in full
    assert stopped > 0  # some row did stop early
    # an explicit id, and the model's config when its generation config has none
    assert sc.generate(d, v, prompts[:1], max_new_tokens=3, eos_token_id=7).eos_token_id == [7]
    assert sc.generate(d, v, prompts[:1], max_new_tokens=3, eos_token_id=torch.tensor([7, 9])).eos_token_id == [7, 9]


def test_one_set_of_defaults_for_the_api_and_the_cli():
    import inspect

    params = inspect.signature(sc.generate).parameters
    g = build_parser().parse_args(["generate", "x"])
    for name in ("method", "alpha", "gamma", "temperature", "top_k", "top_p", "max_new_tokens", "seed"):
        assert params[name].default == getattr(DEFAULTS, name) == getattr(g, name), name
    assert (DEFAULTS.method, DEFAULTS.temperature, DEFAULTS.max_new_tokens) == ("token_v3", 0.0, 128)
    assert params["eos_token_id"].default is None


def test_progress_bar_ends_where_decoding_ended(pair, capsys):
    d, v = pair
    out = sc.generate(d, v, [[5, 6]], method="verifier_only", max_new_tokens=30, eos_token_id=[9, 2, 11, 30],
                      progress=True)
    n = len(out.tokens[0])
    assert n < 30  # stopped early at an EOS
    err = capsys.readouterr().err
    assert f"{n}/{n}" in err and "/30" not in err.split("\r")[-2]


# --------------------------------------------------------------------------------------------
# loading: every broken checkpoint or tokenizer names the role, the path and the problem


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("bad")
    dirs = {}

    def make(name, files):
        p = root / name
        p.mkdir()
        for fname, content in files.items():
            if isinstance(content, Path):
                shutil.copy(content, p / fname)
            else:
                (p / fname).write_bytes(content if isinstance(content, bytes) else content.encode())
        dirs[name] = p
        return p

    cfg, weights = D_DIR / "config.json", D_DIR / "model.safetensors"
    make("empty", {})
    make("no_config", {"model.safetensors": weights})
    make("broken_config", {"config.json": '{"model_type": "llama", ', "model.safetensors": weights})
    make("no_model_type", {"config.json": '{"hidden_size": 64}', "model.safetensors": weights})
    make("no_weights", {"config.json": cfg})
    make("garbage", {"config.json": cfg, "model.safetensors": os.urandom(2000)})
    make("truncated", {"config.json": cfg, "model.safetensors": weights.read_bytes()[:100_000]})
    make("other_shapes", {"config.json": cfg, "model.safetensors": V_DIR / "model.safetensors"})
    renamed = make("renamed", {"config.json": cfg})
    save_file({"x." + k: t for k, t in load_file(weights).items()}, renamed / "model.safetensors",
              metadata={"format": "pt"})
    make("good_no_tokenizer", {"config.json": cfg, "model.safetensors": weights})
    (root / "a_file").write_text("not a folder")
    dirs["a_file"] = root / "a_file"
    dirs["missing"] = root / "missing"
    dirs["missing_gguf"] = root / "model.gguf"
    (root / "junk.gguf").write_bytes(os.urandom(5000))
    dirs["junk_gguf"] = root / "junk.gguf"
    return dirs


LOAD_CASES = [
    ("missing", "missing", "the drafter path '{p}' does not exist (local paths only: nothing is downloaded"),
    ("empty", "empty", "the drafter folder '{p}' is empty; it should hold a Hugging Face checkpoint"),
    ("no config", "no_config", "the drafter folder '{p}' has no config.json (it holds: model.safetensors)"),
    ("broken config", "broken_config", "the drafter's '{p}/config.json' is not valid JSON (line 1, column 25"),
    ("no model_type", "no_model_type", "the drafter's '{p}/config.json' has no 'model_type'"),
    ("no weights", "no_weights", "the drafter folder '{p}' has config.json but no weights (model.safetensors or"),
    ("garbage weights", "garbage", "could not load the drafter from '{p}': SafetensorError"),
    ("truncated weights", "truncated", "could not load the drafter from '{p}': SafetensorError"),
    ("another model's weights", "other_shapes", "the drafter weights in '{p}' do not fit its config.json"),
    ("weights under other names", "renamed", "the drafter weights in '{p}' lack 12 of the model's tensors"),
    ("a file", "a_file", "the drafter path '{p}' is a file, not a checkpoint folder"),
    ("missing gguf", "missing_gguf", "the drafter GGUF file '{p}' does not exist"),
    ("garbage gguf", "junk_gguf", "could not load the drafter from '{p}': ValueError: {p} does not start with the "
                                  "GGUF magic bytes"),
]


@pytest.mark.parametrize("name,key,fragment", LOAD_CASES, ids=[c[0] for c in LOAD_CASES])
def test_load_bad_checkpoint(bad, name, key, fragment):
    with pytest.raises(ModelLoadError) as e:
        load_causal_lm(bad[key], role="drafter")
    assert fragment.format(p=bad[key]) in str(e.value)


def test_load_bad_tokenizer_device_dtype(bad):
    with pytest.raises(ModelLoadError, match="the tokenizer path '.*missing' does not exist"):
        load_tokenizer(bad["missing"])
    with pytest.raises(ModelLoadError, match="the tokenizer folder '.*good_no_tokenizer' has no tokenizer files "
                                             r"\(tokenizer.json, tokenizer_config.json, tokenizer.model, ...\); it holds: "
                                             "config.json, model.safetensors"):
        load_tokenizer(bad["good_no_tokenizer"])
    with pytest.raises(ModelLoadError, match="the tokenizer path '.*a_file' is a file"):
        load_tokenizer(bad["a_file"])
    with pytest.raises(ModelLoadError, match="could not load the tokenizer from '.*junk.gguf': ValueError"):
        load_tokenizer(bad["junk_gguf"])
    with pytest.raises(DeviceError, match="device 'cuda' for the verifier: this machine has no CUDA GPU"):
        load_causal_lm(D_DIR, device="cuda", role="verifier")
    with pytest.raises(DeviceError, match="unknown device 'banana' for the verifier; use cpu, cuda, cuda:N or mps"):
        load_causal_lm(D_DIR, device="banana", role="verifier")
    with pytest.raises(SpecCascadeError, match="the drafter's dtype must be a floating torch dtype"):
        load_causal_lm(D_DIR, dtype=torch.int8, role="drafter")
    with pytest.raises(ModelLoadError, match="the drafter path must be a str or Path, got int"):
        load_causal_lm(3, role="drafter")


# --------------------------------------------------------------------------------------------
# the CLI in-process: exit 2 and one line `speccascade: error: ...`


def run_cli(capsys, *argv):
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def cli_cases(bad_dirs, tmp):
    tok = str(TOKENIZER_DIR)
    d, v = str(D_DIR), str(V_DIR)
    (tmp / "dir.jsonl").mkdir(exist_ok=True)
    (tmp / "plain").write_text("x")
    sweep = ["sweep", "--examples", "2", "--max-new-tokens", "3", "--quiet", "--out", str(tmp / "s.jsonl")]
    b = {k: str(p) for k, p in bad_dirs.items()}
    return [
        # devices and threads
        (["generate", "x", "--device", "cuda"], "device 'cuda' for the drafter and verifier (--device): this machine "
                                                "has no CUDA GPU"),
        (["generate", "x", "--device", "banana"], "unknown device 'banana'"),
        (["generate", "x", "--threads", "-1"], "--threads must be an integer >= 0 (0: torch's default), got -1"),
        (sweep + ["--threads", "-2"], "--threads must be an integer >= 0"),
        # loading
        (["generate", "x", "--drafter", b["missing"], "--verifier", v], f"the drafter path '{b['missing']}' does not exist"),
        (["generate", "x", "--drafter", d, "--verifier", b["empty"], "--tokenizer", tok],
         f"the verifier folder '{b['empty']}' is empty"),
        (["generate", "x", "--drafter", b["broken_config"], "--verifier", v, "--tokenizer", tok], "is not valid JSON"),
        (["generate", "x", "--drafter", d, "--verifier", b["truncated"], "--tokenizer", tok],
         f"could not load the verifier from '{b['truncated']}': SafetensorError"),
        (["generate", "x", "--drafter", d, "--verifier", v], "has no tokenizer files (tokenizer.json, "
                                                             "tokenizer_config.json, ...) and no --tokenizer was given"),
        (["generate", "x", "--tokenizer", b["missing"]], f"the --tokenizer path '{b['missing']}' does not exist"),
        (["generate", "x", "--drafter", b["missing_gguf"], "--verifier", v], "the drafter GGUF file"),
        (["generate", "x", "--drafter", d], "give both --drafter and --verifier, or neither"),
        # types and ranges
        (["generate", "x", "--top-k", "2.5"], "argument --top-k: invalid int value: '2.5'"),
        (["generate", "x", "--temperature", "1e-38"], "temperature=1e-38 is too small to sample from"),
        (["generate", "x", "--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1, got 0"),
        (["generate", "x", "--max-new-tokens", "1000"], "exceed its context of 512 positions"),
        (["generate", "x", "--method", "seq_cascade", "--option", "length_normalized=maybe"],
         "option length_normalized of method 'seq_cascade' must be true or false, got 'maybe'"),
        (["generate", "x", "--method", "bild", "--option", "max_drafter_run=2.5"],
         "option max_drafter_run of method 'bild' must be an integer >= 1 or none (default 10), got '2.5'"),
        (["generate", "x", "--method", "chow", "--alpha", "3"], "alpha=3.0 is outside the range of method 'chow'"),
        (["generate", "x", "--alpha-f", "0.5"], "method 'token_v3' has no option(s) ['alpha_f']"),
        (["generate", "x", "--method", "nope"], "argument --method: invalid choice: 'nope'"),
        # sweep settings: all before a model loads
        (sweep + ["--examples", "0"], "the number of examples (--examples) must be an integer >= 1"),
        (sweep + ["--examples", "5000"], "--examples 5000 is more than the 1000 examples of task bible_en_es"),
        (sweep + ["--alphas", "chow=0,abc", "--methods", "chow"], "alpha for method 'chow' must be a number, got 'abc'"),
        (sweep + ["--alphas", "chw=0.5"], "--alphas: unknown method 'chw'"),
        (sweep + ["--alphas", "chow:0.5"], "--alphas: 'chow:0.5' is not METHOD=A,B,..."),
        (sweep + ["--alphas", "chow=2", "--methods", "chow"], "alpha=2.0 is outside the range of method 'chow'"),
        (sweep + ["--alphas", "sd=0.5"], "--alphas: method 'sd' takes no alpha"),
        (sweep + ["--alphas", "opt=0.5", "--methods", "chow"], "--alphas: 'opt' is not among the swept methods"),
        (sweep + ["--alphas", "chow=0.1,", "--methods", "chow"], "has an empty value"),
        (sweep + ["--alphas", ";"], "gives no grid"),
        (sweep + ["--methods", "chow,nope"], "unknown method 'nope'"),
        (sweep + ["--methods", ","], "names no method"),
        (sweep + ["--gammas", "0"], "each of gammas must be an integer >= 1, got 0"),
        (sweep + ["--batch-sizes", "0"], "each of batch_sizes must be an integer >= 1, got 0"),
        (sweep + ["--temperatures", "1e-38"], "temperature=1e-38 is too small"),
        (sweep + ["--option", "seq_cascade.length_normalized=maybe", "--methods", "seq_cascade"], "must be true or false"),
        (sweep + ["--alpha-f", "0.5", "--methods", "chow"], "--alpha-f is BiLD's fallback threshold, but bild is not"),
        (sweep + ["--task-file", b["missing"]], f"task file '{b['missing']}' does not exist"),
        (sweep + ["--task", "bible_en_es", "--task-file", str(tmp / "plain")], "takes no --task-file"),
        (sweep + ["--task-file", str(tmp / "plain")], f"{tmp / 'plain'}:1: not a JSON line"),
        (sweep + ["--metric", "rouge1"], "task 'bible_en_es' scores bleu, chrf, not 'rouge1'"),
        (sweep + ["--out", str(tmp / "dir.jsonl")], "is a folder; give a file path such as runs/sweep.jsonl"),
        (sweep + ["--out", str(tmp / "plain" / "sub" / "s.jsonl")], "cannot create the folder of --out"),
        # train
        (["train", "--preset", "base_deep", "--role", "drafter", "--out", str(tmp / "t")],
         "preset 'base_deep' has no drafter recipe (it has: verifier)"),
        (["train", "--minutes", "0", "--out", str(tmp / "t")], "--minutes must be > 0, got 0.0"),
        (["train", "--epochs", "-1", "--out", str(tmp / "t")], "--epochs must be > 0, got -1.0"),
        (["train", "--device", "cuda", "--out", str(tmp / "t")], "device 'cuda' for the model to train"),
        (["train", "--tokenizer", b["missing"], "--out", str(tmp / "t")], "is not a folder"),
        (["train", "--dropout", "1.5", "--out", str(tmp / "t")], "--dropout must be in [0, 1), e.g. 0.1, got 1.5"),
        (["train", "--label-smoothing", "-0.1", "--out", str(tmp / "t")],
         "--label-smoothing must be in [0, 1), e.g. 0.1, got -0.1"),
        (["train", "--tokenizer", b["good_no_tokenizer"], "--epochs", "0.001", "--out", str(tmp / "t")],
         "holds a model (config.json) but no tokenizer.json"),
        (["train", "--out", str(tmp / "plain")], "--out '" + str(tmp / "plain") + "' is a file; give a folder"),
        (["train", "--arch", "gpt2", "--out", str(tmp / "t")], "argument --arch: invalid choice: 'gpt2'"),
        (["train", "--arch", "t5", "--preset", "deep", "--out", str(tmp / "t")],
         "preset 'deep' is a llama preset, not t5; with --arch t5 use --preset t5 or t5_tiny"),
        (["train", "--preset", "t5", "--role", "drafter", "--epochs", "0", "--out", str(tmp / "t")],
         "--epochs must be > 0, got 0.0"),
        # train --features (a feature drafter: a Llama drafter reading its teacher's states)
        (["train", "--features", "--role", "drafter", "--out", str(tmp / "t")], "give --teacher VERIFIER"),
        (["train", "--features", "--role", "both", "--out", str(tmp / "t")], "--features trains a drafter"),
        (["train", "--features", "--role", "verifier", "--teacher", v, "--out", str(tmp / "t")],
         "not a verifier: give --role drafter"),
        (["train", "--features", "--arch", "t5", "--role", "drafter", "--teacher", v, "--out", str(tmp / "t")],
         "not a t5: give --arch llama"),
        (["train", "--feature-regression", "0.5", "--role", "drafter", "--teacher", v, "--out", str(tmp / "t")],
         "give --features too"),
        (["train", "--features", "--feature-regression", "-1", "--role", "drafter", "--teacher", v,
          "--out", str(tmp / "t")], "--feature-regression must be a finite number >= 0, got -1.0"),
        (["train", "--feature-unroll", "2", "--role", "drafter", "--teacher", v, "--out", str(tmp / "t")],
         "--feature-unroll trains a feature drafter on its own states"),
        (["train", "--features", "--feature-unroll", "-1", "--role", "drafter", "--teacher", v,
          "--out", str(tmp / "t")], "--feature-unroll must be a whole number >= 0"),
    ]


def test_cli_bad_input(bad, tmp_path, capsys):
    cases = cli_cases(bad, tmp_path)
    assert len(cases) >= 45
    failures = []
    for argv, fragment in cases:
        rc, out, err = run_cli(capsys, *argv)
        lines = [x for x in err.strip().splitlines() if x.startswith("speccascade: error:")]
        if rc != 2 or len(lines) != 1 or fragment not in lines[0] or "Traceback" in err:
            failures.append((argv, rc, err.strip()[-400:]))
    assert not failures, "\n".join(map(str, failures))
    assert not (tmp_path / "s.jsonl").exists()  # nothing ran, nothing was written


# --------------------------------------------------------------------------------------------
# sweeps never silently wrong


def small_config(**kw):
    base = dict(methods=["sd", "chow"], alphas={"chow": [0.3, 0.8]}, n_examples=2, max_new_tokens=3)
    return SweepConfig(**(base | kw))


def test_a_bad_alpha_fails_before_the_first_cell(shipped, tmp_path):
    out = tmp_path / "s.jsonl"
    for cfg, fragment in ((small_config(alphas={"chow": [0.3, 2.0]}), "alpha=2.0 is outside the range of method 'chow'"),
                          (small_config(alphas={"opt": [0.3]}), "alphas are given for 'opt', which is not among"),
                          (small_config(alphas={"sd": [0.3]}), "alphas are given for 'sd', which takes no alpha"),
                          (small_config(n_examples=0), "must be an integer >= 1 or None, got 0"),
                          (small_config(max_new_tokens=500), "with max_new_tokens=500 and a draft block of 6 it needs 521 positions, more than the drafter's 512: lower --max-new-tokens"),
                          (small_config(options={"chow": {"x": 1}}), "method 'chow' has no option(s) ['x']")):
        with pytest.raises(SpecCascadeError) as e:
            run_sweep(*shipped, get_task(), cfg, out, progress=False)
        assert fragment in str(e.value)
        assert not out.exists()  # the baseline did not run first


def test_torn_last_line_is_repaired_before_appending(shipped, tmp_path):
    out = tmp_path / "s.jsonl"
    cfg = small_config()
    full = run_sweep(*shipped, get_task(), cfg, out, progress=False)
    lines = out.read_text().splitlines()
    assert len(lines) == len(full) == 1 + len(cfg.cells())  # a costs record and 4 cells
    torn_key = json.loads(lines[-1])["key"]
    # a writer killed mid-write leaves half a record and no newline
    out.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    notes = []
    assert torn_key not in {r.get("key") for r in read_records(out, notes=notes)} and "torn last line" in notes[0]
    again = run_sweep(*shipped, get_task(), cfg, out, progress=False, notes=notes)
    text = out.read_text()
    assert text.endswith("\n") and all(json.loads(x) for x in text.splitlines())  # every line readable
    keys = [r["key"] for r in again if r["type"] == "cell"]
    assert sorted(keys) == sorted(c.key for c in cfg.cells()) and len(keys) == len(set(keys))
    assert keys[-1] == torn_key  # the torn cell, recomputed
    assert again == read_records(out)  # what is returned (and counted) is what is on disk
    assert "removed a torn last line" in notes[-1]
    assert (tmp_path / "s.jsonl.torn").read_text() == lines[-1][: len(lines[-1]) // 2] + "\n"
    # a complete last record without its newline gets one, and nothing is recomputed
    out.write_text(text.rstrip("\n"))
    assert run_sweep(*shipped, get_task(), cfg, out, progress=False) == again and out.read_text() == text


def test_damaged_lines_in_the_middle_are_refused(tmp_path):
    out = tmp_path / "s.jsonl"
    rec = {"type": "cell", "key": "a"}
    out.write_text(json.dumps(rec) + "\n" + '{"type": "cell", "key": "torn{"type": "cell"}\n' + json.dumps(rec) + "\n")
    with pytest.raises(SweepFileError, match="line 2 of '.*s.jsonl' is not a JSON record"):
        read_records(out)


def test_a_rerun_with_other_settings_is_refused(shipped, tmp_path):
    out = tmp_path / "s.jsonl"
    cfg = small_config(methods=["sd"], alphas={})
    first = run_sweep(*shipped, get_task(), cfg, out, progress=False)
    before = out.read_text()
    jsonl = tmp_path / "task.jsonl"
    jsonl.write_text("".join(json.dumps({"input": f"verse {i}", "reference": f"verso {i}"}) + "\n" for i in range(3)))
    for change, fragment in (
            (dict(config=small_config(methods=["sd"], alphas={}, max_new_tokens=4)),
             "computed with max_new_tokens=3, but this run has max_new_tokens=4"),
            (dict(config=small_config(methods=["sd"], alphas={}, n_examples=3)),
             "computed with examples=2, but this run has examples=3"),
            (dict(task=get_task("jsonl", jsonl, "chrf")), "computed with task='bible_en_es', but this run has "
                                                          "task='jsonl:task.jsonl:chrf'"),
            (dict(backend="static"), "computed with backend='dynamic', but this run has backend='static'")):
        with pytest.raises(SweepFileError) as e:
            run_sweep(*shipped, change.get("task", get_task()), change.get("config", cfg), out, progress=False,
                      backend=change.get("backend", "dynamic"))
        assert fragment in str(e.value) and "write to a new --out file" in str(e.value)
        assert out.read_text() == before  # nothing appended
    # the dtype and the device (threads) are settings too
    import copy

    half = tuple(copy.deepcopy(m).to(torch.bfloat16) if i < 2 else m for i, m in enumerate(shipped))
    with pytest.raises(SweepFileError, match="computed with dtype='float32', but this run has dtype='bfloat16'"):
        run_sweep(*half, get_task(), cfg, out, progress=False)
    torch.set_num_threads(2)
    try:
        with pytest.raises(SweepFileError, match="computed with device='cpu:.*threads=1'"):
            run_sweep(*shipped, get_task(), cfg, out, progress=False)
    finally:
        torch.set_num_threads(1)
    # and where a cascade's bonus-position call runs on a GPU (its timing: loop.bonus_draft_beside); on
    # this CPU it always runs on the one stream, so the file says False whatever the switch
    from speccascade.eval.sweep import check_settings_match, read_records

    records = read_records(out)
    assert {r["signature"]["bonus_draft_beside"] for r in records} == {False}
    gpu_sig = dict(records[0]["signature"], device="NVIDIA H200")
    gpu_records = [dict(r, signature=dict(r["signature"], device="NVIDIA H200", bonus_draft_beside=True))
                   for r in records]
    with pytest.raises(SweepFileError, match="computed with bonus_draft_beside=True, but this run has "
                                             "bonus_draft_beside=False"):
        check_settings_match(out, gpu_records, dict(gpu_sig, bonus_draft_beside=False))
    # and whether the vocabulary's argmaxes were split into chunks (sampling.wide_argmax: its timing)
    assert {r["signature"]["split_argmax"] for r in records} == {True}
    with pytest.raises(SweepFileError, match="computed with split_argmax=True, but this run has split_argmax=False"):
        check_settings_match(out, records, dict(records[0]["signature"], split_argmax=False))
    # the same settings: nothing recomputed
    assert run_sweep(*shipped, get_task(), cfg, out, progress=False) == first


def test_a_second_writer_is_refused(shipped, tmp_path):
    out = tmp_path / "s.jsonl"
    with _Locked(out):
        with pytest.raises(SweepFileError, match="another sweep is writing"):
            run_sweep(*shipped, get_task(), small_config(methods=["sd"], alphas={}), out, progress=False)


def test_a_sweep_killed_mid_run_resumes_with_every_cell_once(shipped, tmp_path):
    out = tmp_path / "s.jsonl"
    args = [sys.executable, "-m", "speccascade", "sweep", "--methods", "sd,chow,diff", "--alphas", "chow=0.2,0.8;diff=0",
            "--examples", "3", "--max-new-tokens", "24", "--quiet", "--out", str(out)]
    proc = subprocess.Popen(args, env=os.environ | {"PYTHONPATH": str(SRC)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    kill_after_cells(proc, out, 2, timeout=60)
    # whatever the kill left (possibly half a line), the rerun completes the grid: every cell once
    cfg = SweepConfig(methods=["sd", "chow", "diff"], alphas={"chow": [0.2, 0.8], "diff": [0.0]}, n_examples=3,
                      max_new_tokens=24)
    done_before = [r["key"] for r in read_records(out) if r["type"] == "cell"]
    assert 2 <= len(done_before) < len(cfg.cells())
    records = run_sweep(*shipped, get_task(), cfg, out, progress=False)
    keys = [r["key"] for r in records if r["type"] == "cell"]
    assert keys[:len(done_before)] == done_before
    assert sorted(keys) == sorted(c.key for c in cfg.cells()) and len(keys) == len(set(keys)) == 5
    assert all(json.loads(x) for x in out.read_text().splitlines())


# --------------------------------------------------------------------------------------------
# report


def cell(method="verifier_only", **kw):
    return {"type": "cell", "key": method, "method": method, "alpha": None, "gamma": 5, "temperature": 1.0, "seed": 0,
            "batch_size": 1, "quality": {"bleu": 10.0}, "relative_latency": 1.0, "latency_s": 1.0, "rejection_rate": 0.0,
            "stats": {"drafter_calls": 0, "verifier_calls": 10}} | kw


REPORT_CASES = [
    ("missing", None, SweepFileError, "sweep file '{p}' does not exist"),
    ("empty", b"", SweepFileError, "sweep file '{p}' is empty"),
    ("blank lines", b"\n\n", SweepFileError, "sweep file '{p}' holds no records"),
    ("binary", bytes(range(256)) * 4, SweepFileError, "'{p}' is not a text file (byte 128 is not UTF-8)"),
    ("a JSON list", b"[1, 2]\n", SweepFileError, "line 1 of '{p}' is not a sweep record"),
    ("another JSONL", b'{"input": "a", "reference": "b"}\n', SweepFileError, "line 1 of '{p}' is not a sweep record"),
    ("damaged middle line", (json.dumps(cell()) + "\n{oops\n" + json.dumps(cell("sd")) + "\n").encode(), SweepFileError,
     "line 2 of '{p}' is not a JSON record"),
    ("a cell without quality", (json.dumps({k: v for k, v in cell().items() if k != "quality"}) + "\n").encode(),
     SweepFileError, "record 1 of '{p}' is a cell without quality"),
    ("costs only", (json.dumps({"type": "costs", "gamma": 5}) + "\n").encode(), SweepFileError,
     "hold no cell records (only per-call costs)"),
    ("no verifier_only", (json.dumps(cell("sd")) + "\n").encode(), SweepFileError,
     "hold no verifier_only cell: every relative latency and Table 2 compare with the verifier alone"),
    ("unknown metric", (json.dumps(cell()) + "\n").encode(), SpecCascadeError,
     "metric 'chrf' is not in every cell's quality; choose one of bleu"),
]


@pytest.mark.parametrize("name,content,exc,fragment", REPORT_CASES, ids=[c[0] for c in REPORT_CASES])
def test_report_bad_file(tmp_path, name, content, exc, fragment):
    p = tmp_path / "s.jsonl"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(exc) as e:
        report(p, tmp_path / "rep", metric="chrf" if name == "unknown metric" else None)
    assert fragment.format(p=p) in str(e.value)


def test_report_cli_and_a_torn_tail(tmp_path, capsys):
    p = tmp_path / "s.jsonl"
    p.write_text(json.dumps(cell()) + "\n" + json.dumps(cell("sd", relative_latency=0.5)) + "\n" + '{"type": "ce')
    rc, out, err = run_cli(capsys, "report", str(p), "--out", str(tmp_path / "rep"))
    assert rc == 0 and "note: " in out and "ignored a torn last line (12 characters" in out
    assert "| sd | 2.00× |" in out
    (tmp_path / "plain").write_text("x")
    rc, out, err = run_cli(capsys, "report", str(p), "--out", str(tmp_path / "plain"))
    assert rc == 2 and "--out '" + str(tmp_path / "plain") + "' is a file; give a folder for the report" in err


def test_report_reads_a_gzipped_sweep_file_and_the_sweep_refuses_to_append_to_one(tmp_path, capsys):
    import gzip

    from speccascade.eval.sweep import SweepFileError, check_out_file

    lines = json.dumps(cell()) + "\n" + json.dumps(cell("sd", relative_latency=0.5)) + "\n"
    gz = tmp_path / "s.jsonl.gz"
    gz.write_bytes(gzip.compress(lines.encode()))
    rc, out, err = run_cli(capsys, "report", str(gz), "--out", str(tmp_path / "rep"))
    assert rc == 0 and "| sd | 2.00× |" in out
    with pytest.raises(SweepFileError, match="is gzip-compressed; a sweep appends plain JSON lines"):
        check_out_file(gz)
    disguised = tmp_path / "s.jsonl"  # compressed content under a plain name
    disguised.write_bytes(gzip.compress(lines.encode()))
    with pytest.raises(SweepFileError, match="is gzip-compressed"):
        check_out_file(disguised)
    gz.write_bytes(gzip.compress(lines.encode())[:-12])  # cut short
    rc, out, err = run_cli(capsys, "report", str(gz), "--out", str(tmp_path / "rep2"))
    assert rc == 2 and "is a damaged gzip file" in err


# --------------------------------------------------------------------------------------------
# train, the stats line, `methods`, and no traceback from the real command line


def test_a_short_train_budget_still_saves_a_usable_checkpoint(tmp_path):
    from speccascade.train.trainer import train

    log = train("tiny", "drafter", tmp_path / "d", TOKENIZER_DIR, max_minutes=1e-4, progress=False, bleu_pairs=0)
    assert log["steps"] >= 1 and log["best"]["val_loss"] is None and "before the first evaluation" in log["best"]["note"]
    model = load_causal_lm(tmp_path / "d", role="drafter")
    tok = load_tokenizer(tmp_path / "d")
    assert model.config.hidden_size == 64 and len(tok) == 8000


def test_stats_line_says_what_applies(pair):
    d, v = pair
    kw = dict(max_new_tokens=6, eos_token_id=[], temperature=1.0)
    spec = sc.generate(d, v, [[5, 6]], method="opt", **kw).stats.summary("opt")
    base = sc.generate(d, v, [[5, 6]], method="verifier_only", **kw).stats
    assert "acceptance rate" in spec and "deferred" in spec and "examined drafts whose target demanded" in spec
    line = base.summary("verifier_only")
    assert line.startswith("6 tokens in ") and "acceptance" not in line and "drafter calls" not in line \
        and "deferred" not in line and "6 verifier calls" in line
    seq = sc.generate(d, v, [[5, 6]], method="seq_cascade", alpha=1.0, **kw).stats.summary("seq_cascade")
    assert "acceptance" not in seq and "deferred 0 (responses regenerated by the verifier)" in seq
    tc = sc.generate(d, v, [[5, 6]], method="token_cascade", alpha=0.0, **kw).stats
    assert "deferred 6 (tokens drawn from the verifier instead of the drafter)" in tc.summary("token_cascade")
    fast = sc.generate(d, v, [[5, 6]], method="drafter_only", **kw).stats
    ratio = fast.tokens_per_second / base.tokens_per_second
    assert f"speed-up vs verifier_only {ratio:.2f}x" in fast.summary("drafter_only", base)


def test_generate_compare_and_methods_output(capsys):
    rc, out, err = run_cli(capsys, "generate", "Jesus wept.", "--compare", "--quiet", "--max-new-tokens", "8")
    assert rc == 0 and out.strip() == "Y lloró Jesús."
    assert err.startswith("[token_v3 alpha=0.5 gamma=5 T=0] ") and "speed-up vs verifier_only " in err
    rc, out, err = run_cli(capsys, "generate", "Jesus wept.", "--method", "verifier_only", "--quiet")
    assert err.startswith("[verifier_only T=0] ") and "gamma" not in err and "acceptance" not in err
    rc, out, err = run_cli(capsys, "generate", "Jesus wept.", "--method", "seq_cascade", "--quiet", "--option",
                           "length_normalized=false", "--json")
    assert rc == 0 and json.loads(out)["eos_token_id"] == [2]
    rc, out, err = run_cli(capsys, "methods")
    assert "'deferred' counts:" in out and "seq_cascade: responses regenerated by the verifier" in out
    assert "length_normalized = true or false (default false)" in out
    assert "max_drafter_run = an integer >= 1 or none (default 10)" in out


def test_sweep_option_false_is_false(shipped, tmp_path, capsys):
    from speccascade.cli import parse_option

    assert parse_option("seq_cascade.length_normalized=false") == ("seq_cascade", "length_normalized", False)
    assert parse_option("seq_cascade.length_normalized=False") == ("seq_cascade", "length_normalized", False)
    assert parse_option("length_normalized=TRUE", "seq_cascade")[2] is True
    assert parse_option("bild.max_drafter_run=none") == ("bild", "max_drafter_run", None)


@pytest.mark.parametrize("argv,fragment", [
    (["generate", "x", "--device", "cuda"], "speccascade: error: device 'cuda' for the drafter and verifier"),
    (["report", "{bin}"], "speccascade: error: '{bin}' is not a text file"),
])
def test_no_traceback_from_the_command_line(tmp_path, argv, fragment):
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(bytes(range(256)))
    argv = [a.format(bin=binary) for a in argv]
    res = subprocess.run([sys.executable, "-m", "speccascade", *argv], env=os.environ | {"PYTHONPATH": str(SRC)},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(fragment.format(bin=binary))
