"""``speccascade serve``: the OpenAI-compatible server on the shipped tiny pair (CPU, loopback only).

What is proved, exactly (no timing assertion): greedy responses equal ``sc.generate`` on the same
prompt (tokens and text), through the real ``openai`` client, streamed or not, for completions and
chat, with per-request ``method`` / ``alpha`` / ``options``; a row's speculation record is its own
(a request alone gets ``generate``'s stats; a request's rows sum to their batch's counters); under
load (32 clients x 4 requests, mixed methods and alphas, batched with per-row alpha) every response
equals its single-request greedy result; every bad request gets a 400 naming the problem and the
server keeps serving; a client that disconnects cancels its own row only; draining (SIGTERM) lets
in-flight requests finish and refuses new ones with 503; per-row alpha in the rules equals per-row
scalar calls; the streaming hook of ``generate`` yields exactly its tokens for every method.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import speccascade as sc  # noqa: E402
from speccascade.data.prompt import EOS, decode, encode_prompt  # noqa: E402
from speccascade.eval.tasks import BibleTask  # noqa: E402
from speccascade.models.loading import TOKENIZER_DIR, embedded_pair_dirs, load_causal_lm, load_tokenizer  # noqa: E402
from speccascade.rules import Dists  # noqa: E402
from speccascade.server.app import ServerThread  # noqa: E402
from speccascade.server.calibration import Calibration, from_records  # noqa: E402
from speccascade.server.engine import Defaults, Engine  # noqa: E402

from tiny_models import tiny_pair  # noqa: E402

MODEL = "speccascade-tiny"
TEXTS = [e.input for e in BibleTask().examples(8, seed=1)]
LONG = max((e.input for e in BibleTask().examples(40, seed=0)), key=len)   # ~54 output tokens
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair():
    d_dir, v_dir = embedded_pair_dirs("tiny")
    return load_causal_lm(d_dir), load_causal_lm(v_dir), load_tokenizer(TOKENIZER_DIR)


def make_engine(pair, **kw) -> Engine:
    d, v, tok = pair
    kw.setdefault("defaults", Defaults(method="token_v3", gamma=5, temperature=1.0, max_tokens=32))
    return Engine(d, v, tok, BibleTask(), model_name=MODEL, **kw)


@pytest.fixture(scope="module")
def server(pair):
    srv = ServerThread(make_engine(pair)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def reference(pair, text, method, alpha=None, max_tokens=16, prompts=None, **options):
    """Greedy ``generate`` on the prompt(s) alone: (tokens, text, stats) of the first row."""
    d, v, tok = pair
    ids = prompts or [encode_prompt(tok, text)]
    out = sc.generate(d, v, ids, method=method, alpha=alpha, gamma=5, temperature=0, max_new_tokens=max_tokens,
                      eos_token_id=EOS, **options)
    return out.tokens[0], decode(tok, out.tokens[0]), out


def metric(server, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


COUNTERS = ("blocks", "drafted", "accepted", "rejected", "bonus", "deferred", "emitted", "truncated")


# ---------------------------------------------------------------------------------------------
# the openai client


@pytest.mark.parametrize("method,alpha,options", [("token_v3", 0.5, {}), ("sd", None, {}), ("opt", 0.3, {}),
                                                  ("chow", 0.4, {}), ("verifier_only", None, {}),
                                                  ("bild", 2.0, {"alpha_f": 0.3})])
def test_completion_equals_generate(pair, client, method, alpha, options):
    body = {"method": method} | ({} if alpha is None else {"alpha": alpha}) | ({"options": options} if options else {})
    r = client.completions.create(model=MODEL, prompt=TEXTS[0], temperature=0, max_tokens=24, extra_body=body)
    tokens, text, out = reference(pair, TEXTS[0], method, alpha, 24, **options)
    choice = r.choices[0]
    assert choice.model_extra["token_ids"] == tokens
    assert choice.text == text and text
    assert choice.finish_reason == ("stop" if tokens[-1] == EOS else "length")
    assert r.usage.completion_tokens == len(tokens)
    assert r.usage.prompt_tokens == len(encode_prompt(pair[2], TEXTS[0]))
    spec = r.usage.model_extra["speculation"]
    assert spec["method"] == method and spec["alpha"] == out.alpha
    st = out.stats
    if sc.METHODS[method].kind == "speculative":   # alone in its batch: the row's record is generate's stats
        assert spec["scope"] == "row"
        assert {k: spec[k] for k in COUNTERS} == {k: getattr(st, k) for k in COUNTERS}
        assert spec["accepted_per_position"] == st.accepted_per_position
        assert (spec["drafter_calls"], spec["verifier_calls"]) == (st.drafter_calls, st.verifier_calls)
        assert spec["mean_accepted_length"] == 1 + st.accepted / st.blocks
        assert spec["deferral_rate"] == st.deferral_rate and spec["acceptance_rate"] == st.acceptance_rate
    elif method == "verifier_only":
        assert spec["scope"] == "row" and spec["verifier_calls"] == st.verifier_calls == len(tokens)
    else:
        assert spec["scope"] == "batch" and spec["batch_size"] == 1
        assert (spec["drafter_calls"], spec["verifier_calls"], spec["accepted"]) == \
            (st.drafter_calls, st.verifier_calls, st.accepted)


def test_streaming_equals_non_streaming(pair, client):
    tokens, text, _ = reference(pair, LONG, "token_v3", 0.5, 64)
    chunks = list(client.completions.create(model=MODEL, prompt=LONG, temperature=0, max_tokens=64, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"method": "token_v3", "alpha": 0.5}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == text
    assert sum(1 for t in texts if t) > 2                     # tokens arrived block by block
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tokens)
    assert chunks[-1].usage.model_extra["speculation"]["scope"] == "row"


def test_stream_sse_format_and_done(server):
    body = {"model": MODEL, "prompt": TEXTS[1], "temperature": 0, "max_tokens": 16, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(p["object"] == "text_completion" and p["model"] == MODEL for p in payloads)


def test_chat(pair, client):
    _, text, _ = reference(pair, TEXTS[2], "sd", None, 24)
    msgs = [{"role": "system", "content": "Translate English to Spanish."}, {"role": "user", "content": TEXTS[2]}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=24,
                                       extra_body={"method": "sd"})
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
    assert r.object == "chat.completion"
    parts = list(client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=24, stream=True,
                                                extra_body={"method": "sd"}))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == text
    assert parts[-1].choices[0].finish_reason in ("stop", "length")


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    h = httpx.get(f"{server.url}/health", timeout=30)
    assert h.status_code == 200 and h.json()["status"] == "ok"
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    for name in ("speccascade_requests_total", "speccascade_completion_tokens_total",
                 "speccascade_accepted_tokens_total", "speccascade_deferral_rate", "speccascade_queue_length",
                 "speccascade_request_latency_seconds_bucket",
                 "speccascade_time_to_first_token_seconds_bucket", "speccascade_batch_size_bucket"):
        assert name in text, name
    assert metric(server, "speccascade_requests_total", endpoint="/v1/completions", status="200") > 0


def test_list_prompt_rows_are_their_own_and_sum_to_the_batch(pair, client):
    """A request of 3 prompts is one batch: each choice equals its prompt decoded alone, and the
    rows' own counters sum to generate's counters for that batch."""
    r = client.completions.create(model=MODEL, prompt=TEXTS[3:6], temperature=0, max_tokens=20,
                                  extra_body={"method": "opt", "alpha": 0.5})
    tok = pair[2]
    d, v, _ = pair
    batch = sc.generate(d, v, [encode_prompt(tok, t) for t in TEXTS[3:6]], method="opt", alpha=0.5, temperature=0,
                        max_new_tokens=20, eos_token_id=EOS)
    for i, t in enumerate(TEXTS[3:6]):
        tokens, _, _ = reference(pair, t, "opt", 0.5, 20)
        assert r.choices[i].index == i and r.choices[i].model_extra["token_ids"] == tokens == batch.tokens[i]
    spec = r.usage.model_extra["speculation"]
    assert spec["prompts"] == 3 and spec["scope"] == "row"
    assert {k: spec[k] for k in COUNTERS} == {k: getattr(batch.stats, k) for k in COUNTERS}
    assert spec["accepted_per_position"] == batch.stats.accepted_per_position
    rows = [c.model_extra["speculation"] for c in r.choices]
    assert sum(x["emitted"] for x in rows) == sum(len(t) for t in batch.tokens)


def test_stop_strings_and_per_row_max_tokens(pair, client):
    tokens, text, _ = reference(pair, LONG, "token_v3", 0.5, 64)
    stop = text.split()[3]
    r = client.completions.create(model=MODEL, prompt=LONG, temperature=0, max_tokens=64, stop=[stop],
                                  extra_body={"method": "token_v3", "alpha": 0.5})
    assert r.choices[0].text == text[:text.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model=MODEL, prompt=LONG, temperature=0, max_tokens=64, stop=stop,
                                              stream=True, extra_body={"method": "token_v3", "alpha": 0.5}))
    assert "".join(c.choices[0].text for c in streamed) == text[:text.find(stop)]
    short = client.completions.create(model=MODEL, prompt=LONG, temperature=0, max_tokens=7,
                                      extra_body={"method": "token_v3", "alpha": 0.5})
    assert short.choices[0].model_extra["token_ids"] == tokens[:7] and short.choices[0].finish_reason == "length"


def test_seeded_sampled_request_equals_generate(pair, client):
    d, v, tok = pair
    ids = [encode_prompt(tok, t) for t in TEXTS[:2]]
    out = sc.generate(d, v, ids, method="token_v3", alpha=0.5, temperature=1.0, max_new_tokens=16, eos_token_id=EOS,
                      seed=123)
    r = client.completions.create(model=MODEL, prompt=TEXTS[:2], temperature=1.0, max_tokens=16, seed=123,
                                  extra_body={"method": "token_v3", "alpha": 0.5})
    assert [c.model_extra["token_ids"] for c in r.choices] == out.tokens


# ---------------------------------------------------------------------------------------------
# load


SETTINGS = [("token_v3", 0.3), ("token_v3", 0.8), ("opt", 0.5), ("opt", -1.0), ("sd", None), ("chow", 0.2),
            ("chow", 0.9), ("verifier_only", None)]


def test_load_32_clients(pair, server):
    """32 concurrent clients x 4 requests, mixed methods and alphas: no error, every response
    complete and equal to its single-request greedy result."""
    jobs = [[(TEXTS[(c + k) % len(TEXTS)], *SETTINGS[(3 * c + k) % len(SETTINGS)]) for k in range(4)]
            for c in range(32)]
    refs = {}
    for job in jobs:
        for text, method, alpha in job:
            if (text, method, alpha) not in refs:
                refs[(text, method, alpha)] = reference(pair, text, method, alpha, 16)[:2]
    first_batch = len(server.engine.batch_log) and server.engine.batch_log[-1]["id"] + 1
    latencies, results = [], []

    async def one_client(job):
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                                      timeout=300) as c:
            for text, method, alpha in job:
                t0 = time.perf_counter()
                body = {"method": method} | ({} if alpha is None else {"alpha": alpha})
                r = await c.completions.create(model=MODEL, prompt=text, temperature=0, max_tokens=16, extra_body=body)
                latencies.append(time.perf_counter() - t0)
                results.append(((text, method, alpha), r))

    async def main():
        await asyncio.wait_for(asyncio.gather(*(one_client(j) for j in jobs)), timeout=600)

    t0 = time.perf_counter()
    asyncio.run(main())
    wall = time.perf_counter() - t0
    assert len(results) == 128
    for key, r in results:
        tokens, text = refs[key]
        assert r.choices[0].model_extra["token_ids"] == tokens, key
        assert r.choices[0].text == text and r.choices[0].finish_reason in ("stop", "length"), key
    batches = [b for b in server.engine.batch_log if b["id"] >= first_batch]
    lat = sorted(latencies)
    print(f"\nload: 128 requests in {wall:.2f}s; latency p50 {statistics.median(lat):.3f}s "
          f"p99 {lat[int(0.99 * (len(lat) - 1))]:.3f}s; {len(batches)} batches, sizes "
          f"{sorted(b['size'] for b in batches)}; batches mixing alphas: {sum(len(b['alphas']) > 1 for b in batches)}")
    assert max(b["size"] for b in batches) > 1   # requests were batched together


# ---------------------------------------------------------------------------------------------
# bad requests


BAD = [
    ({"prompt": "x", "method": "nope"}, "unknown method 'nope'", "method"),
    ({"prompt": "x", "method": "chow", "alpha": 1.5}, "alpha=1.5 is outside the range of method 'chow'", "alpha"),
    ({"prompt": "x", "method": "sd", "alpha": 0.5}, "takes no alpha", "alpha"),
    ({"prompt": "x", "gamma": 0}, "gamma (the draft block size) must be an integer >= 1, got 0", "gamma"),
    ({"prompt": ""}, "prompt is empty", "prompt"),
    ({"prompt": []}, "prompt is empty", "prompt"),
    ({"prompt": [[]]}, "prompt is empty", "prompt"),
    ({"prompt": "In the beginning " * 200}, "prompt is too long", "prompt"),
    ({"prompt": [5, 99999]}, "outside the vocabulary", "prompt"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens must be an integer >= 1, got 0", "max_tokens"),
    ({"prompt": "x", "max_tokens": -3}, "max_tokens must be an integer >= 1, got -3", "max_tokens"),
    ({"prompt": "x", "max_tokens": "many"}, "max_tokens: Input should be a valid integer", "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, "temperature: Input should be a valid number", "temperature"),
    ({"prompt": "x", "temperature": -1}, "temperature must be a finite number >= 0", "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p must be in (0, 1]", "top_p"),
    ({"prompt": 5}, "prompt", "prompt"),
    ({"prompt": "x", "alhpa": 0.3}, "unknown field 'alhpa'", "alhpa"),
    ({"prompt": "x", "method": "bild", "options": {"alpha_f": 2}}, "alpha_f=2 is outside the range", "options.alpha_f"),
    ({"prompt": "x", "method": "opt", "options": {"alpha_f": 0.5}}, "has no option(s) ['alpha_f']", "options"),
    ({"prompt": "x", "quality_floor": 1.0}, "--calibration", "quality_floor"),
    ({"prompt": "x", "latency_budget": 0.9}, "--calibration", "latency_budget"),
    ({"prompt": "x", "n": 2}, "only n = 1", "n"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "at most 4", "stop"),
    ({}, "prompt is required", "prompt"),
    ([1, 2], "must be a JSON object", None),
]


def test_bad_requests_get_400_and_the_server_keeps_serving(pair, server):
    _, text, _ = reference(pair, TEXTS[0], "sd", None, 8)
    good = {"model": MODEL, "prompt": TEXTS[0], "temperature": 0, "max_tokens": 8, "method": "sd"}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        cases = BAD + [(b"{not json", "malformed JSON", None), (b"", "the request body is empty", None)]
        for body, message, param in cases:
            kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
                else {"json": body}
            r = c.post("/v1/completions", **kw)
            assert r.status_code == 400, (body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert message in err["message"] and err["type"] == "invalid_request_error", (body, err)
            assert err["param"] == param, (body, err)
            ok = c.post("/v1/completions", json=good)
            assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == text
        r = c.post("/v1/completions", json=good | {"model": "gpt-4"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = c.post("/v1/chat/completions", json={"messages": [], "model": MODEL})
        assert r.status_code == 400 and "messages is empty" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.role"
        assert c.get("/nope").status_code == 404 and "error" in c.get("/nope").json()
        assert c.post("/v1/completions", json=good).status_code == 200


def test_generate_errors_fail_only_their_row(pair, server, monkeypatch):
    """A SpecCascadeError raised by generate itself (here: a prompt too long, let past the
    server's own check) is a 400 for that request only; its batch-mate is decoded."""
    monkeypatch.setattr(server.engine, "check_lengths", lambda prompts, settings: None)
    monkeypatch.setattr(server.engine, "batch_wait_s", 0.5)   # the two requests share a batch
    _, text, _ = reference(pair, TEXTS[0], "sd", None, 8)
    out = {}

    def post(name, body):
        out[name] = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)

    base = {"temperature": 0, "max_tokens": 8, "method": "sd"}
    threads = [threading.Thread(target=post, args=("bad", base | {"prompt": "In the beginning " * 200})),
               threading.Thread(target=post, args=("good", base | {"prompt": TEXTS[0]}))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert out["bad"].status_code == 400 and "prompt too long" in out["bad"].json()["error"]["message"]
    assert out["good"].status_code == 200 and out["good"].json()["choices"][0]["text"] == text


# ---------------------------------------------------------------------------------------------
# calibration


RECORDS = [
    {"type": "cell", "method": "verifier_only", "alpha": None, "gamma": 5, "temperature": 0.0, "seed": 0,
     "batch_size": 1, "options": {}, "quality": {"bleu": 20.0}, "relative_latency": 1.0},
    {"type": "cell", "method": "sd", "alpha": None, "gamma": 5, "temperature": 0.0, "seed": 0, "batch_size": 1,
     "options": {}, "quality": {"bleu": 20.0}, "relative_latency": 0.9},
    {"type": "cell", "method": "token_v3", "alpha": 0.6, "gamma": 5, "temperature": 0.0, "seed": 0, "batch_size": 1,
     "options": {}, "quality": {"bleu": 19.0}, "relative_latency": 0.6},
    {"type": "cell", "method": "chow", "alpha": 0.9, "gamma": 3, "temperature": 0.0, "seed": 0, "batch_size": 1,
     "options": {}, "quality": {"bleu": 15.0}, "relative_latency": 0.3},
    {"type": "cell", "method": "chow", "alpha": 0.9, "gamma": 3, "temperature": 0.0, "seed": 1, "batch_size": 1,
     "options": {}, "quality": {"bleu": 16.0}, "relative_latency": 0.5},
    {"type": "cell", "method": "chow", "alpha": 0.9, "gamma": 3, "temperature": 0.0, "seed": 0, "batch_size": 8,
     "options": {}, "quality": {"bleu": 1.0}, "relative_latency": 0.1},
]


def test_calibration_from_records_and_choice(tmp_path):
    cal = from_records(RECORDS)
    by = {(e.method, e.alpha): e for e in cal.entries}
    assert len(cal.entries) == 4 and cal.metric == "bleu"          # batch 8 left out, chow's seeds averaged
    assert (by[("chow", 0.9)].quality_delta, by[("chow", 0.9)].relative_latency) == (4.5, 0.4)
    assert by[("token_v3", 0.6)].quality_delta == 1.0 and by[("sd", None)].quality_delta == 0.0
    cal.save(tmp_path / "c.json")
    again = Calibration.load(tmp_path / "c.json")
    assert again.entries == cal.entries
    assert cal.choose(0.0, quality_floor=0.0).method == "sd"                 # fastest with no loss
    assert cal.choose(0.0, quality_floor=1.5).method == "token_v3"
    assert cal.choose(0.0, quality_floor=10).method == "chow"
    assert cal.choose(0.0, latency_budget=0.7).method == "token_v3"          # best quality within 0.7
    assert cal.choose(0.0, latency_budget=1.0).method == "sd"
    assert cal.choose(0.0, quality_floor=5, latency_budget=0.7).method == "chow"     # both: the fastest
    assert cal.choose(0.0, quality_floor=2, latency_budget=0.7).method == "token_v3"
    with pytest.raises(Exception, match="no calibrated setting .* relative latency <= 0.2"):
        cal.choose(0.0, latency_budget=0.2)
    with pytest.raises(Exception, match="no entries at temperature 1"):
        cal.choose(1.0, quality_floor=1)
    assert Calibration.from_dict([{"method": "sd", "temperature": 0, "quality_delta": 0,
                                   "relative_latency": 0.8}]).entries[0].gamma == 5


def test_quality_floor_and_latency_budget_requests(pair, server, client):
    server.engine.calibration = from_records(RECORDS)
    try:
        r = client.completions.create(model=MODEL, prompt=TEXTS[1], temperature=0, max_tokens=12,
                                      extra_body={"quality_floor": 1.5})
        spec = r.usage.model_extra["speculation"]
        assert (spec["method"], spec["alpha"], spec["gamma"]) == ("token_v3", 0.6, 5)
        assert r.choices[0].model_extra["token_ids"] == reference(pair, TEXTS[1], "token_v3", 0.6, 12)[0]
        r = client.completions.create(model=MODEL, prompt=TEXTS[1], temperature=0, max_tokens=12,
                                      extra_body={"latency_budget": 0.45})
        spec = r.usage.model_extra["speculation"]
        assert (spec["method"], spec["gamma"]) == ("chow", 3)
        with pytest.raises(openai.BadRequestError, match="no calibrated setting"):
            client.completions.create(model=MODEL, prompt=TEXTS[1], temperature=0, extra_body={"latency_budget": 0.1})
        with pytest.raises(openai.BadRequestError, match="no entries at temperature 1"):
            client.completions.create(model=MODEL, prompt=TEXTS[1], temperature=1, extra_body={"quality_floor": 1})
        with pytest.raises(openai.BadRequestError, match="not both"):
            client.completions.create(model=MODEL, prompt=TEXTS[1], temperature=0,
                                      extra_body={"quality_floor": 1, "method": "sd"})
    finally:
        server.engine.calibration = None


# ---------------------------------------------------------------------------------------------
# cancellation and draining


def test_disconnect_cancels_only_its_row(pair, server, monkeypatch):
    monkeypatch.setattr(server.engine, "batch_wait_s", 0.5)    # A and B share a batch
    tokens_b, text_b, _ = reference(pair, TEXTS[4], "token_v3", 0.5, 64)
    cancelled = metric(server, "speccascade_prompts_total", outcome="cancelled")
    first_batch = len(server.engine.batch_log) and server.engine.batch_log[-1]["id"] + 1
    out = {}

    def request_b():
        out["b"] = httpx.post(f"{server.url}/v1/completions", timeout=120,
                              json={"prompt": TEXTS[4], "temperature": 0, "max_tokens": 64, "method": "token_v3",
                                    "alpha": 0.5})

    tb = threading.Thread(target=request_b)
    tb.start()
    body = {"prompt": LONG, "temperature": 0, "max_tokens": 200, "stream": True, "method": "token_v3", "alpha": 0.9}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as r:
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
    assert json.loads(first[6:])["choices"][0]["text"]            # got a token, then hung up
    tb.join(180)
    assert out["b"].status_code == 200
    assert out["b"].json()["choices"][0]["token_ids"] == tokens_b and out["b"].json()["choices"][0]["text"] == text_b
    end = time.monotonic() + 60
    while metric(server, "speccascade_prompts_total", outcome="cancelled") < cancelled + 1 and time.monotonic() < end:
        time.sleep(0.05)
    assert metric(server, "speccascade_prompts_total", outcome="cancelled") == cancelled + 1
    batches = [b for b in server.engine.batch_log if b["id"] >= first_batch]
    assert any(b["size"] == 2 and b["alphas"] == [0.5, 0.9] for b in batches), batches
    # A's row was finished when its client left: it holds fewer tokens than its greedy decode
    full = len(reference(pair, LONG, "token_v3", 0.9, 200)[0])
    a_tokens = [n for b in batches for rid, n in b.get("tokens", []) if rid != out["b"].json()["id"]]
    assert len(a_tokens) == 1 and a_tokens[0] < full, (a_tokens, full)
    good = httpx.post(f"{server.url}/v1/completions", json={"prompt": TEXTS[0], "max_tokens": 4}, timeout=60)
    assert good.status_code == 200


def test_disconnect_of_a_non_streaming_client(pair, server, monkeypatch):
    """A non-streaming client that gives up cancels its row: here the batch is held 2 s before it
    decodes, the client times out after 0.3 s, and its row is finished at the first block."""
    slow = server.engine._generate

    def held(rows):
        time.sleep(2.0)
        return slow(rows)

    monkeypatch.setattr(server.engine, "_generate", held)
    cancelled = metric(server, "speccascade_prompts_total", outcome="cancelled")
    first_batch = len(server.engine.batch_log) and server.engine.batch_log[-1]["id"] + 1
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", timeout=httpx.Timeout(60, read=0.3),
                   json={"prompt": LONG, "temperature": 0, "max_tokens": 200, "method": "sd"})
    end = time.monotonic() + 60
    while not any(b.get("tokens") for b in server.engine.batch_log if b["id"] >= first_batch) \
            and time.monotonic() < end:
        time.sleep(0.05)
    assert metric(server, "speccascade_prompts_total", outcome="cancelled") == cancelled + 1
    [(rid, n)] = [t for b in server.engine.batch_log if b["id"] >= first_batch for t in b["tokens"]]
    assert n < len(reference(pair, LONG, "sd", None, 200)[0]) and n <= 6    # one block of gamma + 1 at most


