"""A drafter that reads the verifier's states (speccascade.models.features) in the one speculative loop.

The law: with such a drafter, q at a position depends on the prefix and on where the block
started (the first draft reads the verifier's true state, later ones the drafter's own). The whole
loop's law of 3 tokens (20,000 rows, chi-square at level 1e-3) is tested against Algorithm 4's law
enumerated with that q, recomputed from its definition with fresh, cache-free forward passes of
both models (helpers.check_feature_law), through the dynamic and the fused backends; for sd that
law is the verifier's own. On a GPU, tests/test_gpu.py runs it through the compiled fused backends.
"""

import pytest
import torch

import speccascade as sc
from speccascade.models import FeatureHFBackend, HFBackend, LlamaFeatureDrafter, make_backend
from speccascade.models.loading import load_causal_lm

from helpers import ALPHA, check_feature_law, feature_pair
from tiny_models import tiny_pair


def test_the_verifiers_states_are_what_its_head_reads():
    _, v = tiny_pair(0)
    b = HFBackend(v, "verifier")
    ids = torch.tensor([[0, 5, 6, 7], [3, 4, 5, 6]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    prompt_states = b.reset_hidden(ids, mask)
    feed = torch.tensor([[7, 9], [6, 11]])
    logits, states = b.extend_hidden(feed, torch.tensor([1, 2]))
    with torch.no_grad():
        whole = v.model(input_ids=torch.tensor([[3, 4, 5, 6, 11]])).last_hidden_state[0]
        torch.testing.assert_close(prompt_states[1], whole[:3])
        torch.testing.assert_close(states[1], whole[3:])
        torch.testing.assert_close(logits[1], v.lm_head(whole[3:]).float(), rtol=1e-5, atol=1e-5)
        first = v.model(input_ids=torch.tensor([[5, 6, 7]])).last_hidden_state[0]   # row 0, left-padded
        torch.testing.assert_close(prompt_states[0, 1:], first[:2])
        torch.testing.assert_close(states[0, 0], first[2])
    b.commit(torch.tensor([1, 2]))
    assert b.extend(torch.tensor([[1], [1]])).shape == (2, 1, v.config.vocab_size) and b.hidden is None


def test_a_feature_drafter_starts_as_its_drafter_and_saves(tmp_path):
    d, _ = tiny_pair(0)
    fd = LlamaFeatureDrafter.from_drafter(d).eval()
    ids = torch.tensor([[1, 5, 9, 3]])
    feats = torch.randn(1, 4, d.config.hidden_size)
    with torch.no_grad():
        same = fd(inputs_embeds=fd.feature_embeddings(ids, feats)).logits
        torch.testing.assert_close(same, d(input_ids=ids).logits)
        fd.feature_mix.weight.normal_(0, 0.1)
        moved = fd(inputs_embeds=fd.feature_embeddings(ids, feats)).logits
    assert not torch.allclose(moved, same)
    fd.save_pretrained(tmp_path / "fd")
    back = load_causal_lm(tmp_path / "fd", role="drafter")
    assert isinstance(back, LlamaFeatureDrafter)
    with torch.no_grad():
        torch.testing.assert_close(back(inputs_embeds=back.feature_embeddings(ids, feats)).logits, moved)
    assert isinstance(make_backend(back, "drafter", "dynamic"), FeatureHFBackend)
    with pytest.raises(sc.SpecCascadeError, match="feature drafter.*dynamic, fused"):
        make_backend(back, "drafter", "static")


def backends(fd, v, kind):
    return (fd, v) if kind == "models" else (make_backend(fd, "drafter", kind), make_backend(v, "verifier", kind))


@pytest.mark.parametrize("kind", ["models", "fused"])
@pytest.mark.parametrize("name", ["sd", "opt"])
def test_loop_law_with_a_feature_drafter(name, kind):
    """Through the dynamic backends (models given as they are) and the fused ones (eager on a CPU)."""
    fd, v = feature_pair()
    check_feature_law(name, fd, v, *backends(fd, v, kind))


@pytest.mark.parametrize("name", ["opt", "diff"])
def test_loop_law_with_a_feature_drafter_and_its_bonus_draft_beside_the_verifier(name, monkeypatch):
    """The block's call at the bonus position (the drafter's own state in, q_{t+gamma} out) made while the
    verifier scores, as a captured block on a GPU makes it (loop.bonus_draft_beside): the same law."""
    from speccascade import loop

    moved = []
    monkeypatch.setattr(loop, "bonus_draft_beside", lambda drafter, verifier, req, compiled: moved.append(1) or True)
    fd, v = feature_pair()
    check_feature_law(name, fd, v, *backends(fd, v, "fused"))
    assert moved


def test_rows_of_a_padded_batch_decode_as_alone_with_a_feature_drafter():
    """Left padding: a row's first real token reads no state, whatever the padding before it; greedy
    opt (whose output follows the drafter's q) gives each row what it gives alone."""
    fd, v = feature_pair(1)
    prompts = [[1, 2, 3, 4, 5], [3, 4], [5]]
    kw = dict(method="opt", alpha=ALPHA["opt"], gamma=3, temperature=0.0, max_new_tokens=12, eos_token_id=[])
    together = sc.generate(fd, v, prompts, **kw).tokens
    alone = [sc.generate(fd, v, [p], **kw).tokens[0] for p in prompts]
    assert together == alone
    # and the drafter's q mattered: a token-only drafter (the map's feature half zeroed) decodes otherwise
    with torch.no_grad():
        fd.feature_mix.weight[:, fd.config.hidden_size:] = 0
    assert sc.generate(fd, v, prompts, **kw).tokens != together


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_fused_backends_decode_a_feature_drafter_as_the_dynamic_ones(temperature, simulated_capture):
    """The same tokens from the fused backends (whose block is captured: simulated here) as from the
    dynamic ones, for every kind of block: sd (the bonus from p), a cascade (q at the bonus position),
    ragged rows and left padding; and the fused verifier's states are its head's input."""
    fd, v = feature_pair(2)
    prompts = [[1, 2, 3, 4, 5], [3, 4], [5, 1, 2]]
    for name in ("sd", "opt", "token_v3"):
        kw = dict(method=name, alpha=ALPHA[name], gamma=3, temperature=temperature, max_new_tokens=14,
                  eos_token_id=[], seed=3)
        assert sc.generate(*backends(fd, v, "fused"), prompts, **kw).tokens == \
            sc.generate(fd, v, prompts, **kw).tokens, name
    assert simulated_capture, "the fused feature block was not captured"
    fv = make_backend(v, "verifier", "fused")
    ids, mask = torch.tensor([[0, 1, 2, 3], [4, 5, 1, 2]]), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    fv.reserve(2, 16)
    prompt_states = fv.reset_hidden(ids, mask)
    logits, states = fv.extend_hidden(torch.tensor([[3, 4], [2, 5]]))
    with torch.no_grad():
        whole = v.model(input_ids=torch.tensor([[4, 5, 1, 2, 5]])).last_hidden_state[0]
        torch.testing.assert_close(prompt_states[1], whole[:3], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(states[1], whole[3:], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits[1], v.lm_head(whole[3:]).float(), rtol=1e-4, atol=1e-4)


def test_the_compiled_fused_bookkeeping_with_a_feature_drafter(simulated_calls, monkeypatch):
    """What the fused backends do differently when compiled, with the regions left eager: prompts
    pre-filled left-padded to a compiled width (the states of the real positions returned), host-driven
    calls, the pre-fills with states or features too, as (simulated) graph replays; the tokens stay the
    dynamic backends'."""
    from speccascade import loop

    monkeypatch.setattr(loop, "_compiled", lambda fn: fn)   # the block's arithmetic eager
    fd, v = feature_pair(2)
    bd, bv = make_backend(fd, "drafter", "fused"), make_backend(v, "verifier", "fused")
    bd.compiled = bv.compiled = True
    prompts = [[1, 2, 3, 4, 5], [3, 4], [5, 1, 2]]
    for name, T in (("sd", 0.0), ("opt", 1.0)):
        kw = dict(method=name, alpha=ALPHA[name], gamma=3, temperature=T, max_new_tokens=10, eos_token_id=[], seed=5)
        assert sc.generate(bd, bv, prompts, **kw).tokens == sc.generate(fd, v, prompts, **kw).tokens, name
    bv.reserve(1, 16)
    replays = simulated_calls.replays
    states = bv.reset_hidden(torch.tensor([[4, 5, 1, 2]]), torch.ones(1, 4, dtype=torch.long))
    assert simulated_calls.replays == replays + 1, "the verifier's pre-fill with states is not one graph replay"
    with torch.no_grad():
        torch.testing.assert_close(states[0], v.model(input_ids=torch.tensor([[4, 5, 1]])).last_hidden_state[0],
                                   rtol=1e-4, atol=1e-4)
    bd.reserve(1, 16)
    bd.reset(torch.tensor([[4, 5, 1, 2]]), torch.ones(1, 4, dtype=torch.long),
             features=torch.zeros(1, 3, bd.feature_size))
    assert simulated_calls.replays == replays + 2, "the feature drafter's pre-fill is not one graph replay"


def test_a_feature_drafter_needs_a_backend_that_gives_states_and_the_speculative_loop():
    fd, v = feature_pair()
    with pytest.raises(sc.SpecCascadeError, match="dynamic or fused"):
        sc.generate(fd, make_backend(v, "verifier", "static"), [[1, 2]], method="sd", max_new_tokens=4)
    for backend in (fd, make_backend(fd, "drafter", "fused")):
        with pytest.raises(sc.SpecCascadeError, match="feature drafter"):
            sc.generate(backend, v, [[1, 2, 3]], method="drafter_only", max_new_tokens=4)
    with pytest.raises(sc.SpecCascadeError, match="feature drafter"):
        make_backend(fd, "drafter", "graphs")
    _, wider = tiny_pair(0, hidden=64, vocab=6)
    with pytest.raises(sc.SpecCascadeError, match="states 32 wide; the verifier's are 64"):
        sc.generate(fd, wider, [[1, 2]], method="sd", max_new_tokens=4)


@pytest.mark.parametrize("backend", ["dynamic", "fused"])
def test_a_sweep_runs_a_feature_drafter(backend, tmp_path):
    """The sweep (its warm-up, its per-call costs, its timed cells) with a feature drafter of the
    shipped tiny verifier's width (its first layer, as a 1-layer drafter)."""
    from transformers import LlamaForCausalLM

    from speccascade.eval.sweep import SweepConfig, run_sweep
    from speccascade.eval.tasks import get_task
    from speccascade.models.loading import TOKENIZER_DIR, embedded_pair_dirs
    from speccascade.train.tokenizer import load_tokenizer
    from speccascade.train.trainer import copy_first_layers

    v = load_causal_lm(embedded_pair_dirs("tiny")[1], role="verifier")
    cut = LlamaForCausalLM(v.config.__class__(**(v.config.to_dict() | {"num_hidden_layers": 1})))
    copy_first_layers(cut, v)
    fd = LlamaFeatureDrafter.from_drafter(cut).eval()
    cfg = SweepConfig(methods=["sd", "opt"], alphas={"opt": [0.5]}, temperatures=[0.0], n_examples=2,
                      max_new_tokens=6)
    records = run_sweep(fd, v, load_tokenizer(TOKENIZER_DIR), get_task("bible_en_es"), cfg, tmp_path / "s.jsonl",
                        progress=False, backend=backend)
    cells = {r["method"]: r for r in records if r["type"] == "cell"}
    assert set(cells) == {"verifier_only", "sd", "opt"}
    assert cells["sd"]["stats"]["drafted"] > 0 and cells["sd"]["quality"] == cells["verifier_only"]["quality"]
    # the verifier's pre-fill with states and the drafter's first call of a block, timed apart
    costs = next(r for r in records if r["type"] == "costs")
    assert all(costs[k] > 0 for k in ("verifier_prefill_states_s", "drafter_prefill_s", "drafter_first_call_s"))
