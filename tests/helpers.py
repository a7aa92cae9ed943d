"""Helpers shared by several test modules (test modules import from here, never from each other)."""

import signal
import time

import numpy as np
import torch
from scipy.stats import chisquare

import speccascade as sc
from speccascade import runner
from speccascade.models import StaticHFBackend

from tiny_models import tiny_pair

#: the law tests' alpha for each speculative method (a value where its rule both defers and accepts)
ALPHA = {"sd": None, "lossy": 0.4, "lossy_tuned": 0.4, "bild_star": 1.2, "chow": 0.35, "diff": 0.05,
         "opt": 0.5, "chow_log": 0.9, "diff_log": 0.0, "opt_log": 0.3, "token_v1": 0.0, "token_v2": 0.1,
         "token_v3": 0.5}


#: the whole-loop law checks: rows, tokens a row, the prompt, the chi-square level
LAW_ROWS, LAW_TOKENS, LAW_PROMPT, LAW_LEVEL = 20_000, 3, [1, 2], 1e-3


def logits_at(model):
    """A memoised function: prefix -> ``model``'s last-position logits (float64, on the host)."""
    memo = {}

    def at(prefix):
        key = tuple(prefix)
        if key not in memo:
            with torch.no_grad():
                ids = torch.tensor([list(prefix)], device=model.device)
                memo[key] = model(ids).logits[0, -1].double().cpu().numpy()
        return memo[key]
    return at


def check_loop_law(name, alpha, d, v, bd, bv, gamma=3):
    """LAW_ROWS rows of ``name`` through backends ``bd`` / ``bv`` of models ``d`` / ``v``: the law of
    the first LAW_TOKENS tokens against Algorithm 4's law enumerated from fresh forward passes of the
    models (chi-square)."""
    from reference import algorithm4_law, reference_rule, sampling_dist, softmax

    out = sc.generate(bd, bv, torch.tensor([LAW_PROMPT] * LAW_ROWS), method=name, alpha=alpha, gamma=gamma,
                      max_new_tokens=LAW_TOKENS, seed=0, temperature=1.0, eos_token_id=[])
    lq, lp = logits_at(d), logits_at(v)
    spec = sc.METHODS[name]
    law = algorithm4_law(lambda pre: sampling_dist(lq(pre)), lambda pre: sampling_dist(lp(pre)),
                         lambda q, p, pre: reference_rule(name, q, p, softmax(lq(pre)), softmax(lp(pre)), alpha)[0],
                         (lambda q, p, pi: p) if spec.bonus_from_verifier else (lambda q, p, pi: pi),
                         gamma=gamma, prompt=LAW_PROMPT, n=LAW_TOKENS)
    assert all(len(t) == LAW_TOKENS for t in out.tokens)
    assert chi2_pvalue(empirical(out.tokens), law, LAW_ROWS) > LAW_LEVEL


def empirical(tokens):
    """Counts of each generated row (a tuple of tokens)."""
    counts: dict[tuple, int] = {}
    for t in tokens:
        counts[tuple(t)] = counts.get(tuple(t), 0) + 1
    return counts


def chi2_pvalue(counts, law, n):
    """Chi-square p-value of ``counts`` (of ``n`` rows) against the exact ``law``; cells expected
    below 5 are pooled, and a row of probability 0 fails at once."""
    keys = sorted(set(law) | set(counts))
    assert set(counts) <= {k for k in law if law[k] > 0}, "a sequence with probability 0 was generated"
    exp = np.array([law.get(k, 0.0) * n for k in keys])
    obs = np.array([counts.get(k, 0) for k in keys], dtype=float)
    small = exp < 5  # pool sparse cells
    if small.any():
        exp = np.append(exp[~small], exp[small].sum())
        obs = np.append(obs[~small], obs[small].sum())
    keep = exp > 0
    return chisquare(obs[keep], exp[keep] * obs.sum() / exp[keep].sum()).pvalue


