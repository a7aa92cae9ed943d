"""Slow, literal reference implementations of the paper's formulas, for the tests.

Written from the paper (arXiv 2405.19261 v2) with plain Python loops over the vocabulary, independently of the library's
vectorised code: rules (Table 1 / App. Table 3), the one-step law of verification, and the exact
law of Algorithm 4 over several tokens (enumerated), used as the expected law of the loop.
"""

from __future__ import annotations

import math

import numpy as np


def softmax(logits, temperature=1.0):
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = np.exp(z - z.max())
    return z / z.sum()


def sampling_dist(logits, temperature=1.0, top_k=0, top_p=1.0):
    logits = np.asarray(logits, dtype=np.float64)
    V = len(logits)
    if temperature == 0:
        out = np.zeros(V)
        out[int(np.argmax(logits))] = 1.0
        return out
    keep = np.ones(V, dtype=bool)
    if top_k and top_k < V:
        kth = sorted(logits / temperature, reverse=True)[top_k - 1]
        keep &= (logits / temperature) >= kth
    probs = softmax(np.where(keep, logits, -np.inf), temperature)
    if top_p < 1.0:
        order = sorted(range(V), key=lambda v: -probs[v])
        mass, kept = 0.0, set()
        for v in order:
            if mass >= top_p:
                break
            kept.add(v)
            mass += probs[v]
        probs = np.array([probs[v] if v in kept else 0.0 for v in range(V)])
        probs = probs / probs.sum()
    return probs


def tv(p, q):
    return sum(max(0.0, p[v] - q[v]) for v in range(len(p)))


def ent(x):
    return -sum(x[v] * math.log(x[v]) for v in range(len(x)) if x[v] > 0)


def mix(q, p, defer):
    return np.array(p if defer else q, dtype=np.float64), defer


def token_mix(q, p, r):
    eta = sum(q[v] for v in range(len(q)) if r[v])
    return np.array([q[v] * (0 if r[v] else 1) + p[v] * eta for v in range(len(q))]), r


def reference_rule(name, q, p, qc, pc, alpha, greedy=False):
    """pi and the deferral (bool, or a per-token list) of rule ``name``; q, p sampling distributions,
    qc, pc untempered confidences."""
    V = len(q)
    if name == "sd":
        return np.array(p, dtype=np.float64), True
    if name == "lossy":
        return np.array([max(min(q[v], p[v] / (1 - alpha)), p[v]) for v in range(V)]), True
    if name == "lossy_tuned":
        beta = reference_beta(q, p, alpha)
        return np.array([max(min(q[v], p[v] / (1 - alpha)), p[v] / beta) for v in range(V)]), True
    if name == "bild_star":
        log = lambda x: math.log(x) if x > 0 else -math.inf  # noqa: E731
        if greedy:
            D = -log(pc[int(np.argmax(qc))])
        else:
            D = -sum(qc[v] * log(pc[v]) for v in range(V) if qc[v] > 0)
        return mix(q, p, D > alpha)
    if name == "chow":
        return mix(q, p, max(qc) < 1 - alpha)
    if name == "diff":
        return mix(q, p, max(qc) < max(pc) - alpha)
    if name == "opt":
        return mix(q, p, max(qc) < max(pc) - alpha * tv(p, q))
    if name == "chow_log":
        return mix(q, p, ent(qc) > alpha)
    if name == "diff_log":
        return mix(q, p, ent(pc) < ent(qc) - alpha)
    if name == "opt_log":
        return mix(q, p, ent(pc) < ent(qc) - alpha * tv(p, q))
    if name == "token_v1":
        return token_mix(q, p, [qc[v] < max(pc) - alpha for v in range(V)])
    if name == "token_v2":
        return token_mix(q, p, [pc[v] < max(pc) - alpha for v in range(V)])
    if name == "token_v3":
        return token_mix(q, p, [pc[v] < max(pc) * (1 - alpha) for v in range(V)])
    raise KeyError(name)


