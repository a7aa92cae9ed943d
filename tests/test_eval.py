"""Metrics against hand-computed values; Table 2 summaries on a fixture; sweep resumption; report."""

import json
import math

import pytest

from speccascade.eval.metrics import METRICS, exact_match, token_f1
from speccascade.eval.report import latency_at_quality, pareto_front, report, summarize, what_if
from speccascade.eval.sweep import SweepConfig, read_records, run_sweep
from speccascade.eval.tasks import JsonlTask, get_task


def test_exact_match_and_token_f1_by_hand():
    assert exact_match(["The Cat!", "a dog"], ["cat", "dog"]) == 100.0
    assert exact_match(["cat", "dogs"], ["cat", "dog"]) == 50.0
    # hyp "red big cat" vs ref "the big cat": common {big, cat} = 2; P = 2/3, R = 2/2 -> F1 = 0.8
    assert math.isclose(token_f1(["red big cat"], ["the big cat"]), 80.0)
    assert token_f1(["x"], ["y"]) == 0.0


def test_bleu_chrf_rouge_by_hand():
    assert METRICS["bleu"](["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert METRICS["chrf"](["abc"], ["abc"]) == pytest.approx(100.0)
    # ROUGE-1: hyp "a b c d", ref "a b e f": overlap 2, P = R = 1/2 -> F = 50
    assert METRICS["rouge1"](["a b c d"], ["a b e f"]) == pytest.approx(50.0)
    # ROUGE-2 bigrams: hyp {ab, bc, cd}, ref {ab, be, ef}: overlap 1 -> P = R = 1/3
    assert METRICS["rouge2"](["a b c d"], ["a b e f"]) == pytest.approx(100 / 3)
    # BLEU by hand: "a b c d e f" vs "a b c d e g": n-gram precisions 5/6, 4/5, 3/4, 2/3, equal lengths
    # (brevity penalty 1) -> 100 * (5/6 * 4/5 * 3/4 * 2/3) ** (1/4) = 100 * (1/3) ** 0.25
    assert METRICS["bleu"](["a b c d e f"], ["a b c d e g"]) == pytest.approx(100 * (1 / 3) ** 0.25, abs=1e-6)


def test_pareto_and_interpolation():
    pts = [(0.5, 10), (0.6, 9), (0.8, 14), (1.2, 20), (1.0, 13)]
    assert pareto_front(pts) == [(0.5, 10), (0.8, 14), (1.2, 20)]
    # quality 17 lies between (0.8, 14) and (1.2, 20): 0.8 + 3/6 * 0.4 = 1.0
    assert latency_at_quality(pareto_front(pts), 17) == pytest.approx(1.0)
    assert latency_at_quality(pareto_front(pts), 25) is None
    assert latency_at_quality(pareto_front(pts), 5) == 0.5


def rec(method, alpha, lat, q, gamma=5, T=1.0):
    return {"type": "cell", "key": f"{method}{alpha}", "method": method, "alpha": alpha, "gamma": gamma,
            "temperature": T, "seed": 0, "batch_size": 1, "quality": {"bleu": q}, "relative_latency": lat,
            "latency_s": lat * 10, "rejection_rate": 0.1, "stats": {"drafter_calls": 6, "verifier_calls": 1}}


def test_plot_labels_alphas_marks_single_points_and_counts_examples(tmp_path, monkeypatch):
    """Every point carries its alpha, a one-point method (sd) is a visible marker (no line), curves
    differ by marker as well as colour, and the title gives the number of examples."""
    import matplotlib.pyplot as plt

    from speccascade.eval.report import plot

    sig = {"signature": {"examples": 50}}
    records = [rec("verifier_only", None, 1.0, 20.0) | sig, rec("drafter_only", None, 0.1, 8.0) | sig,
               rec("sd", None, 0.8, 20.0) | sig] + \
              [rec(m, a, 0.3 + a / 2, 10 + 10 * a) | sig for m in ("opt", "chow", "diff", "token_v3")
               for a in (0.2, 0.6)]
    figures, real_close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))
    paths = plot(records, "bleu", tmp_path)
    assert [p.name for p in paths] == ["quality_vs_relative_latency_T1_b1.png", "quality_vs_rejection_rate_T1_b1.png"]
    ax = figures[0].axes[0]
    assert "50 examples" in ax.get_title()
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == sorted(["α=0.2", "α=0.6"] * 4)          # sd has no alpha: no label
    curves = {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}
    sd = curves["sd"]
    assert sd.get_linestyle() == "None" and sd.get_marker() not in ("", "None") and sd.get_markersize() >= 8
    methods = ["chow", "diff", "opt", "sd", "token_v3"]
    assert len({curves[m].get_marker() for m in methods}) == len(methods)
    assert len({curves[m].get_color() for m in methods}) == len(methods)
    for fig in figures:
        real_close(fig)


def test_table2_summaries_on_fixture():
    records = [rec("verifier_only", None, 1.0, 20.0), rec("drafter_only", None, 0.1, 8.0),
               rec("opt", 0.0, 0.6, 18.0), rec("opt", -1.0, 0.7, 22.0), rec("opt", 1.0, 0.4, 12.0),
               rec("chow", 0.5, 1.3, 19.0), rec("chow", 0.0, 1.5, 21.0)]
    s = summarize(records, "bleu")["T=1 gamma=5 batch=1"]
    assert s["verifier_quality"] == 20.0
    # opt reaches 20 between (0.6, 18) and (0.7, 22): latency 0.65 -> 1/0.65
    assert s["methods"]["opt"]["speedup_at_verifier_quality"] == pytest.approx(1 / 0.65)
    assert s["methods"]["opt"]["best_quality_within_verifier_latency"] == 22.0
    # chow reaches 20 at 1.4 -> 0.714x (slower than the verifier); nothing within latency 1
    assert s["methods"]["chow"]["speedup_at_verifier_quality"] == pytest.approx(1 / 1.4)
    assert s["methods"]["chow"]["best_quality_within_verifier_latency"] is None
    assert s["methods"]["drafter_only"]["speedup_at_verifier_quality"] is None