def check_static_matches_dynamic(compile: bool, device: str = "cpu", factory=None):
    """``factory(model, name, max_cache_len, compile)`` builds the backend under test (default:
    StaticHFBackend)."""
    backend = factory or StaticHFBackend  # the backend under test
    d, v = (m.to(device) for m in tiny_pair(0, noise=0.05))
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16], [17]]
    ref = sc.generate(d, v, prompts, method="verifier_only", temperature=0, max_new_tokens=16).tokens
    sd_, sv = backend(d, "drafter", 256, compile), backend(v, "verifier", 256, compile)
    assert sc.generate(sv, sv, prompts, method="verifier_only", temperature=0, max_new_tokens=16).tokens == ref
    for gamma in (1, 4):
        assert sc.generate(sd_, sv, prompts, method="sd", temperature=0, gamma=gamma, max_new_tokens=16).tokens == ref
    # a one-token prompt on a new cache (no pre-fill call), batch 1
    one = [[17]]
    ref1 = sc.generate(d, v, one, method="verifier_only", temperature=0, max_new_tokens=8).tokens
    assert sc.generate(backend(d, "drafter", 64, compile), backend(v, "verifier", 64, compile), one,
                       method="sd", temperature=0, gamma=2, max_new_tokens=8).tokens == ref1
    for method, kw in (("token_v3", {"gamma": 3}), ("token_cascade", {}), ("bild", {})):
        dyn = sc.generate(d, v, prompts, method=method, temperature=1, max_new_tokens=16, seed=3, **kw).tokens
        out = sc.generate(sd_, sv, prompts, method=method, temperature=1, max_new_tokens=16, seed=3, **kw)
        assert out.tokens == dyn


def kill_after_cells(proc, out, n: int, timeout: float) -> None:
    """SIGKILL the sweep process ``proc`` once its file ``out`` holds ``n`` cell records (it must
    still be running then). The file may not exist yet, or come and go while the sweep starts."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if sum('"type": "cell"' in line for line in out.read_text().splitlines()) >= n:
                break
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.wait()


# -- CUDA-graph capture simulated on the CPU ---------------------------------------------------
# On a GPU a captured program replays kernels and runs no Python; here a "replay" calls the same
# Python again on the same state, inside runner.program() as a real replay's calls would be.


class SimulatedGraph:
    """A captured program of the runner (``runner.capture_graph``): a replay calls the same step
    function on the same state."""

    def __init__(self, step, gen, per_replay):
        self.step, self.gen, self.per_replay = step, gen, per_replay

    def replay(self):
        with runner.program():
            for _ in range(self.per_replay):
                self.step(self.gen)


def simulated_capture_graph(record: list):
    """A stand-in for ``runner.capture_graph`` that appends each capture's ``per_replay`` to ``record``."""
    def capture_graph(step, device, per_replay):
        gen = torch.Generator(device=device)
        with runner.program():
            for _ in range(2):  # the warm-up runs the step on the live state, as on a GPU
                step(gen)
        record.append(per_replay)
        return SimulatedGraph(step, gen, per_replay), gen

    return capture_graph


class SimulatedCalls(list):
    """Graphs of single calls (``runner.capture_call``, e.g. the fused backend's host-driven
    calls): the list holds the captured functions; ``replays`` counts replays of all of them."""

    replays = 0

    def capture_call(self, fn, device, warm_ups=1):
        with runner.program():
            for _ in range(warm_ups + 1):   # the warm-ups, then the "capture" (a graph records; this runs)
                fn()
        self.append(fn)
        calls = self

        class Graph:
            def replay(self):
                calls.replays += 1
                fn()

        return Graph()


