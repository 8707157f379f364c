"""Verified resolution against the paper's rule: `resolution: paper` reproduces the decisions and weights of the
unchecked loop (recorded from commit 29efb48), the verified merge never ends below the pre-merge on validation (on
the zoo's demo pair, and as a property of `resolve` on random inputs), and the dry run counts the candidates."""
import dataclasses, hashlib, json, zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings, strategies as st, example

from himerge.contributions import Contributions
from himerge.deltas import LayerDeltas
from himerge.merge import merge
from himerge.zoo import demo_config
from himerge.layer_edits import ResolvedDeltas
from himerge.resolve import Measures, ResolveSettings, improvement, resolve

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "demo_paper_decisions.json").read_text())


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    "The demo pair merged by the paper's rule and by the verified rule, sharing one evaluation cache."
    root = tmp_path_factory.mktemp("resolution")
    runs = {}
    for mode in ("paper", "verified"):
        cfg = demo_config(root / mode)
        cfg["options"] = {**cfg["options"], "resolution": mode, "test_scores": False, "cache_dir": str(root / "cache")}
        runs[mode] = merge(cfg, out=root / mode, progress=False)
    return runs


def test_paper_rule_reproduces_the_unchecked_loop_exactly(demo_runs):
    report = demo_runs["paper"].report
    keys = ("order", "layer", "class", "action", "edits", "score_before", "score_after", "gamma", "total_conflict")
    assert [{k: d[k] for k in keys} for d in report["decisions"]] == FIXTURE["decisions"]
    assert report["classes"] == FIXTURE["classes"]
    assert report["gamma"] == FIXTURE["gamma"]
    assert report["resolution"]["stopped"] == FIXTURE["stopped"]
    assert report["resolution"]["evaluations"] == FIXTURE["evaluations"]
    assert report["scores"]["validation"]["merged"] == FIXTURE["validation_merged"]
    model = (demo_runs["paper"].output / "model.safetensors").read_bytes()
    assert hashlib.sha256(model).hexdigest() == FIXTURE["model_sha256"]


def normalised_mean(scores: dict, base: dict, sources: dict, owner: dict) -> float:
    "Mean over tasks of (score − base) / (own source − base): the quantity the accept rule raises."
    return float(np.mean([(scores[t] - base[t]) / (sources[owner[t]][t] - base[t]) for t in owner]))


def test_verified_demo_never_ends_below_the_pre_merge_and_records_every_candidate(demo_runs):
    report = demo_runs["verified"].report
    val = report["scores"]["validation"]
    owner = {s["task"]: s["name"] for s in report["sources"]}
    merged = normalised_mean(val["merged"], val["base"], val["sources"], owner)
    pre = normalised_mean(val["pre_merge"], val["base"], val["sources"], owner)
    assert merged >= pre - 1e-12, (merged, pre)
    assert report["resolution"]["mode"] == "verified"
    for d in report["decisions"]:
        taken = [c for c in d["candidates"] if c["taken"]]
        assert len(taken) == 1 and (taken[0]["action"] == "left as it is") == (not d["taken"])
        assert d["candidates"][0]["action"] == "left as it is" and d["candidates"][0]["improvement"] is None
        if d["taken"]:   # the accept rule: above zero and above accept_z paired standard errors
            assert taken[0]["improvement"] > max(0.0, report["resolution"]["accept_z"] * taken[0]["improvement_se"])
    kept = [str(d["layer"]) for d in report["decisions"] if not d["taken"] and d["class"] != "refine"]
    assert report["resolution"]["kept"] == kept
    card = (demo_runs["verified"].output / "README.md").read_text()
    assert "Resolution candidates" in card and "left as it is" in card and "**taken**" in card


def test_the_dry_run_counts_the_candidates(tmp_path):
    cfg = demo_config(tmp_path / "out")
    plans = {}
    for mode in ("paper", "verified"):
        cfg["options"] = {**cfg["options"], "resolution": mode}
        plans[mode] = merge(cfg, dry_run=True).evaluations
    assert "resolution candidates (at most)" in plans["verified"] and "resolution scores (at most)" in plans["paper"]
    # 4 layers, 2 sources: at most 3 candidates a layer besides leaving it (each source alone, all halved), 2 tasks
    assert plans["verified"]["resolution candidates (at most)"] == 4 * 3 * 2


