"""The Hugging Face backend: its cache after ragged extend / commit gives exactly the logits of a
fresh forward pass over each row's committed sequence."""

import torch

from speccascade.models import HFBackend
from tiny_models import tiny_llama


def fresh_logits(model, seq):
    with torch.no_grad():
        return model(torch.tensor([seq])).logits[0, -1].float()


def test_ragged_extend_commit_matches_fresh_forward():
    model = tiny_llama(0)
    be = HFBackend(model, "verifier")
    g = torch.Generator().manual_seed(0)
    prompts = [[5, 6, 7, 8, 9], [11, 12], [13]]
    L = max(map(len, prompts))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    be.reset(ids, mask)
    seqs = [list(p[:-1]) for p in prompts]  # what each row's cache holds (the last prompt token is pending)
    for step in range(12):
        k = int(torch.randint(1, 5, (1,), generator=g))
        tokens = torch.randint(3, 48, (3, k), generator=g)
        lengths = torch.randint(1, k + 1, (3,), generator=g)
        logits = be.extend(tokens, lengths)
        for b in range(3):
            # logits after each real fed token equal a fresh forward over the sequence so far
            for i in range(int(lengths[b])):
                seq = seqs[b] + tokens[b, :i + 1].tolist()
                torch.testing.assert_close(logits[b, i], fresh_logits(model, seq), atol=2e-5, rtol=1e-4)
        n_keep = torch.stack([torch.randint(0, int(lengths[b]) + 1, (1,), generator=g)[0] for b in range(3)])
        be.commit(n_keep)
        for b in range(3):
            seqs[b] = seqs[b] + tokens[b, :int(n_keep[b])].tolist()
    # after all commits the cache holds no slot that no row uses
    assert be.valid.any(0).all()


def test_batch_one_rollback_is_exact_crop():
    model = tiny_llama(1)
    be = HFBackend(model, "drafter")
    be.reset(torch.tensor([[4, 5, 6]]), torch.ones(1, 3, dtype=torch.long))
    be.extend(torch.tensor([[6, 7, 8, 9]]))
    be.commit(torch.tensor([2]))
    assert be.valid.shape[1] == 2 + 2 and bool(be.valid.all())
    assert be.cache.get_seq_length() == 4


def test_static_backend_matches_dynamic():
    """The pre-allocated cache gives the same greedy tokens as the verifier alone, and the same
    sampled tokens as the dynamic backend with the same seed, batched with ragged prompts."""
    import speccascade as sc
    from speccascade.models import StaticHFBackend
    from tiny_models import tiny_pair

    d, v = tiny_pair(0, noise=0.05)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16], [17]]
    ref = sc.generate(d, v, prompts, method="verifier_only", temperature=0, max_new_tokens=16).tokens
    sd_, sv = StaticHFBackend(d, "drafter", 128), StaticHFBackend(v, "verifier", 128)
    for gamma in (1, 4):
        assert sc.generate(sd_, sv, prompts, method="sd", temperature=0, gamma=gamma, max_new_tokens=16).tokens == ref
    dyn = sc.generate(d, v, prompts, method="token_v3", temperature=1, gamma=3, max_new_tokens=16, seed=3).tokens
    assert sc.generate(sd_, sv, prompts, method="token_v3", temperature=1, gamma=3, max_new_tokens=16, seed=3).tokens == dyn


def test_timed_backend_measures_share_outside_forwards():
    import speccascade as sc
    from speccascade.models import HFBackend
    from speccascade.models.timing import TimedBackend, outside_share
    from tiny_models import tiny_pair

    d, v = tiny_pair(0, noise=0.05)
    td, tv = TimedBackend(HFBackend(d, "drafter")), TimedBackend(HFBackend(v, "verifier"))
    out = sc.generate(td, tv, [[5, 6, 7]], method="sd", gamma=3, max_new_tokens=12, temperature=0)
    assert out.tokens == sc.generate(d, v, [[5, 6, 7]], method="verifier_only", max_new_tokens=12, temperature=0).tokens
    assert td.calls == out.stats.drafter_calls + 1 and tv.calls == out.stats.verifier_calls + 1  # + reset
    share = outside_share(out.stats.wall_time_s, td, tv)
    assert 0.0 <= share < 1.0