def test_what_if_predicts_relative_latency_from_counters_by_hand():
    def cell(method, alpha, drafter_calls, verifier_calls, q, T=1.0):
        return rec(method, alpha, 0.9, q, T=T) | {"stats": {"drafter_calls": drafter_calls,
                                                          "verifier_calls": verifier_calls}}
    records = [cell("verifier_only", None, 0, 100, 20.0), cell("sd", None, 300, 60, 20.0),
               cell("seq_cascade", 0.5, 100, 40, 18.0), cell("verifier_only", None, 0, 50, 25.0, T=0.0)]
    by = {(r["method"], r["temperature"]): r for r in what_if(records, 0.1, 1.2)}
    # sd: 300 drafter steps * 0.1 + 60 block calls * 1.2 = 102 verifier steps, / 100
    assert by[("sd", 1.0)]["relative_latency"] == pytest.approx(1.02)
    # a sequential method pays one verifier step per call: 100 * 0.1 + 40 * 1 = 50
    assert by[("seq_cascade", 1.0)]["relative_latency"] == pytest.approx(0.5)
    assert by[("verifier_only", 0.0)]["relative_latency"] == 1.0
    assert by[("sd", 1.0)]["measured_relative_latency"] == 0.9
    s = summarize(what_if(records, 0.1, 1.2), "bleu")["T=1 gamma=5 batch=1"]
    assert s["methods"]["sd"]["speedup_at_verifier_quality"] == pytest.approx(1 / 1.02)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="what-if cost ratio"):
            what_if(records, bad)
    with pytest.raises(ValueError, match="what-if block cost"):
        what_if(records, 0.1, 0.0)


def test_report_cli_what_if_and_its_bad_input(tmp_path, capsys):
    from speccascade.cli import main

    f = tmp_path / "fixture.jsonl"
    f.write_text("".join(json.dumps(r | {"stats": {"drafter_calls": 6 * i, "verifier_calls": 10}}) + "\n"
                         for i, r in enumerate([rec("verifier_only", None, 1.0, 20.0), rec("opt", 0.0, 0.6, 18.0),
                                                rec("opt", -1.0, 0.7, 22.0)])))
    assert main(["report", str(f), "--out", str(tmp_path / "r"), "--what-if", "0.05,1.1"]) == 0
    assert "What-if: drafter step = 0.05 verifier steps, block call = 1.1" in capsys.readouterr().out
    assert main(["report", str(f), "--out", str(tmp_path / "r"), "--what-if", "cheap"]) == 2
    assert "--what-if takes C or C,B" in capsys.readouterr().err
    assert main(["report", str(f), "--out", str(tmp_path / "r"), "--what-if", "-1"]) == 2
    assert "cost ratio must be a finite number > 0" in capsys.readouterr().err


def test_a_method_swept_with_two_option_sets_gets_two_curves():
    records = [rec("verifier_only", None, 1.0, 20.0), rec("seq_cascade", 0.5, 1.1, 20.0),
               rec("seq_cascade", 0.5, 0.5, 21.0) | {"options": {"length_normalized": True}},
               rec("opt", 0.0, 0.6, 18.0)]
    methods = summarize(records, "bleu")["T=1 gamma=5 batch=1"]["methods"]
    assert set(methods) == {"verifier_only", "seq_cascade", "seq_cascade [length_normalized=True]", "opt"}
    assert methods["seq_cascade [length_normalized=True]"]["best_quality_within_verifier_latency"] == 21.0
    assert methods["seq_cascade"]["best_quality_within_verifier_latency"] is None


@pytest.fixture(scope="module")
def pair():
    from speccascade.models.loading import TOKENIZER_DIR, embedded_pair_dirs, load_causal_lm, load_tokenizer

    d, v = embedded_pair_dirs("tiny")
    return load_causal_lm(d), load_causal_lm(v), load_tokenizer(TOKENIZER_DIR)


def _dropped(refs, share, seed):
    """Each reference with about ``share`` of its words dropped (a noisy system's output)."""
    import random

    rng = random.Random(seed)
    return [" ".join(w for w in r.split() if rng.random() >= share) for r in refs]


REFS = [p["es"] for p in __import__("speccascade.data.bible", fromlist=["load_split"]).load_split("test")[:300]]


def test_sentence_stats_sum_to_the_corpus_bleu_of_any_subset():
    from speccascade.eval.metrics import bleu_from_stats, bleu_sentence_stats

    hyps = _dropped(REFS, 0.3, 0)
    stats = bleu_sentence_stats(hyps, REFS)
    assert len(stats) == len(REFS) and all(len(row) == 10 for row in stats)
    for subset in (range(300), range(0, 300, 7), [5, 5, 17, 40, 40, 40]):   # with repeats, as a bootstrap draws
        total = [sum(stats[i][k] for i in subset) for k in range(10)]
        want = METRICS["bleu"]([hyps[i] for i in subset], [REFS[i] for i in subset])
        assert bleu_from_stats(total) == pytest.approx(want, abs=1e-9)


def test_paired_bootstrap_separates_a_worse_system_from_noise():
    from speccascade.eval.metrics import bleu_sentence_stats, paired_bootstrap

    base = bleu_sentence_stats(_dropped(REFS, 0.2, 0), REFS)
    same = paired_bootstrap("bleu", base, base)
    assert same == {"delta": 0.0, "ci95": [0.0, 0.0]}
    # the same kind of system, other noise: its interval reaches 0 (not significantly different)
    other = paired_bootstrap("bleu", bleu_sentence_stats(_dropped(REFS, 0.2, 1), REFS), base)
    assert other["ci95"][0] < 0 < other["ci95"][1] and other["ci95"][0] <= other["delta"] <= other["ci95"][1]
    # a clearly worse system: the whole interval is below 0
    worse = paired_bootstrap("bleu", bleu_sentence_stats(_dropped(REFS, 0.6, 2), REFS), base)
    assert worse["ci95"][1] < 0 and worse["delta"] < -10
    # the same seed, the same draws: a report is reproducible
    assert paired_bootstrap("bleu", bleu_sentence_stats(_dropped(REFS, 0.2, 1), REFS), base) == other