# The property, on random inputs: whatever the γ table and whatever the validation scores of each state, the
# verified merge's mean gain-normalised validation score is never below the pre-merge's.

class InMemoryDeltas(LayerDeltas):
    def __init__(self, layers, sources):
        self.layers, self.scale = list(range(layers)), [1.0] * sources
        self.source_names = [f"s{i}" for i in range(sources)]
        self.delta = {(i, layer): {f"layers.{layer}.w": torch.ones(2, 2) * (i + 1)} for i in range(sources)
                      for layer in range(layers)}
    def base_layer(self, layer): return {f"layers.{layer}.w": torch.zeros(2, 2)}
    def source_layer(self, i, layer): return self.delta[(i, layer)]


def random_scores(seed: int, tasks: list, rows: int):
    "A validation set whose per-row scores are an arbitrary (but fixed) function of the edits of a state."
    def score(states):
        out = []
        for r in states:
            rng = np.random.default_rng(zlib.crc32(repr((seed, r.key())).encode()))
            out.append({t: rng.integers(0, 2, rows).astype(float) if k % 2 == 0 else rng.random(rows)
                        for k, t in enumerate(tasks)})
        return out
    return score


@settings(max_examples=60, deadline=None)
# no layer conflicted, yet refinement steps: the first step is not a resolution (seen failing before the filter below)
@example(seed=7, n_sources=3, n_layers=1, accept_z=0.0, refine="layer_scale", rows=1, budget=None, merge_scales=())
@given(seed=st.integers(0, 2**31), n_sources=st.integers(2, 3), n_layers=st.integers(1, 5),
       accept_z=st.sampled_from([0.0, 0.5, 1.0, 2.0]), refine=st.sampled_from(["none", "layer_scale"]),
       rows=st.integers(1, 12), budget=st.sampled_from([None, 0, 6, 20]),
       merge_scales=st.sampled_from([(), (0.5, 1.5), (0.4, 0.6, 0.8, 1.2)]))
def test_verified_resolution_never_ends_below_the_pre_merge(seed, n_sources, n_layers, accept_z, refine, rows,
                                                             budget, merge_scales):
    rng = np.random.default_rng(seed)
    names = [f"s{i}" for i in range(n_sources)]
    gamma = pd.DataFrame([dict(layer=layer, source=m, gamma=float(rng.normal(0.1, 0.3)),
                               gamma_se=float(rng.uniform(0, 0.2))) for layer in range(n_layers) for m in names])
    table = pd.DataFrame([dict(layer=layer, state=f"source:{m}", task=m, c=float(rng.normal()))
                          for layer in range(n_layers) for m in names])
    gains = {m: float(rng.uniform(0.1, 2.0)) for m in names}
    contributions = Contributions({}, table, gamma, gains, {}, list(range(n_layers)))
    scores = random_scores(seed, names, rows)
    rule = ResolveSettings(tuple([1.0] * n_sources), tuple([1.0] * n_sources), accept_z=accept_z,
                           conflict_z=float(rng.choice([0.0, 1.0])), refine=refine, budget=budget,
                           merge_scales=merge_scales)
    deltas = InMemoryDeltas(n_layers, n_sources)
    result = resolve(contributions, deltas, names, names, rule, Measures(rows=scores))
    start, end = scores([ResolvedDeltas(deltas), result.deltas])
    mean, _ = improvement(start, end, gains)
    assert mean >= -1e-12
    assert budget is None or result.evaluations <= budget
    for d in result.decisions:   # every step taken raised the score by more than the rule asks
        if d.taken:
            taken = next(c for c in d.candidates if c["taken"])
            assert taken["improvement"] > max(0.0, accept_z * taken["improvement_se"])
    if budget is None:   # both rules visit the most conflicted layer first
        unchecked = dataclasses.replace(rule, resolution="paper", refine="none")   # merge_scales: not used by it
        paper = resolve(contributions, deltas, names, names, unchecked)
        resolved = [d.layer for d in result.decisions if d.cls != "refine"]   # refinement may act on any layer
        assert [d.layer for d in paper.decisions][:1] == resolved[:1]
