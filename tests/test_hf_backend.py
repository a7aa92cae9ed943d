"""The Hugging Face backend: its cache after ragged extend / commit gives exactly the logits of a
fresh forward pass over each row's committed sequence."""

import pytest
import torch

from speccascade.models import HFBackend, StaticHFBackend

from helpers import check_static_matches_dynamic
from tiny_models import tiny_llama


def fresh_logits(model, seq):
    with torch.no_grad():
        return model(torch.tensor([seq])).logits[0, -1].float()


@pytest.mark.parametrize("kind,arch", [("dynamic", "llama"), ("static", "llama"), ("fused", "llama"),
                                       ("fused", "qwen2")])
def test_ragged_extend_commit_matches_fresh_forward(kind, arch):
    """After random ragged feeds and commits, every backend's logits equal a fresh forward over each
    row's sequence (the fused backend: our own Llama-family step, GQA, and Qwen2's q/k/v biases)."""
    from speccascade.models import FusedLlamaBackend

    from tiny_models import tiny_qwen2

    model = tiny_llama(0) if arch == "llama" else tiny_qwen2(0)
    be = {"dynamic": lambda: HFBackend(model, "verifier"), "static": lambda: StaticHFBackend(model, "verifier", 256),
          "fused": lambda: FusedLlamaBackend(model, "verifier")}[kind]()
    g = torch.Generator().manual_seed(0)
    prompts = [[5, 6, 7, 8, 9], [11, 12], [13]]
    L = max(map(len, prompts))
    ids = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    if kind == "fused":
        be.reserve(3, 80)
    be.reset(ids, mask)
    seqs = [list(p[:-1]) for p in prompts]  # what each row's cache holds (the last prompt token is pending)
    for _ in range(12):
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
    if kind == "dynamic":  # after all commits the cache holds no slot that no row uses
        assert be.valid.any(0).all()
    if kind == "fused":   # the position counts are each row's sequence length
        assert be.n_pos.tolist() == [len(s) for s in seqs]


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
    check_static_matches_dynamic(compile=False)


@pytest.mark.slow
def test_compiled_static_backend_matches_dynamic():
    """The same under torch.compile (on the CPU: inductor's C++ code, no CUDA graphs; the GPU
    run of tests/test_gpu.py covers CUDA graphs). Ragged feeds of several widths (token_cascade,
    BiLD) each meet a padded, compiled shape."""
    check_static_matches_dynamic(compile=True)


class SimulatedGraphs:
    """A stand-in for a captured CUDA graph on the CPU: a replay recomputes the captured call from
    the same static input buffers into the same output tensor, as a replay does on a GPU."""

    def __init__(self, fn, tokens, valid, logits):
        self.fn, self.tokens, self.valid, self.logits = fn, tokens, valid, logits

    def replay(self):
        self.logits.copy_(self.fn(self.tokens, self.valid))


def simulated_graph_backend(model, name, max_cache_len, compile=True):
    from speccascade.models import GraphHFBackend

    class OnCPU(GraphHFBackend):
        requires_cuda = False

        def _capture(self, tokens, valid):
            for _ in range(2):  # the warm-up calls advance the state, as on a GPU
                self._inner(tokens, valid)
            logits = self._inner(tokens, valid)
            return SimulatedGraphs(self._inner, tokens, valid, logits), logits

    return OnCPU(model, name, max_cache_len)


@pytest.mark.slow
def test_graph_backend_bookkeeping_with_simulated_graphs_matches_dynamic():
    """GraphHFBackend's own logic on the CPU (capture replaced by a simulation): the state is clean
    after the captures, each replay reads the static input buffers and overwrites one output tensor
    (so extend must hand out copies), widths without a graph fall back to the compiled step. Greedy
    and seeded tokens equal the dynamic backend's. (CUDA-graph capture itself: tests/test_gpu.py.)"""
    check_static_matches_dynamic(compile=True, factory=simulated_graph_backend)
    # a replay overwrites its output tensor: what extend returned earlier must not change
    be = simulated_graph_backend(tiny_llama(0), "verifier", 128)
    be.reset(torch.tensor([[4, 5, 6]]), torch.ones(1, 3, dtype=torch.long))
    first = be.extend(torch.tensor([[7]]))
    kept = first.clone()
    be.commit(torch.tensor([1]))
    second = be.extend(torch.tensor([[9]]))
    assert torch.equal(first, kept) and not torch.equal(first, second)


def test_graph_backend_needs_cuda_and_bucket_widths():
    from speccascade.errors import SpecCascadeError
    from speccascade.models import GraphHFBackend, make_backend

    with pytest.raises(SpecCascadeError, match="captures CUDA graphs"):
        GraphHFBackend(tiny_llama(0), "verifier", 64)
    with pytest.raises(SpecCascadeError, match="captures CUDA graphs"):
        make_backend(tiny_llama(0), "verifier", "graphs")