def test_table2_within_noise_takes_the_fastest_point_not_significantly_below_the_verifier():
    from speccascade.eval.metrics import bleu_sentence_stats

    def cell(method, alpha, lat, hyps):
        return rec(method, alpha, lat, METRICS["bleu"](hyps, REFS)) | {
            "quality_stats": {"bleu": bleu_sentence_stats(hyps, REFS)}}

    verifier = _dropped(REFS, 0.2, 0)
    lossless = _dropped(REFS, 0.2, 2)   # the verifier's kind of output, 1.05 BLEU below it by chance
    assert METRICS["bleu"](lossless, REFS) < METRICS["bleu"](verifier, REFS)
    records = [cell("verifier_only", None, 1.0, verifier), cell("sd", None, 0.6, lossless),
               cell("opt", 1.0, 0.3, _dropped(REFS, 0.6, 5)), cell("opt", 0.0, 0.5, _dropped(REFS, 0.2, 3)),
               rec("chow", 0.5, 0.4, 30.0)]   # a cell without per-example statistics
    s = summarize(records, "bleu")["T=1 gamma=5 batch=1"]["methods"]
    assert s["sd"]["speedup_at_verifier_quality"] is None   # the strict summary misses it
    assert s["sd"]["speedup_within_noise"] == pytest.approx(1 / 0.6)
    assert s["sd"]["within_noise_point"]["ci95"][1] >= 0 > s["sd"]["within_noise_point"]["delta"]
    # opt's fastest point is far worse: its match is the slower one
    assert s["opt"]["speedup_within_noise"] == pytest.approx(1 / 0.5)
    assert s["opt"]["within_noise_point"]["alpha"] == 0.0
    assert s["chow"]["speedup_within_noise"] is None   # no statistics: no test
    from speccascade.eval.report import format_table

    assert "speed-up within noise" in format_table(summarize(records, "bleu"))


def test_table2_pools_seeds_into_one_cell_per_grid_point():
    """Several seeds of a sampled cell (sweep --seeds): Table 2 scores each grid point on all its
    seeds' outputs together (the corpus BLEU of the concatenation, examples kept paired) and times it
    by the seeds' summed wall-clock against the verifier's; a cell lacking a seed is left out, named;
    one seed, or a T = 0 group (one seed by construction), is left as it is."""
    from speccascade.eval.metrics import bleu_sentence_stats
    from speccascade.eval.report import format_table, pool_seeds

    def cell(method, alpha, seed, lat, base_s, hyps, T=1.0):
        return rec(method, alpha, lat, METRICS["bleu"](hyps, REFS), T=T) | {
            "seed": seed, "latency_s": lat * base_s, "quality_stats": {"bleu": bleu_sentence_stats(hyps, REFS)}}

    v = {k: _dropped(REFS, 0.2, 10 + k) for k in (0, 1)}
    sd = {k: _dropped(REFS, 0.2, 20 + k) for k in (0, 1)}
    base_s = {0: 10.0, 1: 12.0}
    records = [cell("verifier_only", None, k, 1.0, base_s[k], v[k]) for k in (0, 1)]
    records += [cell("sd", None, 0, 0.6, base_s[0], sd[0]), cell("sd", None, 1, 0.7, base_s[1], sd[1]),
                cell("opt", 0.0, 0, 0.5, base_s[0], _dropped(REFS, 0.2, 30)),        # seed 1 never ran
                cell("verifier_only", None, 0, 1.0, 9.0, v[0], T=0.0), cell("sd", None, 0, 0.5, 9.0, v[0], T=0.0)]
    notes = []
    pooled = pool_seeds(records, notes)
    by = {(r["method"], r["temperature"]): r for r in pooled if r.get("type") == "cell"}
    assert ("opt", 1.0) not in by and len(notes) == 1 and "opt" in notes[0] and "[0]" in notes[0]
    both = lambda d: d[0] + d[1]   # noqa: E731
    assert by[("verifier_only", 1.0)]["quality"]["bleu"] == pytest.approx(METRICS["bleu"](both(v), REFS + REFS))
    assert by[("sd", 1.0)]["quality"]["bleu"] == pytest.approx(METRICS["bleu"](both(sd), REFS + REFS))
    assert by[("sd", 1.0)]["relative_latency"] == pytest.approx((0.6 * 10 + 0.7 * 12) / (10 + 12))
    assert by[("sd", 1.0)]["seeds"] == [0, 1] and len(by[("sd", 1.0)]["quality_stats"]["bleu"]) == len(REFS)
    t0 = [r for r in records if r["temperature"] == 0.0]
    assert [r for r in pooled if r.get("temperature") == 0.0] == t0           # one seed: as they were
    assert pool_seeds(t0) is t0 and pool_seeds(pooled) == pooled
    s = summarize(records, "bleu")
    t1 = s["T=1 gamma=5 batch=1"]
    assert t1["seeds"] == [0, 1] and "seeds" not in s["T=0 gamma=5 batch=1"]
    assert t1["verifier_quality"] == pytest.approx(by[("verifier_only", 1.0)]["quality"]["bleu"])
    noise = t1["methods"]["sd"]["within_noise_point"]
    want = METRICS["bleu"](both(sd), REFS + REFS) - METRICS["bleu"](both(v), REFS + REFS)
    assert noise["delta"] == pytest.approx(want)
    assert "(seeds 0, 1 pooled)" in format_table(s)


def test_a_greedy_decode_draws_nothing_so_a_sweep_runs_one_seed_at_T0():
    """Every method at T = 0 gives the same tokens under any seed (the sampling distributions are
    one-hot and every rule's target with them), which is why a sweep runs only the first seed there."""
    import torch

    import speccascade as sc

    from tiny_models import tiny_pair

    d, v = tiny_pair(1, noise=0.8, vocab=16)
    ids = torch.randint(3, 16, (4, 5), generator=torch.Generator().manual_seed(0))
    def run(name, seed, T):
        return sc.generate(d, v, ids, method=name, alpha=sc.METHODS[name].check_alpha(None), gamma=3,
                           max_new_tokens=10, seed=seed, temperature=T, eos_token_id=[]).tokens

    for name in sc.METHODS:
        assert run(name, 0, 0.0) == run(name, 1, 0.0) == run(name, 7, 0.0), name
    assert run("sd", 0, 1.0) != run("sd", 1, 1.0)   # the check can fail: sampled decodes do differ
    cells = SweepConfig(methods=["sd"], temperatures=[0.0, 1.0], seeds=[3, 4]).validate().cells()
    assert sorted((c.method, c.temperature, c.seed) for c in cells) == [
        ("sd", 0.0, 3), ("sd", 1.0, 3), ("sd", 1.0, 4),
        ("verifier_only", 0.0, 3), ("verifier_only", 1.0, 3), ("verifier_only", 1.0, 4)]