def seq2seq_loop_law_pvalue(drafter, verifier, name, alpha, src, lq, lp, start_token: int, n_rows: int,
                            n_tokens: int, gamma: int) -> float:
    """Chi-square p-value of ``n_rows`` decodes of the encoder input ``src`` through the loop
    (``drafter`` / ``verifier``: encoder-decoder models or backends) against the law of Algorithm 4
    enumerated from the decoders' logits ``lq`` / ``lp`` (prefix -> logits), decoding from
    ``start_token``."""
    from reference import algorithm4_law, reference_rule, sampling_dist, softmax

    out = sc.generate(drafter, verifier, torch.tensor([src] * n_rows), method=name, alpha=alpha, gamma=gamma,
                      max_new_tokens=n_tokens, seed=0, temperature=1.0, eos_token_id=[])
    spec = sc.METHODS[name]
    law = algorithm4_law(lambda pre: sampling_dist(lq(pre)), lambda pre: sampling_dist(lp(pre)),
                         lambda q, p, pre: reference_rule(name, q, p, softmax(lq(pre)), softmax(lp(pre)), alpha)[0],
                         (lambda q, p, pi: p) if spec.bonus_from_verifier else (lambda q, p, pi: pi),
                         gamma=gamma, prompt=[start_token], n=n_tokens)
    assert abs(sum(law.values()) - 1) < 1e-9
    assert all(len(t) == n_tokens for t in out.tokens)
    return chi2_pvalue(empirical(out.tokens), law, n_rows)


# ---------------------------------------------------------------------------------------------
# a drafter that reads the verifier's states (speccascade.models.features)


def feature_pair(seed=0, mix=4.0, vocab=6, sharp=6.0, device="cpu"):
    """A tiny verifier (``vocab`` tokens) and a feature drafter made from a noisy copy of it, its feature
    map moved off [I, 0] so that the features change its logits; both heads scaled by ``sharp``, so
    that the distributions are far from uniform and the drafter's q differs from p."""
    from speccascade.models import LlamaFeatureDrafter

    d, v = tiny_pair(seed, noise=0.3, vocab=vocab)
    fd = LlamaFeatureDrafter.from_drafter(d)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        fd.feature_mix.weight.add_(torch.randn(fd.feature_mix.weight.shape, generator=g) * mix / 8)
        for m in (fd, v):
            m.lm_head.weight.mul_(sharp)
    return fd.eval().to(device), v.to(device)


def feature_definition(fd, v):
    """q's logits at (prefix, j) from the definition, without a cache: positions up to the block's
    pending one (P = len - 1 - j) read the verifier's state at the position before (zeros at 0),
    later ones the drafter's own state there, itself computed the same way. Also p's logits."""
    memo_v, memo_d = {}, {}

    def verifier_states(prefix):
        if prefix not in memo_v:
            with torch.no_grad():
                h = v.model(input_ids=torch.tensor([list(prefix)], device=v.device)).last_hidden_state
                memo_v[prefix] = (h[0], v.lm_head(h)[0, -1].double().cpu().numpy())
        return memo_v[prefix]

    def drafter_at(prefix, j):   # -> (logits at the last position, own state there)
        key = (prefix, j)
        if key not in memo_d:
            m = len(prefix)
            P = m - 1 - j
            f = verifier_states(prefix[:P + 1])[0] if P >= 1 else None
            feats = torch.zeros(m, fd.config.hidden_size, device=fd.device)
            for i in range(1, m):
                feats[i] = f[i - 1] if i <= P else drafter_at(prefix[:i], i - 1 - P)[1]
            with torch.no_grad():
                ids = torch.tensor([list(prefix)], device=fd.device)
                h = fd.model(inputs_embeds=fd.feature_embeddings(ids, feats[None])).last_hidden_state[0, -1]
                memo_d[key] = (fd.lm_head(h).double().cpu().numpy(), h)
        return memo_d[key]

    return (lambda prefix, j: drafter_at(tuple(prefix), j)[0]), (lambda prefix: verifier_states(tuple(prefix))[1])