def test_drain_finishes_in_flight_and_refuses_new(pair):
    """What SIGTERM does: the in-flight stream completes; new requests and /health get 503; the
    server then exits."""
    srv = ServerThread(make_engine(pair), drain_timeout=60).start()
    _, text, _ = reference(pair, LONG, "sd", None, 64)
    got, status = [], {}
    body = {"prompt": LONG, "temperature": 0, "max_tokens": 64, "stream": True, "method": "sd"}
    with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                got.append(line)
                break
        srv.drain()
        r2 = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "Jesus wept."}, timeout=60)
        status["new"] = (r2.status_code, r2.json()["error"]["code"])
        status["health"] = httpx.get(f"{srv.url}/health", timeout=60).status_code
        got += [line for line in lines if line.startswith("data: ")]
    assert status == {"new": (503, "draining"), "health": 503}
    assert got[-1] == "data: [DONE]"
    assert "".join(json.loads(x[6:])["choices"][0]["text"] for x in got[:-1]) == text
    srv.thread.join(60)
    assert not srv.thread.is_alive()


def test_cli_serve_and_sigterm(tmp_path):
    """``speccascade serve`` in a subprocess: it answers, and SIGTERM drains it to exit code 0."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "speccascade.cli", "serve", "--port", str(port), "--threads", "1",
                             "--drain-timeout", "20", "--log-level", "warning"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 180
        while True:
            assert proc.poll() is None and time.monotonic() < end, "server did not start"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "Jesus wept.", "temperature": 0, "max_tokens": 16},
                       timeout=60)
        assert r.status_code == 200 and r.json()["model"] == MODEL and r.json()["choices"][0]["text"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


# ---------------------------------------------------------------------------------------------
# per-row alpha in the rules, and the streaming hook


RULE_ALPHAS = {"lossy": [0.0, 0.3, 0.9], "lossy_tuned": [0.0, 0.3, 0.9], "bild_star": [0.0, 0.7, 2.0],
               "chow": [0.0, 0.4, 1.0], "diff": [-1.0, 0.2, 1.0], "opt": [-5.0, 0.5, 5.0],
               "chow_log": [0.0, 0.5, 1.2], "diff_log": [-0.5, 0.0, 0.3], "opt_log": [-2.0, 0.0, 2.0],
               "token_v1": [-1.0, 0.1, 1.0], "token_v2": [-1.0, 0.3, 1.0], "token_v3": [0.0, 0.4, 1.0]}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("greedy", [False, True])
@pytest.mark.parametrize("name", sorted(RULE_ALPHAS))
def test_rules_per_row_alpha_equal_per_row_scalar_calls(name, greedy, dtype):
    g = torch.Generator().manual_seed(7)
    B, P, V = 3, 4, 6
    ql = torch.randn(B, P, V, generator=g, dtype=torch.float64) * 2
    pl = torch.randn(B, P, V, generator=g, dtype=torch.float64) * 2
    pl[0, 1] = ql[0, 1]                                            # q == p somewhere
    conf = lambda x: torch.softmax(x, -1).to(dtype)  # noqa: E731
    if greedy:
        samp = lambda x: torch.nn.functional.one_hot(x.argmax(-1), V).to(dtype)  # noqa: E731
    else:
        samp = lambda x: torch.softmax(x / 0.7, -1).to(dtype)  # noqa: E731
    d = Dists(samp(ql), samp(pl), conf(ql), conf(pl), greedy=greedy)
    alphas = RULE_ALPHAS[name]
    fn = sc.METHODS[name].fn
    batched = fn(d, torch.tensor(alphas, dtype=torch.float64))
    for b, a in enumerate(alphas):
        row = Dists(d.draft_probs[b:b + 1], d.target_probs[b:b + 1], d.draft_conf[b:b + 1], d.target_conf[b:b + 1],
                    greedy=greedy)
        single = fn(row, a)
        assert torch.equal(batched.pi[b:b + 1], single.pi), (name, a)
        assert torch.equal(batched.defer[b:b + 1].expand_as(single.defer), single.defer), (name, a)


def test_generate_per_row_alpha_equals_single_alpha_greedy():
    d, v = tiny_pair(0, noise=0.05)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16], [17]]
    for method, alphas in [("token_v3", [0.2, 0.9, 0.5, 1.0]), ("chow", [0.0, 0.5, 1.0, 0.3]),
                           ("opt", [-1.0, 0.5, 3.0, 1e9]), ("lossy", [0.0, 0.3, 0.9, 0.5]),
                           ("lossy_tuned", [0.0, 0.3, 0.9, 0.5]), ("bild_star", [0.0, 1.0, 3.0, 10.0])]:
        out = sc.generate(d, v, prompts, method=method, alpha=alphas, temperature=0, max_new_tokens=16)
        assert out.alpha == alphas
        for i, a in enumerate(alphas):
            single = sc.generate(d, v, prompts, method=method, alpha=a, temperature=0, max_new_tokens=16)
            assert out.tokens[i] == single.tokens[i], (method, a)
    assert sc.generate(d, v, prompts, method="chow", alpha=[0.5] * 4, temperature=0, max_new_tokens=4).alpha == 0.5
    with pytest.raises(sc.SpecCascadeError, match="outside the range"):
        sc.generate(d, v, prompts, method="chow", alpha=[0.5, 2.0, 0.1, 0.1])
    with pytest.raises(sc.SpecCascadeError, match="one per row"):
        sc.generate(d, v, prompts, method="chow", alpha=[0.5, 0.2])
    with pytest.raises(sc.SpecCascadeError, match="needs a speculative method"):
        sc.generate(d, v, prompts, method="token_cascade", alpha=[0.5, 0.2, 0.1, 0.1])
    with pytest.raises(sc.SpecCascadeError, match="takes no alpha"):
        sc.generate(d, v, prompts, method="sd", alpha=[0.5, 0.2, 0.1, 0.1])


class Collect:
    def __init__(self, rows):
        self.got, self.puts, self.ended = [[] for _ in range(rows)], 0, 0

    def put(self, new):
        assert self.ended == 0
        self.puts += 1
        for g, n in zip(self.got, new):
            g.extend(n)

    def end(self):
        self.ended += 1


@pytest.mark.parametrize("method", list(sc.METHODS))
def test_streamer_gets_exactly_the_tokens(method):
    d, v = tiny_pair(0, noise=0.05)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16], [17]]
    s = Collect(len(prompts))
    out = sc.generate(d, v, prompts, method=method, temperature=1, max_new_tokens=12, seed=2, eos_token_id=9,
                      streamer=s)
    ref = sc.generate(d, v, prompts, method=method, temperature=1, max_new_tokens=12, seed=2, eos_token_id=9)
    assert s.got == out.tokens == ref.tokens and s.ended == 1
    assert s.puts > (1 if method != "seq_cascade" else 0)     # block by block, except seq_cascade (at the end)
    z = {"wall_time_s": 0, "tokens_per_second": 0}
    assert out.stats.to_dict() | z == ref.stats.to_dict() | z