def reference_beta(q, p, alpha, iters=200):
    """Tran-Thien's beta by bisection on u = 1/beta (g(u) is monotone)."""
    c = sum(max(0.0, q[v] - p[v] / (1 - alpha)) for v in range(len(q)))
    if c == 0:
        return math.inf

    def g(u):
        return sum(max(0.0, u * p[v] - q[v]) for v in range(len(q)))

    lo, hi = 0.0, 1.0
    while g(hi) < c:
        hi *= 2
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if g(mid) < c else (lo, mid)
    return 1.0 / ((lo + hi) / 2)


def one_step_law(q, pi):
    """The law of one verification (draft x ~ q, accept w.p. min(1, pi(x)/q(x)), else draw from
    norm(max(0, pi - q))), by enumeration over the draft."""
    V = len(q)
    res = [max(0.0, pi[v] - q[v]) for v in range(V)]
    z = sum(res)
    law = np.zeros(V)
    for x in range(V):
        if q[x] == 0:
            continue
        a = min(1.0, pi[x] / q[x])
        law[x] += q[x] * a
        if a < 1:
            for v in range(V):
                law[v] += q[x] * (1 - a) * res[v] / z
    return law


def lossy_law(q, p, alpha, beta=1.0):
    """The law eqs. (16)-(17) define: accept w.p. kappa = min(1, p/((1-alpha) q)), else
    resample from norm(max(0, p/beta - q))."""
    V = len(q)
    kappa = [min(1.0, p[v] / ((1 - alpha) * q[v])) if q[v] > 0 else 1.0 for v in range(V)]
    reject = sum(q[v] * (1 - kappa[v]) for v in range(V))
    res = [max(0.0, p[v] / beta - q[v]) for v in range(V)]
    z = sum(res)
    return np.array([q[v] * kappa[v] + (reject * res[v] / z if z > 0 else 0.0) for v in range(V)])


def algorithm4_law(q_at, p_at, target_at, bonus_at, gamma, prompt, n, in_block=False):
    """Exact law of the first ``n`` tokens emitted by repeated Algorithm 4 blocks, by enumeration.

    q_at(prefix) / p_at(prefix): sampling distributions; target_at(q, p, prefix) -> pi;
    bonus_at(q, p, pi) -> the bonus distribution. State: (prefix, index j within the block).
    ``in_block``: the drafter's q also depends on j (a drafter reading the verifier's states:
    q_at(prefix, j), target_at(q, p, prefix, j)).
    """
    out: dict[tuple, float] = {}

    def walk(prefix, j, prob, emitted):
        if len(emitted) == n:
            out[tuple(emitted)] = out.get(tuple(emitted), 0.0) + prob
            return
        q, p = (q_at(prefix, j) if in_block else q_at(prefix)), p_at(prefix)
        pi = target_at(q, p, prefix, j) if in_block else target_at(q, p, prefix)
        V = len(q)
        if j == gamma:
            b = bonus_at(q, p, pi)
            b = np.asarray(b) / np.sum(b)
            for v in range(V):
                if b[v] > 0:
                    walk(prefix + (v,), 0, prob * b[v], emitted + [v])
            return
        res = np.array([max(0.0, pi[v] - q[v]) for v in range(V)])
        reject = 0.0
        for x in range(V):
            if q[x] == 0:
                continue
            a = min(1.0, pi[x] / q[x])
            if a > 0:
                walk(prefix + (x,), j + 1, prob * q[x] * a, emitted + [x])
            reject += q[x] * (1 - a)
        if reject > 1e-15:
            res = res / res.sum()
            for v in range(V):
                if res[v] > 0:
                    walk(prefix + (v,), 0, prob * reject * res[v], emitted + [v])

    walk(tuple(prompt), 0, 1.0, [])
    return out


def sequential_law(target_at, q_at, p_at, prompt, n):
    """Law of n tokens sampled one by one from pi_t = T(q_t, p_t) (normalised)."""
    out: dict[tuple, float] = {}

    def walk(prefix, prob, emitted):
        if len(emitted) == n:
            out[tuple(emitted)] = out.get(tuple(emitted), 0.0) + prob
            return
        pi = np.asarray(target_at(q_at(prefix), p_at(prefix), prefix), dtype=np.float64)
        pi = pi / pi.sum()
        for v in range(len(pi)):
            if pi[v] > 0:
                walk(prefix + (v,), prob * pi[v], emitted + [v])

    walk(tuple(prompt), 1.0, [])
    return out
