"""A drafter that reads the verifier's states (speccascade.models.features) in the one speculative loop.

The law: with such a drafter, q at a position depends on the prefix and on where the block
started (the first draft reads the verifier's true state, later ones the drafter's own). The whole
loop's law of 3 tokens (20,000 rows, chi-square at level 1e-3) is tested against Algorithm 4's law
enumerated with that q, recomputed here from its definition with fresh, cache-free forward passes
of both models; for sd that law is the verifier's own.
"""

import pytest
import torch

import speccascade as sc
from speccascade.models import FeatureHFBackend, HFBackend, LlamaFeatureDrafter, make_backend
from speccascade.models.loading import load_causal_lm

from helpers import ALPHA, LAW_LEVEL, LAW_PROMPT, LAW_ROWS, LAW_TOKENS, chi2_pvalue, empirical
from reference import algorithm4_law, reference_rule, sampling_dist, softmax
from tiny_models import tiny_pair


def feature_pair(seed=0, mix=4.0, vocab=6, sharp=6.0):
    """A tiny verifier (``vocab`` tokens) and a feature drafter made from a noisy copy of it, its feature
    map moved off [I, 0] so that the features change its logits; both heads scaled by ``sharp``, so
    that the distributions are far from uniform and the drafter's q differs from p."""
    d, v = tiny_pair(seed, noise=0.3, vocab=vocab)
    fd = LlamaFeatureDrafter.from_drafter(d)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        fd.feature_mix.weight.add_(torch.randn(fd.feature_mix.weight.shape, generator=g) * mix / 8)
        for m in (fd, v):
            m.lm_head.weight.mul_(sharp)
    return fd.eval(), v


def definition(fd, v):
    """q's logits at (prefix, j) from the definition, without a cache: positions up to the block's
    pending one (P = len - 1 - j) read the verifier's state at the position before (zeros at 0),
    later ones the drafter's own state there, itself computed the same way. Also p's logits."""
    memo_v, memo_d = {}, {}

    def verifier_states(prefix):
        if prefix not in memo_v:
            with torch.no_grad():
                h = v.model(input_ids=torch.tensor([list(prefix)])).last_hidden_state
                memo_v[prefix] = (h[0], v.lm_head(h)[0, -1].double().numpy())
        return memo_v[prefix]

    def drafter_at(prefix, j):   # -> (logits at the last position, own state there)
        key = (prefix, j)
        if key not in memo_d:
            m = len(prefix)
            P = m - 1 - j
            f = verifier_states(prefix[:P + 1])[0] if P >= 1 else None
            feats = torch.zeros(m, fd.config.hidden_size)
            for i in range(1, m):
                feats[i] = f[i - 1] if i <= P else drafter_at(prefix[:i], i - 1 - P)[1]
            with torch.no_grad():
                h = fd.model(inputs_embeds=fd.feature_embeddings(torch.tensor([list(prefix)]), feats[None]))
                h = h.last_hidden_state[0, -1]
                memo_d[key] = (fd.lm_head(h).double().numpy(), h)
        return memo_d[key]

    return (lambda prefix, j: drafter_at(tuple(prefix), j)[0]), (lambda prefix: verifier_states(tuple(prefix))[1])


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
    with pytest.raises(sc.SpecCascadeError, match="feature drafter.*dynamic"):
        make_backend(back, "drafter", "static")


@pytest.mark.parametrize("name", ["sd", "opt"])
def test_loop_law_with_a_feature_drafter(name):
    fd, v = feature_pair()
    q_logits, p_logits = definition(fd, v)
    gamma, alpha = 3, ALPHA[name]
    out = sc.generate(fd, v, torch.tensor([LAW_PROMPT] * LAW_ROWS), method=name, alpha=alpha, gamma=gamma,
                      max_new_tokens=LAW_TOKENS, seed=0, temperature=1.0, eos_token_id=[])
    assert all(len(t) == LAW_TOKENS for t in out.tokens)
    spec = sc.METHODS[name]
    def law_of(q_at):
        return algorithm4_law(lambda pre, j: sampling_dist(q_at(pre, j)), lambda pre: sampling_dist(p_logits(pre)),
                              lambda q, p, pre, j: reference_rule(name, q, p, softmax(q_at(pre, j)),
                                                                  softmax(p_logits(pre)), alpha)[0],
                              (lambda q, p, pi: p) if spec.bonus_from_verifier else (lambda q, p, pi: pi),
                              gamma=gamma, prompt=LAW_PROMPT, n=LAW_TOKENS, in_block=True)

    law = law_of(q_logits)
    assert abs(sum(law.values()) - 1) < 1e-9
    counts = empirical(out.tokens)
    assert chi2_pvalue(counts, law, LAW_ROWS) > LAW_LEVEL
    if name != "sd":   # the test has the power to see a drafter reading the verifier's state at every draft
        assert chi2_pvalue(counts, law_of(lambda pre, j: q_logits(pre, 0)), LAW_ROWS) < LAW_LEVEL
    if name == "sd":   # lossless: the verifier's own law
        seq = algorithm4_law(lambda pre: sampling_dist(p_logits(pre)), lambda pre: sampling_dist(p_logits(pre)),
                             lambda q, p, pre: p, lambda q, p, pi: p, gamma=1, prompt=LAW_PROMPT, n=LAW_TOKENS)
        assert max(abs(law[k] - seq.get(k, 0.0)) for k in law) < 1e-9


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


def test_a_feature_drafter_needs_the_dynamic_backend_and_the_speculative_loop():
    fd, v = feature_pair()
    with pytest.raises(sc.SpecCascadeError, match="dynamic"):
        sc.generate(fd, make_backend(v, "verifier", "static"), [[1, 2]], method="sd", max_new_tokens=4)
    with pytest.raises(sc.SpecCascadeError, match="feature drafter"):
        sc.generate(fd, v, [[1, 2, 3]], method="drafter_only", max_new_tokens=4)
