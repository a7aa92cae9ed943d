"""The words of this code base, written once.

Math (arXiv 2405.19261, Section 2)   Code
------------------------------------ -------------------------------------------------------
q, the drafter (small model)         ``drafter``; its next-token distribution ``draft_probs``
p, the verifier (large model)        ``verifier``; its next-token distribution ``target_probs``
pi = T(q, p), the target of a rule   ``pi``; built by a function in :mod:`speccascade.rules`
gamma, the draft block size          ``gamma``
alpha, a rule's threshold            ``alpha`` (``alpha_f``: original BiLD's fallback threshold)
delta(q, p) / r(x_<t, v), deferral   ``defer`` (True = the verifier's distribution is demanded)

Two versions of each distribution are kept (the paper states the split for greedy decoding, App. C.3,
Lemma 8; the authors' reference implementation uses it at every temperature):

* ``draft_probs`` / ``target_probs``: the *sampling* distributions, i.e. after temperature,
  top-k and top-p (one-hot at temperature 0). Mixtures, D_TV, acceptance ratios, residuals and
  every draw use these.
* ``draft_conf`` / ``target_conf``: the *untempered* (T = 1, unfiltered) softmaxes. Deferral
  confidences (max-probabilities, entropies, token thresholds, BiLD's discrepancy) use these.

Tokens of one verification block (Algorithm 4), following vLLM's words:

* **drafted**: proposed by the drafter (gamma per block and row);
* **accepted**: a drafted token that passed the test ``u < pi(x) / q(x)``;
* **rejected**: the first drafted token that failed it (at most one per block and row);
  drafts after it are *discarded* without being examined;
* **recovered**: the token drawn from the residual ``norm(max(0, pi - q))`` at the rejected slot;
* **bonus**: the token drawn after all gamma drafts were accepted, from ``pi_{t+gamma}``
  (from ``p_{t+gamma}`` for ``sd``, ``lossy`` and ``lossy_tuned``).

Tensor shapes are written in comments as ``# [batch, gamma + 1, vocab]``; ``B`` is the batch,
``V`` the vocabulary, ``k`` a number of tokens fed in one call.

A row's cache holds every committed token but the last; the last committed token is *pending*:
it is fed at the start of the next block, and its logits give the next position's distribution.
"""
