"""Prometheus metrics of one server (its own registry, so several servers can share a process).

Counters (``_total``): HTTP requests by endpoint and status; prompts decoded by outcome
(finished, cancelled, failed); prompt and completion tokens; drafted / accepted / rejected /
deferred / examined drafts by method (so ``rate(accepted) / rate(drafted)`` is the acceptance
rate, ``rate(deferred) / rate(examined)`` the deferral rate); batches. Gauges: queue length,
rows decoding, draining, and the acceptance and deferral rates since start. Histograms: request
latency, time to first token, queue wait, batch size, batch decode time, and per request the
acceptance rate, deferral rate and mean accepted length.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()  # no *_created series beside every counter

LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
RATE = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        p = "speccascade_"
        self.requests = Counter(p + "requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.rows = Counter(p + "prompts", "prompts (rows) by outcome", ["outcome"], registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "prompt tokens of finished prompts", registry=r)
        self.completion_tokens = Counter(p + "completion_tokens", "tokens generated for finished prompts",
                                         ["method"], registry=r)
        self.drafted = Counter(p + "drafted_tokens", "drafts proposed", ["method"], registry=r)
        self.accepted = Counter(p + "accepted_tokens", "drafts accepted", ["method"], registry=r)
        self.rejected = Counter(p + "rejected_tokens", "drafts rejected", ["method"], registry=r)
        self.deferred = Counter(p + "deferred_tokens", "examined drafts deferred to the verifier "
                                "(sequential methods: tokens drawn from the verifier)", ["method"], registry=r)
        self.examined = Counter(p + "examined_tokens", "drafts examined (accepted + rejected)", ["method"], registry=r)
        self.batches = Counter(p + "batches", "batches decoded", ["method"], registry=r)
        self.queue = Gauge(p + "queue_length", "prompts waiting for the decode loop", registry=r)
        self.running = Gauge(p + "running_prompts", "prompts in the batch being decoded", registry=r)
        self.draining = Gauge(p + "draining", "1 while the server drains after SIGTERM", registry=r)
        self.acceptance = Gauge(p + "acceptance_rate", "accepted / drafted since start", registry=r)
        self.deferral = Gauge(p + "deferral_rate", "deferred / examined drafts since start", registry=r)
        self.latency = Histogram(p + "request_latency_seconds", "request arrival to last token", ["endpoint"],
                                 buckets=LATENCY, registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "prompt arrival to its first token",
                              buckets=LATENCY, registry=r)
        self.queue_wait = Histogram(p + "queue_wait_seconds", "prompt arrival to the start of its batch",
                                    buckets=LATENCY, registry=r)
        self.batch_size = Histogram(p + "batch_size", "prompts per batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128),
                                    registry=r)
        self.batch_time = Histogram(p + "batch_decode_seconds", "one batch's generate call", buckets=LATENCY,
                                    registry=r)
        self.req_acceptance = Histogram(p + "prompt_acceptance_rate", "a prompt's accepted / drafted",
                                        buckets=RATE, registry=r)
        self.req_deferral = Histogram(p + "prompt_deferral_rate", "a prompt's deferred / examined",
                                      buckets=RATE, registry=r)
        self.req_accepted_length = Histogram(p + "prompt_mean_accepted_length", "a prompt's 1 + accepted / blocks",
                                             buckets=(1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 11), registry=r)
        self._tot = {"drafted": 0, "accepted": 0, "deferred": 0, "examined": 0}

    def record_prompt(self, method: str, prompt_tokens: int, completion_tokens: int, spec: dict | None) -> None:
        self.rows.labels("finished").inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.labels(method).inc(completion_tokens)
        if not spec or spec.get("scope") != "row":
            return
        examined = spec["accepted"] + spec["rejected"]
        for name, value in (("drafted", spec["drafted"]), ("accepted", spec["accepted"]),
                            ("rejected", spec["rejected"]), ("deferred", spec["deferred"]), ("examined", examined)):
            getattr(self, name).labels(method).inc(value)
            if name in self._tot:
                self._tot[name] += value
        if spec["drafted"]:
            self.req_acceptance.observe(spec["acceptance_rate"])
            self.req_accepted_length.observe(spec["mean_accepted_length"])
        if examined:
            self.req_deferral.observe(spec["deferral_rate"])
        t = self._tot
        if t["drafted"]:
            self.acceptance.set(t["accepted"] / t["drafted"])
        if t["examined"]:
            self.deferral.set(t["deferred"] / t["examined"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