def test_sweep_resumes_without_repeating_or_losing_cells(pair, tmp_path):
    drafter, verifier, tok = pair
    task = get_task("bible_en_es")
    cfg = SweepConfig(methods=["sd", "opt", "token_cascade"], alphas={"opt": [0.0, 1.0], "token_cascade": [0.5]},
                      n_examples=3, max_new_tokens=6)
    out = tmp_path / "sweep.jsonl"
    seen = []

    def interrupt(record):
        seen.append(record["key"])
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sweep(drafter, verifier, tok, task, cfg, out, progress=False, on_record=interrupt)
    assert [r["key"] for r in read_records(out) if r["type"] == "cell"] == seen
    with open(out, "a") as f:
        f.write('{"type": "cell", "key": "torn')  # a crash mid-write leaves a torn line
    records = run_sweep(drafter, verifier, tok, task, cfg, out, progress=False)
    keys = [r["key"] for r in records if r["type"] == "cell"]
    assert len(keys) == len(set(keys)) == len(cfg.cells()) == 5
    assert keys[:2] == seen and keys[0].startswith("verifier_only")
    first = [r for r in records if r["type"] == "cell"]
    assert first[0]["relative_latency"] == 1.0 and all(r["relative_latency"] > 0 for r in first)
    assert all(set(r["signature"]) >= {"drafter", "verifier", "task", "method", "alpha", "gamma", "temperature",
                                       "seed", "speccascade", "device"} for r in first)
    assert all(len(r["quality_stats"]["bleu"]) == 3 for r in first)   # per-example, for the paired bootstrap
    # a third run has nothing left to do
    assert len(run_sweep(drafter, verifier, tok, task, cfg, out, progress=False)) == len(records)


def test_a_run_that_appends_other_gammas_times_its_cells_against_its_own_baseline(pair, tmp_path):
    """A second sweep into the same file (the gamma = 3 / 8 stage after gamma = 5) runs its own
    ``verifier_only`` first and its cells' relative latency is against that one (same process, same
    host state), not against the first run's."""
    drafter, verifier, tok = pair
    task, out = get_task("bible_en_es"), tmp_path / "sweep.jsonl"
    run_sweep(drafter, verifier, tok, task, SweepConfig(methods=["sd"], gammas=[5], n_examples=2,
                                                        max_new_tokens=5), out, progress=False)
    records = run_sweep(drafter, verifier, tok, task, SweepConfig(methods=["sd"], gammas=[3], n_examples=2,
                                                                  max_new_tokens=5), out, progress=False)
    cells = [r for r in records if r["type"] == "cell"]
    assert [(r["method"], r["gamma"]) for r in cells] == [("verifier_only", 5), ("sd", 5), ("verifier_only", 3),
                                                          ("sd", 3)]
    base5, sd5, base3, sd3 = cells
    assert base5["relative_latency"] == base3["relative_latency"] == 1.0
    assert sd5["relative_latency"] == sd5["latency_s"] / base5["latency_s"]
    assert sd3["relative_latency"] == sd3["latency_s"] / base3["latency_s"]


def test_report_renders(pair, tmp_path):
    drafter, verifier, tok = pair
    out = tmp_path / "s.jsonl"
    cfg = SweepConfig(methods=["drafter_only", "token_v3", "lossy"], alphas={"token_v3": [0.3, 1.0], "lossy": [0.5]},
                      n_examples=2, max_new_tokens=5)
    run_sweep(drafter, verifier, tok, get_task("bible_en_es"), cfg, out, progress=False)
    res = report(out, tmp_path / "rep")
    assert len(res["plots"]) == 2 and all((tmp_path / "rep" / p.split("/")[-1]).stat().st_size > 5000
                                          for p in res["plots"])
    assert "token_v3" in res["text"] and json.loads((tmp_path / "rep" / "summary.json").read_text())["table2"]
    assert res["latency_model"]["cells"] and all(c["predicted_s"] > 0 for c in res["latency_model"]["cells"])
    res = report(out, tmp_path / "rep2", what_if_costs=(0.1, 1.0))
    wdir = tmp_path / "rep2" / "what_if_c0.1_b1"
    assert (wdir / "quality_vs_relative_latency_T1_b1.png").stat().st_size > 5000
    assert "What-if" in res["text"] and json.loads((wdir / "summary.json").read_text())["summary"]


def test_a_retrained_pair_neither_resumes_nor_reports_with_the_first(pair, tmp_path):
    """Two trainings of one shape have equal parameter counts: the weights' fingerprint in the
    model id keeps their cells apart (a sweep file refuses them; a report refuses to mix them)."""
    import copy

    import torch

    from speccascade.errors import SpecCascadeError

    drafter, verifier, tok = pair
    other = copy.deepcopy(verifier)
    with torch.no_grad():
        next(other.parameters()).reshape(-1)[0] += 1.0
    cfg = SweepConfig(methods=["sd"], n_examples=1, max_new_tokens=3)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first = run_sweep(drafter, verifier, tok, get_task("bible_en_es"), cfg, a, progress=False)
    sig = first[-1]["signature"]
    assert sig["verifier"].startswith("verifier:") and sig["verifier"].count(":") == 2
    with pytest.raises(SpecCascadeError, match="another model pair"):
        run_sweep(drafter, other, tok, get_task("bible_en_es"), cfg, a, progress=False)
    second = run_sweep(drafter, other, tok, get_task("bible_en_es"), cfg, b, progress=False)
    assert second[-1]["signature"]["verifier"] != sig["verifier"]
    assert second[-1]["signature"]["drafter"] == sig["drafter"]
    with pytest.raises(ValueError, match="different model pairs"):
        report([a, b], tmp_path / "rep")
    assert report([a], tmp_path / "rep")["summary"]
    # records written before fingerprints existed ("name:count") still go with either training
    legacy = tmp_path / "legacy.jsonl"
    legacy.write_text("".join(json.dumps(r | {"signature": r["signature"] | {
        "verifier": ":".join(r["signature"]["verifier"].split(":")[:2]),
        "drafter": ":".join(r["signature"]["drafter"].split(":")[:2])}}) + "\n" for r in first))
    assert report([legacy, b], tmp_path / "rep3")["summary"]
    assert len(run_sweep(drafter, other, tok, get_task("bible_en_es"), cfg, legacy, progress=False)) == len(first)


def test_jsonl_task(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"input": "2+2=", "reference": "4"}\n{"input": "3+3=", "reference": "6"}\n')
    t = JsonlTask(p, "exact_match")
    assert [e.reference for e in t.examples()] == ["4", "6"]
    assert t.score(["4", "7"], ["4", "6"]) == {"exact_match": 50.0}