def check_feature_law(name, fd, v, bd, bv, gamma=3):
    """A feature drafter ``fd`` and verifier ``v`` through backends ``bd`` / ``bv``: LAW_ROWS rows'
    law of LAW_TOKENS tokens against Algorithm 4's, enumerated with q from its definition
    (:func:`feature_definition`); for a rule that reads q, also the power to reject a drafter that
    read the verifier's state at every draft; for sd, that law is the verifier's own."""
    from reference import algorithm4_law, reference_rule, sampling_dist, softmax

    q_logits, p_logits = feature_definition(fd, v)
    alpha = ALPHA[name]
    out = sc.generate(bd, bv, torch.tensor([LAW_PROMPT] * LAW_ROWS), method=name, alpha=alpha, gamma=gamma,
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
    if name == "sd":   # lossless: the verifier's own law
        seq = algorithm4_law(lambda pre: sampling_dist(p_logits(pre)), lambda pre: sampling_dist(p_logits(pre)),
                             lambda q, p, pre: p, lambda q, p, pi: p, gamma=1, prompt=LAW_PROMPT, n=LAW_TOKENS)
        assert max(abs(law[k] - seq.get(k, 0.0)) for k in law) < 1e-9
    else:   # the test has the power to see a drafter reading the verifier's state at every draft
        assert chi2_pvalue(counts, law_of(lambda pre, j: q_logits(pre, 0)), LAW_ROWS) < LAW_LEVEL


def unroll_batch():
    """Two rows of a tiny vocabulary, the first right-padded (``collate``'s layout), and their targets
    (-100 on the prompt and the padding): the unrolled feature training's test batch."""
    ids = torch.tensor([[1, 2, 3, 4, 5, 1, 0, 0], [3, 1, 4, 1, 5, 2, 0, 5]])
    inputs = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8])}
    targets = torch.tensor([[-100, 3, 4, 5, 1, -100, -100, -100], [-100, -100, 4, 1, 5, 2, 0, 5]])
    return inputs, targets


def errors_from_definition(fd, v, logits, inputs) -> list[float]:
    """Per depth k of ``logits`` (:func:`speccascade.train.trainer.unrolled_feature_forward`'s, any
    device or dtype): the largest |logit - q's logit from its definition| (:func:`feature_definition`,
    float32 on the CPU copies ``fd`` / ``v``) over every real position j >= k of every row, relative to
    the largest |q logit|. Depth k at j is the draft k positions into a block pending at j - k."""
    q_logits, _ = feature_definition(fd, v)
    errors = []
    for k in range(len(logits)):
        have, want = [], []
        for b in range(inputs["input_ids"].shape[0]):
            n = int(inputs["attention_mask"][b].sum())
            for j in range(k, n):
                want.append(torch.tensor(q_logits(inputs["input_ids"][b, :j + 1].tolist(), k), dtype=torch.float32))
                have.append(logits[k][b, j].float().cpu())
        have, want = torch.stack(have), torch.stack(want)
        errors.append(float((have - want).abs().max() / want.abs().max()))
    return errors


def check_unrolled_training(device: str, depth: int = 2, tolerance: float = 1e-5):
    """``train --feature-unroll``'s forward and backward on ``device`` (bf16 autocast on CUDA, as the
    trainer runs): each depth's logits within ``tolerance`` (relative to the largest) of the loop's q
    from its definition (:func:`errors_from_definition`), and every gradient of the unrolled loss
    finite, the feature map's not zero."""
    from speccascade.train.trainer import feature_loss, teacher_view, unrolled_feature_forward

    dev = torch.device(device)
    inputs, targets = unroll_batch()
    inputs = {k: t.to(dev) for k, t in inputs.items()}
    fd, v = feature_pair(5, vocab=6, device=device)
    teacher_logits, states = teacher_view(v, inputs, dev)
    with torch.no_grad():
        got = unrolled_feature_forward(fd, inputs, states, dev, depth)[0]
    fd_ref, v_ref = feature_pair(5, vocab=6)
    errors = errors_from_definition(fd_ref, v_ref, got, {k: t.cpu() for k, t in inputs.items()})
    assert max(errors) <= tolerance, f"relative errors by depth: {errors}"
    fd.train()
    loss, _ = feature_loss(fd, inputs, targets.to(dev), teacher_logits, states, dev, distill_weight=1.0,
                           regression=1.0, unroll=depth)
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in fd.parameters())
    assert fd.feature_mix.weight.grad.abs().sum() > 0