def test_bucket_widths():
    from speccascade.models import bucket

    assert [bucket(k) for k in (1, 2, 3, 5, 6, 8, 9, 64, 65, 130)] == [1, 2, 4, 8, 8, 8, 16, 64, 128, 256]


def test_static_cache_full_is_a_clear_error():
    from speccascade.errors import SpecCascadeError

    be = StaticHFBackend(tiny_llama(0), "verifier", 70)
    be.reset(torch.tensor([[4, 5, 6]]), torch.ones(1, 3, dtype=torch.long))   # the prompt takes 64 slots
    be.extend(torch.tensor([[6, 7, 8, 9]]))
    with pytest.raises(SpecCascadeError, match="static cache is full"):
        be.extend(torch.tensor([[6, 7, 8, 9]]))


def test_reading_flags_one_step_late_changes_nothing():
    """On a GPU the host reads each step's flags one step late (StepSync); forced on here, every
    method gives the same tokens and the same stats as reading them at once."""
    import speccascade as sc
    from speccascade.loop import StepSync

    from tiny_models import tiny_pair

    d, v = tiny_pair(0, noise=0.05)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16], [17]]
    try:
        for method in sc.METHODS:
            runs = []
            for lag in (False, True):
                StepSync.lagged = lag
                o = sc.generate(d, v, prompts, method=method, temperature=1, gamma=3, max_new_tokens=12, seed=3,
                                eos_token_id=20)
                stats = {k: x for k, x in vars(o.stats).items()
                         if "time" not in k and "per_second" not in k and k not in ("steps_past_end", "end_waits")}
                runs.append((o.tokens, stats))
            assert runs[0] == runs[1], method
    finally:
        StepSync.lagged = None


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
    # both models' calls (reset included) happen inside generate's clock
    inside = td.seconds + tv.seconds
    assert td.seconds > 0 and tv.seconds > 0 and inside < out.stats.wall_time_s
    assert outside_share(out.stats.wall_time_s, td, tv) == 1.0 - inside / out.stats.wall_time_s


def test_outside_share_arithmetic():
    class Timed:  # what outside_share reads of a TimedBackend
        def __init__(self, seconds):
            self.seconds = seconds

    from speccascade.models.timing import outside_share

    assert outside_share(8.0, Timed(1.0), Timed(3.0)) == 0.5
    assert outside_share(8.0) == 1.0                          # no backend: all of it is outside
    assert outside_share(2.0, Timed(1.5), Timed(1.0)) == 0.0   # timer noise past the total is clamped
    assert outside_share(0.0, Timed(1.0)) == 0.0


def test_lagged_flags_near_the_end_wait_for_the_step_just_queued():
    """runner.StepSync with the flags read one step late: "near the end" makes the host read the
    step just queued at once (done there: no step past the end; not done: carry on, one step
    late again), a plain step is read one step late, and a step past the end is undone in the stats."""
    from speccascade.runner import StepSync, step_flags
    from speccascade.stats import Stats

    def flags(done, near):
        return step_flags(torch.tensor([done]), [torch.tensor(False)], torch.tensor([1]), torch.tensor([near]))

    class Lagged(StepSync):
        lagged = True

    # a false alarm, then the real end: [plain, near (not last), plain, near, last]
    stats = Stats()
    sync = Lagged(torch.device("cpu"), stats, ["verifier"])
    seen = []
    for done, near in [(False, False), (False, True), (False, False), (False, True), (True, True)]:
        stats.verifier_calls += 1
        seen.append(sync.end(flags(done, near)))
        if seen[-1]:
            break
    assert seen == [False, False, False, False, True]   # no step queued past the last
    assert stats.end_waits == 2 and stats.verifier_calls == 5 and stats.steps_past_end == 0
    # "near" several steps running: each is read at once until the last
    stats = Stats()
    sync = Lagged(torch.device("cpu"), stats, ["verifier"])
    seen = []
    for done, near in [(False, True), (False, True), (False, True), (True, True)]:
        stats.verifier_calls += 1
        seen.append(sync.end(flags(done, near)))
        if seen[-1]:
            break
    assert seen == [False, False, False, True] and stats.end_waits == 3 and stats.steps_past_end == 0
    # without the signal the last step is seen one step late: the step past it is queued, then undone
    stats = Stats()
    sync = Lagged(torch.device("cpu"), stats, ["verifier"])
    seen = []
    for done in (False, False, True, True):
        stats.verifier_calls += 1
        seen.append(sync.end(flags(done, False)))
        if seen[-1]:
            break
    assert seen == [False, False, False, True] and stats.end_waits == 0 and stats.verifier_calls == 3
    assert stats.steps_past_end == 1