def test_sweep_with_static_backend_records_it(pair, tmp_path):
    drafter, verifier, tok = pair
    cfg = SweepConfig(methods=["sd"], n_examples=2, max_new_tokens=5)
    records = run_sweep(drafter, verifier, tok, get_task("bible_en_es"), cfg, tmp_path / "s.jsonl", progress=False,
                        backend="static")
    cells = [r for r in records if r["type"] == "cell"]
    assert len(cells) == 2 and all(r["signature"]["backend"] == "static" for r in cells)


def test_warm_up_meets_every_shape_the_cells_meet(pair):
    """A compiled sweep warms up before timing: every (model, feed width) the cells then use was
    already met during the warm-up, so no compilation lands in a timed cell."""
    from speccascade.eval.sweep import Cell, run_cell, warm_up
    from speccascade.models import StaticHFBackend

    class Recording(StaticHFBackend):
        seen: set = set()

        def _call(self, tokens, valid):
            Recording.seen.add((self.name, tokens.shape[1]))
            return super()._call(tokens, valid)

    drafter, verifier, tok = pair
    task = get_task("bible_en_es")
    examples = task.examples(6)
    cells = [Cell(m, a, 3, 1.0, 0, 1) for m, a in (("verifier_only", None), ("sd", None), ("token_cascade", 0.5),
                                                    ("bild", 1.0), ("seq_cascade", 0.5))]
    d, v = Recording(drafter, "drafter", 1024), Recording(verifier, "verifier", 1024)
    warm_up(d, v, tok, task, examples, cells, max_new_tokens=12)
    warmed, Recording.seen = set(Recording.seen), set()
    for cell in cells:
        run_cell(d, v, tok, task, examples, cell, max_new_tokens=12)
    assert Recording.seen and Recording.seen <= warmed


def test_sweep_cli_method_options_reach_the_cells(tmp_path, capsys):
    from speccascade.cli import main

    out = tmp_path / "s.jsonl"
    args = ["sweep", "--methods", "seq_cascade", "--alphas", "seq_cascade=0.5", "--examples", "2",
            "--max-new-tokens", "4", "--quiet", "--out", str(out)]
    assert main(args + ["--option", "seq_cascade.length_normalized=true"]) == 0
    cell = [r for r in read_records(out) if r["type"] == "cell" and r["method"] == "seq_cascade"][0]
    assert cell["options"] == {"length_normalized": True} and cell["key"].endswith("|length_normalized=True")
    for bad, msg in (("seq_cascade.nope=1", "has no option 'nope'"), ("length_normalized=1", "METHOD.KEY=VALUE"),
                     ("bild.alpha_f=0.5", "not among the swept methods"), ("what.x=1", "unknown method")):
        assert main(args + ["--option", bad]) == 2
        assert msg in capsys.readouterr().err
    assert main(["generate", "Jesus wept.", "--method", "seq_cascade", "--option", "length_normalized=true",
                 "--quiet", "--max-new-tokens", "4"]) == 0
    assert main(["generate", "Jesus wept.", "--method", "sd", "--option", "length_normalized=true", "--quiet"]) == 2


def test_sweep_warm_up_only_meets_every_cell_shape_and_writes_nothing(tmp_path, capsys, monkeypatch):
    """``sweep --warm-up-only`` (filling compile caches before the models it will sweep exist):
    each (method, gamma, T) of the grid runs once on the probe prompts, nothing is timed or written."""
    import speccascade.eval.sweep as sweep_mod
    from speccascade.cli import main

    seen = []
    real = sweep_mod.run_cell

    def spy(d, v, tok, task, examples, cell, max_new_tokens):
        seen.append((cell.method, cell.gamma, cell.temperature))
        return real(d, v, tok, task, examples, cell, max_new_tokens)

    monkeypatch.setattr(sweep_mod, "run_cell", spy)
    out = tmp_path / "s.jsonl"
    args = ["sweep", "--methods", "sd,token_v3", "--alphas", "token_v3=0.2,0.8", "--gammas", "2", "3",
            "--temperatures", "0", "1", "--examples", "2", "--max-new-tokens", "4", "--quiet", "--out", str(out)]
    assert main([a for a in args if a not in ("--out", str(out))] + ["--warm-up-only"]) == 0   # no --out needed
    assert "warmed up the shapes of 14 cells" in capsys.readouterr().out
    assert sorted(set(seen)) == sorted({(m, g, t) for m in ("sd", "token_v3") for g in (2, 3) for t in (0.0, 1.0)}
                                       | {("verifier_only", 2, t) for t in (0.0, 1.0)})
    assert len(seen) == len(set(seen)) and not out.exists()
    assert main(args + ["--warm-up-only", "--workers", "2"]) == 2
    assert "--warm-up-only runs in one process" in capsys.readouterr().err
    assert main([a for a in args if a not in ("--out", str(out))]) == 2
    assert "sweep needs --out" in capsys.readouterr().err


def test_latency_model_counts_one_prefill_per_model_per_example():
    from speccascade.eval.report import _model_cost

    stats = {"drafter_calls": 10, "verifier_calls": 4, "deferred": 3}
    sig = {"examples": 7}
    costs = (0.5, 1.0, 2.0, 0.25, 3.0)    # drafter step, verifier step, block, drafter / verifier pre-fill
    def cost(method):
        return _model_cost({"method": method, "stats": stats, "signature": sig, "batch_size": 1}, *costs)
    assert cost("sd") == 10 * 0.5 + 4 * 2.0 + 7 * 0.25 + 7 * 3.0
    assert cost("verifier_only") == 10 * 0.5 + 4 * 1.0 + 7 * 3.0
    assert cost("drafter_only") == 10 * 0.5 + 4 * 1.0 + 7 * 0.25
    assert cost("seq_cascade") == 10 * 0.5 + 4 * 1.0 + 7 * 0.25 + 3 * 3.0      # the verifier re-decodes 3
    assert cost("token_cascade") == 10 * 0.5 + 4 * 1.0 + 7 * 0.25 + 7 * 3.0
    assert _model_cost({"method": "sd", "stats": stats}, *costs[:3]) == 10 * 0.5 + 4 * 2.0   # older records


def test_latency_model_prices_a_feature_drafters_verifier_prefill_with_its_own_timing():
    """A sweep with a feature drafter times the verifier's pre-fill that returns its states apart
    (``verifier_prefill_states_s``): the speculative cells are priced with it, ``verifier_only`` with
    the plain one; records without it keep the plain one for both. So is the drafter's first call of a
    block (``drafter_first_call_s``), once a block in the speculative cells."""
    from speccascade.eval.report import latency_model

    costs = {"type": "costs", "gamma": 3, "drafter_step_s": 0.5, "verifier_step_s": 1.0, "verifier_block_s": 2.0,
             "drafter_prefill_s": 0.25, "verifier_prefill_s": 3.0}
    stats = {"drafter_calls": 10, "verifier_calls": 4}
    cells = [{"type": "cell", "key": m, "method": m, "gamma": 3, "batch_size": 1, "latency_s": 100.0,
              "stats": stats, "signature": {"examples": 7}} for m in ("verifier_only", "sd")]
    plain = {c["key"]: c["predicted_s"] for c in latency_model([costs, *cells])["cells"]}
    feature = {c["key"]: c["predicted_s"]
               for c in latency_model([costs | {"verifier_prefill_states_s": 5.0}, *cells])["cells"]}
    assert plain == {"verifier_only": 10 * 0.5 + 4 * 1.0 + 7 * 3.0, "sd": 10 * 0.5 + 4 * 2.0 + 7 * 0.25 + 7 * 3.0}
    assert feature == {"verifier_only": plain["verifier_only"], "sd": plain["sd"] + 7 * 2.0}
    # and its first drafter call of each block (ragged, up to gamma + 1 wide), timed apart: 4 blocks
    first = {c["key"]: c["predicted_s"] for c in latency_model(
        [costs | {"drafter_first_call_s": 0.75}, *[c | {"stats": stats | {"blocks": 4}} for c in cells]])["cells"]}
    assert first == {"verifier_only": plain["verifier_only"], "sd": plain["sd"] + 4 * (0.75 - 0.5)}


def test_latency_model_fits_the_unmodelled_seconds_per_example_and_per_block():
    """``latency_model(...)["unmodelled"]``: the speculative cells' measured - predicted seconds fitted
    as a + b x blocks recovers a per-example cost (a / examples) and a per-block one exactly, on cells
    made so; ``verifier_only`` is not in the fit."""
    from speccascade.eval.report import latency_model

    costs = {"type": "costs", "gamma": 3, "drafter_step_s": 0.5, "verifier_step_s": 1.0, "verifier_block_s": 2.0}
    per_example, per_block, examples = 0.009, 0.0002, 50
    cells = [{"type": "cell", "key": "verifier_only", "method": "verifier_only", "gamma": 3, "batch_size": 1,
              "latency_s": 1e3, "stats": {"drafter_calls": 0, "verifier_calls": 400}, "signature": {"examples": 50}}]
    for k, blocks in enumerate((100, 140, 220)):
        stats = {"drafter_calls": 3 * blocks, "verifier_calls": blocks, "blocks": blocks}
        modelled = 3 * blocks * 0.5 + blocks * 2.0
        cells.append({"type": "cell", "key": f"sd{k}", "method": "sd", "gamma": 3, "batch_size": 1,
                      "latency_s": modelled + examples * per_example + blocks * per_block, "stats": stats,
                      "signature": {"examples": examples}})
    (fit,) = latency_model([costs, *cells])["unmodelled"]
    assert fit["cells"] == 3 and fit["residual_sd_s"] == pytest.approx(0, abs=1e-9)
    assert fit["per_example_s"] == pytest.approx(per_example) and fit["per_block_s"] == pytest.approx(per_block)


def test_sweep_warm_up_sizes_the_fused_cache_for_the_longest_request():
    """After the warm-up no timed cell re-allocates a per-request cache (a new cache size means a
    recompiled step and re-captured graphs inside the timing: on an H200 this made the first
    cells of a sweep 5x slower). The examples need two cache sizes; the warm-up's probes alone
    (one per prompt width) would have met only the smaller."""
    from speccascade.eval.sweep import Cell, run_cell, warm_up
    from speccascade.eval.tasks import BibleTask
    from speccascade.models import make_backend
    from speccascade.models.loading import TOKENIZER_DIR, embedded_pair_dirs, load_causal_lm, load_tokenizer

    task, tok = BibleTask(), load_tokenizer(TOKENIZER_DIR)
    d_dir, v_dir = embedded_pair_dirs("tiny")
    d = make_backend(load_causal_lm(d_dir), "drafter", "fused")
    v = make_backend(load_causal_lm(v_dir), "verifier", "fused")
    pool = task.examples(None)
    n = {ex.id: len(task.encode(tok, ex.input)) for ex in pool}
    # a short prompt, then one of the second width bucket that fits 256 slots, then a long one that does not
    examples = [next(e for e in pool if n[e.id] < 40), next(e for e in pool if 66 <= n[e.id] <= 70),
                next(e for e in pool if n[e.id] >= 100)]
    cells = [Cell("verifier_only", None, 3, 0.0, 0, 1), Cell("sd", None, 3, 0.0, 0, 1)]
    warm_up(d, v, tok, task, examples, cells, 150)
    generations = (d.generation, v.generation)
    for cell in cells:
        run_cell(d, v, tok, task, examples, cell, 150)
    assert (d.generation, v.generation) == generations


def test_sd_speedup_analysis_steps_reach_the_measured_speedup_when_the_model_is_the_whole_wall(monkeypatch):
    """benchmarks/sd_speedup_analysis.py: its step-by-step account (modelled -> gamma + 1 drafter calls ->
    measured blocks -> the block past the end -> pre-fills) ends at the measured speed-up exactly when
    each cell's wall is its modelled wall, and each step moves by the factor it names."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import sd_speedup_analysis as sa

    n, gamma, s_d, s_v, blk, pre_v, pre_d = 10, 5, 1e-4, 2e-3, 2.5e-3, 4e-3, 1e-3
    cost = {"type": "costs", "gamma": gamma, "drafter_step_s": s_d, "verifier_step_s": s_v,
            "verifier_block_s": blk, "verifier_prefill_s": pre_v, "drafter_prefill_s": pre_d}
    block = (gamma + 1) * s_d + blk
    v_calls, blocks = 300, 130
    base_wall = n * pre_v + (v_calls + n) * s_v
    sd_wall = n * (pre_v + pre_d) + (blocks + n) * block
    common = {"type": "cell", "temperature": 1.0, "gamma": gamma, "batch_size": 1, "worker": 0}
    base = common | {"method": "verifier_only", "latency_s": base_wall, "relative_latency": 1.0,
                     "stats": {"prefill_calls": n, "verifier_calls": v_calls}}
    sd = common | {"method": "sd", "latency_s": sd_wall, "relative_latency": sd_wall / base_wall,
                   "stats": {"prefill_calls": 2 * n, "blocks": blocks, "accepted_per_position": [70, 40, 20, 8, 3],
                             "drafter_calls": (gamma + 1) * blocks, "verifier_calls": blocks,
                             "accepted": 141, "drafted": gamma * blocks, "tokens_per_verifier_call": 2.1}}
    (row,) = sa.analyse([cost, base, sd])["sd"]
    steps = row["speedup_steps"]
    assert steps["measured"] == pytest.approx(base_wall / sd_wall)
    assert steps["with_prefills"] == pytest.approx(steps["measured"])
    assert steps["unmodelled_share"] == {"sd": pytest.approx(0), "verifier_only": pytest.approx(0)}
    assert steps["with_the_loops_drafter_calls"] == pytest.approx(steps["modelled"] * (gamma * s_d + blk) / block)
    assert steps["with_measured_blocks"] == pytest.approx(v_calls * s_v / (blocks * block))
    assert steps["with_the_step_past_the_end"] == pytest.approx((v_calls + n) * s_v / ((blocks + n) * block))
    assert steps["past_the_end_share_of_wall"]["sd"] == pytest.approx(n * block / sd_wall)
    # a slower sd wall (host work) shows up as its unmodelled share, and only there
    slow = sd | {"latency_s": sd_wall * 1.1, "relative_latency": sd_wall * 1.1 / base_wall}
    (row,) = sa.analyse([cost, base, slow])["sd"]
    assert row["speedup_steps"]["unmodelled_share"]["sd"] == pytest.approx(0.1)
    assert row["speedup_steps"]["with_prefills"] == pytest.approx(steps["with_prefills"])
    # records that count the steps run past the end (none here: the host foresaw every end)
    counted = sd | {"stats": sd["stats"] | {"steps_past_end": 0}}
    ref = base | {"stats": base["stats"] | {"steps_past_end": 0}}
    (row,) = sa.analyse([cost, ref, counted])["sd"]
    assert row["speedup_steps"]["with_the_step_past_the_end"] == pytest.approx(steps["with_measured_blocks"])
    assert row["speedup_steps"]["past_the_end_share_of_wall"] == {"sd": 0, "verifier_only": 0}
    # records of gamma drafter calls a block (sd feeds its last draft with the next block's first call)
    lean = sd | {"stats": sd["stats"] | {"drafter_calls": gamma * blocks}}
    (row,) = sa.analyse([cost, base, lean])["sd"]
    assert row["speedup_steps"]["drafter_calls_per_block"] == gamma
    assert row["speedup_steps"]["with_the_loops_drafter_calls"] == pytest.approx(steps["modelled"])
    # a later sweep run at another gamma timed its own baseline: the speed-up is against that one, even
    # where the stored ratio (a file from before the sweep's own-baseline rule) is against the first run's
    g3 = {"gamma": 3, "worker": 0}
    base3 = base | g3 | {"latency_s": base_wall * 0.9}
    sd3 = sd | g3 | {"relative_latency": sd_wall / base_wall}
    rows = sa.analyse([cost, base, sd, base3, sd3])["sd"]
    assert [r["gamma"] for r in rows] == [5, 3]
    assert rows[0]["measured_speedup"] == pytest.approx(base_wall / sd_wall)
    assert rows[1]["measured_speedup"] == pytest.approx(0.9 * base_wall / sd_wall)
    # several seeds (sweep --seeds): each seed's sd against the baseline of its own seed
    s1 = {"seed": 1}
    rows = sa.analyse([cost, base, sd, base | s1 | {"latency_s": base_wall * 1.2}, sd | s1])["sd"]
    assert [(r["seed"], r["measured_speedup"]) for r in rows] == [
        (0, pytest.approx(base_wall / sd_wall)), (1, pytest.approx(1.2 * base_wall / sd_wall))]
    # another speculative method's block against sd's of the same run (temperature, gamma, worker, seed)
    diff = sd | {"method": "diff", "alpha": 0.0, "latency_s": sd_wall * 1.05,
                 "stats": sd["stats"] | {"blocks": blocks - 10}}
    (cost_row,) = sa.analyse([cost, base, sd, diff])["blocks"]
    assert cost_row["method"] == "diff" and cost_row["block_s"] == pytest.approx(sd_wall * 1.05 / (blocks - 10))
    assert cost_row["over_sd_s"] == pytest.approx(sd_wall * 1.05 / (blocks - 10) - sd_wall / blocks)
    assert sa.analyse([cost, base, diff | {"seed": 1}])["blocks"][0]["over_sd_s"] is None   # no sd of its seed


def test_sd_lossless_check_pools_runs_and_flags_a_biased_sd(monkeypatch, tmp_path):
    """benchmarks/sd_lossless_check.py: per run (folder), the first file with both cells; each seed
    against its own seed's baseline; the runs pooled by inverse variance. An sd sampling the verifier's
    law stays within |z| < 2; one dropping a tenth more of each output is flagged."""
    from pathlib import Path

    from speccascade.eval.metrics import bleu_sentence_stats

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import sd_lossless_check as lc

    def cell(method, seed, hyps, gamma=5):
        return {"type": "cell", "method": method, "temperature": 1.0, "gamma": gamma, "batch_size": 1,
                "seed": seed, "quality": {"bleu": METRICS["bleu"](hyps, REFS)},
                "quality_stats": {"bleu": bleu_sentence_stats(hyps, REFS)}}

    def runs(share, n=6):
        files = []
        for k in range(n):
            d = tmp_path / f"share{share}" / f"run{k}"
            d.mkdir(parents=True)
            seeds = (0, 1) if k == 0 else (0,)
            rows = [c for seed in seeds for c in (cell("verifier_only", seed, _dropped(REFS, 0.2, 100 * k + seed)),
                                                  cell("sd", seed, _dropped(REFS, share, 50 + 100 * k + seed)))]
            (d / "sweep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            (d / "sweep_z.jsonl").write_text(json.dumps(cell("sd", 0, REFS)) + "\n")   # no baseline: skipped
            files += [d / "sweep.jsonl", d / "sweep_z.jsonl"]
        return files

    fair = lc.check(runs(0.2))
    assert len(fair["runs"]) == 7 and sorted(r["seed"] for r in fair["runs"]) == [0] * 6 + [1]
    assert all(r["file"] == "sweep.jsonl" for r in fair["runs"])
    assert fair["pooled"]["comparisons"] == 7 and abs(fair["pooled"]["z"]) < 2
    biased = lc.check(runs(0.3))
    assert biased["pooled"]["z"] < -4 and biased["pooled"]["negative"] == 7
    assert biased["pooled"]["sign_test_p"] == pytest.approx(2 / 2 ** 7)


def test_sampler_calibration_finds_no_bias_in_lossless_decodes_and_flags_a_biased_one(monkeypatch):
    """benchmarks/sampler_calibration.py: the mean over generated tokens of -log p(x) - H(p), p the
    verifier's distribution recomputed teacher-forced, is 0 within its noise for verifier_only and sd at
    T = 1, and far from it for decodes that sample another law: the verifier at T = 1.3 scored at T = 1
    (the tail favoured), and the drafter alone."""
    from pathlib import Path

    import torch

    import speccascade as sc

    from tiny_models import tiny_pair

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import sampler_calibration as cal

    d, v = tiny_pair(2, noise=0.5, vocab=24)
    with torch.no_grad():   # peaked distributions (entropy ~1.8 nats of log 24 = 3.2), as a trained model's
        for m in (d, v):
            m.lm_head.weight.mul_(15)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 24, (int(n),), generator=gen).tolist()
               for n in torch.randint(2, 6, (150,), generator=gen)]
    for method in ("verifier_only", "sd"):
        r = cal.calibrate(d, v, v, prompts, method, 1.0, 3, 12, [])
        assert r["tokens"] == 150 * 12 and abs(r["z"]) < 3, r
    hot = []
    for i, prompt in enumerate(prompts):
        out = sc.generate(d, v, [prompt], method="verifier_only", temperature=1.3, max_new_tokens=12,
                          eos_token_id=[], seed=i)
        hot += cal.surprisal_minus_entropy(v, prompt, out.tokens[0], 1.0)
    assert cal.summary(hot)["z"] > 5
    assert cal.calibrate(d, v, v, prompts, "drafter_only", 1.0, 3, 12, [])["z"] > 5


def test_call_costs_times_the_block_arithmetic_on_stand_ins_that_run_algorithm_4(monkeypatch):
    """benchmarks/call_costs.py's block-arithmetic timing: its stand-in models return fixed logits
    (no model runs) and the block still runs Algorithm 4 on them: greedy sd's block emits the drafter's
    argmax while it agrees with the verifier's per-position argmax, then the verifier's token; every
    speculative method is timed at T = 0 and 1, and a method outside the loop is a clear error."""
    from pathlib import Path

    import torch

    from speccascade.loop import DecodeRequest, DecodeState, speculative_block
    from speccascade.registry import get_method
    from speccascade.sampling import SamplingConfig

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import call_costs as cc

    gamma, vocab = 4, 32
    d, v = cc.FixedLogits("drafter", vocab, 2, "cpu", 0), cc.FixedLogits("verifier", vocab, gamma + 1, "cpu", 1)
    agree = int(d.logits[0, 0].argmax())
    v.logits[0, :2, agree] = 100.0          # the verifier agrees at positions 0 and 1, not at 2
    v.logits[0, 2:, agree] = -100.0
    req = DecodeRequest(get_method("sd"), None, gamma, SamplingConfig(temperature=0.0), max_new_tokens=16)
    state = DecodeState(1, req, gamma + 1, gamma, torch.device("cpu"))
    state.start(torch.zeros(1, dtype=torch.long), None)
    speculative_block(d, v, state, req, None, None)
    assert state.emitter.tokens() == [[agree, agree, int(v.logits[0, 2].argmax())]]

    out = cc.block_arithmetic(["sd", "diff"], vocab, gamma, None, "cpu", rounds=1, repeats=2)
    assert set(out) == {"T=0", "T=1"} and all(set(o) == {"sd", "diff"} and min(o.values()) > 0 for o in out.values())
    profiled = cc.block_arithmetic(["sd"], vocab, gamma, None, "cpu", rounds=1, repeats=2, profile=True)
    ops = profiled["kernels"]["T=0"]["sd"]   # on a CPU: the operators of the block (argmax among them)
    assert set(profiled["seconds"]) == {"T=0", "T=1"} and ops["launches_per_call"] > 0
    assert any("argmax" in r["kernel"] for r in ops["top"])
    with pytest.raises(SystemExit, match="token_cascade.*does not run the speculative block"):
        cc.block_arithmetic(["token_cascade"], vocab, gamma, None, "cpu", rounds=1, repeats=2)


def test_call_costs_times_the_arithmetic_on_the_verifiers_vocabulary_with_the_argmax_split_and_whole(tmp_path,
                                                                                                      monkeypatch):
    """``--arithmetic-only --split-argmax both``: no model is loaded or timed; the block's arithmetic runs on
    the vocabulary of the verifier folder's tokenizer (not the shipped one's), once with the vocabulary's
    argmaxes split into chunks and once whole, each under its own key; the switch is left as it was."""
    import json
    import sys
    from pathlib import Path

    from transformers import AutoTokenizer

    from speccascade import sampling
    from speccascade.models.loading import TOKENIZER_DIR

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import call_costs as cc

    folder = tmp_path / "verifier"   # a verifier's folder holding a tokenizer of 3 more tokens than the shipped one
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR, local_files_only=True)
    tok.add_tokens(["<x1>", "<x2>", "<x3>"])
    tok.save_pretrained(folder)
    out = tmp_path / "costs.json"
    monkeypatch.setattr(sys, "argv", ["call_costs.py",   # (no --drafter: no model is loaded)
                                      "--verifier", str(folder), "--device", "cpu", "--arithmetic-only",
                                      "--arithmetic-methods", "sd", "--split-argmax", "both", "--rounds", "1",
                                      "--repeats", "1", "--out", str(out)])
    before = sampling.SPLIT_ARGMAX
    cc.main()
    record = json.loads(out.read_text())
    assert record["block_arithmetic_vocab"] == len(tok) == len(AutoTokenizer.from_pretrained(TOKENIZER_DIR)) + 3
    for key in ("block_arithmetic_s", "block_arithmetic_whole_argmax_s"):
        assert set(record[key]) == {"T=0", "T=1"} and record[key]["T=1"]["sd"] > 0
    assert "c" not in record and record["weights"] is None and sampling.SPLIT_ARGMAX == before
